"""``ifp-compile report``: a self-contained, deterministic HTML page whose numbers are the
data's, from a real build directory and from a hand-made eval directory whose mask
overlaps are computed by hand; every bad input is a ReportError and leaves no file."""

from __future__ import annotations

import argparse
import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from ifp_compile.build import build
from ifp_compile.cli import main
from ifp_compile.report import ReportError, load_report_data, write_report
from ifp_compile.report.command import add_arguments, report_main
from ifp_compile.report.overlap import domain_matrix, jaccard
from tests.helpers import write_build_project

PNG = b"\x89PNG\r\n\x1a\n"
DATA_URI = 'src="data:image/png;base64,'


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def build_dir(tmp_path_factory):
    """A real build (pt2 only, to stay fast) of a tiny Llama: three tasks, two share a mask."""
    d = tmp_path_factory.mktemp("build")
    g = np.random.default_rng(0)
    m1 = [(g.random(64) < 0.5).astype(np.float32), (g.random(64) * 2).astype(np.float32)]
    m2 = [np.ones(64, np.float32), (np.arange(64) < 16).astype(np.float32)]
    write_build_project(d, {"m1": m1, "m2": m2}, {"alpha": "m1", "beta": "m2", "gamma": "m1"})
    build(str(d / "model.pt2"), d / "tasks.jsonl", d / "out", formats=("pt2",))
    return d / "out", {"alpha": m1, "beta": m2, "gamma": m1}


# kept sets of the hand-made eval directory: masks[kind][domain][layer] = examples x width 4
HAND = {
    "prompt-activation": {
        "a": [[[1, 1, 0, 0], [1, 1, 0, 0]], [[1, 0, 0, 0], [0, 1, 0, 0]]],
        "b": [[[1, 1, 1, 0], [0, 0, 1, 1]], [[1, 1, 1, 1], [1, 1, 1, 1]]],
    },
    "static": {"a": [[[1, 1, 0, 0]], [[1, 1, 0, 0]]], "b": [[[1, 1, 0, 0]], [[1, 1, 0, 0]]]},
}
# by hand: layer 0: J(a,a) = 1; J(a,b) = mean(2/3, 0, 2/3, 0) = 1/3; J(b0,b1) = 1/4
#          layer 1: J(a0,a1) = 0; J(a,b) = 1/4 for every pair; J(b,b) = 1
HAND_MATRICES = np.array([[[1.0, 1 / 3], [1 / 3, 0.25]], [[0.0, 0.25], [0.25, 1.0]]])

EVAL = {
    "tool_version": "0.1.0", "model": "SmolLM2-135M-Instruct", "keep": 0.5, "domains": ["a", "b"],
    "rows": [
        {"name": "dense", "kind": "dense", "parameters": 134515008, "loss": {"a": 2.1, "b": 3.25},
         "math_accuracy": 0.35},
        {"name": "static mask (Adapt-Pruner)", "kind": "static", "parameters": 94701888,
         "loss": {"a": 2.875, "b": 3.9}, "math_accuracy": 0.1},
        {"name": "per-task: prompt activation", "kind": "prompt-activation", "parameters": 94701889,
         "loss": {"a": 2.4567, "b": None}, "math_accuracy": None},
    ],
    "summary": [{"row": "per-task: prompt activation", "domain": "a", "metric": "loss", "gap_closed": 0.42}],
}


def write_eval(d: Path, masks=None, ev=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    masks = HAND if masks is None else masks
    tensors = {f"{k}/{dom}/ffn.{i}": np.asarray(layer, dtype=np.uint8)
               for k, doms in masks.items() for dom, layers in doms.items() for i, layer in enumerate(layers)}
    save_file(tensors, str(d / "masks.safetensors"))
    (d / "eval.json").write_text(json.dumps(EVAL if ev is None else ev))
    return d


def pngs(html: str) -> list[bytes]:
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def assert_self_contained(html: str, n_images: int) -> None:
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "url(" not in html
    assert html.count('src="') == html.count(DATA_URI) == n_images
    images = pngs(html)
    assert len(images) == n_images and all(p.startswith(PNG) and len(p) > 1000 for p in images)


def no_output(d: Path) -> bool:
    return not (d / "report.html").exists() and not list(d.glob(".report.html.tmp-*"))


# --------------------------------------------------------------------------------------
# a real build directory
# --------------------------------------------------------------------------------------
def test_build_report_is_self_contained(build_dir, tmp_path):
    out_dir, _ = build_dir
    out = write_report(out_dir, out=tmp_path / "r.html")
    assert out == tmp_path / "r.html"
    html = out.read_text()
    assert_self_contained(html, 3)  # kept widths, overlap heatmaps, overlap vs depth
    for name in ("alpha", "beta", "gamma"):
        assert f"<td>{name}</td>" in html
    manifest = json.loads((out_dir / "tasks" / "beta" / "manifest.json").read_text())
    assert f"{manifest['parameters']['pt2_parameters']:,}" in html
    assert "Tasks with identical masks (their lines coincide): alpha = gamma." in html
    assert "No speed data was given" in html and "python benchmarks/decode.py --json DIR/speed.json" in html


def test_build_overlap_is_the_jaccard_of_the_stored_masks(build_dir):
    out_dir, masks = build_dir
    data = load_report_data(out_dir)
    assert data.kind == "build" and data.widths == [64, 64]
    assert [k.label for k in data.kept] == ["alpha", "beta", "gamma"]
    assert data.kept[1].per_layer == [64.0, 16.0]
    (o,) = data.overlaps
    assert o.labels == ["alpha", "beta", "gamma"] and o.within is None
    for layer in range(2):
        kept = {n: set(np.flatnonzero(m[layer])) for n, m in masks.items()}
        for i, a in enumerate(o.labels):
            for j, b in enumerate(o.labels):
                union = kept[a] | kept[b]
                expected = 1.0 if i == j else len(kept[a] & kept[b]) / len(union)
                assert o.matrices[layer, i, j] == pytest.approx(expected)
        assert o.cross[layer] == pytest.approx(o.matrices[layer][~np.eye(3, dtype=bool)].mean())
    assert o.matrices[0, 0, 2] == 1.0  # alpha and gamma share one mask


def test_build_without_mask_files_must_be_rebuilt(build_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(build_dir[0], old)
    (old / "tasks" / "beta" / "mask.safetensors").unlink()
    with pytest.raises(ReportError, match=r"task 'beta': .*tasks/beta/mask.safetensors is missing; builds made "
                                          r"before mask files were stored must be rebuilt"):
        write_report(old)
    assert no_output(old)
    (old / "index.json").write_text('{"tasks": {"alpha": ')
    with pytest.raises(ReportError, match=r"old/index.json: not valid JSON"):
        write_report(old)
    assert no_output(old)


# --------------------------------------------------------------------------------------
# a hand-made eval directory: the numbers are the hand-computed ones
# --------------------------------------------------------------------------------------
def test_jaccard_and_domain_matrix_by_hand():
    a = np.array([[1, 1, 0, 0]], bool)
    b = np.array([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0]], bool)
    np.testing.assert_allclose(jaccard(a, b), [[2 / 3, 0.0, 0.0]])
    assert jaccard(b[2:], b[2:])[0, 0] == 1.0  # two empty sets are identical
    m = domain_matrix([a, b[:2]])
    assert np.isnan(m[0, 0])  # one example: no pair of distinct examples
    np.testing.assert_allclose(m[1:, :], [[1 / 3, 0.25]])


def test_eval_overlaps_equal_the_hand_values(tmp_path):
    data = load_report_data(write_eval(tmp_path / "ev"))
    assert data.kind == "eval" and data.widths == [4, 4]
    (o,) = data.overlaps  # static is one mask for everything: not compared
    assert o.name == "prompt-activation" and o.labels == ["a", "b"]
    np.testing.assert_allclose(o.matrices, HAND_MATRICES)
    np.testing.assert_allclose(o.cross, [1 / 3, 0.25])
    np.testing.assert_allclose(o.within, [(1 + 0.25) / 2, (0 + 1) / 2])
    kept = {k.label: k.per_layer for k in data.kept}
    assert kept == {"prompt-activation: a": [2.0, 1.0], "prompt-activation: b": [2.5, 4.0],
                    "static: a": [2.0, 2.0], "static: b": [2.0, 2.0]}


def test_eval_report_tables_show_the_data(tmp_path):
    d = write_eval(tmp_path / "ev")
    html = write_report(d).read_text()
    assert_self_contained(html, 3)  # kept widths, one heatmap grid (prompt-activation), overlap vs depth
    rows = re.findall(r"<tr>(.*?)</tr>", html)
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r) for r in rows]
    assert ["0", "0.333", "0.625"] in cells and ["1", "0.250", "0.500"] in cells  # layer, cross, within
    assert ["prompt-activation: b", "6.5", "2.5", "4"] in cells  # mean kept channels per layer
    dense = next(c for c in cells if c[:2] == ["dense", "dense"])
    assert dense[2:] == ["134,515,008", "100.0%", "2.100", "3.250", "35.0%"]
    per_task = next(c for c in cells if c[0] == "per-task: prompt activation" and len(c) > 2)
    assert per_task[2:] == ["94,701,889", "70.4%", "2.457", "\u2013", "\u2013"]
    assert ["per-task: prompt activation", "+42.0%"] in cells  # gap closed
    assert "SmolLM2-135M-Instruct" in html and "first third" not in html  # two layers: no thirds sentence
    assert "95% intervals" not in html  # an eval.json without intervals (older): no such section


def test_eval_report_draws_the_intervals(tmp_path):
    ev = dict(EVAL, intervals=[
        {"row": "per-task: prompt activation", "baseline": "static mask (Adapt-Pruner)", "domain": "a",
         "mean": -0.25, "low": -0.4, "high": -0.1, "n": 100, "level": 0.95, "excludes_zero": True},
        {"row": "per-task: prompt activation", "baseline": "static mask (Adapt-Pruner)", "domain": "b",
         "mean": 0.05, "low": -0.02, "high": 0.12, "n": 100, "level": 0.95, "excludes_zero": False}])
    html = write_report(write_eval(tmp_path / "ev", ev=ev)).read_text()
    assert_self_contained(html, 4)  # the three figures and the intervals
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r) for r in re.findall(r"<tr>(.*?)</tr>", html)]
    assert ["per-task: prompt activation", "a", "-0.2500", "[-0.4000, -0.1000] *", "100"] in cells
    assert ["per-task: prompt activation", "b", "+0.0500", "[-0.0200, +0.1200]", "100"] in cells
    assert "Against static mask (Adapt-Pruner), with 95% intervals" in html


def test_eval_report_groups_intervals_by_baseline_and_reads_per_task_from_rows(tmp_path):
    """With the controls, frozen rows are compared with the static learned mask and joint rows
    with the joint one: one section per baseline. A row that says it is not per task (a
    static learned mask) gets no task-by-task overlap, whatever its kind is called."""
    iv = {"domain": "a", "mean": -0.1, "low": -0.2, "high": -0.05, "n": 100, "level": 0.95, "excludes_zero": True}
    rows = [*EVAL["rows"], {"name": "static learned mask", "kind": "static-learned", "per_task": False,
                            "parameters": 1, "loss": {"a": 2.5, "b": 3.5}, "math_accuracy": None}]
    ev = dict(EVAL, rows=rows, intervals=[
        {**iv, "row": "per-task predictor", "baseline": "static learned mask"},
        {**iv, "row": "per-task predictor, LLM trained with it", "baseline": "static learned mask, LLM trained"}])
    masks = {**HAND, "static-learned": HAND["static"]}
    data = load_report_data(write_eval(tmp_path / "ev", masks=masks, ev=ev))
    assert [o.name for o in data.overlaps] == ["prompt-activation"]
    html = write_report(tmp_path / "ev").read_text()
    assert "Against static learned mask, with 95% intervals" in html
    assert "Against static learned mask, LLM trained, with 95% intervals" in html


def test_eval_report_shows_the_swap_matrix(tmp_path):
    ev = dict(EVAL, swap={"per-task: prompt activation": {"a": {"a": 2.4, "b": 2.6}, "b": {"a": 3.1, "b": 3.3}}},
              swap_diagonal_wins={"per-task: prompt activation": {"a": True, "b": False}})
    html = write_report(write_eval(tmp_path / "ev", ev=ev)).read_text()
    cells = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r) for r in re.findall(r"<tr>(.*?)</tr>", html)]
    assert ["segments of", "a masks", "b masks", "own masks win"] in cells
    assert ["a", "2.400", "2.600", "yes"] in cells and ["b", "3.100", "3.300", "no"] in cells


def test_speed_json_is_rendered_generically(tmp_path):
    d = write_eval(tmp_path / "ev")
    speed = {"model": "m", "ideal_ratio": 1.42,
             "rows": [{"name": "dense", "tokens_per_s": 40.1}, {"name": "task", "ratio_to_dense": 1.37, "x": 3}],
             "ttft": [{"name": "task", "selection_s": 0.012, "total_s": 0.25}]}
    (d / "speed.json").write_text(json.dumps(speed))  # found without --speed
    html = write_report(d).read_text()
    rows = [re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r) for r in re.findall(r"<tr>(.*?)</tr>", html)]
    assert ["name", "tokens_per_s", "ratio_to_dense", "x"] in rows  # union of keys, first-seen order
    assert ["task", "", "1.37", "3"] in rows and ["ideal_ratio", "1.42"] in rows
    assert ["name", "selection_s", "total_s"] in rows and ["task", "0.012", "0.25"] in rows
    assert "No speed data" not in html
    other = tmp_path / "speed2.json"
    other.write_text(json.dumps({"rows": [{"engine": "ort", "tokens_per_s": 99.5}]}))
    html = write_report(d, speed=other).read_text()
    assert "<th>engine</th>" in html and "99.5" in html and "40.1" not in html


def test_report_is_deterministic(build_dir, tmp_path):
    d = write_eval(tmp_path / "ev")
    one, two = write_report(d, out=tmp_path / "1.html"), write_report(d, out=tmp_path / "2.html")
    assert one.read_bytes() == two.read_bytes()
    one, two = write_report(build_dir[0], out=tmp_path / "3.html"), write_report(build_dir[0], out=tmp_path / "4.html")
    assert one.read_bytes() == two.read_bytes()


def test_many_tasks_are_cut_to_forty_in_the_heatmaps(tmp_path):
    g = np.random.default_rng(1)
    masks = {"random": {f"d{i:02d}": [(g.random((2, 8)) < 0.5) for _ in range(2)] for i in range(45)}}
    data = load_report_data(write_eval(tmp_path / "ev", masks, {**EVAL, "domains": []}))
    (o,) = data.overlaps
    assert len(o.labels) == 45 and o.shown == [f"d{i:02d}" for i in range(40)] and o.matrices.shape == (2, 40, 40)
    html = write_report(tmp_path / "ev").read_text()
    assert "45 tasks: the heatmaps show only the first 40 by name" in html


# --------------------------------------------------------------------------------------
# bad inputs
# --------------------------------------------------------------------------------------
def test_bad_directories(tmp_path):
    with pytest.raises(ReportError, match=r"nope: no such directory"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match=r"empty: neither a build directory \(no index.json.*nor an eval directory"):
        write_report(tmp_path / "empty")
    assert no_output(tmp_path / "empty")
    d = write_eval(tmp_path / "ev")
    (d / "eval.json").write_text('{"rows": [')
    with pytest.raises(ReportError, match=r"ev/eval.json: not valid JSON \(Expecting value at line 1"):
        write_report(d)
    assert no_output(d)


def _wider(m):
    m["prompt-activation"]["b"][1] = [[1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]


def _fewer_layers(m):
    m["static"]["a"].pop()


def _more_examples(m):
    m["static"]["b"][1] = [[1, 0, 0, 0], [0, 1, 0, 0]]


@pytest.mark.parametrize("change, message", [
    (_wider, r"masks.safetensors: prompt-activation/b/ffn.1 has width 5, but prompt-activation/a/ffn.1 has 4"),
    (_fewer_layers, r"static/a has 1 layers \(ffn.0 .. ffn.0\), but prompt-activation/a has 2"),
    (_more_examples, r"static/b/ffn.1 has 2 examples, static/b/ffn.0 has 1"),
])
def test_inconsistent_eval_masks_name_the_key(tmp_path, change, message):
    masks = json.loads(json.dumps(HAND))
    change(masks)
    d = write_eval(tmp_path / "ev", masks)
    with pytest.raises(ReportError, match=message):
        write_report(d)
    assert no_output(d)


def test_bad_out_and_speed(tmp_path):
    d = write_eval(tmp_path / "ev")
    with pytest.raises(ReportError, match=r"--out .* is a directory"):
        write_report(d, out=tmp_path)
    with pytest.raises(ReportError, match=r"speed file .*missing.json: no such file"):
        write_report(d, speed=tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("tokens_per_s: 40")
    with pytest.raises(ReportError, match=r"speed file .*bad.json: not valid JSON"):
        write_report(d, speed=tmp_path / "bad.json")
    (d / "speed.json").write_text("{")
    with pytest.raises(ReportError, match=r"speed file .*ev/speed.json: not valid JSON"):
        write_report(d)
    assert no_output(d)


# --------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------
def test_report_main_writes_the_file(tmp_path, capsys):
    d = write_eval(tmp_path / "ev")
    p = argparse.ArgumentParser()
    add_arguments(p)
    assert report_main(p.parse_args([str(d)])) == 0
    assert (d / "report.html").is_file() and f"wrote {d / 'report.html'}" in capsys.readouterr().out
    assert report_main(p.parse_args([str(d), "--out", str(tmp_path / "x" / "r.html")])) == 0
    assert (tmp_path / "x" / "r.html").read_bytes() == (d / "report.html").read_bytes()
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "error: " in capsys.readouterr().err

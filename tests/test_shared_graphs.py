"""Tasks of the same widths share one graph and are written from a plan (``shared_graphs``):
the bytes are those the graph passes give, the passes run once per signature, and a plan
whose graph changed is not trusted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import ifp_compile as ifp
from tests.helpers import write_build_project

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from ifp_compile import build as build_module  # noqa: E402
from ifp_compile.build import build, verify  # noqa: E402
from ifp_compile.shared_graphs import GRAPHS, signature  # noqa: E402

BOTH = ("onnx", "pt2")


def _pick(g, k: int, soft: bool = False) -> np.ndarray:
    m = np.zeros(64, np.float32)
    m[g.choice(64, k, replace=False)] = (g.random(k) * 2 + 0.05) if soft else 1.0
    return m


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """Three tasks for each of three signatures: a sliced block and a whole block with soft
    values; a sliced block with soft values and a whole unscaled block (the base's own
    tensors); a sliced block and a dropped one."""
    d = tmp_path_factory.mktemp("shared")
    g = np.random.default_rng(7)
    masks = {}
    for i in range(3):
        masks[f"a{i}"] = [_pick(g, 20), _pick(g, 64, soft=True)]
        masks[f"b{i}"] = [_pick(g, 20, soft=True), np.ones(64, np.float32)]
        masks[f"c{i}"] = [_pick(g, 33), np.zeros(64, np.float32)]
    ep, ids = write_build_project(d, masks, {name: name for name in masks})
    return d, ep, ids, masks


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_tasks_of_one_signature_share_a_graph_and_equal_the_passes(project, tmp_path, monkeypatch):
    d, ep, ids, masks = project
    import importlib

    onnx_specialize = importlib.import_module("ifp_compile.passes.onnx_specialize")
    specialize_module = importlib.import_module("ifp_compile.passes.specialize")  # the package exports the function

    calls = {"onnx": 0, "pt2": 0}
    onnx_pass, pt2_pass = onnx_specialize.specialize_onnx_with_slices, specialize_module.specialize_with_slices

    def count(fmt, fn):
        def wrapped(*a, **k):
            calls[fmt] += 1
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(onnx_specialize, "specialize_onnx_with_slices", count("onnx", onnx_pass))
    monkeypatch.setattr(specialize_module, "specialize_with_slices", count("pt2", pt2_pass))
    shared = build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "shared", formats=BOTH)
    assert sorted(shared.built) == sorted(masks) and not shared.failed
    assert calls == {"onnx": 3, "pt2": 3}  # once per signature, not once per task
    monkeypatch.undo()
    passes = build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "passes", formats=BOTH, share_graphs=False)
    assert sorted(passes.built) == sorted(masks)
    one, two = files_of(tmp_path / "shared"), files_of(tmp_path / "passes")
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []  # every task, graph, weight and manifest

    out = tmp_path / "shared"
    assert verify(out) == sorted(masks)
    for name in masks:  # the graph a task holds is the stored one (a hard link), named by its hash
        task = out / "tasks" / name
        files = json.loads((task / "manifest.json").read_text())["files"]
        for fmt, graph in (("onnx", "model.onnx"), ("pt2", "program.pt2")):
            stored = out / GRAPHS / f"{files[graph]}.{fmt}"
            assert stored.stat().st_ino == (task / graph).stat().st_ino
    # tasks a0 and a1 differ in their weights only; a* and c* in their graphs too
    tasks = out / "tasks"
    assert (tasks / "a0" / "model.onnx").stat().st_ino == (tasks / "a1" / "model.onnx").stat().st_ino
    assert (tasks / "a0" / "ffn.bin").read_bytes() != (tasks / "a1" / "ffn.bin").read_bytes()
    assert (tasks / "a0" / "program.pt2").stat().st_ino != (tasks / "c0" / "program.pt2").stat().st_ino
    # a task written from a plan computes what the specialised program computes
    for name in ("a2", "b2", "c2"):
        m = [torch.from_numpy(x) for x in masks[name]]
        with torch.no_grad():
            ref = ifp.specialize(ep, mask=m).module()(ids)
        sess = ort.InferenceSession(str(tasks / name / "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
        from ifp_compile.artifacts import load_artifact

        torch.testing.assert_close(load_artifact(tasks / name, format="pt2").module()(ids), ref, rtol=0, atol=0)


def test_signature_counts_kept_channels_and_soft_values():
    assert signature([np.array([0, 1, 1, 0], np.float32), np.array([0.5, 1, 1, 1], np.float32),
                      np.ones(4, np.float32), np.zeros(4, np.float32)]) == [[2, 0], [4, 1], [4, 0], [0, 0]]


def test_workers_write_planned_tasks_with_the_same_bytes(project, tmp_path):
    d, *_ = project
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "serial", formats=BOTH)
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "parallel", formats=BOTH, jobs=2)
    assert files_of(tmp_path / "serial") == files_of(tmp_path / "parallel")


def _add_task(d: Path, tasks: Path, name: str, masks) -> Path:
    from safetensors.numpy import save_file

    save_file({f"ffn.{i}": m for i, m in enumerate(masks)}, str(d / f"{name}.safetensors"))
    path = d / f"tasks-{name}.jsonl"
    path.write_text(tasks.read_text() + json.dumps({"name": name, "mask": f"{name}.safetensors"}) + "\n")
    return path


def test_a_later_task_of_known_widths_needs_no_model(project, tmp_path, monkeypatch):
    """``--only`` of a new task whose widths a plan knows: no model load, no export, no pass."""
    d, *_ = project
    out = tmp_path / "out"
    build(str(d / "model.pt2"), d / "tasks.jsonl", out, formats=BOTH)
    tasks = _add_task(d, d / "tasks.jsonl", "late", [_pick(np.random.default_rng(1), 20),
                                                     _pick(np.random.default_rng(2), 64, soft=True)])

    def refuse(*a, **k):
        raise AssertionError("the model was loaded, exported or specialised")

    monkeypatch.setattr(build_module.Source, "programs", refuse)
    monkeypatch.setattr(build_module.Source, "onnx", refuse)
    monkeypatch.setattr(build_module, "_onnx_task", refuse)
    report = build(str(d / "model.pt2"), tasks, out, formats=BOTH, only="late")
    assert report.built == ["late"] and not report.failed
    monkeypatch.undo()
    fresh = build(str(d / "model.pt2"), tasks, tmp_path / "fresh", formats=BOTH, only="late", share_graphs=False)
    assert fresh.built == ["late"]
    a, b = files_of(out / "tasks" / "late"), files_of(tmp_path / "fresh" / "tasks" / "late")
    assert a == b


def test_a_stored_graph_that_changed_is_not_used(project, tmp_path):
    d, *_ = project
    out = tmp_path / "out"
    build(str(d / "model.pt2"), d / "tasks.jsonl", out, formats=("onnx",))
    graph = json.loads((out / "tasks" / "a0" / "manifest.json").read_text())["files"]["model.onnx"]
    stored = out / GRAPHS / f"{graph}.onnx"
    stored.unlink()  # replaced, not edited in place: the tasks keep their own (hard-linked) file
    stored.write_bytes(b"not the graph")
    g = np.random.default_rng(3)
    tasks = _add_task(d, d / "tasks.jsonl", "late2", [_pick(g, 20), _pick(g, 64, soft=True)])
    report = build(str(d / "model.pt2"), tasks, out, formats=("onnx",), only="late2")
    assert report.built == ["late2"] and not report.failed
    build(str(d / "model.pt2"), tasks, tmp_path / "fresh", formats=("onnx",), only="late2", share_graphs=False)
    assert files_of(out / "tasks" / "late2") == files_of(tmp_path / "fresh" / "tasks" / "late2")
    assert stored.stat().st_ino == (out / "tasks" / "late2" / "model.onnx").stat().st_ino  # stored again
    assert verify(out) == sorted([*json.loads((out / "index.json").read_text())["tasks"]])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_streamed_half_precision_checkpoint_gives_the_passes_bytes(tmp_path, dtype):
    """A Hugging Face directory is captured without its weights: the first task of each
    signature is the weightless passes' (slices recorded as recipes), the others are cut
    from the base in half precision (``ml_dtypes`` in ONNX, torch in pt2), the same bytes;
    a float16 task written from a plan runs in ONNX Runtime as its program does."""
    from safetensors.numpy import save_file

    from tests.zoo import hf_model

    model = hf_model("qwen2").to(getattr(torch, dtype))
    model.save_pretrained(tmp_path / "ckpt")
    g = np.random.default_rng(5)
    masks = {f"s{i}": [_pick(g, 20, soft=True), np.ones(64, np.float32)] for i in range(2)}
    masks.update({f"d{i}": [_pick(g, 33), np.zeros(64, np.float32)] for i in range(2)})
    lines = []
    for name, m in masks.items():
        save_file({f"ffn.{i}": a for i, a in enumerate(m)}, str(tmp_path / f"{name}.safetensors"))
        lines.append(json.dumps({"name": name, "mask": f"{name}.safetensors"}))
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    args = (str(tmp_path / "ckpt"), tmp_path / "tasks.jsonl")
    shared = build(*args, tmp_path / "shared", formats=BOTH, dtype=dtype)
    passes = build(*args, tmp_path / "passes", formats=BOTH, dtype=dtype, share_graphs=False)
    assert sorted(shared.built) == sorted(passes.built) == sorted(masks)
    one, two = files_of(tmp_path / "shared"), files_of(tmp_path / "passes")
    assert one.keys() == two.keys() and [k for k in one if one[k] != two[k]] == []
    assert len(list((tmp_path / "shared" / GRAPHS / "plans").glob("*.json"))) == 4  # 2 signatures x 2 formats
    if dtype == "float16":  # ONNX Runtime's CPU provider has float16 kernels (not bfloat16 ones)
        from ifp_compile.artifacts import load_artifact

        ids = torch.randint(0, 100, (1, 7))
        task = tmp_path / "shared" / "tasks" / "s1"  # written from the plan
        sess = ort.InferenceSession(str(task / "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0]).float()
        with torch.no_grad():
            ref = load_artifact(task, format="pt2").module()(ids).float()
        torch.testing.assert_close(got, ref, rtol=1e-2, atol=1e-2)

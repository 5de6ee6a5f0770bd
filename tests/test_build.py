"""``ifp-compile build``: artifacts equal the specialised program, and the build is
deterministic, incremental, deduplicating, atomic, locked and verifiable."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import ifp_compile as ifp
from ifp_compile.cli import main
from tests.helpers import write_build_project

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from safetensors.numpy import save_file  # noqa: E402

from ifp_compile.artifacts import ArtifactError, load_artifact  # noqa: E402
from ifp_compile.build import BuildError, build, inspect_rows, verify  # noqa: E402


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A saved tiny Llama program, three mask files (two tasks share one) and tasks.jsonl."""
    d = tmp_path_factory.mktemp("proj")
    g = np.random.default_rng(0)
    masks = {
        "m1": [(g.random(64) < 0.5).astype(np.float32), (g.random(64) * 2).astype(np.float32)],
        "m2": [np.ones(64, np.float32), np.zeros(64, np.float32)],
    }
    ep, ids = write_build_project(d, masks, {"alpha": "m1", "beta": "m2", "gamma": "m1"})
    return d, ep, ids, masks


def files_of(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def run_task(task_dir: Path, ids):
    sess = ort.InferenceSession(str(task_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])


def test_build_artifacts_equal_the_specialized_program(project, tmp_path):
    d, ep, ids, masks = project
    report = build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "out", formats=("onnx", "pt2"))
    assert report.built == ["alpha", "beta", "gamma"] and report.shared == ["gamma"]
    out = tmp_path / "out"
    for name, key in [("alpha", "m1"), ("beta", "m2"), ("gamma", "m1")]:
        m = [torch.from_numpy(x) for x in masks[key]]
        with torch.no_grad():
            ref = ifp.specialize(ep, mask=m).module()(ids)
        torch.testing.assert_close(run_task(out / "tasks" / name, ids), ref, rtol=1e-5, atol=2e-5)
        proto = load_artifact(out / "tasks" / name)
        import onnx

        onnx.checker.check_model(proto, full_check=True)
        prog = load_artifact(out / "tasks" / name, format="pt2")
        torch.testing.assert_close(prog.module()(ids), ref, rtol=0, atol=0)
        # the archive alone holds no parameters: loaded without them it refuses to run
        bare = torch.export.load(str(out / "tasks" / name / "program.pt2"))
        assert all(p.device.type == "meta" for p in bare.parameters())
        with pytest.raises(RuntimeError, match="meta"):
            bare.module()(ids)
        manifest = json.loads((out / "tasks" / name / "manifest.json").read_text())
        assert manifest["kept_channels"] == [int(np.count_nonzero(x)) for x in masks[key]]
        assert manifest["parameters"]["pt2_parameters"] == ifp.count_parameters(ifp.specialize(ep, mask=m))
        from ifp_compile.build import read_mask_file

        stored = read_mask_file(str(out / "tasks" / name / "mask.safetensors"), [x.shape[0] for x in masks[key]])
        assert all(np.array_equal(np.asarray(a), b) for a, b in zip(stored, masks[key]))
        assert "mask.safetensors" in manifest["files"]
    # tasks with one mask share their files; every task shares the base weights
    a, g = out / "tasks" / "alpha", out / "tasks" / "gamma"
    assert (a / "ffn.bin").stat().st_ino == (g / "ffn.bin").stat().st_ino
    assert (a / "shared.bin").stat().st_ino == (out / "base" / "shared.bin").stat().st_ino
    assert (a / "program.ffn.safetensors").stat().st_ino == (g / "program.ffn.safetensors").stat().st_ino
    assert (a / "program.shared.safetensors").stat().st_ino == (out / "base" / "shared.safetensors").stat().st_ino
    # the pt2 program's own parameters are its FFN weights, nothing else. alpha: block 0
    # sliced, block 1 keeps all 64 channels at soft scales (W_down carries them, gate and
    # up are the base's whole tensors); beta: block 0 kept whole at 1.0 (the base's
    # tensors), block 1 removed (zero channels: no weights)
    from ifp_compile.program_weights import read_parameters

    k0 = int(np.count_nonzero(masks["m1"][0]))
    whole = {f"0.mlp.{p}": 64 * 32 for p in ("gate", "up", "down")}
    for name, expected in [("alpha", {"0.mlp.gate": k0 * 32, "0.mlp.up": k0 * 32, "0.mlp.down": k0 * 32,
                                      "1.mlp.gate": 64 * 32, "1.mlp.up": 64 * 32, "1.mlp.down": 64 * 32}),
                           ("beta", whole)]:
        own = read_parameters(out / "tasks" / name / "program.ffn.safetensors")
        assert {k: v.numel() for k, v in own.items()} == {f"lm.model.layers.{k}_proj.weight": n
                                                          for k, n in expected.items()}
        own_scalars = sum(expected.values())
        manifest = json.loads((out / "tasks" / name / "manifest.json").read_text())
        assert manifest["pt2_own_weight_bytes"] == 4 * own_scalars and manifest["pt2_base_linked"]
    # own bytes: the sliced FFN weights only
    index = json.loads((out / "index.json").read_text())
    assert sorted(index["tasks"]) == ["alpha", "beta", "gamma"]
    assert verify(out) == ["alpha", "beta", "gamma"]
    # hashes computed while writing (and the base hash reused) equal re-reading the files
    from ifp_compile.artifacts import sha256_file

    for name in ("alpha", "beta"):
        files = json.loads((out / "tasks" / name / "manifest.json").read_text())["files"]
        assert files == {f: sha256_file(out / "tasks" / name / f) for f in files}
    # the exporter's per-node metadata (stack traces) stays in the base graph only
    import onnx

    def node_metadata(path):
        return sum(len(n.metadata_props) for n in onnx.load(str(path), load_external_data=False).graph.node)

    assert node_metadata(out / "base" / "model.onnx") > 0
    assert node_metadata(a / "model.onnx") == 0
    rows = {r["task"]: r for r in inspect_rows(out)}
    assert rows["beta"]["kept"] == "64/128 (50.0%)"


def test_build_is_deterministic_and_incremental(project, tmp_path):
    d, *_ = project
    both = ("onnx", "pt2")
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "one", formats=both)
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "two", formats=both)
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one), "builds differ"
    # nothing changed: nothing rebuilt, nothing rewritten
    report = build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "one", formats=both)
    assert report.built == [] and report.skipped == ["alpha", "beta", "gamma"]
    assert files_of(tmp_path / "one") == one
    # one mask file changes: only its task is rebuilt
    tasks = d / "tasks2.jsonl"
    save_file({"ffn.0": np.ones(64, np.float32), "ffn.1": np.ones(64, np.float32)}, str(d / "m3.safetensors"))
    tasks.write_text((d / "tasks.jsonl").read_text().replace('"beta", "mask": "m2', '"beta", "mask": "m3'))
    report = build(str(d / "model.pt2"), tasks, tmp_path / "one", formats=both)
    assert report.built == ["beta"] and report.skipped == ["alpha", "gamma"]
    # --only builds one task
    report = build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "three", only="beta")
    assert report.built == ["beta"] and sorted(json.loads((tmp_path / "three" / "index.json").read_text())["tasks"]) == ["beta"]


def test_a_later_build_adds_a_format_to_the_base(project, tmp_path):
    """ONNX first, then ONNX and pt2: the base gains the pt2 parameters, keeps its ONNX
    files (same inode, so the first tasks' links stay valid) and ends as a both-format build."""
    d, ep, ids, masks = project
    out = tmp_path / "out"
    build(str(d / "model.pt2"), d / "tasks.jsonl", out)
    inode = (out / "base" / "shared.bin").stat().st_ino
    assert not (out / "base" / "shared.safetensors").exists()
    report = build(str(d / "model.pt2"), d / "tasks.jsonl", out, formats=("onnx", "pt2"))
    assert report.built == ["alpha", "beta", "gamma"]  # the formats are part of a task's inputs
    assert (out / "base" / "shared.bin").stat().st_ino == inode
    assert verify(out) == ["alpha", "beta", "gamma"]
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "fresh", formats=("onnx", "pt2"))
    assert files_of(out) == files_of(tmp_path / "fresh")
    with torch.no_grad():
        ref = ifp.specialize(ep, mask=[torch.from_numpy(x) for x in masks["m2"]]).module()(ids)
    torch.testing.assert_close(load_artifact(out / "tasks" / "beta", format="pt2").module()(ids), ref, rtol=0, atol=0)


def test_parallel_build_equals_serial_build(project, tmp_path):
    d, *_ = project
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "serial")
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "parallel", jobs=2)
    assert files_of(tmp_path / "serial") == files_of(tmp_path / "parallel")


def test_verify_refuses_a_tampered_file(project, tmp_path):
    d, *_ = project
    out = tmp_path / "out"
    build(str(d / "model.pt2"), d / "tasks.jsonl", out)
    f = out / "tasks" / "beta" / "ffn.bin"
    data = bytearray(f.read_bytes())
    data[100] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tasks/beta/ffn.bin: sha256 .* does not match the manifest"):
        verify(out)
    with pytest.raises(ArtifactError, match="ffn.bin: sha256"):
        load_artifact(out / "tasks" / "beta")
    assert main(["verify", str(out)]) == 2
    build(str(d / "model.pt2"), d / "tasks.jsonl", tmp_path / "pt2", formats=("pt2",))
    f = tmp_path / "pt2" / "tasks" / "alpha" / "program.ffn.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"tasks/alpha/program.ffn.safetensors: sha256 .* does not match"):
        load_artifact(tmp_path / "pt2" / "tasks" / "alpha", format="pt2")


def test_bad_build_inputs_are_named(project, tmp_path, capsys):
    d, *_ = project
    model = str(d / "model.pt2")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"name": "ok", "mask": "%s"}\n{"name": "x", "mask": \n' % (d / "m1.safetensors"))
    with pytest.raises(BuildError, match=r"bad.jsonl:2: not valid JSON"):
        build(model, bad, tmp_path / "o")
    bad.write_text('{"name": "../escape", "mask": "m.safetensors"}\n')
    with pytest.raises(BuildError, match=r"bad.jsonl:1: task name '../escape' must be a plain file name"):
        build(model, bad, tmp_path / "o")
    bad.write_text('{"name": "a"}\n')
    with pytest.raises(BuildError, match=r"bad.jsonl:1: task 'a' needs exactly one of"):
        build(model, bad, tmp_path / "o")
    (tmp_path / "file").write_text("x")
    with pytest.raises(BuildError, match="exists and is not a directory"):
        build(model, d / "tasks.jsonl", tmp_path / "file")
    save_file({"ffn.0": np.ones(32, np.float32), "ffn.1": np.ones(64, np.float32)}, str(tmp_path / "w.safetensors"))
    bad.write_text('{"name": "a", "mask": "w.safetensors"}\n')
    report = build(model, bad, tmp_path / "o2")
    assert report.built == [] and list(report.failed) == ["a"]
    assert re.search(r"ffn.0 has shape \(32,\), the model's block 0 has width 64", report.failed["a"])
    assert not (tmp_path / "o2" / "base").exists(), "masks are checked before anything is written"
    capsys.readouterr()
    assert main(["build", "--model", model, "--tasks", str(bad), "--out", str(tmp_path / "o3")]) == 1
    assert "error: task 'a' failed: mask file" in capsys.readouterr().err


def test_full_disk_leaves_no_partial_task(project, tmp_path, monkeypatch):
    d, *_ = project
    import errno

    from ifp_compile import artifacts

    calls = {"n": 0}
    real_add = artifacts._Packer.add

    def add(self, data):
        calls["n"] += 1
        if self.path.name == "ffn.bin" and calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(self, data)

    monkeypatch.setattr(artifacts._Packer, "add", add)
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="No space left on device; no partial task was left"):
        build(str(d / "model.pt2"), d / "tasks.jsonl", out)
    assert list(out.glob(".tmp-*")) == []
    assert not any((out / "tasks").iterdir())


def test_killed_build_leaves_only_complete_tasks(project, tmp_path):
    d, *_ = project
    out = tmp_path / "out"
    code = ("import sys; from ifp_compile.build import build; "
            f"build({str(d / 'model.pt2')!r}, {str(d / 'tasks.jsonl')!r}, {str(out)!r})")
    env = dict(os.environ, IFP_QUIET="1")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=str(Path(__file__).parent.parent))
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".tmp-*")) and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "tasks").exists():
        for task in (out / "tasks").iterdir():  # whatever made it into place is complete
            assert (task / "manifest.json").is_file()
    report = build(str(d / "model.pt2"), d / "tasks.jsonl", out)  # the next build finishes the job
    assert sorted(report.built + report.skipped) == ["alpha", "beta", "gamma"]
    assert list(out.glob(".tmp-*")) == []
    assert verify(out) == ["alpha", "beta", "gamma"]


def test_onnx_model_builds_mask_tasks(project, tmp_path):
    d, ep, ids, masks = project
    from ifp_compile.onnx import export_onnx

    (tmp_path / "model.onnx").write_bytes(export_onnx(ep).SerializeToString())
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"name": "beta", "mask": str(d / "m2.safetensors")}) + "\n")
    build(str(tmp_path / "model.onnx"), tasks, tmp_path / "out")
    m = [torch.from_numpy(x) for x in masks["m2"]]
    with torch.no_grad():
        ref = ifp.specialize(ep, mask=m).module()(ids)
    torch.testing.assert_close(run_task(tmp_path / "out" / "tasks" / "beta", ids), ref, rtol=1e-5, atol=2e-5)
    with pytest.raises(BuildError, match="is ONNX: the pt2 format needs a torch model"):
        build(str(tmp_path / "model.onnx"), tasks, tmp_path / "out", formats=("pt2",))


def _stored_spans(model_path: Path, location: str) -> list[tuple[int, int]]:
    """(offset, length) of every initializer of an ONNX model stored in external file ``location``."""
    import onnx

    spans = []
    for t in onnx.load(str(model_path), load_external_data=False).graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        if info.get("location") == location:
            spans.append((int(info.get("offset", 0)), int(info["length"])))
    return sorted(spans)


def test_a_task_directory_holds_only_what_its_program_reads_and_exports_alone(project, tmp_path):
    """Layout 2: a task links the base's *shared* weights only (the dense FFN weights stay in
    base/), so a task copied with links dereferenced -- export-task's output -- is the size of
    a self-contained specialised model, and it verifies, loads and runs on its own."""
    d, ep, ids, masks = project
    out = tmp_path / "out"
    build(str(d / "model.pt2"), d / "tasks.jsonl", out, formats=("onnx", "pt2"))
    from ifp_compile.artifacts import ALIGN
    from ifp_compile.program_weights import parameters, read_parameters

    base_table = json.loads((out / "base" / "manifest.json").read_text())["tensors"]
    ffn_in_base = {n for n, (f, *_) in base_table.items() if f == "ffn.bin"}
    assert len(ffn_in_base) == 6  # gate, up, down of 2 blocks: the only weights not in shared.bin
    for name in ("alpha", "beta"):
        task = out / "tasks" / name
        # ONNX: every tensor of shared.bin is read by the task's graph, and every byte of it
        # is such a tensor or alignment padding; ffn.bin holds only the task's own tensors
        for location in ("shared.bin", "ffn.bin"):
            spans = _stored_spans(task / "model.onnx", location)
            size = (task / location).stat().st_size
            assert sum(n for _, n in spans) <= size < sum(n for _, n in spans) + ALIGN * len(spans)
        # pt2: the shared and own files hold exactly the program's parameters, once each
        program = load_artifact(task, format="pt2")
        shared = read_parameters(task / "program.shared.safetensors")
        own = read_parameters(task / "program.ffn.safetensors")
        assert not set(shared) & set(own) and set(shared) | set(own) == set(parameters(program))
    # export-task: the files become the task's own (no links), verified, identical bytes
    exported = tmp_path / "ship" / "alpha"
    exported.parent.mkdir()
    assert main(["export-task", str(out), "alpha", "--out", str(exported)]) == 0
    assert all(f.stat().st_nlink == 1 for f in exported.iterdir())
    source_files = json.loads((out / "tasks" / "alpha" / "manifest.json").read_text())["files"]
    assert sorted(p.name for p in exported.iterdir()) == sorted([*source_files, "manifest.json"])
    assert all((exported / f).read_bytes() == (out / "tasks" / "alpha" / f).read_bytes() for f in source_files)
    manifest = json.loads((exported / "manifest.json").read_text())
    assert manifest["base_linked"] is False and manifest["pt2_base_linked"] is False
    assert verify(exported) == ["alpha"] and main(["verify", str(exported)]) == 0
    with torch.no_grad():
        ref = ifp.specialize(ep, mask=[torch.from_numpy(x) for x in masks["m1"]]).module()(ids)
    torch.testing.assert_close(run_task(exported, ids), ref, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(load_artifact(exported, format="pt2").module()(ids), ref, rtol=0, atol=0)
    # against self-contained specialised models of the same formats (ifp.save)
    small = ifp.specialize(ep, mask=[torch.from_numpy(x) for x in masks["m1"]])
    for fmt, files in (("onnx", ("model.onnx", "shared.bin", "ffn.bin")),
                       ("pt2", ("program.pt2", "program.shared.safetensors", "program.ffn.safetensors"))):
        ifp.save(small, tmp_path / f"alone-{fmt}", format=fmt)
        alone = sum(f.stat().st_size for f in (tmp_path / f"alone-{fmt}").iterdir() if f.name != "manifest.json")
        task = sum((exported / f).stat().st_size for f in files)
        assert task <= 1.1 * alone, (fmt, task, alone)
    # a second export is byte-identical; bad input is named and leaves nothing behind
    again = tmp_path / "ship" / "alpha2"
    ifp.export_task(out, "alpha", again)
    assert files_of(again) == files_of(exported)
    with pytest.raises(ArtifactError, match="already exists"):
        ifp.export_task(out, "alpha", again)
    with pytest.raises(ArtifactError, match=r"no task named 'delta' \(tasks: alpha, beta, gamma\)"):
        ifp.export_task(out, "delta", tmp_path / "ship" / "delta")
    f = out / "tasks" / "beta" / "ffn.bin"
    f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="tasks/beta/ffn.bin: sha256"):
        ifp.export_task(out, "beta", tmp_path / "ship" / "beta")
    assert sorted(p.name for p in (tmp_path / "ship").iterdir()) == ["alpha", "alpha2"]

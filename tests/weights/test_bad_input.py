"""Bad checkpoints and failed writes: a clear error naming the tensor and the file, and
nothing half-written."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ifp_compile as ifp
from ifp_compile.artifacts import ArtifactError
from ifp_compile.weights.checkpoint import CheckpointError
from tests.weights.test_streaming import save_checkpoint

DOWN = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    save_checkpoint(d, "llama", torch.bfloat16)
    return d


def _rewrite(d, change):
    tensors = load_file(str(d / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def test_a_missing_tensor_is_named(ckpt):
    _rewrite(ckpt, lambda t: t.pop(DOWN))
    with pytest.raises(CheckpointError, match=f"parameter {DOWN} of LlamaForCausalLM is in no shard"):
        ifp.export_checkpoint(ckpt)


def test_a_wrong_shape_is_named_with_its_file(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__(DOWN, torch.zeros(32, 63, dtype=torch.bfloat16)))
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor {DOWN} has shape \[32, 63\], but "
                                              rf"parameter {DOWN} of LlamaForCausalLM needs \[32, 64\]"):
        ifp.export_checkpoint(ckpt)


def test_integer_weights_are_refused(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__(DOWN, torch.zeros(32, 64, dtype=torch.int8)))
    with pytest.raises(CheckpointError, match=f"tensor {DOWN} is stored as torch.int8"):
        ifp.export_checkpoint(ckpt)


def test_an_index_pointing_to_a_missing_shard(tmp_path):
    d = tmp_path / "sharded"
    save_checkpoint(d, "llama", torch.bfloat16, shard="12KB")
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))
    assert len(shards) >= 3
    (d / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"model.safetensors.index.json points to 1 missing shard\(s\): {shards[1]}"):
        ifp.export_checkpoint(d)


def test_an_index_that_misplaces_a_tensor(tmp_path):
    d = tmp_path / "sharded"
    save_checkpoint(d, "llama", torch.bfloat16, shard="12KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    wrong = next(s for s in shards if s != index["weight_map"][DOWN])
    index["weight_map"][DOWN] = wrong
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{DOWN}: the index puts it in .*{wrong}, which does not hold it"):
        ifp.export_checkpoint(d)


def test_truncated_and_foreign_files(ckpt):
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="extends past the end of the file"):
        ifp.export_checkpoint(ckpt)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="model.safetensors: not a safetensors file"):
        ifp.export_checkpoint(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="has no config.json"):
        ifp.export_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="is not a directory"):
        ifp.export_checkpoint(ckpt / "nope")


def test_a_full_disk_while_streaming_leaves_nothing(ckpt, tmp_path, monkeypatch):
    from ifp_compile.weights import writer

    ep = ifp.export_checkpoint(ckpt)
    small = ifp.specialize(ep, mask=[torch.ones(64), (torch.arange(64) % 2).float()])
    out = tmp_path / "task"
    ifp.save(small, out)  # a complete artifact is already there
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = writer.values

    def values(t, pool=None, name="?"):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(t, pool, name)

    monkeypatch.setattr(writer, "values", values)
    with pytest.raises(ArtifactError, match="No space left on device; nothing was left at"):
        ifp.save(small, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old artifact, intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "task"]  # no temporary left
    with pytest.raises(ArtifactError, match="No space left on device; nothing was left at"):
        ifp.save(small, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_full_disk_during_a_streamed_build_keeps_the_build_verifiable(ckpt, tmp_path, monkeypatch):
    import numpy as np
    from safetensors.numpy import save_file as save_np

    from ifp_compile.build import BuildError, build, verify
    from ifp_compile.weights import writer

    for name, seed in (("a", 0), ("b", 1)):
        g = np.random.default_rng(seed)
        save_np({f"ffn.{i}": (g.random(64) < 0.5).astype(np.float32) for i in range(2)}, str(tmp_path / f"{name}.safetensors"))
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"name": "a", "mask": "a.safetensors"}) + "\n")
    out = tmp_path / "out"
    build(str(ckpt), tasks, out, formats=("pt2",))
    tasks.write_text(tasks.read_text() + json.dumps({"name": "b", "mask": "b.safetensors"}) + "\n")
    real = writer.values
    monkeypatch.setattr(writer, "values", lambda *a: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(BuildError, match="No space left on device; no partial task was left"):
        build(str(ckpt), tasks, out, formats=("pt2",))
    monkeypatch.setattr(writer, "values", real)
    assert verify(out) == ["a"] and not (out / "tasks" / "b").exists()
    assert list(out.glob(".tmp-*")) == []
    build(str(ckpt), tasks, out, formats=("pt2",))
    assert verify(out) == ["a", "b"]

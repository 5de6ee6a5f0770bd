"""``build --predictor CKPT``: a trained IFPredictor picks instruction tasks' masks (in
batches of a fixed shape: a task's bytes do not depend on the tasks built with it), the
manifest records which predictor, and tasks are rebuilt when it changes."""

from __future__ import annotations

import json
import random
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")

from ifp_compile.build import BuildError, build, read_mask_file  # noqa: E402
from tests.zoo import _hf  # noqa: E402

# byte tokens: "alpha", "beta gamma delta", "gamma" and "delta alpha" share one batch shape
INSTRUCTIONS = ["sum of two numbers", "write code that loops over a list", "alpha",
                "return the key of the map with the largest value, then print it", "beta gamma delta", "gamma",
                "delta alpha"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ifp_compile.train import config_from_dict, run
    from tests.train.conftest import make_config, random_text

    d = tmp_path_factory.mktemp("predictor")
    torch.manual_seed(0)
    _hf("llama", layers=2).save_pretrained(d / "model")
    rng = random.Random(0)
    (d / "text.jsonl").write_text("".join(json.dumps({"text": random_text(rng, 40)}) + "\n" for _ in range(8)))
    result = run(config_from_dict(make_config(d / "model", d / "text.jsonl", d / "run", steps=2)))
    tasks = d / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"name": f"i{k}", "instruction": text}) + "\n"
                             for k, text in enumerate(INSTRUCTIONS)))
    return d, result.checkpoint, tasks


def test_a_static_learned_mask_gives_every_task_one_mask(trained, tmp_path):
    """A checkpoint trained on a constant input (predictor.input "constant") is a static
    learned mask: every task gets the masks of that input, not of its own instruction."""
    from ifp_compile.train import config_from_dict, run
    from ifp_compile.train.data import CONSTANT_INPUT, encode
    from ifp_compile.train.trainer import load_predictor
    from tests.train.conftest import make_config

    d, _, tasks = trained
    cfg = make_config(d / "model", d / "text.jsonl", tmp_path / "run", steps=2,
                      predictor={"input": "constant", "init": "static"})
    ck = run(config_from_dict(cfg)).checkpoint
    out = tmp_path / "out"
    assert not build(str(d / "model"), tasks, out, predictor=str(ck)).failed
    predictor, tok, _ = load_predictor(ck)
    with torch.no_grad():
        want = [m.numpy() for m in predictor.inner(torch.tensor([encode(tok, CONSTANT_INPUT)]))]
    for k in range(3):
        stored = read_mask_file(str(out / "tasks" / f"i{k}" / "mask.safetensors"), predictor.widths)
        for a, b in zip(stored, want):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_masks_come_from_the_trained_predictor(trained, tmp_path):
    from ifp_compile.train.data import encode
    from ifp_compile.train.trainer import load_predictor

    d, ck, tasks = trained
    out = tmp_path / "out"
    report = build(str(d / "model"), tasks, out, predictor=str(ck))
    assert sorted(report.built) == [f"i{k}" for k in range(len(INSTRUCTIONS))] and not report.failed
    predictor, tok, sha = load_predictor(ck)
    widths = predictor.widths
    masks = {}
    for k, text in enumerate(INSTRUCTIONS):
        with torch.no_grad():
            alone = [m.numpy() for m in predictor(torch.tensor([encode(tok, text)]))]
        stored = read_mask_file(str(out / "tasks" / f"i{k}" / "mask.safetensors"), widths)
        # computed in a padded batch: the instruction's own masks to rounding, the same channels
        for a, b in zip(stored, alone):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
            assert np.array_equal(np.flatnonzero(a), np.flatnonzero(b))
        manifest = json.loads((out / "tasks" / f"i{k}" / "manifest.json").read_text())
        assert manifest["inputs"]["predictor"] == "ifpredictor" and manifest["inputs"]["predictor_sha256"] == sha
        assert manifest["kept_channels"] == predictor.counts
        masks[k] = stored
    assert any(not np.array_equal(masks[0][0], masks[k][0]) for k in masks)  # the instruction matters
    # a task's bytes do not depend on the tasks built with it: built alone (--only), a task
    # that shared its batch with three others is the same
    for k in (2, 6):
        alone_out = tmp_path / f"alone{k}"
        assert build(str(d / "model"), tasks, alone_out, predictor=str(ck), only=f"i{k}").built == [f"i{k}"]
        for f in ("mask.safetensors", "ffn.bin", "manifest.json"):
            assert (alone_out / "tasks" / f"i{k}" / f).read_bytes() == (out / "tasks" / f"i{k}" / f).read_bytes()
    # unchanged predictor: nothing rebuilt; a changed one: every instruction task rebuilt
    assert build(str(d / "model"), tasks, out, predictor=str(ck)).built == []
    changed = tmp_path / "changed"
    shutil.copytree(ck, changed)
    from safetensors.torch import load_file, save_file

    params = load_file(str(changed / "predictor.safetensors"))
    name = sorted(params)[-1]
    params[name] = params[name] + 0.5
    save_file(params, str(changed / "predictor.safetensors"))
    again = build(str(d / "model"), tasks, out, predictor=str(changed))
    assert sorted(again.built) == sorted(report.built)
    # without --predictor they are other tasks (the prompt-activation predictor's), which
    # this model cannot build (no tokenizer files): each fails, the published ones stay
    plain = build(str(d / "model"), tasks, out)
    assert plain.built == [] and sorted(plain.failed) == sorted(report.built), plain.failed
    assert json.loads((out / "tasks" / "i0" / "manifest.json").read_text())["inputs"]["predictor"] == "ifpredictor"


def test_bad_predictors_are_named(trained, tmp_path):
    d, ck, tasks = trained
    with pytest.raises(BuildError, match="is not a directory"):
        build(str(d / "model"), tasks, tmp_path / "a", predictor=str(tmp_path / "nope"))
    with pytest.raises(BuildError, match="pass the --keep it was trained with"):
        build(str(d / "model"), tasks, tmp_path / "b", predictor=str(ck), keep=0.25)
    joint = tmp_path / "joint"
    shutil.copytree(ck, joint)
    (joint / "llm.safetensors").write_bytes(b"")
    with pytest.raises(BuildError, match="trained together with its LLM"):
        build(str(d / "model"), tasks, tmp_path / "c", predictor=str(joint))

"""Every command that loads a model takes ``--dtype``: build (streamed from a checkpoint
directory), prune, eval and train run in bfloat16 and produce what they do in float32."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ifp_compile as ifp
from ifp_compile.cli import main
from tests.helpers import assert_within_rounding
from tests.train.conftest import make_config, random_text
from tests.zoo import VOCAB, _hf


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    _hf("llama", layers=2).save_pretrained(d)  # float32 on disk: --dtype converts when reading
    return d


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    path.write_text("".join(json.dumps({"text": random_text(rng, 200)}) + "\n" for _ in range(8)))
    return path


def test_build_streams_a_checkpoint_directory_in_bfloat16(model_dir, tmp_path, capsys):
    from onnx.reference import ReferenceEvaluator
    from safetensors.numpy import save_file

    from ifp_compile.artifacts import load_artifact

    g = np.random.default_rng(0)
    masks = [(g.random(64) < 0.5).astype(np.float32), (g.random(64) * 2).astype(np.float32)]
    save_file({f"ffn.{i}": m for i, m in enumerate(masks)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"name": "t", "mask": "m.safetensors"}) + "\n")
    out = tmp_path / "out"
    args = ["build", "--model", str(model_dir), "--tasks", str(tmp_path / "tasks.jsonl"), "--out", str(out),
            "--format", "onnx,pt2"]
    assert main(args + ["--dtype", "bf16"]) == 0
    manifest = json.loads((out / "tasks" / "t" / "manifest.json").read_text())
    assert manifest["inputs"]["dtype"] == "bfloat16"
    program = load_artifact(out / "tasks" / "t", format="pt2")
    assert {t.dtype for t in program.state_dict.values()} == {torch.bfloat16}
    tm = [torch.from_numpy(m) for m in masks]
    expected = ifp.materialize(ifp.specialize(ifp.export_checkpoint(model_dir, dtype="bf16"), mask=tm))
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = expected.module()(ids)
        assert torch.equal(program.module()(ids), ref)
        exact = ifp.insert_masks(ifp.export_checkpoint(model_dir, dtype="float32"))
        exact_out = ifp.materialize(exact).module()(ids, [m.to(torch.bfloat16).float() for m in tm])
    (raw,) = ReferenceEvaluator(load_artifact(out / "tasks" / "t", format="onnx")).run(None, {"input_ids": ids.numpy()})
    onnx_out = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    assert_within_rounding(onnx_out, ref, exact_out, torch.bfloat16)
    assert main(["verify", str(out)]) == 0
    # another dtype is another artifact: the task is rebuilt, not skipped
    assert main(args + ["--dtype", "fp16"]) == 0
    assert "built 1 task" in capsys.readouterr().out
    assert {t.dtype for t in load_artifact(out / "tasks" / "t", format="pt2").state_dict.values()} == {torch.float16}


def test_dtype_names_are_checked(model_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["build", "--model", str(model_dir), "--tasks", "x", "--out", str(tmp_path), "--dtype", "int8"])
    assert "dtype 'int8' is not one a model can be compiled in" in capsys.readouterr().err
    from ifp_compile.train import config_from_dict
    from ifp_compile.train.config import TrainError

    with pytest.raises(TrainError, match="dtype 'float8' is not one a model can be compiled in"):
        config_from_dict({"data": "d", "out": "o", "dtype": "float8"})
    with pytest.raises(ifp.IFPError, match="dtype torch.float64 is not one a model can be compiled in"):
        ifp.export_checkpoint(model_dir, dtype=torch.float64)


def test_prune_in_bfloat16(model_dir, text, tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(model_dir), "--tokenizer", "bytes", "--data", str(text), "--target", "0.5",
                 "--steps", "2", "--chunk-tokens", "32", "--calibration-chunks", "2", "--train-steps", "1",
                 "--dtype", "bf16", "--out", str(out)]) == 0
    report = json.loads((out / "prune.json").read_text())
    program = torch.export.load(str(out / "program.pt2"))
    assert {t.dtype for t in program.state_dict.values()} == {torch.bfloat16}
    assert ifp.count_parameters(program) == report["parameters"]["pruned"] < report["parameters"]["dense"]
    with torch.no_grad():
        assert torch.isfinite(program.module()(torch.randint(0, VOCAB, (1, 32))).float()).all()


def test_eval_in_bfloat16(model_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(model_dir), "--tokenizer", "bytes", "--segments", "1", "--problems", "1",
                 "--max-new-tokens", "2", "--calibration-chunks", "3", "--static-score", "magnitude",
                 "--dtype", "bf16", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["dense", "static", "prompt-activation", "random"]
    assert all(np.isfinite(v) for r in rows for v in r["loss"].values())


def test_train_in_bfloat16_with_the_llm(model_dir, tmp_path):
    import random

    from ifp_compile.train import config_from_dict, load_trained, run, setup
    from ifp_compile.train.checkpoint import read_state

    data = tmp_path / "t.jsonl"
    rng = random.Random(1)
    data.write_text("".join(json.dumps({"text": random_text(rng, 40)}) + "\n" for _ in range(8)))
    cfg = config_from_dict(make_config(model_dir, data, tmp_path / "run", steps=3, train_llm=True, dtype="bfloat16"))
    s = setup(cfg)
    assert {p.dtype for p in s.model.parameters()} == {torch.bfloat16}
    result = run(cfg, setup_=s)
    assert len(result.losses) == 3 and all(np.isfinite(x) for x in result.losses)
    assert read_state(result.checkpoint)["config"]["dtype"] == "bfloat16"
    predictor = load_trained(result.checkpoint, setup(cfg))
    assert {p.dtype for p in predictor.head.parameters()} == {torch.float32}  # the head stays float32
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        masks = predictor(ids)
    assert [int((m != 0).sum()) for m in masks] == [32, 32]

"""Adapt-Pruner with heads, exact budgets, the incremental schedule with the trainer, and
``ifp-compile prune``."""

from __future__ import annotations

import json
import random

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.adapt import adapt_prune, allocate, uniform_masks
from ifp_compile.adapt.incremental import calibration_chunks, trainer_hook
from ifp_compile.cli import main
from ifp_compile.errors import IFPError
from ifp_compile.train.data import ByteTokenizer
from tests.zoo import VOCAB, _hf

WORDS = "alpha beta gamma delta sum of two numbers is the answer code def return print loop".split()


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("calib")
    path = d / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(60))}) + "\n"
                            for _ in range(12)))
    return path


def _model(layers=3, kv=2):
    torch.manual_seed(0)
    return _hf("llama", layers=layers, heads=4, kv_heads=kv)


def test_allocate_is_exact_and_respects_bounds():
    assert allocate([10, 10, 10], [0.5, 0.5, 0.5], 15) in ([6, 5, 4], [5, 5, 5], [6, 5, 4])
    assert sum(allocate([10, 10, 10], [0.2, 0.5, 0.9], 15)) == 15
    counts = allocate([3] * 5, [0.25] * 5, 11)
    assert sum(counts) == 11 and all(1 <= c <= 3 for c in counts)
    assert allocate([4, 4], [0.0, 0.0], 5, caps=[2, 4]) == [2, 3]  # what is pruned stays pruned
    with pytest.raises(IFPError, match="cannot keep 1 units"):
        allocate([4, 4], [0.9, 0.9], 1)


@pytest.mark.parametrize("method", ["magnitude", "activation"])
def test_uniform_and_adaptive_hold_the_same_parameters(method):
    model = _model()
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    calib = [torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    r = adapt_prune(ep, calib, 0.5, heads_target=0.34, steps=3, method=method)
    scores = ifp.adapt.channel_scores(ep)
    uni = uniform_masks(scores, 0.5)
    assert sum(int(m.sum()) for m in r.ffn_masks) == sum(int(m.sum()) for m in uni) == 96
    assert sum(int(m.sum()) for m in r.head_masks) == 4  # round(0.66 * 6)
    assert all(int(m.sum()) >= 1 for m in r.head_masks)
    small = ifp.specialize(ep, mask=r.ffn_masks, head_mask=r.head_masks)
    blocks, attention = ifp.find_ffn_blocks(ep), ifp.find_attention_blocks(ep)
    removed = (3 * 64 - 96) * blocks[0].params_per_channel() + 2 * attention[0].params_per_channel()
    assert ifp.count_parameters(small) == ifp.count_parameters(ep) - removed
    assert len(r.importance) == len(r.sparsity) == len(r.head_sparsity) == 3


def test_invalid_head_configurations_are_refused():
    model = _model(layers=2, kv=1)
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    calib = [torch.randint(0, VOCAB, (1, 8))]
    with pytest.raises(IFPError, match="would leave some layer with none .*has 1"):
        adapt_prune(ep, calib, 0.5, heads_target=0.5)
    with pytest.raises(IFPError, match=r"heads target must be in \[0, 1\), got 1.0"):
        adapt_prune(ep, calib, 0.5, heads_target=1.0)
    with pytest.raises(IFPError, match=r"target sparsity must be in \(0, 1\), got 0"):
        adapt_prune(ep, calib, 0)


def test_incremental_schedule_trains_between_steps_and_helps(text_file):
    tok = ByteTokenizer(VOCAB)
    calib = calibration_chunks(text_file, tok, chunk_tokens=32, max_chunks=4)

    def run(train_steps):
        model = _model()
        ep = ifp.export(model, (calib[0],), dynamic_shapes="seq")
        masked = ifp.insert_masks(ep, heads=True)
        seen = []
        hook = trainer_hook(model, tok, ep, masked, text_file, steps=train_steps, lr=3e-3, chunk_tokens=16,
                            max_tokens=64, heads=True)

        def train(step, ffn, heads):
            seen.append([int(m.sum()) for m in ffn])
            hook(step, ffn, heads)

        r = adapt_prune(ep, calib, 0.5, heads_target=0.34, steps=3, method="taylor", train=train)
        small = ifp.specialize(ep, mask=r.ffn_masks, head_mask=r.head_masks)
        with torch.no_grad():
            loss = sum(float(torch.nn.functional.cross_entropy(small.module()(c)[0, :-1], c[0, 1:])) for c in calib)
        return loss / len(calib), seen, r

    untrained, seen0, r0 = run(0)
    trained, seen, r = run(6)
    assert [sum(s) for s in seen] == [160, 128, 96]  # the budget shrinks step by step
    assert all(a >= b for x, y in zip(seen, seen[1:]) for a, b in zip(x, y))  # monotone per layer
    assert trained < untrained - 0.1, (trained, untrained)


def test_calibration_errors_name_the_file(tmp_path):
    tok = ByteTokenizer(VOCAB)
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "tiny"}) + "\n")
    with pytest.raises(IFPError, match="short.jsonl is too short: 4 tokens.*256"):
        calibration_chunks(short, tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"txt": 1}) + "\n")
    with pytest.raises(IFPError, match="bad.jsonl:2"):
        calibration_chunks(bad, tok)


def test_prune_command_writes_artifacts(tmp_path, text_file, capsys):
    d = tmp_path / "model"
    _model(layers=2).save_pretrained(d)
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(d), "--tokenizer", "bytes", "--data", str(text_file), "--out", str(out),
            "--target", "0.5", "--heads-target", "0.5", "--steps", "2", "--chunk-tokens", "32",
            "--calibration-chunks", "2", "--format", "pt2,onnx", "--method", "magnitude"]
    assert main(argv) == 0
    report = json.loads((out / "prune.json").read_text())
    assert sum(report["ffn_widths"]) == 64 and sum(report["kv_heads"]) == 2
    program = torch.export.load(out / "program.pt2")
    assert ifp.count_parameters(program) == report["parameters"]["pruned"] < report["parameters"]["dense"]
    from safetensors.torch import load_file

    masks = load_file(out / "masks.safetensors")
    assert [int(masks[f"ffn.{i}"].sum()) for i in range(2)] == report["ffn_widths"]
    import onnxruntime as ort

    ids = torch.randint(0, VOCAB, (1, 9))
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0]),
                                   program.module()(ids), rtol=1e-4, atol=1e-4)
    assert "parameters" in capsys.readouterr().out
    # bad input: clear errors, exit code 2, nothing written
    for extra, message in ((["--target", "1.5"], "must be in \\(0, 1\\)"),):
        with pytest.raises(SystemExit):
            main(argv[:-2] + extra)
        assert message.replace("\\", "") in capsys.readouterr().err.replace("\\", "")
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "x"}) + "\n")
    bad_out = tmp_path / "never"
    assert main([*argv[:6], str(short), "--out", str(bad_out), "--target", "0.5"]) == 2
    assert "too short" in capsys.readouterr().err and not bad_out.exists()


def test_unrecognised_attention_prunes_ffn_only_and_says_so():
    from tests.passes.test_attention import EagerAttention

    torch.manual_seed(0)
    ids = torch.randint(0, 128, (1, 6))
    ep = ifp.export(EagerAttention(), (ids,))
    calib = [torch.randint(0, 128, (1, 6)) for _ in range(2)]
    with pytest.raises(IFPError, match=r"heads target given, but no attention block was recognised.*FFN channels only"):
        adapt_prune(ep, calib, 0.5, heads_target=0.25)
    r = adapt_prune(ep, calib, 0.5)  # FFN channels only: still works
    assert [int(m.sum()) for m in r.ffn_masks] == [8]
    assert r.head_masks is None
    small = ifp.specialize(ep, mask=r.ffn_masks)
    assert ifp.count_parameters(small) == ifp.count_parameters(ep) - 8 * ifp.find_ffn_blocks(ep)[0].params_per_channel()

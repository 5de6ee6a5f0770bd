"""What the predictor reads (text, instruction, constant), prompt/completion records, and
the static-scales control: the pieces issue 19's equal-budget rows are made of."""

from __future__ import annotations

import json

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.train import TrainError, config_from_dict, load_examples, run, setup
from ifp_compile.train.data import CONSTANT_INPUT, ByteTokenizer
from ifp_compile.train.trainer import load_trained, static_scores
from tests.train.conftest import make_config


@pytest.fixture()
def mixed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [{"text": "alpha beta gamma delta " * 12, "instruction": "continue the text"},
               {"prompt": "Write a docstring:\ndef f(): pass\n", "completion": "Does nothing at all.",
                "instruction": "write a docstring"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_predictor_reads_text_instruction_or_a_constant(mixed):
    tok = ByteTokenizer(128)
    own = load_examples(mixed, 1, tok, 16, 64)
    # three chunk pairs from the text (64 tokens = 4 chunks), then the pair record
    assert len(own) == 4 and own[0].predictor_ids == tuple(tok.encode("alpha beta gamma delta " * 12)[:16])
    prompt, completion = tok.encode("Write a docstring:\ndef f(): pass\n"), tok.encode("Does nothing at all.")
    assert own[3].input_ids == tuple(prompt + completion) and own[3].predictor_ids == tuple(prompt)
    assert own[3].loss_mask == (False,) * len(prompt) + (True,) * len(completion)
    by_instruction = load_examples(mixed, 1, tok, 16, 64, "instruction")
    assert [e.predictor_ids for e in by_instruction] == (
        [tuple(tok.encode("continue the text"))] * 3 + [tuple(tok.encode("write a docstring"))])
    constant = load_examples(mixed, 1, tok, 16, 64, "constant")
    assert {e.predictor_ids for e in constant} == {tuple(tok.encode(CONSTANT_INPUT))}
    # only what the predictor reads changes: the LLM's inputs and targets are the same
    for a, b, c in zip(own, by_instruction, constant):
        assert a.input_ids == b.input_ids == c.input_ids and a.loss_mask == b.loss_mask == c.loss_mask


def test_missing_instruction_and_bad_pairs_are_named(tmp_path):
    tok = ByteTokenizer(128)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "x" * 80}) + "\n")
    with pytest.raises(TrainError, match=rf"{path}:1: predictor.input is \"instruction\" but the record has no"):
        load_examples(path, 1, tok, 16, 64, "instruction")
    path.write_text(json.dumps({"prompt": "p", "completion": ""}) + "\n")
    with pytest.raises(TrainError, match=rf"{path}:1: \"prompt\" and \"completion\" must be non-empty strings"):
        load_examples(path, 1, tok, 16, 64)


def test_config_checks_input_and_kind(tiny_model_dir, mixed, tmp_path):
    def err(**predictor):
        with pytest.raises(TrainError) as e:
            config_from_dict(make_config(tiny_model_dir, mixed, tmp_path / "o", predictor=predictor))
        return str(e.value)

    assert "predictor.input must be one of text, instruction, constant, got 'prompt'" in err(input="prompt")
    assert "predictor.kind must be \"ifpredictor\" or \"scales\", got 'lora'" in err(kind="lora")
    assert "predictor.init must be \"static\" for predictor.kind \"scales\"" in err(kind="scales")


def test_constant_input_learns_one_mask_for_everything(tiny_model_dir, mixed, tmp_path):
    cfg = config_from_dict(make_config(tiny_model_dir, mixed, tmp_path / "c", steps=3,
                                       predictor={"input": "constant", "init": "static"}))
    result = run(cfg)
    s = setup(cfg)
    pred = load_trained(result.checkpoint, s)
    const = torch.tensor([s.tokenizer.encode(CONSTANT_INPUT)])
    other = torch.tensor([s.tokenizer.encode("write a docstring")])
    with torch.no_grad():
        a, b = pred(const), pred(other)
    # the predictor is an IFPredictor like any other: fed another input it gives another mask,
    # which is why the eval feeds a constant-input row the constant, never the segment
    assert any(not torch.equal(x, y) for x, y in zip(a, b))


def test_static_scales_learns_scales_on_a_fixed_calibrated_set(tiny_model_dir, mixed, tmp_path):
    raw = make_config(tiny_model_dir, mixed, tmp_path / "s", steps=4,
                      predictor={"kind": "scales", "init": "static", "init_examples": 3})
    cfg = config_from_dict(raw)
    result = run(cfg)
    s = setup(cfg)
    pred = load_trained(result.checkpoint, s)
    examples = load_examples(mixed, 1, s.tokenizer, 16, 64)
    scores = static_scores(s.program, examples[:3])
    masks = pred(torch.zeros(1, 3, dtype=torch.long))
    for i, (m, sc, k) in enumerate(zip(masks, scores, pred.counts)):
        assert set(torch.nonzero(m).flatten().tolist()) == set(torch.topk(sc, k).indices.tolist()), i
    assert not torch.equal(pred.head.scale, torch.ones_like(pred.head.scale))  # the scales trained
    assert all(torch.equal(m, x) for m, x in zip(masks, pred(torch.ones(1, 7, dtype=torch.long))))  # input-free
    # it specialises like any mask: the small program equals the masked one
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        masked = ifp.insert_masks(s.program).module()(ids, [m.detach() for m in masks])
        small = ifp.specialize(s.program, mask=[m.detach() for m in masks]).module()(ids)
    torch.testing.assert_close(small, masked, rtol=1e-4, atol=1e-5)

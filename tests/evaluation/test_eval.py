"""ifp-compile eval: every number in its table is recomputed here another way.

Tiny random Llama with a byte tokenizer; the held-out corpora are the real ones
(``ifp_compile.corpora``), cut to a few segments.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ifp_compile as ifp
from ifp_compile.cli import main
from ifp_compile.evaluation import EvalResult, Row, run_eval
from ifp_compile.evaluation import tasks
from ifp_compile.evaluation.rows import prompt_activation_source, random_source, static_source
from ifp_compile.predictors.base import keep_counts
from ifp_compile.evaluation.run import calibration
from ifp_compile.generate import greedy_generate
from ifp_compile.train.data import ByteTokenizer
from ifp_compile.train.trainer import example_loss
from tests.zoo import _hf


def test_final_number_reads_the_last_number():
    assert tasks.final_number("First 3 apples, then 1,250 more. The answer is 1,253.") == 1253.0
    assert tasks.is_correct("so she pays $42", 42) and tasks.is_correct("-7", -7)
    assert not tasks.is_correct("The answer is 41 or 42, not 43", 42)
    assert tasks.final_number("no digits here") is None and not tasks.is_correct("", 0)


def test_math_problems_are_held_out_and_deterministic():
    qs = tasks.math_problems(5)
    assert qs == tasks.math_problems(5) and len({q for q, _ in qs}) == 5
    assert all(isinstance(a, int) and "Answer" not in q and "Solution" not in q for q, a in qs)


def _row(name, kind, loss, acc, params=10):
    return Row(name, kind, params, {"code": loss[0], "prose": loss[1], "math": loss[2]}, acc)


def test_gap_closed_by_hand():
    r = EvalResult("m", 0.5, [_row("dense", "dense", (2.0, 3.0, 1.0), 0.5), _row("static", "static", (4.0, 5.0, 1.0), 0.1),
                              _row("pa", "prompt-activation", (3.0, 5.5, 1.0), 0.3)], 2, 10,
                   domains=("code", "prose", "math"))
    got = {(s["domain"], s["metric"]): s["gap_closed"] for s in r.summary()}
    assert got[("code", "loss")] == pytest.approx(0.5) and got[("prose", "loss")] == pytest.approx(-0.25)
    assert got[("math", "loss")] is None  # static == dense: no gap to close
    assert got[("math", "exact match")] == pytest.approx(0.5)
    assert "+50%" in r.table() and "-25%" in r.table()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = _hf("llama", layers=2).eval()
    tok = ByteTokenizer(int(model.config.vocab_size))
    program = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    widths = [b.width for b in ifp.find_ffn_blocks(program)]
    counts = keep_counts(widths, 0.5)
    sources = [static_source(program, calibration(tok, 3), 0.5, "adapt", "taylor"),
               prompt_activation_source(program, counts), random_source(widths, counts)]
    result = run_eval(model, tok, program, sources, model_name="tiny", keep=0.5, segments=2, problems=2,
                      max_new_tokens=4, swap=True)
    return model, tok, program, result


def test_every_masked_row_has_the_same_size(tiny):
    _, _, program, result = tiny
    blocks = ifp.find_ffn_blocks(program)
    assert [r.kind for r in result.rows] == ["dense", "static", "prompt-activation", "random"]
    assert result.rows[0].parameters == ifp.count_parameters(program)
    kept = ifp.count_parameters(program) - sum(b.width // 2 * b.params_per_channel() for b in blocks)
    assert [r.parameters for r in result.rows[1:]] == [kept] * 3
    for r in result.rows[1:]:
        for d in result.domains:
            layers = r.masks[d]
            assert [m.shape for m in layers] == [(1 if r.kind == "static" else 2, b.width) for b in blocks]
            assert sum(int(m[0].sum()) for m in layers) == sum(b.width // 2 for b in blocks)


def test_losses_equal_the_specialised_programs(tiny):
    """Each row's loss, recomputed from its stored masks through ``specialize``."""
    _, tok, program, result = tiny
    for d in result.domains:
        examples = tasks.loss_examples(tok, d, 2)
        with torch.no_grad():
            dense = np.mean([float(example_loss(program.module()(torch.tensor([e.input_ids])), e)) for e in examples])
        assert result.rows[0].loss[d] == pytest.approx(dense, rel=1e-5)
        for r in result.rows[1:]:
            losses = []
            for i, e in enumerate(examples):
                mask = [torch.from_numpy(m[0 if r.kind == "static" else i]).float() for m in r.masks[d]]
                with torch.no_grad():
                    logits = ifp.specialize(program, mask=mask).module()(torch.tensor([e.input_ids]))
                losses.append(float(example_loss(logits, e)))
            assert r.loss[d] == pytest.approx(np.mean(losses), rel=1e-4), (r.name, d)


def test_math_accuracy_equals_cache_free_decoding_of_the_programs(tiny):
    model, tok, program, result = tiny
    static_mask = [torch.from_numpy(m[0]).float() for m in result.rows[1].masks["code"]]
    for row, prog in ((result.rows[0], program), (result.rows[1], ifp.specialize(program, mask=static_mask))):
        right = 0
        for q, a in tasks.math_problems(2):
            ids = tasks.prompt_ids(tok, tasks.math_prompt(q))
            right += tasks.is_correct(tok.decode(greedy_generate(prog.module(), ids, 4)), a)
        assert row.math_accuracy == right / 2


def test_segment_losses_and_intervals_against_the_static_row(tiny):
    from ifp_compile.evaluation.bootstrap import paired_bootstrap

    result = tiny[3]
    for r in result.rows:
        for d in result.domains:
            assert len(r.segment_losses[d]) == 2 and np.mean(r.segment_losses[d]) == pytest.approx(r.loss[d], rel=1e-12)
    intervals = result.intervals()
    assert {(iv["row"], iv["domain"]) for iv in intervals} == {
        (r.name, d) for r in result.rows if r.kind != "static" for d in result.domains}
    static = result.row("static")
    for iv in intervals:
        row = next(r for r in result.rows if r.name == iv["row"])
        expect = paired_bootstrap(row.segment_losses[iv["domain"]], static.segment_losses[iv["domain"]])
        assert iv["mean"] == pytest.approx(row.loss[iv["domain"]] - static.loss[iv["domain"]], abs=1e-9)
        assert (iv["low"], iv["high"]) == (expect.low, expect.high) and iv["low"] <= iv["mean"] <= iv["high"]
    assert "95% paired bootstrap interval" in result.table()


def test_task_swap_matrix_recomputed_from_the_stored_masks(tiny):
    """Domain d's segment i scored with the masks chosen for domain e's segment i."""
    _, tok, program, result = tiny
    assert sorted(result.swap) == ["per-task: prompt activation (GRIFFIN)", "random mask"]  # per-task rows only
    for name, matrix in result.swap.items():
        row = next(r for r in result.rows if r.name == name)
        assert list(matrix) == list(result.domains)
        for d in result.domains:
            assert matrix[d][d] == row.loss[d]
        d, e = "code", "math"
        losses = []
        for i, ex in enumerate(tasks.loss_examples(tok, d, 2)):
            mask = [torch.from_numpy(m[i]).float() for m in row.masks[e]]
            with torch.no_grad():
                logits = ifp.specialize(program, mask=mask).module()(torch.tensor([ex.input_ids]))
            losses.append(float(example_loss(logits, ex)))
        assert matrix[d][e] == pytest.approx(np.mean(losses), rel=1e-4), name
        wins = result.swap_wins()[name]
        assert wins == {x: all(matrix[x][x] < matrix[x][y] for y in result.domains if y != x) for x in result.domains}
    assert "task swap, random mask" in result.table()


def test_outputs_for_the_report(tiny):
    result = tiny[3]
    data = result.to_json()
    assert [r["kind"] for r in data["rows"]] == ["dense", "static", "prompt-activation", "random"]
    keys = result.mask_tensors()
    assert "prompt-activation/math/ffn.1" in keys and keys["static/code/ffn.0"].dtype == np.uint8
    assert data["intervals"] == result.intervals() and data["rows"][1]["segment_losses"] == result.rows[1].segment_losses
    json.dumps(data)  # plain JSON, no tensors


def test_command_writes_eval_json_and_refuses_bad_input(tmp_path, capsys):
    d = tmp_path / "model"
    torch.manual_seed(0)
    _hf("llama", layers=2).save_pretrained(d)
    out = tmp_path / "ev"
    base = ["eval", "--model", str(d), "--tokenizer", "bytes", "--segments", "1", "--problems", "1",
            "--max-new-tokens", "2", "--calibration-chunks", "3", "--static-score", "magnitude"]
    assert main(base + ["--out", str(out)]) == 0
    table = capsys.readouterr().out
    data = json.loads((out / "eval.json").read_text())
    assert [r["kind"] for r in data["rows"]] == ["dense", "static", "prompt-activation", "random"]
    assert f"{data['rows'][1]['parameters']:,}" in table and "gap closed" in table
    assert "exact match of the final number over 1 held-out problems" in table
    from safetensors.numpy import load_file

    assert "random/prose/ffn.0" in load_file(str(out / "masks.safetensors"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ev", "model"]  # no temp dir left behind
    (tmp_path / "file").write_text("x")
    assert main(base + ["--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(base + ["--predictor", str(tmp_path / "nope")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--keep", "1.5"])
    assert "keep must be in (0, 1], got 1.5" in capsys.readouterr().err


def test_a_trained_predictor_adds_its_row_at_the_same_size(tmp_path, capsys):
    from ifp_compile.train import config_from_dict, run
    from tests.train.conftest import make_config, random_text

    import random

    d = tmp_path / "model"
    torch.manual_seed(0)
    _hf("llama", layers=2).save_pretrained(d)
    rng = random.Random(0)
    (tmp_path / "text.jsonl").write_text("".join(json.dumps({"text": random_text(rng, 40)}) + "\n" for _ in range(8)))
    cfg = make_config(d, tmp_path / "text.jsonl", tmp_path / "run", steps=2)
    result = run(config_from_dict(cfg))
    base = ["eval", "--model", str(d), "--tokenizer", "bytes", "--segments", "1", "--problems", "0",
            "--calibration-chunks", "3", "--static", "magnitude", "--out", str(tmp_path / "ev")]
    assert main(base + ["--predictor", str(result.checkpoint)]) == 0
    rows = json.loads((tmp_path / "ev" / "eval.json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["dense", "static", "prompt-activation", "ifpredictor", "random"]
    assert len({r["parameters"] for r in rows[1:]}) == 1 and rows[0]["parameters"] > rows[1]["parameters"]
    assert rows[3]["math_accuracy"] is None  # --problems 0
    capsys.readouterr()
    assert main(base + ["--predictor", str(result.checkpoint), "--keep", "0.25"]) == 2
    assert "pass the --keep it was trained with" in capsys.readouterr().err

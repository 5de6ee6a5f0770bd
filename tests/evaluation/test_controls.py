"""ifp-compile eval --controls: the equal-budget rows of issue 19, on a tiny random Llama.

Every claim the table makes is checked another way: the rows' budgets are identical, the
static rows' masks do not depend on the input, per-task masks depend on the domain only
and are the trained predictor's masks for the domain's instruction, joint rows run their
own trained weights, intervals are against the static learned mask trained the same way,
and a second run reuses the checkpoints instead of training again.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

import ifp_compile as ifp
from ifp_compile import corpora
from ifp_compile.cli import main
from ifp_compile.evaluation import tasks
from ifp_compile.evaluation.controls import CONTROLS
from ifp_compile.train import config_from_dict, load_trained, setup
from ifp_compile.train.checkpoint import read_state
from ifp_compile.train.trainer import example_loss
from tests.zoo import _hf

KINDS = [c.kind for c in CONTROLS]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("controls")
    torch.manual_seed(0)
    _hf("llama", layers=2).save_pretrained(root / "model")
    args = ["eval", "--model", str(root / "model"), "--tokenizer", "bytes", "--controls", "--quick", "--swap",
            "--encoder-layers", "1", "--static-score", "magnitude", "--segments", "3", "--train-steps", "3",
            "--out", str(root / "ev")]
    assert main(args) == 0
    return root, args, json.loads((root / "ev" / "eval.json").read_text())


def test_rows_have_one_budget_and_one_size(run):
    root, _, data = run
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds == ["dense", "static", "prompt-activation", *KINDS, *[k + "-joint" for k in KINDS], "random"]
    assert len({r["parameters"] for r in data["rows"][1:]}) == 1
    work = root / "ev.controls"
    configs = {k: read_state(work / k / "checkpoint")["config"] for k in kinds[3:-1]}
    differ = {"out", "train_llm", "predictor"}
    for k, cfg in configs.items():
        same = {key: v for key, v in cfg.items() if key not in differ}
        assert same == {key: v for key, v in configs["static-learned"].items() if key not in differ}, k
        assert cfg["steps"] == 3 and cfg["train_llm"] == k.endswith("-joint")
        assert cfg["predictor"]["init"] == "static"  # every row starts from the same calibrated mask
        assert (work / k / "checkpoint" / "llm.safetensors").is_file() == k.endswith("-joint")
    assert [configs[k]["predictor"]["input"] for k in KINDS] == ["constant", "constant", "instruction", "text"]
    assert configs["static-scales"]["predictor"]["kind"] == "scales"
    lines = (work / "train.jsonl").read_text().splitlines()
    assert [json.loads(line)["domain"] for line in lines[:4]] == list(corpora.DOMAINS)


def test_masks_depend_on_what_each_row_reads(run):
    root, _, data = run
    masks = load_file(str(root / "ev" / "masks.safetensors"))
    doms = data["domains"]
    assert doms == list(corpora.DOMAINS)
    for kind in ("static-learned", "static-scales", "static-learned-joint"):
        first = masks[f"{kind}/code/ffn.0"][0]
        assert all(np.array_equal(masks[f"{kind}/{d}/ffn.0"][i], first) for d in doms
                   for i in range(masks[f"{kind}/{d}/ffn.0"].shape[0]))
    # per-task: one mask per domain, the trained predictor's for the domain's instruction
    cfg = config_from_dict(read_state(root / "ev.controls" / "per-task" / "checkpoint")["config"])
    s = setup(cfg)
    pred = load_trained(root / "ev.controls" / "per-task" / "checkpoint", s)
    for d in doms:
        got = masks[f"per-task/{d}/ffn.1"]
        assert got.shape[0] == 3 and all(np.array_equal(got[i], got[0]) for i in range(3))
        with torch.no_grad():
            want = pred(tasks.instruction_ids(s.tokenizer, d))[1]
        assert np.array_equal(got[0], (want != 0).numpy().astype(np.uint8)), d


def test_joint_rows_run_their_trained_weights(run):
    """The joint per-task row's code loss = the specialised *trained* program's loss."""
    root, _, data = run
    ck = root / "ev.controls" / "per-task-joint" / "checkpoint"
    s = setup(config_from_dict(read_state(ck)["config"]))
    pred = load_trained(ck, s)  # loads llm.safetensors into s.model, whose parameters s.program uses
    row = next(r for r in data["rows"] if r["kind"] == "per-task-joint")
    base = next(r for r in data["rows"] if r["kind"] == "per-task")
    losses = []
    with torch.no_grad():
        mask = [m.detach() for m in pred(tasks.instruction_ids(s.tokenizer, "code"))]
        small = ifp.specialize(s.program, mask=mask).module()
        for ex in tasks.loss_examples(s.tokenizer, "code", 3):
            losses.append(float(example_loss(small(torch.tensor([ex.input_ids])), ex)))
    assert row["segment_losses"]["code"] == pytest.approx(losses, rel=1e-4)
    assert row["segment_losses"]["code"] != pytest.approx(base["segment_losses"]["code"], rel=1e-6)


def test_intervals_are_against_the_static_learned_mask_trained_the_same_way(run):
    _, _, data = run
    names = {r["kind"]: r["name"] for r in data["rows"]}
    by_row = {iv["row"]: iv["baseline"] for iv in data["intervals"]}
    for kind, name in names.items():
        if kind in ("static-learned",):
            assert name not in by_row
        elif kind.endswith("-joint") and kind != "static-learned-joint":
            assert by_row[name] == names["static-learned-joint"], kind
        elif kind != "static-learned-joint":
            assert by_row[name] == names["static-learned"], kind
    assert by_row[names["static-learned-joint"]] == names["static-learned"]


def test_swap_covers_the_trained_per_task_and_per_input_rows(run):
    _, _, data = run
    names = {r["kind"]: r["name"] for r in data["rows"]}
    assert sorted(data["swap"]) == sorted(names[k] for k in ("per-task", "per-input", "per-task-joint",
                                                             "per-input-joint"))
    row = next(r for r in data["rows"] if r["kind"] == "per-input")
    for d in data["domains"]:
        assert data["swap"][row["name"]][d][d] == pytest.approx(np.mean(row["segment_losses"][d]))


def test_a_second_run_reuses_the_checkpoints(run, capsys):
    root, args, data = run
    ck = root / "ev.controls" / "per-input" / "checkpoint" / "predictor.safetensors"
    before = ck.stat().st_mtime_ns
    assert main(args) == 0
    again = json.loads((root / "ev" / "eval.json").read_text())
    assert ck.stat().st_mtime_ns == before or read_state(ck.parent)["step"] == 3
    assert [r["segment_losses"] for r in again["rows"]] == [r["segment_losses"] for r in data["rows"]]
    assert "math exact match: not run (--problems 0)" in capsys.readouterr().out


def test_another_budget_in_the_same_work_dir_is_refused(run, capsys):
    root, args, _ = run
    assert main(args + ["--keep", "0.25"]) == 2  # another keep ratio: not the run the checkpoints are of
    err = capsys.readouterr().err
    assert "written by a run with another config" in err and "pass another --work directory" in err


def test_verdict_by_hand():
    from ifp_compile.evaluation.controls import verdict, verdict_lines

    def iv(domain, mean, excludes):
        return {"row": "pt", "baseline": "sl", "domain": domain, "mean": mean, "excludes_zero": excludes}

    data = {"rows": [{"kind": "static-learned", "name": "sl"}, {"kind": "per-task", "name": "pt"}],
            "intervals": [iv("a", -0.2, True), iv("b", -0.1, True), iv("c", -0.3, True), iv("d", 0.2, True)],
            "swap_diagonal_wins": {"pt": {"a": True, "b": False, "c": True, "d": True}}}
    (v,) = verdict(data)
    assert (v["better"], v["worse"], v["better_and_own_wins"], v["met"]) == (["a", "b", "c"], ["d"], ["a", "c"], False)
    data["swap_diagonal_wins"]["pt"]["b"] = True
    assert verdict(data)[0]["met"] and "target (both in >= 3 domains): met" in "\n".join(verdict_lines(data))
    del data["swap_diagonal_wins"]
    assert not verdict(data)[0]["met"] and "not measured (--swap)" in "\n".join(verdict_lines(data))


def test_the_run_records_its_verdict_and_training(run):
    from ifp_compile.evaluation.controls import verdict

    _, _, data = run
    assert data["verdict"] == verdict(data)
    assert sorted(v["row"] for v in data["verdict"]) == sorted(
        r["name"] for r in data["rows"] if r["kind"] in ("per-task", "per-task-joint", "per-input", "per-input-joint"))
    assert set(data["training"]) == {c + j for c in KINDS for j in ("", "-joint")}
    assert all(t["steps"] == 3 for t in data["training"].values())


def test_control_options_need_controls(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path), "--train-steps", "3"]) == 2
    assert "--train-steps, --train-texts, --work, --control-kinds and --temperature need --controls" in \
        capsys.readouterr().err


@pytest.mark.parametrize("kinds, message", [
    ("static-learned,per-tsak", "unknown control 'per-tsak'; choose from static-learned, static-scales"),
    ("per-task,per-input", "--control-kinds must include static-learned"),
])
def test_bad_control_kinds_fail_before_the_model_loads(tmp_path, capsys, kinds, message):
    assert main(["eval", "--model", str(tmp_path / "absent"), "--controls", "--control-kinds", kinds]) == 2
    err = capsys.readouterr().err
    assert message in err and "absent" not in err


def test_a_subset_of_controls_at_another_temperature(run, capsys):
    """--control-kinds trains only the named rows; --temperature reaches every predictor's SoftTopK."""
    root, _, _ = run
    out = root / "subset"
    args = ["eval", "--model", str(root / "model"), "--tokenizer", "bytes", "--controls", "--quick", "--joint", "none",
            "--control-kinds", "per-task, static-learned", "--temperature", "3", "--encoder-layers", "1",
            "--static-score", "magnitude", "--segments", "3", "--train-steps", "2", "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "eval.json").read_text())
    assert [r["kind"] for r in data["rows"]] == ["dense", "static", "prompt-activation", "static-learned", "per-task",
                                                "random"]
    assert sorted(data["training"]) == ["per-task", "static-learned"]
    assert [v["row"] for v in data["verdict"]] == [next(r["name"] for r in data["rows"] if r["kind"] == "per-task")]
    for kind in ("static-learned", "per-task"):
        ck = root / "subset.controls" / kind / "checkpoint"
        s = setup(config_from_dict(read_state(ck)["config"]))
        assert {t.temperature for t in load_trained(ck, s).topk} == {3.0}
    with pytest.raises(SystemExit):
        main(args[:-2] + ["--temperature", "0", "--out", str(out)])
    assert "--temperature: must be > 0, got 0" in capsys.readouterr().err


def test_controls_train_and_evaluate_in_half_precision(run):
    """--dtype reaches every control's training config (as a name: the config is JSON) and the
    joint rows train a bfloat16 LLM (float32 master weights, tests/train/test_half_precision_training.py)."""
    root, _, _ = run
    out = root / "bf16"
    args = ["eval", "--model", str(root / "model"), "--tokenizer", "bytes", "--controls", "--quick", "--dtype", "bf16",
            "--control-kinds", "static-learned", "--encoder-layers", "1", "--static-score", "magnitude",
            "--segments", "2", "--train-steps", "2", "--out", str(out)]
    assert main(args) == 0
    data = json.loads((out / "eval.json").read_text())
    assert sorted(data["training"]) == ["static-learned", "static-learned-joint"]
    for kind in data["training"]:
        ck = root / "bf16.controls" / kind / "checkpoint"
        assert read_state(ck)["config"]["dtype"] == "bfloat16"
        assert all(math.isfinite(x) for x in read_state(ck)["losses"])
    joint = next(r for r in data["rows"] if r["kind"] == "static-learned-joint")
    assert all(math.isfinite(x) for losses in joint["segment_losses"].values() for x in losses)

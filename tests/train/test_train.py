"""Joint training: one source of truth with the masked program, the two stages' data,
determinism, exact resume, checkpoints, data parallelism and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ifp_compile as ifp
from ifp_compile.cli import main as cli_main
from ifp_compile.train import ByteTokenizer, TrainError, config_from_dict, load_examples, run, setup
from ifp_compile.train.data import stage1_examples, stage2_example
from ifp_compile.train.trainer import load_trained
from tests.train.conftest import make_config


def cfg_of(tiny_model_dir, data, out, **kw):
    return config_from_dict(make_config(tiny_model_dir, data, out, **kw))


def test_training_forward_is_the_masked_program(tiny_model_dir, data_dir, tmp_path):
    """The loss the trainer optimises is computed by the masked program itself, and equals
    the program with the predictor branch (what ``specialize`` evaluates)."""
    s = setup(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o"))
    ex = load_examples(data_dir / "text.jsonl", 1, s.tokenizer, 16, 64)[0]
    with torch.no_grad():
        for p in s.predictor.head.parameters():
            p.normal_(0, 0.5)
        got = s.loss.logits(ex)
        ids, instr = torch.tensor([ex.input_ids]), torch.tensor([ex.predictor_ids])
        program = ifp.insert_masks(s.program, predictor=s.predictor)
        torch.testing.assert_close(got, program.module()(ids, instr), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, ifp.specialize(program, instr).module()(ids), rtol=1e-4, atol=1e-5)
    # the program's parameters are the model's own objects: training updates both at once
    lm_params = {id(p) for p in s.loss.lm.parameters()}
    assert all(id(p) in lm_params for p in s.model.parameters())


def test_stage1_chunks_predict_the_next_chunk():
    exs = stage1_examples(list(range(10)), chunk=4, max_tokens=9)
    assert [(e.predictor_ids, e.input_ids, e.loss_mask) for e in exs] == [
        ((0, 1, 2, 3), (0, 1, 2, 3, 4, 5, 6, 7), (False,) * 4 + (True,) * 4),
        ((4, 5, 6, 7), (4, 5, 6, 7, 8), (False,) * 4 + (True,)),
    ]


def test_stage2_loss_covers_assistant_tokens_only():
    tok = ByteTokenizer(128)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "sure"}]
    ex = stage2_example(tok, msgs, max_tokens=1000)
    text = "user: hi\nassistant: yo\nuser: ok?\nassistant: sure\n"
    assert ex.input_ids == tuple(tok.encode(text)) and ex.predictor_ids == tuple(tok.encode("hi"))
    targets = "".join(c for c, m in zip(text, ex.loss_mask) if m)
    assert targets == " yo\n sure\n"  # the replies and their line ends, never a role label


def test_stage2_with_a_chat_template():
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["[UNK]", "<s>", "</s>"] + [chr(c) for c in range(32, 127)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.add_special_tokens(["<s>", "</s>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}|{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant|{% endif %}")
    ex = stage2_example(tok, [{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}], 1000)
    decoded = [tok.convert_ids_to_tokens(i) for i, m in zip(ex.input_ids, ex.loss_mask) if m]
    assert decoded == ["c", "d", "</s>"]


def test_training_is_deterministic_and_learns(tiny_model_dir, data_dir, tmp_path):
    a = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "a", steps=12, resume=False))
    b = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "b", steps=12, resume=False))
    assert a.losses == b.losses and len(a.losses) == 12
    fa = (tmp_path / "a" / "checkpoint" / "predictor.safetensors").read_bytes()
    assert fa == (tmp_path / "b" / "checkpoint" / "predictor.safetensors").read_bytes()
    assert sum(a.losses[-3:]) < sum(a.losses[:3])


@pytest.mark.parametrize("stage, data, train_llm", [(1, "text.jsonl", True), (2, "chat.jsonl", False)])
def test_resume_continues_exactly(tiny_model_dir, data_dir, tmp_path, stage, data, train_llm):
    kw = dict(stage=stage, steps=6, train_llm=train_llm, llm_lr=1e-3, save_every=2, batch_size=2)
    whole = run(cfg_of(tiny_model_dir, data_dir / data, tmp_path / "whole", **kw))
    part = run(cfg_of(tiny_model_dir, data_dir / data, tmp_path / "part", **kw), stop_after=3)
    assert part.steps == 3
    resumed = run(cfg_of(tiny_model_dir, data_dir / data, tmp_path / "part", **kw))  # a new process would do this
    assert resumed.losses == whole.losses
    for f in ["predictor.safetensors", "optimizer.safetensors"] + (["llm.safetensors"] if train_llm else []):
        assert (tmp_path / "whole" / "checkpoint" / f).read_bytes() == (tmp_path / "part" / "checkpoint" / f).read_bytes()
    # the trained checkpoint loads into a fresh setup and specialises per instruction
    s = setup(cfg_of(tiny_model_dir, data_dir / data, tmp_path / "x", **kw))
    pred = load_trained(tmp_path / "whole" / "checkpoint", s)
    program = ifp.insert_masks(s.program, predictor=pred)
    small = ifp.specialize(program, torch.tensor([s.tokenizer.encode("sum of two numbers")]))
    assert ifp.count_parameters(small) < ifp.count_parameters(s.program)


def test_raising_steps_continues_a_finished_run_exactly(tiny_model_dir, data_dir, tmp_path):
    """A finished 3-step run asked for 6 steps == a 6-step run: eval --controls --train-steps relies on it."""
    kw = dict(batch_size=2, train_llm=True, llm_lr=1e-3)
    whole = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "whole", steps=6, save_every=0, **kw))
    short = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "part", steps=3, save_every=0, **kw))
    assert short.steps == 3
    longer = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "part", steps=6, save_every=2, **kw))
    assert longer.steps == 6 and longer.losses == whole.losses
    for f in ("predictor.safetensors", "optimizer.safetensors", "llm.safetensors"):
        assert (tmp_path / "whole" / "checkpoint" / f).read_bytes() == (tmp_path / "part" / "checkpoint" / f).read_bytes()


def test_data_parallel_matches_single_process(tiny_model_dir, data_dir, tmp_path):
    """torchrun with 2 gloo processes (2 examples each) == 1 process with the batch of 4."""
    kw = dict(steps=4, batch_size=4, train_llm=True, llm_lr=1e-3, resume=False)
    single = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "single", **kw))
    cfg = make_config(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "ddp", **kw)
    (tmp_path / "ddp.json").write_text(json.dumps(cfg))
    env = dict(os.environ, IFP_QUIET="1", OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).parents[2]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "ifp_compile.train", "--config", str(tmp_path / "ddp.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = json.loads((tmp_path / "ddp" / "checkpoint" / "state.json").read_text())["losses"]
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single.losses), rtol=1e-5, atol=1e-6)
    assert "trained 4 steps" in proc.stdout


def _error(tmp_path, cfg: dict) -> str:
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(TrainError) as e:
        from ifp_compile.train import load_config

        run(load_config(tmp_path / "c.json"))
    return str(e.value)


def test_bad_input_is_named(tiny_model_dir, data_dir, tmp_path):
    base = make_config(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine text here"}\n\n{"text": oops}\n')
    assert f"{bad}:3: not valid JSON" in _error(tmp_path, {**base, "data": str(bad)})
    bad.write_text('{"text": "ok"}\n{"txt": "wrong key"}\n')
    assert f"{bad}:2: stage 1 needs a non-empty \"text\" string" in _error(tmp_path, {**base, "data": str(bad)})
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert f"{bad}:1: the conversation has no assistant message" in _error(
        tmp_path, {**base, "data": str(bad), "stage": 2})
    bad.write_text('{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x"}]}\n')
    assert f"{bad}:1: the conversation must start with a user message" in _error(
        tmp_path, {**base, "data": str(bad), "stage": 2})
    bad.write_text('{"messages": [{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}]}\n')
    assert f"{bad}:1: the first user message is empty" in _error(tmp_path, {**base, "data": str(bad), "stage": 2})
    assert "predictor.mlp_hidden must be a positive int, got 0" in _error(
        tmp_path, {**base, "predictor": {"mlp_hidden": 0}})
    assert "predictor.encoder_layers: LMEncoder: num_layers must be in [1, 2], got 5" in _error(
        tmp_path, {**base, "predictor": {"encoder_layers": 5}})
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert f"data file {empty} is empty" in _error(tmp_path, {**base, "data": str(empty)})
    short = tmp_path / "short.jsonl"
    short.write_text('{"text": "tiny"}\n')
    assert "gives no training examples: no text is longer than one chunk (16 tokens)" in _error(
        tmp_path, {**base, "data": str(short)})
    assert "FFN block 0 must be an int in [0, 64], got 65" in _error(tmp_path, {**base, "keep": [65, 8]})
    assert "FFN block 1 would keep 0 of 64 channels" in _error(tmp_path, {**base, "keep": [8, 0]})
    assert "unknown key(s) stpes, predictor.layers" in _error(tmp_path, {**base, "stpes": 3, "predictor": {"layers": 1}})
    assert "batch_size must be a positive int, got 0" in _error(tmp_path, {**base, "batch_size": 0})


def test_vocabulary_mismatch_is_named(tiny_model_dir, data_dir, tmp_path):
    data = tmp_path / "accents.jsonl"
    data.write_text(json.dumps({"text": "déjà vu, à la carte, naïve café " * 8}) + "\n")
    cfg = cfg_of(tiny_model_dir, data, tmp_path / "o")
    s = setup(cfg)
    s.tokenizer = ByteTokenizer(1000)  # a tokenizer of a bigger vocabulary: bytes >= 128 stay
    with pytest.raises(TrainError, match="vocabulary has 128 entries \\(tokenizer/vocabulary mismatch\\)"):
        run(cfg, setup_=s)


def test_checkpoint_of_another_model_is_refused(tiny_model_dir, data_dir, tmp_path):
    from tests.zoo import _hf

    run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o", steps=1, train_llm=True))
    other = tmp_path / "other-model"
    _hf("llama", layers=2, inter=48).save_pretrained(other)
    s = setup(cfg_of(other, data_dir / "text.jsonl", tmp_path / "p", train_llm=True))
    with pytest.raises(TrainError) as e:
        load_trained(tmp_path / "o" / "checkpoint", s)
    msg = str(e.value)
    assert "does not match the predictor" in msg and "head.2.weight: checkpoint shape (128, 128), predictor shape (96, 128)" in msg


def test_cli_train(tiny_model_dir, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "--help"])
    assert e.value.code == 0 and "--config" in capsys.readouterr().out
    assert cli_main(["train", "--config", str(tmp_path / "missing.json")]) == 2
    assert "missing.json does not exist" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps(make_config(tiny_model_dir, "text.jsonl", "out", steps=2)))
    (tmp_path / "text.jsonl").write_text((data_dir / "text.jsonl").read_text())
    assert cli_main(["train", "--config", str(tmp_path / "c.json")]) == 0  # relative paths: next to the config
    assert "trained 2 steps" in capsys.readouterr().out
    assert (tmp_path / "out" / "checkpoint" / "state.json").is_file()


def test_resume_refuses_another_config_and_recovers_a_checkpoint_moved_aside(tiny_model_dir, data_dir, tmp_path):
    kw = dict(steps=2, save_every=1)
    run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o", **kw))
    with pytest.raises(TrainError, match="another config \\(lr: checkpoint 0.01, config 0.02\\)"):
        run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o", lr=0.02, steps=3))
    # a run killed between the two renames of a checkpoint save left it moved aside
    ck = tmp_path / "o" / "checkpoint"
    ck.rename(tmp_path / "o" / ".old-checkpoint-12345")
    (tmp_path / "o" / ".checkpoint.tmp-12345").mkdir()  # and a half-written new one
    result = run(cfg_of(tiny_model_dir, data_dir / "text.jsonl", tmp_path / "o", steps=3, save_every=1))
    assert len(result.losses) == 3 and result.steps == 3  # resumed from step 2, not from 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["checkpoint"]


def test_chat_template_that_rejects_a_conversation_is_named(tmp_path):
    from ifp_compile.train.data import _template_ids

    class Strict:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            raise ValueError("Conversation roles must alternate user/assistant")

    with pytest.raises(TrainError, match="data.jsonl:4: the tokenizer's chat template rejects this conversation: "
                                         "Conversation roles must alternate"):
        _template_ids(Strict(), [{"role": "user", "content": "a"}], False, "data.jsonl:4")

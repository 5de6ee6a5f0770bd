"""ExecuTorch programs of specialised decode steps (``--format pte``): the ``.pte`` run by
ExecuTorch's runtime decodes the specialised torch program's greedy tokens, a build writes
the same bytes as a direct lowering, and bad input is named before anything is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ifp_compile as ifp
from ifp_compile.cli import main
from ifp_compile.decode_step import StepDecoder, export_decode_step

pytest.importorskip("executorch")
from ifp_compile.build import BuildError, build, verify  # noqa: E402
from ifp_compile.pte import PteDecoder, PteError, lower_to_pte, write_pte  # noqa: E402

CACHE = 32


def tiny_llama(dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval().to(dtype)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["[UNK]", "<s>", "</s>"] + [chr(c) for c in range(32, 128)])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    raw.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A one-layer Llama checkpoint directory with a tokenizer, a mask file and tasks.jsonl
    (one layer: lowering time grows with the number of ops, and one layer has every kind)."""
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("pte")
    model = tiny_llama()
    model.save_pretrained(d / "ckpt")
    tiny_tokenizer().save_pretrained(d / "ckpt")
    g = np.random.default_rng(0)
    masks = [((g.random(96) < 0.5) * (g.random(96) + 0.5)).astype(np.float32)]  # half the channels, soft values
    save_file({f"ffn.{i}": m for i, m in enumerate(masks)}, str(d / "m.safetensors"))
    (d / "tasks.jsonl").write_text(json.dumps({"name": "alpha", "mask": "m.safetensors"}) + "\n")
    return d, model, [torch.from_numpy(m) for m in masks]


def test_pte_task_decodes_the_specialized_programs_tokens(project, tmp_path):
    d, model, masks = project
    out = tmp_path / "out"
    report = build(str(d / "ckpt"), d / "tasks.jsonl", out, formats=("pte",), max_cache_len=CACHE)
    assert report.built == ["alpha"]
    task = out / "tasks" / "alpha"
    assert verify(out) == ["alpha"]
    manifest = json.loads((task / "manifest.json").read_text())
    assert manifest["pte"]["max_cache_len"] == CACHE and manifest["pte"]["eos_token_id"] == 2
    assert manifest["pte"]["tokenizer"] == "tokenizer.json" and manifest["pte"]["backend"] == "xnnpack"
    assert (task / "tokenizer.json").stat().st_ino == (out / "base" / "tokenizer.json").stat().st_ino
    assert json.loads((task / "tokenizer.json").read_text())["model"]["vocab"]["</s>"] == 2
    # the same tokens as the specialised torch decode step, with soft scales folded in
    small = ifp.specialize(export_decode_step(model, CACHE), mask=masks)
    assert manifest["parameters"]["pte_parameters"] == ifp.count_parameters(small)
    prompt = torch.tensor([[1, 40, 41, 42, 43]])
    want, _ = StepDecoder(small).greedy(prompt, 12)
    decoder = PteDecoder(task / "model.pte", max_cache_len=CACHE)
    got, speed = decoder.greedy(prompt, 12)
    assert got == want and speed > 0
    assert decoder.greedy(prompt, 12)[0] == want  # the cache is reused from position 0, never read stale
    # the prefill logits themselves, against the torch program's
    module = small.module()
    with torch.no_grad():
        ref = module(prompt, torch.arange(5))
    torch.testing.assert_close(decoder._step(prompt, 0), ref, rtol=1e-4, atol=1e-4)
    # a direct lowering of the same program gives the build's bytes (deterministic)
    assert lower_to_pte(small) == (task / "model.pte").read_bytes()
    with pytest.raises(Exception, match="cache positions"):
        decoder.greedy(prompt, CACHE)


def test_pte_bad_input_is_named_before_anything_is_written(project, tmp_path, capsys):
    d, model, masks = project
    # bfloat16: XNNPACK would run none of its matrix products
    bf16 = tmp_path / "bf16"
    tiny_llama(torch.bfloat16).save_pretrained(bf16)
    tiny_tokenizer().save_pretrained(bf16)
    with pytest.raises(BuildError, match="bfloat16: ExecuTorch's XNNPACK backend delegates float32 and float16"):
        build(str(bf16), d / "tasks.jsonl", tmp_path / "o1", formats=("pte",), max_cache_len=CACHE)
    assert not (tmp_path / "o1" / "base").exists()
    assert main(["build", "--model", str(bf16), "--tasks", str(d / "tasks.jsonl"), "--out", str(tmp_path / "o1"),
                 "--format", "pte"]) == 2
    assert "--dtype" in capsys.readouterr().err
    # a saved logits program has no KV cache to keep
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),))
    torch.export.save(ep, str(tmp_path / "model.pt2"))
    with pytest.raises(BuildError, match=r"the pte format exports a decode step .* not a \.pt2 file"):
        build(str(tmp_path / "model.pt2"), d / "tasks.jsonl", tmp_path / "o2", formats=("pte",))
    with pytest.raises(ifp.ProgramError, match="not a decode-step program"):
        lower_to_pte(ep)
    # a weightless program (streamed from a checkpoint) cannot be embedded without reading it
    with pytest.raises(PteError, match="weightless"):
        write_pte(ifp.export_checkpoint(d / "ckpt"), tmp_path / "w.pte")
    assert not list(tmp_path.glob("*.pte*"))
    with pytest.raises(PteError, match="does not exist"):
        PteDecoder(tmp_path / "missing.pte", max_cache_len=CACHE)
    with pytest.raises(BuildError, match="--max-cache-len must be an integer >= 2"):
        build(str(d / "ckpt"), d / "tasks.jsonl", tmp_path / "o3", formats=("pte",), max_cache_len=1)


def test_float16_pte_decodes_what_the_float16_torch_program_decodes(project, tmp_path):
    """float16 is the half precision XNNPACK delegates: the .pte's prefill logits agree with
    the float16 torch program's within float16 rounding, and its greedy tokens are the same."""
    _, _, masks = project
    model = tiny_llama(torch.float16)
    small = ifp.specialize(export_decode_step(model, CACHE), mask=[m.to(torch.float16) for m in masks])
    assert {p.dtype for p in small.state_dict.values()} == {torch.float16}
    path = tmp_path / "fp16.pte"
    write_pte(small, path)
    decoder = PteDecoder(path, max_cache_len=CACHE)
    prompt = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        ref = small.module()(prompt, torch.arange(5))
    got = decoder._step(prompt, 0)
    assert got.dtype == torch.float16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=2e-2)
    want, _ = StepDecoder(small).greedy(prompt, 8)
    assert decoder.greedy(prompt, 8)[0] == want

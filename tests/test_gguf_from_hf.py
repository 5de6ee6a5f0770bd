"""Task GGUFs written from Hugging Face checkpoints (``build --format gguf --gguf-type``):
llama.cpp loads them and decodes what ``ifp.specialize`` of the same masks computes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import ifp_compile as ifp

pytest.importorskip("xllamacpp")
gguf = pytest.importorskip("gguf")
from ifp_compile.build import BuildError, build  # noqa: E402
from ifp_compile.gguf_task import GGUFError  # noqa: E402
from ifp_compile.gguf_from_hf import GGUFSourceError, pre_tokenizer_name, write_hf_task_gguf  # noqa: E402
from ifp_compile.llamacpp import LlamaCpp, top1_agreement  # noqa: E402

WIDTH = 128


def bpe_tokenizer():
    """A byte-level BPE tokenizer (GPT-2's kind) trained on a few lines. Its alphabet is the
    128 ASCII bytes: every token is whole UTF-8, which llama.cpp's server needs to report a
    generated token's id (a lone byte of a multi-byte character it holds back)."""
    from gguf.vocab import bytes_to_unicode
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    ascii_alphabet = [bytes_to_unicode()[b] for b in range(128)]
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<|endoftext|>"], initial_alphabet=ascii_alphabet,
                                  limit_alphabet=128)
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog; 12 + 30 = 42\n"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("llama-build"))


def make_checkpoint(family, d):
    """A tiny random ``family`` checkpoint with a BPE tokenizer in ``d``, its program and soft masks."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    common = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=WIDTH, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
                  eos_token_id=0, tie_word_embeddings=family == "llama")
    if family == "llama":  # Llama 3.x rope scaling: written as rope_freqs.weight
        model = LlamaForCausalLM(LlamaConfig(**common, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    with torch.no_grad():  # weights large enough that logits are not near ties
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.15)
    model.eval().save_pretrained(d)
    tok.save_pretrained(d)
    ep = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    g = np.random.default_rng(1)
    masks = []
    for _ in range(2):
        m = np.zeros(WIDTH, np.float32)
        m[g.permutation(WIDTH)[:WIDTH // 2]] = g.random(WIDTH // 2) + 0.5  # soft values folded into ffn_down
        masks.append(m)
    return family, d, ep, masks


def sequences(ep, n=3, length=24):
    """Teacher-forcing sequences: random prompts continued greedily by the program itself."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 150, (1, 6), generator=g)
        with torch.no_grad():
            for _ in range(length - 6):
                ids = torch.cat([ids, ep.module()(ids)[:, -1:].argmax(-1)], dim=1)
        out.append((6, ids[0].tolist()))
    return out


def test_task_gguf_from_a_checkpoint_decodes_the_specialized_program(checkpoint, tmp_path):
    family, d, ep, masks = checkpoint
    small = ifp.specialize(ep, mask=[torch.from_numpy(m) for m in masks])
    seqs = sequences(small)
    info = write_hf_task_gguf(d, masks, tmp_path / "f32.gguf", qtype="f32", task="t")
    assert info.architecture == family and info.widths == [WIDTH // 2] * 2
    r = gguf.GGUFReader(tmp_path / "f32.gguf")
    assert int(r.fields[f"{family}.feed_forward_length"].contents()) == WIDTH // 2
    assert r.fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert ("rope_freqs.weight" in {t.name for t in r.tensors}) == (family == "llama")
    with LlamaCpp(tmp_path / "f32.gguf") as llm:
        assert top1_agreement(llm, small, seqs) == 1.0  # float32 weights: the same argmax everywhere
        ids, _ = llm.greedy(seqs[0][1][:6], 12)
    with torch.no_grad():
        want = seqs[0][1][6:18]
    assert ids == want
    # quantized: the same program up to Q8_0 rounding
    info = write_hf_task_gguf(d, masks, tmp_path / "q8.gguf", qtype="q8_0")
    assert info.tensor_types["Q8_0"] >= 7 * 2 and (tmp_path / "q8.gguf").stat().st_size < 0.4 * (tmp_path / "f32.gguf").stat().st_size
    with LlamaCpp(tmp_path / "q8.gguf") as llm:
        assert top1_agreement(llm, small, seqs) >= 0.9


def test_build_writes_gguf_from_a_checkpoint_and_names_bad_input(llama_checkpoint, tmp_path):
    family, d, ep, masks = llama_checkpoint
    from safetensors.numpy import save_file

    save_file({f"ffn.{i}": m for i, m in enumerate(masks)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"name": "a", "mask": "m.safetensors"}) + "\n")
    build(str(d), tmp_path / "tasks.jsonl", tmp_path / "out", formats=("gguf",), gguf_type="q8_0")
    manifest = json.loads((tmp_path / "out" / "tasks" / "a" / "manifest.json").read_text())
    assert manifest["inputs"]["gguf_type"] == "q8_0" and manifest["gguf_tensor_types"]["Q8_0"] >= 14
    a = (tmp_path / "out" / "tasks" / "a" / "model.gguf").read_bytes()
    write_hf_task_gguf(d, masks, tmp_path / "again.gguf", qtype="q8_0", task="a")
    assert (tmp_path / "again.gguf").read_bytes() == a  # deterministic
    with pytest.raises(BuildError, match="needs --gguf-type"):
        build(str(d), tmp_path / "tasks.jsonl", tmp_path / "o1", formats=("gguf",))
    # per-layer widths, a wrong width: named before anything is written
    save_file({"ffn.0": masks[0], "ffn.1": np.ones(WIDTH, np.float32)}, str(tmp_path / "m.safetensors"))
    report = build(str(d), tmp_path / "tasks.jsonl", tmp_path / "o2", formats=("gguf",), gguf_type="q8_0")
    assert report.built == [] and "per-layer FFN widths" in report.failed["a"]
    assert not (tmp_path / "o2" / "tasks" / "a").exists()
    with pytest.raises(GGUFError, match=r"mask 0 has shape \(3,\)"):
        write_hf_task_gguf(d, [np.ones(3), masks[1]], tmp_path / "x.gguf")
    # an architecture, a rope scaling and a tokenizer this writer does not know
    cfg = json.loads((d / "config.json").read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in d.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(GGUFSourceError, match=r"architecture \['GPTNeoXForCausalLM'\] is not supported"):
        write_hf_task_gguf(bad, masks, tmp_path / "x.gguf")
    (bad / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(GGUFSourceError, match="rope scaling 'yarn' is not supported"):
        write_hf_task_gguf(bad, masks, tmp_path / "x.gguf")
    (bad / "config.json").write_text(json.dumps(cfg))
    t = json.loads((bad / "tokenizer.json").read_text())
    t["pre_tokenizer"] = {"type": "Whitespace"}
    (bad / "tokenizer.json").write_text(json.dumps(t))
    with pytest.raises(GGUFSourceError, match="pre-tokenizer is none this writer recognises.*--gguf-pre"):
        write_hf_task_gguf(bad, masks, tmp_path / "x.gguf")
    write_hf_task_gguf(bad, masks, tmp_path / "x.gguf", pre="default")  # named by the user: accepted
    assert not list(tmp_path.glob(".x.gguf.tmp-*"))


def test_pre_tokenizer_names():
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
                                               "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    assert pre_tokenizer_name({"pre_tokenizer": llama3}) == "llama-bpe"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}
    assert pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Metaspace"}}) is None

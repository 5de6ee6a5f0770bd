"""The converted-checkpoint cache of ``load_smollm2`` (ifp_compile.real_model), on a tiny
random Llama standing in for the GGUF conversion: what is cached is what was converted,
a damaged or unwritable cache costs only the speed-up, and a new file gets a new entry.
The real model's round trip is checked in tests/test_real_model.py."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ifp_compile import real_model  # noqa: E402


def tiny_llama_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *[f"w{i}" for i in range(61)]])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}<s> {{ m['content'] }} </s>{% endfor %}"
    return LlamaForCausalLM(cfg).eval(), tok


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file and a converter that counts its calls."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / real_model.GGUF_FILE).write_bytes(b"GGUF stand-in v1")
    monkeypatch.setattr(real_model, "smollm2_dir", lambda: str(pkg))
    monkeypatch.setenv(real_model.CACHE_ENV, str(tmp_path / "cache"))
    calls = []

    def convert(d, dtype):
        calls.append(dtype)
        model, tok = tiny_llama_and_tokenizer()
        return model.to(dtype), tok

    monkeypatch.setattr(real_model, "_load_from_gguf", convert)
    return pkg / real_model.GGUF_FILE, calls


def same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_first_load_converts_and_caches_later_loads_read_the_cache(fake_gguf):
    path, calls = fake_gguf
    m1, t1 = real_model.load_smollm2()
    assert calls == [torch.float32]
    target = real_model.cached_checkpoint_dir(str(path))
    assert (target / real_model.COMPLETE).is_file() and (target / "model.safetensors").is_file()
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    m2, t2 = real_model.load_smollm2()
    assert calls == [torch.float32]  # read from the cache, not converted again
    assert same_model(m1, m2)
    assert m2.lm_head.weight.data_ptr() == m2.model.embed_tokens.weight.data_ptr()  # still tied
    assert "quantization_config" not in (target / "config.json").read_text()
    text = "w1 w2 w60 w3"
    assert t1(text)["input_ids"] == t2(text)["input_ids"]
    chat = [{"role": "user", "content": text}]
    assert t1.apply_chat_template(chat, tokenize=False) == t2.apply_chat_template(chat, tokenize=False)
    x = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(m1(x).logits, m2(x).logits, rtol=0, atol=0)
    # half precision is cast from the cached float32, as the GGUF loader casts its float32
    mb, _ = real_model.load_smollm2(dtype="bfloat16")
    assert calls == [torch.float32]
    assert same_model(mb, m1.to(torch.bfloat16))


def test_half_precision_first_load_also_caches_float32(fake_gguf):
    path, calls = fake_gguf
    m, _ = real_model.load_smollm2(dtype=torch.float16)
    assert calls == [torch.float32] and m.dtype == torch.float16
    m32, _ = real_model.load_smollm2()
    assert calls == [torch.float32] and m32.dtype == torch.float32
    assert same_model(m, m32.to(torch.float16))


def test_cache_false_converts_and_writes_nothing(fake_gguf, tmp_path):
    _, calls = fake_gguf
    real_model.load_smollm2(cache=False)
    real_model.load_smollm2(cache=False)
    assert calls == [torch.float32, torch.float32]
    assert not (tmp_path / "cache").exists()


def test_a_damaged_cache_is_removed_and_the_model_converted_again(fake_gguf):
    path, calls = fake_gguf
    real_model.load_smollm2()
    target = real_model.cached_checkpoint_dir(str(path))
    (target / "model.safetensors").write_bytes(b"truncated")
    with pytest.warns(UserWarning, match=r"could not be loaded .*removed it, loading from the GGUF file"):
        model, _ = real_model.load_smollm2()
    assert calls == [torch.float32, torch.float32] and isinstance(model, torch.nn.Module)
    assert not target.exists()
    real_model.load_smollm2()  # the next load caches it again
    assert (target / real_model.COMPLETE).is_file()


def test_an_unwritable_cache_warns_and_still_loads(fake_gguf, tmp_path, monkeypatch):
    """A cache under a file cannot be created, whoever runs the test (root ignores modes)."""
    _, calls = fake_gguf
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv(real_model.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.warns(UserWarning, match=f"could not cache .* set {real_model.CACHE_ENV}"):
        model, _ = real_model.load_smollm2(dtype="float16")
    assert calls == [torch.float32, torch.float16] and model.dtype == torch.float16


def test_another_file_gets_another_cache_entry(fake_gguf):
    path, _ = fake_gguf
    first = real_model.cached_checkpoint_dir(str(path))
    path.write_bytes(b"GGUF stand-in v2")
    second = real_model.cached_checkpoint_dir(str(path))
    assert second != first and second.parent == first.parent


def test_prepare_converts_once_and_returns_the_cache_directory(fake_gguf):
    path, calls = fake_gguf
    target = real_model.prepare_smollm2()
    assert target == real_model.cached_checkpoint_dir(str(path)) and (target / real_model.COMPLETE).is_file()
    assert real_model.prepare_smollm2() == target
    assert calls == [torch.float32]

"""Tiny random-init models for tests: one per architecture family discovery must handle.

Every model is built from a ``transformers`` config (no hub access) or written by
hand, with widths small enough that export takes well under a second.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128


def _hf(name: str, hidden=32, inter=64, layers=2, heads=4, kv_heads=2, **extra):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64)
    if name == "llama":
        cfg = tf.LlamaConfig(**common, **extra)
        cls = tf.LlamaForCausalLM
    elif name == "qwen2":
        cfg = tf.Qwen2Config(**common, **extra)
        cls = tf.Qwen2ForCausalLM
    elif name == "mistral":
        cfg = tf.MistralConfig(**common, sliding_window=None, **extra)
        cls = tf.MistralForCausalLM
    elif name == "gemma":
        cfg = tf.GemmaConfig(**common, head_dim=hidden // heads, hidden_activation="gelu_pytorch_tanh", **extra)
        cls = tf.GemmaForCausalLM
    elif name == "phi3":
        cfg = tf.Phi3Config(**common, pad_token_id=0, **extra)
        cls = tf.Phi3ForCausalLM
    elif name.startswith("gpt2"):
        act = "gelu" if name == "gpt2-gelu" else "gelu_new"
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=hidden, n_inner=inter, n_layer=layers, n_head=heads,
                            n_positions=64, activation_function=act, **extra)
        cls = tf.GPT2LMHeadModel
    else:
        raise KeyError(name)
    cfg._attn_implementation = "sdpa"
    return cls(cfg).eval()


class HandMLP(nn.Module):
    """A hand-written residual MLP stack over float inputs (no transformers)."""

    def __init__(self, d=16, widths=(32, 24), bias=True, act="relu"):
        super().__init__()
        self.ups = nn.ModuleList(nn.Linear(d, w, bias=bias) for w in widths)
        self.downs = nn.ModuleList(nn.Linear(w, d, bias=bias) for w in widths)
        self.act = {"relu": torch.relu, "gelu": nn.functional.gelu, "silu": nn.functional.silu}[act]

    def forward(self, x):
        for up, down in zip(self.ups, self.downs):
            x = x + down(self.act(up(x)))
        return x


class HandGLU(nn.Module):
    """Hand-written gated FFN with ``up * act(gate)`` (operand order reversed vs Llama)."""

    def __init__(self, d=16, w=32):
        super().__init__()
        self.gate = nn.Linear(d, w, bias=False)
        self.up = nn.Linear(d, w, bias=False)
        self.down = nn.Linear(w, d, bias=False)

    def forward(self, x):
        return x + self.down(self.up(x) * nn.functional.gelu(self.gate(x), approximate="tanh"))


HF_FAMILIES = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt2-gelu"]


def hf_model(name: str, seed: int = 0, **kw) -> nn.Module:
    torch.manual_seed(seed)
    return _hf(name, **kw)


class TinyAttention(nn.Module):
    """Causal self-attention with grouped-query heads (n_kv divides n_heads)."""

    def __init__(self, d, n_heads, n_kv, bias):
        super().__init__()
        self.h, self.kv, self.hd = n_heads, n_kv, d // n_heads
        self.q = nn.Linear(d, n_heads * self.hd, bias=bias)
        self.k = nn.Linear(d, n_kv * self.hd, bias=bias)
        self.v = nn.Linear(d, n_kv * self.hd, bias=bias)
        self.o = nn.Linear(n_heads * self.hd, d, bias=bias)

    def forward(self, x):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.hd).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.hd).transpose(1, 2)
        rep = self.h // self.kv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class TinyFFN(nn.Module):
    def __init__(self, d, w, gated, act, bias, swap):
        super().__init__()
        self.gated, self.swap = gated, swap
        self.act = {
            "relu": torch.relu,
            "silu": nn.functional.silu,
            "gelu": nn.functional.gelu,
            "gelu_tanh": lambda x: nn.functional.gelu(x, approximate="tanh"),
            "gelu_new": lambda x: 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * (x + 0.044715 * x.pow(3)))),
        }[act]
        self.up = nn.Linear(d, w, bias=bias)
        if gated:
            self.gate = nn.Linear(d, w, bias=bias)
        self.down = nn.Linear(w, d, bias=bias)

    def forward(self, x):
        if not self.gated:
            return self.down(self.act(self.up(x)))
        g, u = self.act(self.gate(x)), self.up(x)
        return self.down(u * g if self.swap else g * u)


class TinyLM(nn.Module):
    """A configurable decoder LM: per-layer FFN widths, gated or not, any activation, biases, GQA."""

    def __init__(self, d=16, widths=(32, 24), gated=True, act="silu", bias=False, n_heads=4, n_kv=2, swap=False):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.attn = nn.ModuleList(TinyAttention(d, n_heads, n_kv, bias) for _ in widths)
        self.ffn = nn.ModuleList(TinyFFN(d, w, gated, act, bias, swap) for w in widths)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=False)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for attn, ffn in zip(self.attn, self.ffn):
            x = x + attn(x)
            x = x + ffn(self.norm(x))
        return self.head(x)

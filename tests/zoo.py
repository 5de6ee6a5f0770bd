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

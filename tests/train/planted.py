"""A tiny Llama whose FFN channels are task-specific by construction.

Vocabulary: 16 tokens, two "domains" of 8 (A: ids 0-7, B: ids 8-15). Next-token rules:
A steps +1 around its 8 tokens, B steps +3 around its 8. The model is written by hand:

- the embedding puts token t on residual dim t (one-hot, scaled);
- attention writes nothing (``o_proj = 0``);
- FFN channel c fires only for token c (gate and up read dim c) and writes the residual
  dim ``16 + next(c)``; the LM head reads dims 16-31.

So predicting a domain-A token's successor needs exactly channel t, and every channel
of A is used by A text and never by B text: domain A needs channels 0-7, B needs 8-15.
With one of its channels dropped, a token's prediction becomes uniform (loss ln 16).
Tokens are written as characters ``chr(64 + id)`` so that ``ByteTokenizer(16)`` (bytes
mod 16) reads them back as ids.
"""

from __future__ import annotations

import random

import torch

V = 16
HALF = 8
PLANTED = {"A": set(range(HALF)), "B": set(range(HALF, V))}


def successor(t: int) -> int:
    return (t + 1) % HALF if t < HALF else HALF + (t - HALF + 3) % HALF


def planted_model():
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=2 * V, intermediate_size=V, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    model = tf.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.embed_tokens.weight[:, :V] = 8.0 * torch.eye(V)
        layer = model.model.layers[0]
        layer.input_layernorm.weight.fill_(1.0)
        layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        layer.mlp.gate_proj.weight[:, :V] = torch.eye(V)
        layer.mlp.up_proj.weight[:, :V] = torch.eye(V)
        for c in range(V):
            layer.mlp.down_proj.weight[V + successor(c), c] = 1.0
        model.lm_head.weight[:, V:] = 2.0 * torch.eye(V)
    return model


def text(domain: str, n: int, rng: random.Random) -> str:
    t = rng.randrange(HALF) + (0 if domain == "A" else HALF)
    out = []
    for _ in range(n):
        out.append(chr(64 + t))
        t = successor(t)
    return "".join(out)


def texts(domain: str, count: int, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [text(domain, n, rng) for _ in range(count)]

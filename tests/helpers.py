"""Shared test helpers: exporting tiny models and drawing masks."""

from __future__ import annotations

import os

import torch
from hypothesis import strategies as st

import ifp_compile as ifp
from tests.zoo import TinyLM


#: the thorough profile (IFP_HYPOTHESIS_PROFILE=thorough) also runs the breadth the ci
#: profile leaves out: more families, dtypes and formats of the same property
THOROUGH = os.environ.get("IFP_HYPOTHESIS_PROFILE", "ci") == "thorough"


def breadth(ci: list, more: list) -> list:
    """Parameters of a test: ``ci`` always, ``more`` only in the thorough profile."""
    return list(ci) + (list(more) if THOROUGH else [])


def examples(ci: int) -> int:
    """``max_examples`` for a costly property: ``ci`` in the ci profile, the profile's own otherwise."""
    from hypothesis import settings

    return settings().max_examples if THOROUGH else min(ci, settings().max_examples)


def export_lm(model, batch=2, seq=7, dynamic=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (batch, seq), generator=g)
    ep = ifp.export(model, (ids,), dynamic_shapes="seq" if dynamic else None)
    return ep, ids


def write_build_project(d, masks: dict, tasks: dict):
    """A build's inputs in ``d``: a tiny Llama saved as ``model.pt2``, one ``<name>.safetensors``
    per entry of ``masks`` (``ffn.<i>`` arrays) and ``tasks.jsonl`` naming each task's mask file.
    Returns the exported program and its example ids."""
    import json

    from safetensors.numpy import save_file

    from tests.zoo import hf_model

    ep, ids = export_lm(hf_model("llama"), dynamic=True)
    torch.export.save(ep, str(d / "model.pt2"))
    for name, m in masks.items():
        save_file({f"ffn.{i}": a for i, a in enumerate(m)}, str(d / f"{name}.safetensors"))
    (d / "tasks.jsonl").write_text("".join(json.dumps({"name": t, "mask": f"{m}.safetensors"}) + "\n"
                                           for t, m in tasks.items()))
    return ep, ids


def make_mask(width: int, kind: str, g: torch.Generator) -> torch.Tensor:
    """Masks of every shape the compiler must handle."""
    if kind == "all":
        return torch.ones(width)
    if kind == "none":
        return torch.zeros(width)
    if kind == "one":
        m = torch.zeros(width)
        m[torch.randint(0, width, (1,), generator=g)] = 1.0
        return m
    keep = torch.rand(width, generator=g) < torch.rand(1, generator=g)
    if kind == "binary":
        return keep.float()
    if kind == "soft":  # lambda * TopK(lambda): positive values on kept channels
        return keep.float() * (torch.rand(width, generator=g) * 2 + 0.05)
    raise KeyError(kind)


def state_placeholder_shapes(ep):
    """(meta shape, tensor shape) for every parameter/buffer/constant placeholder."""
    specs = {s.arg.name: s for s in ep.graph_signature.input_specs}
    out = {}
    for n in ep.graph.nodes:
        if n.op == "placeholder" and specs[n.name].target is not None:
            t = ep.state_dict.get(specs[n.name].target, ep.constants.get(specs[n.name].target))
            out[specs[n.name].target] = (tuple(n.meta["val"].shape), tuple(t.shape))
    return out


@st.composite
def tiny_lms(draw):
    n_layers = draw(st.integers(1, 4))
    n_kv = draw(st.sampled_from([1, 2]))
    n_heads = n_kv * draw(st.sampled_from([1, 2]))
    d = n_heads * draw(st.sampled_from([2, 4]))
    widths = tuple(draw(st.lists(st.integers(1, 24), min_size=n_layers, max_size=n_layers)))
    kw = dict(
        d=d,
        widths=widths,
        gated=draw(st.booleans()),
        act=draw(st.sampled_from(["relu", "silu", "gelu", "gelu_tanh", "gelu_new"])),
        bias=draw(st.booleans()),
        n_heads=n_heads,
        n_kv=n_kv,
        swap=draw(st.booleans()),
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return TinyLM(**kw).eval(), kw


#: unit roundoff of the half-precision dtypes (half an ulp at 1.0)
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24}


def assert_within_rounding(out, ref, exact, dtype, factor: float = 3.0):
    """``out`` (specialized) is as close to ``ref`` (masked reference, same dtype) as ``ref``
    is to ``exact`` (the masked reference computed in float32 with the same weights).

    The bound derived in docs/architecture.md ("Precision"): specialization moves one
    rounding per kept channel (the fold ``round(W m)`` instead of ``round(h round(m))``) and
    reorders the down projection's float32 sum; every other op is the same op on the same
    values. So its error is of the order of the reference's own rounding error, never
    larger than ``factor`` times it (3: the fold's one rounding against the reference's two,
    plus the reference's error itself), with a floor of one unit roundoff of the output
    scale for outputs the reference happens to compute exactly.
    """
    out, ref, exact = out.float(), ref.float(), exact.float()
    u = UNIT_ROUNDOFF[dtype]
    scale = exact.abs().max().item()
    ref_err = (ref - exact).abs().max().item()
    bound = factor * max(ref_err, u * scale)
    diff = (out - ref).abs().max().item()
    assert diff <= bound, (f"{dtype}: specialized differs from the masked reference by {diff:.3g}, bound {bound:.3g} "
                           f"(reference's own rounding error {ref_err:.3g}, output scale {scale:.3g})")
    return diff, bound


def cast_model(model, dtype):
    """A copy of ``model`` with its floating parameters in ``dtype``. (Through ``p.data``:
    transformers refuses ``.to()`` / ``.float()`` on a model loaded from a quantized GGUF.)"""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            if p.is_floating_point():
                p.data = p.data.to(dtype)
    return out


"""ONNX-level discovery and specialisation: onnxruntime on the specialised ONNX equals the
torch specialised program, discovery agrees with the aten pass, the input is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ifp_compile as ifp
from tests.helpers import breadth, examples, export_lm, make_mask, tiny_lms
from tests.zoo import HF_FAMILIES, hf_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from ifp_compile.onnx import export_onnx, find_onnx_ffn_blocks, initializer_count, specialize_onnx  # noqa: E402

MASK_KINDS = ["all", "none", "one", "binary", "soft"]


def run_onnx(proto, ids):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {"input_ids": ids.numpy()})[0])


def check_onnx_equivalence(ep, base, ids, masks):
    before = base.SerializeToString()
    small = specialize_onnx(base, masks)
    assert base.SerializeToString() == before, "the caller's model was modified"
    onnx.checker.check_model(small, full_check=True)
    onnx.shape_inference.infer_shapes(small, check_type=True, strict_mode=True)
    assert [i.name for i in small.graph.input] == ["input_ids"]
    assert not any(n.op_type == "Gather" and "ffn" in "".join(n.input) for n in small.graph.node)
    expected = ifp.specialize(ifp.insert_masks(ep), mask=masks)
    with torch.no_grad():
        ref = expected.module()(ids)
    # onnxruntime's and torch's CPU kernels accumulate in different orders (which also
    # differs between CPUs): the absolute tolerance follows the logits' scale
    torch.testing.assert_close(run_onnx(small, ids), ref, rtol=1e-5, atol=2e-5 * max(1.0, float(ref.abs().max())))
    # exact count: each dropped channel removes params_per_channel scalars, nothing else changes
    blocks = find_onnx_ffn_blocks(base)
    removed = sum((b.width - int((m != 0).sum())) * b.params_per_channel() for b, m in zip(blocks, masks))
    assert initializer_count(small) == initializer_count(base) - removed
    return small


@settings(max_examples=examples(8))
@given(model=tiny_lms(), kinds=st.lists(st.sampled_from(MASK_KINDS), min_size=4, max_size=4),
       masked=st.booleans(), seed=st.integers(0, 2**16))
def test_onnx_specialized_equals_torch_specialized_random_architectures(model, kinds, masked, seed):
    lm, kw = model
    ep, ids = export_lm(lm, batch=2, seq=5, seed=seed, dynamic=True)
    base = export_onnx(ifp.insert_masks(ep) if masked else ep)
    blocks = find_onnx_ffn_blocks(base)
    assert [b.width for b in blocks] == list(kw["widths"])
    g = torch.Generator().manual_seed(seed)
    masks = [make_mask(b.width, kinds[i % len(kinds)], g) for i, b in enumerate(blocks)]
    check_onnx_equivalence(ep, base, ids, masks)


def with_random_biases(model):
    """HF initialises biases to zero, and the ONNX exporter folds zero biases away."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_()
    return model


#: the structurally distinct families (GQA SwiGLU, GeGLU, fused gate_up, Conv1D) in ci; the
#: others repeat one of them and run in the thorough profile
DISTINCT = ["llama", "gemma", "phi3", "gpt2"]
FAMILIES = breadth(DISTINCT, [f for f in HF_FAMILIES if f not in DISTINCT])


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_discovery_agrees_with_aten_discovery(family):
    ep, ids = export_lm(with_random_biases(hf_model(family)), dynamic=True)
    torch_blocks = ifp.find_ffn_blocks(ep)
    for program in (ep, ifp.insert_masks(ep)):
        onnx_blocks = find_onnx_ffn_blocks(export_onnx(program))
        assert [(b.width, b.gated, b.fused_gate_up) for b in onnx_blocks] == [
            (b.width, b.gated, b.fused_gate_up) for b in torch_blocks
        ]
        assert [b.params_per_channel() for b in onnx_blocks] == [b.params_per_channel() for b in torch_blocks]
        assert all(b.mask_input is not None for b in onnx_blocks) == (program is not ep)


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_specialized_equals_torch_specialized_hf_families(family):
    ep, ids = export_lm(with_random_biases(hf_model(family)), dynamic=True)
    base = export_onnx(ifp.insert_masks(ep))
    g = torch.Generator().manual_seed(3)
    blocks = ifp.find_ffn_blocks(ep)
    masks = [make_mask(b.width, kind, g) for b, kind in zip(blocks, ["soft", "none"])]
    small = check_onnx_equivalence(ep, base, ids, masks)
    longer = torch.randint(0, 128, (2, 11))  # the sequence axis stays dynamic
    with torch.no_grad():
        ref = ifp.specialize(ep, mask=masks).module()(longer)
    torch.testing.assert_close(run_onnx(small, longer), ref, rtol=1e-5, atol=2e-5)


def test_plain_hf_onnx_export_without_ifp_compile():
    """A team that only has ``torch.onnx.export`` of a Hugging Face model can specialise it."""
    lm = hf_model("qwen2")
    ids = torch.randint(0, 128, (1, 6))

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            return self.m(input_ids=input_ids, use_cache=False).logits

    proto = torch.onnx.export(Logits(lm).eval(), (ids,), dynamo=True, input_names=["input_ids"],
                              dynamic_shapes=({1: torch.export.Dim("seq", min=2, max=64)},), verbose=False).model_proto
    blocks = find_onnx_ffn_blocks(proto)
    assert [b.width for b in blocks] == [64, 64]
    masks = [torch.tensor([1.0, 0.5] * 32), torch.zeros(64)]
    small = specialize_onnx(proto, masks)
    onnx.checker.check_model(small, full_check=True)
    ep = ifp.export(lm, (ids,))
    with torch.no_grad():
        ref = ifp.specialize(ep, mask=masks).module()(ids)
    torch.testing.assert_close(run_onnx(small, ids), ref, rtol=1e-5, atol=2e-5)


def test_onnx_ir_model_in_ir_model_out():
    import onnx_ir as ir

    ep, _ = export_lm(hf_model("llama"))
    model = ir.from_proto(export_onnx(ep))
    out = specialize_onnx(model, [torch.ones(64), np.ones(64, dtype=np.float32)])
    assert isinstance(out, ir.Model) and out is not model


def test_no_ffn_in_onnx_names_the_patterns():
    class Attn(torch.nn.Module):
        def forward(self, x):
            return torch.softmax(x @ x.transpose(-1, -2), -1) @ x

    proto = torch.onnx.export(Attn(), (torch.randn(1, 3, 4),), dynamo=True, verbose=False).model_proto
    with pytest.raises(ifp.NoFFNFoundError, match="Patterns tried: MatMul/Gemm"):
        find_onnx_ffn_blocks(proto)


def test_bad_masks_for_onnx():
    ep, _ = export_lm(hf_model("llama"))
    base = export_onnx(ep)
    with pytest.raises(ifp.MaskError, match="got 1 masks for 2 FFN blocks"):
        specialize_onnx(base, [torch.ones(64)])
    with pytest.raises(ifp.MaskError, match=r"block 1 \(ffn.1\) has shape \(63,\), expected \(64,\)"):
        specialize_onnx(base, [torch.ones(64), torch.ones(63)])
    with pytest.raises(ifp.ProgramError, match="expected an onnx.ModelProto"):
        specialize_onnx("model.onnx", [torch.ones(64)] * 2)


@pytest.mark.parametrize("dtype,masked", breadth([(torch.float16, True), (torch.bfloat16, False)],
                                                 [(torch.float16, False), (torch.bfloat16, True)]))
def test_half_precision_onnx_holds_the_torch_slices_and_runs(dtype, masked):
    """bf16/fp16 initializers are sliced (and soft values folded) exactly as the torch pass
    does; the fp16 task runs in onnxruntime. onnxruntime's CPU provider has no bf16
    kernels for MatMul, Mul, Add, Sigmoid or Softmax, so the bf16 task runs in the ONNX
    reference evaluator (``onnx.reference``)."""
    import copy

    import onnx_ir as ir
    from onnx.reference import ReferenceEvaluator

    from tests.helpers import assert_within_rounding

    lm = hf_model("llama").to(dtype)
    ep, ids = export_lm(lm, dynamic=True)
    exact_ep, _ = export_lm(copy.deepcopy(lm).float(), dynamic=True)
    base = export_onnx(ifp.insert_masks(ep) if masked else ep)
    blocks = find_onnx_ffn_blocks(base)
    g = torch.Generator().manual_seed(9)
    masks = [make_mask(b.width, k, g) for b, k in zip(blocks, ["soft", "binary"])]
    small = specialize_onnx(base, masks)
    onnx.checker.check_model(small, full_check=True)
    program = ifp.specialize(ep, mask=masks)
    inits = {name: v.const_value.numpy() for name, v in ir.from_proto(small).graph.initializers.items()}
    for b in ifp.find_ffn_blocks(ep):
        for p in b.params:
            onnx_name = next(n for n in inits if n.startswith(p.key) and "_ifp_ffn" in n)
            theirs = torch.from_numpy(inits[onnx_name].view(np.int16 if dtype == torch.bfloat16 else np.float16).copy())
            ours = program.state_dict[p.key]
            assert torch.equal(theirs.view(dtype), ours), p.key
    if dtype == torch.float16:
        out = run_onnx(small, ids)
    else:
        (raw,) = ReferenceEvaluator(small).run(None, {"input_ids": ids.numpy()})
        out = torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16)
    with torch.no_grad():
        ref = program.module()(ids)
        exact = ifp.insert_masks(exact_ep).module()(ids, masks)
    assert out.dtype == dtype
    assert_within_rounding(out, ref, exact, dtype)

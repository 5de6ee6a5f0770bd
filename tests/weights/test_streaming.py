"""Weight streaming: a checkpoint captured without its weights compiles to the same bytes.

``export_checkpoint`` reads no weight; discovery, ``insert_masks`` and ``specialize`` work
on the weightless program; ``save`` reads each source tensor once, slices it with the
function the in-RAM pass uses, and writes it. So the streamed artifact is bit for bit the
in-RAM one, for binary and soft masks, in every dtype.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import ifp_compile as ifp
from ifp_compile.weights.checkpoint import Checkpoint
from tests.helpers import assert_within_rounding, breadth, make_mask
from tests.zoo import VOCAB, hf_model

#: (family, dtype, shard size): sharded and single-file checkpoints, tied and untied heads
CASES = breadth([("llama", torch.bfloat16, "12KB"), ("gpt2", torch.float32, None)],
                [("gemma", torch.bfloat16, None), ("qwen2", torch.float16, "20KB")])


def save_checkpoint(directory, family, dtype, shard=None, **kw):
    """A tiny random model saved as a Hugging Face directory; returns it as loaded back in memory."""
    from transformers import AutoModelForCausalLM

    model = hf_model(family, **kw).to(dtype)
    model.save_pretrained(directory, **({"max_shard_size": shard} if shard else {}))
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


class ReadCounter:
    def __init__(self, monkeypatch):
        self.names: list[str] = []
        real = Checkpoint.read

        def read(ckpt, name, out=None):
            self.names.append(name)
            return real(ckpt, name, out)

        monkeypatch.setattr(Checkpoint, "read", read)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-{str(c[1])[6:]}")
def case(request, tmp_path_factory):
    family, dtype, shard = request.param
    d = tmp_path_factory.mktemp(family)
    model = save_checkpoint(d, family, dtype, shard)
    in_ram = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    return d, model, in_ram, dtype


def test_capture_and_passes_read_no_weight(case, monkeypatch):
    d, _, in_ram, dtype = case
    reads = ReadCounter(monkeypatch)
    ep = ifp.export_checkpoint(d)
    assert ifp.is_weightless(ep)
    assert all(t.device.type == "meta" for t in ep.state_dict.values() if isinstance(t, torch.nn.Parameter))
    blocks = ifp.find_ffn_blocks(ep)
    assert [b.describe() for b in blocks] == [b.describe() for b in ifp.find_ffn_blocks(in_ram)]
    assert [a.describe() for a in ifp.find_attention_blocks(ep)] == [a.describe() for a in ifp.find_attention_blocks(in_ram)]
    masked = ifp.insert_masks(ep)
    g = torch.Generator().manual_seed(0)
    masks = [make_mask(b.width, "soft", g) for b in blocks]
    small = ifp.specialize(masked, mask=masks)
    assert ifp.is_weightless(small) and reads.names == []
    assert ifp.count_parameters(small) == ifp.kept_parameters(masked, blocks, masks)
    assert ifp.count_parameters(ep) == ifp.count_parameters(in_ram)
    from ifp_compile.passes.layer_probe import find_layer_boundaries

    assert find_layer_boundaries(ep) == find_layer_boundaries(in_ram)  # structural: no values needed
    assert reads.names == []


def test_a_probe_runs_layer_by_layer_from_the_checkpoint(case):
    """Layer probes need values: the streaming interpreter reads them node by node."""
    from ifp_compile.passes.layer_probe import layer_probe
    from ifp_compile.weights import stream

    d, _, in_ram, _ = case
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    got = stream.run(layer_probe(ifp.export_checkpoint(d))[0], ids)
    with torch.no_grad():
        want = layer_probe(in_ram)[0](ids)
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.parametrize("kind", ["binary", "soft"])
def test_streamed_artifact_is_the_in_ram_artifact(case, kind, tmp_path, monkeypatch):
    d, _, in_ram, dtype = case
    ep = ifp.export_checkpoint(d)
    blocks = ifp.find_ffn_blocks(ep)
    g = torch.Generator().manual_seed(1)
    masks = [make_mask(b.width, kind, g) for b in blocks]
    streamed = ifp.specialize(ifp.insert_masks(ep), mask=masks)
    reference = ifp.specialize(ifp.insert_masks(in_ram), mask=masks)
    assert ifp.count_parameters(streamed) == ifp.count_parameters(reference)
    reads = ReadCounter(monkeypatch)
    ifp.save(streamed, tmp_path / "streamed")
    # every source tensor is read once (a tied embedding and LM head: once for both)
    assert sorted(reads.names) == sorted(set(reads.names))
    ifp.save(reference, tmp_path / "in_ram")
    for name in ("program.pt2", "program.safetensors", "manifest.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "in_ram" / name).read_bytes(), name
    loaded = ifp.load(tmp_path / "streamed")
    ids = torch.randint(0, VOCAB, (1, 11), generator=g)
    with torch.no_grad():
        assert torch.equal(loaded.module()(ids), reference.module()(ids))
        assert torch.equal(ifp.materialize(streamed).module()(ids), reference.module()(ids))


def test_dtype_of_the_program_can_differ_from_the_checkpoints(tmp_path):
    from transformers import AutoModelForCausalLM

    save_checkpoint(tmp_path, "llama", torch.bfloat16)
    ep = ifp.export_checkpoint(tmp_path, dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert torch.equal(ifp.materialize(ep).module()(ids), ref(ids).logits)
    assert {t.dtype for t in ifp.materialize(ep).state_dict.values()} == {torch.float32}



def test_predictors_run_layer_by_layer_from_the_checkpoint(tmp_path, monkeypatch):
    """The prompt-activation probe and an IFPredictor over the target's first layer, on a
    weightless program: the same masks and the same specialised weights as in memory, each
    weight read from the checkpoint only while its operation runs (once per prediction)."""
    from ifp_compile.capture import build_skeleton
    from ifp_compile.predictors import IFPredictor, LMEncoder, PromptActivationPredictor

    model = save_checkpoint(tmp_path, "llama", torch.bfloat16, inter=48, layers=3)
    ep = ifp.export_checkpoint(tmp_path)
    in_ram = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    instr = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
    reads = ReadCounter(monkeypatch)
    streamed, loaded = PromptActivationPredictor(ep, keep=0.5), PromptActivationPredictor(in_ram, keep=0.5)
    assert reads.names == []
    with torch.no_grad():
        got, want = streamed(instr), loaded(instr)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert sorted(reads.names) == sorted(set(reads.names))  # each weight the probe needs, once
    assert "lm_head.weight" not in reads.names  # the probe stops at the last FFN
    small = ifp.specialize(ifp.insert_masks(ep, predictor=streamed), instr)
    ref = ifp.specialize(ifp.insert_masks(in_ram, predictor=loaded), instr)
    small = ifp.materialize(small)
    assert small.state_dict.keys() == ref.state_dict.keys()
    assert all(torch.equal(small.state_dict[k], ref.state_dict[k]) for k in ref.state_dict)

    skeleton, _, _ = build_skeleton(tmp_path)
    widths = [b.width for b in ifp.find_ffn_blocks(ep)]
    torch.manual_seed(0)
    pred_w = IFPredictor(LMEncoder(skeleton, num_layers=1), widths, keep=0.5)
    pred_r = IFPredictor(LMEncoder(model, num_layers=1), widths, keep=0.5)
    with torch.no_grad():
        for p in pred_w.head.parameters():
            p.normal_(0, 0.5)
        pred_r.head.load_state_dict(pred_w.head.state_dict())
    prog = ifp.insert_masks(ep, predictor=pred_w)
    assert ifp.is_weightless(prog) and not any(lazy is None for lazy in [
        getattr(t, "_ifp_lazy", None) for t in prog.state_dict.values() if t.device.type == "meta"])
    small = ifp.materialize(ifp.specialize(prog, instr))
    ref = ifp.specialize(ifp.insert_masks(in_ram, predictor=pred_r), instr)
    assert all(torch.equal(small.state_dict[k], ref.state_dict[k]) for k in ref.state_dict)


def test_streamed_onnx_artifact_is_the_in_ram_one_and_runs(tmp_path):
    """ONNX with external data: the weightless program's artifact has the in-RAM one's bytes,
    and onnxruntime runs it (fp16: its CPU provider has no bf16 kernels)."""
    ort = pytest.importorskip("onnxruntime")
    model = save_checkpoint(tmp_path / "ckpt", "llama", torch.float16)
    ep = ifp.export_checkpoint(tmp_path / "ckpt")
    in_ram = ifp.export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    g = torch.Generator().manual_seed(4)
    masks = [make_mask(b.width, k, g) for b, k in zip(ifp.find_ffn_blocks(ep), ["soft", "binary"])]
    ifp.save(ifp.specialize(ep, mask=masks), tmp_path / "streamed", format="onnx")
    reference = ifp.specialize(in_ram, mask=masks)
    ifp.save(reference, tmp_path / "in_ram", format="onnx")
    for name in ("model.onnx", "weights.bin", "manifest.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "in_ram" / name).read_bytes(), name
    sess = ort.InferenceSession(str(tmp_path / "streamed" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, VOCAB, (1, 9), generator=g)
    (out,) = sess.run(None, {"input_ids": ids.numpy()})
    exact = ifp.materialize(ifp.insert_masks(ifp.export_checkpoint(tmp_path / "ckpt", dtype="float32")))
    with torch.no_grad():
        ref = reference.module()(ids)
        exact_out = exact.module()(ids, [m.to(torch.float16).float() for m in masks])
    assert out.dtype == np.float16
    assert_within_rounding(torch.from_numpy(out), ref, exact_out, torch.float16)

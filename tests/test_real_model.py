"""Integration checks on the real SmolLM2-135M-Instruct (run alone: pytest -m real_model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ifp_compile as ifp

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    from ifp_compile.real_model import load_smollm2

    model, tok = load_smollm2()
    ids = tok("Write a Python function that reverses a string.", return_tensors="pt")["input_ids"]
    ep = ifp.export(model, (ids,), dynamic_shapes="seq")
    return model, tok, ep, ids


def test_cached_checkpoint_is_the_gguf_model(smollm2):
    """load_smollm2 reads SmolLM2 from its converted-checkpoint cache (seconds, not 35 s):
    the same weights, config and tokenizer as transformers' GGUF loader gives."""
    from ifp_compile.demo import DEFAULT_PROMPTS
    from ifp_compile.generate import chat_ids
    from ifp_compile.real_model import load_smollm2

    model, tok, _, _ = smollm2
    ref, ref_tok = load_smollm2(cache=False)
    a, b = model.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    skip = ("_name_or_path", "quantization_config", "transformers_version")
    assert {k: v for k, v in model.config.to_dict().items() if k not in skip} == \
        {k: v for k, v in ref.config.to_dict().items() if k not in skip}
    for prompt in [*DEFAULT_PROMPTS.values(), "Ünïcödé, emoji 🌊 and   spaces\n\tand 12345 digits"]:
        ids = chat_ids(tok, prompt)
        assert torch.equal(ids, chat_ids(ref_tok, prompt))
        assert tok.decode(ids[0]) == ref_tok.decode(ids[0])
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == \
        (ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.pad_token_id)


def test_discovers_thirty_swiglu_blocks(smollm2):
    _, _, ep, _ = smollm2
    blocks = ifp.find_ffn_blocks(ep)
    assert len(blocks) == 30
    assert all(b.width == 1536 and b.gated and b.activation == "silu" for b in blocks)
    assert [b.name for b in blocks] == [f"lm.model.layers.{i}.mlp" for i in range(30)]
    assert all(b.shared_params == () for b in blocks)  # lm_head is tied to embed_tokens, not to an FFN


def test_specialized_equals_masked_reference_on_smollm2(smollm2):
    model, _, ep, ids = smollm2
    masked = ifp.insert_masks(ep)
    blocks = ifp.find_ffn_blocks(masked)
    g = torch.Generator().manual_seed(0)
    masks = []
    for i, b in enumerate(blocks):
        keep = torch.randperm(b.width, generator=g)[: b.width // 2]
        m = torch.zeros(b.width)
        m[keep] = torch.rand(keep.numel(), generator=g) + 0.5 if i % 2 else 1.0  # binary and soft layers
        masks.append(m)
    with torch.no_grad():
        ones = [torch.ones(b.width) for b in blocks]
        assert torch.equal(masked.module()(ids, ones), ep.module()(ids))
        ref = masked.module()(ids, masks)
        small = ifp.specialize(masked, mask=masks)
        out = small.module()(ids)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=5e-4)
    dense = ifp.count_parameters(ep)
    assert dense == 134_515_008  # embedding tied with lm_head, counted once
    assert ifp.count_parameters(small) == dense - 30 * 768 * 3 * 576


@pytest.fixture(scope="module")
def smollm2_predicted(smollm2):
    """The prompt-activation predictor at keep 0.5 and the program that carries it."""
    from ifp_compile.predictors import PromptActivationPredictor

    pred = PromptActivationPredictor(smollm2[2], keep=0.5)
    return pred, ifp.insert_masks(smollm2[2], predictor=pred)


def test_instruction_specialization_on_smollm2(smollm2, smollm2_predicted):
    model, tok, ep, ids = smollm2
    pred, prog = smollm2_predicted
    small = ifp.specialize(prog, "Solve this math word problem.", tokenizer=tok)
    masks = pred(tok("Solve this math word problem.", return_tensors="pt")["input_ids"])
    with torch.no_grad():
        ref = ifp.insert_masks(ep).module()(ids, masks)
        torch.testing.assert_close(small.module()(ids), ref, rtol=1e-4, atol=5e-4)
    assert ifp.count_parameters(small) == 134_515_008 - 30 * 768 * 3 * 576


def test_demo_on_smollm2(smollm2, capsys):
    """The README demo, shortened: one prompt, a few tokens. Its KV-cache decoding of the
    specialised decode-step program gives the masked reference's greedy tokens (re-running
    the whole sequence per token); exact kept parameter count; llama.cpp rows from the task GGUF."""
    pytest.importorskip("xllamacpp")
    from ifp_compile.demo import format_table, run_demo
    from ifp_compile.generate import chat_ids, greedy_generate
    from ifp_compile.predictors import PromptActivationPredictor

    model, tok, ep, _ = smollm2
    prompt = "What is 12 times 3?"
    result = run_demo(keep=0.75, max_new_tokens=6, prompts={"math": prompt}, model_and_tokenizer=(model, tok),
                      gguf=True)
    small, dense, small_gguf, dense_gguf = result.rows
    assert [r.task for r in result.rows] == ["math", "math (dense)", "math (GGUF)", "math (GGUF dense)"]
    assert [r.runtime for r in result.rows] == ["torch", "torch", "llama.cpp", "llama.cpp"]
    masks = PromptActivationPredictor(ep, keep=0.75)(tok(prompt, return_tensors="pt")["input_ids"])
    ids = chat_ids(tok, prompt)
    with torch.no_grad():
        ref = greedy_generate(ifp.insert_masks(ep).module(), ids, 6, tok.eos_token_id, extra=(masks,))
        ref_dense = greedy_generate(ep.module(), ids, 6, tok.eos_token_id)
    assert small.text == tok.decode(ref, skip_special_tokens=True)
    assert dense.text == tok.decode(ref_dense, skip_special_tokens=True)
    dense_params = ifp.count_parameters(ep)
    assert dense.params == dense_gguf.params == dense_params
    assert small.params == small_gguf.params == dense_params - 30 * 384 * 3 * 576  # 384 of 1536 channels dropped
    assert small.specialize_s > 0 and small_gguf.specialize_s > 0
    assert all(r.tokens_per_s > 0 and r.text.strip() for r in result.rows)
    table = format_table(result)
    assert "keep 0.75" in table and f"{small.params:,} (85.2%)" in table and "llama.cpp" in table
    # the demo's predictor reads the instruction as a prefill of the decode step: the same
    # masks as the logits program's predictor, for every default prompt
    from ifp_compile.decode_step import export_decode_step
    from ifp_compile.demo import DEFAULT_PROMPTS
    from ifp_compile.masks import instruction_ids

    by_step = PromptActivationPredictor(export_decode_step(model, 64), keep=0.75)
    by_logits = PromptActivationPredictor(ep, keep=0.75)
    for text in DEFAULT_PROMPTS.values():
        with torch.no_grad():
            a, b = by_step(instruction_ids(text, tok)), by_logits(instruction_ids(text, tok))
        assert all(torch.equal(x, y) for x, y in zip(a, b)), text


def test_build_instruction_tasks_on_smollm2(smollm2, smollm2_predicted, tmp_path):
    """`ifp-compile build` on the default model: ONNX artifacts equal the torch specialisation."""
    import json

    import numpy as np

    ort = pytest.importorskip("onnxruntime")
    from ifp_compile.artifacts import SHARED_FILES
    from ifp_compile.build import build, verify
    from ifp_compile.onnx import find_onnx_ffn_blocks

    tok = smollm2[1]
    tasks = tmp_path / "tasks.jsonl"
    instr = {"math": "Solve this math word problem step by step.", "code": "Write a Python function."}
    lines = [{"name": k, "instruction": v} for k, v in instr.items()] + [{"name": "math2", "instruction": instr["math"]}]
    tasks.write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = build("default", tasks, tmp_path / "out", keep=0.5)
    assert report.built == ["math", "code", "math2"] and report.shared == ["math2"]
    assert verify(tmp_path / "out") == ["code", "math", "math2"]
    prog = smollm2_predicted[1]
    x = torch.randint(0, 1000, (1, 24))
    for name, text in instr.items():
        d = tmp_path / "out" / "tasks" / name
        sess = ort.InferenceSession(str(d / "model.onnx"), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {"input_ids": x.numpy()})[0])
        with torch.no_grad():
            ref = ifp.specialize(prog, text, tokenizer=tok).module()(x)
        assert (got - ref).abs().max() / ref.abs().max() < 1e-4
        manifest = json.loads((d / "manifest.json").read_text())
        assert manifest["kept_channels"] == [768] * 30 and manifest["instruction"] == text
        # ffn.bin holds exactly the kept FFN weights (plus alignment); the task's own files
        # (graph, manifest, ffn.bin) stay within the kept FFN bytes + 2 MB
        kept = 30 * 768 * 3 * 576 * 4
        assert kept <= (d / "ffn.bin").stat().st_size <= kept + 90 * 64
        own = sum(f.stat().st_size for f in d.iterdir() if f.name not in SHARED_FILES)
        assert own - kept <= 2 * 2**20, f"task {name} own files exceed kept FFN bytes by {own - kept} bytes"
    import onnx_ir as ir

    assert len(find_onnx_ffn_blocks(ir.load(str(tmp_path / "out" / "base" / "model.onnx")))) == 30
    # a task shipped alone (links dereferenced) is the size of a self-contained model: its
    # graph plus the bytes of the tensors it reads (the dense FFN weights stay in base/)
    import onnx

    ifp.export_task(tmp_path / "out", "math", tmp_path / "shipped")
    proto = onnx.load(str(tmp_path / "shipped" / "model.onnx"), load_external_data=False)
    tensors = sum(int({e.key: e.value for e in t.external_data}.get("length", 0)) or len(t.raw_data)
                  for t in proto.graph.initializer)
    shipped = sum(f.stat().st_size for f in (tmp_path / "shipped").iterdir())
    assert shipped <= 1.1 * (tensors + (tmp_path / "shipped" / "model.onnx").stat().st_size)
    assert verify(tmp_path / "shipped") == ["math"]
    assert np.array_equal(np.fromfile(tmp_path / "out" / "tasks" / "math" / "ffn.bin", dtype=np.uint8),
                          np.fromfile(tmp_path / "out" / "tasks" / "math2" / "ffn.bin", dtype=np.uint8))


def test_ifpredictor_with_shared_encoder_on_smollm2(smollm2):
    """The trained-predictor path on the real model: encoder = its first 4 layers (shared,
    not copied), soft masks folded into W_down, one training step moves only the head."""
    from ifp_compile.predictors import IFPredictor, LMEncoder
    from ifp_compile.train import Example, MaskedLMLoss

    model, tok, ep, ids = smollm2
    widths = [b.width for b in ifp.find_ffn_blocks(ep)]
    torch.manual_seed(0)
    pred = IFPredictor(LMEncoder(model, num_layers=4), widths, keep=0.5)
    prog = ifp.insert_masks(ep, predictor=pred)
    head = sum(p.numel() for p in pred.head.parameters())
    assert ifp.count_parameters(prog) == 134_515_008 + head  # 576*128+128 + 128*46080+46080
    text = "Solve this math word problem step by step."
    small = ifp.specialize(prog, text, tokenizer=tok)
    instr = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        masks = pred(instr)
        ref = ifp.insert_masks(ep).module()(ids, masks)
        torch.testing.assert_close(small.module()(ids), ref, rtol=1e-4, atol=5e-4)
    assert [int((m != 0).sum()) for m in masks] == [768] * 30
    assert ifp.count_parameters(small) == 134_515_008 - 30 * 768 * 3 * 576
    # a frozen-LLM training step through the masked program changes the head only
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        loss_fn = MaskedLMLoss(pred, ifp.insert_masks(ep).module())
        seq = tuple(ids[0].tolist())
        ex = Example(tuple(instr[0].tolist()), seq, (False,) + (True,) * (len(seq) - 1))
        loss_fn([ex]).backward()
        assert pred.head[2].weight.grad.abs().sum() > 0
        assert all(p.grad is None for p in model.parameters())
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


# --------------------------------------------------------------------------------------
# bfloat16: the same checks in half precision, with the bound of docs/architecture.md
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_bf16(smollm2):
    """SmolLM2 in bf16 (the fp32 de-quantized weights rounded once, as loading with
    ``dtype="bf16"`` does), and its masked program in float32 on the same rounded weights."""
    from tests.helpers import cast_model

    model32, tok, _, ids = smollm2
    model = cast_model(model32, torch.bfloat16)
    model.config.dtype = torch.bfloat16  # what a checkpoint written from it declares
    ep = ifp.export(model, (ids,), dynamic_shapes="seq")
    exact = ifp.insert_masks(ifp.export(cast_model(model, torch.float32), (ids,), dynamic_shapes="seq"))
    return model, tok, ep, ids, exact


def _half_masks(blocks, seed=0):
    g = torch.Generator().manual_seed(seed)
    masks = []
    for i, b in enumerate(blocks):
        keep = torch.randperm(b.width, generator=g)[: b.width // 2]
        m = torch.zeros(b.width)
        m[keep] = torch.rand(keep.numel(), generator=g) + 0.5 if i % 2 else 1.0
        masks.append(m)
    return masks


def test_bf16_specialized_equals_masked_reference_on_smollm2(smollm2_bf16):
    from tests.helpers import assert_within_rounding

    model, _, ep, ids, exact = smollm2_bf16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    masked = ifp.insert_masks(ep)
    blocks = ifp.find_ffn_blocks(masked)
    assert len(blocks) == 30
    masks = _half_masks(blocks)
    small = ifp.specialize(masked, mask=masks)
    with torch.no_grad():
        assert torch.equal(masked.module()(ids, [torch.ones(b.width) for b in blocks]), ep.module()(ids))
        ref = masked.module()(ids, masks)
        out = small.module()(ids)
        assert out.dtype == torch.bfloat16
        assert_within_rounding(out, ref, exact.module()(ids, masks), torch.bfloat16)
    assert ifp.count_parameters(small) == 134_515_008 - 30 * 768 * 3 * 576


def test_bf16_instruction_specialization_on_smollm2(smollm2_bf16):
    from ifp_compile.predictors import PromptActivationPredictor
    from tests.helpers import assert_within_rounding

    model, tok, ep, ids, exact = smollm2_bf16
    pred = PromptActivationPredictor(ep, keep=0.5)
    prog = ifp.insert_masks(ep, predictor=pred)
    text = "Solve this math word problem."
    small = ifp.specialize(prog, text, tokenizer=tok)
    with torch.no_grad():
        masks = pred(tok(text, return_tensors="pt")["input_ids"])
        ref = prog.module()(ids, tok(text, return_tensors="pt")["input_ids"])
        assert_within_rounding(small.module()(ids), ref, exact.module()(ids, masks), torch.bfloat16)
    assert [int(m.sum()) for m in masks] == [768] * 30
    assert ifp.count_parameters(small) == 134_515_008 - 30 * 768 * 3 * 576


def test_bf16_build_and_streamed_checkpoint_on_smollm2(smollm2_bf16, tmp_path):
    """SmolLM2 in bf16 saved as a Hugging Face directory: the build streams it (never loads
    it), and its pt2 task and a saved artifact hold the in-RAM specialisation bit for bit.
    (Instruction tasks from a streamed checkpoint: tests/weights/test_streaming.py.)"""
    import json

    from safetensors.numpy import save_file

    from ifp_compile.artifacts import SHARED_FILES, load_artifact
    from ifp_compile.build import build, verify

    from safetensors.torch import save_file as save_tensors

    model, tok, ep, ids, _ = smollm2_bf16
    ckpt = tmp_path / "smollm2-bf16"
    ckpt.mkdir()
    # transformers will not save_pretrained a model loaded from a (quantized) GGUF: write the
    # Hugging Face layout directly (tied lm_head left out, as save_pretrained does)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_tensors(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (ckpt / "config.json").write_text(json.dumps(config))
    tok.save_pretrained(ckpt)
    masks = [m.numpy() for m in _half_masks(ifp.find_ffn_blocks(ep), seed=1)]
    save_file({f"ffn.{i}": m for i, m in enumerate(masks)}, str(tmp_path / "half.safetensors"))
    (tmp_path / "tasks.jsonl").write_text(json.dumps({"name": "half", "mask": "half.safetensors"}) + "\n")
    build(str(ckpt), tmp_path / "tasks.jsonl", tmp_path / "out", formats=("pt2",))
    assert verify(tmp_path / "out") == ["half"]
    x = torch.randint(0, 1000, (1, 24))
    with torch.no_grad():
        ref = ifp.specialize(ep, mask=[torch.from_numpy(m) for m in masks]).module()(x)
        assert torch.equal(load_artifact(tmp_path / "out" / "tasks" / "half", format="pt2").module()(x), ref)
    manifest = json.loads((tmp_path / "out" / "tasks" / "half" / "manifest.json").read_text())
    assert manifest["kept_channels"] == [768] * 30 and manifest["inputs"]["dtype"] == "model"
    kept = 30 * 768 * 3 * 576 * 2  # bf16
    d = tmp_path / "out" / "tasks" / "half"
    assert kept <= (d / "program.ffn.safetensors").stat().st_size <= kept + 2**20
    # the graph archive plus the task's own parameters stay within the kept FFN bytes + 2 MiB
    own = sum(f.stat().st_size for f in d.iterdir() if f.name not in SHARED_FILES)
    assert own - kept <= 2 * 2**20, f"own pt2 files exceed kept FFN bytes by {own - kept} bytes"
    # the Python API on the same directory: weightless capture, streamed save, exact load
    small = ifp.specialize(ifp.export_checkpoint(ckpt), mask=[torch.from_numpy(m) for m in masks])
    ifp.save(small, tmp_path / "task")
    with torch.no_grad():
        assert torch.equal(ifp.load(tmp_path / "task").module()(x), ref)


# --------------------------------------------------------------------------------------
# GGUF for llama.cpp
# --------------------------------------------------------------------------------------
def test_gguf_tasks_of_smollm2_run_in_llamacpp(smollm2, smollm2_predicted, tmp_path):
    """`build --format gguf` on the default model: the task files llama.cpp loads, with the
    source's quantized rows; an all-ones task decodes exactly as the source, and a keep-0.5
    task agrees with `ifp.specialize` at top-1 on teacher-forced positions about as well as
    the source GGUF agrees with the dense program (llama.cpp quantizes activations to 8 bits)."""
    pytest.importorskip("xllamacpp")
    import json

    import gguf
    import numpy as np
    from safetensors.numpy import save_file

    from ifp_compile.build import build, verify
    from ifp_compile.generate import chat_ids
    from ifp_compile.llamacpp import LlamaCpp, top1_agreement
    from ifp_compile.real_model import GGUF_FILE, smollm2_dir

    model, tok, ep, _ = smollm2
    pred, _ = smollm2_predicted
    masks = pred(tok("Solve this math word problem step by step.", return_tensors="pt")["input_ids"])
    save_file({f"ffn.{i}": m.numpy() for i, m in enumerate(masks)}, str(tmp_path / "math.safetensors"))
    save_file({f"ffn.{i}": np.ones(1536, np.float32) for i in range(30)}, str(tmp_path / "ones.safetensors"))
    (tmp_path / "tasks.jsonl").write_text("".join(json.dumps({"name": n, "mask": f"{n}.safetensors"}) + "\n"
                                                  for n in ("math", "ones")))
    build("default", tmp_path / "tasks.jsonl", tmp_path / "out", formats=("gguf",))
    assert verify(tmp_path / "out") == ["math", "ones"]
    source = Path(smollm2_dir()) / GGUF_FILE
    task = tmp_path / "out" / "tasks" / "math" / "model.gguf"
    tensors = {t.name: t for t in gguf.GGUFReader(task).tensors}
    assert tensors["blk.0.ffn_gate.weight"].tensor_type.name == "Q4_1"  # rows stay in the source's type
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "Q8_0"  # the cut tensor: --gguf-down-type auto
    kept = 30 * 768 * (2 * 576 // 32 * 20 + 576 // 32 * 34)  # gate+up rows (Q4_1) + down (Q8_0)
    src_ffn = 30 * 1536 * 3 * 576 // 32 * 20
    assert sum(int(t.n_bytes) for t in tensors.values()) == sum(
        int(t.n_bytes) for t in gguf.GGUFReader(source).tensors) - src_ffn + kept

    prompts = [chat_ids(tok, p)[0].tolist() for p in ("What is 12 times 3?", "Name three colours.")]
    with LlamaCpp(source) as dense, LlamaCpp(tmp_path / "out" / "tasks" / "ones" / "model.gguf") as ones:
        sequences = []
        for ids in prompts:
            answer, _ = dense.greedy(ids, 48)
            assert ones.greedy(ids, 48)[0] == answer
            sequences.append((len(ids), ids + answer))
        dense_agreement = top1_agreement(dense, ep, sequences)
    with LlamaCpp(task) as small_llm:
        agreement = top1_agreement(small_llm, ifp.specialize(ep, mask=masks), sequences)
    assert dense_agreement >= 0.85, dense_agreement
    assert agreement >= 0.8 and agreement >= dense_agreement - 0.15, (agreement, dense_agreement)


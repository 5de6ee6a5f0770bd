"""Per-task GGUF files (ifp_compile.gguf_task) on small GGUF files written here.

What llama.cpp makes of them is checked on SmolLM2 (tests/test_real_model.py); these tests
check the bytes: kept rows copied exactly, ``ffn_down`` re-quantized within one rounding
of its type, the metadata carried over, and every bad input named.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from ifp_compile.gguf_task import GGUFError, _encode, write_task_gguf  # noqa: E402

T = gguf.GGMLQuantizationType
HIDDEN, WIDTH, LAYERS = 64, 96, 2


def tiny_gguf(path, *, arch="llama", ffn_type=T.Q4_1, width=WIDTH, layers=LAYERS, seed=0):
    """A small GGUF laid out as llama.cpp's converter writes a llama model (no tokenizer)."""
    g = np.random.default_rng(seed)
    w = gguf.GGUFWriter(path, arch)
    w.add_uint32(f"{arch}.block_count", layers)
    w.add_uint32(f"{arch}.embedding_length", HIDDEN)
    w.add_uint32(f"{arch}.feed_forward_length", width)
    w.add_string("tokenizer.chat_template", "{{ messages }}")
    w.add_array("tokenizer.ggml.tokens", ["a", "b", "c"])

    def add(name, rows, cols, qtype):
        x = g.standard_normal((rows, cols)).astype(np.float32)
        if qtype == T.F32:
            w.add_tensor(name, x)
        elif qtype == T.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)

    add("token_embd.weight", 8, HIDDEN, T.Q8_0)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, np.float32))
        add(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN, T.Q8_0)
        add(f"blk.{i}.ffn_gate.weight", width, HIDDEN, ffn_type)
        add(f"blk.{i}.ffn_up.weight", width, HIDDEN, ffn_type)
        add(f"blk.{i}.ffn_down.weight", HIDDEN, width, ffn_type)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tensors(path):
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}, r


def binary_masks(seed=1, kept=64, layers=LAYERS, width=WIDTH):
    g = np.random.default_rng(seed)
    out = []
    for _ in range(layers):
        m = np.zeros(width, np.float32)
        m[g.permutation(width)[:kept]] = 1.0
        out.append(m)
    return out


def test_fast_reader_reads_what_gguf_py_reads(tmp_path):
    """The reader with plain-array views (gguf_task._fast_reader_class) gives gguf-py's
    fields (every part, type and value) and tensors, byte for byte."""
    from ifp_compile.gguf_task import _fast_reader_class

    path = tiny_gguf(tmp_path / "src.gguf")
    w = gguf.GGUFWriter(tmp_path / "meta.gguf", "llama")  # every value type once
    w.add_array("tokenizer.ggml.tokens", ["a", "bé", "", "<|im_start|>"])
    w.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0, 0.0])
    w.add_array("tokenizer.ggml.token_type", [1, 2, 3, 1])
    w.add_float64("x.f64", 2.5)
    w.add_int64("x.i64", -7)
    w.add_bool("x.bool", True)
    w.add_int8("x.i8", -3)
    w.add_uint16("x.u16", 65535)
    w.add_tensor("t", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    fast = _fast_reader_class()
    assert fast is not gguf.GGUFReader
    for p in (path, tmp_path / "meta.gguf"):
        a, b = gguf.GGUFReader(p), fast(p)
        assert list(a.fields) == list(b.fields)
        for name, f in a.fields.items():
            g = b.fields[name]
            assert (f.offset, f.types, f.data) == (g.offset, g.types, g.data), name
            assert len(f.parts) == len(g.parts) and all(
                x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(f.parts, g.parts)), name
            assert f.contents() == g.contents(), name
        assert [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in a.tensors] == \
            [(t.name, t.tensor_type, list(t.shape), t.data_offset) for t in b.tensors]
        assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0, T.F16])
def test_all_ones_gives_back_the_source_tensors(tmp_path, qtype):
    src = tiny_gguf(tmp_path / "src.gguf", ffn_type=qtype)
    info = write_task_gguf(src, [np.ones(WIDTH, np.float32)] * LAYERS, tmp_path / "task.gguf")
    a, _ = tensors(src)
    b, _ = tensors(tmp_path / "task.gguf")
    assert list(a) == list(b)
    for name in a:
        assert a[name].tensor_type == b[name].tensor_type and np.array_equal(a[name].data, b[name].data), name
    assert info.widths == [WIDTH] * LAYERS and info.requantized_down_blocks == 0


@pytest.mark.parametrize("qtype", [T.Q4_1, T.Q8_0])
def test_kept_rows_are_copied_and_down_is_requantized_once(tmp_path, qtype):
    src = tiny_gguf(tmp_path / "src.gguf", ffn_type=qtype)
    masks = binary_masks()
    masks[1][masks[1] != 0] = np.random.default_rng(2).uniform(0.5, 1.5, 64)  # soft scales in layer 1
    write_task_gguf(src, masks, tmp_path / "task.gguf", down_type="source")
    a, _ = tensors(src)
    b, reader = tensors(tmp_path / "task.gguf")
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    for i, m in enumerate(masks):
        keep = np.flatnonzero(m)
        for k in ("gate", "up"):  # whole quantized rows, byte for byte
            name = f"blk.{i}.ffn_{k}.weight"
            assert np.array_equal(b[name].data, a[name].data[keep]) and b[name].tensor_type == qtype
        down = f"blk.{i}.ffn_down.weight"
        assert b[down].tensor_type == qtype and [int(s) for s in b[down].shape] == [64, HIDDEN]
        want = gguf.quants.dequantize(a[down].data, qtype)[:, keep] * m[keep]
        got = gguf.quants.dequantize(b[down].data, qtype)
        # one rounding of the type: half a quantization step of the block, plus the fp16
        # rounding of the block's scale (and offset) llama.cpp's formats store
        blocks = want.reshape(HIDDEN, -1, block)
        amax = np.abs(blocks).max(axis=2, keepdims=True)
        if qtype == T.Q4_1:
            tol = np.ptp(blocks, axis=2, keepdims=True) / 15 * 0.5 + 2 * amax * 2.0**-10
        else:
            tol = amax / 127 * 0.5 + amax * 2.0**-10
        assert np.all(np.abs(got - want).reshape(HIDDEN, -1, block) <= tol)
        assert np.array_equal(gguf.quants.quantize(want, qtype), b[down].data)  # exactly the quantizer's output
    for name in ("token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"):
        assert np.array_equal(a[name].data, b[name].data)
    fields = reader.fields
    assert fields["llama.feed_forward_length"].contents() == 64
    assert fields["tokenizer.chat_template"].contents() == "{{ messages }}"
    assert fields["tokenizer.ggml.tokens"].contents() == ["a", "b", "c"]
    assert fields["ifp_compile.kept_channels"].contents() == [64, 64]


def test_aligned_unit_blocks_of_down_are_copied_not_requantized(tmp_path):
    src = tiny_gguf(tmp_path / "src.gguf", ffn_type=T.Q4_1)
    m = np.zeros(WIDTH, np.float32)
    m[:32] = 1.0  # one whole aligned source block
    m[40:72] = 1.0  # 32 channels across two source blocks
    info = write_task_gguf(src, [m, m], tmp_path / "task.gguf", down_type="source")
    a, _ = tensors(src)
    b, _ = tensors(tmp_path / "task.gguf")
    row_blocks_a = a["blk.0.ffn_down.weight"].data.reshape(HIDDEN, 3, -1)
    row_blocks_b = b["blk.0.ffn_down.weight"].data.reshape(HIDDEN, 2, -1)
    assert np.array_equal(row_blocks_b[:, 0], row_blocks_a[:, 0])
    assert info.copied_down_blocks == info.requantized_down_blocks == 2 * HIDDEN


def test_auto_writes_a_cut_down_of_a_4_bit_source_as_q8_0(tmp_path):
    for src_type, down in ((T.Q4_1, T.Q8_0), (T.Q8_0, T.Q8_0), (T.F16, T.F16)):
        src = tiny_gguf(tmp_path / f"src-{src_type.name}.gguf", ffn_type=src_type)
        masks = binary_masks()
        info = write_task_gguf(src, masks, tmp_path / "task.gguf")
        a, _ = tensors(src)
        b, _ = tensors(tmp_path / "task.gguf")
        assert info.down_types == [down.name] * 2  # (all-ones masks keep the source's bytes: above)
        want = gguf.quants.dequantize(a["blk.0.ffn_down.weight"].data, src_type)[:, np.flatnonzero(masks[0])]
        assert np.array_equal(b["blk.0.ffn_down.weight"].data, _encode(want, down))


def test_widths_off_the_block_fall_back_to_f16_and_say_so(tmp_path):
    src = tiny_gguf(tmp_path / "src.gguf", ffn_type=T.Q4_1)
    info = write_task_gguf(src, binary_masks(kept=50), tmp_path / "task.gguf", down_type="source")
    b, _ = tensors(tmp_path / "task.gguf")
    assert b["blk.0.ffn_down.weight"].tensor_type == T.F16 and info.down_types == ["F16", "F16"]
    assert "not a multiple of Q4_1's block of 32" in info.notes[0]
    assert b["blk.0.ffn_up.weight"].tensor_type == T.Q4_1  # rows keep the source type
    with pytest.raises(GGUFError, match="q8_0 needs widths that are multiples of 32"):
        write_task_gguf(src, binary_masks(kept=50), tmp_path / "t2.gguf", down_type="q8_0")


@pytest.mark.parametrize("down_type,expected", [("f16", T.F16), ("f32", T.F32), ("q8_0", T.Q8_0)])
def test_down_type_option(tmp_path, down_type, expected):
    src = tiny_gguf(tmp_path / "src.gguf", ffn_type=T.Q4_1)
    masks = binary_masks()
    write_task_gguf(src, masks, tmp_path / "task.gguf", down_type=down_type)
    a, _ = tensors(src)
    b, _ = tensors(tmp_path / "task.gguf")
    got = gguf.quants.dequantize(b["blk.0.ffn_down.weight"].data, expected)
    want = gguf.quants.dequantize(a["blk.0.ffn_down.weight"].data, T.Q4_1)[:, np.flatnonzero(masks[0])]
    assert b["blk.0.ffn_down.weight"].tensor_type == expected
    tol = {T.F32: 0, T.F16: 2e-3, T.Q8_0: 0.05}[expected] * np.abs(want).max()
    assert np.abs(got - want).max() <= tol


def test_identical_inputs_give_identical_bytes(tmp_path):
    src = tiny_gguf(tmp_path / "src.gguf")
    write_task_gguf(src, binary_masks(), tmp_path / "a.gguf", task="t")
    write_task_gguf(src, binary_masks(), tmp_path / "b.gguf", task="t")
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_bad_input_is_named_and_leaves_no_file(tmp_path):
    src = tiny_gguf(tmp_path / "src.gguf")
    out = tmp_path / "task.gguf"
    cases = [
        (binary_masks()[:1], "1 masks for the 2 FFN layers"),
        ([np.ones(WIDTH + 1, np.float32)] * 2, r"mask 0 has shape \(97,\), layer 0 of .* has 96 FFN channels"),
        ([np.ones(WIDTH, np.float32), np.zeros(WIDTH, np.float32)], "mask 1 keeps no channel"),
        ([np.full(WIDTH, np.nan, np.float32)] * 2, "mask 0 has non-finite values"),
        ([binary_masks(kept=64)[0], binary_masks(kept=32)[1]],
         "per-layer FFN widths .*layer 0 keeps 64 channels, layer 1 32.*uniform keep"),
    ]
    for masks, message in cases:
        with pytest.raises(GGUFError, match=message):
            write_task_gguf(src, masks, out)
    with pytest.raises(GGUFError, match="unknown ffn_down type 'q2'"):
        write_task_gguf(src, binary_masks(), out, down_type="q2")
    gpt2 = tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(GGUFError, match="architecture 'gpt2' is not supported.*supported: llama"):
        write_task_gguf(gpt2, binary_masks(), out)
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(GGUFError, match="junk.gguf is not a readable GGUF file"):
        write_task_gguf(tmp_path / "junk.gguf", binary_masks(), out)
    with pytest.raises(GGUFError, match="missing.gguf does not exist"):
        write_task_gguf(tmp_path / "missing.gguf", binary_masks(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf", "junk.gguf", "src.gguf"]


def _tasks(tmp_path, masks_by_name):
    import json

    from safetensors.numpy import save_file

    lines = []
    for name, masks in masks_by_name.items():
        save_file({f"ffn.{i}": m for i, m in enumerate(masks)}, str(tmp_path / f"{name}.safetensors"))
        lines.append(json.dumps({"name": name, "mask": f"{name}.safetensors"}))
    (tmp_path / "tasks.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "tasks.jsonl"


def test_build_writes_one_gguf_per_task_without_loading_the_model(tmp_path, monkeypatch):
    import json

    from ifp_compile import build as build_mod
    from ifp_compile.build import build, verify

    src = tiny_gguf(tmp_path / "src.gguf")
    monkeypatch.setattr(build_mod.Source, "torch_model", lambda self: pytest.fail("the model was loaded"))
    tasks = _tasks(tmp_path, {"a": binary_masks(1), "b": binary_masks(2)})
    report = build(str(src), tasks, tmp_path / "out", formats=("gguf",), gguf_down_type="q8_0")
    assert report.built == ["a", "b"] and verify(tmp_path / "out") == ["a", "b"]
    write_task_gguf(src, binary_masks(1), tmp_path / "a.gguf", down_type="q8_0", task="a")
    assert (tmp_path / "out" / "tasks" / "a" / "model.gguf").read_bytes() == (tmp_path / "a.gguf").read_bytes()
    assert build(str(src), tasks, tmp_path / "out", formats=("gguf",), gguf_down_type="q8_0").skipped == ["a", "b"]
    # another ffn_down type is another input: every task is rebuilt
    assert build(str(src), tasks, tmp_path / "out", formats=("gguf",)).built == ["a", "b"]
    assert json.loads((tmp_path / "out" / "tasks" / "a" / "manifest.json").read_text())["gguf_ffn_down_types"] == ["Q8_0"]


def test_build_refuses_what_a_gguf_cannot_hold_before_writing(tmp_path):
    from ifp_compile.build import BuildError, build

    src = tiny_gguf(tmp_path / "src.gguf")
    ragged = binary_masks(1)
    ragged[1][np.flatnonzero(ragged[1])[:8]] = 0.0
    tasks = _tasks(tmp_path, {"ok": binary_masks(1), "ragged": ragged})
    report = build(str(src), tasks, tmp_path / "out", formats=("gguf",))  # checked before anything is written
    assert report.built == ["ok"] and list(report.failed) == ["ragged"]
    assert re.search("per-layer FFN widths .*layer 0 keeps 64 channels, layer 1 56", report.failed["ragged"])
    assert sorted(p.name for p in (tmp_path / "out" / "tasks").iterdir()) == ["ok"]
    with pytest.raises(BuildError, match="--dtype does not apply to the gguf format"):
        build(str(src), tasks, tmp_path / "out", formats=("gguf",), dtype="bf16")
    (tmp_path / "model.pt2").write_bytes(b"")
    with pytest.raises(BuildError, match=r"the gguf format is written from a GGUF file or a Hugging Face checkpoint "
                                          r"directory .*not from a \.pt2 file"):
        build(str(tmp_path / "model.pt2"), tasks, tmp_path / "out", formats=("gguf",))
    odd = binary_masks(1)
    for m in odd:  # 56 of 64 channels: not a multiple of Q8_0's block of 32
        m[np.flatnonzero(m)[:8]] = 0.0
    report = build(str(src), _tasks(tmp_path, {"odd": odd}), tmp_path / "out2", formats=("gguf",),
                   gguf_down_type="q8_0")
    assert report.built == [] and "--gguf-down-type q8_0 needs widths that are multiples of 32" in report.failed["odd"]
    assert list(tmp_path.glob("out2/.tmp-*")) == [] and sorted((tmp_path / "out2" / "tasks").iterdir()) == []
    assert not (tmp_path / "out2" / "base").exists()
    with pytest.raises(BuildError, match="--gguf-type and --gguf-pre apply to Hugging Face checkpoints"):
        build(str(src), tasks, tmp_path / "out", formats=("gguf",), gguf_type="q8_0")

"""Decode speed at batch 1 on SmolLM2-135M-Instruct: is the specialised model really faster?

    python benchmarks/decode.py [--keep 0.5] [--new-tokens 128] [--repeats 3] [--no-compile] [--json FILE]

Greedy decoding with the KV cache, one decode loop for every row (the same Python
overhead per token), rows interleaved round-robin and the median of ``--repeats`` runs
taken (these machines are noisy, so only ratios measured side by side mean anything):

* dense: the model as loaded;
* specialised: ``ifp_compile.to_module(model, program, mask)`` for a keep-0.5 mask chosen
  from the prompt (prompt-activation predictor): the same HF class with smaller FFNs;
* masked: the dense model with the mask applied to the FFN's intermediate activation, i.e.
  the whole FFN computed and then masked (what a naive implementation does);
* per-token dynamic: a different channel set for every token (Deja Vu-style contextual
  sparsity): a rank-32 predictor of the gate projection scores every channel, and the
  top ``keep`` rows/columns of gate, up and down are gathered (``index_select``) every
  step; prefill stays dense.

The *ideal* speed-up of the specialised model is the ratio of weight bytes read per
decoded token (every Linear weight, the LM head included, plus norms): at batch 1 decoding
is bound by reading weights. Target: specialised/dense >= 0.9 of ideal, and faster than
every other row.

The same four rows are then timed as *compiled decode-step programs*, ifp-compile's own
path to a fast artifact: ``export_decode_step`` captures one decoding step with a static
KV cache inside, ``specialize`` (specialised row) or ``insert_masks`` (masked row, mask
passed every step) rewrites it, and ``torch.compile(program.module())`` runs it (the
per-token dynamic row exports its gathering MLP the same way, one token per step). Every
row goes through the same decode loop (``StepDecoder``), so the per-step Python and
dispatch overhead that eager HF modules pay (about a quarter of a dense step here) is
gone for all of them alike. ``--no-compile`` skips these rows (about 4 minutes of
compilation). The output ends with the matrix-vector bandwidth of the FFN shapes at
both widths: what keeps the measured ratio under the ideal on a CPU.

Then time to first token for a 512-token prompt, split as in the IFPruning paper:
mask selection (prompt-activation predictor, or an IFPredictor reading the prompt with the
model's first 4 layers) + specialisation (``to_module``: copying and slicing weights)
+ prefill, against the dense prefill.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ifp_compile as ifp  # noqa: E402
from ifp_compile import corpora  # noqa: E402
from ifp_compile.decode_step import StepDecoder, export_decode_step  # noqa: E402
from ifp_compile.generate import chat_ids  # noqa: E402
from ifp_compile.predictors import IFPredictor, PromptActivationPredictor  # noqa: E402
from ifp_compile.predictors.if_predictor import LMEncoder  # noqa: E402
from ifp_compile.progress import status  # noqa: E402
from ifp_compile.real_model import load_smollm2  # noqa: E402

PROMPT = "Write a Python function that returns the n-th Fibonacci number, with a docstring and a short test."


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes a batch-1 decode step reads: every Linear weight (LM head too, even when tied
    to the embedding) and bias, and the norm weights; one embedding row is negligible."""
    total = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
            total += 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
        elif "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
            total += m.weight.numel() * m.weight.element_size()
    return total


@torch.inference_mode()  # no autograd bookkeeping per op: the per-token overhead every row pays
def decode(model, ids: torch.Tensor, new_tokens: int) -> tuple[list[int], float]:
    """Greedy tokens (EOS ignored: every row does the same work) and decode tokens/s."""
    out = model(input_ids=ids, use_cache=True)
    cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    tokens = [int(nxt)]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens.append(int(nxt))
    return tokens, (new_tokens - 1) / (time.perf_counter() - start)


def gemv_bandwidth(rows: int, cols: int, layers: int = 30, calls: int = 600) -> float:
    """GB/s of ``linear(x, W)`` at batch 1 for a [rows, cols] fp32 weight, cycling through
    ``layers`` distinct weights so none stays in cache: how efficiently this CPU reads a
    matrix of that shape (the FFN matrices of the specialised model are half as wide)."""
    ws = [torch.randn(rows, cols) for _ in range(layers)]
    x = torch.randn(1, cols)
    with torch.inference_mode():
        for w in ws:
            nn.functional.linear(x, w)
        start = time.perf_counter()
        for i in range(calls):
            nn.functional.linear(x, ws[i % layers])
        dt = (time.perf_counter() - start) / calls
    return rows * cols * 4 / dt / 1e9


class MaskedMLP(nn.Module):
    """The full FFN, then the mask on its intermediate activation."""

    def __init__(self, mlp, mask):
        super().__init__()
        self.mlp, self.mask = mlp, mask

    def forward(self, x):
        m = self.mlp
        return m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x) * self.mask)


class DynamicMLP(nn.Module):
    """A new channel set per decoded token, gathered from the dense weights every step."""

    def __init__(self, mlp, k: int, rank: int = 32):
        super().__init__()
        self.mlp, self.k = mlp, k
        u, s, vh = torch.linalg.svd(mlp.gate_proj.weight.detach(), full_matrices=False)
        self.a = (vh[:rank].T * s[:rank]).contiguous()  # d -> rank
        self.b = u[:, :rank].T.contiguous()  # rank -> width: approximates the gate projection

    def forward(self, x):
        m = self.mlp
        if x.shape[1] != 1:  # prefill: dense
            return m.down_proj(m.act_fn(m.gate_proj(x)) * m.up_proj(x))
        idx = torch.topk((x[0, 0] @ self.a) @ self.b, self.k).indices
        g = nn.functional.linear(x, m.gate_proj.weight.index_select(0, idx))
        u = nn.functional.linear(x, m.up_proj.weight.index_select(0, idx))
        return nn.functional.linear(m.act_fn(g) * u, m.down_proj.weight.index_select(1, idx))


def _shallow(module: nn.Module) -> nn.Module:
    """A copy that shares parameters but owns its submodule table (so replacing a child
    of the copy leaves the original untouched)."""
    import copy

    new = copy.copy(module)
    new._modules = dict(module._modules)
    return new


def with_mlps(model, make):
    """A variant of ``model`` sharing its weights, whose decoder layers' MLPs are ``make(i, mlp)``."""
    variant = _shallow(model)
    variant.model = _shallow(model.model)
    variant.model.layers = nn.ModuleList()
    for i, layer in enumerate(model.model.layers):
        new = _shallow(layer)
        new.mlp = make(i, layer.mlp)
        variant.model.layers.append(new)
    return variant


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--keep", type=float, default=0.5, help="kept FFN fraction (default 0.5)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="runs per row, interleaved; the median counts (default 3)")
    p.add_argument("--ttft-prompt", type=int, default=512, help="prompt tokens for time to first token (default 512)")
    p.add_argument("--no-compile", action="store_true",
                   help="skip the compiled decode-step program rows (about 50 s of compilation each)")
    p.add_argument("--json", help="also write the results as JSON here (ifp-compile report --speed reads it)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model, tok = load_smollm2()
    ids = chat_ids(tok, PROMPT)
    with status("exporting the model"):
        program = ifp.export(model, (ids,), dynamic_shapes="seq")
    blocks = ifp.find_ffn_blocks(program)
    probe = PromptActivationPredictor(program, keep=args.keep)
    with torch.no_grad():
        mask = probe(ids)
    counts = [int(m.sum()) for m in mask]
    rows = {
        "dense": model,
        "specialised (to_module)": ifp.to_module(model, program, mask=mask),
        "masked (full FFN, then mask)": with_mlps(model, lambda i, mlp: MaskedMLP(mlp, mask[i])),
        "per-token dynamic (gather each step)": with_mlps(model, lambda i, mlp: DynamicMLP(mlp, counts[i])),
    }
    bytes_per_token = {name: weight_bytes_per_token(m) for name, m in rows.items()}
    runners = {name: (lambda i, n, m=m: decode(m, i, n)) for name, m in rows.items()}
    eager_names = list(rows)
    if not args.no_compile:
        length = ids.shape[1] + args.new_tokens + 8
        step = export_decode_step(model, length)
        programs = {
            "dense": (step, ()),
            "specialised": (ifp.specialize(step, mask=mask), ()),
            "masked": (ifp.insert_masks(step), (mask,)),
            "per-token dynamic": (export_decode_step(rows["per-token dynamic (gather each step)"], length,
                                                     prompt_chunks=False), ()),
        }
        for (short, (step_program, extra)), base in zip(programs.items(), eager_names):
            name = f"{short}, compiled program"
            decoder = StepDecoder(step_program, run=lambda m: torch.compile(m, dynamic=False), extra=extra)
            runners[name] = decoder.greedy
            bytes_per_token[name] = bytes_per_token[base]
            with status(f"compiling the decode step: {name}"):
                decoder.greedy(ids, 8)
    ideal = bytes_per_token["dense"] / bytes_per_token["specialised (to_module)"]
    log(f"{torch.get_num_threads()} threads; prompt {ids.shape[1]} tokens; decoding {args.new_tokens} tokens per run; "
        f"kept FFN channels {sum(counts)}/{sum(b.width for b in blocks)}")
    speeds: dict[str, list[float]] = {name: [] for name in runners}
    tokens: dict[str, list[int]] = {}
    for run in runners.values():  # warm-up: allocator, caches, first-call paths
        run(ids, 8)
    for r in range(args.repeats):
        for name, run in runners.items():
            tokens[name], tps = run(ids, args.new_tokens)
            speeds[name].append(tps)
            log(f"run {r + 1}/{args.repeats} {name}: {tps:.1f} tokens/s")
    med = {name: statistics.median(v) for name, v in speeds.items()}
    same = sum(a == b for a, b in zip(tokens["specialised (to_module)"], tokens["masked (full FFN, then mask)"]))

    # time to first token for a long prompt
    text_ids = tok(corpora.texts("code", "heldout", 4)[0] + corpora.texts("code", "heldout", 4)[1])["input_ids"]
    long_ids = torch.tensor([text_ids[:args.ttft_prompt]])
    if long_ids.shape[1] < args.ttft_prompt:
        raise SystemExit(f"only {long_ids.shape[1]} tokens for the TTFT prompt")
    encoder_pred = IFPredictor(LMEncoder(model, num_layers=4), [b.width for b in blocks], args.keep).eval()

    @torch.no_grad()
    def prefill(m):
        return m(input_ids=long_ids, use_cache=True).logits[:, -1].argmax(-1)

    ttft = []
    t_dense, _ = median_time(lambda: prefill(model), args.repeats)
    ttft.append({"name": "dense", "selection_s": 0.0, "specialize_s": 0.0, "prefill_s": t_dense, "total_s": t_dense})
    for name, selector in (("specialised, prompt-activation selection", probe), ("specialised, IFPredictor selection (4 layers)", encoder_pred)):
        with torch.no_grad():
            t_sel, m_long = median_time(lambda: [x.detach() for x in selector(long_ids)], args.repeats)
        t_spec, small = median_time(lambda: ifp.to_module(model, program, mask=m_long), args.repeats)
        t_pre, _ = median_time(lambda: prefill(small), args.repeats)
        ttft.append({"name": name, "selection_s": t_sel, "specialize_s": t_spec, "prefill_s": t_pre,
                     "total_s": t_sel + t_spec + t_pre})


    print(f"\nSmolLM2-135M-Instruct, batch 1, greedy decoding with KV cache, {args.new_tokens} tokens after a "
          f"{ids.shape[1]}-token prompt, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'row':<40}{'tokens/s':>10}{'vs dense':>10}{'weight MB/token':>17}")
    out_rows = []
    for name in runners:
        ratio = med[name] / med["dense"]
        print(f"{name:<40}{med[name]:>10.1f}{ratio:>9.2f}x{bytes_per_token[name] / 1e6:>17.1f}")
        out_rows.append({"name": name, "tokens_per_s": round(med[name], 2), "ratio_to_dense": round(ratio, 3),
                         "weight_mb_per_token": round(bytes_per_token[name] / 1e6, 1)})
    spec = med["specialised (to_module)"] / med["dense"]
    others = [n for n in eager_names if n not in ("dense", "specialised (to_module)")]
    fastest = all(med["specialised (to_module)"] > med[n] for n in others + ["dense"])
    print(f"\nideal specialised/dense ratio (weight bytes per token): {ideal:.2f}x; measured {spec:.2f}x "
          f"= {spec / ideal:.2f} of ideal (target >= 0.9); faster than every other eager row: {'yes' if fastest else 'NO'}")
    print(f"specialised and masked rows chose the same greedy token at {same}/{args.new_tokens} steps "
          "(same semantics; float summation order differs)")
    compiled = None
    if not args.no_compile:
        cd, cs = med["dense, compiled program"], med["specialised, compiled program"]
        compiled = cs / cd
        fastest_c = all(cs > v for n, v in med.items() if n != "specialised, compiled program")
        print(f"compiled decode-step programs: specialised/dense {compiled:.2f}x = {compiled / ideal:.2f} of ideal "
              f"(target >= 0.9); faster than every other row: {'yes' if fastest_c else 'NO'}; "
              f"vs eager dense {cs / med['dense']:.2f}x")
        same_c = sum(a == b for a, b in zip(tokens["specialised, compiled program"], tokens["masked, compiled program"]))
        print(f"compiled specialised and masked programs chose the same greedy token at {same_c}/{args.new_tokens} steps")
    # why not the ideal: how fast this CPU reads the FFN matrices at the two widths
    d = model.model.layers[0].mlp.gate_proj.weight.shape
    k = max(counts)
    shapes = {"gate/up": ((d[0], d[1]), (k, d[1])), "down": ((d[1], d[0]), (d[1], k))}
    gemv = {role: [round(gemv_bandwidth(*shape), 2) for shape in pair] for role, pair in shapes.items()}
    print("\nbatch-1 matrix-vector bandwidth on this CPU (GB/s, 30 distinct weights cycled):")
    for role, (dense_shape, spec_shape) in shapes.items():
        print(f"  {role:<8} dense {list(dense_shape)} {gemv[role][0]:>6.1f}   specialised {list(spec_shape)} "
              f"{gemv[role][1]:>6.1f}   ({gemv[role][1] / gemv[role][0] - 1:+.0%})")
    print(f"\ntime to first token, {args.ttft_prompt}-token prompt (median of {args.repeats}), seconds:")
    print(f"{'':<48}{'selection':>10}{'specialise':>11}{'prefill':>9}{'total':>8}")
    for r in ttft:
        print(f"{r['name']:<48}{r['selection_s']:>10.3f}{r['specialize_s']:>11.3f}{r['prefill_s']:>9.3f}{r['total_s']:>8.3f}")
    if args.json:
        from ifp_compile.artifacts import atomic_write, dump_json

        data = {"model": "SmolLM2-135M-Instruct", "keep": args.keep, "threads": torch.get_num_threads(),
                "prompt_tokens": int(ids.shape[1]), "new_tokens": args.new_tokens, "repeats": args.repeats,
                "ideal_ratio": round(ideal, 3), "measured_ratio": round(spec, 3),
                "fraction_of_ideal": round(spec / ideal, 3), "rows": out_rows,
                "compiled_ratio": None if compiled is None else round(compiled, 3),
                "compiled_fraction_of_ideal": None if compiled is None else round(compiled / ideal, 3),
                "gemv_gb_per_s": gemv,
                "ttft": [{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in ttft]}
        atomic_write(Path(args.json), dump_json(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The equal-budget controls of a trained mask predictor (issue 19).

Does a per-task mask beat a static one because it is chosen *per task*, or because it was
*trained*? Every row here is trained on the same data (``training_data``: the four
``corpora`` domains, interleaved), with the same steps, batch, optimizer, learning rates,
keep ratio, seed and starting point (the static calibrated mask: GRIFFIN's rule over the
first training examples); they differ only in what chooses the mask:

========================  ==================================================================
``static-learned``        an IFPredictor that reads one constant input: one learned mask
``static-scales``         the static calibrated channel set, fixed; only its scales learned
``per-task``              an IFPredictor that reads the task's instruction (``corpora.INSTRUCTIONS``)
``per-input``             an IFPredictor that reads the input's own first 64 tokens (the prompt)
========================  ==================================================================

each with the LLM frozen and, with ``joint``, trained together with the predictor (full
fine-tuning of the LLM at ``llm_lr``: the paper's setting; a 135M model's AdamW state fits
in memory, so LoRA is not needed here). Training resumes from ``work/<row>/checkpoint``,
so an interrupted run loses at most ``save_every`` steps and a finished row is reused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import corpora
from ..progress import status
from .rows import MaskSource


@dataclass(frozen=True)
class Control:
    kind: str
    name: str
    per_task: bool
    predictor: dict
    reads: str  # what the eval feeds it: "prompt", "instruction" or "constant"


CONTROLS = (
    Control("static-learned", "static learned mask", False, {"input": "constant"}, "constant"),
    Control("static-scales", "static calibrated mask + learned scales", False,
            {"kind": "scales", "input": "constant"}, "constant"),
    Control("per-task", "per-task predictor (task instruction)", True, {"input": "instruction"}, "instruction"),
    Control("per-input", "per-input predictor (first 64 tokens)", True, {"input": "text"}, "prompt"),
)


@dataclass(frozen=True)
class Budget:
    """What every trained row gets, identically."""

    steps: int = 100
    texts_per_domain: int = 120
    batch_size: int = 4
    lr: float = 1e-3
    llm_lr: float = 1e-5
    keep: float = 0.5
    seed: int = 0
    encoder_layers: int = 4
    #: SoftTopK's temperature (higher: softer masks while training, so channels near the
    #: top-k boundary get more gradient and the selection can move further from its start)
    temperature: float = 1.0
    chunk_tokens: int = 64
    max_tokens: int = 192
    #: None: the model's own tokenizer; "bytes" for tiny test models
    tokenizer: str | None = None
    dtype: str | None = None


QUICK = Budget(steps=4, texts_per_domain=8)


def training_data(path: Path, texts_per_domain: int, seed: int = 0) -> int:
    """Write the controls' training JSONL: the four domains' training sides, interleaved.

    Text domains give ``{"text", "instruction"}`` records, the docstring domain
    ``{"prompt", "completion", "instruction"}``; every record also names its ``domain``."""
    per: dict[str, list[dict]] = {}
    for d in corpora.DOMAINS:
        if d == "docstring":
            found = corpora.pairs(d, "train", texts_per_domain, seed=seed)
            per[d] = [{"prompt": p, "completion": c} for p, c in found]
        else:
            per[d] = [{"text": t} for t in corpora.texts(d, "train", texts_per_domain, min_chars=1200, seed=seed)]
        for r in per[d]:
            r.update(instruction=corpora.INSTRUCTIONS[d], domain=d)
    path.parent.mkdir(parents=True, exist_ok=True)
    return corpora.write_jsonl(path, [per[d][i] for i in range(texts_per_domain) for d in corpora.DOMAINS])


def row_kind(control: Control, joint: bool) -> str:
    return control.kind + ("-joint" if joint else "")


def config_for(control: Control, joint: bool, model: str, data: Path, out: Path, budget: Budget) -> dict:
    b = budget
    return {
        "model": model, "tokenizer": b.tokenizer, "dtype": b.dtype, "data": str(data), "out": str(out),
        "stage": 1, "keep": b.keep, "train_llm": joint, "chunk_tokens": b.chunk_tokens, "max_tokens": b.max_tokens,
        "batch_size": b.batch_size, "steps": b.steps, "lr": b.lr, "llm_lr": b.llm_lr, "seed": b.seed,
        # a checkpoint every quarter of the run, but none more often than every 10 steps: a
        # joint row's checkpoint holds the whole LLM, and writing it after each of --quick's
        # few steps cost more than the steps themselves
        "save_every": max(b.steps // 4, 10),
        "predictor": {"encoder_layers": b.encoder_layers, "temperature": b.temperature, "init": "static",
                      **control.predictor},
    }


@dataclass
class Trained:
    control: Control
    joint: bool
    setup: object  # train.Setup, with the trained predictor (and LLM) in memory
    losses: list[float]
    seconds: float

    @property
    def kind(self) -> str:
        return row_kind(self.control, self.joint)

    def final_loss(self, last: int = 20) -> float:
        """The mean training loss of the last ``last`` steps."""
        tail = self.losses[-last:]
        return sum(tail) / len(tail)


def select(kinds: str | None) -> tuple[Control, ...]:
    """The controls named in ``kinds`` (comma-separated, e.g. "static-learned,per-task"), in
    ``CONTROLS`` order; every control for None. The static learned mask is always needed:
    every other trained row is compared against it."""
    from ..errors import IFPError

    if kinds is None:
        return CONTROLS
    names = [k.strip() for k in kinds.split(",") if k.strip()]
    known = {c.kind: c for c in CONTROLS}
    bad = [k for k in names if k not in known]
    if bad:
        raise IFPError(f"--control-kinds: unknown control {', '.join(map(repr, bad))}; "
                       f"choose from {', '.join(known)}")
    if "static-learned" not in names:
        raise IFPError("--control-kinds must include static-learned: every trained row is compared against it")
    return tuple(c for c in CONTROLS if c.kind in names)


def train_controls(model: str, work: Path, budget: Budget, joint_modes=(False, True), log=None,
                   controls: tuple[Control, ...] = CONTROLS) -> list[Trained]:
    """Train the control rows (resuming finished or interrupted ones from ``work``)."""
    import time

    from ..errors import IFPError
    from ..train import TrainError, config_from_dict, run, setup

    data = work / "train.jsonl"
    with status(f"writing the controls' training data ({budget.texts_per_domain} records per domain)"):
        training_data(data, budget.texts_per_domain, budget.seed)
    out = []
    for joint in joint_modes:
        for c in controls:
            kind = row_kind(c, joint)
            cfg = config_from_dict(config_for(c, joint, model, data, work / kind, budget), where=f"control {kind}")
            if log:
                log(f"training {kind}: {budget.steps} steps x {budget.batch_size} examples"
                    f"{', LLM trained too' if joint else ', LLM frozen'}")
            start = time.perf_counter()
            s = setup(cfg)
            try:
                result = run(cfg, setup_=s)
            except TrainError as e:
                if "written by a run with another config" not in str(e):
                    raise
                raise IFPError(f"{e}\n(eval --controls: pass another --work directory, or remove {work / kind}, "
                               "to train this row anew)") from None
            out.append(Trained(c, joint, s, result.losses, time.perf_counter() - start))
    return out


def sources(trained: list[Trained]) -> list[MaskSource]:
    """One eval row per trained control; joint rows bring their trained LLM."""
    out = []
    for t in trained:
        predictor = t.setup.predictor
        predictor.eval()

        def masks_for(ids, predictor=predictor):
            import torch

            with torch.no_grad():
                return [m.detach() for m in predictor(ids)]

        suffix = ", LLM trained with it" if t.joint else ""
        out.append(MaskSource(t.control.name + suffix, t.kind, masks_for, t.control.per_task,
                              model=t.setup.model if t.joint else None, program=t.setup.program if t.joint else None,
                              reads=t.control.reads))
    return out


#: the rows issue 19's target is about, and how many domains they must win
TARGET_KINDS = ("per-task", "per-task-joint", "per-input", "per-input-joint")
TARGET_DOMAINS = 3


def verdict(data: dict) -> list[dict]:
    """Issue 19's target, read from an ``eval.json`` dict: per trained per-task/per-input row,
    the domains where it beats its static learned mask with the 95% interval excluding 0,
    where it is worse beyond noise, where its own masks win the task swap, and whether both
    hold in at least ``TARGET_DOMAINS`` domains."""
    rows = {r["kind"]: r["name"] for r in data.get("rows", [])}
    wins = data.get("swap_diagonal_wins") or {}
    out = []
    for kind in TARGET_KINDS:
        name = rows.get(kind)
        if name is None:
            continue
        ivs = [iv for iv in data.get("intervals", []) if iv["row"] == name]
        better = [iv["domain"] for iv in ivs if iv["excludes_zero"] and iv["mean"] < 0]
        worse = [iv["domain"] for iv in ivs if iv["excludes_zero"] and iv["mean"] > 0]
        swap = wins.get(name)
        own = None if swap is None else [d for d, won in swap.items() if won]
        both = [d for d in better if own is not None and d in own]
        out.append({"row": name, "baseline": ivs[0]["baseline"] if ivs else None, "domains": len(ivs),
                    "better": better, "worse": worse, "swap_own_wins": own, "better_and_own_wins": both,
                    "met": len(both) >= TARGET_DOMAINS})
    return out


def verdict_lines(data: dict) -> list[str]:
    lines = []
    for v in verdict(data):
        own = "not measured (--swap)" if v["swap_own_wins"] is None else (", ".join(v["swap_own_wins"]) or "none")
        lines.append(f"  {v['row']} vs {v['baseline']}: better beyond noise in "
                     f"{', '.join(v['better']) or 'no domain'} ({len(v['better'])}/{v['domains']}); worse in "
                     f"{', '.join(v['worse']) or 'no domain'}; own masks win the swap in {own}; target "
                     f"(both in >= {TARGET_DOMAINS} domains): {'met' if v['met'] else 'NOT met'}")
    return (["", "issue 19's target: a trained per-task row beats the static learned mask trained with the same "
             "budget (95% interval excluding 0) and its own masks win the task swap:"] + lines) if lines else []

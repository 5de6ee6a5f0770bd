"""Joint training of the IFPredictor and the LLM through the masked program.

One source of truth: the LLM forward used in training *is* the masked reference
program (``insert_masks(ep).module()``: inputs ``input_ids`` and ``ffn_masks``), whose
parameters are the Hugging Face model's own ``Parameter`` objects. Training therefore
optimises exactly the math that ``specialize`` later folds into small dense weights,
and the trained model re-exports as is.

Masks differ per example (each example's predictor input gives its own mask) while the
program takes one mask per block, so a step runs its examples one at a time and
averages their losses (each example's loss is the mean over its target tokens). That
equal weighting is what makes data parallelism exact: every rank averages its share,
DDP averages the ranks, and the result is the single-process global-batch mean.
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import IFPError
from ..predictors.base import keep_counts
from ..predictors.if_predictor import IFPredictor, LMEncoder
from ..progress import quiet, status
from . import checkpoint as ckpt
from .config import TrainConfig, TrainError
from .data import ByteTokenizer, Example, load_examples
from .master_weights import MasterWeights

CHECKPOINT = "checkpoint"


# --------------------------------------------------------------------------------------
# the model side
# --------------------------------------------------------------------------------------
def load_model(model: str, dtype=None):
    """(HF causal LM, tokenizer) for a config's ``model``: "default", a directory or a GGUF file,
    in ``dtype`` (None: the model's own, float32 for GGUF)."""
    from ..build import BuildError, Source
    from ..errors import IFPError

    try:
        source = Source(model, keep=1.0, dtype=dtype)
    except (BuildError, IFPError) as e:
        raise TrainError(str(e)) from None
    if source.kind not in ("default", "hf", "gguf"):
        raise TrainError(f"model {model}: training needs a Hugging Face model (directory, .gguf or 'default'), "
                         f"not a .{source.kind} file")
    return source.torch_model()  # a directory without tokenizer files gives tokenizer None


def load_model_and_tokenizer(model: str, tokenizer: str | None = "model", dtype=None):
    """``load_model`` plus the tokenizer choice every command offers: the model's own
    (``"model"``/None) or bytes (``"bytes"``, for tiny test models without tokenizer files)."""
    lm, tok = load_model(model, dtype)
    if tokenizer == "bytes":
        return lm, ByteTokenizer(int(lm.config.vocab_size))
    if tok is None:
        raise TrainError(f"model {model} has no tokenizer files; use the byte tokenizer for a test model "
                         "(--tokenizer bytes, or \"tokenizer\": \"bytes\" in a training config)")
    return lm, tok


def make_predictor(model: nn.Module, widths: list[int], cfg: TrainConfig) -> IFPredictor:
    p = cfg.predictor
    if p.kind == "scales":
        from ..predictors import StaticScales

        try:
            return StaticScales(widths, cfg.keep)
        except IFPError as e:
            raise TrainError(f"keep: {e}") from None
    if p.encoder_model is not None:
        encoder_lm, _ = load_model(p.encoder_model, cfg.dtype)
        # one tokenizer feeds both the encoder and the LLM (as in specialize(program, text))
        if int(encoder_lm.config.vocab_size) != int(model.config.vocab_size):
            raise TrainError(f"predictor.encoder_model {p.encoder_model} has a vocabulary of "
                             f"{encoder_lm.config.vocab_size} tokens, the model {model.config.vocab_size}: "
                             "the encoder must use the model's tokenizer")
        encoder = LMEncoder(encoder_lm)
    else:
        try:
            encoder = LMEncoder(model, num_layers=p.encoder_layers)
        except IFPError as e:
            raise TrainError(f"predictor.encoder_layers: {e}") from None
    try:
        counts = keep_counts(widths, cfg.keep)
    except IFPError as e:
        raise TrainError(f"keep: {e}") from None
    for i, (k, w) in enumerate(zip(counts, widths)):
        if k < 1:
            raise TrainError(f"keep: FFN block {i} would keep {k} of {w} channels; every block keeps at least 1")
    torch.manual_seed(cfg.seed)  # the head's initialisation is part of the run's identity
    return IFPredictor(encoder, widths, counts, mlp_hidden=p.mlp_hidden, temperature=p.temperature,
                       iterations=p.iterations, straight_through=p.straight_through)


def example_loss(logits: torch.Tensor, ex: Example) -> torch.Tensor:
    """Mean next-token cross-entropy over the example's target tokens."""
    ids = torch.tensor(ex.input_ids, device=logits.device)
    weight = torch.tensor(ex.loss_mask[1:], dtype=torch.float32, device=logits.device)
    ce = nn.functional.cross_entropy(logits[0, :-1].float(), ids[1:], reduction="none")
    return (ce * weight).sum() / weight.sum()


class MaskedLMLoss(nn.Module):
    """The local batch loss: predictor -> masks -> masked program -> mean example loss."""

    def __init__(self, predictor: IFPredictor, lm: nn.Module):
        super().__init__()
        self.predictor = predictor
        self.lm = lm

    def logits(self, ex: Example) -> torch.Tensor:
        device = next(self.lm.parameters()).device
        masks = self.predictor(torch.tensor([ex.predictor_ids], device=device))
        return self.lm(torch.tensor([ex.input_ids], device=device), masks)

    def forward(self, examples: list[Example]) -> torch.Tensor:
        return sum(example_loss(self.logits(ex), ex) for ex in examples) / len(examples)


@dataclass
class Setup:
    """Everything a run (or an evaluation) needs, built from a config."""

    config: TrainConfig
    model: nn.Module  # the Hugging Face model; its Parameters are the program's
    tokenizer: object
    program: torch.export.ExportedProgram  # the plain export
    masked: torch.export.ExportedProgram  # insert_masks(program): the reference semantics
    predictor: IFPredictor
    loss: MaskedLMLoss
    widths: list[int] = field(default_factory=list)

    def llm_parameters(self) -> dict[str, nn.Parameter]:
        return dict(self.model.named_parameters())

    def predictor_parameters(self) -> dict[str, nn.Parameter]:
        """The predictor's own parameters (those shared with the LLM are the LLM's)."""
        shared = {id(p) for p in self.model.parameters()}
        return {n: p for n, p in self.predictor.named_parameters() if id(p) not in shared}

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters trained from scratch at ``lr``; a separate pretrained encoder gets ``llm_lr``."""
        return list(self.predictor.head.parameters())


def setup(cfg: TrainConfig) -> Setup:
    from ..capture import export
    from ..passes import find_ffn_blocks, insert_masks

    model, tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype=cfg.dtype)
    program = export(model, (torch.zeros(1, 8, dtype=torch.long),), dynamic_shapes="seq")
    masked = insert_masks(program)
    widths = [b.width for b in find_ffn_blocks(program)]
    predictor = make_predictor(model, widths, cfg)
    lm = masked.module()
    return Setup(cfg, model, tok, program, masked, predictor, MaskedLMLoss(predictor, lm), widths)


def check_vocabulary(examples: list[Example], predictor: IFPredictor, model: nn.Module, data: str) -> None:
    """Ids beyond either vocabulary mean the tokenizer belongs to another model."""
    vocab = int(model.config.vocab_size)
    for i, ex in enumerate(examples):
        top_in = max(ex.input_ids)
        if top_in >= vocab:
            raise TrainError(f"{data}: example {i} has token id {top_in} but the model's vocabulary has "
                             f"{vocab} entries (tokenizer/vocabulary mismatch)")
        top_pred = max(ex.predictor_ids)
        if predictor.vocab_size is not None and top_pred >= predictor.vocab_size:
            raise TrainError(f"{data}: example {i} gives the predictor token id {top_pred} but its encoder's "
                             f"vocabulary has {predictor.vocab_size} entries (tokenizer/vocabulary mismatch)")


# --------------------------------------------------------------------------------------
# data order and distribution
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(n, generator=g).tolist())


def batch_indices(n: int, batch: int, step: int, seed: int) -> list[int]:
    """The global batch of a step: a seeded permutation per epoch, walked in order.

    A pure function of (n, batch, step, seed): a resumed run and every rank agree on it
    without any state.
    """
    out = []
    for pos in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(pos, n)
        out.append(_epoch_order(n, seed, epoch)[offset])
    return out


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the ``torchrun`` process group if there is one (gloo on CPU, NCCL on GPU)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if torch.cuda.is_available():  # pragma: no cover - no GPU on the CI machines
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        if not dist.is_initialized():
            dist.init_process_group("nccl")
        return World(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local))
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return World(dist.get_rank(), dist.get_world_size())


def _mean_across(value: torch.Tensor, world: World) -> float:
    if world.size == 1:
        return float(value.detach())
    import torch.distributed as dist

    v = value.detach().clone()
    dist.all_reduce(v)
    return float(v) / world.size


# --------------------------------------------------------------------------------------
# the loop
# --------------------------------------------------------------------------------------
def _nonfinite_advice(s: Setup) -> str:
    cfg = s.config
    lower = f"lower lr (now {cfg.lr}) or llm_lr ({cfg.llm_lr})"
    if next(s.model.parameters()).dtype == torch.float16:  # float16 overflows at 65504
        return f"in float16 this is usually an overflow: train in bfloat16 or float32 (\"dtype\"), or {lower}"
    return lower


def _optimizer(s: Setup) -> tuple[torch.optim.Optimizer, MasterWeights]:
    """AdamW over the trainable parameters, stepping float32 copies of the half-precision ones."""
    cfg = s.config
    llm = list(s.llm_parameters().values())
    for p in llm:
        p.requires_grad_(cfg.train_llm)
    head = {id(p) for p in s.head_parameters()}
    own = [p for p in s.predictor_parameters().values() if p.requires_grad]
    groups = [{"params": [p for p in own if id(p) in head], "lr": cfg.lr}]
    encoder = [p for p in own if id(p) not in head]  # a separate pretrained encoder model
    if encoder:
        groups.append({"params": encoder, "lr": cfg.llm_lr})
    if cfg.train_llm:
        groups.append({"params": llm, "lr": cfg.llm_lr})
    master = MasterWeights(p for g in groups for p in g["params"])
    for g in groups:
        g["params"] = [master.stand_in(p) for p in g["params"]]
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay), master


def static_scores(program: torch.export.ExportedProgram, examples: list[Example]) -> list[torch.Tensor]:
    """GRIFFIN's channel scores averaged over ``examples`` (calibration text): their top-k
    is the static mask, the baseline a trained predictor has to beat."""
    from ..predictors import PromptActivationPredictor

    with torch.no_grad():
        probe = PromptActivationPredictor(program, keep=1.0)
        totals = None
        for ex in examples:
            sc = probe.channel_scores(torch.tensor([ex.input_ids]))
            totals = sc if totals is None else [a + b for a, b in zip(totals, sc)]
    return [t / len(examples) for t in totals]


def _static_init(s: Setup, examples: list[Example]) -> None:
    """Start the head at the static mask of the first training examples."""
    n = min(s.config.predictor.init_examples, len(examples))
    with status(f"static initialisation from {n} training examples"):
        s.predictor.init_from_scores(static_scores(s.program, examples[:n]), scale=s.config.predictor.init_scale)


@dataclass
class Result:
    losses: list[float]
    steps: int
    checkpoint: Path
    tokens_per_second: float


def _progress(total: int, start: int, world: World):
    if quiet() or not world.main:
        return None
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", file=sys.stderr, unit="step")


def run(cfg: TrainConfig, *, setup_: Setup | None = None, stop_after: int | None = None) -> Result:
    """Train per ``cfg`` (resuming from ``cfg.out/checkpoint`` when it exists).

    ``stop_after`` ends the run early after that many steps *in total* (as if killed
    right after a checkpoint): the resume tests use it.
    """
    world = init_world()
    if cfg.batch_size % world.size:
        raise TrainError(f"batch_size {cfg.batch_size} must be divisible by the number of processes ({world.size})")
    s = setup_ or setup(cfg)
    examples = load_examples(cfg.data, cfg.stage, s.tokenizer, cfg.chunk_tokens, cfg.max_tokens, cfg.predictor.input)
    check_vocabulary(examples, s.predictor, s.model, cfg.data)
    ck = Path(cfg.out) / CHECKPOINT
    if world.main:
        ckpt.recover(ck)
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()
    resuming = cfg.resume and (ck / "state.json").is_file()
    if cfg.predictor.init == "static" and not resuming:
        _static_init(s, examples)
    s.loss.to(world.device)  # before the optimizer, so its state lives beside the parameters
    optimizer, master = _optimizer(s)
    step, losses = 0, []
    if resuming:
        state = ckpt.read_state(ck)
        _check_same_run(state, cfg, ck)
        ckpt.load_into(master.swap(s.predictor_parameters()), ck / "predictor.safetensors", "predictor")
        if cfg.train_llm:
            ckpt.load_into(master.swap(s.llm_parameters()), ck / "llm.safetensors", "model")
        master.to_model()
        ckpt.load_optimizer(ck, optimizer, state)
        step, losses = int(state["step"]), list(state["losses"])
    module: nn.Module = s.loss
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        on_gpu = world.device.type == "cuda"
        module = DistributedDataParallel(s.loss, device_ids=[world.device.index] if on_gpu else None)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    bar = _progress(cfg.steps, step, world)
    tokens, t0 = 0, time.perf_counter()
    while step < end:
        batch = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        local = [examples[i] for i in batch[world.rank::world.size]]
        optimizer.zero_grad(set_to_none=True)
        loss = module(local)
        loss.backward()
        value = _mean_across(loss, world)
        if not math.isfinite(value):  # before the update: the last checkpoint stays good
            raise TrainError(f"step {step + 1}: the loss is {value}; " + _nonfinite_advice(s))
        master.grads_to_master()
        norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip))
        if not math.isfinite(norm):  # before the update, like the loss check
            raise TrainError(f"step {step + 1}: the gradient norm is {norm} (loss {value:.4f}); "
                             + _nonfinite_advice(s))
        optimizer.step()
        master.to_model()
        step += 1
        losses.append(value)
        tokens += sum(len(ex.input_ids) for ex in local) * world.size
        if bar is not None:
            rate = tokens / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
        if cfg.save_every and step % cfg.save_every == 0 and step < end:
            _save(s, optimizer, master, step, losses, ck, world)
    if bar is not None:
        bar.close()
    _save(s, optimizer, master, step, losses, ck, world)
    rate = tokens / max(time.perf_counter() - t0, 1e-9)
    return Result(losses, step, ck, rate)


#: config keys a resumed run may change (they do not alter the trajectory so far)
RESUMABLE = {"steps", "save_every", "out", "resume"}


def _check_same_run(state: dict, cfg: TrainConfig, ck: Path) -> None:
    """Resume only the run that wrote the checkpoint: anything else would not be exact."""
    saved, now = state.get("config", {}), cfg.to_json()
    differ = sorted(k for k in set(saved) | set(now) if k not in RESUMABLE and saved.get(k) != now.get(k))
    if differ:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r}, config {now.get(k)!r}" for k in differ)
        raise TrainError(f"checkpoint {ck} was written by a run with another config ({detail}); "
                         "set \"resume\": false or use another \"out\" to start a new run")


def _save(s: Setup, optimizer, master: MasterWeights, step: int, losses: list[float], ck: Path,
          world: World) -> None:
    if world.main:
        cfg = s.config
        state = {"step": step, "losses": losses, "config": cfg.to_json(), "predictor": s.predictor.config()}
        ckpt.save_checkpoint(ck, predictor_params=master.swap(s.predictor_parameters()),
                             llm_params=master.swap(s.llm_parameters()) if cfg.train_llm else None,
                             optimizer=optimizer, state=state)
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def load_predictor(checkpoint, widths: list[int] | None = None):
    """``(predictor, tokenizer, sha256)`` of a training checkpoint, for computing masks only:
    its model is loaded (the encoder may be the LLM's own first layers) but not exported.

    ``widths``: the FFN widths of the model the masks are for; a checkpoint trained for
    other widths is refused. A checkpoint whose LLM was trained too (``llm.safetensors``)
    is refused: its masks were learnt for the trained weights, which a build of the base
    model would not have. ``sha256`` identifies the predictor (its parameters, its shape
    and its training config): a build records it and rebuilds tasks when it changes.
    """
    ck = Path(checkpoint)
    if not ck.is_dir():
        raise TrainError(f"predictor checkpoint {ck} is not a directory (give the checkpoint directory "
                         "`ifp-compile train` wrote)")
    state = ckpt.read_state(ck)
    if (ck / "llm.safetensors").is_file():
        raise TrainError(f"predictor checkpoint {ck} was trained together with its LLM (llm.safetensors): its masks "
                         "are for the trained LLM's weights, not the base model's; build from a checkpoint of a "
                         "predictor trained with the LLM frozen")
    from .config import config_from_dict

    cfg = config_from_dict(state["config"], where=f"{ck}/state.json")
    shape = state.get("predictor") or {}
    trained_widths = shape.get("widths")
    if widths is not None and trained_widths is not None and list(trained_widths) != list(widths):
        raise TrainError(f"predictor checkpoint {ck} was trained for FFN widths {trained_widths[:4]}... "
                         f"({len(trained_widths)} blocks), the model has {widths[:4]}... ({len(widths)} blocks): "
                         "a predictor of another model?")
    model, tok = load_model_and_tokenizer(cfg.model, cfg.tokenizer, dtype=cfg.dtype)
    if trained_widths is None:
        raise TrainError(f"{ck}/state.json does not record the predictor's widths (a checkpoint of an older version?)")
    predictor = make_predictor(model, list(trained_widths), cfg)
    shared = {id(p) for p in model.parameters()}
    own = {n: p for n, p in predictor.named_parameters() if id(p) not in shared}
    ckpt.load_into(own, ck / "predictor.safetensors", "predictor")
    predictor.eval()
    if cfg.predictor.input == "constant":
        from .data import CONSTANT_INPUT, encode

        predictor = ConstantInput(predictor, torch.tensor([encode(tok, CONSTANT_INPUT)]))
    return predictor, tok, predictor_sha256(ck)


class ConstantInput(nn.Module):
    """A predictor trained on one constant input (``predictor.input: "constant"``, a static
    learned mask) answers every instruction with that input's masks: fed the instruction
    itself it would give masks it was never trained to give."""

    def __init__(self, predictor: nn.Module, ids: torch.Tensor):
        super().__init__()
        self.inner = predictor
        self.ids = ids
        self.widths, self.counts = predictor.widths, predictor.counts

    def batch_masks(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [m.expand(input_ids.shape[0], -1) for m in self.inner.batch_masks(self.ids)]

    def forward(self, instruction_ids: torch.Tensor) -> list[torch.Tensor]:
        return self.inner(self.ids)


def predictor_sha256(checkpoint) -> str:
    """What identifies a trained predictor: its parameters, its shape and its training
    config (not its loss log or optimizer state), read from the files alone."""
    import hashlib
    import json

    ck = Path(checkpoint)
    if not ck.is_dir():
        raise TrainError(f"predictor checkpoint {ck} is not a directory (give the checkpoint directory "
                         "`ifp-compile train` wrote)")
    state = ckpt.read_state(ck)
    if not (ck / "predictor.safetensors").is_file():
        raise TrainError(f"predictor checkpoint {ck} has no predictor.safetensors")
    h = hashlib.sha256()
    h.update(ckpt.sha256_of(ck / "predictor.safetensors").encode())
    h.update(json.dumps({"config": state["config"], "predictor": state.get("predictor")}, sort_keys=True).encode())
    return h.hexdigest()


def load_trained(checkpoint, setup_: Setup) -> IFPredictor:
    """Load a checkpoint's predictor (and LLM weights, if trained) into a fresh setup."""
    ck = Path(checkpoint)
    state = ckpt.read_state(ck)
    ckpt.load_into(setup_.predictor_parameters(), ck / "predictor.safetensors", "predictor")
    if (ck / "llm.safetensors").is_file():
        ckpt.load_into(setup_.llm_parameters(), ck / "llm.safetensors", "model")
    if state.get("predictor", {}).get("counts") not in (None, setup_.predictor.counts):
        raise TrainError(f"checkpoint {ck} keeps {state['predictor']['counts']} channels per block, "
                         f"this predictor keeps {setup_.predictor.counts}")
    return setup_.predictor


@torch.no_grad()
def evaluate(lm: nn.Module, examples: list[Example], masks_for) -> float:
    """Mean example loss of the masked program ``lm`` with ``masks_for(example)`` masks."""
    total = 0.0
    for ex in examples:
        logits = lm(torch.tensor([ex.input_ids]), masks_for(ex))
        total += float(example_loss(logits, ex))
    return total / len(examples)

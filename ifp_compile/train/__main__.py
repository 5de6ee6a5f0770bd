"""``python -m ifp_compile.train --config CONFIG`` (and under ``torchrun``)."""

from __future__ import annotations

import argparse
import sys

from ..errors import IFPError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="training config (JSON; see docs/training.md)")
    from ..cli import _positive_int

    p.add_argument("--steps", type=_positive_int, default=None, help="override the config's number of steps")


def train_main(args: argparse.Namespace) -> int:
    from .config import load_config
    from .trainer import init_world, run

    cfg = load_config(args.config)
    if args.steps is not None:
        cfg.steps = args.steps
    result = run(cfg)
    if init_world().main:
        last = f"{result.losses[-1]:.4f}" if result.losses else "n/a"
        print(f"trained {result.steps} steps; last loss {last}; {result.tokens_per_second:.0f} tokens/s; "
              f"checkpoint {result.checkpoint}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ifp_compile.train", description="Train an IFPruning mask predictor.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return train_main(args)
    except IFPError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The ``report`` subcommand's arguments and entry point (wired into ``ifp_compile.cli``)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="a build directory (ifp-compile build) or an eval directory (ifp-compile eval --out)")
    p.add_argument("--out", metavar="FILE", help="the HTML file to write (default DIRECTORY/report.html)")
    p.add_argument("--speed", metavar="FILE",
                   help="a decode-benchmark JSON (python benchmarks/decode.py --json FILE) to add as the speed "
                   "table (default DIRECTORY/speed.json when it exists)")


def report_main(args: argparse.Namespace) -> int:
    from . import write_report

    out = write_report(args.directory, out=args.out, speed=args.speed)
    print(f"wrote {out}")
    return 0


__all__ = ["add_arguments", "report_main"]

"""``edge-ptycho reproduce``: the command line of :mod:`edge_ptycho_bluesky.reproduce`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import reproduce
from .reproduce import ReproduceConfig, run_reproduce


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("reproduce", help="reproduce the paper's figures on simulated data",
                              description=reproduce.__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="output folder (results.json, pictures)")
    p.add_argument("--quick", action="store_true", help="the small set (about 10 minutes on 2 CPU cores)")
    p.add_argument("--model", default="ptychonn2-fast", help="architecture to train (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch/ONNX Runtime threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_reproduce)


def _cmd_reproduce(args: argparse.Namespace) -> int:
    options = dict(model=args.model, threads=args.threads, seed=args.seed, progress=sys.stderr.isatty())
    config = (ReproduceConfig.quick_config(args.out, **options) if args.quick
              else ReproduceConfig(out=args.out, **options))
    t0 = time.perf_counter()
    rows = run_reproduce(config)
    print("| figure | method | condition | metric | value | paper |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['figure']} | {r['method']} | {r['condition']} | {r['metric']} | {r['value']} | "
              f"{'' if r['paper'] is None else r['paper']} |")
    print(f"\n{len(rows)} rows in {args.out / 'results.json'}, pictures in {args.out}; "
          f"{time.perf_counter() - t0:.0f} s")
    return 0

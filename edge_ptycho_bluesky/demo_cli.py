"""``edge-ptycho demo``: the whole workflow on the simulated beamline (:mod:`edge_ptycho_bluesky.demo`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .demo import DemoConfig, run_demo

__all__ = ["add_subcommand"]


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho demo --out DIR [--quick] [--full] [--data-dir DIR]``."""
    parser = subparsers.add_parser("demo", help="run the whole workflow on the simulated beamline")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="embedded Tiled catalog directory (default: OUT/tiled)")
    parser.add_argument("--quick", action="store_true", help="small scans (for tests)")
    parser.add_argument("--full", action="store_true",
                        help="train the first model from scratch and retrain it on a second labelled scan "
                             "(tens of minutes on a CPU) instead of the shipped model adapting to the test scan")
    parser.set_defaults(func=lambda args: _main(args))


def _main(args: argparse.Namespace) -> int:
    summary = run_demo(DemoConfig(out=args.out, data_dir=args.data_dir, quick=args.quick, full=args.full))
    print(json.dumps(summary, indent=2))
    return 0

"""The ``edge-ptycho`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


#: Modules that register a subcommand with ``add_subcommand(subparsers)``.
SUBCOMMAND_MODULES = (
    "edge_ptycho_bluesky.demo",
    "edge_ptycho_bluesky.training.registry",
    "edge_ptycho_bluesky.training.trainer",
    "edge_ptycho_bluesky.model.cli",
    "edge_ptycho_bluesky.edge.worker",
    "edge_ptycho_bluesky.recon.cli",
    "edge_ptycho_bluesky.model.infer_cli",
    "edge_ptycho_bluesky.bench_cli",
    "edge_ptycho_bluesky.reproduce",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edge-ptycho", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_subcommand(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "tiled", "bluesky"):  # per-request chatter
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

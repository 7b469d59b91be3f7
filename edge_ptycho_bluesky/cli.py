"""The ``edge-ptycho`` command line."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys


#: Each command and the module that registers it with ``add_subcommand(subparsers)``.
COMMANDS = {
    "demo": "edge_ptycho_bluesky.demo_cli",
    "import-onnx": "edge_ptycho_bluesky.training.registry_cli",
    "registry": "edge_ptycho_bluesky.training.registry_cli",
    "train": "edge_ptycho_bluesky.training.cli",
    "adapt": "edge_ptycho_bluesky.training.cli",
    "model": "edge_ptycho_bluesky.model.cli",
    "worker": "edge_ptycho_bluesky.edge.cli",
    "recon": "edge_ptycho_bluesky.recon.cli",
    "infer": "edge_ptycho_bluesky.model.infer_cli",
    "bench": "edge_ptycho_bluesky.bench_cli",
    "reproduce": "edge_ptycho_bluesky.reproduce_cli",
    "ioc": "edge_ptycho_bluesky.ioc.cli",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line; with ``command``, only that command's module is imported (a worker
    process then starts without loading the trainer, the demo or the benchmarks)."""
    parser = argparse.ArgumentParser(prog="edge-ptycho", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = [COMMANDS[command]] if command in COMMANDS else list(dict.fromkeys(COMMANDS.values()))
    for module in modules:
        try:
            importlib.import_module(module).add_subcommand(sub)
        except ModuleNotFoundError as exc:  # an edge box installed with the worker extra alone
            for name in (c for c, m in COMMANDS.items() if m == module):
                _unavailable(sub, name, exc)
    return parser


def _unavailable(sub: argparse._SubParsersAction, name: str, exc: ModuleNotFoundError) -> None:  # type: ignore[type-arg]
    """A command whose dependencies this installation lacks: it says which, and how to add them."""
    why = (f"'edge-ptycho {name}' needs {exc.name!r}, which is not installed here (an installation with the "
           "worker extra alone runs 'edge-ptycho worker'); install 'edge_ptycho_bluesky[beamline]'")
    p = sub.add_parser(name, help=f"(not installed: needs {exc.name})", add_help=False, prefix_chars="+")
    p.add_argument("rest", nargs="*")  # whatever was given: the answer is the same

    def refuse(args: argparse.Namespace) -> int:
        print(f"edge-ptycho: {why}", file=sys.stderr)
        return 2

    p.set_defaults(func=refuse)


def _command(argv: list[str]) -> str | None:
    """The command named on the command line (its first word that is not an option)."""
    return next((word for word in argv if not word.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "tiled", "bluesky"):  # per-request chatter
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

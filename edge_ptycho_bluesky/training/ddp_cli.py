"""Command-line options of the data-parallel training entry point,
``python -m edge_ptycho_bluesky.training.ddp`` (one rank, run under torchrun; see
:mod:`edge_ptycho_bluesky.training.ddp`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the DDP entry point."""
    p = argparse.ArgumentParser(
        prog="python -m edge_ptycho_bluesky.training.ddp",
        description="Data-parallel PtychoNN training; run it under torchrun.",
    )
    p.add_argument("--corpus", nargs="+", type=Path, required=True, metavar="FILE",
                   help="labelled scan files (edge_ptycho_bluesky.recon.labels)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder (model.pt, result.json, curves.*)")
    p.add_argument("--model", default="ptychonn2", help="architecture (default: %(default)s)")
    p.add_argument("--model-kwargs", type=json.loads, default={}, metavar="JSON",
                   help='extra build_model arguments as JSON, e.g. \'{"nconv": 8}\'')
    p.add_argument("--init", type=Path, default=None, metavar="FILE.pt",
                   help="warm start from this state dict")
    p.add_argument("--config", type=json.loads, default={}, metavar="JSON",
                   help="TrainConfig as JSON (TrainConfig.to_dict(); absent keys: the defaults)")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the validation splits and batch order (default: the config's seed)")
    p.add_argument("--probe", type=Path, default=None, metavar="FILE.npy",
                   help="complex probe in the units of the network input, for the physics losses")
    p.add_argument("--log-level", default="INFO")
    return p

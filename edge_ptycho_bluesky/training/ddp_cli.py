"""Command-line options of the data-parallel training entry point,
``python -m edge_ptycho_bluesky.training.ddp`` (one rank, run under torchrun; see
:mod:`edge_ptycho_bluesky.training.ddp`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .config import TrainConfig

__all__ = ["build_parser"]


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of the DDP entry point."""
    d = TrainConfig()
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
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch size")
    p.add_argument("--lr-min", type=float, default=d.lr_min)
    p.add_argument("--lr-max", type=float, default=d.lr_max)
    p.add_argument("--half-cycle-epochs", type=float, default=d.half_cycle_epochs)
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--seed", type=int, default=d.seed, help="weights seed")
    p.add_argument("--split-seed", type=int, default=None,
                   help="seed of the validation splits and batch order (default: --seed)")
    p.add_argument("--count-scale", type=float, default=None, help="preprocess scale")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d.amp,
                   help="mixed precision on CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--log-level", default="INFO")
    return p

"""``edge-ptycho train``: train PtychoNN on labelled scans (files, or stored scans by uid) and
publish the model into the registry; ``edge-ptycho adapt``: fine-tune the deployed model on a
scan's own frames with the physics loss (:mod:`~edge_ptycho_bluesky.training.adapt`)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..model.scan_inference import load_scan
from ..storage import StorageError, connect
from .adapt import HELD_OUT_FRACTION, adapt_scan
from .config import TrainConfig
from .continual import ContinualTrainer
from .corpus import load_labelled_files
from .labelling import load_labelled_scan_from_tiled
from .registry import ModelRegistry
from .registry_checks import RegistryError
from .registry_cli import add_registry_argument

__all__ = ["add_subcommand"]


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho train`` and ``edge-ptycho adapt``."""
    p = subparsers.add_parser(
        "train",
        help="train PtychoNN on labelled scans and publish it into the model registry",
        description="Train one increment (Adam, L1 by default, triangular2 cyclic LR, fresh 10 %% "
        "validation split per epoch, best-validation model kept) on labelled scan files, "
        "warm-starting from the deployed model, and publish the result (ONNX + model.pt).",
    )
    p.add_argument("--corpus", nargs="+", type=Path, default=[], metavar="FILE",
                   help="labelled scan files (edge_ptycho_bluesky.recon.labels)")
    p.add_argument("--scan", action="append", default=[], metavar="UID",
                   help="a stored scan (in the Tiled of EDGE_PTYCHO_DATA_DIR / EDGE_PTYCHO_TILED_URI) to "
                        "add: its labels stored in Tiled, else rPIE labels made now (repeatable)")
    p.add_argument("--rpie-iterations", type=int, default=None, metavar="N",
                   help="rPIE iterations for --scan runs without stored labels (default: rPIE's)")
    add_registry_argument(p)
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="folder for curves and exports (default: a temporary folder)")
    p.add_argument("--model", default="ptychonn2", choices=("ptychonn2", "ptychonn2-fast"),
                   help="architecture (default: %(default)s; ptychonn2-fast: the CPU-sized variant)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--seconds", type=float, default=None,
                   help="time budget: stop training after this many seconds (the best validated state is kept)")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--loss", default=TrainConfig.loss, choices=("mae", "mse"),
                   help="training loss (default: %(default)s, the paper's)")
    p.add_argument("--loss-window", type=float, default=None, metavar="R",
                   help="count only a centred disk of radius R x the patch side (the beam), e.g. 0.3")
    p.add_argument("--augment", action="store_true",
                   help="random rotations/reflections of frames and labels (exact for a symmetric probe)")
    p.add_argument("--lr-min", type=float, default=TrainConfig.lr_min)
    p.add_argument("--lr-max", type=float, default=TrainConfig.lr_max)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--count-scale", type=_count_scale_arg, default="auto", metavar="auto|none|X",
                   help="input scale given to preprocess: a number, 'none' (raw counts) or "
                   "'auto' (default: the deployed model's recorded scale when warm-starting, "
                   "else the brightest training pixel -> ~100)")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the deployed model's model.pt (default: yes)")
    p.add_argument("--ddp-procs", type=int, default=1, metavar="N",
                   help="data-parallel processes under torchrun (default: 1, no DDP)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (single process)")
    p.add_argument("--validate", type=Path, default=None, metavar="FILE",
                   help="held-out labelled scan that gives the recorded validation SSIM "
                   "(default: the last corpus scan, which is in the training data)")
    p.add_argument("--no-deploy", action="store_true", help="publish without deploying")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)

    a = subparsers.add_parser(
        "adapt",
        help="fine-tune the deployed model on a scan's own frames with the physics loss (no labels)",
        description="Fine-tune the deployed model on the frames of INPUT with the Poisson deviance of their "
        "counts under the predicted phase (no labels, no rPIE), within a time budget; publish the result, and "
        "deploy it when its physics loss on held-out frames of INPUT is below the deployed model's. Prints "
        "one JSON line: version, loss_before, loss_after, seconds, deployed (and more).",
    )
    a.add_argument("input", metavar="INPUT", help="CXI file, or the uid of a run in the configured Tiled")
    add_registry_argument(a)
    a.add_argument("--seconds", type=float, default=120.0, help="time budget (default: %(default)s s)")
    a.add_argument("--epochs", type=int, default=50, help="at most this many epochs (default: %(default)s)")
    a.add_argument("--probe", type=Path, default=None, metavar="FILE.npy",
                   help="complex (N, N) probe, when INPUT records none (e.g. an rPIE reconstruction's)")
    a.add_argument("--held-out", type=float, default=HELD_OUT_FRACTION, metavar="F",
                   help="share of the frames held out for the deployment decision (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0)
    a.set_defaults(func=_cmd_adapt)


def _count_scale_arg(text: str) -> float | str | None:
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--count-scale takes a number, 'none' or 'auto', got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    try:
        scans = load_labelled_files(args.corpus)
        if args.scan:
            client = connect()  # once for every --scan (an embedded catalog takes seconds to open)
            scans += [load_labelled_scan_from_tiled(uid, client=client, rpie_iterations=args.rpie_iterations)
                      for uid in args.scan]
        if not scans:
            raise ValueError("no training data: pass --corpus FILE ... or --scan UID")
        registry = ModelRegistry(args.registry)
        scale = args.count_scale
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
            num_threads=args.threads, count_scale=scale, progress=not args.no_progress, loss=args.loss,
            loss_window=args.loss_window, augment=args.augment, lr_min=args.lr_min, lr_max=args.lr_max,
            time_budget_s=args.seconds,
        )
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            trainer = ContinualTrainer(args.model, config, workdir)
            for scan in scans:
                trainer.add_scan(scan)
            if args.warm_start:
                trainer.warm_start_from_registry(registry)
            result = trainer.train(nproc=args.ddp_procs)
            held_out = load_labelled_files([args.validate])[-1] if args.validate else scans[-1]
            quality = trainer.evaluate(held_out)
            mv = trainer.export_and_publish(
                registry, validation_ssim=_clip_ssim(quality.stitched_ssim),
                deploy=not args.no_deploy,
                extra={"validation_scan": held_out.scan_uid,
                       "validation_held_out": args.validate is not None},
            )
    except (ValueError, TypeError, KeyError, FileNotFoundError, RegistryError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"trained {result.n_train + result.n_val} frames x {len(result.history)} epochs in "
        f"{result.time_s:.1f} s ({result.samples_per_s:.1f} samples/s); best validation MAE "
        f"{result.best_val_loss:.4f} rad at epoch {result.best_epoch}; SSIM on "
        f"{held_out.scan_uid}: {quality.stitched_ssim:.3f}; published {mv.version}"
        f"{'' if args.no_deploy else ' (deployed)'}"
    )
    return 0


def _clip_ssim(value: float | None) -> float | None:
    """The registry wants SSIM in (0, 1]; a useless model may score <= 0."""
    if value is None:
        return None
    return float(min(1.0, max(value, 1e-6)))


def _cmd_adapt(args: argparse.Namespace) -> int:
    try:
        probe = None if args.probe is None else np.load(args.probe)
        scan = load_scan(args.input).scan
        result = adapt_scan(scan, args.registry, seconds=args.seconds, epochs=args.epochs, probe=probe,
                            held_out_fraction=args.held_out, seed=args.seed)
    except (ValueError, TypeError, KeyError, FileNotFoundError, RegistryError, StorageError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_json_dict()))
    return 0

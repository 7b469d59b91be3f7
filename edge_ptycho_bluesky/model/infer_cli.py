"""``edge-ptycho infer``: phase-retrieve a stored scan with a registry model and stitch it.

::

    edge-ptycho infer INPUT --registry DIR --out OUT.cxi [--version V]
                      [--engine auto|onnxruntime|torch|tensorrt] [--batch-size 64]
                      [--refine SECONDS] [--probe FILE.npy]

What it reads and writes: :mod:`edge_ptycho_bluesky.model.scan_inference`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..storage import StorageError
from ..training.registry_checks import RegistryError
from ..training.registry_cli import add_registry_argument
from .errors import EngineUnavailable
from .scan_inference import infer_scan, load_scan, refine_result, refinement_probe, write_result

__all__ = ["add_subcommand"]


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho infer`` on the top-level CLI's subparsers."""
    p = subparsers.add_parser(
        "infer",
        help="phase-retrieve a stored scan (CXI file or Tiled run uid) with a registry model",
        description="Infer every frame of a scan with the deployed (or --version) registry model, "
        "stitch the phase and write it, with the per-frame patches, to a CXI file.",
    )
    p.add_argument("input", metavar="INPUT", help="CXI file, or the uid of a run in the configured Tiled")
    add_registry_argument(p)
    p.add_argument("--out", type=Path, required=True, metavar="OUT.cxi", help="output CXI file")
    p.add_argument("--version", default=None, help="registry version (default: the deployed one)")
    p.add_argument("--engine", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="frames per engine call (default: %(default)s)")
    p.add_argument("--scale", type=float, default=None,
                   help="input count scale (default: the one recorded with the model)")
    p.add_argument("--weight", choices=("probe", "uniform"), default="probe",
                   help="stitching weight (default: probe amplitude when the input has a probe)")
    p.add_argument("--refine", type=float, default=0.0, metavar="SECONDS",
                   help="also refine the AI image with AI-seeded rPIE for this long and write it as "
                   "/entry_1/image_2 (default: %(default)s, AI only)")
    p.add_argument("--probe", type=Path, default=None, metavar="FILE.npy",
                   help="probe for --refine (default: the scan's, else the model version's probe.npy)")
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
        out = Path(args.out)
        if Path(args.input).exists() and out.resolve() == Path(args.input).resolve():
            raise ValueError(f"--out {out} is the input file; write to another file")
        if not args.refine >= 0:
            raise ValueError(f"--refine must be a number of seconds >= 0, got {args.refine}")
        loaded = load_scan(args.input)
        result = infer_scan(loaded, args.registry, version=args.version, engine=args.engine,
                            batch_size=args.batch_size, scale=args.scale, weight=args.weight)
        refined, probe_source = None, ""
        if args.refine > 0:
            probe, probe_source = refinement_probe(loaded, args.registry, result.version, args.probe)
            refined = refine_result(loaded, result, probe, seconds=args.refine)
        write_result(out, loaded, result, registry=args.registry, refined=refined, probe_source=probe_source)
    except (RegistryError, EngineUnavailable, StorageError, ValueError, FileNotFoundError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
    n = len(result.patches)
    print(f"{result.version} ({result.engine}): {n} frames in {result.seconds:.2f} s "
          f"({n / max(result.seconds, 1e-9):.0f} frames/s); stitched phase {result.image.shape} -> {out}")
    if refined is not None:
        print(f"refined: {refined.sweeps} rPIE sweeps in {refined.seconds:.1f} s "
              f"({refined.frame_updates_per_s:.0f} frame-updates/s, probe from {probe_source}) -> "
              f"{out}:/entry_1/image_2/data")
    return 0

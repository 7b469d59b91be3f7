"""``edge-ptycho recon INPUT --out OUT.cxi``: iterative (rPIE) reconstruction of a stored scan.

``INPUT`` is a CXI file (see :mod:`edge_ptycho_bluesky.io.cxi`) or the uid of a run in the configured
Tiled catalog (:meth:`edge_ptycho_bluesky.storage.StorageConfig.from_env`). The starting probe is
the input's illumination when it has one (CXI ``/entry_1/instrument_1/source_1/illumination``, or a
probe stored in the run's start document), else a modelled zone-plate probe of the recorded beam
diameter (:func:`edge_ptycho_bluesky.recon.probe_init.modelled_probe`, ``--beam-diameter-nm`` for CXI
input), else the data-derived guess. The output CXI holds the frames and positions, the object in
``/entry_1/image_1/data`` (complex64) with its pixel size, and the refined probe as the illumination.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..io.cxi import CXIReconstruction, PtychoScan, read_cxi, write_cxi
from ..runs import read_scan
from ..storage import StorageConfig, connect, get_run
from .reconstruct import reconstruct_scan
from .rpie_options import RPIEOptions

__all__ = ["add_subcommand"]

logger = logging.getLogger(__name__)


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``recon`` on the top-level CLI's subparsers."""
    parser = subparsers.add_parser(
        "recon", help="rPIE reconstruction of a CXI file or a stored run uid, written to CXI",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="CXI file, or uid (or unique uid prefix) of a run in the configured Tiled")
    parser.add_argument("--out", type=Path, required=True, help="destination .cxi file (overwritten)")
    parser.add_argument("--iterations", type=int, default=100, help="rPIE iterations (default 100)")
    parser.add_argument("--alpha", type=float, default=0.1, help="object regularisation in [0, 1] (1: ePIE-like)")
    parser.add_argument("--batch-size", type=int, default=64, help="frames per mini-batch (default 64)")
    parser.add_argument("--device", default=None, help="torch device: cpu, cuda, cuda:1 (default: CUDA if present)")
    parser.add_argument("--no-probe-update", action="store_true", help="keep the starting probe fixed")
    parser.add_argument("--probe-modes", type=int, default=1, help="incoherent probe modes (default 1)")
    parser.add_argument("--beam-diameter-nm", type=float, default=None,
                        help="beam diameter for the modelled starting probe when the input has no probe")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_run)


def _load_input(text: str) -> PtychoScan:
    path = Path(text)
    if path.exists() or path.suffix.lower() in (".cxi", ".h5", ".hdf5"):
        return read_cxi(path)
    return read_scan(get_run(connect(StorageConfig.from_env()), text))


def _run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        torch.set_num_threads(int(args.threads))
    try:
        options = RPIEOptions(iterations=args.iterations, alpha=args.alpha, batch_size=args.batch_size,
                              device=args.device, update_probe=not args.no_probe_update,
                              probe_modes=args.probe_modes, progress=not args.no_progress)
        scan = _load_input(args.input)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"edge-ptycho recon: {exc}")
        return 2
    diameter = args.beam_diameter_nm if args.beam_diameter_nm is not None else scan.beam_diameter_nm
    source = "the input's illumination" if scan.probe is not None else (
        f"a modelled {diameter:.0f} nm zone-plate probe" if diameter else "the data-derived guess")
    print(f"reconstructing {len(scan)} frames of {scan.frames.shape[-1]} px from {args.input} "
          f"({args.iterations} iterations, starting probe: {source})")
    result = reconstruct_scan(scan, beam_diameter_nm=diameter, options=options)
    pixel_m = scan.geometry.pixel_size_nm * 1e-9
    recon = CXIReconstruction(object=result.object, pixel_size_m=(pixel_m, pixel_m), probe=result.probe)
    out = write_cxi(args.out, scan, recon)
    final = result.errors[-1] if len(result.errors) else float("nan")
    print(f"wrote {out}: object {result.object.shape}, final error {final:.4g}, "
          f"{result.time_s:.1f} s ({result.frame_updates_per_s:.0f} frame-updates/s)")
    return 0

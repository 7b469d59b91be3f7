"""``edge-ptycho ioc``: the simulated beamline IOC's command line (also ``python -m
edge_ptycho_bluesky.ioc.cli``, how :class:`~edge_ptycho_bluesky.ioc.process.IocProcess` starts it)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .server import DEFAULT_PREFIX, serve_forever

DESCRIPTION = (
    "A simulated ptychography beamline IOC: motor records PREFIXm1/m2 (um), an ADSimDetector-compatible "
    "driver PREFIXcam1:, an NDFileHDF5-compatible writer PREFIXHDF1: and the NTNDArray stream "
    "PREFIXPva1:Image, whose frames are the simulated sample's diffraction at the stage's position.")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help=f"record prefix (default {DEFAULT_PREFIX})")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to serve on (default 127.0.0.1: loopback only; 0.0.0.0: every interface)")
    p.add_argument("--sample", default="test", choices=["train", "varied", "test"],
                   help="simulated sample (default test: letters)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and the photon noise (default 0)")
    p.add_argument("--extent", type=float, default=1.6, help="largest |x|, |y| of the beam (um, default 1.6)")
    p.add_argument("--velocity", type=float, default=200.0, help="axis speed (um/s, default 200)")
    p.add_argument("--save-probe", type=Path, default=None, metavar="FILE.npy",
                   help="write the simulated probe (complex, photons/s) to FILE.npy: the probe= of a plan, as a "
                        "reference scan's reconstruction would give it at a real beamline")
    p.add_argument("--no-pva", action="store_true", help="do not serve PREFIXPva1:Image")
    p.add_argument("--list-pvs", action="store_true", help="print the record names and exit")


def add_subcommand(sub: Any) -> None:
    p = sub.add_parser("ioc", help="run the simulated beamline IOC (EPICS records)", description=DESCRIPTION)
    _add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve the IOC until SIGINT/SIGTERM."""
    return serve_forever(args.prefix, host=args.host, sample=args.sample, extent_um=args.extent, seed=args.seed,
                         velocity_um_s=args.velocity, pva=not args.no_pva, save_probe=args.save_probe,
                         list_pvs=args.list_pvs)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_ptycho_bluesky.ioc.cli", description=DESCRIPTION)
    _add_arguments(p)
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

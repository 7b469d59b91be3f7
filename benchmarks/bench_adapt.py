"""Label-free adaptation on unseen scans: SSIM of the AI image against the truth before and after
``edge-ptycho adapt`` (the physics loss on the scan's own frames, no labels).

For each overlap: a photon-counted Fermat-spiral scan of letters (features no model here was
trained on) with the simulated beamline's probe; a registry holding the starting network (the
model shipped with the package, ``--start shipped``, default; or a fresh, untrained one,
``--start fresh``); the stitched AI phase before,
:func:`~edge_ptycho_bluesky.training.adapt.adapt_scan` within ``--seconds``, the stitched AI phase
of the adapted model after. SSIM over the scanned region, the mean phase removed (the counts do
not fix it).

    .venv/bin/python benchmarks/bench_adapt.py [--seconds 120] [--points 200] [--overlaps 0.9,0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_ptycho_bluesky.io.cxi import PtychoScan
from edge_ptycho_bluesky.metrics import compare
from edge_ptycho_bluesky.model import build_model, export_onnx, load_model, save_state_dict
from edge_ptycho_bluesky.reproduce import BEAM_UM, simulate_scan
from edge_ptycho_bluesky.sim import step_for_overlap
from edge_ptycho_bluesky.stitching import stitch
from edge_ptycho_bluesky.training.adapt import DEFAULT_CONFIG, adapt_scan
from edge_ptycho_bluesky.training.evaluate import predict_phases
from edge_ptycho_bluesky.training.loop import auto_count_scale
from edge_ptycho_bluesky.training.registry import ModelRegistry
from edge_ptycho_bluesky.training.shipped import init_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import record, write_json  # noqa: E402  (benchmarks/records.py)


def ai_ssim(model: torch.nn.Module, scan, scale: float) -> float:
    patches = predict_phases(model, scan.frames, count_scale=scale, batch_size=64)
    image, _ = stitch(patches, scan.positions, shape=scan.truth.shape, weight=np.abs(scan.sample.probe))
    ok = scan.mask() & np.isfinite(image)
    return float(compare(scan.truth, image, ok)["ssim"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--overlaps", default="0.9,0")
    parser.add_argument("--model", default="ptychonn2-fast", choices=("ptychonn2", "ptychonn2-fast"),
                        help="architecture of a fresh start")
    parser.add_argument("--start", choices=("shipped", "fresh"), default="shipped")
    parser.add_argument("--lr-max", type=float, default=None, help="peak learning rate (default: adapt's)")
    parser.add_argument("--consistency", type=float, default=None, help="overlap-consistency weight (default: adapt's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the records (bench.json format) here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = None
    if args.lr_max is not None or args.consistency is not None:
        config = DEFAULT_CONFIG.with_updates(**{k: v for k, v in (
            ("lr_max", args.lr_max), ("lr_min", None if args.lr_max is None else args.lr_max / 5),
            ("consistency_weight", args.consistency)) if v is not None})
    print(f"{'overlap':>7} {'frames':>6} {'SSIM before':>11} {'SSIM after':>10} {'loss before':>11} "
          f"{'loss after':>10} {'epochs':>6} {'s':>5}")
    for overlap in (float(o) for o in args.overlaps.split(",")):
        step = step_for_overlap(overlap, BEAM_UM) if overlap > 0 else BEAM_UM
        scan = simulate_scan("test", args.points, step, seed=11)
        with tempfile.TemporaryDirectory() as tmp:
            registry = ModelRegistry(Path(tmp) / "models")
            if args.start == "shipped":
                start = init_registry(registry.root)
                name = start.manifest["model"]
                model, scale = load_model(start.torch_path, name), start.input_scale
            else:
                torch.manual_seed(0)
                name, model, scale = args.model, build_model(args.model), auto_count_scale(scan.frames)
                registry.publish({"model.onnx": export_onnx(model.eval(), Path(tmp) / "m.onnx"),
                                  "model.pt": save_state_dict(model, Path(tmp) / "m.pt")},
                                 model=name, extra={"preprocess": {"scale": scale}})
            before = ai_ssim(model, scan, scale)
            ptycho = PtychoScan(frames=scan.frames, positions_m=scan.xy_um * 1e-6, geometry=scan.sample.geometry,
                                probe=scan.sample.probe, uid=f"letters-overlap-{overlap:g}", exposure_s=scan.exposure_s)
            t0 = time.perf_counter()
            result = adapt_scan(ptycho, registry, seconds=args.seconds, epochs=args.epochs, config=config)
            seconds = time.perf_counter() - t0
            adapted = load_model(registry.get(result.version).torch_path, name)
        after = ai_ssim(adapted, scan, scale)
        print(f"{overlap:>7g} {args.points:>6d} {before:>11.3f} {after:>10.3f} {result.loss_before:>11.4g} "
              f"{result.loss_after:>10.4g} {result.epochs:>6d} {seconds:>5.0f}")
        record("adapt", model=name, start=args.start, overlap=overlap, frames=args.points, ssim_before=before,
               ssim_after=after, loss_before=result.loss_before, loss_after=result.loss_after,
               epochs=result.epochs, seconds=seconds, deployed=result.deployed)
    write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A simulated training corpus with true-phase labels: ``--scans`` Fermat-spiral scans of varied
samples (etched features, Siemens-star sectors, gratings, grainy patches, words in several fonts:
``sim.make_sample("varied")``) with the simulated beamline's probe and geometry, photon-counted at
``--exposure`` s; each scan's labels are the true phase cut at its windows. One labelled-scan file
per scan (``recon.labels.save_corpus``), ready for ``edge-ptycho train --corpus``.

    .venv/bin/python benchmarks/simulated_corpus.py --out corpus/ [--scans 100] [--frames 200] [--seed 1000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from edge_ptycho_bluesky.recon.labels import LabelledScan, extract_labels, save_corpus
from edge_ptycho_bluesky.reproduce import BEAM_UM
from edge_ptycho_bluesky.sim import fermat_spiral, make_sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scans", type=int, default=100)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--exposure", type=float, default=0.01, help="seconds per frame (default: the demo's)")
    parser.add_argument("--seed", type=int, default=1000)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    for k in tqdm(range(args.scans), desc="scans", unit="scan"):
        seed = args.seed + k
        step = float(rng.uniform(0.04, 0.3))  # overlaps from ~0.95 to ~0.6: the labels do not need overlap
        sample = make_sample("varied", extent_um=step * np.sqrt(args.frames) + 0.05, seed=seed,
                             beam_diameter_nm=BEAM_UM * 1e3)
        xy = fermat_spiral(args.frames, step)
        frames = sample.measure(xy, args.exposure, rng=seed).astype(np.float32)
        positions = sample.window_positions(xy)
        phases, ref = extract_labels(sample.transmission, positions)
        scan = LabelledScan(frames=frames, phases=phases, positions=positions, scan_uid=f"sim-varied-{seed}",
                            pixel_size_nm=sample.geometry.pixel_size_nm, phase_reference=ref,
                            metadata={"labels": "true phase of the simulated sample", "exposure_s": args.exposure,
                                      "sample": "varied", "seed": seed, "step_um": step})
        save_corpus(args.out / f"varied_{seed}.h5", scan)
    print(f"{args.scans} scans x {args.frames} frames in {time.perf_counter() - t0:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

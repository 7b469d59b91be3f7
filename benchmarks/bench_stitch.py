"""Throughput of stitching 128 x 128 patches (batch and incremental) and of the metrics.

Run::

    .venv/bin/python benchmarks/bench_stitch.py            # full (963-point spirals)
    .venv/bin/python benchmarks/bench_stitch.py --quick    # smaller, a few seconds

Prints a table of patches/s (best of ``--repeat`` runs) for:

* the batch form :func:`stitch` on a Fermat spiral of 963 points (the paper's scan length) at
  overlap 0.9 (step 50 nm at 6.8 nm pixels ~ 7.4 px) and with no overlap (step 460 nm ~ 68 px),
  with and without a probe-amplitude weight map;
* :class:`IncrementalStitcher.add` with batches of 1, 16 and 64 patches;
* the fully vectorised ``np.bincount`` scatter, for comparison with the per-patch slice loop;
* reading the live image, and the metrics on the stitched image.

2 kHz needs 2,000 patches/s; the ratio column says how far above that each path is.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import numpy as np

from edge_ptycho_bluesky.metrics import compare, frc_resolution, scanned_mask
from records import record as bench_record, write_json  # benchmarks/records.py
from edge_ptycho_bluesky.stitching import IncrementalStitcher, _bincount_accumulate, stitch
from edge_ptycho_bluesky.stitching_grid import grid_from_positions

PATCH = 128
TARGET_RATE = 2000.0


def fermat_spiral(n: int, step: float) -> np.ndarray:
    """(n, 2) patch corners of a Fermat spiral with roughly `step` pixels between points."""
    k = np.arange(n)
    rad = step * 0.56 * np.sqrt(k)
    th = k * np.pi * (3 - np.sqrt(5))
    centres = np.stack([rad * np.sin(th), rad * np.cos(th)], axis=1)
    return centres - centres.min(axis=0) + 0.37  # sub-pixel corners >= 0


def probe_amplitude(n: int = PATCH) -> np.ndarray:
    """A donut-like amplitude (defocused zone-plate probe), zero in the corners."""
    yy, xx = np.mgrid[0:n, 0:n] - n / 2
    r = np.hypot(yy, xx)
    amp = np.exp(-((r - n / 5) ** 2) / (2 * (n / 10) ** 2))
    amp[r > n / 2] = 0.0
    return amp.astype(np.float32)


def best_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def incremental_run(
    patches: np.ndarray, pos: np.ndarray, batch: int, weight: np.ndarray | None
) -> Callable[[], object]:
    def run() -> IncrementalStitcher:
        st = IncrementalStitcher.from_positions(pos, patch_shape=(PATCH, PATCH), weight=weight)
        for i in range(0, len(patches), batch):
            st.add(patches[i:i + batch], pos[i:i + batch])
        return st

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 points, 2 repeats")
    parser.add_argument("--points", type=int, default=None, help="scan points (default 963)")
    parser.add_argument("--repeat", type=int, default=None, help="repeats, best is kept")
    parser.add_argument("--json", default=None, help="write the records (bench.json format) here")
    args = parser.parse_args(argv)
    n = args.points or (256 if args.quick else 963)
    repeat = args.repeat or (2 if args.quick else 3)

    rng = np.random.default_rng(0)
    patches = (rng.standard_normal((n, PATCH, PATCH)) * 0.3).astype(np.float32)
    weight = probe_amplitude()
    rows: list[tuple[str, str, float, float]] = []

    def record(label: str, grid: str, seconds: float, count: int) -> None:
        rows.append((label, grid, count / seconds, seconds / count * 1e6))
        bench_record("stitch", engine=label, batch=count, fps=count / seconds, grid=grid)

    for name, step in (("overlap 0.9", 7.4), ("no overlap", 68.0)):
        pos = fermat_spiral(n, step)
        shape, _ = grid_from_positions(pos, (PATCH, PATCH))
        grid = f"{shape[0]}x{shape[1]}"
        record(f"stitch() batch, {name}", grid,
               best_time(lambda pos=pos: stitch(patches, pos), repeat), n)
        record(f"stitch() batch + weight, {name}", grid,
               best_time(lambda pos=pos: stitch(patches, pos, weight=weight), repeat), n)
        for batch in (1, 16, 64):
            record(f"incremental add, batch {batch}, {name}", grid,
                   best_time(incremental_run(patches, pos, batch, None), repeat), n)
        record(f"incremental add + weight, batch 16, {name}", grid,
               best_time(incremental_run(patches, pos, 16, weight), repeat), n)
        corner = np.floor(pos).astype(np.int64)
        frac = pos - corner
        shape_b = (shape[0] + 1, shape[1] + 1)
        record(f"np.bincount scatter (reference), {name}", grid,
               best_time(lambda c=corner, f=frac, s=shape_b:
                         _bincount_accumulate(s, patches, c, f), 1), n)

    # live reads and metrics on the overlap-0.9 image
    pos = fermat_spiral(n, 7.4)
    st = incremental_run(patches, pos, 64, None)()
    image = st.image
    t_img = best_time(lambda: st.image, 5)
    mask = scanned_mask(pos, (PATCH, PATCH), st.shape, origin=st.origin, inset=16)
    ref = np.where(mask, image, 0.0) + 0.05 * rng.standard_normal(image.shape)
    t_cmp = best_time(lambda: compare(ref, image, mask), repeat)
    t_frc = best_time(lambda: frc_resolution(ref, image, mask), repeat)
    big_pos = fermat_spiral(n, 68.0)
    st_big = IncrementalStitcher.from_positions(big_pos, patch_shape=(PATCH, PATCH))
    st_big.add(patches[:64], big_pos[:64])
    t_big = best_time(st_big.snapshot, 3)

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# bench_stitch: {n} patches of {PATCH}x{PATCH} float32, best of {repeat}")
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}, numpy {np.__version__}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print()
    print(f"| {'path':<52} | {'grid':>9} | {'patches/s':>10} | {'us/patch':>8} | "
          f"{'x 2 kHz':>7} |")
    print(f"|{'-' * 54}|{'-' * 11}|{'-' * 12}|{'-' * 10}|{'-' * 9}|")
    for label, grid, rate, us in rows:
        print(f"| {label:<52} | {grid:>9} | {rate:>10,.0f} | {us:>8.1f} | "
              f"{rate / TARGET_RATE:>7.1f} |")
    print()
    print(f"| {'operation on the ' + str(st.shape) + ' image':<52} | {'ms':>9} |")
    print(f"|{'-' * 54}|{'-' * 11}|")
    print(f"| {'IncrementalStitcher.image (live read)':<52} | {t_img * 1e3:>9.2f} |")
    label = f"snapshot() on the no-overlap grid {st_big.shape}"
    print(f"| {label:<52} | {t_big * 1e3:>9.2f} |")
    print(f"| {'compare() (ssim, pearson, rms) on scanned_mask':<52} | {t_cmp * 1e3:>9.2f} |")
    print(f"| {'frc_resolution() on scanned_mask':<52} | {t_frc * 1e3:>9.2f} |")
    write_json(args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Streaming, AI-seeded rPIE: image quality against the truth, speed, and what it costs the AI path.

Quality (per overlap): a photon-counted Fermat-spiral scan of letters (features the shipped model
never saw) arrives at ``--rate`` Hz in chunks; the shipped model infers each frame; a
:class:`~edge_ptycho_bluesky.recon.streaming.StreamingRefiner` takes frames and patches as they
arrive and sweeps in between, then refines for ``--seconds`` after the last frame. SSIM against
the truth (mean phase removed, over the scanned hull) of: the AI mosaic alone; rPIE alone, the same
refiner fed the same frames on the same schedule without the network's patches (the same time and
the same code); and the refined image, at 1, 2, 5 and 10 s after the last frame.

Speed: frame-updates per second of the sweeps at overlap 0.9 (128 x 128 frames).

Measured data (``--siemens``): Tike's measured Siemens star (516 frames, no truth). The refiner
with the shipped model's patches as seeds, the file's probe fixed, then refined from the 258th
frame on (``probe_refine_after``), for ``--seconds`` after the last frame, against offline rPIE of
the whole scan (40 iterations, probe refined): SSIM between the two over the well-lit area, and the
data error of each.

AI path under load (``--latency``): ``bench_stream.py`` at 500 Hz with the shipped model (publisher
-> worker -> stitched patch over loopback pvAccess), alone and while a refiner process sweeps a
scan as it does while frames arrive (one thread, idle scheduling class, half the wall time),
``--repeats`` times; the median p99 latencies are compared.

    .venv/bin/python benchmarks/bench_refine.py [--overlaps 0.9,0.3,0] [--points 200] [--seconds 10]
                                                [--rate 500] [--threads 2] [--latency] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_ptycho_bluesky.metrics import compare
from edge_ptycho_bluesky.model import load_model
from edge_ptycho_bluesky.recon.streaming import RefineOptions, StreamingRefiner
from edge_ptycho_bluesky.reproduce import BEAM_UM, simulate_scan
from edge_ptycho_bluesky.sim import step_for_overlap
from edge_ptycho_bluesky.training.evaluate import predict_phases
from edge_ptycho_bluesky.training.shipped import SHIPPED_DIR, SHIPPED_MODEL, init_registry

sys.path.insert(0, str(Path(__file__).resolve().parent))
from records import record, write_json  # noqa: E402  (benchmarks/records.py)

CHECKPOINTS_S = (1.0, 2.0, 5.0, 10.0)
#: The model shipped with the package (the fast variant: it keeps up with 500 Hz on 2 cores).
SHIPPED_ONNX = SHIPPED_DIR / SHIPPED_MODEL / "model.onnx"


def stream(scan, patches, rate: float, seconds: float, threads: int, chunk: int = 20):
    """Feed the scan at ``rate`` Hz (sweeping while waiting), then refine; SSIM at the checkpoints."""
    beam_px = BEAM_UM * 1e3 / scan.sample.geometry.pixel_size_nm
    ref = StreamingRefiner(scan.truth.shape, scan.sample.probe, beam_diameter_px=beam_px,
                           options=RefineOptions(threads=threads, tolerance=0.0))
    mask = scan.mask()
    start = time.perf_counter()
    for i in range(0, len(scan.frames), chunk):
        due = start + (i + chunk) / rate
        ref.add(scan.frames[i:i + chunk], scan.positions[i:i + chunk],
                None if patches is None else patches[i:i + chunk])
        while time.perf_counter() < due:
            ref.sweep()
    during = ref.stats.sweeps
    scores, elapsed = {}, 0.0
    for checkpoint in sorted({c for c in CHECKPOINTS_S if c < seconds} | {seconds}):
        ref.refine(checkpoint - elapsed)
        elapsed = checkpoint
        scores[checkpoint] = float(compare(scan.truth, ref.image, mask)["ssim"])
    return ref, during, scores


def quality(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        mv = init_registry(Path(tmp) / "models")
        model, scale = load_model(mv.torch_path, mv.manifest["model"]), mv.input_scale
    print(f"{'overlap':>7} {'frames':>6} {'AI':>6} {'rPIE':>6} {'refined':>7}   refined at "
          + ", ".join(f"{c:g}" for c in CHECKPOINTS_S) + " s after the last frame;  frame-updates/s")
    for overlap in (float(o) for o in args.overlaps.split(",")):
        step = step_for_overlap(overlap, BEAM_UM) if overlap > 0 else BEAM_UM
        scan = simulate_scan("test", args.points, step, seed=11)
        patches = predict_phases(model, scan.frames, count_scale=scale, batch_size=64)
        ref, during, refined = stream(scan, patches, args.rate, args.seconds, args.threads)
        ai = float(compare(scan.truth, ref.ai_image, scan.mask())["ssim"])
        alone, _, rpie = stream(scan, None, args.rate, args.seconds, args.threads)
        final = refined[args.seconds]
        low, high = np.percentile(ref.density[scan.mask()], [5, 100])
        print(f"{overlap:>7g} {args.points:>6d} {ai:>6.3f} {rpie[args.seconds]:>6.3f} {final:>7.3f}   "
              + ", ".join(f"{v:.3f}" for v in refined.values())
              + f";  {ref.stats.frame_updates_per_s:,.0f} ({during} sweeps during the scan, "
              f"{ref.stats.sweeps} in all); frame density {low:.2f}-{high:.2f} (5th percentile-max)")
        record("refine", model=mv.manifest["model"], rate=args.rate, ssim=final, overlap=overlap,
               frames_published=args.points, ssim_ai=ai, ssim_rpie_alone=rpie[args.seconds],
               ssim_refined_at=refined, refine_seconds=args.seconds, threads=args.threads,
               frame_updates_per_s=ref.stats.frame_updates_per_s, sweeps=ref.stats.sweeps,
               sweeps_during_scan=during, rpie_alone_sweeps=alone.stats.sweeps,
               frame_density_p5=float(low), frame_density_max=float(high))


def siemens(args: argparse.Namespace) -> None:
    from edge_ptycho_bluesky.io.cxi import load_siemens_star
    from edge_ptycho_bluesky.recon.rpie import rpie

    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "siemens-star-small.npz.bz2"
    if not path.exists():
        print(f"measured Siemens star skipped: {path} is absent")
        return
    scan, positions = load_siemens_star(path)
    shape = (int(positions[:, 0].max()) + 128 + 4, int(positions[:, 1].max()) + 128 + 4)
    reference = rpie(scan.frames, positions, probe=scan.probe, object_shape=shape, iterations=40, alpha=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        mv = init_registry(Path(tmp) / "models")
        model, scale = load_model(mv.torch_path, mv.manifest["model"]), mv.input_scale
    patches = predict_phases(model, scan.frames, count_scale=scale, batch_size=64)
    mask = reference.scanned_mask(0.5)
    for label, refine_after in (("probe fixed", None), ("probe refined from frame 258", 258)):
        ref = StreamingRefiner(shape, scan.probe, options=RefineOptions(
            threads=args.threads, tolerance=0.0, probe_refine_after=refine_after))
        start = time.perf_counter()
        for i in range(0, len(scan.frames), 20):  # at --rate, sweeping in between
            ref.add(scan.frames[i:i + 20], positions[i:i + 20], patches[i:i + 20])
            while time.perf_counter() < start + (i + 20) / args.rate:
                ref.sweep()
        ref.refine(args.seconds)
        ai = compare(reference.phase, ref.ai_image, mask, remove_ramp=True)["ssim"]
        refined = compare(reference.phase, ref.image, mask, remove_ramp=True)["ssim"]
        error = ref.stats.error
        print(f"Siemens star, {label}: SSIM against offline rPIE: AI {ai:.3f}, refined {refined:.3f} "
              f"after {ref.stats.sweeps} sweeps ({ref.stats.frame_updates_per_s:,.0f} frame-updates/s); data "
              f"error refined {error:.4f}, offline rPIE {reference.errors[-1]:.4f}")
        record("refine-siemens", ssim=refined, ssim_ai=ai, probe=label, sweeps=ref.stats.sweeps,
               frame_updates_per_s=ref.stats.frame_updates_per_s, data_error=float(error),
               data_error_rpie=float(reference.errors[-1]), refine_seconds=args.seconds)


def load(seconds: float, live_duty: float) -> int:
    """Background refiner as the session runs it while a scan's frames arrive (one thread, nice
    19, ``live_duty``) sweeping a dense scan for ``seconds`` (the --latency load)."""
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    scan = simulate_scan("test", 200, step_for_overlap(0.9, BEAM_UM), seed=11)
    ref = StreamingRefiner(scan.truth.shape, scan.sample.probe,
                           options=RefineOptions(tolerance=0.0, live_duty=live_duty))
    ref.add(scan.frames, scan.positions)
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        ref.sweep()  # as while frames arrive: at the live duty cycle
    print(json.dumps(ref.stats.to_dict()))
    return 0


def _stream_500hz(here: Path) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, str(here / "bench_stream.py"), "--rates", "500",
                        "--model", str(SHIPPED_ONNX), "--json", out.name], check=True)
        return json.loads(Path(out.name).read_text())[0]


def latency(args: argparse.Namespace) -> None:
    """``--repeats`` pairs of 500 Hz runs, alone then beside a refiner process; the medians compared
    (a single 10-s p99 on a shared 2-core machine varies several-fold)."""
    import statistics

    here = Path(__file__).resolve().parent
    pairs = []
    for repeat in range(args.repeats):
        alone = _stream_500hz(here)
        background = subprocess.Popen([sys.executable, __file__, "--role", "load", "--seconds", "60",
                                       "--live-duty", str(args.live_duty)], stdout=subprocess.PIPE, text=True)
        time.sleep(5)  # let it build its scan and start sweeping
        try:
            loaded = _stream_500hz(here)
        finally:
            background.terminate()
            background.wait()
        pairs.append((alone, loaded))
        print(f"AI path at 500 Hz, run {repeat + 1}: p99 alone {alone['latency_p99_ms']:.1f} ms, with the refiner "
              f"{loaded['latency_p99_ms']:.1f} ms ({100 * (loaded['latency_p99_ms'] / alone['latency_p99_ms'] - 1):+.0f} %); "
              f"p50 {alone['latency_p50_ms']:.1f} / {loaded['latency_p50_ms']:.1f} ms; "
              f"{loaded['frames_inferred']}/{loaded['frames_published']} inferred")
    base = statistics.median(a["latency_p99_ms"] for a, _ in pairs)
    with_refiner = statistics.median(b["latency_p99_ms"] for _, b in pairs)
    print(f"median p99 over {len(pairs)} runs: {base:.1f} ms alone, {with_refiner:.1f} ms with the refiner "
          f"(live duty {args.live_duty:g}): {100 * (with_refiner / base - 1):+.0f} %")
    last = pairs[-1][1]
    record("refine-latency", engine=last.get("engine"), model=last.get("model"), rate=500,
           latency_p50_ms=statistics.median(b["latency_p50_ms"] for _, b in pairs), latency_p99_ms=with_refiner,
           frames_published=sum(b["frames_published"] for _, b in pairs),
           frames_inferred=sum(b["frames_inferred"] for _, b in pairs), latency_p99_ms_alone=base,
           latency_p50_ms_alone=statistics.median(a["latency_p50_ms"] for a, _ in pairs),
           live_duty=args.live_duty, repeats=len(pairs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--overlaps", default="0.9,0.3,0")
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="refinement after the last frame")
    parser.add_argument("--rate", type=float, default=500.0, help="frame rate of the simulated scan (Hz)")
    parser.add_argument("--threads", type=int, default=2, help="the refiner's torch threads")
    parser.add_argument("--live-duty", type=float, default=RefineOptions().live_duty,
                        help="the refiner's share of wall time while frames arrive (--latency load)")
    parser.add_argument("--siemens", action="store_true", help="also refine the measured Siemens star")
    parser.add_argument("--latency", action="store_true", help="also measure the AI path's latency under load")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of latency runs (their medians are compared)")
    parser.add_argument("--quick", action="store_true", help="overlap 0.9 only, 5 s, no latency run")
    parser.add_argument("--json", default=None, help="write the records (bench.json format) here")
    parser.add_argument("--role", default="main", choices=("main", "load"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "load":
        return load(args.seconds, args.live_duty)
    if args.quick:
        args.overlaps, args.seconds, args.latency = "0.9", 5.0, False
    torch.set_num_threads(args.threads)
    quality(args)
    if args.siemens:
        siemens(args)
    if args.latency:
        latency(args)
    write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

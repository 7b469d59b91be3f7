"""Fly scans at 2 kHz, 1 kHz and 500 Hz through the whole edge path, on this machine.

For each rate: a real RunEngine runs ``spiral_ptycho_flyscan`` with the simulated fly-scan detector
(963 frames by default, the paper's scan length, on the paper's route when ``../shared/data`` has
it); the detector streams NTNDArrays over pvAccess (loopback) straight to an ``edge-ptycho worker``
process (the edge session's embedded worker), the patches come back and are stitched live, and
the run (every frame and position) goes to the embedded Tiled.  Recorded per rate: frames
published, frames inferred, frames dropped (with the worker's reasons), the worker's end-to-end
latency p50/p99 (frame taken -> patch published), and inferred frames per second of scan.

Model variants (``--variants``): ``paper`` (the paper's PtychoNN 2.0 weights, dynamic batch),
``fast`` (:class:`~edge_ptycho_bluesky.model.PtychoNNFast`; trained weights with ``--fast-weights``,
else untrained: the speed does not depend on the weights), and ``-int8`` forms of either (static
int8, calibrated on the paper's real frames).  The accuracy of each variant is measured by
``bench_train.py --accuracy`` (and ``bench_infer.py`` for int8 vs float32), not here.

Run::

    .venv/bin/python benchmarks/bench_flyscan.py                       # 3 rates x 4 variants
    .venv/bin/python benchmarks/bench_flyscan.py --variants fast-int8 --rates 2000
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from records import machine, record, write_json  # benchmarks/records.py

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_model(variant: str, tmp: Path, fast_weights: Path | None) -> Path:
    """The ONNX file of a variant (see the module notes)."""
    from edge_ptycho_bluesky.model import build_model, export_onnx, ptychonn2_from_onnx, preprocess
    from edge_ptycho_bluesky.model.quantize import quantize_and_check

    base = variant.removesuffix("-int8")
    if base == "paper":
        model = ptychonn2_from_onnx(SHARED / "ptychoNN_8.onnx")
    elif base == "fast":
        import torch

        torch.manual_seed(0)
        model = build_model("ptychonn2-fast")
        if fast_weights is not None:
            model.load_state_dict(torch.load(fast_weights, map_location="cpu", weights_only=True))
    else:
        raise ValueError(f"unknown variant {variant!r}: paper, fast, paper-int8, fast-int8")
    path = export_onnx(model.eval(), tmp / f"{base}.onnx")
    if variant.endswith("-int8"):
        frames = np.load(SHARED / "test235_truncated.npz")
        frames = frames[frames.files[0]][:64]
        path, score = quantize_and_check(path, tmp / f"{variant}.onnx", preprocess(frames, reduce="mean"))
        print(f"# {variant}: int8 vs float32 on held-out real frames SSIM {score['ssim']:.3f}", flush=True)
    return path


def cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) of a process so far, from ``/proc`` (None: unknown)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def fly(rate: float, variant: str, model: Path, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    from bluesky import RunEngine

    from edge_ptycho_bluesky.callbacks.session import EdgeSession
    from edge_ptycho_bluesky.devices import make_simulated_beamline
    from edge_ptycho_bluesky.edge.session import EdgeSessionConfig
    from edge_ptycho_bluesky.plans import spiral_ptycho_flyscan
    from edge_ptycho_bluesky.storage import StorageConfig, connect, get_run, make_tiled_writer
    from edge_ptycho_bluesky.training.registry import ModelRegistry

    work = tmp / f"{variant}_{rate:g}"
    storage = StorageConfig(data_dir=work / "data")
    client = connect(storage)
    registry = ModelRegistry(work / "registry")
    registry.publish({"model.onnx": model}, model=variant)
    RE = RunEngine({})
    RE.subscribe(make_tiled_writer(client, storage))
    stopped: dict[str, float] = {}
    RE.subscribe(lambda name, doc: stopped.setdefault("t", time.time()) if name == "stop" else None)
    route = SHARED / "optimized_route.npz"
    route = route if route.is_file() and args.points <= 963 else None
    line = make_simulated_beamline(storage.frames_dir, sample="test", extent_um=0.05 * np.sqrt(args.points) * 1.3 + 0.1,
                                   seed=7)
    tag = uuid.uuid4().hex[:8]
    session = EdgeSession(RE, client, storage, EdgeSessionConfig(
        registry=registry.root, input_pv=f"fly:{tag}:frames", output_pv=f"fly:{tag}:phase",
        status_pv=f"fly:{tag}:status", engine="onnxruntime",
        worker_args=("--threads", str(args.threads), "--batch-size", str(args.batch),
                     "--queue-size", str(args.queue_size), "--status-period", "0.5")), plot=False)
    cpu: dict[str, Any] = {}
    last_patch = threading.Event()

    def watch_cpu() -> None:
        """CPU of both processes from the start document (after prepare, which simulates the
        frames) to the last patch stitched (before the stitcher stores the derived run)."""
        while not last_patch.wait(0.01):
            run = session.stitch._run
            if run is not None and "re" in cpu and run.stitcher.n_patches >= args.points:
                cpu.update(re_end=time.process_time(), worker_end=cpu_seconds(cpu["worker_pid"]))
                return

    def cpu_at_start(name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            worker = session.worker.pid if session.worker is not None else None
            cpu.update(re=time.process_time(), worker=cpu_seconds(worker), worker_pid=worker)

    RE.subscribe(cpu_at_start)
    watcher = threading.Thread(target=watch_cpu, daemon=True)
    watcher.start()
    try:
        session.attach_fly_detector(line.fly_det)
        session.stitch.wait_timeout = args.drain_s
        (uid,) = RE(spiral_ptycho_flyscan(line.fly_det, line.stage.x, line.stage.y, step=0.05,
                                          num_points=args.points, rate=rate, route=route))
        live = session.stitch.results[uid]
        last_patch.set()
        watcher.join()
        cpu_re = cpu["re_end"] - cpu["re"] if "re_end" in cpu else None
        cpu_worker = (cpu["worker_end"] - cpu["worker"]
                      if cpu.get("worker_end") is not None and cpu.get("worker") is not None else None)
        stored = get_run(client, uid)["primary"]
        stored_frames = len(stored["stage_x"].read())
    finally:
        session.close()
    stats, det = session.worker_stats, line.fly_det.stats
    inferred = len(live.frame_indices)
    span = max(stopped["t"] - det["t_start"], det["elapsed_s"])
    drops = dict(stats.get("dropped") or {})
    return record("stream", engine="onnxruntime", model=variant, batch=args.batch, rate=rate,
                  frames_published=det["frames"], frames_inferred=inferred, drops=len(live.missing),
                  fps=inferred / span, latency_p50_ms=stats.get("e2e_p50_ms"),
                  latency_p99_ms=stats.get("e2e_p99_ms"), mode="fly scan", threads=args.threads,
                  publish_rate=det["rate_hz"], drop_reasons=drops, frames_in_tiled=stored_frames,
                  cpu_ms_per_frame_runengine=None if cpu_re is None else 1e3 * cpu_re / max(det["frames"], 1),
                  cpu_ms_per_frame_worker=None if cpu_worker is None else 1e3 * cpu_worker / max(det["frames"], 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="2000,1000,500", help="frame rates in Hz")
    p.add_argument("--variants", default="paper,paper-int8,fast,fast-int8")
    p.add_argument("--points", type=int, default=963)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the worker")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--queue-size", type=int, default=1024)
    p.add_argument("--drain-s", type=float, default=30.0, help="seconds to wait for the last patches")
    p.add_argument("--fast-weights", type=Path, default=None, help="trained PtychoNNFast state dict (.pt)")
    p.add_argument("--quick", action="store_true", help="the 2 kHz fly scan of each variant only")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from edge_ptycho_bluesky.edge.transport import loopback_env

    loopback_env()  # pvAccess on 127.0.0.1 only, for this process and the worker it starts
    rates = [2000.0] if args.quick else [float(r) for r in args.rates.split(",") if r.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"fly scans of {args.points} frames; worker: ONNX Runtime, {args.threads} threads, batch {args.batch}; "
          f"{machine()}", flush=True)
    print("| variant | rate (Hz) | published | inferred | dropped | inferred/s | p50 ms | p99 ms | in Tiled "
          "| CPU ms/frame RunEngine | CPU ms/frame worker |")
    print("|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_flyscan_") as tmpdir:
        tmp = Path(tmpdir)
        for variant in variants:
            model = make_model(variant, tmp, args.fast_weights)
            for rate in rates:
                r = fly(rate, variant, model, args, tmp)
                records.append(r)
                print(f"| {variant} | {rate:g} | {r['frames_published']} | {r['frames_inferred']} | {r['drops']} | "
                      f"{r['fps']:.0f} | {r['latency_p50_ms'] or float('nan'):.1f} | "
                      f"{r['latency_p99_ms'] or float('nan'):.1f} | {r['frames_in_tiled']} | "
                      f"{r['cpu_ms_per_frame_runengine'] or float('nan'):.2f} | "
                      f"{r['cpu_ms_per_frame_worker'] or float('nan'):.2f} |",
                      flush=True)
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

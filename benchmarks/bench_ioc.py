"""Fly scans through EPICS: the simulated beamline IOC driven by stock ophyd-async devices.

For each rate: ``edge-ptycho ioc`` runs in its own process; ophyd-async's stock ``adsimdetector``
(HDF5 writer) and ``Motor`` connect to it over Channel Access; a real RunEngine runs
``spiral_ptycho_flyscan`` (``prepare(TriggerInfo)``, ``kickoff``, the stage walking the route,
``collect_while_completing``); the IOC's ``Pva1:Image`` stream reaches the edge session's relay,
which hands each frame to the embedded worker (ONNX Runtime) with the position the IOC recorded
with it (NDAttributes); the patches are stitched live and the run goes to the embedded Tiled.
Recorded per rate: frames the plan asked for, frames stored (the IOC's HDF5 file through
StreamResource/StreamDatum) with a finite position, frames relayed and inferred, the scan's wall
time from its start document to its stop document (staging, the route, collecting) and the frames
stored per second of it, how long after its time stamp each frame reached the relay (p50/p99: the
IOC's lag behind its own frame clock, which grows when it cannot simulate frames at the rate asked),
and the worker's end-to-end latency p50/p99 (frame time stamp -> patch published).

Run::

    .venv/bin/python benchmarks/bench_ioc.py                      # 500, 1000, 2000 Hz
    .venv/bin/python benchmarks/bench_ioc.py --rates 2000 --points 480
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from records import machine, record, write_json  # benchmarks/records.py

GEOMETRY = {"energy_kev": 10.0, "detector_distance_m": 1.0, "detector_pixel_m": 75e-6, "frame_size": 128}


def fly(RE: Any, devices: tuple[Any, Any, Any], ioc: Any, rate: float, args: argparse.Namespace,
        storage: Any, registry: Path) -> dict[str, Any]:
    from edge_ptycho_bluesky.callbacks.session import EdgeSession
    from edge_ptycho_bluesky.plans import spiral_ptycho_flyscan

    from edge_ptycho_bluesky.edge.session import EdgeSessionConfig
    from edge_ptycho_bluesky.runs import read_scan
    from edge_ptycho_bluesky.storage import connect, make_tiled_writer

    det, mx, my = devices
    client = connect(storage)
    tag = uuid.uuid4().hex[:8]
    session = EdgeSession(RE, client, storage, EdgeSessionConfig(
        registry=registry, input_pv=f"iocb:{tag}:frames", output_pv=f"iocb:{tag}:phase",
        status_pv=f"iocb:{tag}:status", engine="onnxruntime", refine=False,
        detector_pv=ioc.prefix + "Pva1:Image",
        worker_args=("--threads", str(args.threads), "--status-period", "0.5")), plot=False)
    times: dict[str, float] = {}

    def clock(name: str, doc: dict[str, Any]) -> None:
        if name in ("start", "stop"):
            times[name] = float(doc["time"])

    tokens = [RE.subscribe(make_tiled_writer(client, storage)), RE.subscribe(clock)]
    try:
        deadline = time.monotonic() + 30
        while not session.relay.connected and time.monotonic() < deadline:
            time.sleep(0.1)
        (uid,) = RE(spiral_ptycho_flyscan(det, mx, my, step=0.05, num_points=args.points, rate=rate,
                                          frames_per_point=args.frames_per_point, geometry=GEOMETRY,
                                          probe=ioc.probe_path))
        result = session.wait_stored(uid, timeout=300)
        lag = session.relay.lag_ms(uid) or (None, None)
        scan = read_scan(client[uid])
    finally:
        for token in tokens:
            RE.unsubscribe(token)
        session.close()
    stats = session.worker_stats
    expected = args.points * args.frames_per_point
    stored = int(scan.frames.shape[0])
    positioned = int(np.isfinite(scan.positions_m).all(axis=1).sum())
    wall = times["stop"] - times["start"]
    return record("ioc_flyscan", engine="onnxruntime", model="shipped", rate=rate, mode="fly scan (IOC)",
                  threads=args.threads, frames_expected=expected, frames_in_tiled=stored,
                  frames_with_position=positioned, frames_relayed=int(session.relay.counts["relayed"]),
                  frames_inferred=len(result.frame_indices), drops=len(result.missing), scan_wall_s=wall,
                  fps=stored / wall, latency_p50_ms=stats.get("e2e_p50_ms"), latency_p99_ms=stats.get("e2e_p99_ms"),
                  relay_lag_p50_ms=lag[0], relay_lag_p99_ms=lag[1], relay_counts=dict(session.relay.counts))


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", default="500,1000,2000", help="frame rates in Hz")
    p.add_argument("--points", type=int, default=480, help="route points (default 480)")
    p.add_argument("--frames-per-point", type=int, default=2, help="frames per route point (default 2)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads of the worker")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from bluesky import RunEngine
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider
    from ophyd_async.epics import adsimdetector
    from ophyd_async.epics.adcore import ADWriterFactory
    from ophyd_async.epics.motor import Motor
    from ophyd_async.plan_stubs import ensure_connected

    from edge_ptycho_bluesky.ioc.process import IocProcess, loopback_ca_env
    from edge_ptycho_bluesky.storage import StorageConfig
    from edge_ptycho_bluesky.training.shipped import init_registry

    loopback_ca_env()
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    print(f"IOC fly scans of {args.points} points x {args.frames_per_point} frames; stock ophyd-async devices; "
          f"worker: ONNX Runtime, {args.threads} thread(s), shipped model; {machine()}", flush=True)
    print("| rate (Hz) | frames asked | in Tiled | with position | relayed | inferred | scan s | stored/s "
          "| relay lag p50/p99 ms | worker p50/p99 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench_ioc_") as tmpdir:
        tmp = Path(tmpdir)
        prefix, probe = f"B{uuid.uuid4().hex[:6]}:", tmp / "probe.npy"
        extent = 0.05 * np.sqrt(args.points) * 1.0 + 0.3
        with IocProcess(prefix, ["--save-probe", str(probe), "--extent", f"{extent:.2f}"],
                        log_path=tmp / "ioc.log") as ioc:
            ioc.probe_path = probe
            loop = asyncio.new_event_loop()
            RE = RunEngine({}, loop=loop)
            storage = StorageConfig(data_dir=tmp / "data")
            Path(storage.frames_dir).mkdir(parents=True, exist_ok=True)
            init_registry(tmp / "registry")
            det = adsimdetector.SimDetector(prefix, ADWriterFactory.hdf(
                StaticPathProvider(UUIDFilenameProvider(), Path(storage.frames_dir))), name="det")
            mx, my = Motor(prefix + "m1", name="mx"), Motor(prefix + "m2", name="my")
            RE(ensure_connected(det, mx, my))
            for rate in rates:
                r = fly(RE, (det, mx, my), ioc, rate, args, storage, tmp / "registry")
                records.append(r)
                print(f"| {rate:g} | {r['frames_expected']} | {r['frames_in_tiled']} | {r['frames_with_position']} | "
                      f"{r['frames_relayed']} | {r['frames_inferred']} | {r['scan_wall_s']:.2f} | {r['fps']:.0f} | "
                      f"{_ms(r['relay_lag_p50_ms'])} / {_ms(r['relay_lag_p99_ms'])} | "
                      f"{_ms(r['latency_p50_ms'])} / {_ms(r['latency_p99_ms'])} |",
                      flush=True)
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

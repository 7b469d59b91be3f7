"""Streaming benchmark of the edge worker: publisher process -> worker process -> subscriber.

For each frame rate, three processes run on loopback pvAccess:

* a publisher (this script with ``--role publisher``) serving 128 x 128 uint16 NTNDArray frames
  with positions and a scan uid, paced at the rate for ``--duration`` seconds;
* the edge worker, started exactly as in production: ``python -m
  edge_ptycho_bluesky.edge.cli --model ... --engine ...``;
* a :class:`~edge_ptycho_bluesky.edge.pva_clients.PatchSubscriber` in this process that adds each
  patch to an :class:`~edge_ptycho_bluesky.stitching.IncrementalStitcher` as it arrives (what the
  live stitch callback does) and times it from the frame's publication (``t_in``) until it is
  stitched: the latency covers the whole path publisher -> worker -> stitcher.

Reported per rate: frames published (and the rate achieved), frames inferred by the worker,
drops (published - inferred, with the worker's reasons), sustained patches/s stitched, and
end-to-end latency percentiles (publication -> stitched).

Usage::

    python benchmarks/bench_stream.py [--quick] [--rates 100,500,1000,2000] [--model FILE.onnx]
                                      [--tiny] [--batch 8] [--threads 2] [--json out.json]

``--model`` defaults to the paper's ``ptychoNN_8.onnx`` in ``../shared/data`` when present;
``--tiny`` uses a one-multiply ONNX model instead, to measure the transport ceiling;
``--dynamic-batch`` re-exports the model's weights with a dynamic batch axis, so a partial
batch costs only its own frames (the paper's file is fixed at batch 8 and pads).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODEL = ROOT.parent / "shared" / "data" / "ptychoNN_8.onnx"
sys.path.insert(0, str(ROOT))

from edge_ptycho_bluesky.edge.transport import loopback_env  # noqa: E402
from records import machine, write_json  # noqa: E402  (benchmarks/records.py)

loopback_env()  # before any pvapy object, in every role


# -- publisher role ---------------------------------------------------------------------------

def run_publisher(channel: str, rate: float, count: int, seed: int = 0) -> int:
    """Serve ``channel``; print "ready"; on "go" publish ``count`` frames at ``rate``; report."""
    from edge_ptycho_bluesky.edge.pva_servers import FramePublisher

    rng = np.random.default_rng(seed)
    # 64 distinct Poisson frames with a bright centre (the content does not change the cost)
    yy, xx = np.mgrid[-64:64, -64:64]
    mean = 2000.0 * np.exp(-(xx**2 + yy**2) / (2 * 12.0**2)) + 1.0
    frames = rng.poisson(mean, (64, 128, 128)).astype(np.uint16)
    pub = FramePublisher(channel)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        pub.close()
        return 1
    period = 1.0 / rate
    t0 = time.perf_counter()
    t_first = time.time()
    for i in range(count):
        target = t0 + i * period
        delay = target - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pub.publish(frames[i % 64], i + 1, pos=(float(i % 97), float(i // 97)),
                    scan_uid="bench")
    elapsed = time.perf_counter() - t0
    print(json.dumps({"published": count, "t_first": t_first, "elapsed_s": elapsed}), flush=True)
    sys.stdin.readline()  # keep the record served until the benchmark is done
    pub.close()
    return 0


# -- orchestration ----------------------------------------------------------------------------

def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one when None), from /proc."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB (``VmRSS``), NaN when unreadable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def make_tiny_model(path: Path) -> Path:
    """``phase = 1e-3 * frame``: an ONNX model that costs nearly nothing."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, 128, 128])
    y = helper.make_tensor_value_info("phase", TensorProto.FLOAT, ["N", 1, 128, 128])
    k = numpy_helper.from_array(np.array(1e-3, dtype=np.float32), "scale")
    graph = helper.make_graph([helper.make_node("Mul", ["frames", "scale"], ["phase"])],
                              "tiny", [x], [y], initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def run_rate(rate: float, duration: float, model: Path, args: argparse.Namespace,
             tmp: Path) -> dict[str, Any]:
    from edge_ptycho_bluesky.edge.pva_clients import PatchSubscriber, read_status
    from edge_ptycho_bluesky.stitching import IncrementalStitcher

    tag = uuid.uuid4().hex[:8]
    inp, out, status = f"bench:{tag}:frames", f"bench:{tag}:phase", f"bench:{tag}:status"
    count = max(1, int(round(rate * duration)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    stats_file = tmp / f"worker-{tag}.json"

    publisher = subprocess.Popen(
        [sys.executable, __file__, "--role", "publisher", "--channel", inp, "--rate", str(rate),
         "--count", str(count)],
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    worker = subprocess.Popen(
        [sys.executable, "-m", "edge_ptycho_bluesky.edge.cli", "--model", str(model),
         "--engine", args.engine, "--batch-size", str(args.batch), "--max-wait-ms",
         str(args.max_wait_ms), "--queue-size", str(args.queue_size), "--input", inp,
         "--output", out, "--status", status, "--status-period", "0.5", "--log-level", "ERROR",
         "--stats-json", str(stats_file)] + (["--threads", str(args.threads)]
                                             if args.threads else []),
        env=env, stdout=subprocess.PIPE, text=True)
    arrivals: list[tuple[int, float, float]] = []  # (uniqueId, stitched time, latency s)
    lock = threading.Lock()
    # the publisher's positions are (i % 97, i // 97) object pixels: a grid that holds them all
    stitcher = IncrementalStitcher((128 + 97, 128 + count // 97 + 1))
    stitch_errors = [0]

    def on_patch(p: Any) -> None:
        try:
            stitcher.add(p.phase[None], np.array([p.pos], dtype=np.float64))
        except Exception:
            stitch_errors[0] += 1
            return
        now = time.time()
        with lock:
            arrivals.append((p.unique_id, now, now - p.t_in))

    sub = PatchSubscriber(out, on_patch)
    published: dict[str, Any] = {}
    try:
        assert publisher.stdout is not None and worker.stdout is not None
        if publisher.stdout.readline().strip() != "ready":
            raise RuntimeError("publisher failed to start")
        if json.loads(worker.stdout.readline()).get("event") != "started":
            raise RuntimeError("worker failed to start")
        sub.start()
        if not sub.wait_ready(30.0):
            raise RuntimeError("worker output channel did not appear")

        def worker_ready() -> bool:
            try:
                return read_status(status, timeout=1.0).get("received", 0) >= 1
            except Exception:
                return False

        if not _wait(worker_ready, 30.0):
            raise RuntimeError("worker did not subscribe to the frames")
        assert publisher.stdin is not None
        load = os.getloadavg()[0]
        cpu0 = (cpu_seconds(publisher.pid), cpu_seconds(worker.pid), cpu_seconds())
        rss0 = rss_mb(worker.pid)
        rss_peak = [rss0]
        rss_series: list[tuple[float, float]] = []  # (s since go, MiB) every 5 s
        watching = threading.Event()

        def watch_rss() -> None:  # the worker's memory while frames stream in
            t_go, next_sample = time.monotonic(), 0.0
            while not watching.wait(0.1):
                rss = rss_mb(worker.pid)
                rss_peak[0] = max(rss_peak[0], rss)
                if time.monotonic() - t_go >= next_sample:
                    rss_series.append((round(time.monotonic() - t_go, 1), rss))
                    next_sample += 5.0

        watcher = threading.Thread(target=watch_rss, daemon=True)
        watcher.start()
        publisher.stdin.write("go\n")
        publisher.stdin.flush()
        published = json.loads(publisher.stdout.readline())
        # drain: until every frame is accounted for or nothing arrives for 2 s
        last_n, last_t = -1, time.monotonic()
        while time.monotonic() - last_t < 2.0:
            with lock:
                n = len(arrivals)
            if n >= count:
                break
            if n != last_n:
                last_n, last_t = n, time.monotonic()
            time.sleep(0.05)
        cpu1 = (cpu_seconds(publisher.pid), cpu_seconds(worker.pid), cpu_seconds())
        watching.set()
        watcher.join()
        rss1 = rss_mb(worker.pid)
    finally:
        sub.stop()
        worker.send_signal(signal.SIGINT)
        try:
            worker.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.communicate()
        if publisher.stdin is not None and not publisher.stdin.closed:
            publisher.stdin.write("exit\n")
            publisher.stdin.close()
        try:
            publisher.wait(timeout=20)
        except subprocess.TimeoutExpired:
            publisher.kill()
            publisher.wait()
    final = json.loads(stats_file.read_text())
    with lock:
        ids = [a[0] for a in arrivals]
        t_last = max((a[1] for a in arrivals), default=0.0)
        lat = np.array([a[2] for a in arrivals]) * 1e3
    if len(ids) != len(set(ids)):
        raise RuntimeError("a frame was delivered twice")
    # sustained rate: patches delivered over the span from the first publication to the last
    # arrival
    span = t_last - float(published.get("t_first", t_last))
    inferred = int(final["inferred"])
    reasons = {k: v for k, v in final["dropped"].items() if k != "empty"}
    return {
        "name": "stream",
        "ssim": None,
        "engine": final.get("engine"),
        "model": model.name,
        "batch": args.batch,
        "threads": args.threads,
        "rate": rate,
        "duration_s": duration,
        "frames_published": int(published.get("published", 0)),
        "publish_rate_achieved": count / max(float(published.get("elapsed_s", 1e-9)), 1e-9),
        "frames_inferred": inferred,
        "patches_received": len(ids),
        "patches_stitched": stitcher.n_patches,
        "stitch_errors": stitch_errors[0],
        "gaps_at_subscriber": sub.gaps,
        "drops": int(published.get("published", 0)) - inferred,
        "drop_reasons": reasons,
        "fps": len(ids) / span if span > 0 else 0.0,
        "latency_p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "latency_p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "infer_batch_p50_ms": final.get("infer_p50_ms"),
        "queue_high_water": final.get("queue_high_water"),
        "queue_capacity": final.get("queue_capacity"),
        "worker_rss_mb_before": rss0,
        "worker_rss_mb_peak": rss_peak[0],
        "worker_rss_mb_after": rss1,
        "worker_rss_mb_series": rss_series,
        # CPU seconds per second of streaming: how much of the 2 cores each process took
        "cpu_publisher": (cpu1[0] - cpu0[0]) / max(span, 1e-9),
        "cpu_worker": (cpu1[1] - cpu0[1]) / max(span, 1e-9),
        "cpu_subscriber": (cpu1[2] - cpu0[2]) / max(span, 1e-9),
        "load_avg_1min_before": load,
        "machine": machine(),
    }


def print_table(records: list[dict[str, Any]], header: bool = True) -> None:
    head = (f"{'rate Hz':>8} {'pub Hz':>8} {'published':>9} {'inferred':>8} {'stitched':>8} {'drops':>6} "
            f"{'fps':>7} {'p50 ms':>8} {'p99 ms':>8} {'batch p50':>9} {'cpu p/w/s':>14} "
            f"{'load':>5} {'rss MB':>11}  drop reasons")
    if header:
        print(head)
        print("-" * len(head))
    for r in records:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(r["drop_reasons"].items())) or "-"
        print(f"{r['rate']:>8.0f} {r['publish_rate_achieved']:>8.0f} {r['frames_published']:>9d} "
              f"{r['frames_inferred']:>8d} {r['patches_stitched']:>8d} {r['drops']:>6d} {r['fps']:>7.0f} "
              f"{r['latency_p50_ms']:>8.1f} {r['latency_p99_ms']:>8.1f} "
              f"{(r['infer_batch_p50_ms'] or 0):>9.2f} "
              f"{r['cpu_publisher']:>4.2f}/{r['cpu_worker']:>4.2f}/{r['cpu_subscriber']:>4.2f} "
              f"{r['load_avg_1min_before']:>5.2f} "
              f"{r['worker_rss_mb_before']:>4.0f}->{r['worker_rss_mb_peak']:>4.0f}  {reasons}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 s per rate instead of 10 s")
    p.add_argument("--rates", default="100,500,1000,2000", help="frame rates in Hz")
    p.add_argument("--duration", type=float, default=None, help="seconds of frames per rate")
    p.add_argument("--model", type=Path, default=None, help="ONNX model (default: the paper's)")
    p.add_argument("--tiny", action="store_true", help="a one-multiply model (transport ceiling)")
    p.add_argument("--dynamic-batch", action="store_true",
                   help="re-export the model's PtychoNN 2.0 weights with a dynamic batch axis "
                        "first (a fixed-batch-8 file pads every partial batch to 8 frames)")
    p.add_argument("--engine", default="onnxruntime")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--queue-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1,
                   help="engine intra-op threads (default 1: on 2 shared cores a second ORT "
                        "thread competes with the transport threads)")
    p.add_argument("--json", type=Path, default=None, help="write the records to this file")
    p.add_argument("--role", default="main", choices=("main", "publisher"), help=argparse.SUPPRESS)
    p.add_argument("--channel", help=argparse.SUPPRESS)
    p.add_argument("--rate", type=float, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.role == "publisher":
        return run_publisher(args.channel, args.rate, args.count)

    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    duration = args.duration or (2.0 if args.quick else 10.0)
    with tempfile.TemporaryDirectory(prefix="bench_stream_") as tmpdir:
        tmp = Path(tmpdir)
        if args.tiny:
            model = make_tiny_model(tmp / "tiny_mul.onnx")
        elif args.model is not None:
            model = args.model
        elif SHARED_MODEL.is_file():
            model = SHARED_MODEL
        else:
            print(f"{SHARED_MODEL} not found: using the tiny model (pass --model)", file=sys.stderr)
            model = make_tiny_model(tmp / "tiny_mul.onnx")
        if args.dynamic_batch and not args.tiny:
            from edge_ptycho_bluesky.model import export_onnx, ptychonn2_from_onnx

            dynamic = tmp / f"{model.stem}_dynamic.onnx"
            export_onnx(ptychonn2_from_onnx(model), dynamic)
            model = dynamic
        print(f"model {model.name}, engine {args.engine}, batch {args.batch}, threads "
              f"{args.threads}, {duration:g} s per rate; {machine()}")
        records = []
        for rate in rates:
            rec = run_rate(rate, duration, model, args, tmp)
            records.append(rec)
            print_table([rec], header=len(records) == 1)
    print()
    print_table(records)
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

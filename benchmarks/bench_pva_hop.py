"""CPU cost of one pvAccess hop per NTNDArray update, on this machine (pvapy, loopback).

The live path has two hops per frame: detector -> worker (a frame) and worker -> RunEngine (its
phase patch).  This measures what one hop costs in CPU, per message, apart from everything else:
a publisher process serving a 128 x 128 NTNDArray channel (float32, 64 KiB; with the attributes
the project sends: position, scan uid, frame index) paced at ``--rate``, and a subscriber process
monitoring it.  Reported per message: the publisher's CPU to encode and serve it, the publisher's
CPU to serve an already encoded one, and the subscriber's CPU to receive it (a counting callback)
and to receive and decode it (``decode_frame``).  CPU is user + system time of all threads.

Run::

    .venv/bin/python benchmarks/bench_pva_hop.py --rate 2000 --seconds 4 --json /tmp/hop.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from records import machine, record, write_json  # benchmarks/records.py

ROOT = Path(__file__).resolve().parents[1]


def subscriber(channel: str, decode: bool, seconds: float) -> None:
    """Monitor ``channel``; print one JSON line: messages and CPU per message over ``seconds``."""
    import pvaccess as pva

    from edge_ptycho_bluesky.edge.ntnda import decode_frame

    count = [0]

    def on_update(pv: Any) -> None:
        count[0] += 1
        if decode:
            decode_frame(pv)

    channel_ = pva.Channel(channel)
    channel_.subscribe("bench", on_update)
    channel_.startMonitor("field()")
    time.sleep(1.0)  # connected, first updates in
    n0, c0 = count[0], time.process_time()
    time.sleep(seconds)
    n, cpu = count[0] - n0, time.process_time() - c0
    channel_.stopMonitor()
    print(json.dumps({"messages": n, "cpu_us_per_message": 1e6 * cpu / max(n, 1)}), flush=True)


def publish(rate: float, seconds: float, decode: bool, pre_encoded: bool, rows: int = 128) -> dict[str, Any]:
    """Serve updates at ``rate`` to a subscriber process; CPU per message on both sides."""
    import pvaccess as pva

    from edge_ptycho_bluesky.edge.ntnda import encode_frame

    channel = f"bench:hop:{uuid.uuid4().hex[:8]}"
    data = np.random.default_rng(0).random((rows, 128), dtype=np.float32)
    n = int(rate * (seconds + 2.5))

    def encode(i: int) -> Any:
        return encode_frame(data, i + 1, pos=(0.1, 0.2), scan_uid="x" * 36, attributes={"frame_index": i})

    encoded = [encode(i) for i in range(n)] if pre_encoded else None
    server = pva.PvaServer()
    server.addRecord(channel, encode(0))
    sub = subprocess.Popen([sys.executable, __file__, "--subscriber", channel, "--seconds", str(seconds),
                            *(["--decode"] if decode else [])], stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        delay = t0 + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        server.update(channel, encoded[i] if encoded is not None else encode(i))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    out, _ = sub.communicate(timeout=30)
    result = json.loads(out.strip().splitlines()[-1])
    return {"publisher_cpu_us_per_message": 1e6 * cpu / n, "publish_rate": n / elapsed,
            "subscriber_cpu_us_per_message": result["cpu_us_per_message"], "messages_received": result["messages"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=2000.0, help="updates per second (default 2000)")
    p.add_argument("--seconds", type=float, default=4.0, help="measured seconds per case (default 4)")
    p.add_argument("--rows", type=int, default=128, help="image rows (128 x 128 float32 = 64 KiB; 32: 16 KiB)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--subscriber", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    from edge_ptycho_bluesky.edge.transport import loopback_env

    loopback_env()
    if args.subscriber:
        subscriber(args.subscriber, args.decode, args.seconds)
        return 0
    print(f"one pvAccess hop, {args.rows} x 128 float32 NTNDArray at {args.rate:g} Hz; {machine()}", flush=True)
    print("| case | publisher CPU us/msg | subscriber CPU us/msg | published/s | received |")
    print("|---|---:|---:|---:|---:|", flush=True)
    records = []
    for case, pre_encoded, decode in (("encode + serve / receive", False, False),
                                      ("serve pre-encoded / receive", True, False),
                                      ("encode + serve / receive + decode", False, True)):
        r = publish(args.rate, args.seconds, decode, pre_encoded, args.rows)
        records.append(record("pva_hop", engine=None, model=None, rate=args.rate, case=case, rows=args.rows, **r))
        print(f"| {case} | {r['publisher_cpu_us_per_message']:.0f} | {r['subscriber_cpu_us_per_message']:.0f} | "
              f"{r['publish_rate']:.0f} | {r['messages_received']} |", flush=True)
    write_json(args.json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())

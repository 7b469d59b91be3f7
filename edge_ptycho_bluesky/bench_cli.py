"""``edge-ptycho bench --out DIR [--quick]``: the whole set of benchmarks, one table, one JSON.

Runs the scripts of the repository's ``benchmarks/`` folder one after the other, each in its own
process (so one failing or crashing does not take the others down): inference per engine and
batch (``bench_infer.py``), streaming at set rates up to 2 kHz (``bench_stream.py``), fly scans of
963 frames at 2 kHz, 1 kHz and 500 Hz through the RunEngine, pvAccess and the worker
(``bench_flyscan.py``), rPIE
(``bench_rpie.py``), streaming AI-seeded rPIE against the truth, its frame-updates/s and the AI
path's latency beside it (``bench_refine.py``), stitching (``bench_stitch.py``) and training (``bench_train.py``).
Each writes its records; they are merged into ``DIR/bench.json``, a list of records with the
fields ``name``, ``engine``, ``model``, ``batch``, ``rate``, ``frames_published``,
``frames_inferred``, ``drops``, ``fps``, ``latency_p50_ms``, ``latency_p99_ms``, ``ssim`` and
``machine`` (None where a field does not apply) plus details, and into the table
``DIR/bench.md``.  Each benchmark's full output is in ``DIR/<name>.log``; pictures in ``DIR``.

``--quick`` takes a few minutes on 2 CPU cores (3.4 minutes measured before the fly scans were
added) and includes the 2 kHz stream and a 2 kHz fly scan; the full set
about an hour.  ``docs/benchmarks.md`` holds recorded results.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BENCHMARKS_DIR = Path(__file__).resolve().parents[1] / "benchmarks"
#: Every record has these fields (the ``bench.json`` contract).
FIELDS = ("name", "engine", "model", "batch", "rate", "frames_published", "frames_inferred", "drops", "fps",
          "latency_p50_ms", "latency_p99_ms", "ssim", "machine")
ORDER = ("infer", "stream", "fly", "rpie", "refine", "stitch", "train")


def commands(out: Path, quick: bool, stream_rates: str) -> dict[str, list[str]]:
    """The command line of each benchmark (``--json`` into ``out``)."""
    q = ["--quick"] if quick else []
    return {
        "infer": ["bench_infer.py", *q, "--engines", "onnxruntime/exported", "onnxruntime/int8",
                  "onnxruntime/paper-b8", "torch-cpu", "torch-cuda", "tensorrt-fp16"],
        "stream": ["bench_stream.py", *q, "--rates", stream_rates, "--dynamic-batch"],
        "fly": ["bench_flyscan.py", *(["--quick", "--variants", "paper,fast-int8"] if quick else [])],
        "rpie": ["bench_rpie.py", *q, "--images", str(out)],
        "refine": ["bench_refine.py", *(q if quick else ["--latency"])],
        "stitch": ["bench_stitch.py", *q],
        "train": ["bench_train.py", *q, "--out", str(out / "train"), "--figure", str(out / "ai_vs_rpie.png")],
    }


def normalise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every contract field present (None when absent), contract fields first."""
    out = []
    for rec in records:
        row = {key: rec.get(key) for key in FIELDS}
        row.update({k: v for k, v in rec.items() if k not in row})
        out.append(row)
    return out


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) >= 1 or value == 0 else f"{value:.3f}"
    return str(value)


def table(records: list[dict[str, Any]]) -> str:
    """A markdown table of the records."""
    head = ["name", "engine", "threads", "model", "batch", "rate", "published", "inferred", "drops", "fps", "p50 ms",
            "p99 ms", "ssim"]
    keys = ["name", "engine", "threads", "model", "batch", "rate", "frames_published", "frames_inferred", "drops", "fps",
            "latency_p50_ms", "latency_p99_ms", "ssim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for rec in records:
        lines.append("| " + " | ".join(_fmt(rec.get(k), 3 if k == "ssim" else 1) for k in keys) + " |")
    return "\n".join(lines)


def run_bench(out: Path, *, quick: bool = False, only: list[str] | None = None,
              stream_rates: str = "100,500,1000,2000", timeout_s: float = 3600.0) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Run the benchmarks into ``out``; return (records, {name: error}) and write bench.json/md."""
    if not BENCHMARKS_DIR.is_dir():
        raise FileNotFoundError(
            f"no benchmarks folder at {BENCHMARKS_DIR}: `edge-ptycho bench` runs the scripts of a source "
            "checkout (pip install -e .), not of an installed wheel")
    names = list(only or ORDER)
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; choose from {', '.join(ORDER)}")
    out.mkdir(parents=True, exist_ok=True)
    cmds = commands(out, quick, stream_rates)
    records: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for name in names:
        json_path = out / f"{name}.json"
        json_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(BENCHMARKS_DIR / cmds[name][0]), *cmds[name][1:], "--json", str(json_path)]
        logger.info("benchmark %s: %s (output in %s)", name, " ".join(cmd[1:]), out / f"{name}.log")
        t0 = time.perf_counter()
        with (out / f"{name}.log").open("w") as log:
            try:
                proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                                      cwd=BENCHMARKS_DIR.parent)
                rc: int | str = proc.returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {timeout_s:.0f} s"
        seconds = time.perf_counter() - t0
        if rc != 0 or not json_path.exists():
            errors[name] = f"exit status {rc}; see {out / f'{name}.log'}"
            logger.error("benchmark %s failed (%s) after %.0f s", name, errors[name], seconds)
            continue
        found = json.loads(json_path.read_text())
        logger.info("benchmark %s: %d record(s) in %.0f s", name, len(found), seconds)
        records.extend(normalise(found))
    (out / "bench.json").write_text(json.dumps(records, indent=2, default=float))
    text = table(records)
    if errors:
        text += "\n\nFailed: " + "; ".join(f"{k}: {v}" for k, v in errors.items())
    (out / "bench.md").write_text(text + "\n")
    return records, errors


def _main(args: argparse.Namespace) -> int:
    only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
    try:
        records, errors = run_bench(args.out, quick=args.quick, only=only, stream_rates=args.rates)
    except (FileNotFoundError, ValueError) as exc:
        print(f"edge-ptycho bench: {exc}", file=sys.stderr)
        return 2
    print(table(records))
    print(f"\n{len(records)} records in {args.out / 'bench.json'}; logs in {args.out}/*.log")
    for name, why in errors.items():
        print(f"FAILED {name}: {why}", file=sys.stderr)
    return 1 if errors else 0


def add_subcommand(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="run the benchmarks: DIR/bench.json and DIR/bench.md",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quick", action="store_true", help="the short set (a few minutes on 2 cores, with the 2 kHz stream and fly scan)")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ORDER)}")
    p.add_argument("--rates", default="100,500,1000,2000", help="stream rates in Hz (default 100,500,1000,2000)")
    p.set_defaults(func=_main)

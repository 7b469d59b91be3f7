"""``edge-ptycho bench``: the benchmarks run as processes and their records merge into bench.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_ptycho_bluesky.bench_cli import FIELDS, normalise, table

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "edge_ptycho_bluesky.cli", "bench", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_bench_writes_the_contract_records_for_stitching_and_a_stream(tmp_path):
    pytest.importorskip("pvaccess")
    proc = _run("--out", str(tmp_path), "--quick", "--only", "stitch,stream", "--rates", "200")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads((tmp_path / "bench.json").read_text())
    assert {r["name"] for r in records} == {"stitch", "stream"}
    for r in records:
        assert list(r)[: len(FIELDS)] == list(FIELDS) and r["machine"] and r["fps"] > 0
    (stream,) = [r for r in records if r["name"] == "stream"]
    assert stream["rate"] == 200 and stream["frames_published"] == 400        # 2 s at 200 Hz
    assert stream["frames_inferred"] + stream["drops"] == stream["frames_published"]
    assert stream["latency_p50_ms"] <= stream["latency_p99_ms"]
    assert (tmp_path / "bench.md").read_text().startswith("| name | engine | threads |")
    assert (tmp_path / "stream.log").stat().st_size > 0
    assert "records in" in proc.stdout


def test_bench_refuses_an_unknown_benchmark(tmp_path):
    proc = _run("--out", str(tmp_path), "--only", "stitch,warp")
    assert proc.returncode == 2 and "unknown benchmark(s) ['warp']" in proc.stderr


def test_records_are_normalised_and_tabulated():
    rows = normalise([{"name": "infer", "fps": 360.0, "threads": 2}, {"name": "rpie", "ssim": 0.985}])
    assert all(list(r)[: len(FIELDS)] == list(FIELDS) for r in rows)
    assert rows[0]["threads"] == 2 and rows[0]["rate"] is None
    text = table(rows)
    assert "| infer |" in text and "0.985" in text and "360.0" in text

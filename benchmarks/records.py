"""Benchmark records in the one format ``edge-ptycho bench`` collects into ``bench.json``.

Each measurement is one dict with the fields of :data:`FIELDS` (None where a field does not
apply) plus any detail fields a benchmark adds.  A benchmark calls :func:`record` for each
measurement and :func:`write_json` at the end when it was given ``--json FILE``.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from edge_ptycho_bluesky.bench_cli import FIELDS  # the bench.json contract, defined once

RECORDS: list[dict[str, Any]] = []


def machine() -> str:
    """CPU model, logical CPUs and GPU use, e.g. for the ``machine`` field."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = "no GPU used"
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f"GPU {torch.cuda.get_device_name(0)}"
    except Exception:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}"


def record(name: str, **fields: Any) -> dict[str, Any]:
    """Append one measurement (missing contract fields are None; ``machine`` is filled in)."""
    rec: dict[str, Any] = {key: None for key in FIELDS}
    rec.update(name=name, machine=machine())
    rec.update(fields)
    RECORDS.append(rec)
    return rec


def write_json(path: str | os.PathLike[str] | None, records: list[dict[str, Any]] | None = None) -> None:
    """Write the records (default: all recorded so far) as a JSON list, when ``path`` is given."""
    if path is not None:
        Path(path).write_text(json.dumps(RECORDS if records is None else records, indent=2, default=float))

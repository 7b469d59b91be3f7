"""The edge worker's counters as published in its status (:class:`WorkerStats`), and the
latency percentiles and log line made from them."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["WorkerStats", "latency_percentiles", "summary_line"]


@dataclass(frozen=True)
class WorkerStats:
    """A snapshot of the worker's counters (published as its status).

    Attributes
    ----------
    received : int
        Updates delivered by the source (frames and undecodable updates).
    inferred : int
        Patches published.
    dropped : dict of str to int
        Frames counted as dropped, by reason (``gap``: never received).
    pending : int
        Frames queued or in the batch being inferred.
    queue_depth, queue_capacity, queue_high_water : int
        Current, maximum and highest-seen queue occupancy.
    batches : int
        Batches inferred.
    infer_p50_ms, infer_p99_ms : float
        Inference time per batch (preprocess + engine), percentiles.
    e2e_p50_ms, e2e_p99_ms : float
        Frame publication (``t_in``) to patch publication, percentiles.
    fps : float
        Patches per second over the last status period.
    model_version, engine : str or None
        The running model.
    swaps, models_refused : int
        Hot swaps done; candidate models refused.
    input_connected : bool
        Whether the source is connected.
    id_resets : int
        Times ``uniqueId`` went backwards (a new acquisition), not counted as gaps.
    uptime_s : float
    transport : dict
        Transport counters (e.g. pvAccess monitor overruns).
    """

    received: int
    inferred: int
    dropped: dict[str, int]
    pending: int
    queue_depth: int
    queue_capacity: int
    queue_high_water: int
    batches: int
    infer_p50_ms: float
    infer_p99_ms: float
    e2e_p50_ms: float
    e2e_p99_ms: float
    fps: float
    model_version: str | None
    engine: str | None
    swaps: int
    models_refused: int
    input_connected: bool
    id_resets: int
    uptime_s: float
    transport: dict[str, int]

    @property
    def dropped_total(self) -> int:
        """All drops, gaps included."""
        return sum(self.dropped.values())

    @property
    def gaps(self) -> int:
        """Frames never received (missing ``uniqueId`` values)."""
        return self.dropped.get("gap", 0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (with ``dropped_total`` and ``gaps``)."""
        d = asdict(self)
        d["dropped_total"] = self.dropped_total
        d["gaps"] = self.gaps
        return d


def latency_percentiles(samples: deque[float]) -> tuple[float, float]:
    """p50 and p99 of the samples (NaN, NaN when there are none)."""
    if not samples:
        return float("nan"), float("nan")
    arr = np.fromiter(samples, dtype=np.float64, count=len(samples))
    p50, p99 = np.percentile(arr, [50.0, 99.0])
    return float(p50), float(p99)


def summary_line(s: WorkerStats) -> str:
    """One log line of the counters, latencies and running model."""
    drops = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items())) or "none"
    return (f"received={s.received} inferred={s.inferred} dropped[{drops}] "
            f"queue={s.queue_depth}/{s.queue_capacity} (max {s.queue_high_water}) "
            f"infer p50/p99={s.infer_p50_ms:.2f}/{s.infer_p99_ms:.2f} ms "
            f"e2e p50/p99={s.e2e_p50_ms:.2f}/{s.e2e_p99_ms:.2f} ms fps={s.fps:.1f} "
            f"model={s.model_version} engine={s.engine}")

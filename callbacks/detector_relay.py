"""Live frames from a detector's own PVA plugin, paired with the run they belong to.

A stock areaDetector PVA plugin sends each frame the moment it is taken, with its ``uniqueId``,
time stamp and NDAttributes, but nothing of Bluesky: no run, no index in the run, no scan
position unless an NDAttributes file adds the motor readbacks. :class:`DetectorRelay` monitors
that channel and, for each frame taken within a run (its time stamp between the run's start and
stop documents), republishes it on the session's worker input with:

- ``scan_uid``: the run's uid;
- ``frame_index``: ``uniqueId`` minus the run's first ``uniqueId`` (frames lost upstream leave
  a gap, as they do in the HDF5 file);
- ``pos_x``, ``pos_y``: the NDAttributes ``position_attributes`` times ``position_scale``.

The worker, the live stitch and the live refiner then treat it as any forwarded frame. Frames
outside runs, and frames without the position attributes, are counted (``counts``) and logged
once, not relayed.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edge_ptycho_bluesky.edge.ntnda import Frame
from edge_ptycho_bluesky.edge.pva_clients import PvaFrameSource

__all__ = ["DetectorRelay"]

logger = logging.getLogger(__name__)

#: Frames per run whose lag is kept (``lag_ms``).
MAX_LAGS = 100_000


@dataclass
class _Run:
    uid: str
    t_start: float
    t_stop: float | None = None
    first_unique_id: int | None = None
    relayed: int = 0
    lags_s: list[float] = field(default_factory=list)  # arrival here - the frame's time stamp


class DetectorRelay:
    """Subscribe it to the RunEngine; it monitors ``source_pv`` and publishes on ``publisher``.

    Parameters
    ----------
    source_pv
        The detector's NTNDArray channel (``13SIM1:Pva1:Image``).
    publisher
        Has ``publish(frame, unique_id, pos=, scan_uid=, attributes=, timestamp=)`` (the
        session's :class:`~edge_ptycho_bluesky.edge.FramePublisher`).
    position_attributes
        NDAttribute names of x and y.
    position_scale
        Multiplies them into the runs' position units.
    """

    def __init__(self, source_pv: str, publisher: Any, *, position_attributes: tuple[str, str] = ("SampleX", "SampleY"),
                 position_scale: float = 1.0, server_queue_size: int = 1000) -> None:
        self.source_pv = source_pv
        self.publisher = publisher
        self.position_attributes = tuple(position_attributes)
        self.position_scale = float(position_scale)
        self.counts: Counter[str] = Counter()
        self._runs: deque[_Run] = deque(maxlen=8)
        self._lock = threading.Lock()
        self._warned: set[str] = set()
        self._source = PvaFrameSource(source_pv, server_queue_size=server_queue_size)

    def start(self) -> DetectorRelay:
        self._source.start(self)
        return self

    def close(self) -> None:
        self._source.stop()

    @property
    def connected(self) -> bool:
        return self._source.connected

    # -- documents (RunEngine thread) ------------------------------------------------------------
    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        if name == "start":
            with self._lock:
                self._runs.append(_Run(doc["uid"], float(doc["time"])))
            if not self.connected:
                logger.warning("run %s starts while the detector stream %s is not connected (its IOC down or "
                               "restarting?): frames it publishes before the stream reconnects are not inferred "
                               "live; replay the run afterwards", doc["uid"], self.source_pv)
        elif name == "stop":
            with self._lock:
                for run in self._runs:
                    if run.uid == doc.get("run_start"):
                        run.t_stop = float(doc["time"])
                        logger.info("run %s: %d frames relayed from %s", run.uid, run.relayed, self.source_pv)

    def _run_at(self, t: float) -> _Run | None:
        with self._lock:
            for run in reversed(self._runs):
                if run.t_start <= t and (run.t_stop is None or t <= run.t_stop):
                    return run
        return None

    # -- frames (pvAccess thread) ------------------------------------------------------------------
    def saturated(self) -> bool:
        return False

    def on_overflow(self, unique_id: int) -> None:  # never saturated: only for the handler protocol
        self.counts["overflow"] += 1

    def on_reject(self, reason: str, detail: str, unique_id: int | None) -> None:
        self.counts[reason] += 1
        if reason != "empty":  # a PVA plugin's record before its first frame
            self._warn_once(reason, f"{self.source_pv}: frame {unique_id} not relayed ({reason}): {detail}")

    def on_frame(self, frame: Frame) -> None:
        run = self._run_at(frame.t_in)
        if run is None:
            self.counts["between_runs"] += 1
            return
        attrs = frame.attributes
        x, y = (attrs.get(name) for name in self.position_attributes)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (x, y)):
            self.counts["no_position"] += 1
            self._warn_once("no_position", (
                f"{self.source_pv}: frames have no {'/'.join(self.position_attributes)} NDAttributes with the "
                "stage position; add the motor readbacks to the detector's NDAttributes file, or set "
                "EDGE_PTYCHO_EDGE_POSITION_ATTRIBUTES to the names it uses"))
            return
        if run.first_unique_id is None:
            run.first_unique_id = frame.unique_id
        extra = {k: v for k, v in attrs.items() if k not in self.position_attributes and k != "frame_index"}
        extra["frame_index"] = frame.unique_id - run.first_unique_id
        self.publisher.publish(frame.data, frame.unique_id, pos=(x * self.position_scale, y * self.position_scale),
                               scan_uid=run.uid, attributes=extra, timestamp=frame.t_in)
        run.relayed += 1
        self.counts["relayed"] += 1
        if len(run.lags_s) < MAX_LAGS:
            run.lags_s.append(time.time() - frame.t_in)

    def lag_ms(self, uid: str) -> tuple[float, float] | None:
        """Median and 99th percentile of how long after its time stamp each frame of run ``uid``
        reached the relay (the detector's lag behind its own clock plus the network), in ms."""
        with self._lock:
            lags = next((run.lags_s for run in self._runs if run.uid == uid), None)
        if not lags:
            return None
        p50, p99 = np.percentile(np.asarray(lags) * 1e3, [50, 99])
        return float(p50), float(p99)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)

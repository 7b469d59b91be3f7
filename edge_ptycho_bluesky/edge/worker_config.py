"""Options of the edge worker (:class:`WorkerConfig`), checked when built."""

from __future__ import annotations

import math

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    """Options of :class:`~.worker.EdgeWorker`.

    Attributes
    ----------
    batch_size : int
        Most frames inferred at once.
    max_wait_ms : float
        Longest a partly filled batch waits for more frames, so a slow trickle is not held back.
    queue_size : int
        Capacity of the queue between the transport callback and the inference thread; when
        full, new frames are dropped as ``queue_full``.
    require_position : bool
        Drop frames without ``pos_x``/``pos_y`` (``no_position``): the stitcher cannot place
        them.
    dtypes : tuple of str
        Accepted frame dtypes.
    frame_shape : (int, int) or None
        Accepted frame shape; None accepts any shape the preprocessing can turn into 128 x 128
        (checked once per new shape).
    preprocess_options : mapping
        Keyword arguments of :func:`edge_ptycho_bluesky.model.preprocess.preprocess` (``mode``,
        ``reduce``, ``crop_to``, ``scale``, ``nonnegative``).
    count_gaps : bool
        Count missing ``uniqueId`` values as ``gap`` drops (off when several consumers share a
        stream and each sees every n-th frame).
    status_period_s : float
        Period of status publication and logging.
    poll_period_s : float
        Period of model-source polling (registry change detection).
    latency_window : int
        Latency samples kept for the percentiles.
    log_period_s : float
        Each drop reason is logged at most once per this period (with a count).
    reference_exposure_s : float or None
        Exposure time (s) the model was trained with, for models whose registry entry does not
        record it (``LoadedModel.input_exposure_s`` wins when it does).  With one known, each
        frame carrying an ``exposure_s`` attribute (the fly-scan detector's, the forwarder's) is
        scaled to it; frames without the attribute are left as they are.
    position_attributes : (str, str) or None
        NDAttribute names of the frame's x and y position, for detectors that do not send
        ``pos_x``/``pos_y`` (a stock areaDetector with an NDAttributes file reading the motor
        readbacks, e.g. ``("SampleX", "SampleY")``); used when ``pos_x``/``pos_y`` are absent.
    position_scale : float
        Multiplies the positions read from ``position_attributes`` (unit conversion into the
        plans' units, e.g. ``1e-3`` for motors in nm and a stage in um).
    """

    batch_size: int = 8
    max_wait_ms: float = 5.0
    queue_size: int = 256
    require_position: bool = True
    dtypes: tuple[str, ...] = ("uint16", "uint32", "int32", "float32")
    frame_shape: tuple[int, int] | None = None
    preprocess_options: Mapping[str, Any] = field(default_factory=dict)
    count_gaps: bool = True
    status_period_s: float = 1.0
    poll_period_s: float = 0.5
    latency_window: int = 20000
    log_period_s: float = 5.0
    reference_exposure_s: float | None = None
    position_attributes: tuple[str, str] | None = None
    position_scale: float = 1.0

    def __post_init__(self) -> None:
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")
        if not self.max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms!r}")
        if int(self.queue_size) < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size!r}")
        if not (self.status_period_s > 0 and self.poll_period_s > 0):
            raise ValueError("status_period_s and poll_period_s must be > 0, got "
                             f"{self.status_period_s!r}, {self.poll_period_s!r}")
        for name in self.dtypes:
            np.dtype(name)  # raises TypeError for an unknown dtype name
        if self.frame_shape is not None and len(self.frame_shape) != 2:
            raise ValueError(f"frame_shape must be (rows, cols) or None, got {self.frame_shape!r}")
        if self.position_attributes is not None and (
                len(self.position_attributes) != 2 or not all(isinstance(n, str) and n for n in self.position_attributes)):
            raise ValueError(f"position_attributes must be two attribute names (x, y), got {self.position_attributes!r}")
        if not (isinstance(self.position_scale, (int, float)) and math.isfinite(self.position_scale)
                and self.position_scale != 0):
            raise ValueError(f"position_scale must be a finite, non-zero number, got {self.position_scale!r}")
        if self.reference_exposure_s is not None and not self.reference_exposure_s > 0:
            raise ValueError(f"reference_exposure_s must be a positive time in seconds, got "
                             f"{self.reference_exposure_s!r}")

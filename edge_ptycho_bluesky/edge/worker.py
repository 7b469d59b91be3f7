"""The edge inference worker: frames in, phase patches out, every frame accounted for.

::

    FrameSource --on_frame()--> validate --> bounded queue --> inference thread --> PatchSink
    (pvAccess monitor          (fast: decode,   (overflow =     (batch <= batch_size or
     or in-process)             checks, enqueue) "queue_full")   max_wait; preprocess; infer;
                                                                 publish one patch per frame)
    model watcher thread: polls the registry every ~0.5 s, loads + smoke-tests a new version
                          beside the running one; the inference thread swaps it in between
                          batches (no frame dropped or inferred twice).
    status thread:        publishes/logs :class:`WorkerStats` every ``status_period_s``.

Accounting: every update the source delivers is either inferred (one patch published) or
counted in ``dropped`` under a reason, and ids missing from the ``uniqueId`` sequence are
counted under ``"gap"``, so after :meth:`EdgeWorker.stop` (which drains the queue)::

    received == inferred + sum(dropped.values()) - dropped["gap"]

Drop reasons: ``empty`` (empty NTNDArray, e.g. a fresh record's initial update), ``bad_shape``,
``bad_dtype``, ``nan`` (NaN/inf), ``no_position`` (no ``pos_x``/``pos_y`` attribute),
``compressed``, ``decode_error``, ``queue_full`` (inference behind: the bounded queue was full;
the pvAccess source then counts arrivals without decoding them, so a frame that would also
have been bad counts as ``queue_full``),
``gap`` (never received: lost upstream of the worker), ``no_model`` (no model deployed yet),
``preprocess_error``, ``inference_error``, ``publish_error``, ``shutdown`` (left in the queue by
``stop(drain=False)``).

Run it as a process with ``edge-ptycho worker ...`` or ``python -m edge_ptycho_bluesky.edge.worker
...`` (same options), e.g.::

    python -m edge_ptycho_bluesky.edge.worker --input ptycho:det:frames \\
        --output ptycho:edge:phase --status ptycho:edge:status --registry ./models \\
        --engine onnxruntime --batch-size 8 --max-wait-ms 5 --threads 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import queue
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from .ntnda import Frame, Patch
from .transport import (
    DEFAULT_INPUT_PV,
    DEFAULT_OUTPUT_PV,
    DEFAULT_STATUS_PV,
    FrameSource,
    PatchSink,
)

__all__ = [
    "DROP_REASONS",
    "EdgeWorker",
    "Engine",
    "EngineFactory",
    "FileModelSource",
    "LoadedModel",
    "ModelRefused",
    "ModelSource",
    "RegistryModelSource",
    "WorkerConfig",
    "WorkerStats",
    "add_subcommand",
    "engine_factory",
    "main",
]

logger = logging.getLogger(__name__)

PATCH_SHAPE: tuple[int, int] = (128, 128)

#: Every reason a frame can be counted as dropped (see the module docstring).
DROP_REASONS: tuple[str, ...] = (
    "empty", "bad_shape", "bad_dtype", "nan", "no_position", "compressed", "decode_error",
    "queue_full", "gap", "no_model", "preprocess_error", "inference_error", "publish_error",
    "shutdown",
)


# ---------------------------------------------------------------------------------------------
# models


@runtime_checkable
class Engine(Protocol):
    """What the worker needs of an inference engine (``model.engines.InferenceEngine`` is one).

    Attributes
    ----------
    name : str
        Engine label, e.g. ``"onnxruntime"``.
    """

    name: str

    def infer(self, frames: NDArray[np.float32]) -> NDArray[np.float32]:
        """``frames : (B, 128, 128) float32`` -> ``phase : (B, 128, 128) float32``."""
        ...


#: Builds an engine from a model file (e.g. ``lambda p: load_engine(p, kind="onnxruntime")``).
EngineFactory = Callable[[Path], Engine]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, smoke-tested model ready to infer.

    Attributes
    ----------
    engine : Engine
    version : str
        Version label written into every patch it produces.
    path : Path
        The model file.
    input_scale : float or None
        The count scale the model was trained with (a registry version's
        ``extra.preprocess.scale``), applied to every preprocessed batch on top of the
        worker's own ``scale`` option; ``None``: none.
    input_exposure_s : float or None
        The exposure time of the training frames (``extra.preprocess.exposure_s``): a frame with
        an ``exposure_s`` attribute is scaled by ``input_exposure_s / exposure_s``; ``None``: not
        recorded (then :attr:`WorkerConfig.reference_exposure_s`, if set, stands in).
    """

    engine: Engine
    version: str
    path: Path
    input_scale: float | None = None
    input_exposure_s: float | None = None


class ModelRefused(RuntimeError):
    """A candidate model failed to load, verify or smoke-test; the running one stays."""

    def __init__(self, version: str | None, message: str) -> None:
        super().__init__(message)
        self.version = version


@runtime_checkable
class ModelSource(Protocol):
    """Where the worker's models come from."""

    def load_initial(self) -> LoadedModel | None:
        """The model to start with; None when none is available yet (frames are then dropped
        as ``no_model`` until :meth:`poll` delivers one).

        Raises
        ------
        ModelRefused
            When the available model cannot be used.
        """

    def poll(self) -> LoadedModel | None:
        """A newly deployed model, loaded beside the running one, or None when nothing changed.

        Called every ``poll_period_s`` on the watcher thread, never on the inference thread.

        Raises
        ------
        ModelRefused
            When a new deployment cannot be used (it is not retried until it changes again).
        """


def smoke_test(engine: Engine, version: str) -> None:
    """Infer one blank frame and check the output shape and values (also warms the engine up).

    Raises
    ------
    ModelRefused
        When inference fails, or the output is not ``(1, 128, 128)`` finite values.
    """
    try:
        out = np.asarray(engine.infer(np.zeros((1, *PATCH_SHAPE), np.float32)))
    except Exception as exc:
        raise ModelRefused(version, f"model {version}: smoke-test inference failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
    if out.size != int(np.prod(PATCH_SHAPE)):
        raise ModelRefused(version, f"model {version}: output of shape {out.shape} for one "
                                    f"frame; a (1, 128, 128) phase patch is needed")
    if not np.isfinite(out).all():
        raise ModelRefused(version, f"model {version}: non-finite output for a blank frame")


def _file_version(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.stem}@{digest.hexdigest()[:12]}"


class FileModelSource:
    """One model file, loaded once (no hot swap).

    Parameters
    ----------
    path
        The model file (``.onnx``; or whatever ``factory`` takes).
    factory
        Builds the engine.
    version
        Version label; default ``"<stem>@<first 12 hex of sha256>"``.
    """

    def __init__(self, path: str | Path, factory: EngineFactory, version: str | None = None) -> None:
        self.path = Path(path)
        self.factory = factory
        self.version = version

    def load_initial(self) -> LoadedModel:
        if not self.path.is_file():
            raise ModelRefused(self.version, f"no model file at {self.path}; check --model")
        version = self.version or _file_version(self.path)
        try:
            engine = self.factory(self.path)
        except Exception as exc:
            raise ModelRefused(version, f"model {self.path} failed to load: "
                                        f"{type(exc).__name__}: {exc}") from exc
        smoke_test(engine, version)
        return LoadedModel(engine, version, self.path)

    def poll(self) -> None:
        return None


class RegistryModelSource:
    """The deployed version of a model registry, hot-swapped when the deployment changes.

    Polls ``registry.watch_token()`` (one small read of ``CURRENT``); when it changes, reads
    ``registry.current()`` (full verification: checksums, ONNX checks), builds the engine with
    ``factory`` and smoke-tests it.  A version that fails any step raises
    :class:`ModelRefused` once, and is not retried until the deployment changes again.

    Parameters
    ----------
    registry
        A :class:`~edge_ptycho_bluesky.training.registry.ModelRegistry`, or its root folder.
    factory
        Builds an engine from ``ModelVersion.onnx_path``.
    """

    def __init__(self, registry: Any, factory: EngineFactory) -> None:
        if isinstance(registry, (str, Path)):
            from ..training.registry import ModelRegistry

            registry = ModelRegistry(registry, create=False)
        self.registry = registry
        self.factory = factory
        self._token: Any = None
        self._loaded_version: str | None = None

    def _load_current(self) -> LoadedModel | None:
        from ..training.registry import RegistryError

        try:
            mv = self.registry.current(verify=True)
        except RegistryError as exc:
            raise ModelRefused(None, f"deployed model refused: {exc}") from exc
        if mv is None:
            return None
        if mv.version == self._loaded_version:
            return None
        try:
            engine = self.factory(mv.onnx_path)
        except Exception as exc:
            raise ModelRefused(mv.version, f"model {mv.version} ({mv.onnx_path}) failed to "
                                           f"load: {type(exc).__name__}: {exc}") from exc
        smoke_test(engine, mv.version)
        self._loaded_version = mv.version
        return LoadedModel(engine, mv.version, mv.onnx_path, mv.input_scale, mv.input_exposure_s)

    def _token_changed(self) -> bool:
        from ..training.registry import RegistryError

        try:
            token = self.registry.watch_token()
        except RegistryError as exc:
            token = ("corrupt", str(exc))
        if token == self._token:
            return False
        self._token = token
        if isinstance(token, tuple):
            raise ModelRefused(None, f"registry pointer unreadable: {token[1]}")
        return True

    def load_initial(self) -> LoadedModel | None:
        self._token_changed()
        return self._load_current()

    def poll(self) -> LoadedModel | None:
        if not self._token_changed():
            return None
        return self._load_current()


def engine_factory(kind: str = "auto", threads: int | None = None, *, spinning: bool = False) -> EngineFactory:
    """An :data:`EngineFactory` using :func:`edge_ptycho_bluesky.model.engines.load_engine`.

    Parameters
    ----------
    kind : {"auto", "onnxruntime", "torch", "tensorrt"}
    threads
        Intra-op threads for ONNX Runtime / torch on CPU; None leaves the library default.
    spinning
        Let ONNX Runtime's idle threads busy-wait between operators (its own default).  Off by
        default: the worker shares the CPU with the transport (and, on a small edge box, with the
        detector and the stitcher), and spinning threads take the cores those need.  Measured on 2
        cores, fly scan at 500 Hz: p99 latency 91 ms with spinning, 52-70 ms without (docs/benchmarks.md).
    """
    from ..model.engines import ENGINE_KINDS

    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINE_KINDS}")

    def factory(path: Path) -> Engine:
        from ..model.engines import load_engine

        ort_opts: dict[str, Any] = {"allow_spinning": bool(spinning)}
        if threads is not None:
            ort_opts["intra_op_threads"] = int(threads)
            import torch

            torch.set_num_threads(int(threads))
        if kind == "onnxruntime":
            return load_engine(path, "onnxruntime", **ort_opts)
        if kind == "auto":
            return load_engine(path, "auto", onnxruntime=ort_opts)
        return load_engine(path, kind)

    return factory


# ---------------------------------------------------------------------------------------------
# configuration and statistics


@dataclass(frozen=True)
class WorkerConfig:
    """Options of :class:`EdgeWorker`.

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
        if self.reference_exposure_s is not None and not self.reference_exposure_s > 0:
            raise ValueError(f"reference_exposure_s must be a positive time in seconds, got "
                             f"{self.reference_exposure_s!r}")


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


def _percentiles(samples: deque[float]) -> tuple[float, float]:
    if not samples:
        return float("nan"), float("nan")
    arr = np.fromiter(samples, dtype=np.float64, count=len(samples))
    p50, p99 = np.percentile(arr, [50.0, 99.0])
    return float(p50), float(p99)


class _RateLimitedLog:
    """Logs the first event of each key at once, then at most one summary per period."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._last: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()
        self._lock = threading.Lock()

    def warning(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period_s:
                self._suppressed[key] += 1
                return
            self._last[key] = now
            n = self._suppressed.pop(key, 0)
        if n:
            logger.warning(msg + " (and %d more '%s' since the last message)", *args, n, key)
        else:
            logger.warning(msg, *args)


@dataclass(frozen=True)
class _Item:
    frame: Frame
    t_recv: float


# ---------------------------------------------------------------------------------------------
# the worker


class EdgeWorker:
    """Transport-agnostic edge inference worker.

    Parameters
    ----------
    engine_source
        A :class:`ModelSource` (:class:`FileModelSource`, :class:`RegistryModelSource`).
    transport_in
        A :class:`~edge_ptycho_bluesky.edge.transport.FrameSource`.
    transport_out
        A :class:`~edge_ptycho_bluesky.edge.transport.PatchSink`.
    config
        :class:`WorkerConfig`; defaults when None.
    preprocess
        ``frames (N, H, W) -> (N, 1, 128, 128) float32``; default
        :func:`edge_ptycho_bluesky.model.preprocess.preprocess` with
        ``config.preprocess_options``.

    Examples
    --------
    >>> worker = EdgeWorker(RegistryModelSource(reg, engine_factory("onnxruntime")),
    ...                     PvaFrameSource("ptycho:det:frames"),
    ...                     PvaPatchSink("ptycho:edge:phase", "ptycho:edge:status"))  # doctest: +SKIP
    >>> worker.start(); ...; worker.stop(); worker.stats().inferred           # doctest: +SKIP
    """

    def __init__(
        self,
        engine_source: ModelSource,
        transport_in: FrameSource,
        transport_out: PatchSink,
        config: WorkerConfig | None = None,
        *,
        preprocess: Callable[[NDArray[Any]], NDArray[np.float32]] | None = None,
    ) -> None:
        self.config = config or WorkerConfig()
        self._source = engine_source
        self._transport_in = transport_in
        self._sink = transport_out
        if preprocess is None:
            from ..model.preprocess import preprocess as _pre

            opts = dict(self.config.preprocess_options)

            def preprocess(frames: NDArray[Any]) -> NDArray[np.float32]:
                return _pre(frames, **opts)

        self._preprocess = preprocess
        self._allowed = frozenset(np.dtype(d) for d in self.config.dtypes)
        self._shape_ok: dict[tuple[int, ...], bool] = {}
        self._queue: queue.Queue[_Item] = queue.Queue(maxsize=int(self.config.queue_size))
        self._lock = threading.Lock()
        self._log = _RateLimitedLog(self.config.log_period_s)
        self._model: LoadedModel | None = None
        self._pending_model: LoadedModel | None = None
        self._stop_event = threading.Event()
        self._draining = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._stopped = False
        self._reset_counters()

    def _reset_counters(self) -> None:
        self._received = 0
        self._inferred = 0
        self._dropped: Counter[str] = Counter()
        self._in_batch = 0
        self._high_water = 0
        self._batches = 0
        self._swaps = 0
        self._refused = 0
        self._id_resets = 0
        self._last_uid: int | None = None
        self._infer_ms: deque[float] = deque(maxlen=self.config.latency_window)
        self._e2e_ms: deque[float] = deque(maxlen=self.config.latency_window)
        self._t0 = time.monotonic()
        self._fps = 0.0
        self._fps_mark = (time.monotonic(), 0)

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> EdgeWorker:
        """Load the initial model, open the output, start the threads and the input."""
        if self._started:
            raise RuntimeError("EdgeWorker.start() called twice; make a new worker")
        self._started = True
        try:
            self._model = self._source.load_initial()
        except ModelRefused as exc:
            self._refused += 1
            logger.error("%s; frames are dropped as 'no_model' until a good one is deployed", exc)
        if self._model is None:
            logger.warning("no model available yet; waiting for one to be deployed")
        else:
            logger.info("model %s loaded (%s)", self._model.version, self._model.engine.name)
        self._sink.start()
        for target, name in ((self._infer_loop, "edge-infer"), (self._watch_loop, "edge-watch"),
                             (self._status_loop, "edge-status")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._transport_in.start(self)
        return self

    def stop(self, drain: bool = True, timeout: float = 30.0) -> WorkerStats:
        """Stop the input, finish (``drain``) or drop (``shutdown``) queued frames, stop.

        Returns
        -------
        WorkerStats
            Final counters (also published as the last status).
        """
        if not self._started or self._stopped:
            return self.stats()
        self._stopped = True
        self._transport_in.stop()
        if not drain:
            self._discard_queue()
        self._draining.set()
        if self._threads:  # empty when start() failed half-way
            infer_thread = self._threads[0]
            infer_thread.join(timeout)
            if infer_thread.is_alive():
                logger.error("inference thread did not finish within %.1f s", timeout)
        self._discard_queue()
        self._stop_event.set()
        for t in self._threads[1:]:
            t.join(timeout=5.0)
        final = self.stats()
        try:
            self._sink.publish_status(final.to_dict())
        except Exception:
            logger.exception("could not publish the final status")
        self._sink.stop()
        logger.info("edge worker stopped: %s", _summary(final))
        return final

    def __enter__(self) -> EdgeWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _discard_queue(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._drop("shutdown", "worker stopped with frames queued", None)

    # -- FrameHandler (transport thread: keep it fast) ------------------------------------
    def _drop(self, reason: str, detail: str, unique_id: int | None, n: int = 1) -> None:
        with self._lock:
            self._dropped[reason] += n
        if reason == "empty":  # normal: the first update of a freshly created record
            logger.info("empty update uniqueId=%s counted as dropped ('empty')", unique_id)
        elif reason != "gap":
            self._log.warning(reason, "dropped frame uniqueId=%s (%s): %s", unique_id, reason,
                              detail)

    def _track_id(self, unique_id: int) -> None:
        last = self._last_uid
        self._last_uid = unique_id
        if last is None or not self.config.count_gaps:
            return
        if unique_id > last + 1:
            n = unique_id - last - 1
            with self._lock:
                self._dropped["gap"] += n
            self._log.warning("gap", "%d frame(s) missing before uniqueId=%d (lost upstream)",
                              n, unique_id)
        elif unique_id <= last:
            with self._lock:
                self._id_resets += 1
            logger.info("uniqueId went from %d back to %d: new acquisition", last, unique_id)

    def on_reject(self, reason: str, detail: str, unique_id: int | None) -> None:
        """Count an update the transport could not decode."""
        with self._lock:
            self._received += 1
        if unique_id is not None and reason != "empty":
            self._track_id(unique_id)
        self._drop(reason, detail, unique_id)

    def _problem(self, frame: Frame) -> tuple[str, str] | None:
        data = frame.data
        if data.dtype not in self._allowed:
            return "bad_dtype", f"dtype {data.dtype} not in {self.config.dtypes}"
        if data.ndim != 2 or data.size == 0:
            return "bad_shape", f"shape {data.shape} is not a 2-D image"
        if not self._shape_accepted(data):
            return "bad_shape", f"shape {data.shape} cannot be preprocessed to 128 x 128"
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            return "nan", f"{int(np.count_nonzero(~np.isfinite(data)))} NaN/inf values"
        if frame.pos is None and self.config.require_position:
            return "no_position", "no pos_x/pos_y attributes"
        return None

    def _shape_accepted(self, data: NDArray[Any]) -> bool:
        shape = data.shape
        if self.config.frame_shape is not None:
            return shape == tuple(self.config.frame_shape)
        ok = self._shape_ok.get(shape)
        if ok is None:
            try:
                out = self._preprocess(np.zeros((1, *shape), dtype=data.dtype))
                ok = tuple(out.shape) == (1, 1, *PATCH_SHAPE)
            except (ValueError, TypeError):
                ok = False
            if len(self._shape_ok) < 64:
                self._shape_ok[shape] = ok
        return ok

    def saturated(self) -> bool:
        """Whether the inference queue is full (the transport may then skip decoding)."""
        return self._queue.full()

    def on_overflow(self, unique_id: int) -> None:
        """Count an update that arrived while the queue was full, without decoding it.

        The transport calls this instead of :meth:`on_frame` when :meth:`saturated` is true,
        so an overloaded worker does not spend its CPU decoding frames it must drop anyway.
        """
        with self._lock:
            self._received += 1
        self._track_id(unique_id)
        self._drop("queue_full", f"inference queue full ({self.config.queue_size})", unique_id)

    def on_frame(self, frame: Frame) -> None:
        """Validate a frame and enqueue it for inference (or count it as dropped)."""
        t_recv = time.time()
        with self._lock:
            self._received += 1
        self._track_id(frame.unique_id)
        problem = self._problem(frame)
        if problem is not None:
            self._drop(problem[0], problem[1], frame.unique_id)
            return
        try:
            self._queue.put_nowait(_Item(frame, t_recv))
        except queue.Full:
            self._drop("queue_full", f"inference queue full ({self.config.queue_size})",
                       frame.unique_id)
            return
        depth = self._queue.qsize()
        if depth > self._high_water:
            self._high_water = depth

    # -- inference thread -------------------------------------------------------------------
    def _next_batch(self) -> list[_Item]:
        try:
            first = self._queue.get(timeout=0.05)
        except queue.Empty:
            return []
        batch = [first]
        size = self.config.batch_size
        deadline = time.monotonic() + self.config.max_wait_ms / 1000.0
        while len(batch) < size:
            try:
                batch.append(self._queue.get_nowait())
                continue
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._draining.is_set():
                break
            try:
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _infer_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                if self._draining.is_set() and self._queue.empty():
                    return
                self._swap_if_pending()  # idle is "between batches" too
                continue
            with self._lock:
                self._in_batch = len(batch)
            try:
                self._swap_if_pending()
                # frames of one batch must share a shape: infer runs of equal shape in order
                start = 0
                for i in range(1, len(batch) + 1):
                    if i == len(batch) or batch[i].frame.data.shape != batch[start].frame.data.shape:
                        self._infer(batch[start:i])
                        start = i
            except Exception:  # never let the inference thread die
                logger.exception("unexpected error in the inference loop")
            finally:
                with self._lock:
                    self._in_batch = 0

    def swap_to(self, model: LoadedModel) -> None:
        """Hand over an already loaded model; the inference thread swaps it in between batches.

        Use this for models that do not come from the worker's model source (e.g. the pvapy
        processor's ``configure``); load and :func:`smoke_test` it off the inference thread.
        """
        with self._lock:
            self._pending_model = model

    def _swap_if_pending(self) -> None:
        with self._lock:
            new, self._pending_model = self._pending_model, None
        if new is None:
            return
        old = self._model
        self._model = new
        with self._lock:
            self._swaps += 1
        logger.info("hot swap: model %s -> %s (%s), between batches",
                    old.version if old else None, new.version, new.engine.name)

    def _exposure_factors(self, items: list[_Item], model: LoadedModel) -> NDArray[np.float32] | None:
        """Per-frame count factors ``t_model / t_frame`` (None: nothing to scale)."""
        reference = model.input_exposure_s or self.config.reference_exposure_s
        if reference is None:
            return None
        exposures = [it.frame.attributes.get("exposure_s") for it in items]
        if all(e is None for e in exposures):
            return None
        factors = np.ones(len(items), np.float32)
        for k, e in enumerate(exposures):
            if isinstance(e, (int, float)) and not isinstance(e, bool) and math.isfinite(e) and e > 0:
                factors[k] = reference / e
            elif e is not None:
                self._log.warning("bad_exposure", "frame uniqueId=%d: exposure_s attribute %r is not a positive "
                                  "time; its counts are not scaled", items[k].frame.unique_id, e)
        return factors

    def _infer(self, items: list[_Item]) -> None:
        n = len(items)
        model = self._model
        first_uid = items[0].frame.unique_id
        if model is None:
            self._drop("no_model", "no model deployed", first_uid, n)
            return
        t0 = time.perf_counter()
        try:
            x = self._preprocess(np.stack([it.frame.data for it in items]))
            if model.input_scale is not None:
                x *= np.float32(model.input_scale)  # in place: preprocess returns a fresh array
            factors = self._exposure_factors(items, model)
            if factors is not None:
                x *= factors[:, None, None, None]
        except Exception as exc:
            self._drop("preprocess_error", f"{type(exc).__name__}: {exc}", first_uid, n)
            return
        try:
            y = np.asarray(model.engine.infer(np.ascontiguousarray(x[:, 0])))
            if y.size != n * PATCH_SHAPE[0] * PATCH_SHAPE[1]:
                raise ValueError(f"engine returned shape {y.shape} for {n} frames")
            y = np.array(y, dtype=np.float32, copy=True).reshape(n, *PATCH_SHAPE)
        except Exception as exc:
            self._drop("inference_error", f"{type(exc).__name__}: {exc}", first_uid, n)
            return
        infer_ms = (time.perf_counter() - t0) * 1e3
        published = 0
        e2e: list[float] = []
        for it, phase in zip(items, y):
            f = it.frame
            patch = Patch(f.unique_id, phase, f.pos, f.scan_uid or "", model.version, f.t_in,
                          f.attributes)
            try:
                self._sink.publish(patch)
            except Exception as exc:
                self._drop("publish_error", f"{type(exc).__name__}: {exc}", f.unique_id)
                continue
            published += 1
            e2e.append((time.time() - f.t_in) * 1e3)
        with self._lock:
            self._inferred += published
            self._batches += 1
            self._infer_ms.append(infer_ms)
            self._e2e_ms.extend(e2e)

    # -- watcher and status threads ------------------------------------------------------
    def _watch_loop(self) -> None:
        while not self._stop_event.wait(self.config.poll_period_s):
            try:
                new = self._source.poll()
            except ModelRefused as exc:
                with self._lock:
                    self._refused += 1
                logger.error("%s; keeping model %s", exc,
                             self._model.version if self._model else None)
                continue
            except Exception:
                with self._lock:
                    self._refused += 1
                logger.exception("model source poll failed; keeping the running model")
                continue
            if new is not None:
                logger.info("model %s loaded beside %s; swapping at the next batch", new.version,
                            self._model.version if self._model else None)
                with self._lock:
                    self._pending_model = new

    def _status_loop(self) -> None:
        while not self._stop_event.wait(self.config.status_period_s):
            try:
                stats = self.stats()
                logger.info("%s", _summary(stats))
                self._sink.publish_status(stats.to_dict())
            except Exception as exc:
                self._log.warning("status", "status publication failed: %s: %s",
                                  type(exc).__name__, exc)

    # -- statistics -------------------------------------------------------------------------
    def stats(self) -> WorkerStats:
        """A consistent snapshot of the counters."""
        # transport calls stay outside the lock: the transport thread may hold its own
        # locks while it waits for ours in on_frame()
        try:
            transport = dict(self._transport_in.stats())
        except Exception:
            transport = {}
        connected = bool(self._transport_in.connected)
        with self._lock:
            now = time.monotonic()
            t_mark, n_mark = self._fps_mark
            if now - t_mark >= 0.5 * self.config.status_period_s:
                self._fps = (self._inferred - n_mark) / (now - t_mark)
                self._fps_mark = (now, self._inferred)
            infer = _percentiles(self._infer_ms)
            e2e = _percentiles(self._e2e_ms)
            depth = self._queue.qsize()
            model = self._model
            return WorkerStats(
                received=self._received,
                inferred=self._inferred,
                dropped=dict(self._dropped),
                pending=depth + self._in_batch,
                queue_depth=depth,
                queue_capacity=int(self.config.queue_size),
                queue_high_water=self._high_water,
                batches=self._batches,
                infer_p50_ms=infer[0],
                infer_p99_ms=infer[1],
                e2e_p50_ms=e2e[0],
                e2e_p99_ms=e2e[1],
                fps=self._fps,
                model_version=model.version if model else None,
                engine=model.engine.name if model else None,
                swaps=self._swaps,
                models_refused=self._refused,
                input_connected=connected,
                id_resets=self._id_resets,
                uptime_s=now - self._t0,
                transport=transport,
            )

    def reset_stats(self) -> None:
        """Zero the counters (the running model and queue are kept)."""
        with self._lock:
            model_refused = self._refused
            self._reset_counters()
            self._refused = model_refused


def _summary(s: WorkerStats) -> str:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(s.dropped.items())) or "none"
    return (f"received={s.received} inferred={s.inferred} dropped[{drops}] "
            f"queue={s.queue_depth}/{s.queue_capacity} (max {s.queue_high_water}) "
            f"infer p50/p99={s.infer_p50_ms:.2f}/{s.infer_p99_ms:.2f} ms "
            f"e2e p50/p99={s.e2e_p50_ms:.2f}/{s.e2e_p99_ms:.2f} ms fps={s.fps:.1f} "
            f"model={s.model_version} engine={s.engine}")


# ---------------------------------------------------------------------------------------------
# command line


def _add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--registry", type=Path, metavar="DIR",
                     help="model registry folder; the deployed version is hot-swapped on change")
    src.add_argument("--model", type=Path, metavar="FILE.onnx", help="one model file (no swap)")
    p.add_argument("--input", default=DEFAULT_INPUT_PV, metavar="PV",
                   help=f"NTNDArray frame channel (default {DEFAULT_INPUT_PV})")
    p.add_argument("--output", default=DEFAULT_OUTPUT_PV, metavar="PV",
                   help=f"phase patch channel served by the worker (default {DEFAULT_OUTPUT_PV})")
    p.add_argument("--status", default=DEFAULT_STATUS_PV, metavar="PV",
                   help=f"status channel served by the worker (default {DEFAULT_STATUS_PV})")
    p.add_argument("--engine", default="auto", choices=("auto", "onnxruntime", "torch", "tensorrt"),
                   help="inference engine (default auto: TensorRT > torch-CUDA > ONNX Runtime)")
    p.add_argument("--batch-size", type=int, default=8, help="frames per batch (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="longest a partial batch waits for more frames (default 5)")
    p.add_argument("--queue-size", type=int, default=256,
                   help="inference queue capacity; overflow is dropped as queue_full (default 256)")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op threads of the engine (default: library default)")
    p.add_argument("--ort-spinning", action="store_true",
                   help="let ONNX Runtime's idle threads busy-wait (lower latency on a machine with "
                        "cores to spare; off by default: it starves the transport on a small one)")
    p.add_argument("--server-queue-size", type=int, default=1000,
                   help="pvAccess server-side monitor queue of the input (default 1000)")
    p.add_argument("--no-require-position", dest="require_position", action="store_false",
                   help="infer frames that carry no pos_x/pos_y attributes")
    p.add_argument("--scale", type=float, default=None,
                   help="count scale factor applied after binning (see model.preprocess)")
    p.add_argument("--reference-exposure", type=float, default=None, metavar="SECONDS",
                   help="exposure the model was trained with, when its registry entry does not record "
                        "it: frames carrying an exposure_s attribute are scaled to it")
    p.add_argument("--crop-to", type=int, default=None,
                   help="centre-crop frames to this size before binning (e.g. 512 for 516 x 516)")
    p.add_argument("--status-period", type=float, default=1.0, help="seconds (default 1)")
    p.add_argument("--poll-period", type=float, default=0.5,
                   help="registry poll period in seconds (default 0.5)")
    p.add_argument("--duration", type=float, default=None,
                   help="stop after this many seconds (default: run until SIGINT/SIGTERM)")
    p.add_argument("--stats-json", type=Path, default=None,
                   help="write the final statistics to this JSON file on exit")
    p.add_argument("--no-loopback", dest="loopback", action="store_false",
                   help="do not force pvAccess onto 127.0.0.1 (use the EPICS_PVA* environment)")
    p.add_argument("--log-level", default=None,
                   help="logging level, e.g. WARNING (default INFO, or the CLI's own setting)")


def _config_from_args(args: argparse.Namespace) -> WorkerConfig:
    pre: dict[str, Any] = {}
    if args.scale is not None:
        pre["scale"] = args.scale
    if args.crop_to is not None:
        pre["crop_to"] = args.crop_to
    return WorkerConfig(batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
                        queue_size=args.queue_size, require_position=args.require_position,
                        preprocess_options=pre, status_period_s=args.status_period,
                        poll_period_s=args.poll_period, reference_exposure_s=args.reference_exposure)


def run_worker(args: argparse.Namespace) -> int:
    """Run the worker from parsed CLI arguments until a signal or ``--duration``."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level:
        level = logging.getLevelName(str(args.log_level).upper())
        if not isinstance(level, int):
            print(f"edge-ptycho worker: unknown --log-level {args.log_level!r}", file=sys.stderr)
            return 2
        root.setLevel(level)
    if args.loopback:
        from .transport import loopback_env

        loopback_env()
    from .transport import PvaFrameSource, PvaPatchSink

    try:
        config = _config_from_args(args)
        factory = engine_factory(args.engine, args.threads, spinning=args.ort_spinning)
    except (ValueError, TypeError) as exc:
        print(f"edge-ptycho worker: {exc}", file=sys.stderr)
        return 2
    source: ModelSource
    if args.model is not None:
        source = FileModelSource(args.model, factory)
    else:
        try:
            source = RegistryModelSource(args.registry, factory)
        except ValueError as exc:  # RegistryError
            print(f"edge-ptycho worker: {exc}", file=sys.stderr)
            return 2
    worker = EdgeWorker(source, PvaFrameSource(args.input, server_queue_size=args.server_queue_size),
                        PvaPatchSink(args.output, args.status), config)
    done = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        logger.info("signal %d: stopping", signum)
        done.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        print(json.dumps({"event": "started", "input": args.input, "output": args.output,
                          "status": args.status}), flush=True)
        done.wait(args.duration)
    finally:
        final = worker.stop(drain=True)
        for s, h in previous.items():
            signal.signal(s, h)
    record = final.to_dict()
    if args.stats_json is not None:
        args.stats_json.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps({"event": "stopped", **record}, default=str), flush=True)
    return 0


def add_subcommand(subparsers: Any) -> None:
    """Register ``edge-ptycho worker`` on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "worker", help="run the edge inference worker (pvAccess frames in, phase patches out)",
        description=__doc__.split("\n\n")[0] if __doc__ else None)
    _add_arguments(p)
    p.set_defaults(func=run_worker)


def main(argv: list[str] | None = None) -> int:
    """``python -m edge_ptycho_bluesky.edge.worker [options]`` (the options of ``edge-ptycho
    worker``)."""
    parser = argparse.ArgumentParser(prog="python -m edge_ptycho_bluesky.edge.worker",
                                     description="Edge inference worker.")
    _add_arguments(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

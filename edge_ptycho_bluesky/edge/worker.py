"""The edge inference worker: frames in, phase patches out, every frame accounted for.

::

    FrameSource --on_frame()--> validate --> bounded queue --> inference thread --> PatchSink
    (pvAccess monitor          (fast: decode,   (overflow =     (batch <= batch_size or
     or in-process)             checks, enqueue) "queue_full")   max_wait; preprocess; infer;
                                                                 publish one patch per frame)
    model watcher thread: polls the registry every ~0.5 s, loads + smoke-tests a new version
                          beside the running one; the inference thread swaps it in between
                          batches (no frame dropped or inferred twice).
    status thread:        publishes/logs :class:`~.worker_stats.WorkerStats` every ``status_period_s``.

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

Run it as a process with ``edge-ptycho worker ...`` or ``python -m edge_ptycho_bluesky.edge.cli
...`` (same options; :mod:`edge_ptycho_bluesky.edge.cli`), e.g.::

    python -m edge_ptycho_bluesky.edge.cli --input ptycho:det:frames \\
        --output ptycho:edge:phase --status ptycho:edge:status --registry ./models \\
        --engine onnxruntime --batch-size 8 --max-wait-ms 5 --threads 1
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .. import FRAME_SIZE
from ..model.contract import InputContract
from .model_source import PATCH_SHAPE, LoadedModel, ModelRefused, ModelSource
from .ntnda import Frame, Patch
from .transport import FrameSource, PatchSink
from .worker_config import WorkerConfig
from .worker_stats import WorkerStats, latency_percentiles, summary_line

__all__ = ["DROP_REASONS", "EdgeWorker"]

logger = logging.getLogger(__name__)

#: Every reason a frame can be counted as dropped (see the module docstring).
DROP_REASONS: tuple[str, ...] = (
    "empty", "bad_shape", "bad_dtype", "nan", "no_position", "compressed", "decode_error",
    "queue_full", "gap", "no_model", "preprocess_error", "inference_error", "publish_error",
    "shutdown",
)


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
        A :class:`~.model_source.ModelSource` (:class:`~.model_source.FileModelSource`,
        :class:`~.model_source.RegistryModelSource`).
    transport_in
        A :class:`~edge_ptycho_bluesky.edge.transport.FrameSource`.
    transport_out
        A :class:`~edge_ptycho_bluesky.edge.transport.PatchSink`.
    config
        :class:`~.worker_config.WorkerConfig`; defaults when None.

    Each batch becomes network input through the model's
    :class:`~edge_ptycho_bluesky.model.contract.InputContract` (``config.preprocess_options`` for
    the detector's frames, the model's count scale, and its training exposure against each frame's
    ``exposure_s`` attribute), the same contract validation and ``edge-ptycho infer`` use.

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
    ) -> None:
        self.config = config or WorkerConfig()
        self._source = engine_source
        self._transport_in = transport_in
        self._sink = transport_out
        # detector-side preprocessing alone (shape checks); per model, _contract adds its scale
        self._detector_input = InputContract(options=self.config.preprocess_options)
        self._contract: tuple[LoadedModel | None, InputContract] = (None, self._detector_input)
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
        logger.info("edge worker stopped: %s", summary_line(final))
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

    def _with_position(self, frame: Frame) -> Frame:
        """The frame with its position taken from the configured NDAttributes (scaled), when it has them."""
        assert self.config.position_attributes is not None
        x_name, y_name = self.config.position_attributes
        x, y = frame.attributes.get(x_name), frame.attributes.get(y_name)
        if not (isinstance(x, (int, float)) and isinstance(y, (int, float))
                and math.isfinite(x) and math.isfinite(y)):
            return frame
        scale = self.config.position_scale
        return dataclasses.replace(frame, pos=(float(x) * scale, float(y) * scale))

    def _problem(self, frame: Frame) -> tuple[str, str] | None:
        data = frame.data
        if data.dtype not in self._allowed:
            return "bad_dtype", f"dtype {data.dtype} not in {self.config.dtypes}"
        if data.ndim != 2 or data.size == 0:
            return "bad_shape", f"shape {data.shape} is not a 2-D image"
        if not self._shape_accepted(data):
            return "bad_shape", f"shape {data.shape} cannot be preprocessed to {FRAME_SIZE} x {FRAME_SIZE}"
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            return "nan", f"{int(np.count_nonzero(~np.isfinite(data)))} NaN/inf values"
        if frame.pos is None and self.config.require_position:
            names = "pos_x/pos_y" + ("" if self.config.position_attributes is None
                                     else " or {}/{}".format(*self.config.position_attributes))
            return "no_position", f"no {names} attributes"
        return None

    def _shape_accepted(self, data: NDArray[Any]) -> bool:
        shape = data.shape
        if self.config.frame_shape is not None:
            return shape == tuple(self.config.frame_shape)
        ok = self._shape_ok.get(shape)
        if ok is None:
            try:
                out = self._detector_input.prepare(np.zeros((1, *shape), dtype=data.dtype))
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
        if frame.pos is None and self.config.position_attributes is not None:
            frame = self._with_position(frame)
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
        processor's ``configure``); load and :func:`~.model_source.smoke_test` it off the inference thread.
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

    def _input_contract(self, model: LoadedModel) -> InputContract:
        """The model's input contract (built once per model)."""
        known, contract = self._contract
        if known is not model:
            contract = InputContract.from_version(model, reference_exposure_s=self.config.reference_exposure_s,
                                                  options=self.config.preprocess_options)
            self._contract = (model, contract)
        return contract

    def _bad_exposure(self, items: list[_Item]) -> Callable[[int, Any], None]:
        def report(k: int, value: Any) -> None:
            self._log.warning("bad_exposure", "frame uniqueId=%d: exposure_s attribute %r is not a positive "
                              "time; its counts are not scaled", items[k].frame.unique_id, value)
        return report

    def _infer(self, items: list[_Item]) -> None:
        n = len(items)
        model = self._model
        first_uid = items[0].frame.unique_id
        if model is None:
            self._drop("no_model", "no model deployed", first_uid, n)
            return
        t0 = time.perf_counter()
        try:
            x = self._input_contract(model).prepare(
                np.stack([it.frame.data for it in items]),
                [it.frame.attributes.get("exposure_s") for it in items], on_bad_exposure=self._bad_exposure(items))
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
                logger.info("%s", summary_line(stats))
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
            infer = latency_percentiles(self._infer_ms)
            e2e = latency_percentiles(self._e2e_ms)
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

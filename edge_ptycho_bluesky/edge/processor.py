"""The edge worker as a pvapy streaming-framework processor, for scale-out with ``--n-consumers``.

:class:`EdgePtychoProcessor` is an ``AdImageProcessor`` (pvapy 5.x ``pvapy.hpc``) wrapping the
same :class:`~edge_ptycho_bluesky.edge.worker.EdgeWorker` as ``edge-ptycho worker``: the
framework's ``process()`` hook only decodes and enqueues each NTNDArray frame; the worker's own
thread batches, infers and publishes every phase patch on the consumer's output channel through
``updateOutputChannel`` (same ``uniqueId``, attributes ``pos_x``, ``pos_y``, ``scan_uid``,
``model_version``; see :mod:`edge_ptycho_bluesky.edge.ntnda`).  The worker's counters appear in
the consumer's status channel (``getStats``).

Command line (one consumer; keep everything on loopback)::

    EPICS_PVA_ADDR_LIST=127.0.0.1 EPICS_PVA_AUTO_ADDR_LIST=NO EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1 \\
    pvapy-hpc-consumer \\
        --input-channel ptycho:det:frames \\
        --output-channel 'ptycho:edge:*:phase' \\
        --status-channel 'ptycho:edge:*:status' \\
        --control-channel 'ptycho:edge:*:control' \\
        --processor-class edge_ptycho_bluesky.edge.processor.EdgePtychoProcessor \\
        --processor-args '{"registry": "/path/to/models", "engine": "onnxruntime", "batchSize": 8}' \\
        --server-queue-size 1000 --report-period 10 --log-level info

Scale-out: add ``--n-consumers 4 --distributor-updates 8`` (each consumer gets 8 consecutive
frames in turn through the server's ``pydistributor`` plugin, loads its own engine and serves
``ptycho:edge:<id>:phase``; subscribe with ``PatchSubscriber(["ptycho:edge:1:phase", ...])``).
With a distributor, gaps in ``uniqueId`` are expected on each consumer and are not counted
as drops (the framework's own ``nMissed`` accounts for them).

Processor arguments (``--processor-args`` JSON; camelCase as pvapy's own processors)
------------------------------------------------------------------------------------
``model`` (str) or ``registry`` (str)
    One ONNX file, or a model registry folder whose deployed version is hot-swapped.
``engine`` (str, default ``"auto"``), ``threads`` (int)
    Inference engine and its intra-op threads.
``batchSize`` (8), ``maxWaitMs`` (5.0), ``queueSize`` (256), ``requirePosition`` (true),
``scale``, ``cropTo``, ``pollPeriod`` (0.5 s)
    As the options of ``edge-ptycho worker``.

At run time, ``configure`` (the control channel's ``configure`` command) accepts ``{"model":
FILE}`` to swap to another model file between batches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pvaccess as pva
from pvapy.hpc.adImageProcessor import AdImageProcessor

from ..options import UnknownOptionError, check_known_keys
from .inprocess import InProcessPatchSink
from .model_source import FileModelSource, ModelRefused, ModelSource, RegistryModelSource, engine_factory
from .ntnda import Frame, FrameDecodeError, Patch, decode_frame, empty_ntndarray, encode_patch
from .transport import FrameHandler
from .worker import EdgeWorker
from .worker_config import WorkerConfig

__all__ = ["EdgePtychoProcessor"]

logger = logging.getLogger(__name__)

_KNOWN_KEYS = frozenset({
    "model", "registry", "engine", "threads", "batchSize", "maxWaitMs", "queueSize",
    "requirePosition", "scale", "cropTo", "pollPeriod",
})
# keys the framework adds to the processor configuration
_FRAMEWORK_KEYS = frozenset({
    "processorId", "inputChannel", "inputMode", "inputArgs", "outputChannel", "outputMode",
    "outputArgs", "objectIdField", "skipInitialUpdates", "objectIdOffset", "nSequentialUpdates",
    "fieldRequest",
})


class _PushFrameSource:
    """A FrameSource fed by ``process()``: decodes on the caller's thread, then hands over."""

    def __init__(self) -> None:
        self._handler: FrameHandler | None = None
        self.pushed = 0

    @property
    def connected(self) -> bool:
        return self._handler is not None

    def start(self, handler: FrameHandler) -> None:
        self._handler = handler

    def stop(self) -> None:
        self._handler = None

    def stats(self) -> dict[str, int]:
        return {"pushed": self.pushed}

    def push(self, pv_object: Any) -> None:
        handler = self._handler
        if handler is None:
            return
        self.pushed += 1
        try:
            frame: Frame = decode_frame(pv_object)
        except FrameDecodeError as exc:
            handler.on_reject(exc.reason, str(exc), exc.unique_id)
            return
        except Exception as exc:
            handler.on_reject("decode_error", f"{type(exc).__name__}: {exc}", None)
            return
        handler.on_frame(frame)


class EdgePtychoProcessor(AdImageProcessor):  # type: ignore[misc]
    """PtychoNN phase retrieval of NTNDArray frames inside ``pvapy-hpc-consumer``.

    Parameters
    ----------
    configDict : dict
        Processor arguments (see the module docstring) plus the framework's keys.

    Raises
    ------
    ValueError
        Unknown arguments (:class:`~edge_ptycho_bluesky.options.UnknownOptionError`), or
        neither/both of ``model`` and ``registry``.
    """

    def __init__(self, configDict: Mapping[str, Any] | None = None) -> None:
        config = dict(configDict or {})
        AdImageProcessor.__init__(self, config)
        check_known_keys("processor arguments", set(config) - _FRAMEWORK_KEYS, _KNOWN_KEYS)
        self.config = config
        self._worker: EdgeWorker | None = None
        self._source = _PushFrameSource()
        self._start_lock = threading.Lock()
        self._check_model_args(config)

    @staticmethod
    def _check_model_args(config: Mapping[str, Any]) -> None:
        if ("model" in config) == ("registry" in config):
            raise ValueError("EdgePtychoProcessor needs exactly one of 'model' (an ONNX file) or "
                             "'registry' (a model registry folder) in --processor-args")

    def _worker_config(self) -> WorkerConfig:
        c = self.config
        pre: dict[str, Any] = {}
        if c.get("scale") is not None:
            pre["scale"] = float(c["scale"])
        if c.get("cropTo") is not None:
            pre["crop_to"] = int(c["cropTo"])
        distributed = (int(c.get("objectIdOffset", 1) or 1) > 1
                       or int(c.get("nSequentialUpdates", 1) or 1) > 1)
        return WorkerConfig(
            batch_size=int(c.get("batchSize", 8)),
            max_wait_ms=float(c.get("maxWaitMs", 5.0)),
            queue_size=int(c.get("queueSize", 256)),
            require_position=bool(c.get("requirePosition", True)),
            preprocess_options=pre,
            count_gaps=not distributed,
            poll_period_s=float(c.get("pollPeriod", 0.5)),
            status_period_s=3600.0,  # the framework publishes status through getStats()
        )

    def _model_source(self) -> ModelSource:
        factory = engine_factory(str(self.config.get("engine", "auto")),
                                 None if self.config.get("threads") is None
                                 else int(self.config["threads"]))
        if "model" in self.config:
            return FileModelSource(Path(self.config["model"]), factory)
        return RegistryModelSource(Path(self.config["registry"]), factory)

    def _publish(self, patch: Patch) -> None:
        self.updateOutputChannel(encode_patch(patch))

    def _ensure_worker(self) -> EdgeWorker:
        with self._start_lock:
            if self._worker is None:
                sink = InProcessPatchSink(on_patch=self._publish, keep=False)
                self._worker = EdgeWorker(self._model_source(), self._source, sink,
                                          self._worker_config()).start()
                logger.info("edge processor %s started: %s", self.processorId,
                            self._worker.stats().model_version)
            return self._worker

    # -- framework hooks (camelCase names are pvapy's) -------------------------------------
    def start(self) -> None:
        """Framework hook at processing start: load the model and start the worker."""
        self._ensure_worker()

    def stop(self) -> None:
        """Framework hook at shutdown: drain queued frames and stop the worker."""
        if self._worker is not None:
            self._worker.stop(drain=True)

    def configure(self, configDict: Mapping[str, Any]) -> None:
        """Update processor arguments; once running, ``{"model": FILE}`` swaps models.

        Before the worker starts, any processor argument may be changed.  Afterwards only
        ``model`` takes effect (loaded here, off the inference thread, and swapped in between
        batches; a model that fails to load is refused and the running one stays); other
        arguments need a restart and are logged as ignored.
        """
        if not isinstance(configDict, Mapping):
            return
        ours = {k: v for k, v in configDict.items() if k in _KNOWN_KEYS}
        try:
            check_known_keys("processor arguments", set(configDict) - _FRAMEWORK_KEYS, _KNOWN_KEYS)
        except UnknownOptionError as exc:
            logger.warning("ignoring %s", exc)
        if self._worker is None:
            merged = {**self.config, **ours}
            if "model" in ours:
                merged.pop("registry", None)
            if "registry" in ours:
                merged.pop("model", None)
            self._check_model_args(merged)
            self.config = merged
            return
        if "model" in ours:
            factory = engine_factory(str(self.config.get("engine", "auto")),
                                     self.config.get("threads"))
            try:
                loaded = FileModelSource(Path(ours["model"]), factory).load_initial()
            except ModelRefused as exc:
                logger.error("%s; keeping the running model", exc)
                return
            self._worker.swap_to(loaded)
        ignored = sorted(set(ours) - {"model"})
        if ignored:
            logger.warning("processor arguments %s take effect only at restart", ignored)

    def process(self, pvObject: Any) -> Any:
        """Framework hook for each input update: decode and enqueue (inference runs apart)."""
        self._ensure_worker()
        self._source.push(pvObject)
        return pvObject

    def resetStats(self) -> None:
        """Framework hook: zero the worker's counters."""
        if self._worker is not None:
            self._worker.reset_stats()

    def getStats(self) -> dict[str, Any]:
        """Framework hook: the worker's counters, flattened for the status channel."""
        if self._worker is None:
            return {}
        s = self._worker.stats()
        bad = sum(v for k, v in s.dropped.items() if k not in ("queue_full", "gap", "shutdown"))

        def ms(x: float) -> float:
            return 0.0 if x != x else float(x)  # NaN (no samples yet) -> 0

        return {
            "nFramesReceived": s.received,
            "nFramesInferred": s.inferred,
            "nFramesDropped": s.dropped_total,
            "nQueueFull": s.dropped.get("queue_full", 0),
            "nGaps": s.gaps,
            "nBadInput": bad,
            "queueDepth": s.queue_depth,
            "inferP50Ms": ms(s.infer_p50_ms),
            "inferP99Ms": ms(s.infer_p99_ms),
            "e2eP50Ms": ms(s.e2e_p50_ms),
            "e2eP99Ms": ms(s.e2e_p99_ms),
            "nModelSwaps": s.swaps,
            "nModelsRefused": s.models_refused,
            "modelVersion": s.model_version or "",
        }

    def getStatsPvaTypes(self) -> dict[str, Any]:
        """Framework hook: PVA types of :meth:`getStats`'s fields."""
        return {
            "nFramesReceived": pva.ULONG,
            "nFramesInferred": pva.ULONG,
            "nFramesDropped": pva.ULONG,
            "nQueueFull": pva.ULONG,
            "nGaps": pva.ULONG,
            "nBadInput": pva.ULONG,
            "queueDepth": pva.UINT,
            "inferP50Ms": pva.DOUBLE,
            "inferP99Ms": pva.DOUBLE,
            "e2eP50Ms": pva.DOUBLE,
            "e2eP99Ms": pva.DOUBLE,
            "nModelSwaps": pva.UINT,
            "nModelsRefused": pva.UINT,
            "modelVersion": pva.STRING,
        }

    def getOutputPvObjectType(self, pvObject: Any) -> Any:
        """Framework hook: the output record is an NTNDArray (float32 phase patches)."""
        return empty_ntndarray()

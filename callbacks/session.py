"""Edge inference in an interactive Bluesky session: worker, forwarding, live stitch, live plot.

What ``profile_collection/startup/40-edge.py`` calls.  :func:`start_edge_session` wires::

    RE --documents--> FrameForwarder --NTNDArray (pvAccess, loopback)--> edge worker process
    RE --documents--> LiveStitchCallback <--phase patches (pvAccess)-----------+
                          |  at stop: stitched image + patches (+ refined image) -> Tiled (derived run)
                          +--> LivePhasePlot (only with an interactive matplotlib backend)
    frames + patches (pvAccess) --> refiner process (AI-seeded rPIE) --> ptycho:edge:image
                                        (run start/stop and its result: through the live stitch)

With a detector's own PVA plugin (``EDGE_PTYCHO_EDGE_DETECTOR``), a :class:`DetectorRelay`
takes the frame forwarder's place for live scans: detector channel --> relay (run uid, frame
index, position from NDAttributes) --> the worker's input.

The environment variables that configure it are read by
:meth:`edge_ptycho_bluesky.edge.session.EdgeSessionConfig.from_env` (see that module).
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path
from typing import Any

from edge_ptycho_bluesky.edge.process import WorkerChannels, WorkerProcess
from edge_ptycho_bluesky.edge.pva_clients import PatchSubscriber, read_status
from edge_ptycho_bluesky.edge.pva_servers import FramePublisher
from edge_ptycho_bluesky.edge.session import ENV_ENABLE, ENV_REGISTRY, EdgeSessionConfig
from edge_ptycho_bluesky.edge.transport import embedded_worker_env
from edge_ptycho_bluesky.storage import get_run, make_tiled_writer, replay
from edge_ptycho_bluesky.training.registry import ModelRegistry
from edge_ptycho_bluesky.training.registry_checks import RegistryError

from .detector_relay import DetectorRelay
from .edge import FrameForwarder, LiveStitchCallback
from .plot import LivePhasePlot

__all__ = ["EdgeSession", "deployed_version", "gui_backend", "start_edge_session"]

logger = logging.getLogger(__name__)

_NON_GUI_BACKENDS = {"agg", "pdf", "ps", "svg", "pgf", "cairo", "template"}


def deployed_version(registry: Path) -> str | None:
    """The registry's deployed version, or None (no registry, nothing deployed, unreadable)."""
    try:
        return ModelRegistry(registry, create=False).current_version()
    except (RegistryError, OSError) as exc:
        logger.debug("registry %s: %s", registry, exc)
        return None


def gui_backend() -> bool:
    """Whether matplotlib's backend can show windows (a live plot is useful)."""
    import matplotlib

    return matplotlib.get_backend().lower() not in _NON_GUI_BACKENDS


class EdgeSession:
    """The running edge pieces of a session; :meth:`close` undoes everything (also at exit).

    Attributes
    ----------
    forwarder : FrameForwarder or None
        None with an external worker (it reads the detector's channel itself). With a detector
        relay it only serves :meth:`replay`.
    relay : DetectorRelay or None
        The live frames of the detector's own channel (``config.detector_pv``), or None.
    stitch : LiveStitchCallback
        ``stitch.results[uid]`` holds each run's stitched image; its derived run is in Tiled.
    plot : LivePhasePlot or None
    subscriber : PatchSubscriber
    worker : WorkerProcess or None
        The embedded worker (:mod:`edge_ptycho_bluesky.edge.process`); None for an external one.
    worker_log : Path or None
        The embedded worker's log (``<data dir>/logs/edge-worker.log``).
    worker_stats : dict
        The embedded worker's final statistics (``inferred``, ``dropped_total``, ``e2e_p50_ms``...),
        filled by :meth:`close`.
    refiner : RefinerProcess or None
        The live refiner (None when ``EDGE_PTYCHO_EDGE_REFINE=0`` or when it could not start).
    """

    def __init__(self, RE: Any, catalog: Any, storage: Any, config: EdgeSessionConfig, *,
                 plot: bool | None = None, worker_timeout: float = 60.0) -> None:
        self.config = config
        self.RE = RE
        self.catalog = catalog
        self.worker: Any = None  # a WorkerProcess for the embedded worker
        self.worker_log: Path | None = None
        self.worker_stats: dict[str, Any] = {}  # the embedded worker's final statistics, after close()
        self.refiner: Any = None
        self.relay: DetectorRelay | None = None
        self._tokens: list[int] = []
        self._closed = False
        if config.worker == "embedded":
            # The embedded worker lives on pvAccess loopback; without it here too its monitor never
            # finds this process's channels (silently: no frame would arrive). A configured address
            # list is kept, 127.0.0.1 added to it.
            changed = embedded_worker_env()
            if changed:
                logger.info("edge: pvAccess settings for the embedded worker on loopback: %s",
                            ", ".join(f"{k}={v}" for k, v in changed.items()))
        # The embedded worker's input is served here, and so is a detector relay's; an external worker
        # without a relay reads the detector's own channel (input_pv), which this session must not serve.
        serve_input = config.worker == "embedded" or config.detector_pv is not None
        self.publisher = FramePublisher(config.input_pv) if serve_input else None
        try:
            if config.worker == "embedded":
                self._start_worker(Path(storage.data_dir), worker_timeout)
            if config.refine:
                self._start_refiner(Path(storage.data_dir), worker_timeout)
            self.stitch = LiveStitchCallback(store=make_tiled_writer(catalog, storage),
                                             write_dir=Path(storage.frames_dir) / "derived",
                                             refiner=self.refiner, refine_seconds=config.refine_seconds,
                                             probe_fallback=self._deployed_probe)
            self.subscriber = PatchSubscriber(config.output_pv, self.stitch.on_patch).start()
            ready_timeout = worker_timeout if config.worker == "embedded" else 5.0
            if not self.subscriber.wait_ready(ready_timeout):
                logger.warning("edge: no patch channel %s yet (is the worker running?); "
                               "patches will be stitched once it appears", config.output_pv)
            self.forwarder = (None if self.publisher is None
                              else FrameForwarder(self.publisher, path_map=dict(config.path_map)))
            if config.detector_pv is not None:
                assert self.publisher is not None
                self.relay = DetectorRelay(config.detector_pv, self.publisher,
                                           position_attributes=config.position_attributes,
                                           position_scale=config.position_scale).start()
            show = gui_backend() if plot is None else plot
            refined = None if self.refiner is None else (lambda: self.refiner.latest)
            self.plot = LivePhasePlot(self.stitch, refined=refined) if show else None
            live_frames = self.relay if self.relay is not None else self.forwarder
            for cb in (live_frames, self.stitch, self.plot):
                if cb is not None:
                    self._tokens.append(RE.subscribe(cb))
        except BaseException:
            self.close()
            raise
        atexit.register(self.close)

    def _start_worker(self, data_dir: Path, timeout: float) -> None:
        c = self.config
        log_dir = data_dir / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.worker_log = log_dir / "edge-worker.log"
        self.worker = WorkerProcess(
            registry=c.registry, channels=WorkerChannels(c.input_pv, c.output_pv, c.status_pv),
            engine=c.engine, extra_args=["--log-level", "INFO", *c.worker_args], log_path=self.worker_log,
            supervise=True)
        self.worker.start(timeout)  # RuntimeError with the worker's log if it does not start
        logger.info("edge worker started (registry %s, log %s)", c.registry, self.worker_log)

    def _start_refiner(self, data_dir: Path, timeout: float) -> None:
        from edge_ptycho_bluesky.edge.refine_process import RefinerProcess
        from edge_ptycho_bluesky.recon.streaming import RefineOptions

        c = self.config
        (data_dir / "logs").mkdir(parents=True, exist_ok=True)
        options = RefineOptions(probe_refine_after=c.refine_probe_after or None)
        for attempt in (1, 2):  # once more: pvapy has been seen to abort a child while it subscribes
            try:
                self.refiner = RefinerProcess(c.input_pv, c.output_pv, c.image_pv, options=options,
                                              log_path=data_dir / "logs" / "edge-refiner.log").start(timeout)
                return
            except Exception:  # the AI path goes on without it
                self.refiner = None
                logger.exception("edge: the live refiner could not start (attempt %d of 2)%s", attempt,
                                 "; the AI image alone is shown and stored" if attempt == 2 else "")

    def _deployed_probe(self) -> Any:
        """The deployed model version's probe (for runs that record none), or None."""
        try:
            version = ModelRegistry(self.config.registry, create=False).current(verify=False)
            return None if version is None else version.load_probe()
        except (RegistryError, OSError, ValueError):
            return None

    def replay(self, uid: str) -> Any:
        """Re-infer a stored scan with the worker's current model.

        The run's documents go through the same forwarding and live-stitch callbacks as a live
        scan (frames are read back from the run's HDF5 files); the new stitched image and
        patches are stored as another derived run next to the earlier ones, tagged with the
        model version that made them.

        Returns
        -------
        StitchResult
            ``derived_run_uid`` is the new derived run; ``model_versions`` the model(s) used.
        """
        if self.forwarder is None:
            raise RuntimeError(
                f"replay sends a stored scan's frames to the worker's input, which this session does not serve "
                f"with an external worker (it reads {self.config.input_pv} itself); re-infer the run with "
                f"`edge-ptycho infer {uid} --registry DIR --out OUT.cxi [--refine S]`, or use the embedded worker")
        self.forwarder.forward_streamed = True  # a fly scan's frames went to the worker live; send them again
        try:
            replay(get_run(self.catalog, uid), self.forwarder, self.stitch)
        finally:
            self.forwarder.forward_streamed = False
        self.stitch.wait_stored(uid)
        return self.stitch.results[uid]

    def wait_stored(self, uid: str, timeout: float | None = None) -> Any:
        """The run's :class:`StitchResult` once its derived run is stored (with the live refiner the
        derived run is stored after the refinement, off the RunEngine thread)."""
        self.stitch.wait_stored(uid, timeout)
        return self.stitch.results[uid]

    def attach_fly_detector(self, detector: Any) -> None:
        """Let a simulated fly-scan detector stream its frames straight to this session's worker.

        The detector then serves its NTNDArrays on the worker's input channel (``input_pv``), as
        a real detector's PVA plugin does when the worker is pointed at it; the live stitch
        receives the patches as in step scans, and the frame forwarder leaves fly runs alone.
        """
        if self.publisher is None:
            raise RuntimeError("with an external worker the fly detector streams to the worker's own input "
                               f"({self.config.input_pv}); point the detector's PVA plugin there instead")
        detector.publisher = self.publisher

    def status(self, timeout: float = 2.0) -> dict[str, Any]:
        """The worker's status (frames in, inferred, dropped by reason, latencies, model).

        With the embedded worker, ``worker_restarts`` counts the supervisor's restarts (the
        worker's own counters start again from zero at each restart).
        """
        status = read_status(self.config.status_pv, timeout=timeout)
        if self.worker is not None:
            status["worker_restarts"] = self.worker.restarts
        return status

    def close(self) -> None:
        """Unsubscribe, flush the forwarder, stop the embedded worker, release the channels."""
        if self._closed:
            return
        self._closed = True
        for token in self._tokens:
            try:
                self.RE.unsubscribe(token)
            except Exception:
                logger.debug("unsubscribe failed", exc_info=True)
        if self.relay is not None:
            self.relay.close()
        forwarder = getattr(self, "forwarder", None)
        if forwarder is not None:
            forwarder.flush(5.0)
            forwarder.close()
        stitch = getattr(self, "stitch", None)
        if stitch is not None and not stitch.flush(self.config.refine_seconds + 60.0):
            logger.error("edge: a derived run was still being stored at close")
        if self.refiner is not None:
            self.refiner.close()
        subscriber = getattr(self, "subscriber", None)
        if subscriber is not None:
            subscriber.stop()
        if self.worker is not None and self.worker.running:
            final = self.worker_stats = self.worker.stop(timeout=20.0)  # SIGINT: it drains its queue first
            logger.info("edge worker stopped: received=%s inferred=%s dropped=%s model=%s",
                        final.get("received"), final.get("inferred"), final.get("dropped"),
                        final.get("model_version"))
        if self.publisher is not None:
            self.publisher.close()
        try:
            atexit.unregister(self.close)
        except Exception:
            pass


def start_edge_session(RE: Any, catalog: Any, storage: Any, *,
                       config: EdgeSessionConfig | None = None,
                       plot: bool | None = None) -> EdgeSession | None:
    """Start edge inference for a session (see the module docstring); None when it is off.

    Parameters
    ----------
    RE
        The RunEngine to subscribe the callbacks to.
    catalog
        Tiled client the derived runs (stitched image + patches) are written to.
    storage
        :class:`~edge_ptycho_bluesky.storage.StorageConfig` (data and frame directories).
    config
        Default: :meth:`EdgeSessionConfig.from_env` with ``storage.data_dir``.
    plot
        Add the live plot; default: only with an interactive matplotlib backend.

    Returns
    -------
    EdgeSession or None
        None when disabled, when the embedded worker has no deployed model, or when starting
        failed (logged with the reason; the session goes on without edge inference).
    """
    config = config or EdgeSessionConfig.from_env(storage.data_dir)
    if not config.enabled:
        logger.info("edge inference disabled (%s=%s)", ENV_ENABLE, os.environ.get(ENV_ENABLE))
        return None
    if config.worker == "embedded":
        version = deployed_version(config.registry)
        if version is None:
            logger.warning(
                "edge inference off: no model deployed in %s; import one with `edge-ptycho "
                "import-onnx FILE.onnx --registry %s` and restart the session (or set %s, or "
                "%s=0 to silence this)", config.registry, config.registry, ENV_REGISTRY,
                ENV_ENABLE)
            return None
        logger.info("edge inference: starting a worker on model %s from %s", version,
                    config.registry)
    try:
        session = EdgeSession(RE, catalog, storage, config, plot=plot)
    except Exception:  # the session (and its scans) go on without edge inference
        logger.exception("edge inference could not start; scans run and are stored without it")
        return None
    logger.info("edge inference on: frames -> %s, patches <- %s, status %s (edge.status())",
                config.input_pv, config.output_pv, config.status_pv)
    return session

"""The retraining callback: labelled scans from the RunEngine to the retraining service.

Subscribed to the RunEngine, :class:`RetrainCallback` watches for the stop document of a scan
whose start document marks it labelled in the run's edge_ptycho metadata (high overlap, usable
for rPIE labels) and submits it to its :class:`~edge_ptycho_bluesky.training.service.RetrainService`,
which reconstructs, validates and retrains off the RunEngine's thread, retries, and records every
outcome (see :mod:`edge_ptycho_bluesky.training.service`). Without a RunEngine (a service
elsewhere), :class:`~edge_ptycho_bluesky.training.watcher.TiledRunWatcher` polls the Tiled
catalog for new labelled runs instead.

Typical wiring (profile)::

    from edge_ptycho_bluesky.callbacks.retrain import RetrainCallback
    from edge_ptycho_bluesky.training.jobs import JobConfig

    config = JobConfig.under("~/ptycho/retrain", storage_config,
                             train=TrainConfig(epochs=50, count_scale=1e-3))
    retrain = RetrainCallback(config, executor="process",
                              recorder=make_tiled_writer(tiled_client, storage_config))
    RE.subscribe(retrain)
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from event_model import DocumentRouter

from edge_ptycho_bluesky.edge.session import EdgeSessionConfig, switched_off
from edge_ptycho_bluesky.runs import EdgePtychoMeta
from edge_ptycho_bluesky.storage import make_tiled_writer
from edge_ptycho_bluesky.training.config import TrainConfig
from edge_ptycho_bluesky.training.jobs import JobConfig
from edge_ptycho_bluesky.training.policy import RetrainPolicy, RetrainPolicyConfig
from edge_ptycho_bluesky.training.service import JobOutcome, RetrainService

logger = logging.getLogger(__name__)

__all__ = ["RetrainCallback", "start_retraining"]

#: Environment variables read by :func:`start_retraining` (the profile's ``50-retrain.py``).
ENV_RETRAIN = "EDGE_PTYCHO_RETRAIN"
ENV_EXECUTOR = "EDGE_PTYCHO_RETRAIN_EXECUTOR"
ENV_EPOCHS = "EDGE_PTYCHO_RETRAIN_EPOCHS"
ENV_ADAPT = "EDGE_PTYCHO_RETRAIN_ADAPT"
#: Default seconds of label-free adaptation per scan in the profile (`EDGE_PTYCHO_RETRAIN_ADAPT`): off,
#: since it does not yet improve the image reliably (docs/benchmarks.md, "Label-free adaptation").
ADAPT_SECONDS = 0.0
#: :func:`start_retraining` retrains a model whose SSIM against new labels is below this, even when
#: it is within tolerance of its own expected level (a poor first model must not be kept forever).
MIN_SSIM = 0.85


class RetrainCallback(DocumentRouter):
    """Bluesky callback that queues each finished labelled scan on a :class:`RetrainService`.

    A scan that ended with ``exit_status == "success"`` is submitted (trigger ``"stop"``); one that
    did not is recorded as ``skipped`` without a job. Nothing here blocks the RunEngine or raises
    to it: errors are logged.

    Parameters
    ----------
    config : JobConfig or RetrainService
        The jobs' settings, for a service made here with ``executor`` and ``**options``; or a
        service made elsewhere (then give nothing else).
    executor : Executor or str, optional
        Where jobs run (see :class:`RetrainService`; default ``"process"``).
    **options
        The other keyword arguments of :class:`RetrainService` (``recorder``, ``record_dir``,
        ``max_retries``, ``state_path``, ``clock``, ``job_fn``...).

    Attributes
    ----------
    service : RetrainService
        The queue, its jobs and their outcomes; :meth:`status`, :attr:`outcomes`, :attr:`failed`,
        :meth:`retry_failed`, :meth:`submit`, :meth:`wait_idle` and :meth:`close` are its own.
    """

    def __init__(self, config: JobConfig | RetrainService, executor: Any = None, **options: Any) -> None:
        super().__init__()
        if isinstance(config, RetrainService):
            if executor is not None or options:
                raise TypeError("RetrainCallback(service) takes no executor or service options")
            self.service = config
        else:
            self.service = RetrainService(config, executor, **options)
        self._starts: dict[str, bool] = {}  # run uid -> labelled

    def __repr__(self) -> str:
        return f"RetrainCallback({self.service!r})"

    # -- documents (RunEngine thread; must never block) -------------------------------------------

    def start(self, doc: dict[str, Any]) -> None:
        """Remember a labelled scan's start, or any ptychography scan's when the model adapts
        without labels (cheap; errors are logged, never raised)."""
        try:
            meta = EdgePtychoMeta.from_start(doc, required=False)
            if meta is not None and (meta.labelled or self.service.config.adapt_seconds > 0):
                self._starts[doc["uid"]] = meta.labelled
            else:
                logger.debug("run %s is not a labelled ptychography scan: not for retraining", doc.get("uid"))
        except Exception:  # never take the scan down
            logger.exception("retraining callback: bad start document")

    def stop(self, doc: dict[str, Any]) -> None:
        """Queue a finished labelled scan (cheap; errors are logged, never raised)."""
        try:
            uid = doc.get("run_start")
            if uid not in self._starts:
                return
            labelled = self._starts.pop(uid)
            status = doc.get("exit_status")
            if status != "success":
                # recorded on the dispatcher thread: recording may touch Tiled
                self.service.submit(uid, "stop", skip_reason=(
                    f"the scan ended with exit_status={status!r} ({doc.get('reason') or 'no reason'}): "
                    f"not used for labels"))
                return
            self.service.submit(uid, "stop", labelled=labelled)
        except Exception:  # never take the scan down
            logger.exception("retraining callback: could not queue run %s", doc.get("run_start"))

    # -- the service's own interface -------------------------------------------------------------

    @property
    def config(self) -> JobConfig:
        """The jobs' settings."""
        return self.service.config

    @property
    def policy(self) -> RetrainPolicy:
        """The schedule (suspended or validating)."""
        return self.service.policy

    @property
    def outcomes(self) -> list[JobOutcome]:
        """Every outcome so far, oldest first."""
        return self.service.outcomes

    @property
    def failed(self) -> list[str]:
        """Scans whose job failed after every retry (not yet queued again)."""
        return self.service.failed

    @property
    def records(self) -> dict[str, str]:
        """``job_id -> uid`` of the derived run that records it in Tiled."""
        return self.service.records

    def submit(self, scan_uid: str, trigger: str = "submit") -> None:
        """Queue a stored labelled scan by uid (:meth:`RetrainService.submit`)."""
        self.service.submit(scan_uid, trigger)

    def retry_failed(self) -> list[str]:
        """Queue every scan whose job failed again; return their uids."""
        return self.service.retry_failed()

    def status(self) -> dict[str, Any]:
        """Queue, running job, policy mode and counts (JSON-ready)."""
        return self.service.status()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued scan has an outcome; False on timeout."""
        return self.service.wait_idle(timeout)

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Close the service (:meth:`RetrainService.close`)."""
        self.service.close(wait, timeout)

    def __enter__(self) -> RetrainCallback:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_retraining(RE: Any, catalog: Any, storage: Any) -> RetrainCallback | None:
    """The profile's retraining callback, subscribed to ``RE``; None when turned off.

    Jobs use the edge session's registry (``EDGE_PTYCHO_REGISTRY``, default
    ``<data dir>/registry``), keep their corpus, training increments and policy state under
    ``<data dir>/retrain``, and record outcomes in ``catalog``. Environment: ``EDGE_PTYCHO_RETRAIN=0``
    turns this off; ``EDGE_PTYCHO_RETRAIN_EXECUTOR`` (``process``, ``thread``, ``dask``) picks
    the executor; ``EDGE_PTYCHO_RETRAIN_EPOCHS`` the epochs per increment (50);
    ``EDGE_PTYCHO_RETRAIN_ADAPT`` the seconds of label-free adaptation of the deployed model on
    every scan, labelled or not, before any labels (default 0: off). A model whose SSIM against a new
    scan's labels is below :data:`MIN_SSIM` (0.85) is always retrained.
    """
    if switched_off(os.environ.get(ENV_RETRAIN)):
        logger.info("retraining is off (%s=0)", ENV_RETRAIN)
        return None
    epochs_text = os.environ.get(ENV_EPOCHS, "50")
    try:
        epochs = int(epochs_text)
    except ValueError:
        raise ValueError(f"{ENV_EPOCHS}={epochs_text!r}: give the epochs per increment as an integer") from None
    adapt_text = os.environ.get(ENV_ADAPT, str(ADAPT_SECONDS))
    try:
        adapt_seconds = float(adapt_text)
    except ValueError:
        raise ValueError(f"{ENV_ADAPT}={adapt_text!r}: give the seconds of label-free adaptation (0: off)") from None
    root = Path(storage.data_dir) / "retrain"
    config = JobConfig(storage=storage, registry_root=EdgeSessionConfig.from_env(storage.data_dir).registry,
                       corpus_dir=root / "corpus", workdir=root / "work",
                       train=TrainConfig(epochs=epochs, progress=False),
                       policy=RetrainPolicyConfig(min_ssim=MIN_SSIM), adapt_seconds=adapt_seconds)
    callback = RetrainCallback(config, os.environ.get(ENV_EXECUTOR, "process"),
                               recorder=make_tiled_writer(catalog, storage),
                               state_path=root / "policy.json")
    RE.subscribe(callback)
    logger.info("retraining on labelled scans: registry %s, executor %s; %s", config.registry_root,
                callback.status().get("executor"),
                f"every scan first adapts the deployed model without labels for {adapt_seconds:.0f} s "
                "(retrain.outcomes)" if adapt_seconds > 0 else "no label-free adaptation")
    return callback

"""The retraining service: closes the loop from a labelled scan to a new model at the edge.

:meth:`RetrainService.submit` queues a labelled scan by its run uid (the Bluesky side,
:class:`~edge_ptycho_bluesky.callbacks.retrain.RetrainCallback`, submits each labelled scan at its
stop document; :class:`~edge_ptycho_bluesky.training.watcher.TiledRunWatcher` submits the runs it
finds in Tiled). A dispatcher thread (never the RunEngine's) then, one scan at a time:

* asks the :class:`~edge_ptycho_bluesky.training.policy.RetrainPolicy` whether scans are being
  validated at all: while the deployed model is within tolerance, reconstruction and retraining
  are suspended and the scan is recorded as ``skipped`` (no HPC time spent); once the check
  interval has passed the next labelled scan -- or, with ``recheck=True``, the latest skipped
  one -- is validated again, and a mismatch resumes validation of every scan;
* otherwise submits :func:`~edge_ptycho_bluesky.training.jobs.run_retraining_job` to the
  executor (a local process pool by default; Dask, Globus Compute...): rPIE, labels, corpus,
  validation of the deployed model, and per the policy a retraining whose new version is
  published to the registry and hot-swapped by the edge worker;
* retries a job that raises (Tiled down, worker lost, ...) up to ``max_retries`` times with a
  growing delay, then reports it as ``failed`` and keeps the scan in :attr:`RetrainService.failed`
  (``retry_failed()`` queues them again): no scan is lost;
* records every outcome -- ``validated``, ``trained``, ``retrained``, ``skipped`` or ``failed``,
  with the reason -- in the log, in :attr:`RetrainService.outcomes`, optionally in a JSON-lines
  file, and as a derived run (``purpose="retraining_job"``) in Tiled through ``recorder``.

Scans that arrive while a job runs wait in the queue, in order.

Typical wiring (a service without a RunEngine)::

    from edge_ptycho_bluesky.training.jobs import JobConfig
    from edge_ptycho_bluesky.training.service import RetrainService

    config = JobConfig.under("~/ptycho/retrain", storage_config,
                             train=TrainConfig(epochs=50, count_scale=1e-3))
    service = RetrainService(config, executor="process",
                             recorder=make_tiled_writer(tiled_client, storage_config))
    service.submit(scan_uid)
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge_ptycho_bluesky.derived import emit_derived_run
from edge_ptycho_bluesky.executors import executor_name, make_executor
from edge_ptycho_bluesky.recon.labels import load_corpus, store_labels
from edge_ptycho_bluesky.training.jobs import JOB_PURPOSE, JobConfig, JobRequest, JobResult, \
    run_adaptation_job, run_retraining_job
from edge_ptycho_bluesky.training.policy import RetrainPolicy

logger = logging.getLogger(__name__)

__all__ = ["DocumentCallback", "JobOutcome", "RetrainService"]


DocumentCallback = Callable[[str, dict[str, Any]], Any]
_STOP = object()


@dataclass(frozen=True)
class JobOutcome:
    """The recorded outcome of one labelled scan.

    Attributes
    ----------
    job_id : str
    scan_uid : str
    status : {"validated", "trained", "retrained", "adapted", "skipped", "failed"}
        ``validated``: the deployed model is within tolerance (reconstruction and retraining are
        now suspended until the next check); ``trained``/``retrained``: a new version was
        published and deployed; ``adapted``: label-free adaptation (``JobConfig.adapt_seconds``,
        before any labels) ran, its version published (``published_version``; deployed when it
        explains held-out frames better, see ``reason``); ``skipped``: not reconstructed
        (suspended, or the scan failed); ``failed``: every attempt raised (see ``errors``).
    reason : str
        Why (the policy's explanation, or the last error).
    trigger : str
        ``"stop"`` (a stop document), ``"submit"`` (:meth:`RetrainService.submit`),
        ``"recheck"`` (periodic re-check of a skipped scan) or ``"retry_failed"``.
    attempts : int
        Jobs submitted for it (0 when skipped).
    errors : tuple of str
        One line per failed attempt.
    ssim, expected, threshold : float or None
        Deployed model's SSIM against the labels, the expected level, the retrain threshold.
    model_before, published_version : str or None
        Version deployed before the job, and the version it published.
    validation_ssim : float or None
        SSIM recorded with the published version.
    next_check_at : float or None
        While suspended: when scans are validated again (the service's ``clock``).
    executor, worker : str
        Executor kind, and ``host:pid`` of the process that ran the successful attempt.
    queued_at, started_at, finished_at : float
        Wall-clock times (``time.time``).
    timings : dict of str to float
        Seconds per job step (see :class:`~edge_ptycho_bluesky.training.jobs.JobResult`).
    labels_source : str
        ``"rpie"``, ``"corpus"`` or ``"tiled"`` (see ``JobResult.labels_source``); empty without a job.
    """

    job_id: str
    scan_uid: str
    status: str
    reason: str
    trigger: str
    attempts: int
    errors: tuple[str, ...] = ()
    ssim: float | None = None
    expected: float | None = None
    threshold: float | None = None
    model_before: str | None = None
    published_version: str | None = None
    validation_ssim: float | None = None
    next_check_at: float | None = None
    executor: str = ""
    worker: str = ""
    queued_at: float = 0.0
    started_at: float = 0.0
    finished_at: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    labels_source: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = asdict(self)
        out["errors"] = list(self.errors)
        return out


@dataclass
class _Ticket:
    scan_uid: str
    trigger: str
    queued_at: float = field(default_factory=time.time)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    skip_reason: str | None = None
    labelled: bool = True


class RetrainService:
    """Queue, retries, executors and outcome records of the retraining jobs (thread-safe).

    Parameters
    ----------
    config : JobConfig
        Storage, registry, corpus, training and policy settings sent with every job.
    executor : Executor or {"process", "thread", "dask", "globus"}, optional
        Where jobs run. A string is passed to :func:`edge_ptycho_bluesky.executors.make_executor`
        (with ``executor_options``), and the executor is then owned (shut down by :meth:`close`,
        rebuilt if a process pool breaks). Default ``"process"``: one spawned worker process.
    executor_options : mapping, optional
        Keyword arguments of ``make_executor``.
    policy : RetrainPolicy, optional
        The schedule; default: loaded from ``state_path`` if given, else a fresh policy with
        ``config.policy`` and ``clock``.
    clock : callable, optional
        Seconds (``time.time``); used for the policy (inject a fake clock in tests).
    recorder : callable, optional
        Document consumer (a TiledWriter) that receives each outcome as a derived run
        (``purpose="retraining_job"``) and each newly reconstructed scan's labels
        (``purpose="rpie_labels"``, :func:`edge_ptycho_bluesky.recon.labels.store_labels`; their
        HDF5 file goes to ``config.storage.frames_dir / "labels"``, where the catalog reads).
    record_dir : path, optional
        Folder for ``jobs.jsonl`` (every outcome, one JSON per line) and the derived runs' HDF5
        files (default: ``config.storage.frames_dir / "retraining"``, readable by the embedded
        catalog).
    max_retries : int
        Further attempts after a job raises (default 2: three attempts in all).
    retry_delay_s : float
        Delay before the first retry; doubled for each further one, up to ``max_retry_delay_s``.
    max_retry_delay_s : float
        Longest delay between two attempts.
    job_timeout_s : float, optional
        Give up waiting for one attempt after this long (counted as a failed attempt).
    state_path : path, optional
        JSON file of the policy state, saved after every decision, so a restarted session keeps
        its schedule.
    recheck : bool
        When suspended and the check interval has passed, re-validate the latest skipped scan
        without waiting for a new one.
    poll_s : float
        How often the idle dispatcher looks at the schedule (seconds).
    job_fn : callable
        The job (``JobRequest -> JobResult``); must be picklable for process/Dask executors.
    on_outcome : callable, optional
        Called with every :class:`JobOutcome` (on the dispatcher thread).
    """

    def __init__(
        self,
        config: JobConfig,
        executor: Executor | str | None = None,
        *,
        executor_options: dict[str, Any] | None = None,
        policy: RetrainPolicy | None = None,
        clock: Callable[[], float] = time.time,
        recorder: DocumentCallback | None = None,
        record_dir: str | Path | None = None,
        max_retries: int = 2,
        retry_delay_s: float = 5.0,
        max_retry_delay_s: float = 300.0,
        job_timeout_s: float | None = None,
        state_path: str | Path | None = None,
        recheck: bool = True,
        poll_s: float = 1.0,
        job_fn: Callable[[JobRequest], JobResult] = run_retraining_job,
        on_outcome: Callable[[JobOutcome], Any] | None = None,
    ) -> None:
        if not isinstance(config, JobConfig):
            raise TypeError(f"config must be a training.jobs.JobConfig, got {type(config).__name__}")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if not retry_delay_s >= 0:
            raise ValueError(f"retry_delay_s must be >= 0 seconds, got {retry_delay_s!r}")
        if job_timeout_s is not None and not job_timeout_s > 0:
            raise ValueError(f"job_timeout_s must be None or > 0 seconds, got {job_timeout_s!r}")
        if not poll_s > 0:
            raise ValueError(f"poll_s must be > 0 seconds, got {poll_s!r}")
        self.config = config
        self._clock = clock
        self.state_path = None if state_path is None else Path(state_path).expanduser()
        if policy is None:
            policy = (RetrainPolicy.load(self.state_path, config.policy, clock) if self.state_path
                      else RetrainPolicy(config.policy, clock))
        self.policy = policy
        self._executor_options = dict(executor_options or {})
        if executor is None:
            executor = "process"
        if isinstance(executor, str):
            self._executor_kind: str | None = executor
            self.executor = make_executor(executor, **self._executor_options)
        else:
            self._executor_kind = None
            self.executor = executor
        self.recorder = recorder
        self.record_dir = (Path(record_dir) if record_dir is not None
                           else Path(config.storage.frames_dir) / "retraining")
        self.max_retries = max_retries
        self.retry_delay_s = float(retry_delay_s)
        self.max_retry_delay_s = float(max(max_retry_delay_s, retry_delay_s))
        self.job_timeout_s = job_timeout_s
        self.recheck = recheck
        self.poll_s = float(poll_s)
        self.job_fn = job_fn
        self.on_outcome = on_outcome

        self._queue: queue.Queue[Any] = queue.Queue()
        self._cond = threading.Condition()
        self._unfinished = 0
        self._running: _Ticket | None = None
        self._outcomes: list[JobOutcome] = []
        self._records: dict[str, str] = {}
        self._failed: list[str] = []
        self._skipped_latest: str | None = None
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._dispatch_loop, name="retrain-dispatch", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return (f"RetrainService(executor={executor_name(self.executor)!r}, policy={self.policy!r}, "
                f"queued={self._queue.qsize()}, running={self._running is not None})")

    # -- queueing ----------------------------------------------------------------------------------

    def submit(self, scan_uid: str, trigger: str = "submit", *, skip_reason: str | None = None,
               labelled: bool = True) -> None:
        """Queue a stored scan by uid (e.g. from Tiled's notifications of new runs).

        ``trigger`` is recorded with the outcome (see :class:`JobOutcome`). With ``skip_reason``
        (a scan that did not finish) no job runs: the scan is recorded as ``skipped`` with that
        reason, in turn, on the dispatcher thread (recording may touch Tiled). A scan that is not
        ``labelled`` only gets the label-free adaptation (when ``config.adapt_seconds`` > 0).
        """
        if not isinstance(scan_uid, str) or not scan_uid:
            raise ValueError(f"scan_uid must be a run uid, got {scan_uid!r}")
        self._enqueue(_Ticket(scan_uid, trigger, skip_reason=skip_reason, labelled=labelled))

    def retry_failed(self) -> list[str]:
        """Queue every scan whose job failed again; return their uids."""
        with self._cond:
            uids, self._failed = self._failed, []
        for uid in uids:
            self._enqueue(_Ticket(uid, "retry_failed"))
        return uids

    def _enqueue(self, ticket: _Ticket) -> None:
        if self._closing.is_set():
            raise RuntimeError(f"the retraining callback is closed; scan {ticket.scan_uid} was not queued")
        with self._cond:
            self._unfinished += 1
        self._queue.put(ticket)
        logger.info("retraining: scan %s queued (%s); %d waiting", ticket.scan_uid, ticket.trigger,
                    self._queue.qsize())

    # -- state -------------------------------------------------------------------------------------

    @property
    def outcomes(self) -> list[JobOutcome]:
        """Every outcome so far, oldest first."""
        with self._cond:
            return list(self._outcomes)

    @property
    def failed(self) -> list[str]:
        """Scans whose job failed after every retry (not yet queued again)."""
        with self._cond:
            return list(self._failed)

    @property
    def records(self) -> dict[str, str]:
        """``job_id -> uid`` of the derived run that records it in Tiled."""
        with self._cond:
            return dict(self._records)

    def status(self) -> dict[str, Any]:
        """Queue, running job, policy mode and counts (JSON-ready)."""
        with self._cond:
            running = None if self._running is None else self._running.scan_uid
            counts: dict[str, int] = {}
            for o in self._outcomes:
                counts[o.status] = counts.get(o.status, 0) + 1
        return {"queued": self._queue.qsize(), "running": running, "policy_mode": self.policy.mode,
                "next_check_at": self.policy.next_check_at, "outcomes": counts,
                "failed": self.failed, "executor": executor_name(self.executor)}

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every queued scan has an outcome; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._unfinished > 0:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop the dispatcher (after the queue drains when ``wait``) and shut an owned executor down.

        Scans still queued when ``wait=False`` are reported as ``failed`` (reason: closed) and kept
        in :attr:`failed`.
        """
        if self._closing.is_set():
            return
        if wait:
            self.wait_idle(timeout)
        self._closing.set()
        self._queue.put(_STOP)
        self._thread.join(timeout)
        if self._executor_kind is not None:
            self.executor.shutdown(wait=wait, cancel_futures=not wait)

    def __enter__(self) -> RetrainService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- dispatcher thread -------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self.poll_s)
            except queue.Empty:
                self._maybe_recheck()
                continue
            if item is _STOP:
                self._drain_closed()
                return
            try:
                self._process(item)
            except Exception:  # never let the dispatcher die
                logger.exception("retraining: unexpected error handling scan %s", item.scan_uid)
                self._fail(item, 0, ["internal error: see the log"], time.time())
            finally:
                with self._cond:
                    self._running = None
                    self._unfinished -= 1
                    self._cond.notify_all()

    def _drain_closed(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                continue
            self._fail(item, 0, ["the retraining callback was closed before the job ran"], time.time())
            with self._cond:
                self._unfinished -= 1
                self._cond.notify_all()

    def _maybe_recheck(self) -> None:
        if not self.recheck or self._skipped_latest is None or self._closing.is_set():
            return
        if self.policy.mode == "suspended" and self.policy.should_validate():
            uid, self._skipped_latest = self._skipped_latest, None
            logger.info("retraining: check interval passed; re-validating with skipped scan %s", uid)
            self._enqueue(_Ticket(uid, "recheck"))

    def _process(self, ticket: _Ticket) -> None:
        with self._cond:
            self._running = ticket
        started = time.time()
        if ticket.skip_reason is not None:
            self._record(JobOutcome(
                job_id=ticket.job_id, scan_uid=ticket.scan_uid, status="skipped", reason=ticket.skip_reason,
                trigger=ticket.trigger, attempts=0, executor=executor_name(self.executor),
                queued_at=ticket.queued_at, started_at=started, finished_at=time.time()))
            return
        if self.config.adapt_seconds > 0:
            self._adapt(ticket)
        if not ticket.labelled:
            return
        now = self._clock()
        if not self.policy.should_validate(now):
            decision = self.policy.record_skip(ticket.scan_uid, now=now)
            self._save_policy()
            self._skipped_latest = ticket.scan_uid
            self._record(JobOutcome(
                job_id=ticket.job_id, scan_uid=ticket.scan_uid, status="skipped", reason=decision.reason,
                trigger=ticket.trigger, attempts=0, next_check_at=decision.next_check_at,
                executor=executor_name(self.executor), queued_at=ticket.queued_at, started_at=started,
                finished_at=time.time()))
            return
        errors: list[str] = []
        for attempt in range(1, self.max_retries + 2):
            request = JobRequest(scan_uid=ticket.scan_uid, config=self.config,
                                 policy_state=self.policy.state_dict(), now=now,
                                 job_id=ticket.job_id, attempt=attempt)
            try:
                future = self._submit(request)
                result = future.result(timeout=self.job_timeout_s)
            except Exception as exc:  # the job raised, the worker died, Tiled was down, ...
                line = f"attempt {attempt}: {type(exc).__name__}: {exc}"
                errors.append(line)
                last = attempt == self.max_retries + 1
                logger.warning("retraining job %s for scan %s failed (%s)%s", ticket.job_id, ticket.scan_uid,
                               line, "" if last else "; retrying")
                if last or self._closing.wait(
                        min(self.retry_delay_s * 2 ** (attempt - 1), self.max_retry_delay_s)):
                    break
                continue
            self.policy.load_state_dict(result.policy_state)
            self._save_policy()
            if result.status == "validated":
                self._skipped_latest = None
            decision = result.decision
            self._record(JobOutcome(
                job_id=ticket.job_id, scan_uid=ticket.scan_uid, status=result.status, reason=result.reason,
                trigger=ticket.trigger, attempts=attempt, errors=tuple(errors), ssim=result.ssim,
                expected=decision.get("expected"), threshold=decision.get("threshold"),
                model_before=result.model_before, published_version=result.published_version,
                validation_ssim=result.validation_ssim, next_check_at=decision.get("next_check_at"),
                executor=executor_name(self.executor), worker=result.worker, queued_at=ticket.queued_at,
                started_at=started, finished_at=time.time(), timings=dict(result.timings),
                labels_source=result.labels_source))
            self._store_labels(result)
            return
        self._fail(ticket, len(errors), errors, started)

    def _adapt(self, ticket: _Ticket) -> None:
        """Label-free adaptation of the deployed model on the scan (one attempt; a failure is
        recorded and the labelled path goes on)."""
        started = time.time()
        request = JobRequest(scan_uid=ticket.scan_uid, config=self.config, job_id=ticket.job_id)
        logger.info("retraining: adapting the deployed model to scan %s without labels (%.0f s)", ticket.scan_uid,
                    self.config.adapt_seconds)
        common = dict(job_id=ticket.job_id, scan_uid=ticket.scan_uid, trigger=ticket.trigger,
                      executor=executor_name(self.executor), queued_at=ticket.queued_at, started_at=started)
        try:
            result = self._submit(request, run_adaptation_job).result(timeout=self.job_timeout_s)
        except Exception as exc:
            self._record(JobOutcome(status="failed", reason=f"label-free adaptation: {type(exc).__name__}: {exc}",
                                    attempts=1, errors=(f"{type(exc).__name__}: {exc}",), finished_at=time.time(),
                                    **common))
            return
        if result is None:
            self._record(JobOutcome(status="skipped", reason="label-free adaptation: no model deployed yet",
                                    attempts=1, finished_at=time.time(), **common))
            return
        verdict = "deployed" if result.deployed else "not deployed: no better on held-out frames"
        self._record(JobOutcome(
            status="adapted", attempts=1, model_before=result.parent, published_version=result.version,
            reason=(f"held-out physics loss {result.loss_before:.4g} -> {result.loss_after:.4g} in "
                    f"{result.seconds:.0f} s ({verdict})"),
            timings={"adapt": result.seconds}, finished_at=time.time(), **common))

    def _submit(self, request: JobRequest, fn: Callable[[JobRequest], Any] | None = None) -> Any:
        fn = fn or self.job_fn
        try:
            return self.executor.submit(fn, request)
        except BrokenProcessPool:
            if self._executor_kind is None:
                raise
            logger.warning("retraining: the process pool broke (a worker died); starting a new one")
            self.executor.shutdown(wait=False)
            self.executor = make_executor(self._executor_kind, **self._executor_options)
            return self.executor.submit(fn, request)

    def _fail(self, ticket: _Ticket, attempts: int, errors: list[str], started: float) -> None:
        with self._cond:
            self._failed.append(ticket.scan_uid)
        reason = (f"failed after {attempts} attempt(s); last error: {errors[-1]}" if errors
                  else "failed")
        self._record(JobOutcome(
            job_id=ticket.job_id, scan_uid=ticket.scan_uid, status="failed", reason=reason,
            trigger=ticket.trigger, attempts=attempts, errors=tuple(errors),
            executor=executor_name(self.executor), queued_at=ticket.queued_at, started_at=started,
            finished_at=time.time()))
        logger.error("retraining: scan %s %s; kept for retry_failed()", ticket.scan_uid, reason)

    def _save_policy(self) -> None:
        if self.state_path is None:
            return
        try:
            self.policy.save(self.state_path)
        except OSError:
            logger.exception("could not save the retraining policy state to %s", self.state_path)

    # -- records -----------------------------------------------------------------------------------

    def _record(self, outcome: JobOutcome) -> None:
        with self._cond:
            self._outcomes.append(outcome)
        level = logging.ERROR if outcome.status == "failed" else logging.INFO
        logger.log(level, "retraining outcome for scan %s: %s (%s)%s", outcome.scan_uid, outcome.status,
                   outcome.reason, f"; published {outcome.published_version}" if outcome.published_version else "")
        try:
            self.record_dir.mkdir(parents=True, exist_ok=True)
            with open(self.record_dir / "jobs.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(outcome.to_dict(), default=str) + "\n")
        except OSError:
            logger.exception("could not append the outcome to %s", self.record_dir / "jobs.jsonl")
        if self.recorder is not None:
            try:
                uid = self._emit_outcome(outcome)
                with self._cond:
                    self._records[outcome.job_id] = uid
            except Exception:
                logger.exception("could not record the outcome of scan %s in Tiled (it is in %s)",
                                 outcome.scan_uid, self.record_dir / "jobs.jsonl")
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:
                logger.exception("on_outcome hook raised")

    def _emit_outcome(self, outcome: JobOutcome) -> str:
        def num(value: float | None) -> Any:
            return np.array([np.nan if value is None else float(value)])

        def text(value: str | None) -> Any:
            return np.array([value or ""])

        columns = {
            "status": text(outcome.status), "reason": text(outcome.reason), "trigger": text(outcome.trigger),
            "attempts": np.array([outcome.attempts], dtype=np.int64), "errors": text("\n".join(outcome.errors)),
            "ssim": num(outcome.ssim), "expected": num(outcome.expected), "threshold": num(outcome.threshold),
            "model_before": text(outcome.model_before), "published_version": text(outcome.published_version),
            "validation_ssim": num(outcome.validation_ssim), "executor": text(outcome.executor),
            "worker": text(outcome.worker),
        }
        assert self.recorder is not None
        return emit_derived_run(self.recorder, original_run_uid=outcome.scan_uid, purpose=JOB_PURPOSE,
                                write_dir=self.record_dir / "derived", streams={"primary": columns},
                                md={"retraining_job": json.loads(json.dumps(outcome.to_dict(), default=str))})

    def _store_labels(self, result: JobResult) -> None:
        """Store new labels in Tiled (purpose ``rpie_labels``)."""
        if self.recorder is None or result.labels_reused or not result.labels_file:
            return
        try:
            scans = [s for s in load_corpus(result.labels_file) if s.scan_uid == result.scan_uid]
            for scan in scans:
                store_labels(self.recorder, scan, Path(self.config.storage.frames_dir) / "labels")
        except Exception:
            logger.exception("could not store the labels of scan %s in Tiled (they are in %s)",
                             result.scan_uid, result.labels_file)

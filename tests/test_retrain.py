"""The closed retraining loop, driven by RE(...) calls: labelled scan -> Tiled -> job on an
executor (process pool, Dask LocalCluster, threads) -> rPIE labels -> corpus -> validation ->
policy -> training -> registry -> edge worker hot swap; faults, queueing and suspension.

Real parts throughout: RunEngine, simulated beamline, embedded Tiled, rPIE, torch training of a
small PtychoNN 2.0 (``nconv=4, n_levels=2``), ONNX export, registry, ONNX Runtime edge worker.
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edge_ptycho_bluesky.callbacks.retrain import RetrainCallback
from edge_ptycho_bluesky.executors import ExecutorUnavailable, make_executor
from edge_ptycho_bluesky.plans import spiral_ptycho_scan
from edge_ptycho_bluesky.storage import StorageConfig, TiledServer, make_tiled_writer, tiled_retries
from edge_ptycho_bluesky.training.config import TrainConfig
from edge_ptycho_bluesky.training.jobs import JOB_PURPOSE, JobConfig, JobRequest, JobResult, run_retraining_job
from edge_ptycho_bluesky.training.policy import RetrainPolicy, RetrainPolicyConfig
from edge_ptycho_bluesky.training.registry import ModelRegistry
from edge_ptycho_bluesky.training.service import RetrainService
from edge_ptycho_bluesky.training.watcher import TiledRunWatcher

from .conftest import tiny_onnx

pytest.importorskip("onnxruntime")

TINY_NET = {"nconv": 4, "n_levels": 2}
#: Always retrain (any SSIM < 1) / never retrain (no SSIM < -1; no expected level recorded).
ALWAYS_RETRAIN = RetrainPolicyConfig(min_ssim=1.0, check_interval_s=3600.0)
NEVER_RETRAIN = RetrainPolicyConfig(min_ssim=-1.0, check_interval_s=3600.0)


def labelled_scan(beamline, n=20, x_center=0.0, labelled=None):
    return spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=n,
                              x_center=x_center, labelled=labelled)


def job_config(root: Path, storage: StorageConfig, policy: RetrainPolicyConfig, **kwargs) -> JobConfig:
    return JobConfig.under(root, storage, train=TrainConfig(epochs=1, batch_size=8, device="cpu", seed=3),
                           policy=policy, rpie_iterations=5, model_kwargs=TINY_NET, **kwargs)


def deploy_tiny(root: Path, scale: float = 1.0) -> ModelRegistry:
    """A registry whose deployed v0001 is a real ONNX ``phase = scale * frame`` (no model.pt)."""
    registry = ModelRegistry(root / "registry")
    registry.publish({"model.onnx": tiny_onnx(root / "tiny.onnx", scale)}, model="tiny")
    return registry


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def writer(tiled_client, storage_config):
    return make_tiled_writer(tiled_client, storage_config)


# ---------------------------------------------------------------------------------------------
# The loop on real executors


@pytest.mark.slow
def test_labelled_scan_retrains_deploys_and_worker_swaps_on_process_pool_and_dask(
        RE, beamline, tiled_client, storage_config, writer, tmp_path):
    """One RE(...) call; the same workflow on a process pool and on a Dask LocalCluster(2)."""
    from edge_ptycho_bluesky.derived import find_derived_runs
    from edge_ptycho_bluesky.edge.inprocess import InProcessFrameSource, InProcessPatchSink
    from edge_ptycho_bluesky.edge.model_source import RegistryModelSource, engine_factory
    from edge_ptycho_bluesky.edge.worker import EdgeWorker
    from edge_ptycho_bluesky.edge.worker_config import WorkerConfig

    reg_pool = deploy_tiny(tmp_path / "pool")
    reg_dask = deploy_tiny(tmp_path / "dask")
    source = InProcessFrameSource()
    sink = InProcessPatchSink()
    worker = EdgeWorker(RegistryModelSource(reg_pool, engine_factory("onnxruntime", threads=1)), source, sink,
                        WorkerConfig(poll_period_s=0.1, max_wait_ms=1.0)).start()
    late_worker = EdgeWorker(RegistryModelSource(reg_pool, engine_factory("onnxruntime", threads=1)),
                             InProcessFrameSource(), InProcessPatchSink(), WorkerConfig(poll_period_s=0.1))
    frame = np.full((128, 128), 2, np.uint16)
    source.publish(frame, 1, pos=(0.0, 0.0))
    assert sink.wait_for(1, 20)
    assert sink.patches[0].model_version == "v0001"

    pool_cb = RetrainCallback(job_config(tmp_path / "pool", storage_config, ALWAYS_RETRAIN), "process",
                              recorder=writer, record_dir=tmp_path / "pool" / "records")
    # the dask side reconstructs too (it would otherwise find the labels the pool side stores)
    dask_cb = RetrainCallback(job_config(tmp_path / "dask", storage_config, ALWAYS_RETRAIN,
                                         reuse_stored_labels=False), "dask",
                              executor_options={"n_workers": 2, "processes": True},
                              record_dir=tmp_path / "dask" / "records")
    try:
        RE.subscribe(make_tiled_writer(tiled_client, storage_config))
        RE.subscribe(pool_cb)
        RE.subscribe(dask_cb)
        (uid,) = RE(labelled_scan(beamline, n=20))
        assert pool_cb.wait_idle(300) and dask_cb.wait_idle(300)
    finally:
        pool_cb.close()
        dask_cb.close()
    (pool,) = pool_cb.outcomes
    (dask,) = dask_cb.outcomes
    assert (pool.scan_uid, pool.status, pool.attempts) == (uid, "retrained", 1), pool
    assert (dask.scan_uid, dask.status, dask.attempts) == (uid, "retrained", 1), dask
    assert pool.executor == "process" and dask.executor == "dask"
    assert pool.model_before == dask.model_before == "v0001"
    assert pool.published_version == dask.published_version == "v0002"
    # same data, same labels, same validation of the deployed model, same training seed
    assert pool.ssim == pytest.approx(dask.ssim, abs=1e-3)
    assert pool.validation_ssim == pytest.approx(dask.validation_ssim, abs=0.05)
    from edge_ptycho_bluesky.recon.labels import load_corpus
    (lab_pool,) = load_corpus(next((tmp_path / "pool" / "corpus").glob("0000_*.npz")))
    (lab_dask,) = load_corpus(next((tmp_path / "dask" / "corpus").glob("0000_*.npz")))
    assert lab_pool.scan_uid == lab_dask.scan_uid == uid and len(lab_pool) == 20
    np.testing.assert_allclose(lab_pool.phases, lab_dask.phases, atol=1e-3)
    assert pool.labels_source == dask.labels_source == "rpie"
    # the labels are in Tiled too, as a derived run of the raw scan
    from edge_ptycho_bluesky.recon.labels import find_labels
    stored = find_labels(tiled_client, uid)
    np.testing.assert_array_equal(stored.phases, lab_pool.phases)

    # the registry holds the new version, deployed, recording its lineage
    for reg in (reg_pool, reg_dask):
        mv = reg.current()
        assert mv.version == "v0002" and mv.training_data == (uid,) and mv.torch_path is not None
        assert mv.manifest["extra"]["trigger_scan"] == uid
    # the running worker swapped without a restart; a worker that was down starts on it
    deadline = time.monotonic() + 30
    while worker.stats().model_version != "v0002" and time.monotonic() < deadline:
        time.sleep(0.05)
    source.publish(frame, 2, pos=(0.0, 0.0))
    assert sink.wait_for(2, 20)
    assert sink.patches[-1].model_version == "v0002"
    stats = worker.stop()
    assert stats.swaps == 1 and stats.model_version == "v0002" and stats.dropped_total == 0
    late_worker.start()
    try:
        assert late_worker.stats().model_version == "v0002"
    finally:
        late_worker.stop()

    # the outcome is a document in Tiled next to the raw run, and a line in the job log
    (record,) = find_derived_runs(tiled_client, uid, JOB_PURPOSE)
    job = record.metadata["start"]["retraining_job"]
    assert job["status"] == "retrained" and job["published_version"] == "v0002"
    assert record.metadata["start"]["original_run_uid"] == uid
    assert (tmp_path / "dask" / "records" / "jobs.jsonl").read_text().count('"retrained"') == 1


# ---------------------------------------------------------------------------------------------
# Budgeting: suspension, skip, periodic re-check (real jobs on a thread pool, no training)


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.slow
def test_within_tolerance_suspends_skips_and_rechecks_after_the_interval(
        RE, beamline, tiled_client, storage_config, writer, tmp_path):
    from edge_ptycho_bluesky.derived import find_derived_runs

    registry = deploy_tiny(tmp_path)
    clock = FakeClock()
    cb = RetrainCallback(job_config(tmp_path, storage_config, NEVER_RETRAIN), "thread", clock=clock,
                         recorder=writer, record_dir=tmp_path / "records", poll_s=0.05,
                         state_path=tmp_path / "policy.json")
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    RE.subscribe(cb)
    try:
        (first,) = RE(labelled_scan(beamline, n=10))
        assert cb.wait_idle(120)
        (second,) = RE(labelled_scan(beamline, n=10, x_center=0.05))
        assert cb.wait_idle(60)
        a, b = cb.outcomes
        assert (a.scan_uid, a.status, a.attempts, a.published_version) == (first, "validated", 1, None)
        assert "suspended for 3600 s" in a.reason and a.next_check_at == 1000.0 + 3600
        assert (b.scan_uid, b.status, b.attempts) == (second, "skipped", 0)
        assert "next validation in 3600 s" in b.reason
        assert RetrainPolicy.load(tmp_path / "policy.json", NEVER_RETRAIN).mode == "suspended"
        # a scan that is not labelled is not a job at all
        RE(labelled_scan(beamline, n=8, labelled=False))
        assert cb.wait_idle(10) and len(cb.outcomes) == 2
        # the interval passes: the latest skipped scan is re-validated without a new scan
        clock.t += 3601
        deadline = time.monotonic() + 120
        while len(cb.outcomes) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cb.wait_idle(120)
    finally:
        cb.close()
    c = cb.outcomes[2]
    assert (c.scan_uid, c.status, c.trigger) == (second, "validated", "recheck")
    assert a.labels_source == c.labels_source == "rpie"
    # a job run again for a scan (a retry) takes its labels from the corpus: no second rPIE
    again = run_retraining_job(JobRequest(first, cb.config, policy_state=None, now=clock.t))
    assert again.labels_source == "corpus" and "rpie" not in again.timings and again.corpus_scans == 2
    assert registry.current().version == "v0001"  # nothing retrained
    (rec,) = find_derived_runs(tiled_client, second, JOB_PURPOSE)[:1]
    assert rec.metadata["start"]["retraining_job"]["status"] == "skipped"
    assert [r.metadata["start"]["retraining_job"]["status"] for r in find_derived_runs(
        tiled_client, second, JOB_PURPOSE)] == ["skipped", "validated"]


# ---------------------------------------------------------------------------------------------
# Queueing and faults (thread pool; jobs replaced where the fault is in the job itself)


def _fake_result(request: JobRequest, status: str = "validated") -> JobResult:
    policy = RetrainPolicy(request.config.policy, clock=lambda: request.now)
    if request.policy_state:
        policy.load_state_dict(request.policy_state)
    decision = policy.record_validation(0.5, expected=0.5, scan_uid=request.scan_uid, now=request.now)
    return JobResult(job_id=request.job_id, scan_uid=request.scan_uid, attempt=request.attempt, status=status,
                     decision=decision.to_dict(), policy_state=policy.state_dict(), ssim=0.5,
                     model_before="v0001", published_version=None, validation_ssim=None, n_frames=1,
                     corpus_scans=1, corpus_frames=1, labels_file=None, labels_source="rpie",
                     rpie_final_error=None, timings={}, worker="test")


def test_scans_arriving_while_a_job_runs_are_queued_in_order(RE, beamline, storage_config, tmp_path):
    release = threading.Event()
    seen: list[str] = []

    def slow_job(request: JobRequest) -> JobResult:
        seen.append(request.scan_uid)
        assert release.wait(60)
        return _fake_result(request)

    active = RetrainPolicyConfig(tolerance=0.5, check_interval_s=1e-9)  # suspension ends at once
    cb = RetrainCallback(job_config(tmp_path, storage_config, active), "thread", job_fn=slow_job,
                         record_dir=tmp_path / "records", poll_s=0.05, recheck=False)
    RE.subscribe(cb)
    try:
        uids = [RE(labelled_scan(beamline, n=4, x_center=0.02 * i))[0] for i in range(3)]
        # the RunEngine was never blocked: three scans finished while the first job still runs
        assert cb.status()["running"] == uids[0] and cb.status()["queued"] == 2
        assert cb.outcomes == []
        release.set()
        assert cb.wait_idle(30)
    finally:
        cb.close()
    assert seen == uids
    assert [(o.scan_uid, o.status) for o in cb.outcomes] == [(u, "validated") for u in uids]


def test_a_job_that_raises_is_retried_then_reported_and_can_be_requeued(
        RE, beamline, tiled_client, storage_config, writer, tmp_path):
    from edge_ptycho_bluesky.derived import find_derived_runs

    calls: list[int] = []
    healthy = threading.Event()

    def flaky_job(request: JobRequest) -> JobResult:
        calls.append(request.attempt)
        if not healthy.is_set():
            raise RuntimeError(f"GPU node lost (attempt {request.attempt})")
        return _fake_result(request)

    cb = RetrainCallback(job_config(tmp_path, storage_config, NEVER_RETRAIN), "thread", job_fn=flaky_job,
                         recorder=writer, record_dir=tmp_path / "records", max_retries=2, retry_delay_s=0.01)
    RE.subscribe(cb)
    try:
        (uid,) = RE(labelled_scan(beamline, n=4))
        assert cb.wait_idle(30)
        (failed,) = cb.outcomes
        assert (failed.scan_uid, failed.status, failed.attempts) == (uid, "failed", 3)
        assert failed.errors == tuple(f"attempt {i}: RuntimeError: GPU node lost (attempt {i})" for i in (1, 2, 3))
        assert "failed after 3 attempt(s)" in failed.reason and cb.failed == [uid]
        assert calls == [1, 2, 3]
        (record,) = find_derived_runs(tiled_client, uid, JOB_PURPOSE)
        assert record.metadata["start"]["retraining_job"]["status"] == "failed"
        assert "GPU node lost" in record["primary"]["errors"].read()[0]
        # the scan is not lost: once the cause is fixed it is queued again and succeeds
        healthy.set()
        assert cb.retry_failed() == [uid]
        assert cb.wait_idle(30)
    finally:
        cb.close()
    assert cb.failed == [] and cb.outcomes[-1].status == "validated"
    assert cb.outcomes[-1].trigger == "retry_failed"


def test_a_job_failing_once_succeeds_on_retry(RE, beamline, storage_config, tmp_path):
    def once(request: JobRequest) -> JobResult:
        if request.attempt == 1:
            raise OSError("scratch file system full")
        return _fake_result(request)

    cb = RetrainCallback(job_config(tmp_path, storage_config, NEVER_RETRAIN), "thread", job_fn=once,
                         record_dir=tmp_path / "records", retry_delay_s=0.01)
    RE.subscribe(cb)
    try:
        RE(labelled_scan(beamline, n=4))
        assert cb.wait_idle(30)
    finally:
        cb.close()
    (outcome,) = cb.outcomes
    assert (outcome.status, outcome.attempts) == ("validated", 2)
    assert outcome.errors == ("attempt 1: OSError: scratch file system full",)


@pytest.mark.slow
def test_tiled_read_failure_is_retried_until_the_server_is_back(RE, beamline, tiled_client, storage_config,
                                                                 tmp_path):
    """The job reads through a Tiled server that is down; it comes back between retries."""
    registry = deploy_tiny(tmp_path)
    from edge_ptycho_bluesky import storage

    # Tiled keeps one API key per serving process: the server below must use this process's key.
    port, key = free_port(), storage._PROCESS_API_KEY
    remote = StorageConfig(data_dir=storage_config.data_dir, uri=f"http://127.0.0.1:{port}", api_key=key)
    errors: list[str] = []
    first_failure = threading.Event()

    def observed_job(request: JobRequest) -> JobResult:
        try:
            return run_retraining_job(request)
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            first_failure.set()
            raise

    cb = RetrainCallback(job_config(tmp_path, remote, NEVER_RETRAIN), "thread", job_fn=observed_job,
                         record_dir=tmp_path / "records", max_retries=60, retry_delay_s=0.2,
                         max_retry_delay_s=1.0)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    RE.subscribe(cb)
    server = None
    # The service retries (0.2 s .. 1 s back-off): let each attempt's Tiled client give up after
    # one retry within 1 s instead of retrying for Tiled's default ~25-45 s.
    with tiled_retries(attempts=2, timeout_s=1.0):
        try:
            (uid,) = RE(labelled_scan(beamline, n=8))
            assert first_failure.wait(60)
            server = TiledServer(storage_config.data_dir, port=port)
            assert server.api_key == key
            assert cb.wait_idle(180)
        finally:
            cb.close()
            if server is not None:
                server.stop()
    (outcome,) = cb.outcomes
    assert outcome.status == "validated" and outcome.attempts >= 2, outcome
    assert all("StorageError" in e and f"127.0.0.1:{port}" in e for e in errors)
    assert key not in " ".join(outcome.errors)
    assert outcome.model_before == registry.current().version == "v0001"


def test_a_failed_scan_is_recorded_as_skipped_without_a_job(RE, beamline, storage_config, tmp_path):
    from bluesky import plan_stubs as bps

    def failing():
        yield from bps.open_run(md={"edge_ptycho": {"labelled": True}})
        raise ValueError("motor fault")

    calls: list[str] = []
    cb = RetrainCallback(job_config(tmp_path, storage_config, NEVER_RETRAIN), "thread",
                         job_fn=lambda r: calls.append(r.scan_uid), record_dir=tmp_path / "records")
    RE.subscribe(cb)
    try:
        with pytest.raises(ValueError, match="motor fault"):
            RE(failing())
        assert cb.wait_idle(10)
    finally:
        cb.close()
    (outcome,) = cb.outcomes
    assert outcome.status == "skipped" and "exit_status='fail'" in outcome.reason and calls == []


# ---------------------------------------------------------------------------------------------
# Configuration and executors


def test_executor_factory_and_config_errors(storage_config, tmp_path):
    with pytest.raises(ValueError, match="unknown executor kind 'slurm'"):
        make_executor("slurm")
    with pytest.raises(ValueError, match="endpoint_id"):
        make_executor("globus")
    try:
        import globus_compute_sdk  # noqa: F401
    except ImportError:
        with pytest.raises(ExecutorUnavailable, match=r"pip install 'edge_ptycho_bluesky\[globus\]'"):
            make_executor("globus", endpoint_id="00000000-0000-0000-0000-000000000000")
    with make_executor("thread") as ex:
        assert ex.submit(pow, 2, 5).result() == 32
    with pytest.raises(TypeError, match="StorageConfig"):
        JobConfig(storage="/data", registry_root=tmp_path, corpus_dir=tmp_path, workdir=tmp_path)
    with pytest.raises(ValueError, match="nproc"):
        JobConfig.under(tmp_path, storage_config, nproc=0)
    cfg = JobConfig.under(tmp_path, storage_config)
    assert cfg.train.progress is False and cfg.registry_root == tmp_path / "registry"
    with pytest.raises(ValueError, match="max_retries"):
        RetrainCallback(cfg, "thread", max_retries=-1)


def test_job_request_and_config_pickle(storage_config, tmp_path):
    import pickle

    req = JobRequest("abc", JobConfig.under(tmp_path, storage_config, train=TrainConfig(epochs=2)))
    again = pickle.loads(pickle.dumps(req))
    assert again == req and again.config.train.epochs == 2



def _dies_on_first_attempt(request: JobRequest) -> JobResult:
    """Module level, so a spawned worker can unpickle it: the worker process dies once."""
    import os

    if request.attempt == 1:
        os._exit(3)
    return _fake_result(request)


@pytest.mark.slow
def test_a_worker_process_that_dies_is_replaced_and_the_job_retried(RE, beamline, storage_config, tmp_path):
    cb = RetrainCallback(job_config(tmp_path, storage_config, NEVER_RETRAIN), "process",
                         job_fn=_dies_on_first_attempt, record_dir=tmp_path / "records", retry_delay_s=0.01)
    RE.subscribe(cb)
    try:
        RE(labelled_scan(beamline, n=4))
        assert cb.wait_idle(120)
    finally:
        cb.close()
    (outcome,) = cb.outcomes
    assert (outcome.status, outcome.attempts) == ("validated", 2), outcome
    assert "BrokenProcessPool" in outcome.errors[0]


def test_tiled_watcher_queues_new_finished_labelled_runs(RE, beamline, tiled_client, storage_config, tmp_path):
    seen: list[str] = []

    def record(request: JobRequest) -> JobResult:
        seen.append(request.scan_uid)
        return _fake_result(request)

    cb = RetrainService(job_config(tmp_path, storage_config, NEVER_RETRAIN), "thread", job_fn=record,
                        record_dir=tmp_path / "records")
    watcher = TiledRunWatcher(tiled_client, cb, interval_s=0.2)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))  # no callback is subscribed
    try:
        assert watcher.poll() == []  # runs stored before the watcher started are not queued
        (labelled,) = RE(labelled_scan(beamline, n=4))
        RE(labelled_scan(beamline, n=4, labelled=False))
        assert watcher.poll() == [labelled]
        assert watcher.poll() == []  # once only
        assert cb.wait_idle(30)
    finally:
        cb.close()
    assert seen == [labelled] and cb.outcomes[0].trigger == "tiled"


def _corpus_with_scan_1(cfg: JobConfig) -> None:
    """A corpus that already holds "scan-1" (labelled by a lost earlier attempt of a job)."""
    from edge_ptycho_bluesky.recon.labels import LabelledScan
    from edge_ptycho_bluesky.training.corpus import TrainingCorpus

    rng = np.random.default_rng(0)
    TrainingCorpus(directory=cfg.corpus_dir).add(LabelledScan(
        frames=rng.poisson(5.0, (6, 128, 128)).astype(np.float32),
        phases=rng.normal(0, 0.3, (6, 128, 128)).astype(np.float32),
        positions=np.column_stack([np.arange(6) * 8.0, np.zeros(6)]), scan_uid="scan-1", pixel_size_nm=10.0))

def test_a_retry_after_a_lost_attempt_that_published_does_not_train_again(storage_config, tmp_path):
    """Attempt 1 published v0002 and its worker died before reporting: attempt 2 reports it."""
    cfg = job_config(tmp_path, storage_config, ALWAYS_RETRAIN)
    _corpus_with_scan_1(cfg)
    registry = deploy_tiny(tmp_path)
    lost = {"action": "retrain", "reason": "SSIM 0.100 is below min_ssim 1.000: retrain", "at": 5.0,
            "ssim": 0.1, "expected": None, "threshold": 1.0, "next_check_at": None, "scan_uid": "scan-1"}
    registry.publish({"model.onnx": tiny_onnx(tmp_path / "t2.onnx", 2.0)}, model="tiny", validation_ssim=0.4,
                     extra={"job_id": "job-1", "trigger_scan": "scan-1", "decision": lost})
    result = run_retraining_job(JobRequest("scan-1", cfg, now=10.0, job_id="job-1", attempt=2))
    assert (result.status, result.published_version, result.model_before) == ("retrained", "v0002", "v0001")
    assert result.labels_source == "corpus" and "train" not in result.timings
    assert result.validation_ssim == 0.4 and result.policy_state["counts"]["trainings"] == 1
    assert [v.version for v in registry.versions()] == ["v0001", "v0002"]


def test_a_retry_after_a_lost_attempt_that_published_without_deploying_does_not_train_again(
        storage_config, tmp_path):
    """Attempt 1 trained, fell below the deployment gate, published v0002 without deploying it, and
    was lost: attempt 2 validates again, comes to the same decision and reports v0002 (not deployed)."""
    cfg = job_config(tmp_path, storage_config, ALWAYS_RETRAIN)
    _corpus_with_scan_1(cfg)
    registry = deploy_tiny(tmp_path)
    registry.publish({"model.onnx": tiny_onnx(tmp_path / "t2.onnx", 2.0)}, model="tiny", validation_ssim=0.05,
                     deploy=False, extra={"job_id": "job-1", "trigger_scan": "scan-1"})
    result = run_retraining_job(JobRequest("scan-1", cfg, now=10.0, job_id="job-1", attempt=2))
    assert (result.status, result.published_version, result.deployed) == ("retrained", "v0002", False)
    assert "train" not in result.timings and result.validation_ssim == 0.05
    assert registry.current().version == "v0001"
    assert [v.version for v in registry.versions()] == ["v0001", "v0002"]
    # another job (or a first attempt) does train
    result = run_retraining_job(JobRequest("scan-1", cfg, now=20.0, job_id="job-2", attempt=2))
    assert "train" in result.timings and result.published_version == "v0003"

@pytest.mark.slow
def test_a_retrained_model_far_below_the_deployed_one_is_published_but_not_deployed(
        RE, beamline, tiled_client, storage_config, tmp_path):
    """The deployment gate (``max_ssim_drop``): here an impossible one, new SSIM >= deployed + 2."""
    registry = deploy_tiny(tmp_path)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(labelled_scan(beamline, n=20))
    cfg = job_config(tmp_path, storage_config, ALWAYS_RETRAIN, max_ssim_drop=-2.0)
    result = run_retraining_job(JobRequest(uid, cfg, now=10.0, job_id="job-gate", attempt=1))
    assert result.status == "retrained" and result.published_version == "v0002" and not result.deployed
    assert "v0002 NOT deployed" in result.reason
    assert registry.current().version == "v0001"          # the deployed model stays
    assert [v.version for v in registry.versions()] == ["v0001", "v0002"]
    # the new model records the exposure its training frames were taken with (the worker scales to it)
    assert registry.get("v0002").input_exposure_s == pytest.approx(beamline.det.exposure_time.get())
    # a gate any model passes: the same job deploys its model
    cfg = job_config(tmp_path / "open", storage_config, ALWAYS_RETRAIN, max_ssim_drop=2.0)
    registry = deploy_tiny(tmp_path / "open")
    result = run_retraining_job(JobRequest(uid, cfg, now=10.0, job_id="job-open", attempt=1))
    assert result.deployed and "NOT deployed" not in result.reason
    assert registry.current().version == "v0002"


def test_retraining_keeps_the_deployed_architecture_to_warm_start_from_it(tmp_path: Path) -> None:
    """The shipped model is the CPU-sized variant: a job configured for PtychoNN 2.0 retrains that
    variant (with its recorded sizes) rather than failing to load its weights."""
    from edge_ptycho_bluesky.model import build_model, export_onnx, save_state_dict
    from edge_ptycho_bluesky.training.jobs import _architecture

    config = JobConfig.under(tmp_path, StorageConfig(data_dir=tmp_path / "data"))
    registry = ModelRegistry(config.registry_root)
    assert _architecture(config, None) == ("ptychonn2", {})
    fast = build_model("ptychonn2-fast", nconv=4, n_levels=3)
    mv = registry.publish({"model.onnx": export_onnx(fast, tmp_path / "f.onnx"),
                           "model.pt": save_state_dict(fast, tmp_path / "f.pt")},
                          model="ptychonn2-fast", extra={"model_kwargs": {"nconv": 4, "n_levels": 3}})
    name, kwargs = _architecture(config, mv)
    assert (name, kwargs) == ("ptychonn2-fast", {"nconv": 4, "n_levels": 3})
    build_model(name, **kwargs).load_state_dict(fast.state_dict())  # the warm start loads


@pytest.mark.slow
def test_every_scan_adapts_the_deployed_model_without_labels_first(RE, beamline, writer, storage_config,
                                                                    tmp_path: Path) -> None:
    """With ``adapt_seconds`` an unlabelled scan teaches the model too: the deployed (shipped) model
    is fine-tuned on its frames with the physics loss and the outcome says so; no labels, no rPIE."""
    from edge_ptycho_bluesky.training.shipped import init_registry

    config = job_config(tmp_path, storage_config, NEVER_RETRAIN, adapt_seconds=8.0)
    shipped = init_registry(config.registry_root)
    RE.subscribe(writer)
    cb = RetrainCallback(config, "thread")
    RE.subscribe(cb)
    try:
        RE(labelled_scan(beamline, n=20, labelled=False))
        assert cb.wait_idle(300)
    finally:
        cb.close()
    (outcome,) = cb.outcomes  # the adaptation only: the scan is not labelled
    assert outcome.status == "adapted" and outcome.model_before == shipped.version
    assert outcome.published_version and "held-out physics loss" in outcome.reason
    assert outcome.timings["adapt"] <= 8.0 + 5.0  # the time budget is kept (export and publish after it)
    assert not (config.corpus_dir / "index.json").exists()  # nothing was labelled

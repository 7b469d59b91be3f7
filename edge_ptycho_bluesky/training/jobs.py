"""The retraining job: one labelled scan, from Tiled to a (possibly) new deployed model.

:func:`run_retraining_job` is a plain, picklable, module-level function of one picklable
:class:`JobRequest`, so it runs on any :class:`concurrent.futures.Executor` -- a local process
pool, Dask distributed workers, a Globus Compute endpoint (see :mod:`edge_ptycho_bluesky.executors`).
It does, in order (the loop of Babu et al., Nat. Commun. 2023, Discussion):

1. connect to Tiled from ``request.config.storage`` (cached per process) and read the raw run;
2. reconstruct it with rPIE (:func:`edge_ptycho_bluesky.recon.reconstruct.recon_from_run`) and cut
   the labels (:func:`~edge_ptycho_bluesky.recon.labels.labels_from_reconstruction`) -- or reuse
   the labels when the scan is already in the corpus (a retried job);
3. add them to the on-disk :class:`~edge_ptycho_bluesky.training.corpus.TrainingCorpus`;
4. validate the deployed model of the :class:`~edge_ptycho_bluesky.training.registry.ModelRegistry`
   (its ONNX file, the artefact the edge worker serves) against the labels: stitched SSIM, the
   figure :func:`~edge_ptycho_bluesky.training.evaluate.evaluate_scan` reports;
5. ask the :class:`~edge_ptycho_bluesky.training.policy.RetrainPolicy` (its state travels in the
   request and comes back in the result, so the caller stays the owner of the schedule);
6. on ``train``/``retrain``: warm-start a :class:`~edge_ptycho_bluesky.training.continual.
   ContinualTrainer` from the deployed version, train one increment on the whole corpus
   (``nproc > 1``: torch DDP under torchrun), export and publish (and deploy) a new version,
   which :class:`~edge_ptycho_bluesky.edge.model_source.RegistryModelSource` swaps in.

Everything the job touches lives in paths of :class:`JobConfig` (registry, corpus, workdir) and
the Tiled storage: on a cluster they must be on a shared file system (or the Tiled server URI must
be reachable from the workers).
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ..model.contract import InputContract
from ..recon.labels import LabelledScan
from ..stitching import stitch
from ..options import is_real
from ..runs import read_scan
from ..storage import StorageConfig, StorageError, connect, get_run
from .config import TrainConfig
from .continual import ContinualTrainer
from .corpus import INDEX_NAME, TrainingCorpus
from .adapt import AdaptResult, adapt_scan
from .labelling import label_run
from .policy import Decision, RetrainPolicy, RetrainPolicyConfig
from .registry import ModelRegistry

logger = logging.getLogger(__name__)

__all__ = [
    "JOB_PURPOSE",
    "JobConfig",
    "JobRequest",
    "JobResult",
    "STATUSES",
    "run_retraining_job",
    "validate_deployed",
]

#: ``purpose`` of the derived runs that record job outcomes in Tiled.
JOB_PURPOSE = "retraining_job"
#: Every value of :attr:`JobResult.status` / ``JobOutcome.status``.
STATUSES: tuple[str, ...] = ("validated", "trained", "retrained", "adapted", "skipped", "failed")
Status = Literal["validated", "trained", "retrained", "skipped", "failed"]
_ACTION_STATUS = {"suspend": "validated", "train": "trained", "retrain": "retrained", "skip": "skipped"}


@dataclass(frozen=True)
class JobConfig:
    """Everything a retraining job needs, picklable (sent to every executor).

    Parameters
    ----------
    storage : StorageConfig
        Where the raw runs are (embedded catalog directory or Tiled server URI + key). The job
        connects by itself (once per worker process).
    registry_root : path
        Folder of the :class:`~edge_ptycho_bluesky.training.registry.ModelRegistry`.
    corpus_dir : path
        Folder of the on-disk training corpus (created on first use).
    workdir : path
        Folder for training increments (loss curves) and exports.
    train : TrainConfig
        Settings of each training increment (``progress`` is forced off in jobs).
    policy : RetrainPolicyConfig
        Retraining policy settings (tolerance, check interval...).
    rpie_iterations : int or None
        rPIE iterations (None: the solver's default).
    rpie_options : mapping
        More :class:`~edge_ptycho_bluesky.recon.rpie_options.RPIEOptions` fields (e.g. ``{"alpha": 0.2}``).
    nproc : int
        Data-parallel training processes (torch DDP under torchrun when > 1).
    model_name : str
        Architecture for a first model (``"ptychonn2"``).
    model_kwargs : mapping
        Arguments of :func:`edge_ptycho_bluesky.model.build_model` (e.g. ``{"nconv": 4,
        "n_levels": 2}`` for a tiny test network); must match the deployed model's architecture
        for the warm start.
    ssim_floor : float
        Published validation SSIMs are clipped to ``[ssim_floor, 1]`` (the registry wants (0, 1]).
    max_ssim_drop : float
        Deployment gate: a retrained model whose stitched SSIM against the scan's labels is more
        than this below the deployed model's SSIM on the same labels is published (for
        inspection) but not deployed; the deployed model stays.
    reuse_stored_labels : bool
        Take the scan's labels from Tiled (a derived run ``purpose="rpie_labels"``, see
        :func:`edge_ptycho_bluesky.recon.labels.find_labels`) when there are some, instead of
        reconstructing it again.
    adapt_seconds : float
        Before any labels: fine-tune the deployed model on every scan's own frames with the physics
        loss for this long (:func:`run_adaptation_job`, labelled or not); 0: off.
    """

    storage: StorageConfig
    registry_root: Path
    corpus_dir: Path
    workdir: Path
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=50, progress=False))
    policy: RetrainPolicyConfig = field(default_factory=RetrainPolicyConfig)
    rpie_iterations: int | None = None
    rpie_options: Mapping[str, Any] = field(default_factory=dict)
    nproc: int = 1
    model_name: str = "ptychonn2"
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)
    ssim_floor: float = 1e-6
    max_ssim_drop: float = 0.05
    reuse_stored_labels: bool = True
    adapt_seconds: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.storage, StorageConfig):
            raise TypeError(f"storage must be a StorageConfig, got {type(self.storage).__name__}")
        for name in ("registry_root", "corpus_dir", "workdir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        if not isinstance(self.train, TrainConfig):
            raise TypeError(f"train must be a TrainConfig, got {type(self.train).__name__}")
        if self.train.progress:
            object.__setattr__(self, "train", self.train.with_updates(progress=False))
        if not isinstance(self.policy, RetrainPolicyConfig):
            raise TypeError(f"policy must be a RetrainPolicyConfig, got {type(self.policy).__name__}")
        if self.rpie_iterations is not None and (not isinstance(self.rpie_iterations, int)
                                                 or self.rpie_iterations < 1):
            raise ValueError(f"rpie_iterations must be None or an integer >= 1, got {self.rpie_iterations!r}")
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"nproc must be an integer >= 1 (DDP processes), got {self.nproc!r}")
        if not is_real(self.adapt_seconds) or self.adapt_seconds < 0:
            raise ValueError(f"adapt_seconds must be a time >= 0 (0: no label-free adaptation), got "
                             f"{self.adapt_seconds!r}")
        object.__setattr__(self, "rpie_options", dict(self.rpie_options))
        object.__setattr__(self, "model_kwargs", dict(self.model_kwargs))

    @classmethod
    def under(cls, root: str | os.PathLike[str], storage: StorageConfig, **kwargs: Any) -> JobConfig:
        """A config whose registry, corpus and workdir are ``root/registry``, ``root/corpus``,
        ``root/work``."""
        root = Path(root)
        return cls(storage=storage, registry_root=root / "registry", corpus_dir=root / "corpus",
                   workdir=root / "work", **kwargs)


@dataclass(frozen=True)
class JobRequest:
    """One submission of a job (a retry is a new request with ``attempt + 1``).

    Parameters
    ----------
    scan_uid : str
        The labelled raw run.
    config : JobConfig
    policy_state : mapping or None
        :meth:`RetrainPolicy.state_dict` of the caller's policy (None: a fresh policy).
    now : float
        The caller's clock at submission; the policy decides at this time (so a test clock or
        a remote worker's clock skew cannot change the schedule).
    job_id : str
        Identifier shared by every attempt.
    attempt : int
        1 for the first try.
    """

    scan_uid: str
    config: JobConfig
    policy_state: Mapping[str, Any] | None = None
    now: float = field(default_factory=time.time)
    job_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    attempt: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.scan_uid, str) or not self.scan_uid:
            raise ValueError(f"scan_uid must be a non-empty run uid, got {self.scan_uid!r}")
        if not isinstance(self.config, JobConfig):
            raise TypeError(f"config must be a JobConfig, got {type(self.config).__name__}")


@dataclass(frozen=True)
class JobResult:
    """What a job did (returned to the caller; picklable, JSON-ready through :meth:`to_dict`).

    Attributes
    ----------
    job_id, scan_uid : str
    attempt : int
    status : {"validated", "trained", "retrained", "skipped"}
        ``validated``: the deployed model is within tolerance (the policy suspends).
    decision : dict
        :meth:`Decision.to_dict` of the policy's decision (action, reason, ssim, threshold...).
    policy_state : dict
        The policy state after the decision (the caller loads it back).
    ssim : float or None
        Stitched SSIM of the deployed model against the labels (None when no model was deployed).
    model_before : str or None
        The version deployed when the job started.
    published_version : str or None
        The version published (and deployed) by this job.
    validation_ssim : float or None
        The SSIM recorded with the published version (the policy's next expected level).
    n_frames : int
        Frames of the scan.
    corpus_scans, corpus_frames : int
        Size of the corpus after the scan was added.
    labels_file : str or None
        The corpus file holding this scan's labels.
    labels_source : {"rpie", "corpus", "tiled"}
        Where the labels came from: a new reconstruction, the corpus (a retried job), or labels
        stored in Tiled.
    rpie_final_error : float or None
    timings : dict of str to float
        Seconds spent in each step (``read``, ``rpie``, ``labels``, ``validate``, ``train``,
        ``publish``, ``total``).
    worker : str
        ``host:pid`` of the process that ran the job.
    deployed : bool
        False when the published version failed the deployment gate (``max_ssim_drop``).
    """

    job_id: str
    scan_uid: str
    attempt: int
    status: Status
    decision: dict[str, Any]
    policy_state: dict[str, Any]
    ssim: float | None
    model_before: str | None
    published_version: str | None
    validation_ssim: float | None
    n_frames: int
    corpus_scans: int
    corpus_frames: int
    labels_file: str | None
    labels_source: str
    rpie_final_error: float | None
    timings: dict[str, float]
    worker: str
    deployed: bool = True

    @property
    def reason(self) -> str:
        """The policy's explanation (and the deployment gate's, when it held a model back)."""
        reason = str(self.decision.get("reason", ""))
        if self.published_version and not self.deployed:
            reason += (f"; {self.published_version} NOT deployed: its SSIM {self.validation_ssim:.3f} is more "
                       f"than the gate below the deployed model's {self.ssim:.3f}")
        return reason

    @property
    def labels_reused(self) -> bool:
        """True when the labels were not reconstructed by this job."""
        return self.labels_source != "rpie"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# helpers

_CLIENTS: dict[tuple[str, str | None, str | None], Any] = {}
_CLIENTS_LOCK = threading.Lock()


def _client(storage: StorageConfig) -> Any:
    """A Tiled client for ``storage``, made once per process (connecting costs seconds)."""
    key = (str(Path(storage.data_dir).expanduser().resolve()), storage.uri, storage.api_key)
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(key)
        if client is None:
            client = connect(storage)
            _CLIENTS[key] = client
        return client


def _forget_client(storage: StorageConfig) -> None:
    key = (str(Path(storage.data_dir).expanduser().resolve()), storage.uri, storage.api_key)
    with _CLIENTS_LOCK:
        _CLIENTS.pop(key, None)


def _open_corpus(directory: Path) -> TrainingCorpus:
    if (directory / INDEX_NAME).is_file():
        return TrainingCorpus.open(directory)
    return TrainingCorpus(directory=directory)


def _clip(value: float | None, floor: float) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return float(min(1.0, max(value, floor)))


def validate_deployed(mv: Any, scan: Any) -> float:
    """Stitched SSIM of a registry version's ONNX model against a labelled scan's phases.

    The model runs in ONNX Runtime (the artefact the edge serves) on the input its
    :class:`~edge_ptycho_bluesky.model.contract.InputContract` prepares from the frames and the
    scan's exposure (``scan.metadata["exposure_s"]``), exactly the input the edge worker gives it
    live; the predicted and label patches are stitched at the scan positions and compared over the covered
    region with the labels' dynamic range, as :func:`~edge_ptycho_bluesky.training.evaluate.
    evaluate_scan` does (so the value is comparable with the version's ``validation_ssim``).

    Parameters
    ----------
    mv : ModelVersion
    scan : LabelledScan
        ``frames : (N, 128, 128) float32``, ``phases : (N, 128, 128) float32``,
        ``positions : (N, 2) float64``.

    Returns
    -------
    float
        SSIM in [-1, 1].
    """
    from ..metrics import ssim
    from ..model.engines import load_engine

    engine = load_engine(mv.onnx_path, "onnxruntime", intra_op_threads=1)
    pred = engine.infer(InputContract.from_version(mv).prepare(scan.frames, scan.metadata.get("exposure_s")))
    labels = np.asarray(scan.phases, dtype=np.float32)
    span = float(labels.max() - labels.min())
    data_range = span if span > 0 else 2 * math.pi
    positions = np.asarray(scan.positions, dtype=np.float64)
    label_img, cov = stitch(labels, positions)
    pred_img, _ = stitch(np.asarray(pred, dtype=np.float32), positions)
    return float(ssim(label_img, pred_img, cov > 0, data_range=data_range))


def _published_by_this_job(mv: Any, request: JobRequest) -> dict[str, Any] | None:
    """The recorded decision when the deployed version ``mv`` was published by this very job."""
    if mv is None or request.attempt == 1:
        return None
    extra = mv.manifest.get("extra") or {}
    if extra.get("job_id") != request.job_id:
        return None
    decision = extra.get("decision")
    return dict(decision) if isinstance(decision, Mapping) else {"action": "train"}


def _undeployed_by_this_job(registry: Any, request: JobRequest) -> Any:
    """The version an earlier attempt of this job published without deploying it (its model fell
    below the deployment gate) before it was lost, or None: a retry reports it instead of training again."""
    if request.attempt == 1:
        return None
    current = registry.current_version()
    mine = [mv for mv in registry.versions()
            if (mv.manifest.get("extra") or {}).get("job_id") == request.job_id and mv.version != current]
    return mine[-1] if mine else None


# ---------------------------------------------------------------------------------------------
# the job


@dataclass
class _JobOutcome:
    """What the job found and did, filled in step by step."""

    decision: Decision
    ssim: float | None = None
    model_before: str | None = None
    published: str | None = None
    validation_ssim: float | None = None
    deployed: bool = True


def _load_labels(request: JobRequest, corpus: TrainingCorpus,
                 timings: dict[str, float]) -> tuple[LabelledScan, str, float | None]:
    """The scan's labelled frames, where they came from and rPIE's final error: from the corpus
    when an earlier attempt put them there, else read from Tiled and labelled (stored labels or
    rPIE), then added to the corpus."""
    cfg = request.config
    uid = request.scan_uid
    rpie_error: float | None = None
    if uid in corpus:
        source = "corpus"
        labelled = next(s for s in corpus if s.scan_uid == uid)
        logger.info("scan %s is already in the corpus (an earlier attempt): reusing its labels", uid)
        return labelled, source, rpie_error
    try:
        client = _client(cfg.storage)
        run = get_run(client, uid)
        start_doc = run.metadata["start"]
    except StorageError:
        _forget_client(cfg.storage)
        raise
    except KeyError:
        raise
    except Exception as exc:  # connection dropped after connecting, ...
        _forget_client(cfg.storage)
        raise StorageError(f"cannot read run {uid} from Tiled ({cfg.storage!r}): "
                           f"{type(exc).__name__}: {exc}") from exc
    if "edge_ptycho" not in start_doc:
        raise ValueError(f"run {uid} has no edge_ptycho metadata: it was not recorded by the "
                         f"edge_ptycho plans and cannot be reconstructed")
    try:
        labelled, source = label_run(client, run, reuse_stored_labels=cfg.reuse_stored_labels,
                                     rpie_iterations=cfg.rpie_iterations, rpie_options=cfg.rpie_options,
                                     timings=timings)
    except Exception:
        _forget_client(cfg.storage)  # reconnect on the next attempt
        raise
    final = labelled.metadata.get("final_error")
    rpie_error = None if final is None else float(final)
    corpus.add(labelled)
    return labelled, source, rpie_error


def _labels_file(corpus: TrainingCorpus, uid: str) -> str | None:
    """The corpus file holding the scan's labels."""
    labels_file = None
    for scan, path in zip(corpus.scans, corpus.files, strict=False):
        if scan.scan_uid == uid:
            labels_file = str(path)
    return labels_file


def _validate_or_replay(request: JobRequest, policy: RetrainPolicy, mv: Any, labelled: LabelledScan,
                        timings: dict[str, float]) -> _JobOutcome:
    """The policy's decision: replayed when an earlier attempt of this job published the deployed
    version ``mv``, else from validating ``mv`` against the labels (no model deployed: train)."""
    uid = request.scan_uid
    earlier = _published_by_this_job(mv, request)
    if earlier is not None:
        # An earlier attempt of this job published ``mv`` and was lost before it reported (the
        # worker died, the connection dropped): replay its decision instead of training again.
        ssim_value = earlier.get("ssim")
        if earlier.get("action") == "train" or ssim_value is None:
            decision = policy.record_no_model(uid, now=request.now)
        else:
            decision = policy.record_validation(ssim_value, expected=earlier.get("expected"), scan_uid=uid,
                                                now=request.now)
        logger.warning("retraining job %s: attempt %d finds %s already published by an earlier attempt; "
                       "not training again", request.job_id, request.attempt, mv.version)
        return _JobOutcome(decision, ssim=ssim_value, model_before=mv.parent, published=mv.version,
                           validation_ssim=mv.validation_ssim)
    if mv is None:
        return _JobOutcome(policy.record_no_model(uid, now=request.now))
    t = time.perf_counter()
    ssim_value = validate_deployed(mv, labelled)
    timings["validate"] = time.perf_counter() - t
    decision = policy.record_validation(max(-1.0, min(1.0, ssim_value)), expected=mv.validation_ssim,
                                        scan_uid=uid, now=request.now)
    return _JobOutcome(decision, ssim=ssim_value, model_before=mv.version)


def _reuse_undeployed_version(request: JobRequest, registry: ModelRegistry, outcome: _JobOutcome) -> None:
    """When training is due: report the version an earlier attempt published without deploying it
    instead of training again."""
    undeployed = (_undeployed_by_this_job(registry, request)
                  if outcome.decision.needs_training and outcome.published is None else None)
    if undeployed is not None:
        outcome.published, outcome.validation_ssim = undeployed.version, undeployed.validation_ssim
        outcome.deployed = False
        logger.warning("retraining job %s: attempt %d finds %s published (not deployed) by an earlier attempt; "
                       "not training again", request.job_id, request.attempt, undeployed.version)


def _architecture(cfg: JobConfig, mv: Any) -> tuple[str, dict[str, Any]]:
    """The network to train: the deployed version's (its ``model.pt`` is the warm start, e.g. the
    shipped ptychonn2-fast), else ``cfg.model_name``."""
    if mv is None or mv.torch_path is None:
        return cfg.model_name, dict(cfg.model_kwargs)
    name = str(mv.manifest.get("model") or cfg.model_name)
    if name == cfg.model_name:
        return name, dict(cfg.model_kwargs)
    logger.info("retraining the deployed %s's architecture %s (not %s) to warm-start from it", mv.version, name,
                cfg.model_name)
    return name, dict((mv.manifest.get("extra") or {}).get("model_kwargs") or {})


def _train_and_publish(request: JobRequest, corpus: TrainingCorpus, registry: ModelRegistry, mv: Any,
                       labelled: LabelledScan, outcome: _JobOutcome, timings: dict[str, float]) -> None:
    """Train one increment on the whole corpus (warm-started from ``mv``), measure it on the scan and
    publish it; deploy it unless its SSIM falls more than ``max_ssim_drop`` below the deployed model's."""
    cfg = request.config
    uid = request.scan_uid
    decision, ssim_value = outcome.decision, outcome.ssim
    workdir = cfg.workdir / f"job_{request.job_id}_{request.attempt}"
    name, kwargs = _architecture(cfg, mv)
    trainer = ContinualTrainer(name, cfg.train, workdir, corpus=corpus, model_kwargs=kwargs)
    if mv is not None:
        trainer.warm_start_from_registry(registry)
    t = time.perf_counter()
    trainer.train(nproc=cfg.nproc)
    timings["train"] = time.perf_counter() - t
    t = time.perf_counter()
    quality = trainer.evaluate(labelled)
    outcome.validation_ssim = _clip(quality.stitched_ssim, cfg.ssim_floor)
    outcome.deployed = ssim_value is None or quality.stitched_ssim >= ssim_value - cfg.max_ssim_drop
    if not outcome.deployed:
        logger.warning("retraining job %s: the new model's SSIM %.3f is more than %.3f below the deployed "
                       "%s's %.3f on scan %s: publishing it without deploying", request.job_id,
                       quality.stitched_ssim, cfg.max_ssim_drop, outcome.model_before, ssim_value, uid)
    new = trainer.export_and_publish(
        registry, validation_ssim=outcome.validation_ssim, deploy=outcome.deployed,
        notes=f"retraining job {request.job_id}: {decision.action} after scan {uid}",
        extra={"job_id": request.job_id, "trigger_scan": uid, "decision": decision.to_dict(),
               "validation_scan": uid, "validation_held_out": False},
    )
    outcome.published = new.version
    timings["publish"] = time.perf_counter() - t


# ---------------------------------------------------------------------------------------------
# the jobs


def run_adaptation_job(request: JobRequest) -> AdaptResult | None:
    """Label-free adaptation of the deployed model on the scan's own frames
    (:func:`~edge_ptycho_bluesky.training.adapt.adapt_scan`, ``config.adapt_seconds``); None when
    nothing is deployed. Raises as :func:`run_retraining_job` for an unreachable Tiled or a missing run."""
    cfg = request.config
    registry = ModelRegistry(cfg.registry_root)
    if registry.current_version() is None:
        return None
    try:
        scan = read_scan(get_run(_client(cfg.storage), request.scan_uid))
    except Exception:
        _forget_client(cfg.storage)
        raise
    return adapt_scan(scan, registry, seconds=cfg.adapt_seconds)


def run_retraining_job(request: JobRequest) -> JobResult:
    """Reconstruct, label, validate and (per the policy) retrain for one labelled scan.

    Parameters
    ----------
    request : JobRequest

    Returns
    -------
    JobResult

    Raises
    ------
    edge_ptycho_bluesky.storage.StorageError
        Tiled unreachable (the caller retries).
    KeyError
        The run is not in the catalog.
    ValueError
        The run is not a ptychography run of this package (no ``edge_ptycho`` metadata), or a
        configuration mismatch (e.g. the deployed model's input scale differs from
        ``config.train.count_scale``).
    """
    t_job = time.perf_counter()
    cfg = request.config
    uid = request.scan_uid
    timings: dict[str, float] = {}
    worker = f"{socket.gethostname()}:{os.getpid()}"
    logger.info("retraining job %s (attempt %d) for scan %s on %s", request.job_id, request.attempt,
                uid, worker)

    corpus = _open_corpus(cfg.corpus_dir)
    labelled, source, rpie_error = _load_labels(request, corpus, timings)
    labels_file = _labels_file(corpus, uid)

    policy = RetrainPolicy(cfg.policy, clock=lambda: request.now)
    if request.policy_state is not None:
        policy.load_state_dict(request.policy_state)
    registry = ModelRegistry(cfg.registry_root)
    mv = registry.current(verify=True)
    outcome = _validate_or_replay(request, policy, mv, labelled, timings)
    _reuse_undeployed_version(request, registry, outcome)
    if outcome.decision.needs_training and outcome.published is None:
        _train_and_publish(request, corpus, registry, mv, labelled, outcome, timings)
    timings["total"] = time.perf_counter() - t_job
    decision = outcome.decision
    result = JobResult(
        job_id=request.job_id, scan_uid=uid, attempt=request.attempt,
        status=_ACTION_STATUS[decision.action],  # type: ignore[arg-type]
        decision=decision.to_dict(), policy_state=policy.state_dict(), ssim=outcome.ssim,
        model_before=outcome.model_before, published_version=outcome.published,
        validation_ssim=outcome.validation_ssim, n_frames=len(labelled), corpus_scans=len(corpus),
        corpus_frames=corpus.n_frames, labels_file=labels_file, labels_source=source,
        rpie_final_error=rpie_error, timings=timings, worker=worker, deployed=outcome.deployed,
    )
    logger.info("retraining job %s for scan %s: %s (%s)%s", request.job_id, uid, result.status,
                result.reason, f"; published {outcome.published}" if outcome.published else "")
    return result

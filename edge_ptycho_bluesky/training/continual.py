"""Continual training of PtychoNN on a growing corpus of labelled scans.

:class:`ContinualTrainer` keeps the corpus and the network of a model lineage: every time a scan's
iterative phase becomes available it is added, one increment is trained on the whole corpus with
:func:`~edge_ptycho_bluesky.training.loop.fit` (the paper's recipe, see
:mod:`edge_ptycho_bluesky.training.loop`), warm-starting from the previous increment's model,
and the result is exported and published into the model registry.

Input scaling
-------------
The network sees exactly what the inference engines see: frames become network input through the
model's :class:`~edge_ptycho_bluesky.model.contract.InputContract` (128 x 128 float32 counts, no
log, no normalisation, times ``config.count_scale``). The network is not invariant to the count
level, so the scale a model was trained with is part of the model: :meth:`ContinualTrainer.
export_and_publish` records it in the registry manifest as ``extra["preprocess"] =
{"scale": ...}``, with the training frames' exposure (``exposure_s``, when the training scans
record it); the contract built from the manifest applies both wherever the model runs (the edge
worker, validation, ``edge-ptycho infer``), scaling each frame by ``t_train / t_frame``.
``count_scale=None`` keeps raw counts, as the paper's edge code does. The default, ``"auto"``,
picks the scale on the first increment so that the brightest training pixel is about
:data:`AUTO_BRIGHTEST` (100; rounded to one significant figure), and a warm start from a registry
version adopts that version's recorded scale. Raw counts of 1e4-1e6 would start the network with
its ``tanh`` head saturated.

Typical use::

    trainer = ContinualTrainer("ptychonn2", TrainConfig(epochs=50), workdir="train")
    trainer.warm_start_from_registry(registry)        # previous deployed model, if any
    trainer.add_scan(labelled_scan)                   # recon.labels.LabelledScan
    result = trainer.train()                          # TrainResult, curves in workdir
    quality = trainer.evaluate(held_out_scan)         # per-patch and stitched SSIM
    trainer.export_and_publish(registry, validation_ssim=quality.stitched_ssim)
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

import torch
from torch import nn

from ..recon.labels import LabelledScan
from .config import DistInfo, TrainConfig, TrainResult
from .corpus import TrainingCorpus
from .curves import CURVES_STEM
from .ddp import run_torchrun
from .evaluate import ScanEvaluation, evaluate_scan
from .loop import (
    AUTO_BRIGHTEST,
    StateSource,
    auto_count_scale,
    copy_state,
    fit,
    load_state_dict,
    prepare_inputs,
)
from .model_version import PROBE_NAME, ModelVersion
from .registry import ModelRegistry

logger = logging.getLogger(__name__)

__all__ = ["ContinualTrainer", "corpus_exposure"]


def corpus_exposure(scans: Iterable[Any]) -> float | None:
    """The exposure time (s) the training frames were taken with, when every scan records the same
    one (``LabelledScan.metadata["exposure_s"]``); else None.

    Published models record it (``extra.preprocess.exposure_s``) so that the edge worker can bring
    frames of any other exposure (a 0.5 ms fly-scan frame against 10 ms training frames) to the
    count level the network was trained on.
    """
    values = {(scan.metadata or {}).get("exposure_s") for scan in scans}
    if len(values) != 1:
        if len(values - {None}) > 1:
            logger.warning("training scans have different exposures %s: no exposure recorded with the model",
                           sorted(v for v in values if v is not None))
        return None
    (value,) = values
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


class ContinualTrainer:
    """Train a PtychoNN on a corpus that grows scan by scan, warm-starting each increment.

    Parameters
    ----------
    model_name : str
        Architecture for :func:`edge_ptycho_bluesky.model.build_model` (``"ptychonn2"``).
    config : TrainConfig
        Settings of every increment.
    workdir : path-like
        Folder for the increments' loss curves (``increment_0001/curves.*``) and exported
        files.
    corpus : TrainingCorpus, optional
        An existing corpus (e.g. :meth:`TrainingCorpus.open`); a new in-memory one by default.
    model_kwargs : mapping, optional
        Extra arguments of ``build_model``.

    Attributes
    ----------
    corpus : TrainingCorpus
    model : torch.nn.Module
        The network, holding the latest best-validation weights.
    last_result : TrainResult or None
        The latest increment.
    parent_version : str or None
        Registry version the current weights descend from (recorded as ``parent`` on publish).
    """

    def __init__(
        self,
        model_name: str = "ptychonn2",
        config: TrainConfig | None = None,
        workdir: str | os.PathLike[str] = "training",
        *,
        corpus: TrainingCorpus | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        from ..model import build_model

        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        self.model_name = model_name
        self.model_kwargs = dict(model_kwargs or {})
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.corpus = corpus if corpus is not None else TrainingCorpus()
        torch.manual_seed(self.config.seed)
        self.model: nn.Module = build_model(model_name, **self.model_kwargs)
        self.increment = 0
        self.last_result: TrainResult | None = None
        self.parent_version: str | None = None
        #: The probe of the warm-start version (``probe.npy``), carried to the versions published from it.
        self.probe_path: Path | None = None
        self._trained = False
        self._published_for: int | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.model_name!r}, corpus={self.corpus!r}, "
            f"increment={self.increment}, parent_version={self.parent_version!r})"
        )

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Current weights (CPU copy)."""
        return copy_state(self.model)

    @property
    def count_scale(self) -> float | None:
        """The input scale of this model lineage (``config.count_scale``, once resolved).

        Raises
        ------
        ValueError
            While ``"auto"`` is unresolved (neither trained nor warm-started yet).
        """
        if self.config.count_scale == "auto":
            raise ValueError("count_scale='auto' is chosen when training starts (or from the "
                             "warm-start version): train() or warm_start_from_registry() first")
        return self.config.count_scale

    def _set_count_scale(self, scale: float | None, why: str) -> None:
        self.config = self.config.with_updates(count_scale=scale)
        logger.info("count_scale %r (%s)", scale, why)

    def add_scan(self, scan: LabelledScan) -> None:
        """Append a labelled scan to the corpus (see :meth:`TrainingCorpus.add`)."""
        self.corpus.add(scan)

    def warm_start_from_registry(self, registry: ModelRegistry | str | os.PathLike[str]) -> (
        ModelVersion | None
    ):
        """Load the deployed version's ``model.pt`` as the starting weights.

        Returns
        -------
        ModelVersion or None
            The version loaded, or None when nothing is deployed or it has no ``model.pt``
            (then training starts from the current weights).

        Raises
        ------
        ValueError
            When the version records a different input scale than ``config.count_scale``.
        """
        if not isinstance(registry, ModelRegistry):
            registry = ModelRegistry(registry)
        mv = registry.current(verify=True)
        if mv is None:
            logger.info("registry %s has no deployed model: training starts from scratch",
                        registry.root)
            return None
        if mv.torch_path is None:
            logger.warning("deployed version %s has no model.pt: no warm start", mv.version)
            return None
        recorded = (mv.manifest.get("extra") or {}).get("preprocess") or {}
        if self.config.count_scale == "auto":
            self._set_count_scale(recorded.get("scale"), f"recorded with version {mv.version}")
        elif "scale" in recorded and recorded["scale"] != self.config.count_scale:
            raise ValueError(
                f"version {mv.version} was trained with count_scale={recorded['scale']!r} but "
                f"this trainer uses {self.config.count_scale!r}; the weights only fit inputs "
                f"on their own scale: pass TrainConfig(count_scale={recorded['scale']!r}) or "
                f"train from scratch"
            )
        self.model.load_state_dict(load_state_dict(mv.torch_path), strict=True)
        self.parent_version = mv.version
        self.probe_path = mv.probe_path  # published again with the new versions
        self._trained = True
        logger.info("warm start from registry version %s", mv.version)
        return mv

    def train(
        self,
        initial_state: StateSource | None = None,
        *,
        from_scratch: bool = False,
        nproc: int = 1,
        timeout_s: float | None = None,
    ) -> TrainResult:
        """Train one increment on the whole corpus.

        Parameters
        ----------
        initial_state : state dict or path, optional
            Weights to start from. By default the current weights: the previous increment's
            best model (or what :meth:`warm_start_from_registry` loaded) -- the warm start.
        from_scratch : bool
            Re-initialise the weights (seeded) instead of warm-starting.
        nproc : int
            Data-parallel processes: > 1 runs :mod:`edge_ptycho_bluesky.training.ddp` under
            torchrun in a subprocess (the corpus must be on disk, ``TrainingCorpus(directory=
            ...)``, or is written to ``workdir/corpus`` first).
        timeout_s : float, optional
            Time limit of the torchrun subprocess.

        Returns
        -------
        TrainResult
            The model now holds ``result.state_dict``.
        """
        from ..model import build_model

        if initial_state is not None and from_scratch:
            raise ValueError("pass either initial_state or from_scratch=True, not both")
        self.increment += 1
        out = self.workdir / f"increment_{self.increment:04d}"
        if from_scratch:
            torch.manual_seed(self.config.seed + self.increment)
            self.model = build_model(self.model_name, **self.model_kwargs)
            self.parent_version = None
        elif initial_state is not None:
            self.model.load_state_dict(load_state_dict(initial_state), strict=True)
            self.parent_version = None
        if self.config.count_scale == "auto":
            self._set_count_scale(auto_count_scale(self.corpus.arrays()[0]),
                                  f"brightest training pixel -> ~{AUTO_BRIGHTEST:g}")
        desc = f"increment {self.increment} ({self.corpus.n_frames} frames)"
        split_seed = self.config.seed + 7919 * self.increment
        if nproc > 1:
            files = self._corpus_files()
            init = out / "initial.pt"
            out.mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict, init)
            result = run_torchrun(
                files, out, nproc=nproc, config=self.config, initial_state=init,
                model=self.model_name, model_kwargs=self.model_kwargs, split_seed=split_seed,
                timeout_s=timeout_s,
            )
            self.model.load_state_dict(result.state_dict)
        else:
            frames, phases = self.corpus.arrays()
            inputs = prepare_inputs(frames, self.config.count_scale)
            result = fit(
                self.model, inputs, phases, self.config, dist_info=DistInfo(),
                split_seed=split_seed, curves_dir=out, description=desc,
            )
            self.model.to("cpu")
        self.last_result = result
        self._trained = True
        return result

    def _corpus_files(self) -> list[Path]:
        if self.corpus.directory is not None and len(self.corpus.files) == len(self.corpus):
            return self.corpus.files
        disk = TrainingCorpus(self.corpus.scans, directory=self.workdir / "corpus")
        return disk.files

    def evaluate(self, scan: LabelledScan, **kwargs: Any) -> ScanEvaluation:
        """:func:`evaluate_scan` of the current model (the trainer's count scale and device)."""
        kwargs.setdefault("count_scale", self.count_scale)
        kwargs.setdefault("batch_size", self.config.batch_size)
        return evaluate_scan(self.model, scan, **kwargs)

    def export_and_publish(
        self,
        registry: ModelRegistry | str | os.PathLike[str],
        *,
        training_data: Sequence[str] | None = None,
        validation_ssim: float | None = None,
        parent: str | None | EllipsisType = ...,
        deploy: bool = True,
        version: str | None = None,
        notes: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Export the current model (ONNX, dynamic batch; ``model.pt``) and publish it.

        Parameters
        ----------
        registry : ModelRegistry or its folder
        training_data : sequence of str, optional
            Scan uids; default: the corpus's uids.
        validation_ssim : float, optional
            The expected SSIM level for the retraining policy; measure it with
            :meth:`evaluate` on a held-out labelled scan (``.stitched_ssim``). Without it the
            policy has no expected level for this model (it then falls back to its baseline).
        parent : str or None, optional
            Default: the version the weights descend from (:attr:`parent_version`; None after
            training from scratch).
        deploy, version, notes
            As for :meth:`ModelRegistry.publish`.
        extra : mapping, optional
            More metadata; the trainer adds ``preprocess`` (``{"scale": count_scale}``, which
            the edge worker must apply, and ``exposure_s`` when the corpus records one exposure:
            :func:`corpus_exposure`) and ``training`` (the last increment's summary).

        Returns
        -------
        ModelVersion
        """
        from ..model import export_onnx, save_state_dict

        if not self._trained:
            raise ValueError("nothing to publish: train() first (or warm-start from a registry)")
        if not isinstance(registry, ModelRegistry):
            registry = ModelRegistry(registry)
        if validation_ssim is None:
            logger.warning(
                "publishing without validation_ssim: the retraining policy will have no "
                "expected SSIM level for this model"
            )
        if parent is ...:
            parent = self.parent_version
        meta: dict[str, Any] = {"preprocess": {"scale": self.count_scale}}
        if self.model_kwargs:  # so that a warm start or an adaptation can rebuild the network
            meta["model_kwargs"] = dict(self.model_kwargs)
        exposure = corpus_exposure(self.corpus)
        if exposure is not None:
            meta["preprocess"]["exposure_s"] = exposure
        if self.last_result is not None:
            meta["training"] = {**self.last_result.summary(), "increment": self.increment}
        meta.update(dict(extra or {}))
        uids = list(self.corpus.uids if training_data is None else training_data)
        files: dict[str, Path] = {}
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".export-") as tmp:
            tmp_path = Path(tmp)
            onnx_path = export_onnx(
                self.model, tmp_path / "model.onnx",
                metadata={"count_scale": repr(self.config.count_scale),
                          "training_scans": str(len(uids))},
            )
            files["model.onnx"] = onnx_path
            files["model.pt"] = save_state_dict(self.model, tmp_path / "model.pt")
            if self.probe_path is not None:
                files[PROBE_NAME] = self.probe_path
            if self.last_result is not None:
                for ext, path in self.last_result.curves.items():
                    if path.is_file():
                        files[f"{CURVES_STEM}.{ext}"] = path
            mv = registry.publish(
                files, parent=parent, training_data=uids, validation_ssim=validation_ssim,
                model=self.model_name, deploy=deploy, version=version, notes=notes, extra=meta,
            )
        self.parent_version = mv.version
        logger.info("published %s (parent %s, %d scans, validation SSIM %s)", mv.version,
                    parent, len(uids), validation_ssim)
        return mv

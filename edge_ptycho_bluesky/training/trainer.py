"""Continual training of PtychoNN on a growing corpus of labelled scans.

The recipe is the paper's (Babu, Zhou et al., Nat. Commun. 2023, Methods, "Neural network
training"): every time a scan's iterative phase becomes available its labelled pairs are appended
to the corpus, and the network is trained for a further 50 epochs on the *whole* corpus

* with Adam, minimising the mean absolute error (L1) between label and predicted phase;
* under a cyclic learning rate (Smith 2017), ``CyclicLR(mode="triangular2")`` from 1e-4 to
  5e-4 with a half cycle of 6 epochs (``step_size_up = 6 * steps_per_epoch`` iterations;
  ``cycle_momentum=False``: Adam has no momentum to cycle); the cycle restarts at each increment;
* holding out a fresh random 10 % of the corpus for validation at every epoch;
* keeping the model state with the lowest validation loss (the one that is deployed);
* warm-starting from the previous increment's model (or a registry version's ``model.pt``).

On a CUDA device the forward pass runs under ``torch.autocast`` (float16) with a ``GradScaler``;
on the CPU everything is float32. Data-parallel training over several processes (torchrun,
DDP) uses the same loop; see :mod:`edge_ptycho_bluesky.training.ddp`.

Input scaling
-------------
The network sees exactly what the inference engines see: frames go through
:func:`edge_ptycho_bluesky.model.preprocess` (128 x 128 float32 counts, no log, no
normalisation) with ``scale=config.count_scale``. The network is not invariant to the count
level, so the scale a model was trained with is part of the model: :meth:`ContinualTrainer.
export_and_publish` records it in the registry manifest as ``extra["preprocess"] =
{"scale": ...}``, and the edge worker must run ``preprocess(frames, scale=...)`` with that value
(multiplied by the exposure ratio ``t_train / t_frame``); the worker reads both from the manifest
(``exposure_s`` is recorded when the training scans record it) and each frame's exposure from its
``exposure_s`` attribute.
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

import argparse
import contextlib
import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from ..recon.labels import LabelledScan
from .corpus import TrainingCorpus, check_labelled_scan

if TYPE_CHECKING:
    from .registry import ModelRegistry, ModelVersion

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_BRIGHTEST",
    "CURVES_STEM",
    "DistInfo",
    "ContinualTrainer",
    "EpochRecord",
    "ScanEvaluation",
    "TrainConfig",
    "TrainResult",
    "add_subcommand",
    "auto_count_scale",
    "corpus_exposure",
    "evaluate_scan",
    "fit",
    "load_labelled_scan_from_tiled",
    "load_state_dict",
    "predict_phases",
    "prepare_inputs",
    "resolve_device",
    "save_curves",
    "triangular2_lr",
]

#: File stem of the loss curves written next to a training run (``curves.png/.json/.csv``).
CURVES_STEM = "curves"
_STATE_DEVICE = torch.device("cpu")

StateSource = Mapping[str, torch.Tensor] | str | os.PathLike[str]


# --------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))  # type: ignore[arg-type]
    )


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training increment (the paper's values by default).

    Parameters
    ----------
    epochs : int
        Epochs per increment, over the whole corpus (50).
    batch_size : int
        Global mini-batch size (64). With ``P`` data-parallel processes each takes
        ``batch_size / P`` samples per step, so it must be divisible by ``P``.
    lr_min, lr_max : float
        ``base_lr`` and ``max_lr`` of the triangular2 cycle (1e-4, 5e-4).
    half_cycle_epochs : float
        Half cycle in epochs (6); ``step_size_up = round(half_cycle_epochs * steps_per_epoch)``.
    val_fraction : float
        Fraction of the corpus drawn afresh as validation data every epoch (0.1); at least
        one sample is held out, at least one is trained on.
    seed : int
        Seeds the initial weights, the validation splits and the batch order.
    device : str
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    num_threads : int or None
        ``torch.set_num_threads`` during training (restored afterwards); None leaves it.
    amp : bool
        Mixed precision (float16 autocast + GradScaler) on CUDA; ignored on the CPU.
    count_scale : float, None or "auto"
        ``scale`` given to :func:`edge_ptycho_bluesky.model.preprocess` (see the module notes);
        None keeps raw counts; ``"auto"`` (default) is resolved from the first training data or
        from the warm-start version.
    progress : bool
        Show tqdm progress bars (epochs, and batches within an epoch).
    loss : {"mae", "mse"}
        Training loss: mean absolute error (the paper's) or mean squared error. On the simulated
        scans of this project MAE sits for tens of epochs on the median-phase plateau, MSE leaves
        it within a few (docs/benchmarks.md, "Training recipe").
    loss_window : float or None
        Count only the pixels within a centred disk of this radius (a fraction of the patch side,
        e.g. 0.3) with a soft 2-pixel edge, in the loss and in the validation MAE: the beam's
        footprint, the only part of a patch its diffraction pattern says anything about (the
        stitching weighs patches by the probe amplitude too). None: every pixel (the paper).
    augment : bool
        Train on each batch turned by a random one of the 8 rotations/reflections of the square
        (:func:`dihedral`), frames and labels together: exact for a probe with that symmetry
        (the simulated zone-plate probe), an approximation for a measured probe. Off in the paper.
    """

    epochs: int = 50
    batch_size: int = 64
    lr_min: float = 1e-4
    lr_max: float = 5e-4
    half_cycle_epochs: float = 6
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    num_threads: int | None = None
    amp: bool = True
    count_scale: float | str | None = "auto"
    progress: bool = True
    loss: str = "mae"
    loss_window: float | None = None
    augment: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not _is_real(self.lr_min) or self.lr_min <= 0:
            raise ValueError(f"TrainConfig.lr_min must be a positive number, got {self.lr_min!r}")
        if not _is_real(self.lr_max) or self.lr_max < self.lr_min:
            raise ValueError(
                f"TrainConfig.lr_max must be a number >= lr_min ({self.lr_min!r}), "
                f"got {self.lr_max!r}"
            )
        if not _is_real(self.half_cycle_epochs) or self.half_cycle_epochs <= 0:
            raise ValueError(
                f"TrainConfig.half_cycle_epochs must be a positive number of epochs (6 in the "
                f"paper), got {self.half_cycle_epochs!r}"
            )
        if not _is_real(self.val_fraction) or not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"TrainConfig.val_fraction must be in (0, 1), e.g. 0.1 for 10 %, "
                f"got {self.val_fraction!r}"
            )
        if not isinstance(self.device, str):
            raise TypeError(f"TrainConfig.device must be a str, got {self.device!r}")
        if self.device != "auto":
            try:
                dev = torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(
                    f"TrainConfig.device {self.device!r} is not a torch device; use 'auto', "
                    f"'cpu', 'cuda' or 'cuda:N'"
                ) from exc
            if dev.type not in ("cpu", "cuda"):
                raise ValueError(
                    f"TrainConfig.device must be 'auto', 'cpu' or a CUDA device, got "
                    f"{self.device!r}"
                )
        if self.num_threads is not None and (not _is_int(self.num_threads) or self.num_threads < 1):
            raise ValueError(
                f"TrainConfig.num_threads must be None or an integer >= 1, got {self.num_threads!r}"
            )
        if not all(isinstance(v, bool) for v in (self.amp, self.progress, self.augment)):
            raise TypeError("TrainConfig.amp, TrainConfig.progress and TrainConfig.augment must be bool")
        if self.count_scale not in (None, "auto") and (
            not _is_real(self.count_scale) or self.count_scale <= 0
        ):
            raise ValueError(
                f"TrainConfig.count_scale must be None (raw counts), 'auto' or a positive "
                f"number, got {self.count_scale!r}"
            )

        if self.loss not in ("mae", "mse"):
            raise ValueError(f"TrainConfig.loss must be 'mae' (the paper) or 'mse', got {self.loss!r}")
        if self.loss_window is not None and (not _is_real(self.loss_window) or not 0 < self.loss_window <= 1):
            raise ValueError(f"TrainConfig.loss_window must be None or a radius in (0, 1] as a fraction of the "
                             f"patch side (e.g. 0.3), got {self.loss_window!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are refused (ValueError naming them)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def with_updates(self, **changes: Any) -> TrainConfig:
        """A validated copy with some fields changed."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class EpochRecord:
    """Losses of one epoch.

    Attributes
    ----------
    epoch : int
        1-based epoch number within the increment.
    train_loss : float
        Mean absolute error (radians) over the epoch's training batches.
    val_loss : float
        Mean absolute error (radians) of the model at the end of the epoch on that epoch's
        validation split.
    lr : float
        Learning rate of the epoch's last optimiser step.
    time_s : float
        Wall time of the epoch (training and validation).
    """

    epoch: int
    train_loss: float
    val_loss: float
    lr: float
    time_s: float


@dataclass(frozen=True, eq=False)
class TrainResult:
    """Outcome of one training increment.

    Attributes
    ----------
    state_dict : dict of str to Tensor
        The best-validation weights (CPU tensors, a copy).
    best_val_loss : float
        Its validation loss (MAE, radians).
    best_epoch : int
        1-based epoch it was reached at.
    history : tuple of EpochRecord
        One record per epoch.
    samples_per_s : float
        Training throughput: samples through forward and backward per second of the
        optimisation steps (all processes together).
    time_s : float
        Wall time of the whole increment (training, validation, bookkeeping).
    lrs : (steps,) float64
        Learning rate of every optimiser step, in order (the triangular2 schedule).
    n_train, n_val : int
        Training and validation samples per epoch.
    steps_per_epoch : int
        Optimiser steps per epoch.
    world_size : int
        Data-parallel processes.
    device : str
        Device trained on.
    count_scale : float or None
        The input scale used (see the module notes).
    config : TrainConfig
        The settings.
    curves : dict of str to Path
        Files the loss curves were written to (``png``, ``json``, ``csv``); empty when none.
    """

    state_dict: dict[str, torch.Tensor] = field(repr=False)
    best_val_loss: float
    best_epoch: int
    history: tuple[EpochRecord, ...] = field(repr=False)
    samples_per_s: float
    time_s: float
    lrs: NDArray[np.float64] = field(repr=False)
    n_train: int
    n_val: int
    steps_per_epoch: int
    world_size: int
    device: str
    count_scale: float | None
    config: TrainConfig = field(repr=False)
    curves: dict[str, Path] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary (no weights, no per-step learning rates)."""
        return {
            "best_val_loss": self.best_val_loss,
            "best_epoch": self.best_epoch,
            "epochs": len(self.history),
            "samples_per_s": self.samples_per_s,
            "time_s": self.time_s,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world_size,
            "device": self.device,
            "count_scale": self.count_scale,
            "config": self.config.to_dict(),
        }

    def to_json_dict(self) -> dict[str, Any]:
        """:meth:`summary` plus the history and the per-step learning rates."""
        return {
            **self.summary(),
            "history": [asdict(r) for r in self.history],
            "lrs": [float(v) for v in self.lrs],
        }

    @classmethod
    def from_json_dict(
        cls, data: Mapping[str, Any], state_dict: dict[str, torch.Tensor]
    ) -> TrainResult:
        """Inverse of :meth:`to_json_dict` (with the weights loaded separately)."""
        return cls(
            state_dict=state_dict,
            best_val_loss=float(data["best_val_loss"]),
            best_epoch=int(data["best_epoch"]),
            history=tuple(EpochRecord(**r) for r in data["history"]),
            samples_per_s=float(data["samples_per_s"]),
            time_s=float(data["time_s"]),
            lrs=np.asarray(data["lrs"], dtype=np.float64),
            n_train=int(data["n_train"]),
            n_val=int(data["n_val"]),
            steps_per_epoch=int(data["steps_per_epoch"]),
            world_size=int(data["world_size"]),
            device=str(data["device"]),
            count_scale=data["count_scale"],
            config=TrainConfig.from_dict(data["config"]),
        )


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel group (``rank 0 of 1`` when not distributed).

    Attributes
    ----------
    rank : int
        Global rank.
    world_size : int
        Number of processes.
    local_rank : int
        Rank on this machine (selects the CUDA device).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not (_is_int(self.world_size) and self.world_size >= 1):
            raise ValueError(f"world_size must be an integer >= 1, got {self.world_size!r}")
        if not (_is_int(self.rank) and 0 <= self.rank < self.world_size):
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank!r}")

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that logs and saves."""
        return self.rank == 0


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else ``cpu``.

    Raises
    ------
    ValueError
        When a CUDA device is asked for and torch sees none.
    """
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else _STATE_DEVICE
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU; use 'cpu'")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def triangular2_lr(
    step: int | NDArray[np.integer], lr_min: float, lr_max: float, step_size_up: int
) -> NDArray[np.float64]:
    """The learning rate of ``CyclicLR(mode="triangular2")`` at optimiser step ``step``.

    ``lr = lr_min + (lr_max - lr_min) * max(0, 1 - x) / 2**(cycle - 1)`` with
    ``cycle = floor(1 + step / (2 * step_size_up))`` and
    ``x = |step / step_size_up - 2 * cycle + 1|`` (Smith 2017; step counted from 0).
    """
    it = np.asarray(step, dtype=np.float64)
    cycle = np.floor(1 + it / (2 * step_size_up))
    x = np.abs(it / step_size_up - 2 * cycle + 1)
    return lr_min + (lr_max - lr_min) * np.maximum(0.0, 1.0 - x) / 2.0 ** (cycle - 1)


#: ``count_scale="auto"`` brings the brightest training pixel to about this value.
AUTO_BRIGHTEST: float = 100.0


#: Rolls (rows, cols) that put the zero frequency of an fftshifted pattern back at (N/2, N/2)
#: after ``rot90(k)`` and an optional left-right flip (checked against FFTs of turned fields).
_DIHEDRAL_ROLLS = {(0, False): (0, 0), (0, True): (0, 1), (1, False): (1, 0), (1, True): (1, 1),
                   (2, False): (1, 1), (2, True): (1, 0), (3, False): (0, 1), (3, True): (0, 0)}


def dihedral(frames: torch.Tensor, phases: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a batch of ``(N, 1, H, W)`` frames and phase labels by symmetry ``k`` in 0..7 of the square.

    ``k % 4`` quarter turns, then a left-right flip when ``k >= 4``. The phase is turned as an
    image; the frame as the far-field intensity of the turned exit wave, i.e. turned and rolled
    by one pixel where the fftshifted zero frequency (at index ``N/2``) would move.
    """
    turns, flip = k % 4, k >= 4
    frames, phases = torch.rot90(frames, turns, (2, 3)), torch.rot90(phases, turns, (2, 3))
    if flip:
        frames, phases = torch.flip(frames, (3,)), torch.flip(phases, (3,))
    return torch.roll(frames, _DIHEDRAL_ROLLS[turns, flip], (2, 3)), phases


def loss_window(shape: tuple[int, int], radius: float | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(1, 1, H, W)`` pixel weights of the loss: a centred disk of ``radius`` x the patch side
    with a soft 2-pixel edge, or all ones when ``radius`` is None (see ``TrainConfig.loss_window``)."""
    if radius is None:
        return torch.ones((1, 1, *shape), device=device)
    rows, cols = (torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in shape)
    r = torch.sqrt(rows[:, None] ** 2 + cols[None, :] ** 2)
    return torch.sigmoid((radius * max(shape) - r) / 2.0)[None, None].to(device)


def auto_count_scale(frames: ArrayLike) -> float:
    """The input scale that brings the brightest (binned) pixel of ``frames`` to ~100.

    Rounded to one significant figure so that it reads well in manifests and logs.

    Raises
    ------
    ValueError
        When every pixel is zero or negative (no counts to scale).
    """
    brightest = float(np.max(prepare_inputs(frames)))
    if not brightest > 0:
        raise ValueError("the training frames hold no counts (brightest pixel <= 0): "
                         "count_scale='auto' cannot pick a scale; check the detector data")
    return float(f"{AUTO_BRIGHTEST / brightest:.1g}")


def prepare_inputs(frames: ArrayLike, count_scale: float | None = None) -> NDArray[np.float32]:
    """Network input from frames, exactly as the inference engines get it.

    Parameters
    ----------
    frames : (N, H, W) counts
        Any shape :func:`edge_ptycho_bluesky.model.preprocess` turns into 128 x 128.
    count_scale : float or None
        ``scale`` of ``preprocess``.

    Returns
    -------
    (N, 1, 128, 128) float32
    """
    from ..model import preprocess

    return preprocess(frames, scale=count_scale)


def load_state_dict(source: StateSource) -> dict[str, torch.Tensor]:
    """Weights from a state dict, or a ``.pt`` file read with ``torch.load(weights_only=True)``.

    ``module.`` prefixes (DDP/DataParallel checkpoints) are removed; tensors are copied to the
    CPU.

    Raises
    ------
    FileNotFoundError
        When the file does not exist.
    TypeError
        When ``source`` is neither a mapping nor a path, or the file holds no state dict.
    """
    if isinstance(source, Mapping):
        obj: Any = source
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no weights file at {path}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise TypeError(
            f"initial state must be a state dict or a path to a .pt file, got "
            f"{type(source).__name__}"
        )
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise TypeError(
            "the initial state is not a state dict (a mapping of parameter names to tensors); "
            "save weights with torch.save(model.state_dict(), path)"
        )
    return {str(k).removeprefix("module."): v.detach().to("cpu").clone() for k, v in obj.items()}


def _copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _progress(iterable: Any, *, enabled: bool, **kwargs: Any) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, **kwargs)


# --------------------------------------------------------------------------------------------
# The training loop (single process and DDP)
# --------------------------------------------------------------------------------------------


def _split_sizes(n: int, val_fraction: float) -> tuple[int, int]:
    if n < 2:
        raise ValueError(
            f"training needs at least 2 labelled frames (one to train, one to validate), got {n}"
        )
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return n - n_val, n_val


def _all_reduce_sum(values: list[float], dist_info: DistInfo, device: torch.device) -> list[float]:
    if not dist_info.distributed:
        return values
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def fit(
    model: nn.Module,
    inputs: torch.Tensor | NDArray[np.float32],
    labels: torch.Tensor | NDArray[np.float32],
    config: TrainConfig = TrainConfig(),
    *,
    initial_state: StateSource | None = None,
    dist_info: DistInfo = DistInfo(),
    split_seed: int | None = None,
    curves_dir: str | os.PathLike[str] | None = None,
    description: str = "train",
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` on preprocessed inputs and label phases; keep the best-validation state.

    The model is trained in place and, on return, holds the best-validation weights.

    Parameters
    ----------
    model : torch.nn.Module
        Maps ``(B, 1, 128, 128)`` inputs to the phase ``(B, 1, 128, 128)`` (or a tuple whose
        last element is the phase). Must not be wrapped in DDP yet: with ``dist_info.world_size
        > 1`` the process group must be initialised and the model is wrapped here.
    inputs : (N, 1, 128, 128) float32
        Network input (:func:`prepare_inputs`), on the CPU.
    labels : (N, 1, 128, 128) or (N, 128, 128) float32
        Label phases (radians).
    config : TrainConfig
        Settings; ``config.count_scale`` is only recorded (``inputs`` are already scaled).
    initial_state : state dict or path, optional
        Warm start: weights loaded before training.
    dist_info : DistInfo
        This process's rank and the world size. Every rank must pass the same data.
    split_seed : int, optional
        Seed of the per-epoch validation splits and batch orders (default ``config.seed``);
        the same on every rank.
    curves_dir : path-like, optional
        Where rank 0 writes ``curves.png``, ``curves.json`` and ``curves.csv``.
    description : str
        Label of the progress bar.
    on_epoch : callable, optional
        Called with each :class:`EpochRecord` (on every rank).

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Mismatched shapes, fewer than 2 samples, a batch size not divisible by the world size.
    """
    from torch.utils.data.distributed import DistributedSampler

    t_start = time.perf_counter()
    x = torch.as_tensor(inputs)
    y = torch.as_tensor(labels)
    if y.ndim == 3:
        y = y[:, None]
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"inputs must be (N, 1, H, W), got {tuple(x.shape)}; use prepare_inputs()")
    if y.shape != x.shape:
        raise ValueError(f"labels {tuple(y.shape)} must match inputs {tuple(x.shape)}")
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise TypeError(f"inputs and labels must be float32, got {x.dtype} and {y.dtype}")
    world, rank = dist_info.world_size, dist_info.rank
    if config.batch_size % world:
        raise ValueError(
            f"batch_size {config.batch_size} is not divisible by the {world} processes; the "
            f"global batch is split evenly, pick a multiple of {world}"
        )
    local_batch = config.batch_size // world
    n_train, n_val = _split_sizes(len(x), config.val_fraction)
    per_rank = math.ceil(n_train / world)
    steps_per_epoch = math.ceil(per_rank / local_batch)
    step_size_up = max(1, round(config.half_cycle_epochs * steps_per_epoch))
    device = resolve_device(config.device, dist_info.local_rank)
    use_amp = config.amp and device.type == "cuda"
    seed = config.seed if split_seed is None else int(split_seed)

    with _torch_threads(config.num_threads):
        if initial_state is not None:
            model.load_state_dict(load_state_dict(initial_state), strict=True)
        model.to(device)
        net: nn.Module = model
        if dist_info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            net = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None
            )
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_min)
        scheduler = torch.optim.lr_scheduler.CyclicLR(
            optimizer,
            base_lr=config.lr_min,
            max_lr=config.lr_max,
            step_size_up=step_size_up,
            mode="triangular2",
            cycle_momentum=False,
        )
        scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
        window = loss_window(tuple(y.shape[-2:]), config.loss_window, device)

        def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            err = (pred - target).abs() if config.loss == "mae" else (pred - target) ** 2
            return (err * window).sum() / (window.sum() * len(pred))

        from ..model import phase_of

        def forward(xb: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                return phase_of(net(xb)).float()

        history: list[EpochRecord] = []
        lrs: list[float] = []
        best_state = _copy_state(model)
        best_val, best_epoch = math.inf, 0
        train_time = 0.0
        bar = _progress(
            range(1, config.epochs + 1),
            enabled=config.progress and dist_info.is_main,
            desc=description,
            unit="epoch",
            file=sys.stderr,
        )
        for epoch in bar:
            t_epoch = time.perf_counter()
            # A fresh random validation split, identical on every rank.
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            aug_rng = torch.Generator().manual_seed(seed * 1_000_003 + epoch + rank * 7_919 + 1)
            perm = torch.randperm(len(x), generator=g)
            val_idx, train_idx = perm[:n_val], perm[n_val:]
            sampler = DistributedSampler(
                train_idx, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
            )
            sampler.set_epoch(epoch)
            local = train_idx[torch.as_tensor(list(iter(sampler)), dtype=torch.long)]
            batches = list(torch.split(local, local_batch))

            net.train()
            loss_sum, seen = 0.0, 0
            t_train = time.perf_counter()
            inner = _progress(
                batches,
                enabled=config.progress and dist_info.is_main,
                desc=f"epoch {epoch}",
                unit="batch",
                leave=False,
                file=sys.stderr,
            )
            for idx in inner:
                xb = x[idx].to(device, non_blocking=True)
                yb = y[idx].to(device, non_blocking=True)
                if config.augment:
                    xb, yb = dihedral(xb, yb, int(torch.randint(8, (1,), generator=aug_rng)))
                lrs.append(float(optimizer.param_groups[0]["lr"]))
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(forward(xb), yb)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                loss_sum += float(loss.detach()) * len(idx)
                seen += len(idx)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_time += time.perf_counter() - t_train

            net.eval()
            abs_sum, pix = 0.0, 0
            with torch.no_grad():
                for idx in torch.split(val_idx[rank::world], max(local_batch, 1)):
                    xb = x[idx].to(device)
                    yb = y[idx].to(device)
                    abs_sum += float(((forward(xb) - yb).abs() * window).sum(dtype=torch.float64))
                    pix += float(window.sum()) * len(yb)
            loss_sum, seen, abs_sum, pix_f = _all_reduce_sum(
                [loss_sum, float(seen), abs_sum, float(pix)], dist_info, device
            )
            record = EpochRecord(
                epoch=epoch,
                train_loss=loss_sum / max(seen, 1.0),
                val_loss=abs_sum / max(pix_f, 1.0),
                lr=lrs[-1],
                time_s=time.perf_counter() - t_epoch,
            )
            history.append(record)
            if record.val_loss < best_val:
                best_val, best_epoch = record.val_loss, epoch
                best_state = _copy_state(model)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(train=f"{record.train_loss:.4f}", val=f"{record.val_loss:.4f}",
                                best=best_epoch)
            logger.debug(
                "%s epoch %d: train %.5f val %.5f lr %.2e (%.1f s)",
                description, epoch, record.train_loss, record.val_loss, record.lr, record.time_s,
            )
            if on_epoch is not None:
                on_epoch(record)
        model.load_state_dict(best_state)
    total_trained = n_train * config.epochs
    result = TrainResult(
        state_dict=best_state,
        best_val_loss=best_val,
        best_epoch=best_epoch,
        history=tuple(history),
        samples_per_s=total_trained / train_time if train_time > 0 else float("nan"),
        time_s=time.perf_counter() - t_start,
        lrs=np.asarray(lrs, dtype=np.float64),
        n_train=n_train,
        n_val=n_val,
        steps_per_epoch=steps_per_epoch,
        world_size=world,
        device=str(device),
        count_scale=config.count_scale,
        config=config,
    )
    if curves_dir is not None and dist_info.is_main:
        paths = save_curves(result, curves_dir)
        result.curves.update(paths)
    logger.info(
        "%s: %d epochs on %d samples (+%d validation) in %.1f s, %.1f samples/s on %s x%d; "
        "best validation MAE %.4f rad at epoch %d",
        description, config.epochs, n_train, n_val, result.time_s, result.samples_per_s,
        device, world, best_val, best_epoch,
    )
    return result


# --------------------------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------------------------


def save_curves(
    result: TrainResult, directory: str | os.PathLike[str], stem: str = CURVES_STEM
) -> dict[str, Path]:
    """Write the loss curves as a PNG picture (matplotlib, Agg) and as data (JSON and CSV).

    Parameters
    ----------
    result : TrainResult
    directory : path-like
        Created if needed.
    stem : str
        File name stem.

    Returns
    -------
    dict
        ``{"png": Path, "json": Path, "csv": Path}``. The CSV has the columns ``epoch,
        train_loss, val_loss, lr, time_s``; the JSON holds :meth:`TrainResult.to_json_dict`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {ext: directory / f"{stem}.{ext}" for ext in ("png", "json", "csv")}
    paths["json"].write_text(json.dumps(result.to_json_dict(), indent=1), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "train_loss", "val_loss", "lr", "time_s"])
        for r in result.history:
            writer.writerow([r.epoch, f"{r.train_loss:.8g}", f"{r.val_loss:.8g}", f"{r.lr:.8g}",
                             f"{r.time_s:.4g}"])

    epochs = [r.epoch for r in result.history]
    fig = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, [r.train_loss for r in result.history], "o-", ms=3, label="training")
    ax.plot(epochs, [r.val_loss for r in result.history], "s-", ms=3, label="validation")
    if result.best_epoch:
        ax.plot([result.best_epoch], [result.best_val_loss], "k*", ms=12,
                label=f"best (epoch {result.best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean absolute error (rad)")
    if all(r.train_loss > 0 and r.val_loss > 0 for r in result.history):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    if len(result.lrs):
        steps = np.arange(1, len(result.lrs) + 1) / max(result.steps_per_epoch, 1)
        lr_ax.plot(steps, result.lrs, color="0.6", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="0.4")
    handles, names = ax.get_legend_handles_labels()
    h2, n2 = lr_ax.get_legend_handles_labels()
    ax.legend(handles + h2, names + n2, loc="upper right", fontsize="small")
    ax.set_title(
        f"{result.n_train} training + {result.n_val} validation samples, "
        f"{result.samples_per_s:.0f} samples/s on {result.device} x{result.world_size}",
        fontsize="small",
    )
    fig.savefig(paths["png"])
    return paths


# --------------------------------------------------------------------------------------------
# Inference and evaluation
# --------------------------------------------------------------------------------------------


def predict_phases(
    model: nn.Module,
    frames: ArrayLike,
    *,
    count_scale: float | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> NDArray[np.float32]:
    """Phase predicted by a torch model for raw frames (``preprocess`` applied first).

    Parameters
    ----------
    model : torch.nn.Module
    frames : (N, H, W) counts
    count_scale : float or None
        The scale the model was trained with.
    batch_size : int
    device : str

    Returns
    -------
    (N, 128, 128) float32
        Radians.
    """
    from ..model import phase_of

    x = torch.from_numpy(prepare_inputs(frames, count_scale))
    dev = resolve_device(device)
    was_training = model.training
    model.eval()
    orig = next(model.parameters()).device
    model.to(dev)
    out = []
    try:
        with torch.inference_mode():
            for xb in torch.split(x, batch_size):
                out.append(phase_of(model(xb.to(dev))).float().cpu())
    finally:
        model.to(orig)
        model.train(was_training)
    return torch.cat(out)[:, 0].numpy()


@dataclass(frozen=True, eq=False)
class ScanEvaluation:
    """Quality of a model's phase against the labels of one scan.

    Attributes
    ----------
    scan_uid : str
    n_frames : int
    ssim : float
        Mean per-patch SSIM (each 128 x 128 patch against its label, offsets removed, one
        ``data_range`` for the scan: the labels' range).
    mae : float
        Mean absolute error in radians over all patches (what the training minimises).
    stitched_ssim : float or None
        SSIM of the stitched prediction against the stitched labels over the covered region
        (the figure the retraining policy compares), None when ``stitched=False``.
    patch_ssim : (N,) float64
    patch_mae : (N,) float64
    data_range : float
    """

    scan_uid: str
    n_frames: int
    ssim: float
    mae: float
    stitched_ssim: float | None
    patch_ssim: NDArray[np.float64] = field(repr=False)
    patch_mae: NDArray[np.float64] = field(repr=False)
    data_range: float = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no per-patch arrays)."""
        return {
            "scan_uid": self.scan_uid,
            "n_frames": self.n_frames,
            "ssim": self.ssim,
            "mae": self.mae,
            "stitched_ssim": self.stitched_ssim,
            "data_range": self.data_range,
        }


def evaluate_scan(
    model: nn.Module | StateSource,
    scan: LabelledScan,
    *,
    model_name: str = "ptychonn2",
    count_scale: float | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    stitched: bool = True,
    weight: ArrayLike | None = None,
    data_range: float | None = None,
) -> ScanEvaluation:
    """Compare a model's predicted phases with the label phases of a labelled scan.

    Parameters
    ----------
    model : torch.nn.Module, state dict or path to a ``.pt`` file
        A state dict or file is loaded into ``build_model(model_name)``.
    scan : LabelledScan
        Frames, label phases and positions (``recon.labels``).
    model_name : str
        Architecture when ``model`` is weights.
    count_scale : float or None
        Input scale the model was trained with.
    batch_size, device
        Inference settings.
    stitched : bool
        Also stitch predictions and labels at the scan positions and compare the images.
    weight : (128, 128) float, optional
        Stitching weight map, e.g. the probe amplitude (see :func:`~edge_ptycho_bluesky.
        stitching.stitch`); None: plain average.
    data_range : float or None
        SSIM dynamic range; None: ``max - min`` of the scan's labels (2 pi if constant).

    Returns
    -------
    ScanEvaluation
    """
    check_labelled_scan(scan)
    if not isinstance(model, nn.Module):
        from ..model import build_model

        net = build_model(model_name)
        net.load_state_dict(load_state_dict(model))
        model = net
    from ..metrics import ssim

    labels = np.asarray(scan.phases, dtype=np.float32)
    pred = predict_phases(model, scan.frames, count_scale=count_scale, batch_size=batch_size,
                          device=device)
    if data_range is None:
        span = float(labels.max() - labels.min())
        data_range = span if span > 0 else 2 * math.pi
    patch_ssim = np.array([ssim(lab, p, data_range=data_range) for lab, p in zip(labels, pred,
                                                                                strict=True)])
    patch_mae = np.abs(pred - labels).mean(axis=(1, 2), dtype=np.float64)
    stitched_ssim = None
    if stitched:
        from ..stitching import stitch

        positions = np.asarray(scan.positions, dtype=np.float64)
        label_img, cov = stitch(labels, positions, weight=weight)
        pred_img, _ = stitch(pred, positions, weight=weight)
        mask = cov > 0
        stitched_ssim = float(ssim(label_img, pred_img, mask, data_range=data_range))
    return ScanEvaluation(
        scan_uid=scan.scan_uid,
        n_frames=len(labels),
        ssim=float(patch_ssim.mean()),
        mae=float(patch_mae.mean()),
        stitched_ssim=stitched_ssim,
        patch_ssim=patch_ssim,
        patch_mae=patch_mae,
        data_range=float(data_range),
    )


# --------------------------------------------------------------------------------------------
# The continual trainer
# --------------------------------------------------------------------------------------------


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
        return _copy_state(self.model)

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
        from .registry import ModelRegistry

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
            from .ddp import run_torchrun

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
        from .registry import ModelRegistry

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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def load_labelled_scan_from_tiled(uid: str, *, client: Any = None, rpie_iterations: int | None = None) -> LabelledScan:
    """The labelled scan of a stored raw scan, by uid, from the configured Tiled
    (:meth:`~edge_ptycho_bluesky.storage.StorageConfig.from_env`): its labels stored in Tiled when
    there are some, else rPIE of the scan (see :func:`~edge_ptycho_bluesky.training.jobs.label_run`).
    ``client``: a Tiled client to reuse (default: connect to the configured one).

    Raises
    ------
    KeyError
        No run with that uid.
    ValueError
        The run was not recorded by the edge_ptycho plans.
    StorageError
        Tiled cannot be reached.
    """
    from ..storage import StorageConfig, connect, get_run
    from .jobs import label_run

    client = client if client is not None else connect(StorageConfig.from_env())
    run = get_run(client, uid)
    labelled, source = label_run(client, run, rpie_iterations=rpie_iterations)
    logger.info("scan %s: %d labelled frames (%s)", uid, len(labelled), source)
    return labelled


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho train``."""
    from .registry import add_registry_argument

    p = subparsers.add_parser(
        "train",
        help="train PtychoNN on labelled scans and publish it into the model registry",
        description="Train one increment (Adam, L1 by default, triangular2 cyclic LR, fresh 10 %% "
        "validation split per epoch, best-validation model kept) on labelled scan files, "
        "warm-starting from the deployed model, and publish the result (ONNX + model.pt).",
    )
    p.add_argument("--corpus", nargs="+", type=Path, default=[], metavar="FILE",
                   help="labelled scan files (edge_ptycho_bluesky.recon.labels)")
    p.add_argument("--scan", action="append", default=[], metavar="UID",
                   help="a stored scan (in the Tiled of EDGE_PTYCHO_DATA_DIR / EDGE_PTYCHO_TILED_URI) to "
                        "add: its labels stored in Tiled, else rPIE labels made now (repeatable)")
    p.add_argument("--rpie-iterations", type=int, default=None, metavar="N",
                   help="rPIE iterations for --scan runs without stored labels (default: rPIE's)")
    add_registry_argument(p)
    p.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="folder for curves and exports (default: a temporary folder)")
    p.add_argument("--model", default="ptychonn2", choices=("ptychonn2", "ptychonn2-fast"),
                   help="architecture (default: %(default)s; ptychonn2-fast: the CPU-sized variant)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--loss", default=TrainConfig.loss, choices=("mae", "mse"),
                   help="training loss (default: %(default)s, the paper's)")
    p.add_argument("--loss-window", type=float, default=None, metavar="R",
                   help="count only a centred disk of radius R x the patch side (the beam), e.g. 0.3")
    p.add_argument("--augment", action="store_true",
                   help="random rotations/reflections of frames and labels (exact for a symmetric probe)")
    p.add_argument("--lr-min", type=float, default=TrainConfig.lr_min)
    p.add_argument("--lr-max", type=float, default=TrainConfig.lr_max)
    p.add_argument("--seed", type=int, default=TrainConfig.seed)
    p.add_argument("--count-scale", type=_count_scale_arg, default="auto", metavar="auto|none|X",
                   help="input scale given to preprocess: a number, 'none' (raw counts) or "
                   "'auto' (default: the deployed model's recorded scale when warm-starting, "
                   "else the brightest training pixel -> ~100)")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction, default=True,
                   help="start from the deployed model's model.pt (default: yes)")
    p.add_argument("--ddp-procs", type=int, default=1, metavar="N",
                   help="data-parallel processes under torchrun (default: 1, no DDP)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch threads (single process)")
    p.add_argument("--validate", type=Path, default=None, metavar="FILE",
                   help="held-out labelled scan that gives the recorded validation SSIM "
                   "(default: the last corpus scan, which is in the training data)")
    p.add_argument("--no-deploy", action="store_true", help="publish without deploying")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _count_scale_arg(text: str) -> float | str | None:
    if text.lower() in ("auto", "none"):
        return None if text.lower() == "none" else "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--count-scale takes a number, 'none' or 'auto', got {text!r}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from ..storage import StorageError
    from .corpus import load_labelled_files
    from .registry import ModelRegistry, RegistryError

    try:
        scans = load_labelled_files(args.corpus)
        if args.scan:
            from ..storage import connect

            client = connect()  # once for every --scan (an embedded catalog takes seconds to open)
            scans += [load_labelled_scan_from_tiled(uid, client=client, rpie_iterations=args.rpie_iterations)
                      for uid in args.scan]
        if not scans:
            raise ValueError("no training data: pass --corpus FILE ... or --scan UID")
        registry = ModelRegistry(args.registry)
        scale = args.count_scale
        config = TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, device=args.device,
            num_threads=args.threads, count_scale=scale, progress=not args.no_progress, loss=args.loss,
            loss_window=args.loss_window, augment=args.augment, lr_min=args.lr_min, lr_max=args.lr_max,
        )
        with contextlib.ExitStack() as stack:
            workdir = args.workdir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            trainer = ContinualTrainer(args.model, config, workdir)
            for scan in scans:
                trainer.add_scan(scan)
            if args.warm_start:
                trainer.warm_start_from_registry(registry)
            result = trainer.train(nproc=args.ddp_procs)
            held_out = load_labelled_files([args.validate])[-1] if args.validate else scans[-1]
            quality = trainer.evaluate(held_out)
            mv = trainer.export_and_publish(
                registry, validation_ssim=_clip_ssim(quality.stitched_ssim),
                deploy=not args.no_deploy,
                extra={"validation_scan": held_out.scan_uid,
                       "validation_held_out": args.validate is not None},
            )
    except (ValueError, TypeError, KeyError, FileNotFoundError, RegistryError, StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"trained {result.n_train + result.n_val} frames x {len(result.history)} epochs in "
        f"{result.time_s:.1f} s ({result.samples_per_s:.1f} samples/s); best validation MAE "
        f"{result.best_val_loss:.4f} rad at epoch {result.best_epoch}; SSIM on "
        f"{held_out.scan_uid}: {quality.stitched_ssim:.3f}; published {mv.version}"
        f"{'' if args.no_deploy else ' (deployed)'}"
    )
    return 0


def _clip_ssim(value: float | None) -> float | None:
    """The registry wants SSIM in (0, 1]; a useless model may score <= 0."""
    if value is None:
        return None
    return float(min(1.0, max(value, 1e-6)))

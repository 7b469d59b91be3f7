"""Settings and records of a training run: :class:`TrainConfig` (one increment's settings),
:class:`EpochRecord` (one epoch's losses), :class:`TrainResult` (an increment's outcome) and
:class:`DistInfo` (this process's place in a data-parallel group)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from ..options import check_known_keys, is_real

__all__ = ["LOSSES", "DistInfo", "EpochRecord", "TrainConfig", "TrainResult"]

#: Every value of :attr:`TrainConfig.loss`.
LOSSES: tuple[str, ...] = ("mae", "mse", "physics", "mae+physics")


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


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
        ``scale`` given to :func:`edge_ptycho_bluesky.model.preprocess` (see "Input scaling" in
        :mod:`edge_ptycho_bluesky.training.continual`);
        None keeps raw counts; ``"auto"`` (default) is resolved from the first training data or
        from the warm-start version.
    progress : bool
        Show tqdm progress bars (epochs, and batches within an epoch).
    loss : {"mae", "mse", "physics", "mae+physics"}
        Training loss: mean absolute error (the paper's) or mean squared error against the label
        phases (on the simulated scans of this project MAE sits for tens of epochs on the
        median-phase plateau, MSE leaves it within a few: docs/benchmarks.md, "Training recipe");
        ``"physics"``: the Poisson deviance of each frame's counts under the predicted phase
        (:mod:`~edge_ptycho_bluesky.training.physics`; no labels needed: the "labels" only fix
        each patch's constant phase offset, e.g. the starting model's own predictions), validated
        by the same loss on the held-out frames; ``"mae+physics"``: MAE plus ``physics_weight`` x
        the physics loss. The physics losses need the probe (``fit(..., probe=)``).
    physics_weight : float
        Weight of the physics term in ``"mae+physics"``.
    consistency_weight : float
        With a physics loss: weight of the agreement of overlapping predictions
        (:func:`~edge_ptycho_bluesky.training.physics.overlap_consistency`; needs the frames'
        window positions, ``fit(..., positions=)``); 0: off.
    time_budget_s : float or None
        Stop training once this many seconds have passed (checked after every batch; the best
        validated state so far is kept); None: run every epoch.
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
    physics_weight: float = 1.0
    consistency_weight: float = 0.0
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be an integer >= 0, got {self.seed!r}")
        if not is_real(self.lr_min) or self.lr_min <= 0:
            raise ValueError(f"TrainConfig.lr_min must be a positive number, got {self.lr_min!r}")
        if not is_real(self.lr_max) or self.lr_max < self.lr_min:
            raise ValueError(
                f"TrainConfig.lr_max must be a number >= lr_min ({self.lr_min!r}), "
                f"got {self.lr_max!r}"
            )
        if not is_real(self.half_cycle_epochs) or self.half_cycle_epochs <= 0:
            raise ValueError(
                f"TrainConfig.half_cycle_epochs must be a positive number of epochs (6 in the "
                f"paper), got {self.half_cycle_epochs!r}"
            )
        if not is_real(self.val_fraction) or not 0.0 < self.val_fraction < 1.0:
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
            not is_real(self.count_scale) or self.count_scale <= 0
        ):
            raise ValueError(
                f"TrainConfig.count_scale must be None (raw counts), 'auto' or a positive "
                f"number, got {self.count_scale!r}"
            )

        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES} ('mae': the paper's), got {self.loss!r}")
        if self.uses_physics and self.augment:
            raise ValueError("TrainConfig.augment turns frames and labels but not the probe: it cannot be "
                             "used with a physics loss")
        for name in ("physics_weight", "consistency_weight"):
            if not is_real(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be a number >= 0, got {getattr(self, name)!r}")
        if self.time_budget_s is not None and (not is_real(self.time_budget_s) or self.time_budget_s <= 0):
            raise ValueError(f"TrainConfig.time_budget_s must be None or a positive number of seconds, "
                             f"got {self.time_budget_s!r}")
        if self.loss_window is not None and (not is_real(self.loss_window) or not 0 < self.loss_window <= 1):
            raise ValueError(f"TrainConfig.loss_window must be None or a radius in (0, 1] as a fraction of the "
                             f"patch side (e.g. 0.3), got {self.loss_window!r}")

    @property
    def uses_physics(self) -> bool:
        """Whether the loss needs the probe and the frames' counts."""
        return "physics" in self.loss

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Build from a mapping; unknown keys are refused (ValueError naming them)."""
        check_known_keys("TrainConfig", data, {f.name for f in fields(cls)})
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
        The input scale used (see "Input scaling" in :mod:`edge_ptycho_bluesky.training.continual`).
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

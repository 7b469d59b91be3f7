"""The training loop of PtychoNN: :func:`fit` and its helpers.

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
DDP) uses the same loop; see :mod:`edge_ptycho_bluesky.training.ddp`. The continual trainer
that grows the corpus and publishes the models is :mod:`edge_ptycho_bluesky.training.continual`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import ArrayLike, NDArray
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from ..model.contract import InputContract
from .config import DistInfo, EpochRecord, TrainConfig, TrainResult
from .curves import save_curves
from .physics import overlap_consistency, physics_loss

logger = logging.getLogger(__name__)

__all__ = [
    "AUTO_BRIGHTEST",
    "StateSource",
    "auto_count_scale",
    "copy_state",
    "dihedral",
    "fit",
    "load_state_dict",
    "loss_window",
    "prepare_inputs",
    "resolve_device",
    "triangular2_lr",
]

_STATE_DEVICE = torch.device("cpu")

StateSource = Mapping[str, torch.Tensor] | str | os.PathLike[str]


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
    """Network input from training frames: the :class:`~edge_ptycho_bluesky.model.contract.InputContract`
    of a model with this count scale, exactly as the edge worker and validation prepare frames.

    Parameters
    ----------
    frames : (N, H, W) counts
        Any shape :func:`edge_ptycho_bluesky.model.preprocess.preprocess` turns into 128 x 128.
    count_scale : float or None
        The model's count scale.

    Returns
    -------
    (N, 1, 128, 128) float32
    """
    return InputContract(scale=count_scale).prepare(frames)


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


def copy_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's weights (detached tensors)."""
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
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


@dataclass(frozen=True)
class _FitPlan:
    """The data, sizes and device of one :func:`fit`, checked before anything is trained."""

    x: torch.Tensor
    y: torch.Tensor
    config: TrainConfig
    dist_info: DistInfo
    local_batch: int
    n_train: int
    n_val: int
    steps_per_epoch: int
    step_size_up: int
    device: torch.device
    use_amp: bool
    seed: int
    probe: torch.Tensor | None
    positions: torch.Tensor | None
    deadline: float | None


def _plan_fit(
    inputs: torch.Tensor | NDArray[np.float32],
    labels: torch.Tensor | NDArray[np.float32],
    config: TrainConfig,
    dist_info: DistInfo,
    split_seed: int | None,
    probe: ArrayLike | None = None,
    positions: ArrayLike | None = None,
) -> _FitPlan:
    """Check the data and the batch size against the world size; work out the epoch's sizes."""
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
    world = dist_info.world_size
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
    probe_t = None
    if config.uses_physics:
        if probe is None:
            raise ValueError(f"TrainConfig.loss={config.loss!r} needs the probe: fit(..., probe=...) "
                             "(physics.probe_for_inputs scales a probe to the inputs)")
        p = np.asarray(probe)
        if not np.iscomplexobj(p) or p.shape != tuple(x.shape[-2:]):
            raise ValueError(f"the probe must be complex {tuple(x.shape[-2:])}, got {p.dtype} {p.shape}")
        probe_t = torch.as_tensor(p.astype(np.complex64), device=device)
    positions_t = None
    if config.uses_physics and config.consistency_weight > 0:
        if positions is None:
            raise ValueError("TrainConfig.consistency_weight needs the frames' window positions: fit(..., positions=)")
        positions_t = torch.as_tensor(np.asarray(positions, dtype=np.float64))
        if positions_t.shape != (len(x), 2):
            raise ValueError(f"positions must be ({len(x)}, 2) window corners (row, col), got {tuple(positions_t.shape)}")
    deadline = None if config.time_budget_s is None else time.monotonic() + float(config.time_budget_s)
    return _FitPlan(x=x, y=y, config=config, dist_info=dist_info, local_batch=local_batch,
                    n_train=n_train, n_val=n_val, steps_per_epoch=steps_per_epoch,
                    step_size_up=step_size_up, device=device, use_amp=use_amp, seed=seed,
                    probe=probe_t, positions=positions_t, deadline=deadline)


def _past_deadline(plan: _FitPlan) -> bool:
    return plan.deadline is not None and time.monotonic() > plan.deadline


@dataclass(frozen=True)
class _Optimisation:
    """The network (DDP-wrapped when distributed), Adam, the triangular2 schedule, the gradient
    scaler, the loss and the forward pass of one :func:`fit`."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.CyclicLR
    scaler: torch.amp.GradScaler
    window: torch.Tensor
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    forward: Callable[[torch.Tensor], torch.Tensor]


def _set_up_optimisation(model: nn.Module, plan: _FitPlan,
                         initial_state: StateSource | None) -> _Optimisation:
    """Load the warm-start weights, move the model to the device, wrap it in DDP when
    distributed, and build the optimiser, schedule, scaler and loss."""
    config, device, use_amp = plan.config, plan.device, plan.use_amp
    if initial_state is not None:
        model.load_state_dict(load_state_dict(initial_state), strict=True)
    model.to(device)
    net: nn.Module = model
    if plan.dist_info.distributed:
        net = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr_min)
    scheduler = torch.optim.lr_scheduler.CyclicLR(
        optimizer,
        base_lr=config.lr_min,
        max_lr=config.lr_max,
        step_size_up=plan.step_size_up,
        mode="triangular2",
        cycle_momentum=False,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp)
    window = loss_window(tuple(plan.y.shape[-2:]), config.loss_window, device)

    def label_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        err = (pred - target) ** 2 if config.loss == "mse" else (pred - target).abs()
        return (err * window).sum() / (window.sum() * len(pred))

    intensity = None if plan.probe is None else plan.probe.abs() ** 2

    def loss_fn(pred: torch.Tensor, target: torch.Tensor, inputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``pred`` against the labels ``target``, and/or against the counts ``inputs`` (and the
        agreement of overlapping predictions, frames ``idx`` of the data)."""
        if not config.uses_physics:
            return label_loss(pred, target)
        if config.loss == "physics":  # the labels only fix each patch's phase offset
            loss = physics_loss(pred, inputs, plan.probe, anchor=target)
        else:
            loss = label_loss(pred, target) + config.physics_weight * physics_loss(pred, inputs, plan.probe)
        if plan.positions is not None and len(idx) > 1:
            corners = plan.positions[idx.cpu()].to(pred.device)
            loss = loss + config.consistency_weight * overlap_consistency(pred, corners, intensity)
        return loss

    from ..model import phase_of

    def forward(xb: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
            return phase_of(net(xb)).float()

    return _Optimisation(net=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                         window=window, loss_fn=loss_fn, forward=forward)


def _epoch_split(plan: _FitPlan, epoch: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Generator]:
    """The epoch's validation indices (a fresh random split, identical on every rank), this
    rank's training batches and its augmentation generator."""
    seed, world, rank = plan.seed, plan.dist_info.world_size, plan.dist_info.rank
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    aug_rng = torch.Generator().manual_seed(seed * 1_000_003 + epoch + rank * 7_919 + 1)
    perm = torch.randperm(len(plan.x), generator=g)
    val_idx, train_idx = perm[:plan.n_val], perm[plan.n_val:]
    sampler = DistributedSampler(
        train_idx, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    local = train_idx[torch.as_tensor(list(iter(sampler)), dtype=torch.long)]
    return val_idx, list(torch.split(local, plan.local_batch)), aug_rng


def _train_epoch(plan: _FitPlan, opt: _Optimisation, batches: list[torch.Tensor],
                 aug_rng: torch.Generator, epoch: int, lrs: list[float]) -> tuple[float, int]:
    """One optimiser step per batch; appends each step's learning rate to ``lrs``.

    Returns the summed training loss (weighted by batch size) and the samples seen.
    """
    config, device, x, y = plan.config, plan.device, plan.x, plan.y
    opt.net.train()
    loss_sum, seen = 0.0, 0
    inner = _progress(
        batches,
        enabled=config.progress and plan.dist_info.is_main,
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
        lrs.append(float(opt.optimizer.param_groups[0]["lr"]))
        opt.optimizer.zero_grad(set_to_none=True)
        loss = opt.loss_fn(opt.forward(xb), yb, xb, idx)
        opt.scaler.scale(loss).backward()
        opt.scaler.step(opt.optimizer)
        opt.scaler.update()
        opt.scheduler.step()
        loss_sum += float(loss.detach()) * len(idx)
        seen += len(idx)
        if not plan.dist_info.distributed and _past_deadline(plan):
            break  # the time budget is spent: validate what there is
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loss_sum, seen


def _validate_epoch(plan: _FitPlan, opt: _Optimisation, val_idx: torch.Tensor) -> tuple[float, float]:
    """This rank's share of the validation split: summed windowed absolute error and the pixel
    weight it was summed over (``"physics"``: the summed physics loss and the frames)."""
    world, rank = plan.dist_info.world_size, plan.dist_info.rank
    window = opt.window
    opt.net.eval()
    abs_sum, pix = 0.0, 0
    with torch.no_grad():
        for idx in torch.split(val_idx[rank::world], max(plan.local_batch, 1)):
            xb = plan.x[idx].to(plan.device)
            yb = plan.y[idx].to(plan.device)
            if plan.config.loss == "physics":
                abs_sum += float(opt.loss_fn(opt.forward(xb), yb, xb, idx)) * len(yb)
                pix += len(yb)
                continue
            abs_sum += float(((opt.forward(xb) - yb).abs() * window).sum(dtype=torch.float64))
            pix += float(window.sum()) * len(yb)
    return abs_sum, pix


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
    probe: ArrayLike | None = None,
    positions: ArrayLike | None = None,
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
    probe : (H, W) complex, optional
        The probe in the units of ``inputs`` (:func:`~edge_ptycho_bluesky.training.physics.
        probe_for_inputs`), needed by the physics losses (``config.loss``).
    positions : (N, 2) float, optional
        Window corners (row, col) in object pixels of the frames, for ``config.consistency_weight``.

    Returns
    -------
    TrainResult

    Raises
    ------
    ValueError
        Mismatched shapes, fewer than 2 samples, a batch size not divisible by the world size.
    """
    t_start = time.perf_counter()
    plan = _plan_fit(inputs, labels, config, dist_info, split_seed, probe, positions)
    device, world = plan.device, dist_info.world_size
    with _torch_threads(config.num_threads):
        opt = _set_up_optimisation(model, plan, initial_state)
        history: list[EpochRecord] = []
        lrs: list[float] = []
        best_state = copy_state(model)
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
            val_idx, batches, aug_rng = _epoch_split(plan, epoch)
            t_train = time.perf_counter()
            loss_sum, seen = _train_epoch(plan, opt, batches, aug_rng, epoch, lrs)
            train_time += time.perf_counter() - t_train
            abs_sum, pix = _validate_epoch(plan, opt, val_idx)
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
                best_state = copy_state(model)
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(train=f"{record.train_loss:.4f}", val=f"{record.val_loss:.4f}",
                                best=best_epoch)
            logger.debug(
                "%s epoch %d: train %.5f val %.5f lr %.2e (%.1f s)",
                description, epoch, record.train_loss, record.val_loss, record.lr, record.time_s,
            )
            if on_epoch is not None:
                on_epoch(record)
            stop = _all_reduce_sum([float(_past_deadline(plan))], dist_info, device)[0]
            if stop > 0:
                logger.info("%s: time budget of %.0f s spent after epoch %d", description,
                            config.time_budget_s, epoch)
                break
        model.load_state_dict(best_state)
    n_train, n_val = plan.n_train, plan.n_val
    total_trained = n_train * len(history)  # fewer than config.epochs when the time budget ran out
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
        steps_per_epoch=plan.steps_per_epoch,
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
        "best validation loss %.4f at epoch %d",
        description, len(history), n_train, n_val, result.time_s, result.samples_per_s,
        device, world, best_val, best_epoch,
    )
    return result

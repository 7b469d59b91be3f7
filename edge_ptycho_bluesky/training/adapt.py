"""Label-free adaptation: fine-tune the deployed model on a scan's own frames with the physics loss.

The deployed network is trained further on the frames of one scan (a CXI file or a stored run)
with the Poisson deviance of their counts under its predicted phase
(:mod:`~edge_ptycho_bluesky.training.physics`): no labels, no rPIE; where the frames' windows
overlap, the predictions are asked to agree (the ptychographic constraint). Each patch's constant
phase offset, which the counts cannot tell, stays anchored to the starting model's own prediction. A
share of the scan's frames is held out; the adapted model is published into the registry, and
deployed only when its physics loss on those held-out frames is lower than the deployed model's.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from ..io.cxi import PtychoScan
from ..model.contract import InputContract
from ..model.errors import InvalidModelError
from ..model.export import export_onnx, save_state_dict
from ..model.onnx_weights import ptychonn2_from_onnx
from ..model.ptychonn import load_model, phase_of
from .config import TrainConfig
from .loop import fit
from .model_version import PROBE_NAME, ModelVersion
from .physics import physics_loss, probe_for_inputs
from .registry import ModelRegistry
from .registry_checks import RegistryError

__all__ = ["DEFAULT_CONFIG", "AdaptResult", "adapt_scan", "usable_frames"]

logger = logging.getLogger(__name__)

#: Share of a scan's frames held out for the deployment decision.
HELD_OUT_FRACTION = 0.2
#: The training settings of an adaptation (``loss``, ``epochs`` and the time budget are set per call):
#: fine-tuning, so a learning rate 10x below training from scratch; overlapping predictions must
#: agree strongly (weight 30: of 1, 30 and 100 the only one that improved the shipped model's image
#: of an unseen scan at overlap 0.9, docs/benchmarks.md "Label-free adaptation").
DEFAULT_CONFIG = TrainConfig(batch_size=16, lr_min=1e-5, lr_max=5e-5, half_cycle_epochs=3, val_fraction=0.1,
                             device="cpu", progress=False, consistency_weight=30.0)


@dataclass(frozen=True)
class AdaptResult:
    """What :func:`adapt_scan` did. ``loss_before``/``loss_after``: the physics loss (mean Poisson
    deviance per pixel) of the deployed and of the adapted model on the held-out frames."""

    version: str
    parent: str
    loss_before: float
    loss_after: float
    seconds: float
    deployed: bool
    frames_used: int
    frames_skipped: int
    frames_held_out: int
    epochs: int

    def to_json_dict(self) -> dict[str, Any]:
        return asdict(self)


def usable_frames(frames: ArrayLike) -> NDArray[np.bool_]:
    """Which frames the physics loss can use: finite counts, and some of them."""
    x = np.asarray(frames)
    flat = x.reshape(len(x), -1)
    finite = np.isfinite(flat).all(axis=1) if x.dtype.kind == "f" else np.ones(len(x), bool)
    totals = np.where(finite, np.nan_to_num(flat.astype(np.float64)).sum(axis=1), 0.0)
    return finite & (totals > 0)


def _starting_network(mv: ModelVersion) -> tuple[str, dict[str, Any], torch.nn.Module]:
    """The deployed network in torch: its ``model.pt``, else its ONNX graph (PtychoNN 2.0)."""
    name = str(mv.manifest.get("model") or "ptychonn2")
    kwargs = dict((mv.manifest.get("extra") or {}).get("model_kwargs") or {})
    if mv.torch_path is not None:
        try:
            return name, kwargs, load_model(mv.torch_path, name, **kwargs)
        except InvalidModelError:
            if name != "ptychonn2":
                raise
            logger.warning("%s: model.pt does not load as %s; using its ONNX graph", mv.version, name)
    return "ptychonn2", {}, ptychonn2_from_onnx(mv.onnx_path)


def _predict(model: torch.nn.Module, inputs: NDArray[np.float32], batch: int = 64) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([phase_of(model(torch.as_tensor(inputs[i:i + batch]))).float()
                          for i in range(0, len(inputs), batch)])


def _held_out_loss(model: torch.nn.Module, inputs: NDArray[np.float32], probe: torch.Tensor) -> float:
    return float(physics_loss(_predict(model, inputs), torch.as_tensor(inputs), probe))


def adapt_scan(
    scan: PtychoScan,
    registry: ModelRegistry | str | Path,
    *,
    seconds: float = 120.0,
    epochs: int = 50,
    probe: ArrayLike | None = None,
    config: TrainConfig | None = None,
    held_out_fraction: float = HELD_OUT_FRACTION,
    seed: int = 0,
) -> AdaptResult:
    """Fine-tune the deployed model on ``scan``'s frames with the physics loss, within ``seconds``.

    Parameters
    ----------
    scan
        Frames (counts), exposure and, unless ``probe`` is given, the probe.
    registry
        The model registry; its deployed version is the starting point.
    seconds
        Time budget of the whole adaptation (loading and publishing included as far as possible:
        training stops when it is spent).
    epochs
        At most this many epochs.
    probe
        ``(N, N)`` complex probe (any units: it is scaled to the frames); default: ``scan.probe``,
        else the probe the deployed version was trained with (its ``probe.npy``).
    config
        Training settings (default :data:`DEFAULT_CONFIG`); ``loss``, ``epochs`` and the time
        budget are set here.
    held_out_fraction
        Share of the frames kept out of training for the deployment decision.

    Raises
    ------
    RegistryError
        Nothing deployed.
    ValueError
        No probe, too few usable frames, bad settings.
    """
    t0 = time.perf_counter()
    if not seconds > 0 or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a positive time budget, got {seconds!r}")
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction!r}")
    registry = registry if isinstance(registry, ModelRegistry) else ModelRegistry(registry, create=False)
    mv = registry.current(verify=True)
    if mv is None:
        raise RegistryError(f"no model is deployed in {registry.root}: deploy one first (edge-ptycho "
                            "registry deploy V, or edge-ptycho import-onnx FILE.onnx)")
    if probe is None:
        probe = scan.probe
    if probe is None and mv.probe_path is not None:
        logger.info("adapt: scan %s records no probe: using the one %s was trained with", scan.uid, mv.version)
        probe = mv.load_probe()
    if probe is None:
        raise ValueError(
            f"scan {scan.uid or ''} records no probe, nor does the deployed {mv.version}, and the physics loss "
            "needs one: pass --probe FILE.npy (a complex (N, N) array, e.g. the refined probe of an rPIE "
            "reconstruction of this or an earlier scan: `edge-ptycho recon INPUT --out R.cxi` stores it as "
            "R.cxi's illumination, which a CXI input carries), or record the probe with the run")
    ok = usable_frames(scan.frames)
    skipped = int(len(ok) - ok.sum())
    if skipped:
        logger.warning("adapt: %d of %d frames skipped (NaN/inf or no counts)", skipped, len(ok))
    contract = InputContract.from_version(mv)
    inputs = contract.prepare(np.asarray(scan.frames)[ok], scan.exposure_s)
    corners = scan.to_window_positions()[0][ok]
    n = len(inputs)
    n_held = max(1, int(round(held_out_fraction * n)))
    if n - n_held < 4:
        raise ValueError(f"only {n} usable frames: adaptation needs at least {n_held + 4}")
    scaled_probe = probe_for_inputs(probe, inputs)
    probe_t = torch.as_tensor(scaled_probe)
    order = np.random.default_rng(seed).permutation(n)
    held, train = np.sort(order[:n_held]), np.sort(order[n_held:])

    name, kwargs, model = _starting_network(mv)
    loss_before = _held_out_loss(model, inputs[held], probe_t)
    anchors = _predict(model, inputs[train]).numpy()
    budget = max(1.0, seconds - (time.perf_counter() - t0) - 5.0)  # leave time to export and publish
    base = config or DEFAULT_CONFIG
    cfg = base.with_updates(loss="physics", epochs=int(epochs), time_budget_s=budget,
                            count_scale=contract.scale, augment=False,
                            batch_size=min(base.batch_size, max(1, len(train) - 1)))
    result = fit(model, inputs[train], anchors, cfg, probe=scaled_probe, positions=corners[train],
                 description=f"adapt {mv.version}")
    loss_after = _held_out_loss(model, inputs[held], probe_t)
    better = loss_after < loss_before
    extra: dict[str, Any] = {
        "preprocess": {k: v for k, v in (("scale", contract.scale), ("exposure_s", mv.input_exposure_s))
                       if v is not None},
        "adaptation": {"scan": scan.uid, "loss_before": loss_before, "loss_after": loss_after,
                       "frames": int(len(train)), "held_out": int(n_held), "epochs": len(result.history),
                       "loss": "physics"},
    }
    if kwargs:
        extra["model_kwargs"] = kwargs
    with tempfile.TemporaryDirectory(prefix="edge-ptycho-adapt-") as tmp:
        files = {"model.onnx": export_onnx(model.eval(), Path(tmp) / "model.onnx"),
                 "model.pt": save_state_dict(model, Path(tmp) / "model.pt")}
        np.save(Path(tmp) / PROBE_NAME, np.asarray(probe, dtype=np.complex64))  # the lineage keeps its probe
        files[PROBE_NAME] = Path(tmp) / PROBE_NAME
        new = registry.publish(files, parent=mv.version, training_data=[scan.uid] if scan.uid else [],
                               model=name, deploy=better, extra=extra,
                               notes=f"physics adaptation of {mv.version} on scan {scan.uid or '(file)'}")
    seconds_used = time.perf_counter() - t0
    if better:
        logger.info("adapt: %s deployed (held-out physics loss %.4g -> %.4g)", new.version, loss_before, loss_after)
    else:
        logger.warning("adapt: %s published but NOT deployed: its held-out physics loss %.4g is not below the "
                       "deployed %s's %.4g", new.version, loss_after, mv.version, loss_before)
    return AdaptResult(version=new.version, parent=mv.version, loss_before=loss_before, loss_after=loss_after,
                       seconds=seconds_used, deployed=better, frames_used=int(len(train)), frames_skipped=skipped,
                       frames_held_out=int(n_held), epochs=len(result.history))

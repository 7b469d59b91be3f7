"""How good a model's phase is: predictions for raw frames (:func:`predict_phases`) and their
per-patch and stitched SSIM against the labels of a scan (:func:`evaluate_scan`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from ..recon.labels import LabelledScan
from ..stitching import stitch
from .corpus import check_labelled_scan
from .loop import StateSource, load_state_dict, prepare_inputs, resolve_device

__all__ = ["ScanEvaluation", "evaluate_scan", "predict_phases"]


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

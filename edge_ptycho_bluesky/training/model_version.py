"""What one published model version is: the registry's file names and a version's manifest.

A version is the folder ``ROOT/versions/<version>`` holding ``model.onnx``, optionally
``model.pt``, and ``manifest.json`` (version, parent, training data, validation SSIM, sha256 of
every file, ONNX facts and free ``extra`` metadata). :class:`ModelVersion` reads those facts out
of the manifest; :class:`~edge_ptycho_bluesky.training.registry.ModelRegistry` publishes and
deploys versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import FRAME_SIZE

__all__ = [
    "CURRENT_NAME",
    "DEFAULT_INPUT_SHAPE",
    "HISTORY_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "ONNX_NAME",
    "REQUIRED_MANIFEST_KEYS",
    "TORCH_NAME",
    "VERSIONS_DIR",
    "ModelVersion",
]

MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
HISTORY_NAME = "history.jsonl"
VERSIONS_DIR = "versions"
LOCK_NAME = ".lock"
ONNX_NAME = "model.onnx"
TORCH_NAME = "model.pt"
#: Optional: the probe the model was trained with (complex (N, N) .npy): the physics loss's
#: fallback for a scan that records none.
PROBE_NAME = "probe.npy"
DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (1, FRAME_SIZE, FRAME_SIZE)
REQUIRED_MANIFEST_KEYS: tuple[str, ...] = (
    "version",
    "parent",
    "training_data",
    "validation_ssim",
    "files",
    "created",
)


@dataclass(frozen=True)
class ModelVersion:
    """One published model version.

    Attributes
    ----------
    version : str
        Version name, e.g. ``"v0003"``.
    path : Path
        The version's folder, ``ROOT/versions/<version>``.
    manifest : dict
        The parsed ``manifest.json`` (a fresh copy; editing it changes nothing on disk).
    """

    version: str
    path: Path
    manifest: dict[str, Any] = field(compare=False, repr=False)

    @property
    def onnx_path(self) -> Path:
        """Path of the ONNX model the edge worker runs."""
        return self.path / ONNX_NAME

    @property
    def torch_path(self) -> Path | None:
        """Path of the torch state dict, or None when the version has none.

        Load it only with ``torch.load(path, weights_only=True)``.
        """
        return self.path / TORCH_NAME if TORCH_NAME in self.manifest.get("files", {}) else None

    @property
    def probe_path(self) -> Path | None:
        """Path of the probe the model was trained with (``probe.npy``), or None."""
        return self.path / PROBE_NAME if PROBE_NAME in self.manifest.get("files", {}) else None

    def load_probe(self) -> Any:
        """The probe the model was trained with, a complex ``(N, N)`` array, or None."""
        import numpy as np

        path = self.probe_path
        return None if path is None else np.load(path, allow_pickle=False)

    @property
    def parent(self) -> str | None:
        """The version this one was trained from, or None."""
        return self.manifest.get("parent")

    @property
    def input_scale(self) -> float | None:
        """The count scale the network was trained with (``extra.preprocess.scale``), or None
        (raw counts, or not recorded); inference must give it frames on the same scale."""
        value = ((self.manifest.get("extra") or {}).get("preprocess") or {}).get("scale")
        return None if value is None else float(value)

    @property
    def input_exposure_s(self) -> float | None:
        """The exposure time (s) of the training frames (``extra.preprocess.exposure_s``), or None
        (not recorded); the worker scales frames of other exposures to it."""
        value = ((self.manifest.get("extra") or {}).get("preprocess") or {}).get("exposure_s")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def validation_ssim(self) -> float | None:
        """SSIM on the validation data recorded at training, or None."""
        value = self.manifest.get("validation_ssim")
        return None if value is None else float(value)

    @property
    def training_data(self) -> tuple[str, ...]:
        """Scan uids of the training corpus."""
        return tuple(self.manifest.get("training_data", ()))

    @property
    def created(self) -> datetime:
        """Publication time (UTC)."""
        return datetime.fromisoformat(self.manifest["created"])

    @property
    def onnx_batch(self) -> int | None:
        """Fixed batch size of ``model.onnx``, or None when dynamic or not recorded."""
        info = self.manifest.get("onnx", {}).get(ONNX_NAME, {})
        batch = info.get("batch")
        return None if batch is None else int(batch)

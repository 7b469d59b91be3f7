"""The model that ships with the package: a trained network for a new registry.

``edge_ptycho_bluesky/data/models/<name>/`` holds ``model.onnx``, ``model.pt``, ``probe.npy`` (the
simulated beamline's probe it was trained with, the physics loss's fallback) and ``shipped.json``
(the architecture, the input contract it was trained with, and how it was made: recipe, command,
corpus, seed, measured accuracy; see docs/models.md). :func:`init_registry` publishes it into an
empty registry, verifies and deploys it, so that a fresh beamline session has a working model
before any scan was labelled.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .model_version import ModelVersion
from .registry import ModelRegistry
from .registry_checks import RegistryError

__all__ = ["SHIPPED_DIR", "SHIPPED_MODEL", "init_registry", "init_registry_if_empty", "shipped_model_info"]

#: The shipped models' folder inside the package.
SHIPPED_DIR = Path(__file__).resolve().parents[1] / "data" / "models"
#: The model :func:`init_registry` installs.
SHIPPED_MODEL = "ptychonn2-fast-varied"

logger = logging.getLogger(__name__)


def shipped_model_info(name: str = SHIPPED_MODEL) -> dict[str, Any]:
    """The shipped model's ``shipped.json`` (architecture, preprocess contract, recipe, accuracy)."""
    folder = SHIPPED_DIR / name
    meta = folder / "shipped.json"
    if not meta.is_file():
        raise RegistryError(f"the package ships no model {name!r} ({meta} is missing): reinstall the package, "
                            "or import one with edge-ptycho import-onnx FILE.onnx")
    return json.loads(meta.read_text(encoding="utf-8"))


def init_registry(root: str | Path, name: str = SHIPPED_MODEL) -> ModelVersion:
    """Create (or fill an empty) registry at ``root`` with the shipped model, verified and deployed.

    Raises
    ------
    RegistryError
        The registry already holds versions (it is never overwritten), or the model is missing.
    """
    info = shipped_model_info(name)
    registry = ModelRegistry(root)
    if registry.versions():
        raise RegistryError(f"{registry.root} already holds model versions; init only fills an empty registry "
                            "(deploy a version with edge-ptycho registry deploy V)")
    folder = SHIPPED_DIR / name
    extra = {"preprocess": info["preprocess"], "shipped": {k: v for k, v in info.items() if k != "preprocess"}}
    if info.get("model_kwargs"):
        extra["model_kwargs"] = info["model_kwargs"]
    mv = registry.publish({"model.onnx": folder / "model.onnx", "model.pt": folder / "model.pt",
                           "probe.npy": folder / "probe.npy"},
                          parent=None, model=info["model"], validation_ssim=info.get("validation_ssim"),
                          training_data=[], deploy=True, extra=extra,
                          notes=f"the model shipped with edge_ptycho_bluesky ({name})")
    return registry.verify(mv.version)


def init_registry_if_empty(root: str | Path) -> ModelVersion | None:
    """:func:`init_registry` when the registry at ``root`` is new or holds no version; else None
    (a registry with versions is left as it is, deployed or not)."""
    try:
        if ModelRegistry(root).versions():
            return None
        mv = init_registry(root)
    except (RegistryError, OSError) as exc:
        logger.warning("could not install the shipped model into %s: %s", root, exc)
        return None
    logger.info("registry %s was empty: installed the shipped model as %s (deployed)", root, mv.version)
    return mv

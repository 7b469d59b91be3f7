"""Bluesky callbacks for ptychography (importable as ``edge_ptycho_bluesky.callbacks``)."""

import importlib
from typing import Any

from .edge import FrameForwarder, LiveStitchCallback, StitchResult
from .plot import LivePhasePlot
from .progress import ScanProgress

__all__ = ["FrameForwarder", "JobOutcome", "LivePhasePlot", "LiveStitchCallback", "RetrainCallback",
           "ScanProgress", "StitchResult", "TiledRunWatcher", "start_retraining"]

#: The retraining names and their modules: they import torch, so they load only when asked for.
_RETRAIN = {"JobOutcome": "edge_ptycho_bluesky.training.service",
            "RetrainCallback": "edge_ptycho_bluesky.callbacks.retrain",
            "TiledRunWatcher": "edge_ptycho_bluesky.training.watcher",
            "start_retraining": "edge_ptycho_bluesky.callbacks.retrain"}


def __getattr__(name: str) -> Any:
    module = _RETRAIN.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)

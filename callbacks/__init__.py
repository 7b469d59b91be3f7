"""Bluesky callbacks for ptychography (importable as ``edge_ptycho_bluesky.callbacks``)."""

from typing import Any

from .edge import FrameForwarder, LivePhasePlot, LiveStitchCallback, StitchResult
from .progress import ScanProgress

__all__ = ["FrameForwarder", "JobOutcome", "LivePhasePlot", "LiveStitchCallback", "RetrainCallback",
           "ScanProgress", "StitchResult", "TiledRunWatcher", "start_retraining"]

_RETRAIN = {"JobOutcome", "RetrainCallback", "TiledRunWatcher", "start_retraining"}


def __getattr__(name: str) -> Any:
    # The retraining callback imports torch; load it only when asked for.
    if name in _RETRAIN:
        from . import retrain

        return getattr(retrain, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

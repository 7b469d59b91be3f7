"""Bluesky callbacks for ptychography (importable as ``edge_ptycho_bluesky.callbacks``)."""

from .edge import FrameForwarder, LivePhasePlot, LiveStitchCallback, StitchResult
from .progress import ScanProgress

__all__ = ["FrameForwarder", "LivePhasePlot", "LiveStitchCallback", "ScanProgress", "StitchResult"]

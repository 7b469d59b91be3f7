"""Bluesky callbacks for ptychography (importable as ``edge_ptycho_bluesky.callbacks``)."""

from .progress import ScanProgress

__all__ = ["ScanProgress"]

"""Bluesky plans for ptychography (importable as ``edge_ptycho_bluesky.plans``)."""

from .spiral import rel_spiral_ptycho_scan, spiral_ptycho_flyscan, spiral_ptycho_pattern, spiral_ptycho_scan

__all__ = ["rel_spiral_ptycho_scan", "spiral_ptycho_flyscan", "spiral_ptycho_pattern", "spiral_ptycho_scan"]

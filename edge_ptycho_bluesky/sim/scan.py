"""Scan trajectories: the Fermat spiral and the overlap/dose figures that go with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from numpy.typing import NDArray

#: The golden angle in radians, the Fermat spiral's angular increment.
GOLDEN_ANGLE = np.pi * (3 - np.sqrt(5))


def fermat_spiral(num_points: int, step: float) -> NDArray[np.float64]:
    """Fermat-spiral positions, ``r_n = step * sqrt(n)``, ``theta_n = n * golden angle``.

    This is the convention of the paper's route (``optimized_route.npz``, whose coordinates are in
    units of the step): each point covers an area ``pi * step**2`` of the scan.

    Parameters
    ----------
    num_points
        Number of points (>= 1).
    step
        Spiral step, in the caller's length unit (> 0).

    Returns
    -------
    xy : (num_points, 2) float64
        ``(x, y)`` positions, starting at the origin.
    """
    if isinstance(num_points, bool) or not isinstance(num_points, (int, np.integer)):
        raise TypeError(f"num_points must be an integer, got {num_points!r}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if not np.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive length, got {step!r}")
    n = np.arange(num_points)
    r = step * np.sqrt(n)
    theta = n * GOLDEN_ANGLE
    return np.column_stack([r * np.cos(theta), r * np.sin(theta)])


def paper_route(step: float, path: str | Path) -> NDArray[np.float64]:
    """The paper's 963-point spiral route scaled to ``step``.

    Parameters
    ----------
    step
        Spiral step in the caller's length unit (the route is stored in units of the step).
    path
        ``optimized_route.npz`` with arrays ``x`` and ``y``.

    Returns
    -------
    xy : (963, 2) float64
    """
    if not np.isfinite(step) or step <= 0:
        raise ValueError(f"step must be a positive length, got {step!r}")
    with np.load(path) as route:
        return np.column_stack([route["x"], route["y"]]) * step


def overlap_ratio(step: float, beam_size: float) -> float:
    """The paper's overlap ratio ``1 - sqrt(3) * S / B``, clipped at 0 (no overlap)."""
    if step <= 0 or beam_size <= 0:
        raise ValueError(f"step and beam_size must be positive, got {step!r}, {beam_size!r}")
    return float(max(0.0, 1.0 - np.sqrt(3.0) * step / beam_size))


def step_for_overlap(overlap: float, beam_size: float) -> float:
    """Spiral step giving ``overlap`` (the inverse of :func:`overlap_ratio`; 0 gives ``B / sqrt 3``)."""
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap!r}")
    return float((1.0 - overlap) * beam_size / np.sqrt(3.0))


def dose_photons_per_nm2(photons_per_point: float, step_nm: float) -> float:
    """Dose per unit area: each spiral point covers ``pi * step**2`` of the sample."""
    if photons_per_point < 0 or step_nm <= 0:
        raise ValueError("photons_per_point must be >= 0 and step_nm > 0")
    return float(photons_per_point / (np.pi * step_nm**2))

"""A scan's windows on the object grid: checking frames and positions, sizing the object, and
turning stage coordinates into window positions.

Data conventions
----------------
``frames`` are ``(M, N, N)`` fftshifted intensities (zero frequency at ``(N/2, N/2)``) in photons,
``positions`` ``(M, 2)`` float ``(row, col)`` top-left window corners in object pixels (the
project-wide convention).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import FRAME_SIZE
from ..sim.forward import object_shape_for_scan
from ..sim.geometry import Geometry

__all__ = ["check_inside", "object_shape_for_positions", "validate_scan", "window_positions_from_stage"]


def validate_scan(frames: ArrayLike, positions: ArrayLike) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Check a scan and return ``frames`` as float32 and ``positions`` as float64.

    Parameters
    ----------
    frames : (M, N, N) real
        Diffraction intensities (counts), fftshifted.
    positions : (M, 2) float
        Window positions (row, col) in object pixels.

    Raises
    ------
    ValueError
        Empty scan, wrong shapes, lengths that differ, NaN/inf or negative intensities, NaN
        positions. (Whether the windows fit an object is checked by :func:`check_inside`.)
    """
    frames_arr = np.asarray(frames)
    if np.iscomplexobj(frames_arr):
        raise TypeError("frames must be real intensities, got a complex array")
    if frames_arr.ndim == 2:
        raise ValueError(f"frames must be a stack (M, N, N), got one image of shape {frames_arr.shape}; "
                         "use frames[None] for a single frame")
    if frames_arr.ndim != 3:
        raise ValueError(f"frames must have shape (M, N, N), got {frames_arr.shape}")
    if frames_arr.shape[0] == 0:
        raise ValueError("the scan is empty: frames has no frame (M = 0)")
    if frames_arr.shape[1] != frames_arr.shape[2] or frames_arr.shape[1] % 2:
        raise ValueError(f"frames must be square with an even side, got {frames_arr.shape[1:]}")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must have shape (M, 2) as (row, col), got {pos.shape}")
    if len(pos) != len(frames_arr):
        raise ValueError(f"frames and positions differ in length: {len(frames_arr)} frames but "
                         f"{len(pos)} positions; pass one (row, col) per frame")
    if not np.isfinite(pos).all():
        raise ValueError(f"positions contain NaN/inf at rows {np.flatnonzero(~np.isfinite(pos).all(1))[:10]}")
    out = frames_arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(out).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} frame(s) contain NaN/inf (first: {np.flatnonzero(bad)[:10]}); "
                         "drop or repair those frames before reconstructing")
    if (out < 0).any():
        raise ValueError("frames contain negative intensities; clip them at 0 (e.g. after background "
                         "subtraction) before reconstructing")
    return out, pos


def object_shape_for_positions(positions: ArrayLike, frame_size: int, margin: int = 2) -> tuple[int, int]:
    """Smallest object holding every window (with ``margin`` pixels beyond the last one)."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not len(pos):
        raise ValueError(f"positions must have shape (M, 2) with M >= 1, got {pos.shape}")
    if (pos < 0).any():
        raise ValueError(f"positions must be >= 0 (top-left window corners), got minimum {pos.min(0)}")
    high = np.floor(pos.max(axis=0)).astype(int) + frame_size + 1 + margin
    return int(high[0]), int(high[1])


def check_inside(positions: NDArray[np.float64], object_shape: tuple[int, int], frame_size: int) -> None:
    """Raise ValueError unless every window (plus one pixel for the sub-pixel shift) fits."""
    low = positions.min(axis=0)
    high = np.floor(positions.max(axis=0)) + frame_size + 1
    if (low < 0).any() or high[0] > object_shape[0] or high[1] > object_shape[1]:
        raise ValueError(
            f"probe windows reach outside the object: positions span {low} to {positions.max(axis=0)} "
            f"(+{frame_size} px window +1) but the object is {tuple(object_shape)}; use a larger "
            "object_shape (or object_shape=None to size it from the positions) or drop those points")


# --------------------------------------------------------------------------------------------
# Stage coordinates
# --------------------------------------------------------------------------------------------


def _pixel_size_nm_from_geometry(geometry: Mapping[str, Any]) -> float:
    if "pixel_size_nm" in geometry:
        value = float(geometry["pixel_size_nm"])
    else:
        known = {f.name for f in fields(Geometry)}
        try:
            value = Geometry(**{k: v for k, v in geometry.items() if k in known}).pixel_size_nm
        except TypeError as exc:
            raise ValueError(f"geometry {dict(geometry)!r} has neither pixel_size_nm nor the fields "
                             f"of sim.Geometry ({sorted(known)})") from exc
    if not value > 0:
        raise ValueError(f"geometry pixel_size_nm must be positive, got {value!r}")
    return value


def window_positions_from_stage(
    x_um: ArrayLike,
    y_um: ArrayLike,
    geometry: Mapping[str, Any],
    *,
    frame_size: int | None = None,
    object_shape: tuple[int, int] | None = None,
    margin: int = 8,
) -> tuple[NDArray[np.float64], tuple[int, int]]:
    """Window positions of a scan from stage coordinates: the core of
    :func:`~edge_ptycho_bluesky.recon.reconstruct.recon_from_run`.

    The convention is the simulator's (:meth:`edge_ptycho_bluesky.sim.SimulatedSample.window_positions`):
    stage ``(0, 0)`` puts the beam centre at object pixel ``object_shape / 2``, and
    ``(row, col) = (y, x) / pixel + object_shape / 2 - N / 2``.

    Parameters
    ----------
    x_um, y_um : (M,) float
        Stage positions in micrometres.
    geometry : mapping
        Needs ``pixel_size_nm`` (or the :class:`~edge_ptycho_bluesky.sim.Geometry` fields it
        derives from); ``frame_size`` is read from it when not given (default 128). An
        ``object_shape`` entry (e.g. the simulated sample's) is used when ``object_shape`` is None.
    frame_size : int, optional
        Window size N.
    object_shape : (int, int), optional
        Object size; None: the smallest square centred on stage (0, 0) holding every window plus
        ``margin`` pixels (:func:`edge_ptycho_bluesky.sim.object_shape_for_scan`).

    Returns
    -------
    positions : (M, 2) float64
        (row, col) top-left window corners.
    object_shape : (int, int)
    """
    x = np.asarray(x_um, dtype=np.float64).reshape(-1)
    y = np.asarray(y_um, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x_um and y_um differ in length: {x.size} vs {y.size}")
    if not x.size:
        raise ValueError("the scan is empty: no stage positions")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("stage positions contain NaN/inf")
    pixel_nm = _pixel_size_nm_from_geometry(geometry)
    n = int(frame_size if frame_size is not None else geometry.get("frame_size", FRAME_SIZE))
    if object_shape is None and geometry.get("object_shape") is not None:
        object_shape = tuple(int(s) for s in geometry["object_shape"])  # type: ignore[assignment]
    if object_shape is None:
        object_shape = object_shape_for_scan(np.column_stack([x, y]), pixel_nm, n, margin)
    shape = (int(object_shape[0]), int(object_shape[1]))
    rc = np.column_stack([y, x]) * 1e3 / pixel_nm
    positions = rc + np.array(shape, dtype=np.float64) / 2 - n / 2
    return positions, shape

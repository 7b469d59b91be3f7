"""The regular grid that stitching writes onto, and physical beam positions placed on it.

* :func:`grid_from_positions` gives the smallest grid (shape and origin) that holds every patch;
* :class:`PhysicalGrid` / :func:`positions_from_physical` convert beam-centre positions in physical
  units (metres, micrometres, ...) into patch corners in grid pixels.

Positions are ``(N, 2)`` float arrays of ``(row, col)``: the top-left corner of each patch in
output-grid pixels (see :mod:`edge_ptycho_bluesky.stitching`, which stitches patches onto the grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from . import FRAME_SIZE

__all__ = [
    "SNAP_TOLERANCE",
    "PhysicalGrid",
    "as_pair",
    "grid_from_positions",
    "positions_from_physical",
    "validate_positions",
]

#: Fractional parts closer than this to an integer are snapped to it, so that motor positions
#: such as 10.0000000001 place a patch exactly (integer shift, full footprint).
SNAP_TOLERANCE = 1e-6


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def as_pair(value: ArrayLike, name: str, *, integer: bool = False) -> tuple:
    """Return ``value`` as a 2-tuple (of int or float), or raise ValueError naming it."""
    arr = np.asarray(value)
    if arr.ndim == 0:
        arr = np.array([arr, arr])
    if arr.shape != (2,):
        raise ValueError(f"{name} must be a (row, col) pair, got {value!r}")
    if not np.all(np.isfinite(arr.astype(float))):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if integer:
        if not np.all(arr.astype(float) == np.round(arr.astype(float))):
            raise ValueError(f"{name} must be integers, got {value!r}")
        return (int(arr[0]), int(arr[1]))
    return (float(arr[0]), float(arr[1]))


def validate_positions(positions: ArrayLike, name: str = "positions") -> NDArray[np.float64]:
    """Return positions as a (N, 2) float64 array; a single (2,) position becomes (1, 2)."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim == 1 and pos.shape == (2,):
        pos = pos[None, :]
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape (N, 2) as (row, col) pairs, got shape {pos.shape}"
        )
    if pos.shape[0] == 0:
        raise ValueError(f"{name} is empty: nothing to stitch")
    bad = ~np.isfinite(pos).all(axis=1)
    if bad.any():
        idx = np.flatnonzero(bad)
        raise ValueError(
            f"{name} contains {idx.size} non-finite (NaN/inf) entries, first at index "
            f"{int(idx[0])}: {pos[idx[0]].tolist()}; drop those points before stitching"
        )
    return pos


# --------------------------------------------------------------------------------------------
# Grids
# --------------------------------------------------------------------------------------------


def grid_from_positions(
    positions: ArrayLike,
    patch_shape: Sequence[int] = (FRAME_SIZE, FRAME_SIZE),
    margin: int = 0,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The smallest regular grid that holds every patch, plus a margin.

    Parameters
    ----------
    positions : (N, 2) float
        Top-left corners (row, col) of the patches, in pixels.
    patch_shape : (2,) int
        Patch size (H, W).
    margin : int
        Extra pixels on every side.

    Returns
    -------
    shape : (int, int)
        Grid shape (rows, cols).
    origin : (int, int)
        The position coordinate of grid pixel (0, 0): ``floor(min(positions)) - margin``.
        The shape is ``ceil(max(positions)) + patch_shape + margin - origin``, so every corner
        lies in ``origin + [0, shape - patch_shape]``.
    """
    pos = validate_positions(positions)
    h, w = as_pair(patch_shape, "patch_shape", integer=True)
    if int(margin) != margin or margin < 0:
        raise ValueError(f"margin must be a non-negative integer, got {margin!r}")
    lo = np.floor(pos.min(axis=0) + SNAP_TOLERANCE).astype(np.int64) - int(margin)
    hi = np.ceil(pos.max(axis=0) - SNAP_TOLERANCE).astype(np.int64) + np.array([h, w]) + margin
    shape = (int(hi[0] - lo[0]), int(hi[1] - lo[1]))
    return shape, (int(lo[0]), int(lo[1]))


@dataclass(frozen=True)
class PhysicalGrid:
    """Maps beam-centre positions in physical units to patch positions in grid pixels.

    A beam centre ``p`` (physical ``(row, col)`` coordinate, same unit as ``pixel_size``) lies at
    grid coordinate ``(p - origin) / pixel_size``; the patch centred on it has its top-left corner
    at that coordinate minus ``beam_center``.

    Parameters
    ----------
    pixel_size : (float, float)
        Physical size of one pixel along (row, col), e.g. ``(6.82e-9, 6.82e-9)`` metres.
    origin : (float, float)
        Physical (row, col) coordinate of grid pixel (0, 0).
    patch_shape : (int, int)
        Patch size (H, W).
    beam_center : (float, float) or None
        Where the beam centre lies inside a patch, in patch pixels. Default ``(H // 2, W // 2)``,
        i.e. pixel 64 of 128, the centre of an fftshifted array (where a probe made with
        ``np.fft.fftshift`` or on ``arange(H) - H // 2`` coordinates has its centre).

    Notes
    -----
    The row axis is the physical y axis and the column axis the physical x axis; use
    ``order="xy"`` in :meth:`to_pixels` for (x, y) data such as ``pos235.csv``.
    """

    pixel_size: tuple[float, float]
    origin: tuple[float, float]
    patch_shape: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)
    beam_center: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        ps = as_pair(self.pixel_size, "pixel_size")
        if ps[0] <= 0 or ps[1] <= 0:
            raise ValueError(f"pixel_size must be positive, got {self.pixel_size!r}")
        object.__setattr__(self, "pixel_size", ps)
        object.__setattr__(self, "origin", as_pair(self.origin, "origin"))
        shape = as_pair(self.patch_shape, "patch_shape", integer=True)
        object.__setattr__(self, "patch_shape", shape)
        bc = (shape[0] // 2, shape[1] // 2) if self.beam_center is None else self.beam_center
        object.__setattr__(self, "beam_center", as_pair(bc, "beam_center"))

    @classmethod
    def from_positions(
        cls,
        positions: ArrayLike,
        pixel_size: float | Sequence[float],
        *,
        patch_shape: Sequence[int] = (FRAME_SIZE, FRAME_SIZE),
        order: Literal["rc", "xy"] = "rc",
        margin: float = 0.0,
        beam_center: Sequence[float] | None = None,
    ) -> PhysicalGrid:
        """Choose the origin so that the lowest patch corner lands ``margin`` pixels in.

        Parameters
        ----------
        positions : (N, 2) float
            Beam centres in physical units, (row, col) = (y, x), or (x, y) with ``order="xy"``.
        pixel_size : float or (float, float)
            Physical pixel size (same unit as ``positions``).
        patch_shape, beam_center
            See the class.
        order : {"rc", "xy"}
            Column order of ``positions``.
        margin : float
            Pixels left free before the first patch along each axis.
        """
        pos = _reorder(validate_positions(positions), order)
        probe = cls(as_pair(pixel_size, "pixel_size"), (0.0, 0.0), tuple(patch_shape),
                    None if beam_center is None else tuple(beam_center))
        ps = np.asarray(probe.pixel_size)
        bc = np.asarray(probe.beam_center)
        origin = pos.min(axis=0) - (float(margin) + bc) * ps
        return cls(probe.pixel_size, (float(origin[0]), float(origin[1])), probe.patch_shape,
                   probe.beam_center)

    def to_pixels(
        self, positions: ArrayLike, *, order: Literal["rc", "xy"] = "rc"
    ) -> NDArray[np.float64]:
        """Physical beam centres (N, 2) -> patch top-left corners (N, 2) float64 in grid pixels."""
        pos = _reorder(validate_positions(positions), order)
        centre = (pos - np.asarray(self.origin)) / np.asarray(self.pixel_size)
        return centre - np.asarray(self.beam_center)

    def to_physical(
        self, pixel_positions: ArrayLike, *, order: Literal["rc", "xy"] = "rc"
    ) -> NDArray[np.float64]:
        """Patch top-left corners (N, 2) in grid pixels -> physical beam centres (N, 2)."""
        pix = validate_positions(pixel_positions, "pixel_positions")
        phys = (pix + np.asarray(self.beam_center)) * np.asarray(self.pixel_size)
        return _reorder(phys + np.asarray(self.origin), order)


def _reorder(pos: NDArray[np.float64], order: str) -> NDArray[np.float64]:
    if order == "rc":
        return pos
    if order == "xy":
        return pos[:, ::-1].copy()
    raise ValueError(f"order must be 'rc' (row, col = y, x) or 'xy', got {order!r}")


def positions_from_physical(
    positions: ArrayLike,
    pixel_size: float | Sequence[float],
    *,
    patch_shape: Sequence[int] = (FRAME_SIZE, FRAME_SIZE),
    order: Literal["rc", "xy"] = "rc",
    origin: Sequence[float] | None = None,
    margin: float = 0.0,
    beam_center: Sequence[float] | None = None,
) -> NDArray[np.float64]:
    """Convert beam-centre positions in physical units to patch corners in grid pixels.

    Parameters
    ----------
    positions : (N, 2) float
        Beam centres (metres, micrometres, ...), as (row, col) = (y, x), or (x, y) with
        ``order="xy"``.
    pixel_size : float or (float, float)
        Physical size of a reconstructed pixel, same unit as ``positions``.
    patch_shape : (int, int)
        Patch size (H, W).
    order : {"rc", "xy"}
        Column order of ``positions``.
    origin : (float, float) or None
        Physical (row, col) coordinate of grid pixel (0, 0). ``None`` chooses it so that the
        lowest patch corner is at ``margin`` pixels (all positions non-negative). A live scan must
        use one fixed origin for all its batches: build a :class:`PhysicalGrid` once instead.
    margin : float
        Used only when ``origin`` is None.
    beam_center : (float, float) or None
        Beam centre inside a patch in patch pixels; default ``(H // 2, W // 2)``.

    Returns
    -------
    positions : (N, 2) float64
        Top-left patch corners (row, col) in grid pixels.
    """
    if origin is None:
        grid = PhysicalGrid.from_positions(
            positions, pixel_size, patch_shape=patch_shape, order=order, margin=margin,
            beam_center=beam_center,
        )
    else:
        grid = PhysicalGrid(
            as_pair(pixel_size, "pixel_size"), as_pair(origin, "origin"), tuple(patch_shape),
            None if beam_center is None else tuple(beam_center),
        )
    return grid.to_pixels(positions, order=order)


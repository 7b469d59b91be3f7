"""Image-quality metrics for stitched phase images: SSIM, Pearson, RMS error, FRC.

The paper's accuracy figure is the structural similarity (SSIM, Wang et al. 2004) of the stitched
AI phase (or an iterative reconstruction) against a reference phase, on the scanned region. Phase
images carry ambiguities that are not errors: a constant offset, and for ptychography also a linear
phase ramp. Every metric here therefore

1. restricts itself to a mask (the scanned region; by default the pixels where both images are
   finite, so NaN outside a stitched image's coverage is handled automatically), and
2. subtracts from each image its own mean over the mask (offset), or with ``remove_ramp=True`` its
   own least-squares plane ``c0 + c1 * row + c2 * col`` over the mask. Because the fit is linear,
   this is the same as aligning ``b`` to ``a`` by the offset/plane of their difference and then
   removing ``a``'s own offset/plane from both.

Argument order: ``a`` is the reference (ground truth, e.g. the object or the rPIE phase) and ``b``
the image under test; the metrics are symmetric except that SSIM's default ``data_range`` comes from
the reference.

:func:`scanned_mask` gives the scanned region from the scan positions (patch coverage counted on
the grid, or the convex hull of the probe centres), eroded by an inset.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage
from scipy.spatial import Delaunay, QhullError
from skimage.metrics import structural_similarity

from . import FRAME_SIZE
from .stitching_grid import SNAP_TOLERANCE

__all__ = [
    "compare",
    "frc",
    "frc_resolution",
    "pearson",
    "rms_error",
    "scanned_mask",
    "ssim",
]

logger = logging.getLogger(__name__)

#: Constant FRC threshold of Rosenthal & Henderson (2003).
ONE_SEVENTH = 1.0 / 7.0


# --------------------------------------------------------------------------------------------
# Shared preparation
# --------------------------------------------------------------------------------------------


def _validate_pair(
    a: ArrayLike, b: ArrayLike, mask: ArrayLike | None
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    """Check two real 2-D images of one shape and a non-empty mask; return float64 copies."""
    arrs = []
    for name, x in (("a", a), ("b", b)):
        arr = np.asarray(x)
        if np.iscomplexobj(arr):
            raise TypeError(
                f"{name} is complex; compare the phase (np.angle) or the amplitude (np.abs)"
            )
        if arr.ndim != 2:
            raise ValueError(f"{name} must be a 2-D image, got shape {arr.shape}")
        arrs.append(np.array(arr, dtype=np.float64))
    a64, b64 = arrs
    if a64.shape != b64.shape:
        raise ValueError(
            f"shape mismatch: a {a64.shape} vs b {b64.shape}; crop both to the same region or "
            "stitch both onto the same grid (same shape and origin)"
        )
    finite = np.isfinite(a64) & np.isfinite(b64)
    if mask is None:
        m = finite
    else:
        m = np.asarray(mask)
        if m.shape != a64.shape:
            raise ValueError(f"mask has shape {m.shape} but the images are {a64.shape}")
        if m.dtype != np.bool_:
            if not np.isin(m, (0, 1)).all():
                raise ValueError("mask must be boolean (or 0/1)")
            m = m.astype(bool)
        if not finite[m].all():
            raise ValueError(
                f"{int((~finite[m]).sum())} masked pixels are NaN/inf in a or b; shrink the mask "
                "to the covered region (e.g. scanned_mask(...) & stitcher.mask)"
            )
    if not m.any():
        raise ValueError(
            "empty mask: no pixel to compare (the mask is all False or the images have no "
            "finite pixel in common)"
        )
    return a64, b64, m


def _detrend(
    img: NDArray[np.float64], mask: NDArray[np.bool_], remove_ramp: bool
) -> NDArray[np.float64]:
    """Subtract the mean (or least-squares plane) over the mask; pixels outside become 0."""
    out = np.zeros_like(img)
    vals = img[mask]
    if remove_ramp:
        rows, cols = np.nonzero(mask)
        # centre and scale the coordinates for a well-conditioned fit
        r0, c0 = rows.mean(), cols.mean()
        s = max(float(np.ptp(rows)), float(np.ptp(cols)), 1.0)
        design = np.column_stack([np.ones(rows.size), (rows - r0) / s, (cols - c0) / s])
        coef, *_ = np.linalg.lstsq(design, vals, rcond=None)
        out[mask] = vals - design @ coef
    else:
        out[mask] = vals - vals.mean()
    return out


def _prepare(
    a: ArrayLike, b: ArrayLike, mask: ArrayLike | None, remove_ramp: bool
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.bool_]]:
    a64, b64, m = _validate_pair(a, b, mask)
    return _detrend(a64, m, remove_ramp), _detrend(b64, m, remove_ramp), m


def _bbox(mask: NDArray[np.bool_], pad: int = 0) -> tuple[slice, slice]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return (
        slice(max(int(rows[0]) - pad, 0), min(int(rows[-1]) + 1 + pad, mask.shape[0])),
        slice(max(int(cols[0]) - pad, 0), min(int(cols[-1]) + 1 + pad, mask.shape[1])),
    )


def _erode(mask: NDArray[np.bool_], inset: int) -> NDArray[np.bool_]:
    """Erode by a (2 inset + 1) square; pixels within ``inset`` of the array edge drop too."""
    if inset <= 0:
        return mask.copy()
    return ndimage.minimum_filter(
        mask.astype(np.uint8), size=2 * inset + 1, mode="constant", cval=0
    ).astype(bool)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def ssim(
    a: ArrayLike,
    b: ArrayLike,
    mask: ArrayLike | None = None,
    data_range: float | None = None,
    *,
    remove_ramp: bool = False,
    win_size: int | None = None,
    gaussian_weights: bool = False,
) -> float:
    """Structural similarity of ``b`` against the reference ``a`` over the masked region.

    Parameters
    ----------
    a : (H, W) float
        Reference image (e.g. the ground-truth or iterative phase, radians).
    b : (H, W) float
        Image under test (e.g. the stitched AI phase).
    mask : (H, W) bool or None
        Region to score (e.g. :func:`scanned_mask`). ``None``: where both images are finite.
    data_range : float or None
        Dynamic range L in SSIM's constants ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``. ``None``:
        the reference's range over the mask, ``max(a) - min(a)`` (offset removal does not change
        it). Pass a fixed value (e.g. ``2 * np.pi`` or the phantom's phase range) to compare
        numbers across scans.
    remove_ramp : bool
        Remove a least-squares plane from each image over the mask (instead of only the mean).
    win_size : int or None
        Side of the uniform sliding window, odd. ``None``: skimage's defaults, 7 (uniform
        window) or 11 (Gaussian window, the only size allowed with ``gaussian_weights``).
    gaussian_weights : bool
        Use Wang et al.'s Gaussian window (sigma 1.5, 11 taps) instead of skimage's default
        7 x 7 uniform window.

    Returns
    -------
    float
        Mean SSIM in [-1, 1] (the paper's "accuracy" is this times 100 %).

    Notes
    -----
    Computed with ``skimage.metrics.structural_similarity(..., full=True)`` (K1 = 0.01,
    K2 = 0.03, sample covariance) on the detrended images, with pixels outside the mask set to
    zero in both. The SSIM map is then averaged over the mask eroded by the window half-width,
    so that only windows lying wholly inside the mask are counted (skimage applies the same rule
    at the image border). If that erosion leaves no pixel, the whole mask is used.
    """
    a0, b0, m = _prepare(a, b, mask, remove_ramp)
    if data_range is None:
        vals = a0[m]
        data_range = float(vals.max() - vals.min())
        if data_range <= 0:
            raise ValueError(
                "the reference a is constant over the mask, so its range is 0; pass "
                "data_range=... explicitly"
            )
    elif not np.isfinite(data_range) or data_range <= 0:
        raise ValueError(f"data_range must be a positive number, got {data_range!r}")
    if win_size is None:
        win_size = 11 if gaussian_weights else 7
    if gaussian_weights and win_size != 11:
        raise ValueError(
            f"gaussian_weights uses skimage's fixed 11-tap window (sigma 1.5); got win_size="
            f"{win_size!r}: leave win_size=None"
        )
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size!r}")
    half = (win_size - 1) // 2
    rows, cols = _bbox(m)
    extent = (rows.stop - rows.start, cols.stop - cols.start)
    if min(extent) < win_size:
        raise ValueError(
            f"the masked region ({extent}) is smaller than the SSIM window ({win_size}); "
            "use a larger mask or a smaller win_size"
        )
    rows, cols = _bbox(m, pad=half)
    sub_a, sub_b, sub_m = a0[rows, cols], b0[rows, cols], m[rows, cols]
    kwargs = {"sigma": 1.5} if gaussian_weights else {}
    _, smap = structural_similarity(
        sub_a, sub_b, win_size=win_size, data_range=data_range, full=True,
        gaussian_weights=gaussian_weights, **kwargs,
    )
    inner = _erode(sub_m, half)
    if not inner.any():
        logger.debug("mask thinner than the SSIM window; averaging over the whole mask")
        inner = sub_m
    return float(smap[inner].mean())


def pearson(a: ArrayLike, b: ArrayLike, mask: ArrayLike | None = None) -> float:
    """Pearson correlation coefficient of ``a`` and ``b`` over the mask.

    Parameters
    ----------
    a, b : (H, W) float
        Images (offset-invariant by construction).
    mask : (H, W) bool or None
        Region; ``None``: where both are finite.

    Returns
    -------
    float
        In [-1, 1]; NaN when either image is constant over the mask (undefined).
    """
    a0, b0, m = _prepare(a, b, mask, remove_ramp=False)
    x, y = a0[m], b0[m]
    denom = float(np.sqrt(np.dot(x, x) * np.dot(y, y)))
    if denom == 0.0:
        logger.warning("pearson: an image is constant over the mask; correlation undefined")
        return float("nan")
    return float(np.clip(np.dot(x, y) / denom, -1.0, 1.0))


def rms_error(
    a: ArrayLike, b: ArrayLike, mask: ArrayLike | None = None, *, remove_ramp: bool = False
) -> float:
    """Root-mean-square difference over the mask after offset (or plane) removal.

    Parameters
    ----------
    a, b : (H, W) float
        Images (same unit, e.g. radians).
    mask : (H, W) bool or None
        Region; ``None``: where both are finite.
    remove_ramp : bool
        Remove each image's least-squares plane instead of only its mean.

    Returns
    -------
    float
        ``sqrt(mean((a' - b')**2))`` in the images' unit.
    """
    a0, b0, m = _prepare(a, b, mask, remove_ramp)
    d = a0[m] - b0[m]
    return float(np.sqrt(np.mean(d * d)))


def _frc_parts(
    a: ArrayLike,
    b: ArrayLike,
    mask: ArrayLike | None,
    taper: int | None,
    remove_ramp: bool,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """Frequencies, FRC curve and pixels per ring (see :func:`frc`)."""
    a0, b0, m = _prepare(a, b, mask, remove_ramp)
    rows, cols = _bbox(m)
    sub_a, sub_b, sub_m = a0[rows, cols], b0[rows, cols], m[rows, cols]
    h, w = sub_m.shape
    n = min(h, w)
    if n < 8:
        raise ValueError(f"the masked region {sub_m.shape} is too small for an FRC (>= 8 x 8)")
    if taper is None:
        taper = max(n // 8, 1)
    if taper < 0:
        raise ValueError(f"taper must be >= 0 pixels, got {taper!r}")
    # soft mask: raised cosine over `taper` pixels inside the mask edge (and the crop's edge)
    dist = ndimage.distance_transform_edt(np.pad(sub_m, 1))[1:-1, 1:-1]
    if taper > 0:
        apod = 0.5 * (1.0 - np.cos(np.pi * np.clip(dist / (taper + 1), 0.0, 1.0)))
    else:
        apod = sub_m.astype(np.float64)
    fa = np.fft.fft2(sub_a * apod)
    fb = np.fft.fft2(sub_b * apod)
    k = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.fftfreq(w)[None, :])
    ring = np.rint(k * n).astype(np.int64)
    n_rings = n // 2 + 1
    keep = ring < n_rings
    ring = ring[keep]
    cross = np.bincount(ring, (fa * np.conj(fb)).real[keep], minlength=n_rings)
    pa = np.bincount(ring, (np.abs(fa) ** 2)[keep], minlength=n_rings)
    pb = np.bincount(ring, (np.abs(fb) ** 2)[keep], minlength=n_rings)
    counts = np.bincount(ring, minlength=n_rings)
    denom = np.sqrt(pa * pb)
    curve = np.full(n_rings, np.nan)
    np.divide(cross, denom, out=curve, where=denom > 0)
    freqs = np.arange(n_rings) / n
    return freqs, curve, counts


def frc(
    a: ArrayLike,
    b: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    taper: int | None = None,
    remove_ramp: bool = False,
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Fourier ring correlation of two images of the same region.

    Parameters
    ----------
    a, b : (H, W) float
        Two independent images of the same area (e.g. stitched from two scans, or an image and
        a reference), on the same grid.
    mask : (H, W) bool or None
        Region; ``None``: where both are finite. The images are cropped to the mask's bounding
        box and multiplied by a soft mask (below).
    taper : int or None
        Width in pixels of the raised-cosine apodisation inside the mask edge (from a distance
        transform), which suppresses the edge artefacts the two images would share. ``None``:
        one eighth of the crop's shorter side; 0: a hard mask.
    remove_ramp : bool
        Remove each image's plane instead of only its mean before the transform.

    Returns
    -------
    freqs : (n // 2 + 1,) float64
        Ring centres in cycles per pixel, 0 to 0.5 (Nyquist), ``n`` the crop's shorter side;
        rings are ``1 / n`` wide.
    curve : (n // 2 + 1,) float64
        ``Re sum(Fa conj(Fb)) / sqrt(sum|Fa|^2 sum|Fb|^2)`` per ring; NaN where a ring has no
        power. Identical images give 1 everywhere.
    """
    freqs, curve, _ = _frc_parts(a, b, mask, taper, remove_ramp)
    return freqs, curve


def frc_resolution(
    a: ArrayLike,
    b: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    threshold: Literal["half-bit", "1/7"] | float = "half-bit",
    pixel_size: float = 1.0,
    taper: int | None = None,
    remove_ramp: bool = False,
) -> float:
    """Resolution where the FRC of ``a`` and ``b`` first falls below a threshold.

    Parameters
    ----------
    a, b, mask, taper, remove_ramp
        As in :func:`frc`.
    threshold : {"half-bit", "1/7"} or float
        ``"half-bit"`` (default; van Heel & Schatz 2005, the usual criterion in X-ray
        ptychography for two independent images):
        ``T = (0.2071 + 1.9102 / sqrt(n_r)) / (1.2071 + 0.9102 / sqrt(n_r))`` with ``n_r`` the
        number of Fourier pixels in ring ``r``. ``"1/7"``: the constant 0.143 of Rosenthal &
        Henderson (2003). A float: that constant.
    pixel_size : float
        Size of one pixel (e.g. in nm); the result is in the same unit.

    Returns
    -------
    float
        The full period ``pixel_size / f`` at the first crossing (linear interpolation between
        rings, DC ring excluded); the half-period is half of it. If the FRC never falls below the
        threshold up to Nyquist, the Nyquist period ``2 * pixel_size`` (a bound: the images agree
        at every sampled frequency).
    """
    if not np.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be positive, got {pixel_size!r}")
    freqs, curve, counts = _frc_parts(a, b, mask, taper, remove_ramp)
    if isinstance(threshold, str):
        if threshold == "half-bit":
            sq = np.sqrt(np.maximum(counts, 1))
            thr = (0.2071 + 1.9102 / sq) / (1.2071 + 0.9102 / sq)
        elif threshold == "1/7":
            thr = np.full_like(curve, ONE_SEVENTH)
        else:
            raise ValueError(f"threshold must be 'half-bit', '1/7' or a number, got {threshold!r}")
    else:
        thr = np.full_like(curve, float(threshold))
    diff = curve - thr
    below = np.flatnonzero(diff[1:] < 0) + 1
    if below.size == 0:
        logger.info("FRC stays above the threshold up to Nyquist; returning the Nyquist period")
        return 2.0 * pixel_size
    i = int(below[0])
    f = freqs[i]
    if i > 1 and np.isfinite(diff[i - 1]) and diff[i - 1] > 0:
        f = freqs[i - 1] + (freqs[i] - freqs[i - 1]) * diff[i - 1] / (diff[i - 1] - diff[i])
    return float(pixel_size / f)


def compare(
    a: ArrayLike,
    b: ArrayLike,
    mask: ArrayLike | None = None,
    *,
    remove_ramp: bool = False,
    data_range: float | None = None,
) -> dict[str, float]:
    """SSIM, Pearson correlation and RMS error of ``b`` against the reference ``a`` at once.

    Parameters
    ----------
    a, b, mask, remove_ramp, data_range
        As in :func:`ssim`.

    Returns
    -------
    dict
        ``{"ssim": float, "pearson": float, "rms": float, "n_pixels": int}`` with plain Python
        numbers (JSON-serialisable; ``pearson`` may be NaN for a constant image).
    """
    a64, b64, m = _validate_pair(a, b, mask)
    return {
        "ssim": ssim(a64, b64, m, data_range, remove_ramp=remove_ramp),
        "pearson": pearson(a64, b64, m),
        "rms": rms_error(a64, b64, m, remove_ramp=remove_ramp),
        "n_pixels": int(m.sum()),
    }


# --------------------------------------------------------------------------------------------
# Scanned region
# --------------------------------------------------------------------------------------------


def scanned_mask(
    positions: ArrayLike,
    patch_shape: Sequence[int] = (FRAME_SIZE, FRAME_SIZE),
    shape: Sequence[int] | None = None,
    *,
    origin: Sequence[float] = (0.0, 0.0),
    inset: int = 0,
    min_count: int = 1,
    method: Literal["coverage", "hull"] = "coverage",
) -> NDArray[np.bool_]:
    """The scanned region of a grid, from the scan positions.

    Parameters
    ----------
    positions : (N, 2) float
        Top-left patch corners (row, col), as given to the stitcher.
    patch_shape : (int, int)
        Patch size (H, W).
    shape : (int, int)
        Grid shape (the stitched image's shape). Required.
    origin : (float, float)
        Position coordinate of grid pixel (0, 0) (the stitcher's ``origin``).
    inset : int
        Erode the region by this many pixels (a square structuring element; pixels within
        ``inset`` of the grid edge drop as well), e.g. to leave out the weakly illuminated rim
        of the outermost patches. 0 keeps the region as is.
    min_count : int
        ``method="coverage"``: a pixel is scanned when at least this many patches cover it.
        Footprints are the pixels the stitcher fills (H x W at an integer corner,
        (H - 1) x (W - 1) at a sub-pixel one), so with ``min_count=1, inset=0`` the mask equals
        ``IncrementalStitcher.mask`` for the same positions and no masked pixel is NaN.
    method : {"coverage", "hull"}
        ``"coverage"``: patch footprints counted on the grid. ``"hull"``: the convex hull of the
        patch centres (``position + (H - 1) / 2``), which lies half a patch inside the covered
        area and has a clean outline.

    Returns
    -------
    mask : (rows, cols) bool
    """
    if shape is None:
        raise ValueError("shape is required: pass the stitched image's shape")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or pos.shape[0] == 0:
        raise ValueError(f"positions must have shape (N, 2) with N >= 1, got {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError("positions contain NaN/inf; drop those points first")
    rows_n, cols_n = (int(shape[0]), int(shape[1]))
    h, w = (int(patch_shape[0]), int(patch_shape[1]))
    if int(inset) != inset or inset < 0:
        raise ValueError(f"inset must be a non-negative integer, got {inset!r}")
    grid_pos = pos - np.asarray(origin, dtype=np.float64)
    if method == "coverage":
        if int(min_count) < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count!r}")
        # the pixels the stitcher fills: H x W at integer corners, (H - 1) x (W - 1) otherwise
        lo = np.ceil(grid_pos - SNAP_TOLERANCE).astype(np.int64)
        hi = np.floor(grid_pos + np.array([h - 1, w - 1]) + SNAP_TOLERANCE).astype(np.int64) + 1
        r0 = np.clip(lo[:, 0], 0, rows_n)
        c0 = np.clip(lo[:, 1], 0, cols_n)
        r1 = np.clip(hi[:, 0], 0, rows_n)
        c1 = np.clip(hi[:, 1], 0, cols_n)
        diff = np.zeros((rows_n + 1, cols_n + 1), dtype=np.int64)
        np.add.at(diff, (r0, c0), 1)
        np.add.at(diff, (r0, c1), -1)
        np.add.at(diff, (r1, c0), -1)
        np.add.at(diff, (r1, c1), 1)
        count = np.cumsum(np.cumsum(diff, axis=0), axis=1)[:rows_n, :cols_n]
        region = count >= int(min_count)
    elif method == "hull":
        centres = grid_pos + np.array([(h - 1) / 2.0, (w - 1) / 2.0])
        try:
            tri = Delaunay(centres)
        except QhullError as exc:
            raise ValueError(
                "the convex hull needs at least 3 positions that are not on one line; use "
                "method='coverage'"
            ) from exc
        rr, cc = np.mgrid[0:rows_n, 0:cols_n]
        pts = np.column_stack([rr.ravel(), cc.ravel()]).astype(np.float64)
        region = (tri.find_simplex(pts) >= 0).reshape(rows_n, cols_n)
    else:
        raise ValueError(f"method must be 'coverage' or 'hull', got {method!r}")
    return _erode(region, int(inset))

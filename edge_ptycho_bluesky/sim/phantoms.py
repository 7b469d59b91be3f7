"""Phase-only sample phantoms with a fixed refractive-index range.

The sample is a patterned film: thickness ``t`` (nm) between 0 and ``max_thickness_nm`` of a
material with refractive-index decrement ``delta``; its transmission is ``exp(-i k delta t)``
(pure phase, no absorption). Every phantom also carries a weak, smooth texture (surface roughness
and grain), as real samples do: a flat noiseless background makes SSIM meaningless.

* :func:`etched_features` - random rectangles, disks and lines (training samples).
* :func:`varied_features` - etched features with Siemens-star sectors, line gratings, grainy
  natural-image-like textures and words in several fonts (a diverse training corpus).
* :func:`letters` - text and shapes never seen in training (test samples).
"""

from __future__ import annotations

import numpy as np
from matplotlib.font_manager import FontProperties
from matplotlib.path import Path as MplPath
from matplotlib.textpath import TextPath
from numpy.typing import NDArray
from scipy import ndimage

from .geometry import Geometry

#: Refractive-index decrement of the default material (tungsten-like, ~10 keV).
DELTA_DEFAULT = 3.0e-5
#: Default feature height (nm): with DELTA_DEFAULT at 10 keV the phase spans about 0 to -1.5 rad.
MAX_THICKNESS_DEFAULT_NM = 1000.0


def thickness_to_transmission(
    thickness_nm: NDArray[np.floating], geometry: Geometry = Geometry(), delta: float = DELTA_DEFAULT
) -> NDArray[np.complex64]:
    """Pure-phase transmission ``exp(-2 pi i delta t / lambda)`` of a thickness map (nm)."""
    phase = -2 * np.pi * delta * np.asarray(thickness_nm) / geometry.wavelength_nm
    return np.exp(1j * phase).astype(np.complex64)


def _texture(shape: tuple[int, int], rng: np.random.Generator, sigma: float = 3.0) -> NDArray[np.float64]:
    """Smooth random field scaled to [0, 1]."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    field -= field.min()
    return field / max(field.max(), 1e-12)


def _finish(features: NDArray[np.float64], rng: np.random.Generator, max_thickness_nm: float,
            texture: float) -> NDArray[np.float64]:
    """Soften edges, add the texture, scale to thickness in nm."""
    features = ndimage.gaussian_filter(np.clip(features, 0, 1), 0.7)
    grain = 0.6 * _texture(features.shape, rng, 1.5) + 0.4 * _texture(features.shape, rng, 8.0)
    thickness = (1 - texture) * features + texture * grain
    return np.clip(thickness, 0, 1) * max_thickness_nm


def etched_features(
    shape: tuple[int, int],
    rng: np.random.Generator | int | None = None,
    *,
    density: float = 1.0,
    max_thickness_nm: float = MAX_THICKNESS_DEFAULT_NM,
    texture: float = 0.25,
) -> NDArray[np.float64]:
    """Random etched features (rectangles, disks, lines, with random heights): a training sample.

    Parameters
    ----------
    shape
        Object array shape (rows, cols) in object pixels.
    rng
        Random generator or seed.
    density
        Features per 32 x 32 pixel area.
    max_thickness_nm
        Thickness of the tallest feature.
    texture
        Weight of the smooth random texture (0: none).

    Returns
    -------
    thickness : (rows, cols) float64
        Thickness in nm, in ``[0, max_thickness_nm]``.
    """
    rng = np.random.default_rng(rng)
    _check_shape(shape)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    features = np.zeros(shape)
    count = max(1, int(density * shape[0] * shape[1] / 32**2))
    for _ in range(count):
        r0, c0 = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        height = rng.uniform(0.3, 1.0)
        kind = rng.integers(3)
        if kind == 0:  # rotated rectangle
            h, w, angle = rng.uniform(3, 20), rng.uniform(3, 20), rng.uniform(0, np.pi)
            u = (rows - r0) * np.cos(angle) + (cols - c0) * np.sin(angle)
            v = -(rows - r0) * np.sin(angle) + (cols - c0) * np.cos(angle)
            mask = (np.abs(u) < h / 2) & (np.abs(v) < w / 2)
        elif kind == 1:  # disk
            mask = (rows - r0) ** 2 + (cols - c0) ** 2 < rng.uniform(2, 10) ** 2
        else:  # line
            angle, width = rng.uniform(0, np.pi), rng.uniform(1, 3)
            dist = np.abs((rows - r0) * np.cos(angle) - (cols - c0) * np.sin(angle))
            along = np.abs((rows - r0) * np.sin(angle) + (cols - c0) * np.cos(angle))
            mask = (dist < width / 2) & (along < rng.uniform(10, 40))
        features = np.where(mask, np.maximum(features, height), features)
    return _finish(features, rng, max_thickness_nm, texture)


#: Words and font families :func:`varied_features` writes (never the test sample's text).
_WORDS = ("beam", "zone", "lens", "wafer", "grain", "pixel", "spiral", "sample", "edge", "photon", "93", "2k")
_FAMILIES = ("sans-serif", "serif", "monospace")


def varied_features(
    shape: tuple[int, int],
    rng: np.random.Generator | int | None = None,
    *,
    max_thickness_nm: float = MAX_THICKNESS_DEFAULT_NM,
    texture: float = 0.25,
) -> NDArray[np.float64]:
    """A diverse training sample: etched features, Siemens-star sectors, line gratings,
    natural-image-like grainy patches and short words in several fonts, at random places and
    heights.

    Parameters and return value as :func:`etched_features`.
    """
    rng = np.random.default_rng(rng)
    _check_shape(shape)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    features = etched_features(shape, rng, density=0.5, max_thickness_nm=1.0, texture=0.0)
    area = shape[0] * shape[1]
    for _ in range(max(1, area // 96**2)):
        r0, c0 = rng.uniform(0, shape[0]), rng.uniform(0, shape[1])
        height, kind = rng.uniform(0.3, 1.0), rng.integers(3)
        if kind == 0:  # Siemens-star sector
            radius, spokes = rng.uniform(15, 45), int(rng.integers(6, 20))
            angle = np.arctan2(rows - r0, cols - c0)
            mask = (np.hypot(rows - r0, cols - c0) < radius) & (np.cos(spokes * angle) > 0)
        elif kind == 1:  # line grating
            period, angle, half = rng.uniform(3, 12), rng.uniform(0, np.pi), rng.uniform(8, 30)
            u = (rows - r0) * np.cos(angle) + (cols - c0) * np.sin(angle)
            v = -(rows - r0) * np.sin(angle) + (cols - c0) * np.cos(angle)
            mask = (np.abs(u) < half) & (np.abs(v) < half) & (np.mod(u, period) < period / 2)
        else:  # grainy, natural-image-like patch
            grain = _texture(shape, rng, rng.uniform(1.0, 4.0))
            mask = (np.hypot(rows - r0, cols - c0) < rng.uniform(10, 35)) & (grain > rng.uniform(0.4, 0.6))
        features = np.where(mask, np.maximum(features, height), features)
    words = np.zeros(shape)
    for _ in range(max(1, area // 128**2)):
        size = rng.uniform(10, 28)
        font = FontProperties(family=str(rng.choice(_FAMILIES)), weight=str(rng.choice(("normal", "bold"))))
        word = str(rng.choice(_WORDS))
        path = TextPath((rng.uniform(0, max(shape[1] - 3 * size, 1)), rng.uniform(0, shape[0] - size)), word,
                        size=size, prop=font)
        for polygon in path.to_polygons():
            _toggle_inside(words, polygon)
    features = np.where(words > 0, np.maximum(features, rng.uniform(0.4, 1.0)), features)
    return _finish(features, rng, max_thickness_nm, texture)


def letters(
    shape: tuple[int, int],
    text: str = "APS AI ptycho",
    rng: np.random.Generator | int | None = None,
    *,
    max_thickness_nm: float = MAX_THICKNESS_DEFAULT_NM,
    texture: float = 0.25,
    font_px: float | None = None,
) -> NDArray[np.float64]:
    """Letters tiled over the object, plus a few rings and triangles: a test sample.

    Parameters
    ----------
    shape
        Object array shape (rows, cols).
    text
        Text to write; it is repeated on lines to fill the object.
    rng
        Random generator or seed (for the texture and the shapes' places).
    font_px
        Letter height in pixels (default: ``rows / 8``, at least 12).

    Returns
    -------
    thickness : (rows, cols) float64
        Thickness in nm, in ``[0, max_thickness_nm]``.
    """
    rng = np.random.default_rng(rng)
    _check_shape(shape)
    if not text.strip():
        raise ValueError("text must contain at least one visible character")
    size = font_px or max(12.0, shape[0] / 8)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    features = np.zeros(shape)
    line_height = 1.4 * size
    for i, baseline in enumerate(np.arange(shape[0] - 1.2 * size, 0, -line_height)):
        x = -((i * 2.7 * size) % (len(text) * 0.6 * size))
        while x < shape[1]:
            path = TextPath((x, baseline), text + "  ", size=size)
            for polygon in path.to_polygons():
                _toggle_inside(features, polygon)  # even-odd fill keeps the holes of letters
            x += path.get_extents().width + size
    for _ in range(max(1, shape[0] * shape[1] // 64**2)):
        r0, c0, radius = rng.uniform(0, shape[0]), rng.uniform(0, shape[1]), rng.uniform(4, 10)
        ring = np.abs(np.hypot(rows - r0, cols - c0) - radius) < 1.2
        features = np.where(ring, 0.6, features)
    return _finish(features, rng, max_thickness_nm, texture)


def _toggle_inside(features: NDArray[np.float64], polygon: NDArray[np.float64]) -> None:
    """Flip ``features`` (0 <-> 1) at pixel centres inside ``polygon`` (x right, y up)."""
    n_rows, n_cols = features.shape
    c0, c1 = max(int(polygon[:, 0].min()), 0), min(int(np.ceil(polygon[:, 0].max())) + 1, n_cols)
    r0 = max(int(n_rows - polygon[:, 1].max()) - 1, 0)
    r1 = min(int(np.ceil(n_rows - polygon[:, 1].min())) + 1, n_rows)
    if c0 >= c1 or r0 >= r1:
        return
    rr, cc = np.mgrid[r0:r1, c0:c1]
    points = np.column_stack([cc.ravel() + 0.5, n_rows - rr.ravel() - 0.5])
    inside = MplPath(polygon).contains_points(points).reshape(rr.shape)
    block = features[r0:r1, c0:c1]
    block[inside] = 1.0 - block[inside]


def _check_shape(shape: tuple[int, int]) -> None:
    if len(shape) != 2 or min(shape) < 16:
        raise ValueError(f"phantom shape must be (rows, cols) with both >= 16, got {shape!r}")

"""Tests for edge_ptycho_bluesky.stitching: placement, averaging, weights, incremental == batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_ptycho_bluesky.stitching import IncrementalStitcher, _bincount_accumulate, stitch
from edge_ptycho_bluesky.stitching_grid import PhysicalGrid, grid_from_positions, positions_from_physical

P = 32  # patch side used in most tests (keeps the suite fast); 128 is checked once below
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smooth(r: np.ndarray, c: np.ndarray) -> np.ndarray:
    """A smooth test image f(r, c) evaluated at continuous coordinates (|f''| <= ~0.02)."""
    return (
        np.sin(2 * np.pi * r / 50.0) * np.cos(2 * np.pi * c / 65.0)
        + 0.5 * np.sin(2 * np.pi * (r + 0.7 * c) / 80.0)
    )


def spiral(n: int, step: float, centre: float) -> np.ndarray:
    """Fermat-spiral corners (n, 2), sub-pixel, around `centre`."""
    k = np.arange(n)
    rad = step * 0.56 * np.sqrt(k)
    th = k * np.pi * (3 - np.sqrt(5))
    return np.stack([rad * np.sin(th), rad * np.cos(th)], axis=1) + centre


def cut(f, positions: np.ndarray, p: int = P) -> np.ndarray:
    """Patches (N, p, p) float32 sampled exactly from the analytic image at the positions."""
    i = np.arange(p)
    rr = positions[:, 0, None, None] + i[None, :, None]
    cc = positions[:, 1, None, None] + i[None, None, :]
    return f(rr + 0 * cc, cc + 0 * rr).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Placement and accuracy
# ------------------------------------------------------------------------------------------


def test_integer_shifts_reproduce_image_exactly() -> None:
    rng = np.random.default_rng(1)
    obj = rng.standard_normal((120, 130)).astype(np.float32)  # not smooth: exactness matters
    pos = rng.integers(0, [120 - P + 1, 130 - P + 1], size=(40, 2)).astype(float)
    patches = np.stack([obj[r:r + P, c:c + P] for r, c in pos.astype(int)])
    image, coverage = stitch(patches, pos, shape=obj.shape)
    covered = coverage > 0
    assert covered.sum() > 0.5 * obj.size
    np.testing.assert_array_equal(image[covered], obj[covered])
    assert np.isnan(image[~covered]).all()
    # without a weight map the coverage is the number of patches over each pixel
    count = np.zeros(obj.shape)
    for r, c in pos.astype(int):
        count[r:r + P, c:c + P] += 1
    np.testing.assert_array_equal(coverage, count)


def test_subpixel_linear_image_is_exact() -> None:
    """Bilinear interpolation reproduces a linear ramp, so any misplacement would show."""
    def ramp(r, c):
        return 0.3 * r - 0.2 * c + 5.0

    pos = spiral(60, 6.0, 50.0) + 0.123
    shape = (140, 140)
    image, coverage = stitch(cut(ramp, pos), pos, shape=shape)
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    covered = coverage > 0
    assert covered.sum() > 3000
    np.testing.assert_allclose(image[covered], ramp(rr, cc)[covered], atol=2e-4)


def test_subpixel_smooth_image_within_interpolation_bound() -> None:
    """Bilinear error <= (|f_rr| + |f_cc|) / 8 per pixel; here that bound is ~0.008."""
    pos = spiral(80, 5.0, 60.0)
    assert np.any(np.abs(pos - np.round(pos)) > 0.1)  # genuinely sub-pixel
    shape = (160, 160)
    image, coverage = stitch(cut(smooth, pos), pos, shape=shape)
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    covered = coverage > 0
    err = np.abs(image[covered] - smooth(rr, cc)[covered])
    bound = ((2 * np.pi / 50) ** 2 + (2 * np.pi / 65) ** 2 + 0.5 * (2 * np.pi / 80) ** 2 * 1.49)
    assert err.max() < bound / 8 + 1e-5
    assert err.max() < 0.01


def test_matches_bincount_reference() -> None:
    """The per-patch slice loop and a fully vectorised np.bincount scatter agree."""
    rng = np.random.default_rng(2)
    pos = spiral(50, 4.0, 45.0)
    patches = rng.standard_normal((50, P, P)).astype(np.float32)
    shape, origin = grid_from_positions(pos, (P, P))
    st = IncrementalStitcher(shape, origin, patch_shape=(P, P))
    st.add(patches, pos)
    grid_pos = pos - np.asarray(origin)
    corner = np.floor(grid_pos).astype(np.int64)
    num, den = _bincount_accumulate(shape, patches, corner, grid_pos - corner)
    np.testing.assert_allclose(st.coverage, den, rtol=0, atol=1e-6)
    expected = np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)
    np.testing.assert_allclose(st.image, expected, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_full_size_patches_128() -> None:
    pos = np.array([[0.0, 0.0], [10.5, 20.25], [30.0, 5.75]])
    patches = cut(smooth, pos, 128)
    image, coverage = stitch(patches, pos, shape=(170, 160))
    assert image.dtype == np.float32 and coverage.dtype == np.float32
    assert image.shape == coverage.shape == (170, 160)
    # an integer patch covers 128 x 128 pixels, a sub-pixel one 127 x 127
    assert coverage[0:128, 0:128].min() >= 1
    assert coverage.max() == 3


def test_tight_grid_and_explicit_origin() -> None:
    pos = spiral(30, 5.0, 0.0)  # negative coordinates
    patches = cut(smooth, pos)
    shape, origin = grid_from_positions(pos, (P, P), margin=3)
    assert origin == (int(np.floor(pos[:, 0].min())) - 3, int(np.floor(pos[:, 1].min())) - 3)
    img_tight, cov_tight = stitch(patches, pos, margin=3)
    img_expl, cov_expl = stitch(patches, pos, shape=shape, origin=origin)
    assert img_tight.shape == shape
    np.testing.assert_array_equal(cov_tight, cov_expl)
    np.testing.assert_array_equal(img_tight, img_expl)
    # three free rows/cols on the low side
    assert not cov_tight[:3].any() and not cov_tight[:, :3].any()
    assert cov_tight[3:].any()


def test_fill_value_and_mask() -> None:
    pos = np.array([[2.0, 3.0]])
    st = IncrementalStitcher((50, 50), patch_shape=(P, P), fill=0.0)
    st.add(np.ones((1, P, P), np.float32), pos)
    assert st.image[0, 0] == 0.0
    assert st.mask.sum() == P * P
    assert st.mask[2:2 + P, 3:3 + P].all()
    assert st.n_patches == 1
    image, coverage = st.snapshot()
    np.testing.assert_array_equal(image, st.image)
    np.testing.assert_array_equal(coverage, st.coverage)
    st.reset()
    assert st.n_patches == 0 and not st.mask.any() and not st.coverage.any()


# ------------------------------------------------------------------------------------------
# Incremental == batch
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("weighted", [False, True])
def test_incremental_equals_batch(weighted: bool) -> None:
    rng = np.random.default_rng(3)
    n = 150
    pos = spiral(n, 5.0, 70.0)
    patches = (cut(smooth, pos) + 0.1 * rng.standard_normal((n, P, P))).astype(np.float32)
    weight = None
    if weighted:
        yy, xx = np.mgrid[0:P, 0:P] - (P - 1) / 2
        weight = np.exp(-(yy**2 + xx**2) / (2 * 8.0**2))
    shape, origin = grid_from_positions(pos, (P, P), margin=2)
    image_b, cov_b = stitch(patches, pos, shape=shape, weight=weight, origin=origin)

    st = IncrementalStitcher.from_positions(pos, patch_shape=(P, P), margin=2, weight=weight)
    assert st.shape == shape and st.origin == origin
    start = 0
    for size in [1, 7, 16, 64, 1, 3]:  # then the rest, one by one
        st.add(patches[start:start + size], pos[start:start + size])
        start += size
    for k in range(start, n):
        st.add(patches[k], pos[k])  # single (H, W) patch and (2,) position
    assert st.n_patches == n
    np.testing.assert_allclose(st.coverage, cov_b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(st.image, image_b, rtol=1e-6, atol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(np.isnan(st.image), np.isnan(image_b))


def test_incremental_chunk_size_does_not_matter() -> None:
    pos = spiral(40, 5.0, 50.0)
    patches = cut(smooth, pos)
    a = IncrementalStitcher.from_positions(pos, patch_shape=(P, P), chunk_size=1)
    b = IncrementalStitcher.from_positions(pos, patch_shape=(P, P), chunk_size=64)
    a.add(patches, pos)
    b.add(patches, pos)
    np.testing.assert_array_equal(a.image, b.image)


# ------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------


def test_weighted_average_by_hand() -> None:
    """Two overlapping patches of constants 1 and 3 with weight maps: value = sum(w v) / sum(w)."""
    weight = np.ones((P, P))
    weight[:, : P // 2] = 3.0  # left half weighs 3
    patches = np.stack([np.full((P, P), 1.0), np.full((P, P), 3.0)]).astype(np.float32)
    pos = np.array([[0.0, 0.0], [0.0, P // 2]])  # second patch shifted right by half
    image, coverage = stitch(patches, pos, shape=(P, P + P // 2), weight=weight)
    # overlap columns P/2..P-1: patch 0's right half (w=1) and patch 1's left half (w=3)
    overlap = image[:, P // 2:P]
    np.testing.assert_allclose(overlap, (1 * 1 + 3 * 3) / (1 + 3), rtol=1e-6)
    np.testing.assert_allclose(coverage[:, P // 2:P], 4.0)
    np.testing.assert_allclose(image[:, : P // 2], 1.0)
    np.testing.assert_allclose(image[:, P:], 3.0)
    # unweighted: the plain mean
    image_u, coverage_u = stitch(patches, pos, shape=(P, P + P // 2))
    np.testing.assert_allclose(image_u[:, P // 2:P], 2.0)
    np.testing.assert_array_equal(coverage_u[:, P // 2:P], 2.0)


def test_weighted_consistent_patches_give_image_and_zero_weight_is_uncovered() -> None:
    yy, xx = np.mgrid[0:P, 0:P] - (P - 1) / 2
    weight = np.exp(-(yy**2 + xx**2) / (2 * 6.0**2))
    weight[np.hypot(yy, xx) > P / 2 - 1] = 0.0  # a disc, zero in the corners
    pos = np.array([[10.0, 10.0], [14.0, 19.0], [22.0, 12.0]])
    image, coverage = stitch(cut(smooth, pos), pos, shape=(70, 70), weight=weight)
    rr, cc = np.mgrid[0:70, 0:70]
    covered = coverage > 0
    np.testing.assert_allclose(image[covered], smooth(rr, cc)[covered], atol=1e-5)
    assert coverage[10, 10] == 0 and np.isnan(image[10, 10])  # a zero-weight corner


# ------------------------------------------------------------------------------------------
# Physical positions
# ------------------------------------------------------------------------------------------


def test_positions_from_physical_centres_the_beam() -> None:
    px = 10e-9
    centres = np.array([[0.0, 0.0], [50e-9, -120e-9], [-300e-9, 75e-9]])  # (y, x) metres
    pix = positions_from_physical(centres, px, patch_shape=(128, 128), margin=2)
    assert pix.min(axis=0).tolist() == pytest.approx([2.0, 2.0])
    # differences are the physical differences in pixels
    np.testing.assert_allclose(pix[1] - pix[0], [5.0, -12.0])
    grid = PhysicalGrid.from_positions(centres, px, patch_shape=(128, 128), margin=2)
    np.testing.assert_allclose(grid.to_pixels(centres), pix)
    np.testing.assert_allclose(grid.to_physical(pix), centres, atol=1e-15)
    # the beam centre is patch pixel (64, 64): corner + 64 is the centre in grid pixels
    centre_pix = (centres - np.asarray(grid.origin)) / px
    np.testing.assert_allclose(pix + 64, centre_pix)
    # (x, y) input swaps the axes
    pix_xy = positions_from_physical(centres[:, ::-1], px, order="xy", margin=2)
    np.testing.assert_allclose(pix_xy, pix)
    # a fixed origin maps later batches consistently
    later = grid.to_pixels(np.array([[10e-9, 10e-9]]))
    np.testing.assert_allclose(later[0], pix[0] + 1.0)
    explicit = positions_from_physical(centres, px, origin=grid.origin)
    np.testing.assert_allclose(explicit, pix)


def test_real_spiral_positions_from_metres() -> None:
    """The 961 measured positions of APS scan 235 (metres, x, y) at 6.82 nm pixels."""
    path = SHARED_DATA / "pos235.csv"
    if not path.exists():
        pytest.skip(f"reference data not found at {path} (workspace-only file)")
    xy = np.loadtxt(path, delimiter=",")
    assert xy.shape == (961, 2)
    p = 64
    pos = positions_from_physical(xy, 6.82e-9, patch_shape=(p, p), order="xy")
    assert pos.min() == pytest.approx(0.0)
    image, coverage = stitch(cut(smooth, pos, p), pos, shape=None)
    shape, origin = grid_from_positions(pos, (p, p))
    assert origin == (0, 0) and image.shape == shape
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    covered = coverage > 0
    assert covered.mean() > 0.5
    assert coverage.max() > 10  # an overlapping scan (64-pixel patches here)
    np.testing.assert_allclose(image[covered], smooth(rr, cc)[covered], atol=0.004)


def test_physical_grid_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="pixel_size"):
        PhysicalGrid((0.0, 1e-9), (0.0, 0.0))
    with pytest.raises(ValueError, match="order"):
        positions_from_physical(np.zeros((2, 2)), 1e-9, order="yx")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


def test_errors() -> None:
    patches = np.zeros((3, P, P), np.float32)
    pos = np.zeros((3, 2))
    with pytest.raises(ValueError, match="3 patches but 2 positions"):
        stitch(patches, pos[:2], shape=(64, 64))
    with pytest.raises(ValueError, match="expects"):
        IncrementalStitcher((64, 64), patch_shape=(P, P)).add(np.zeros((3, 16, 16)), pos)
    with pytest.raises(ValueError, match=r"shape \(N, H, W\)"):
        stitch(np.zeros((2, 3, P, P)), np.zeros((2, 2)))
    bad = pos.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite.*index 1"):
        stitch(patches, bad, shape=(64, 64))
    with pytest.raises(ValueError, match="empty"):
        stitch(np.zeros((0, P, P)), np.zeros((0, 2)), shape=(64, 64))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        stitch(patches, np.zeros((3, 3)), shape=(64, 64))
    nan_patch = patches.copy()
    nan_patch[2, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf values, first at index 2"):
        stitch(nan_patch, pos, shape=(64, 64))
    with pytest.raises(TypeError, match="complex"):
        stitch(patches.astype(np.complex64), pos, shape=(64, 64))
    with pytest.raises(ValueError, match="weight has shape"):
        stitch(patches, pos, shape=(64, 64), weight=np.ones((4, 4)))
    with pytest.raises(ValueError, match=">= 0"):
        stitch(patches, pos, shape=(64, 64), weight=-np.ones((P, P)))
    with pytest.raises(ValueError, match="zero everywhere"):
        stitch(patches, pos, shape=(64, 64), weight=np.zeros((P, P)))
    with pytest.raises(ValueError, match="smaller than one patch"):
        IncrementalStitcher((16, 64), patch_shape=(P, P))
    with pytest.raises(ValueError, match="origin was given without shape"):
        stitch(patches, pos, origin=(0, 0))


def test_outside_grid_raises_and_adds_nothing() -> None:
    st = IncrementalStitcher((64, 64), patch_shape=(P, P))
    st.add(np.ones((1, P, P)), [[0.0, 0.0]])
    before = st.coverage.copy()
    patches = np.ones((3, P, P))
    pos = np.array([[5.0, 5.0], [32.0, 32.0], [32.5, 0.0]])  # the last one overhangs by 0.5
    with pytest.raises(ValueError, match=r"1 of 3 patches fall outside.*index 2"):
        st.add(patches, pos)
    np.testing.assert_array_equal(st.coverage, before)
    assert st.n_patches == 1
    with pytest.raises(ValueError, match="outside"):
        st.add(patches[:1], [[-0.25, 3.0]])
    # the exact edge (corner = shape - patch) and float noise around integers are accepted
    st.add(patches[:2], [[32.0, 32.0], [32.0 + 1e-9, -1e-9]])
    assert st.n_patches == 3
    assert st.coverage[63, 63] == 1 and st.coverage[63, 0] == 1

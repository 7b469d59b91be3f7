"""Tests for edge_ptycho_bluesky.metrics: SSIM, Pearson, RMS, FRC, compare, scanned_mask."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from edge_ptycho_bluesky.metrics import (
    compare,
    frc,
    frc_resolution,
    pearson,
    rms_error,
    scanned_mask,
    ssim,
)
from edge_ptycho_bluesky.stitching import IncrementalStitcher


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    """A (160, 160) broadband phase-like image (smoothed noise, unit variance)."""
    rng = np.random.default_rng(0)
    img = ndimage.gaussian_filter(rng.standard_normal((160, 160)), 2.5)
    return img / img.std()


@pytest.fixture(scope="module")
def ramp() -> np.ndarray:
    rr, cc = np.mgrid[0:160, 0:160]
    return 0.02 * rr - 0.015 * cc


# ------------------------------------------------------------------------------------------
# SSIM
# ------------------------------------------------------------------------------------------


def test_ssim_identity_and_offset(image: np.ndarray) -> None:
    assert ssim(image, image) == pytest.approx(1.0, abs=1e-12)
    assert ssim(image, image + 2.5) == pytest.approx(1.0, abs=1e-9)
    assert ssim(image, image - 7.0, remove_ramp=True) == pytest.approx(1.0, abs=1e-9)


def test_ssim_ramp_removal(image: np.ndarray, ramp: np.ndarray) -> None:
    tilted = image + ramp + 1.0
    assert ssim(image, tilted) < 0.9
    assert ssim(image, tilted, remove_ramp=True) == pytest.approx(1.0, abs=1e-9)
    # a ramp in both images is kept by default and removed by remove_ramp, both giving 1
    assert ssim(image + ramp, image + ramp) == pytest.approx(1.0, abs=1e-12)


def test_ssim_decreases_with_noise(image: np.ndarray) -> None:
    rng = np.random.default_rng(1)
    noise = rng.standard_normal(image.shape)
    values = [ssim(image, image + s * noise) for s in (0.05, 0.2, 0.5, 1.0)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] > 0.9 and values[-1] < 0.6
    # a larger data_range makes the SSIM constants larger, hence the score higher
    rng_ref = float(image.max() - image.min())
    assert ssim(image, image + 0.5 * noise, data_range=4 * rng_ref) > values[2]
    assert ssim(image, image + 0.5 * noise, data_range=rng_ref) == pytest.approx(values[2])


def test_ssim_mask_and_nan_outside(image: np.ndarray) -> None:
    rng = np.random.default_rng(2)
    mask = np.zeros(image.shape, bool)
    mask[30:120, 40:140] = True
    test = image + 0.3 * rng.standard_normal(image.shape)
    test[~mask] = image[~mask]  # outside the mask the images agree perfectly...
    full = ssim(image, test)
    inside = ssim(image, test, mask=mask)
    assert inside < full  # ...so scoring only the mask is lower
    # NaN outside the mask (a stitched image) is fine, and mask=None picks the finite region
    nan_test = np.where(mask, test, np.nan)
    assert ssim(image, nan_test, mask=mask) == pytest.approx(inside)
    assert ssim(image, nan_test) == pytest.approx(inside)
    # the score does not depend on what lies outside the mask
    other = np.where(mask, test, 100.0)
    assert ssim(image, other, mask=mask) == pytest.approx(inside)


def test_ssim_gaussian_window(image: np.ndarray) -> None:
    rng = np.random.default_rng(3)
    noisy = image + 0.3 * rng.standard_normal(image.shape)
    g = ssim(image, noisy, gaussian_weights=True)
    u = ssim(image, noisy)
    assert 0 < g < 1 and 0 < u < 1 and g != u
    with pytest.raises(ValueError, match="11-tap"):
        ssim(image, noisy, gaussian_weights=True, win_size=7)
    with pytest.raises(ValueError, match="odd"):
        ssim(image, noisy, win_size=8)


# ------------------------------------------------------------------------------------------
# Pearson, RMS, compare
# ------------------------------------------------------------------------------------------


def test_pearson(image: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    assert pearson(image, image) == pytest.approx(1.0)
    assert pearson(image, -3 * image + 1) == pytest.approx(-1.0)
    noise = rng.standard_normal(image.shape)
    assert abs(pearson(image, noise)) < 0.1
    assert pearson(image, image + 0.5 * noise) > 0.8
    assert np.isnan(pearson(image, np.ones_like(image)))


def test_rms_error(image: np.ndarray, ramp: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    assert rms_error(image, image + 4.0) == pytest.approx(0.0, abs=1e-12)
    noise = rng.standard_normal(image.shape)
    assert rms_error(image, image + 0.1 * noise) == pytest.approx(0.1, rel=0.05)
    assert rms_error(image, image + ramp) > 0.3
    assert rms_error(image, image + ramp, remove_ramp=True) == pytest.approx(0.0, abs=1e-10)


def test_compare_dict(image: np.ndarray) -> None:
    rng = np.random.default_rng(6)
    noisy = image + 0.2 * rng.standard_normal(image.shape)
    out = compare(image, noisy)
    assert set(out) == {"ssim", "pearson", "rms", "n_pixels"}
    assert out["ssim"] == pytest.approx(ssim(image, noisy))
    assert out["pearson"] == pytest.approx(pearson(image, noisy))
    assert out["rms"] == pytest.approx(rms_error(image, noisy))
    assert out["n_pixels"] == image.size
    assert json.loads(json.dumps(out)) == out  # plain Python numbers


# ------------------------------------------------------------------------------------------
# FRC
# ------------------------------------------------------------------------------------------


def test_frc_identical_is_one(image: np.ndarray) -> None:
    freqs, curve = frc(image, image)
    assert freqs[0] == 0 and freqs[-1] == pytest.approx(0.5)
    assert freqs.shape == curve.shape == (81,)
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)


def test_frc_falls_with_noise(image: np.ndarray) -> None:
    rng = np.random.default_rng(7)
    res = []
    for s in (0.1, 0.5, 2.0):
        n1 = image + s * rng.standard_normal(image.shape)
        n2 = image + s * rng.standard_normal(image.shape)
        freqs, curve = frc(n1, n2)
        assert curve[1:8].mean() > 0.8  # signal dominates at low frequency
        assert abs(curve[freqs > 0.35].mean()) < 0.2  # noise dominates at high frequency
        res.append(frc_resolution(n1, n2))
        r7 = frc_resolution(n1, n2, threshold="1/7", pixel_size=6.8)
        assert 2 * 6.8 <= r7 < 160 * 6.8
    assert 2.0 < res[0] < res[1] < res[2] < 80.0
    # identical images agree up to Nyquist: the bound is the Nyquist period
    assert frc_resolution(image, image, pixel_size=10.0) == pytest.approx(20.0)


def test_frc_with_mask(image: np.ndarray) -> None:
    mask = np.zeros(image.shape, bool)
    mask[20:100, 10:150] = True
    freqs, curve = frc(image, np.where(mask, image, np.nan), mask=mask)
    assert freqs.shape == (41,)  # rings of the 80-pixel side
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)


# ------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("func", [ssim, pearson, rms_error, frc, frc_resolution, compare])
def test_errors(func, image: np.ndarray) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match="shape mismatch"):
        func(image, image[:-1])
    with pytest.raises(ValueError, match="empty mask"):
        func(image, image, mask=np.zeros(image.shape, bool))
    with pytest.raises(ValueError, match="empty mask"):
        func(image, np.full_like(image, np.nan))
    with pytest.raises(ValueError, match="mask has shape"):
        func(image, image, mask=np.ones((3, 3), bool))
    bad = image.copy()
    bad[5, 5] = np.nan
    with pytest.raises(ValueError, match="NaN/inf"):
        func(image, bad, mask=np.ones(image.shape, bool))
    with pytest.raises(TypeError, match="complex"):
        func(image.astype(complex), image)
    with pytest.raises(ValueError, match="2-D"):
        func(image[0], image[0])


def test_other_errors(image: np.ndarray) -> None:
    with pytest.raises(ValueError, match="data_range"):
        ssim(np.ones((20, 20)), np.ones((20, 20)))
    with pytest.raises(ValueError, match="data_range"):
        ssim(image, image, data_range=0.0)
    with pytest.raises(ValueError, match="threshold"):
        frc_resolution(image, image, threshold="one-bit")  # type: ignore[arg-type]
    small = np.zeros(image.shape, bool)
    small[10:14, 10:14] = True
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        ssim(image, image, mask=small)
    with pytest.raises(ValueError, match="too small"):
        frc(image, image, mask=small)


# ------------------------------------------------------------------------------------------
# scanned_mask
# ------------------------------------------------------------------------------------------


def test_scanned_mask_coverage() -> None:
    pos = np.array([[10.0, 20.0], [26.0, 36.0]])
    m = scanned_mask(pos, (32, 32), (80, 90))
    expected = np.zeros((80, 90), bool)
    expected[10:42, 20:52] = True
    expected[26:58, 36:68] = True
    np.testing.assert_array_equal(m, expected)
    both = scanned_mask(pos, (32, 32), (80, 90), min_count=2)
    assert both.sum() == 16 * 16 and both[26:42, 36:52].all()
    inset = scanned_mask(pos[:1], (32, 32), (80, 90), inset=4)
    assert inset.sum() == 24 * 24 and inset[14:38, 24:48].all()
    # an origin shifts everything; footprints are clipped to the grid
    shifted = scanned_mask(pos - 5.0, (32, 32), (80, 90), origin=(-5.0, -5.0))
    np.testing.assert_array_equal(shifted, m)
    clipped = scanned_mask(np.array([[-10.0, -10.0]]), (32, 32), (40, 40))
    assert clipped.sum() == 22 * 22


def test_scanned_mask_matches_stitcher_coverage() -> None:
    rng = np.random.default_rng(8)
    pos = rng.uniform(0, 60, size=(25, 2))
    pos[:5] = np.round(pos[:5])  # some integer corners too
    st = IncrementalStitcher((100, 100), patch_shape=(32, 32))
    st.add(np.ones((25, 32, 32)), pos)
    m = scanned_mask(pos, (32, 32), st.shape, origin=st.origin)
    np.testing.assert_array_equal(m, st.mask)
    m2 = scanned_mask(pos, (32, 32), st.shape, min_count=3, inset=2)
    assert m2.sum() < m.sum() and (st.coverage[m2] >= 3).all()
    # so the stitched image can be scored on it without NaN errors
    truth = np.ones((100, 100))
    assert compare(truth + np.arange(100) / 100, st.image + np.arange(100) / 100, m)["ssim"] > 0.99


def test_scanned_mask_hull() -> None:
    pos = np.array([[0.0, 0.0], [0.0, 40.0], [40.0, 0.0], [40.0, 40.0], [20.0, 20.0]])
    m = scanned_mask(pos, (17, 17), (60, 60), method="hull")
    # centres at pos + 8: the hull is the square [8, 48] x [8, 48]
    assert m[8:49, 8:49].all()
    assert m.sum() == 41 * 41
    m_in = scanned_mask(pos, (17, 17), (60, 60), method="hull", inset=3)
    assert m_in.sum() == 35 * 35
    with pytest.raises(ValueError, match="convex hull"):
        scanned_mask(pos[:2], (17, 17), (60, 60), method="hull")


def test_scanned_mask_errors() -> None:
    pos = np.zeros((3, 2))
    with pytest.raises(ValueError, match="shape is required"):
        scanned_mask(pos, (8, 8))
    with pytest.raises(ValueError, match="method"):
        scanned_mask(pos, (8, 8), (20, 20), method="circle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        scanned_mask(np.zeros((0, 2)), (8, 8), (20, 20))
    with pytest.raises(ValueError, match="NaN"):
        scanned_mask(np.array([[np.nan, 0.0]]), (8, 8), (20, 20))
    with pytest.raises(ValueError, match="inset"):
        scanned_mask(pos, (8, 8), (20, 20), inset=-1)

"""Physics checks of the simulator: Parseval, Friedel symmetry, overlap, Poisson statistics."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ptycho_bluesky.sim import (
    Geometry, beam_diameter_nm, diffraction, dose_photons_per_nm2, etched_features, fermat_spiral, letters,
    make_sample, overlap_ratio, paper_route, photon_counts, step_for_overlap, thickness_to_transmission,
    zone_plate_probe,
)

from .conftest import shared_file


def test_geometry_pixel_size_is_lambda_z_over_n_p():
    g = Geometry(energy_kev=10.0, detector_distance_m=0.9, detector_pixel_m=75e-6, frame_size=128)
    assert g.wavelength_nm == pytest.approx(0.12398, rel=1e-4)
    assert g.pixel_size_nm == pytest.approx(0.12398e-9 * 0.9 / (128 * 75e-6) * 1e9, rel=1e-4)
    assert set(g.as_dict()) >= {"energy_kev", "detector_distance_m", "pixel_size_nm", "wavelength_nm"}
    with pytest.raises(ValueError, match="energy_kev"):
        Geometry(energy_kev=-1)


def test_probe_is_a_donut_of_the_requested_size_and_flux():
    g = Geometry()
    probe = zone_plate_probe(g, beam_diameter_nm=800, photons_per_second=1e9)
    assert probe.shape == (128, 128) and probe.dtype == np.complex64
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1e9, rel=1e-5)
    diameter = beam_diameter_nm(probe, g.pixel_size_nm)
    assert 600 < diameter < 1000
    amplitude = np.abs(probe)
    ring = amplitude[64, 64 + int(0.4 * 800 / g.pixel_size_nm) - 4: 64 + int(0.4 * 800 / g.pixel_size_nm) + 4].max()
    assert amplitude[62:67, 62:67].mean() < 0.5 * ring  # dark centre: a donut
    with pytest.raises(ValueError, match="does not fit"):
        zone_plate_probe(g, beam_diameter_nm=5000)


def test_parseval_total_counts_equal_probe_power_times_exposure():
    sample = make_sample("train", extent_um=0.3, seed=3)
    xy = fermat_spiral(20, 0.05)
    intensity = sample.expected_intensity(xy, exposure_s=0.02)
    power = np.sum(np.abs(sample.probe) ** 2)
    np.testing.assert_allclose(intensity.sum(axis=(1, 2)), power * 0.02, rtol=1e-4)


def test_friedel_symmetry_for_a_weak_pure_phase_object_and_real_probe():
    rng = np.random.default_rng(0)
    n = 128
    rows, cols = np.mgrid[:n, :n] - n / 2
    probe = np.exp(-(rows**2 + cols**2) / (2 * 12.0**2)).astype(np.complex64)  # real, symmetric
    phase = 0.02 * rng.standard_normal((n + 8, n + 8))
    obj = np.exp(1j * phase)
    intensity = diffraction(obj, probe, np.array([[4.0, 4.0]]))[0].astype(np.float64)
    # |F(q)|^2 == |F(-q)|^2 for q away from the unscattered beam (to first order in the phase).
    flipped = np.roll(intensity[::-1, ::-1], (1, 1), axis=(0, 1))  # q -> -q about the centre pixel
    radius = np.hypot(rows, cols)
    scattered = radius > 20
    asym = np.abs(intensity - flipped)[scattered].sum() / intensity[scattered].sum()
    assert asym < 0.05
    # A strong phase object with a complex (defocused) probe breaks it.
    strong = np.exp(1j * 3 * rng.random((n + 8, n + 8)))
    donut = zone_plate_probe(Geometry())
    I2 = diffraction(strong, donut, np.array([[4.0, 4.0]]))[0]
    flipped2 = np.roll(I2[::-1, ::-1], (1, 1), axis=(0, 1))
    assert np.abs(I2 - flipped2)[scattered].sum() / I2[scattered].sum() > 0.1


def test_overlap_formula_and_its_inverse():
    assert overlap_ratio(50, 800) == pytest.approx(1 - np.sqrt(3) * 50 / 800)
    assert overlap_ratio(460, 800) == pytest.approx(0.0, abs=5e-3)
    assert overlap_ratio(2000, 800) == 0.0
    for overlap in (0.9, 0.6, 0.3, 0.0):
        assert overlap_ratio(step_for_overlap(overlap, 800), 800) == pytest.approx(overlap)
    assert dose_photons_per_nm2(np.pi * 100.0, 10.0) == pytest.approx(1.0)


def test_poisson_statistics():
    mean = np.full((200, 64, 64), 7.5)
    counts = photon_counts(mean, rng=1)
    assert counts.dtype == np.uint32
    assert counts.mean() == pytest.approx(7.5, rel=0.01)
    assert counts.var() == pytest.approx(7.5, rel=0.03)  # variance == mean
    assert photon_counts(np.full((4,), 1e12), rng=1, saturation=1000).max() == 1000


def test_fermat_spiral_geometry():
    xy = fermat_spiral(500, 0.05)
    r = np.hypot(xy[:, 0], xy[:, 1])
    np.testing.assert_allclose(r, 0.05 * np.sqrt(np.arange(500)))
    assert np.allclose(xy[0], 0)
    # Each point covers pi * step^2: the nearest neighbour is ~1.6 steps away, like the paper's route.
    from scipy.spatial import cKDTree
    nn = cKDTree(xy).query(xy, k=2)[0][:, 1]
    assert 1.4 < np.median(nn) / 0.05 < 1.9
    for bad in (0, -3):
        with pytest.raises(ValueError):
            fermat_spiral(bad, 0.05)
    with pytest.raises(ValueError):
        fermat_spiral(10, -0.05)
    with pytest.raises(TypeError):
        fermat_spiral(10.5, 0.05)


def test_paper_route_has_the_same_spiral_density():
    route = paper_route(0.05, shared_file("optimized_route.npz"))
    assert route.shape == (963, 2)
    from scipy.spatial import cKDTree
    ours = fermat_spiral(963, 0.05)
    nn_route = np.median(cKDTree(route).query(route, k=2)[0][:, 1])
    nn_ours = np.median(cKDTree(ours).query(ours, k=2)[0][:, 1])
    assert nn_route == pytest.approx(nn_ours, rel=0.1)


def test_phantoms_are_phase_only_within_the_refractive_index_range():
    g = Geometry()
    for thickness in (etched_features((96, 96), 1), letters((96, 96), "AB", 1)):
        assert thickness.min() >= 0 and thickness.max() <= 1000.0 + 1e-9
        transmission = thickness_to_transmission(thickness, g)
        np.testing.assert_allclose(np.abs(transmission), 1.0, atol=1e-6)
        phase = np.angle(transmission)
        assert -1.6 < phase.min() and phase.max() <= 0.0 + 1e-6
        assert phase.std() > 0.05  # textured, not flat
    assert not np.allclose(etched_features((64, 64), 1), etched_features((64, 64), 2))
    with pytest.raises(ValueError):
        letters((64, 64), "   ")


def test_positions_outside_the_object_are_refused():
    sample = make_sample("test", extent_um=0.2, seed=0)
    with pytest.raises(ValueError, match="outside the object"):
        sample.measure(np.array([[5.0, 0.0]]), 0.01)

"""CXI import/export of scans and reconstructions, and the measured Siemens-star file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest

from edge_ptycho_bluesky.io.cxi import (
    EV_J,
    CXIReconstruction,
    PtychoScan,
    load_siemens_star,
    read_cxi,
    read_reconstruction,
    write_cxi,
)
from edge_ptycho_bluesky.sim import Geometry

from .conftest import shared_file


def make_scan(n_frames: int = 6, size: int = 16, probe_modes: int | None = 1) -> PtychoScan:
    rng = np.random.default_rng(0)
    frames = rng.poisson(50.0, (n_frames, size, size)).astype(np.uint32)
    positions = rng.uniform(-2e-7, 2e-7, (n_frames, 2))
    probe = None
    if probe_modes:
        probe = (rng.normal(size=(probe_modes, size, size)) + 1j * rng.normal(size=(probe_modes, size, size)))
        probe = probe[0] if probe_modes == 1 else probe
    geometry = Geometry(energy_kev=8.5, detector_distance_m=1.55, detector_pixel_m=220e-6, frame_size=size)
    return PtychoScan(frames=frames, positions_m=positions, geometry=geometry, probe=probe, uid="abc-123")


def test_scan_and_reconstruction_round_trip(tmp_path):
    scan = make_scan()
    rng = np.random.default_rng(1)
    obj = np.exp(1j * rng.uniform(-1, 1, (40, 44))).astype(np.complex64)
    refined = (scan.probe * 2).astype(np.complex64)
    patches = rng.normal(size=(6, 16, 16)).astype(np.float32)
    recon = CXIReconstruction(object=obj, pixel_size_m=(1.1e-8, 1.2e-8), probe=refined, patches=patches)
    path = write_cxi(tmp_path / "scan.cxi", scan, recon)

    back = read_cxi(path)
    np.testing.assert_array_equal(back.frames, scan.frames)
    np.testing.assert_allclose(back.positions_m, scan.positions_m)
    assert back.geometry == scan.geometry
    assert back.uid == "abc-123"
    np.testing.assert_allclose(back.probe, refined)  # the refined probe is the file's illumination

    rec = read_reconstruction(path)
    np.testing.assert_array_equal(rec.object, obj)
    assert rec.object.dtype == np.complex64
    assert rec.pixel_size_m == pytest.approx((1.1e-8, 1.2e-8))
    np.testing.assert_array_equal(rec.patches, patches)

    # The standard CXI paths, with their units, as other programs read them.
    with h5py.File(path, "r") as f:
        assert f["cxi_version"][()] == 160
        assert f["/entry_1/data_1/data"].shape == (6, 16, 16)
        translation = f["/entry_1/sample_1/geometry_1/translation"][()]
        assert translation.shape == (6, 3)
        np.testing.assert_allclose(translation[:, :2], scan.positions_m)
        assert f["/entry_1/instrument_1/detector_1/distance"][()] == pytest.approx(1.55)
        assert f["/entry_1/instrument_1/detector_1/x_pixel_size"][()] == pytest.approx(220e-6)
        assert f["/entry_1/instrument_1/detector_1/y_pixel_size"][()] == pytest.approx(220e-6)
        assert f["/entry_1/instrument_1/source_1/energy"][()] == pytest.approx(8.5e3 * EV_J)
        assert np.iscomplexobj(f["/entry_1/instrument_1/source_1/illumination"][()])
        assert np.iscomplexobj(f["/entry_1/image_1/data"][()])
        assert f["/entry_1/image_1/x_pixel_size"][()] == pytest.approx(1.1e-8)
        assert f["/entry_1/image_1/y_pixel_size"][()] == pytest.approx(1.2e-8)


def test_scan_without_probe_and_with_probe_modes(tmp_path):
    bare = read_cxi(write_cxi(tmp_path / "bare.cxi", make_scan(probe_modes=None)))
    assert bare.probe is None and bare.exposure_s is None
    timed = read_cxi(write_cxi(tmp_path / "timed.cxi", dataclasses.replace(make_scan(), exposure_s=0.25)))
    assert timed.exposure_s == 0.25  # written as the detector's count_time
    modes = read_cxi(write_cxi(tmp_path / "modes.cxi", make_scan(probe_modes=3)))
    assert modes.probe.shape == (3, 16, 16) and modes.probe.dtype == np.complex64
    with pytest.raises(ValueError, match="image_1/data is missing"):
        read_reconstruction(tmp_path / "bare.cxi")


def test_window_positions_convert_both_ways():
    scan = make_scan()
    positions, shape = scan.to_window_positions()
    assert (positions >= 0).all() and (positions.max(axis=0) + 16 < np.array(shape)).all()
    again = PtychoScan.from_window_positions(scan.frames, positions, scan.geometry, shape)
    np.testing.assert_allclose(again.positions_m, scan.positions_m, atol=1e-15)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CXI file"):
        read_cxi(tmp_path / "absent.cxi")
    text = tmp_path / "notes.cxi"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="not an HDF5"):
        read_cxi(text)
    path = write_cxi(tmp_path / "scan.cxi", make_scan())
    with h5py.File(path, "a") as f:
        del f["entry_1/data_1/translation"]
        del f["entry_1/sample_1/geometry_1/translation"]
    with pytest.raises(ValueError, match="translation is missing"):
        read_cxi(path)
    path = write_cxi(tmp_path / "short.cxi", make_scan())
    with h5py.File(path, "a") as f:
        del f["entry_1/sample_1/geometry_1/translation"]
        f["entry_1/sample_1/geometry_1/translation"] = np.zeros((2, 3))
    with pytest.raises(ValueError, match="translation must be"):
        read_cxi(path)
    path = write_cxi(tmp_path / "energy.cxi", make_scan())
    with h5py.File(path, "a") as f:
        del f["entry_1/instrument_1/source_1/energy"]
    with pytest.raises(ValueError, match="energy is missing"):
        read_cxi(path)


def test_scan_validation():
    scan = make_scan()
    with pytest.raises(ValueError, match="positions_m must have shape"):
        PtychoScan(frames=scan.frames, positions_m=scan.positions_m[:3], geometry=scan.geometry)
    with pytest.raises(ValueError, match="empty"):
        PtychoScan(frames=scan.frames[:0], positions_m=scan.positions_m[:0], geometry=scan.geometry)
    with pytest.raises(ValueError, match="pixel_size_m"):
        CXIReconstruction(object=np.ones((4, 4)), pixel_size_m=(0.0, 1e-8))


def test_measured_siemens_star_loads():
    path = shared_file("siemens-star-small.npz.bz2")
    scan, positions = load_siemens_star(path)
    assert scan.frames.shape == (516, 128, 128)
    assert positions.shape == (516, 2) and positions.min() == pytest.approx(2.0)
    assert scan.uid == "siemens-star-small"
    # Frames are stored fftshifted (zero frequency at the centre, the brightest region).
    mean = scan.frames.mean(axis=0)
    assert mean[56:72, 56:72].mean() > 10 * mean[:8, :8].mean()
    assert np.sum(np.abs(scan.probe) ** 2) == pytest.approx(scan.frames.sum(axis=(1, 2)).mean(), rel=1e-3)
    again, shape = scan.to_window_positions(
        object_shape=(int(positions[:, 0].max()) + 131, int(positions[:, 1].max()) + 131))
    np.testing.assert_allclose(np.diff(again, axis=0), np.diff(positions, axis=0), atol=1e-6)


def test_siemens_star_absent_file_is_reported(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="Siemens"):
        load_siemens_star(tmp_path / "missing.npz.bz2")

"""The project's rPIE solver on simulated scans with known truth (small sizes: CPU seconds)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import pytest
import torch

from edge_ptycho_bluesky.metrics import compare
from edge_ptycho_bluesky.options import UnknownOptionError
from edge_ptycho_bluesky.recon.probe_init import modelled_probe
from edge_ptycho_bluesky.recon.reconstructor import RPIEDivergenceError, RPIEReconstructor
from edge_ptycho_bluesky.recon.reconstruct import recon_from_run
from edge_ptycho_bluesky.recon.rpie import rpie
from edge_ptycho_bluesky.recon.rpie_options import RPIEOptions
from edge_ptycho_bluesky.sim import beam_diameter_nm, fermat_spiral, make_sample, step_for_overlap

EXPOSURE_S = 0.01


pytestmark = pytest.mark.usefixtures("two_torch_threads")


@lru_cache(maxsize=None)
def scan(overlap: float, points: int, seed: int = 1):
    """A photon-counted Fermat-spiral scan of the textured training phantom (128 px frames)."""
    xy = fermat_spiral(points, step_for_overlap(overlap, 0.8))
    sample = make_sample("train", extent_um=float(np.abs(xy).max()), seed=seed)
    frames = sample.measure(xy, EXPOSURE_S, rng=0)
    pixel = sample.geometry.pixel_size_nm
    return sample, sample.window_positions(xy), frames, beam_diameter_nm(sample.probe, pixel) / pixel


def true_probe(sample):
    """The simulated probe on the frames' scale (it is stored per second of exposure)."""
    return sample.probe * np.float32(np.sqrt(EXPOSURE_S))


def score(sample, result, threshold: float = 0.3):
    return compare(sample.phase, result.phase, result.scanned_mask(threshold))


@lru_cache(maxsize=None)
def default_recon(overlap: float, points: int, iterations: int = 40):
    """The demo's path: no probe given, only the beam diameter (modelled zone-plate start)."""
    sample, pos, frames, beam_px = scan(overlap, points)
    return rpie(frames, pos, object_shape=sample.transmission.shape, iterations=iterations, beam_diameter_px=beam_px,
                pixel_size_nm=sample.geometry.pixel_size_nm)


@pytest.mark.slow
def test_high_overlap_reconstruction_matches_the_truth():
    sample, _, frames, _ = scan(0.9, 150)
    result = default_recon(0.9, 150)
    scores = score(sample, result)
    assert scores["ssim"] >= 0.9, scores
    assert scores["pearson"] >= 0.97, scores
    assert np.isfinite(result.object).all() and np.isfinite(result.probe).all()
    assert result.errors[-1] < 0.1 * result.errors[0]
    # The refined probe keeps the measured flux (sum |P|^2 ~ mean frame sum for a phase object).
    flux = frames.sum(axis=(1, 2)).mean()
    assert np.sum(np.abs(result.probe) ** 2) == pytest.approx(flux, rel=0.05)


def test_quality_falls_with_overlap():
    sample_lo, *_ = scan(0.3, 25)
    high = score(scan(0.9, 150)[0], default_recon(0.9, 150))["ssim"]
    low = score(sample_lo, default_recon(0.3, 25, 20))["ssim"]
    assert high > low + 0.05, (high, low)


def test_modelled_probe_is_close_to_the_optics():
    sample, _, frames, beam_px = scan(0.9, 150)
    probe = modelled_probe(frames, beam_px)
    truth = true_probe(sample)
    overlap = abs(np.vdot(probe, truth)) / (np.linalg.norm(probe) * np.linalg.norm(truth))
    assert overlap > 0.95
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(frames.sum(axis=(1, 2)).mean(), rel=1e-3)
    with pytest.raises(ValueError, match="beam_diameter_px"):
        modelled_probe(frames, -3.0)


def test_epie_alpha_one_runs_and_converges():
    sample, pos, frames, _ = scan(0.9, 150)
    result = rpie(frames[:60], pos[:60], probe=true_probe(sample), object_shape=sample.transmission.shape,
                  iterations=8, alpha=1.0, update_probe=False)
    assert np.isfinite(result.object).all()
    assert result.errors[-1] < result.errors[0]
    assert result.options.alpha == 1.0


def test_streaming_frames_then_more_iterations_improves_the_error():
    sample, pos, frames, _ = scan(0.9, 150)
    rec = RPIEReconstructor(sample.transmission.shape, probe=true_probe(sample),
                            options=RPIEOptions(update_probe=False))
    rec.add_frames(frames[:75], pos[:75])
    first = rec.iterate(5)
    rec.add_frames(frames[75:], pos[75:])
    assert rec.num_frames == 150
    more = rec.iterate(10)
    assert more[-1] < more[0]
    assert more[-1] < first[0]
    result = rec.result()
    assert result.iterations == 15 and len(result.positions) == 150
    assert len(result.errors) == 15


def test_probe_modes_run_and_are_orthogonal():
    sample, pos, frames, beam_px = scan(0.9, 150)
    result = rpie(frames[:60], pos[:60], object_shape=sample.transmission.shape, iterations=6,
                  beam_diameter_px=beam_px, probe_modes=2)
    probe = result.probe
    assert probe.shape == (2, 128, 128)
    assert np.isfinite(probe).all() and np.isfinite(result.object).all()
    powers = np.sum(np.abs(probe) ** 2, axis=(1, 2))
    assert powers[0] > powers[1] > 0
    inner = abs(np.vdot(probe[0], probe[1])) / np.sqrt(powers[0] * powers[1])
    assert inner < 1e-3


def test_exact_and_binned_subpixel_shifts_agree():
    sample, pos, frames, _ = scan(0.9, 150)
    kwargs = dict(probe=true_probe(sample), object_shape=sample.transmission.shape, iterations=6,
                  update_probe=False)
    exact = rpie(frames[:40], pos[:40], subpixel_bins=None, **kwargs)
    binned = rpie(frames[:40], pos[:40], subpixel_bins=8, **kwargs)
    mask = exact.scanned_mask(0.3)
    diff = np.angle(exact.object[mask] * np.conj(binned.object[mask]))
    assert np.sqrt(np.mean(diff**2)) < 0.05
    assert binned.errors[-1] == pytest.approx(exact.errors[-1], rel=0.2)


@pytest.mark.parametrize(
    "case, match",
    [
        ("length", "differ in length"),
        ("nan", "NaN"),
        ("outside", "outside the object"),
        ("empty", "empty"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(case, match):
    sample, pos, frames, _ = scan(0.9, 150)
    frames, pos = frames[:5].astype(np.float32), pos[:5].copy()
    shape = sample.transmission.shape
    if case == "length":
        pos = pos[:4]
    elif case == "nan":
        frames[2, 3, 3] = np.nan
    elif case == "outside":
        pos[1] = (shape[0] - 50, 10)
    else:
        frames, pos = frames[:0], pos[:0]
    with pytest.raises(ValueError, match=match):
        rpie(frames, pos, probe=true_probe(sample), object_shape=shape, iterations=1)


def test_unknown_options_are_refused_naming_them():
    with pytest.raises(UnknownOptionError, match=r"unknown rPIE option keys \['alhpa'\]"):
        RPIEOptions.from_mapping({"alhpa": 0.2})
    with pytest.raises(ValueError, match="valid keys are"):
        RPIEOptions().with_updates(iterations=3, betta=1.0)
    assert RPIEOptions.from_mapping({"alpha": 0.2}).with_updates(iterations=3) == RPIEOptions(alpha=0.2, iterations=3)


def test_divergence_is_rolled_back_and_reported(monkeypatch):
    sample, pos, frames, _ = scan(0.9, 150)
    rec = RPIEReconstructor(sample.transmission.shape, probe=true_probe(sample))
    rec.add_frames(frames[:20], pos[:20])
    rec.iterate(2)
    good = rec.object

    def broken_epoch() -> float:
        rec._object.fill_(complex("nan"))
        return float("nan")

    monkeypatch.setattr(rec, "_epoch", broken_epoch)
    with pytest.raises(RPIEDivergenceError, match="rolled back to iteration 2"):
        rec.iterate(1)
    np.testing.assert_array_equal(rec.object, good)
    assert rec.result().iterations == 2


@pytest.mark.slow
def test_reconstruction_of_a_stored_run_without_a_probe(RE, beamline, tiled_client, storage_config, tmp_path,
                                                       monkeypatch):
    from edge_ptycho_bluesky.plans import spiral_ptycho_scan
    from edge_ptycho_bluesky.storage import get_run, make_tiled_writer

    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.046,
                                   num_points=120))
    sample = beamline.sample
    result = recon_from_run(get_run(tiled_client, uid), iterations=40, object_shape=sample.transmission.shape)
    scores = compare(sample.phase, result.phase, result.scanned_mask(0.3))
    assert scores["ssim"] >= 0.9, scores
    assert scores["pearson"] >= 0.97, scores
    assert result.pixel_size_nm == pytest.approx(sample.geometry.pixel_size_nm)
    # The same run through the command line, by uid, against the configured (embedded) catalog.
    from edge_ptycho_bluesky.cli import main
    from edge_ptycho_bluesky.io.cxi import read_reconstruction

    monkeypatch.setenv("EDGE_PTYCHO_DATA_DIR", str(storage_config.data_dir))
    monkeypatch.delenv("EDGE_PTYCHO_TILED_URI", raising=False)
    out = tmp_path / "run.cxi"
    assert main(["recon", uid, "--out", str(out), "--iterations", "3", "--no-progress"]) == 0
    recon = read_reconstruction(out)
    assert np.isfinite(recon.object).all() and recon.probe.shape == (128, 128)
    assert recon.pixel_size_m[0] == pytest.approx(sample.geometry.pixel_size_nm * 1e-9)


def test_cli_reconstructs_a_cxi_file(tmp_path, capsys):
    from edge_ptycho_bluesky.cli import main
    from edge_ptycho_bluesky.io.cxi import PtychoScan, read_cxi, read_reconstruction, write_cxi

    sample, pos, frames, _ = scan(0.9, 150)
    xy = fermat_spiral(150, step_for_overlap(0.9, 0.8))[:30]
    source = PtychoScan(frames=frames[:30], positions_m=xy * 1e-6, geometry=sample.geometry,
                        probe=true_probe(sample), uid="tiny")
    write_cxi(tmp_path / "in.cxi", source)
    out = tmp_path / "out.cxi"
    assert main(["recon", str(tmp_path / "in.cxi"), "--out", str(out), "--iterations", "4", "--alpha", "0.2",
                 "--device", "cpu", "--no-progress"]) == 0
    assert "starting probe: the input's illumination" in capsys.readouterr().out
    recon = read_reconstruction(out)
    assert recon.object.dtype == np.complex64 and np.isfinite(recon.object).all()
    assert recon.probe.shape == (128, 128) and not np.allclose(recon.probe, source.probe)  # refined
    assert read_cxi(out).uid == "tiny"
    # The scanned region is no longer the flat starting object.
    positions, shape = source.to_window_positions()
    assert recon.object.shape == shape
    r0, c0 = np.floor(positions.mean(axis=0)).astype(int) + 64
    assert np.std(np.angle(recon.object[r0 - 10:r0 + 10, c0 - 10:c0 + 10])) > 0.01

    assert main(["recon", str(tmp_path / "absent.cxi"), "--out", str(out)]) == 2
    assert "no CXI file" in capsys.readouterr().out


def test_growing_error_is_warned_about(monkeypatch, caplog):
    sample, pos, frames, _ = scan(0.9, 150)
    rec = RPIEReconstructor(sample.transmission.shape, probe=true_probe(sample))
    rec.add_frames(frames[:10], pos[:10])
    values = iter([0.01, 0.02, 0.2])
    monkeypatch.setattr(rec, "_epoch", lambda: next(values))
    with caplog.at_level("WARNING", logger="edge_ptycho_bluesky.recon.reconstructor"):
        assert rec.iterate(3) == [0.01, 0.02, 0.2]
    assert "error grew from 0.01 to 0.2" in caplog.text

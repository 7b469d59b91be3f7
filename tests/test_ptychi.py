"""The pty-chi adapter (optional backend) on a tiny simulated scan."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ptycho_bluesky.recon.ptychi_adapter import ptychi_available, ptychi_rpie
from edge_ptycho_bluesky.sim import beam_diameter_nm, fermat_spiral, make_sample, step_for_overlap

AVAILABLE, REASON = ptychi_available()
pytestmark = pytest.mark.skipif(not AVAILABLE, reason=f"pty-chi cannot be imported here: {REASON}")


@pytest.fixture(scope="module")
def tiny_scan():
    xy = fermat_spiral(30, step_for_overlap(0.9, 0.8))
    sample = make_sample("train", extent_um=float(np.abs(xy).max()), seed=2)
    frames = sample.measure(xy, 0.01, rng=0)
    pixel = sample.geometry.pixel_size_nm
    return sample, sample.window_positions(xy), frames, beam_diameter_nm(sample.probe, pixel) / pixel


def test_ptychi_rpie_gives_a_finite_image_and_lowers_the_error(tiny_scan):
    sample, pos, frames, beam_px = tiny_scan
    result = ptychi_rpie(frames, pos, object_shape=sample.transmission.shape, iterations=4, device="cpu",
                         beam_diameter_px=beam_px, pixel_size_nm=sample.geometry.pixel_size_nm)
    assert result.object.shape == sample.transmission.shape
    assert np.isfinite(result.object).all() and np.isfinite(result.probe).all()
    assert result.probe.shape == (128, 128)
    assert len(result.errors) == 4 and np.isfinite(result.errors).all()
    assert result.errors[-1] < result.errors[0]
    # Something was reconstructed under the beam: the phase varies where the sample was lit.
    assert np.std(result.phase[result.scanned_mask(0.3)]) > 0.01


def test_ptychi_refuses_bad_input(tiny_scan):
    sample, pos, frames, _ = tiny_scan
    with pytest.raises(ValueError, match="differ in length"):
        ptychi_rpie(frames, pos[:-1], object_shape=sample.transmission.shape, iterations=1)
    with pytest.raises(ValueError, match="iterations >= 1"):
        ptychi_rpie(frames, pos, object_shape=sample.transmission.shape, iterations=0)

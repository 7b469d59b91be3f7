"""The physics loss: the Poisson deviance of measured counts under a predicted phase."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edge_ptycho_bluesky.sim.forward import diffraction, photon_counts
from edge_ptycho_bluesky.training.physics import expected_counts, overlap_consistency, physics_loss, probe_for_inputs


def small_case(n: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:n, :n] - n / 2
    probe = (np.exp(-(xx ** 2 + yy ** 2) / (2 * (n / 6) ** 2)) * np.exp(0.3j * xx / n) * 30).astype(np.complex128)
    phase = rng.uniform(-1, 1, (3, n, n))
    return probe, phase, rng


def test_expected_counts_follow_the_simulators_forward_model() -> None:
    probe, phase, _ = small_case()
    obj = np.pad(np.exp(1j * np.concatenate(phase, axis=1)), ((0, 1), (0, 1)), constant_values=1)  # side by side
    positions = np.array([[0.0, 0.0], [0.0, 16.0], [0.0, 32.0]])
    want = diffraction(obj, probe.astype(np.complex64), positions)
    got = expected_counts(torch.as_tensor(phase), torch.as_tensor(probe)).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-3 * want.max())


def test_the_gradient_matches_finite_differences() -> None:
    probe, phase, rng = small_case(n=8)
    counts = torch.as_tensor(rng.poisson(expected_counts(torch.as_tensor(phase), torch.as_tensor(probe)).numpy()),
                             dtype=torch.float64)
    anchor = torch.zeros((3, 8, 8), dtype=torch.float64)
    x = torch.as_tensor(phase + 0.1, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda p: physics_loss(p, counts, torch.as_tensor(probe), anchor=anchor, anchor_weight=0.5), (x,),
        eps=1e-6, atol=1e-5)


def test_the_true_phase_explains_the_counts_better_than_a_wrong_one() -> None:
    probe, phase, rng = small_case()
    counts = torch.as_tensor(photon_counts(expected_counts(torch.as_tensor(phase), torch.as_tensor(probe)).numpy(),
                                           rng).astype(np.float64))
    p = torch.as_tensor(probe)
    true = float(physics_loss(torch.as_tensor(phase), counts, p))
    assert true < float(physics_loss(torch.zeros_like(torch.as_tensor(phase)), counts, p))
    assert true < float(physics_loss(torch.as_tensor(phase + 0.2 * rng.standard_normal(phase.shape)), counts, p))
    # a constant offset is invisible to the counts; the anchor term is what tells it
    shifted = torch.as_tensor(phase + 0.7)
    assert float(physics_loss(shifted, counts, p)) == pytest.approx(true, rel=1e-6)
    assert float(physics_loss(shifted, counts, p, anchor=torch.as_tensor(phase))) > true + 0.4


def test_the_probe_is_scaled_to_the_frames_units() -> None:
    probe, phase, _ = small_case()
    frames = expected_counts(torch.as_tensor(phase), torch.as_tensor(probe)).numpy() * 0.02  # another exposure
    scaled = probe_for_inputs(probe / 7.0, frames[:, None])
    np.testing.assert_allclose(np.sum(np.abs(scaled) ** 2), np.median(frames.sum(axis=(1, 2))), rtol=1e-5)
    with pytest.raises(ValueError, match="no counts"):
        probe_for_inputs(probe, np.zeros_like(frames))
    with pytest.raises(ValueError, match="complex with the frames' shape"):
        probe_for_inputs(np.abs(probe), frames)


def test_overlapping_predictions_agree_only_when_they_show_the_same_object() -> None:
    rng = np.random.default_rng(4)
    obj = torch.as_tensor(rng.uniform(-1, 1, (20, 20)))
    corners = torch.tensor([[0.0, 0.0], [2.0, 3.0], [6.0, 10.0], [12.0, 12.0]])
    crops = torch.stack([obj[int(r):int(r) + 8, int(c):int(c) + 8] for r, c in corners.tolist()])
    weight = torch.ones((8, 8), dtype=torch.float64)
    assert float(overlap_consistency(crops, corners, weight)) == pytest.approx(0.0, abs=1e-12)
    wrong = crops.clone()
    wrong[1] += 0.5  # an offset the counts cannot see: the overlap does
    assert float(overlap_consistency(wrong, corners, weight)) > 0.01
    x = (crops + 0.1 * torch.as_tensor(rng.standard_normal(crops.shape))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: overlap_consistency(p, corners, weight), (x,), eps=1e-6, atol=1e-6)

"""The physics loss: how well a predicted phase patch explains the frame's measured counts.

A network that predicts the phase ``phi`` of the object in a frame's probe window predicts, through
the far-field forward model of :mod:`edge_ptycho_bluesky.sim.forward` (a pure-phase object, the
unitary FFT, fftshifted patterns), the expected counts of that frame:

    lambda = | FFT( P * exp(i phi) ) |^2

with ``P`` the probe in the units of the network input (the probe's photons scaled by the
exposure and the model's count scale, :func:`probe_for_inputs`). The frame's counts ``k`` are
Poisson with mean ``lambda``; the loss is the Poisson deviance per pixel,
``2 (k log(k / lambda) - (k - lambda))``, zero when the prediction explains the frame exactly
(PtychoPINN, Hoidn et al., Sci. Rep. 13, 22789 (2023) train the same way). It needs no labels: the
measured frames are the teacher.

What one frame cannot tell: a constant phase offset changes nothing in ``lambda``.
:func:`physics_loss` ties it down with an ``anchor``: the probe-weighted mean phase of each
prediction is pulled towards that of the anchor patch (labels, or the starting model's own
prediction), which changes nothing else. Where the windows of a scan overlap, the object is the
same: :func:`overlap_consistency` asks overlapping predictions to agree (where the probe lit both),
the ptychographic constraint that makes overlapping scans invertible, and which also makes the
patches' offsets agree, so that they stitch into one image rather than a patchwork.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

__all__ = ["expected_counts", "overlap_consistency", "physics_loss", "poisson_deviance", "probe_for_inputs"]

#: Added to the expected counts before the logarithm (counts are >= 0; lambda can reach 0).
_EPS = 1e-6


def expected_counts(phase: torch.Tensor, probe: torch.Tensor) -> torch.Tensor:
    """Far-field intensities ``(B, N, N)`` of pure-phase patches ``(B, [1,] N, N)`` under ``probe``
    ``(N, N)`` complex (fftshifted, unitary FFT: ``sum(lambda) == sum(|probe|^2)``)."""
    if phase.ndim == 4:
        phase = phase[:, 0]
    psi = probe * torch.polar(torch.ones_like(phase), phase)
    far = torch.fft.fftshift(torch.fft.fft2(psi, norm="ortho"), dim=(-2, -1))
    return far.real ** 2 + far.imag ** 2


def poisson_deviance(expected: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mean Poisson deviance per pixel ``2 (k log(k / lambda) - (k - lambda))`` (0 at a perfect fit)."""
    lam = expected + _EPS
    k = counts
    klogk = torch.where(k > 0, k * torch.log(torch.clamp(k, min=_EPS) / lam), torch.zeros_like(k))
    return 2.0 * (klogk - (k - lam)).mean()


def physics_loss(phase: torch.Tensor, counts: torch.Tensor, probe: torch.Tensor, *,
                 anchor: torch.Tensor | None = None, anchor_weight: float = 1.0) -> torch.Tensor:
    """Poisson deviance of ``counts`` ``(B, [1,] N, N)`` (in network-input units) under the
    predicted ``phase``, plus ``anchor_weight`` x the squared difference of the probe-weighted mean
    phase of ``phase`` and ``anchor`` (which only fixes the constant offset one frame cannot tell).

    Parameters
    ----------
    phase
        Predicted phase patches (radians).
    counts
        The frames as the network got them (:class:`~edge_ptycho_bluesky.model.contract.InputContract`).
    probe
        ``(N, N)`` complex probe in the same units (:func:`probe_for_inputs`).
    anchor
        Phase patches whose offset the prediction should keep; None: no offset term.
    """
    if counts.ndim == 4:
        counts = counts[:, 0]
    loss = poisson_deviance(expected_counts(phase, probe), counts)
    if anchor is not None:
        weight = probe.abs() ** 2
        weight = weight / weight.sum()
        p = phase[:, 0] if phase.ndim == 4 else phase
        a = anchor[:, 0] if anchor.ndim == 4 else anchor
        offset = ((p - a) * weight).sum(dim=(-2, -1))
        loss = loss + anchor_weight * (offset ** 2).mean()
    return loss


def probe_for_inputs(probe: ArrayLike, inputs: ArrayLike) -> NDArray[np.complex64]:
    """The probe scaled to the units of the network input.

    A pure-phase object scatters every photon of the probe (Parseval), so each frame's total is
    the probe's power times the exposure and the count scale: the probe is scaled so that its
    power equals the median total of the given frames. This holds whatever units the probe came
    in (photons per second from the simulator, photons per frame from rPIE or a CXI file).

    Parameters
    ----------
    probe : (N, N) or (modes, N, N) complex
        Only the first mode is used.
    inputs : (M, [1,] N, N) float
        Network input of the frames the probe lit.

    Raises
    ------
    ValueError
        A probe without power, frames without counts, or a probe whose shape differs from the frames'.
    """
    p = np.asarray(probe)
    if p.ndim == 3:
        p = p[0]
    x = np.asarray(inputs, dtype=np.float64)
    x = x.reshape(len(x), -1, *x.shape[-2:])[:, 0]
    if p.shape != x.shape[-2:] or not np.iscomplexobj(p):
        raise ValueError(f"the probe must be complex with the frames' shape {x.shape[-2:]}, got "
                         f"{p.dtype} {p.shape}")
    power = float(np.sum(np.abs(p) ** 2))
    totals = x.sum(axis=(-2, -1))
    target = float(np.median(totals)) if len(totals) else 0.0
    if not power > 0 or not np.isfinite(power):
        raise ValueError("the probe has no power (all zero or not finite)")
    if not target > 0:
        raise ValueError("the frames hold no counts: the physics loss needs measured photons")
    return (p * np.sqrt(target / power)).astype(np.complex64)


def overlap_consistency(phase: torch.Tensor, corners: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean weighted squared disagreement of overlapping phase patches.

    The patches are placed at their window corners (rounded to whole pixels) on a common canvas;
    each pixel's weighted mean over the patches that cover it is the consensus, and the loss is
    ``sum_k sum_r w(r) (phi_k(r) - consensus)^2 / (B sum_r w(r))``: zero when every overlap agrees,
    and zero for a pixel seen by one patch only.

    Parameters
    ----------
    phase
        ``(B, [1,] N, N)`` predicted phase patches.
    corners
        ``(B, 2)`` window corners (row, col) in object pixels.
    weight
        ``(N, N)`` pixel weights, e.g. the probe intensity: where a patch is lit, so known.
    """
    p = phase[:, 0] if phase.ndim == 4 else phase
    b, n = p.shape[0], p.shape[-1]
    c = torch.round(corners.detach().to(torch.float64)).long()
    c = c - c.min(dim=0).values
    h, w = int(c[:, 0].max()) + n, int(c[:, 1].max()) + n
    num = p.new_zeros((h, w))
    den = p.new_zeros((h, w))
    wp = weight * p
    for k in range(b):
        r, q = int(c[k, 0]), int(c[k, 1])
        num[r:r + n, q:q + n] = num[r:r + n, q:q + n] + wp[k]
        den[r:r + n, q:q + n] = den[r:r + n, q:q + n] + weight
    consensus = num / torch.clamp(den, min=_EPS)
    total = p.new_zeros(())
    for k in range(b):
        r, q = int(c[k, 0]), int(c[k, 1])
        total = total + (weight * (p[k] - consensus[r:r + n, q:q + n]) ** 2).sum()
    return total / (b * weight.sum())

"""The starting probe of a reconstruction: modelled from the optics, or guessed from the data.

Without a probe, the reconstructor models the optics when the beam diameter is known
(:func:`modelled_probe`: a defocused zone plate whose pupil is measured from the mean pattern and
whose defocus gives the known beam diameter;
:func:`~edge_ptycho_bluesky.recon.reconstruct.recon_from_run` passes the recorded one).
Only when nothing is known does it fall back to :func:`initial_probe_from_frames` (flat Fourier
phase), which is a focused-beam guess: for a defocused zone-plate probe it does not converge.
"""

from __future__ import annotations

import logging

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..sim.geometry import Geometry
from ..sim.probe import beam_diameter_nm as power_diameter
from ..sim.probe import zone_plate_probe

__all__ = ["initial_probe_from_frames", "modelled_probe"]

logger = logging.getLogger(__name__)


def initial_probe_from_frames(frames: ArrayLike, beam_diameter_px: float | None = None) -> NDArray[np.complex64]:
    """Probe guess from the data: the inverse FFT of the mean diffraction amplitude (last resort).

    This is the fallback when nothing is known about the optics: with a flat Fourier phase it is a
    focused-beam guess, and rPIE started from it does not converge for the project's defocused
    zone-plate probe (SSIM ~0.3 at overlap 0.9, divergence at 0.6). Prefer a measured probe or
    :func:`modelled_probe`, which the reconstructor uses whenever the beam diameter is known.

    Parameters
    ----------
    frames : (M, N, N) float
        fftshifted intensities.
    beam_diameter_px : float, optional
        Known diameter of a defocused beam in object pixels (e.g. the zone-plate donut). When
        given, the Fourier amplitude gets the quadratic (defocus) phase ``exp(-i pi a |f|^2)`` that
        spreads the bright-field disk of radius ``f_max`` (cycles/pixel, where the radially averaged
        mean pattern falls below 10 % of its peak) to that diameter, ``a = D / (2 f_max)``, with
        the sign convention of :func:`edge_ptycho_bluesky.sim.zone_plate_probe`. Without it the
        guess is the focused probe (flat Fourier phase), which a strongly defocused beam is far from.

    Returns
    -------
    probe : (N, N) complex64
        Centred probe with the measured total flux (``sum |P|^2 == mean(sum I)``, Parseval with
        the unitary FFT).
    """
    mean = np.mean(np.asarray(frames, dtype=np.float64), axis=0)
    if mean.ndim != 2 or mean.shape[0] != mean.shape[1]:
        raise ValueError(f"frames must be (M, N, N), got {np.shape(frames)}")
    amp = np.sqrt(np.clip(mean, 0, None))
    n = amp.shape[0]
    field_f = amp.astype(np.complex128)
    if beam_diameter_px is not None:
        if not beam_diameter_px > 0:
            raise ValueError(f"beam_diameter_px must be positive, got {beam_diameter_px!r}")
        freq = np.fft.fftshift(np.fft.fftfreq(n))
        fr = np.hypot(freq[:, None], freq[None, :])
        radius = np.rint(fr * n).astype(int)
        profile = np.bincount(radius.ravel(), mean.ravel()) / np.maximum(np.bincount(radius.ravel()), 1)
        above = np.flatnonzero(profile >= 0.1 * profile.max())
        f_max = max(int(above.max()), 1) / n
        a = beam_diameter_px / (2 * f_max)
        field_f = field_f * np.exp(-1j * np.pi * a * fr**2)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(field_f), norm="ortho"))
    return probe.astype(np.complex64)


def _pupil_from_frames(mean: NDArray[np.float64]) -> tuple[float, float]:
    """Outer radius (px) and central-stop fraction of the bright-field disk of a mean pattern.

    Radii where the radially averaged mean pattern crosses half its peak: the outermost crossing is
    the pupil edge, the innermost (when the centre is dark) the central stop's edge.
    """
    n = mean.shape[0]
    rows = np.arange(n) - n // 2
    radius = np.hypot(rows[:, None], rows[None, :])
    ring = np.rint(radius).astype(int).ravel()
    profile = np.bincount(ring, mean.ravel()) / np.maximum(np.bincount(ring), 1)
    profile = profile[: n // 2]
    if not np.isfinite(profile).all() or profile.max() <= 0:
        raise ValueError("the mean diffraction pattern is empty (all frames are zero)")
    half = 0.5 * profile.max()
    above = np.flatnonzero(profile >= half)
    outer, inner = int(above.max()), int(above.min())

    def crossing(i: int, j: int) -> float:  # linear interpolation of the half-maximum between i and j
        a, b = profile[i] - half, profile[j] - half
        return i + (j - i) * (a / (a - b)) if a != b else float(i)

    r_out = crossing(outer, outer + 1) if outer + 1 < len(profile) else float(outer)
    r_in = crossing(inner, inner - 1) if inner > 0 else 0.0
    r_out = float(np.clip(r_out, 1.0, n / 2 - 1))
    stop = float(np.clip(r_in / r_out, 0.0, 0.9)) if r_in > 1.0 else 0.0
    return r_out, stop


def modelled_probe(
    frames: ArrayLike,
    beam_diameter_px: float,
    *,
    pupil_radius_px: float | None = None,
    central_stop: float | None = None,
    fraction: float = 0.9,
) -> NDArray[np.complex64]:
    """Starting probe from a model of the optics: a defocused zone plate of known beam size.

    A defocused zone-plate probe carries a strong quadratic phase that cannot be read off the mean
    diffraction intensity, and starting rPIE from a flat-phase guess stalls or diverges. This builds
    :func:`edge_ptycho_bluesky.sim.zone_plate_probe` on the frames' grid instead:

    * the pupil (bright-field disk radius and central-stop fraction) is measured from the mean
      pattern (half-maximum crossings of its radial profile) unless given;
    * the defocus is chosen so that the disk holding ``fraction`` of the probe power has diameter
      ``beam_diameter_px`` (what :func:`edge_ptycho_bluesky.sim.beam_diameter_nm` and the plans'
      ``beam_diameter_nm`` record), by a few fixed-point steps;
    * the flux is the mean frame sum (``sum |P|^2 == mean(sum I)``, unitary FFT).

    The shape in pixels does not depend on the energy or pixel size, only on the diameter in pixels.
    The sign of the defocus (sample before or after the focus) is the simulator's; a real beamline
    with the other sign converges too once the probe is refined, but more slowly.

    Parameters
    ----------
    frames : (M, N, N) float
        fftshifted intensities.
    beam_diameter_px : float
        Beam diameter in object pixels (``beam_diameter_nm / pixel_size_nm``).
    pupil_radius_px, central_stop : float, optional
        Override the values measured from the data.
    fraction : float
        Power fraction that defines the diameter.

    Returns
    -------
    probe : (N, N) complex64
    """
    data = np.asarray(frames, dtype=np.float64)
    if data.ndim != 3 or data.shape[1] != data.shape[2] or not len(data):
        raise ValueError(f"frames must be (M, N, N) with M >= 1, got {data.shape}")
    if not (beam_diameter_px is not None and np.isfinite(beam_diameter_px) and beam_diameter_px > 0):
        raise ValueError(f"beam_diameter_px must be a positive number, got {beam_diameter_px!r}")
    n = data.shape[-1]
    if beam_diameter_px >= n:
        raise ValueError(f"beam_diameter_px {beam_diameter_px:.1f} does not fit the {n}-pixel window; "
                         "check the beam diameter and the object pixel size")
    mean = data.mean(axis=0)
    r_out, stop = _pupil_from_frames(mean)
    if pupil_radius_px is not None:
        r_out = float(pupil_radius_px)
    if central_stop is not None:
        stop = float(central_stop)
    flux = float(data.sum(axis=(1, 2)).mean())
    if not flux > 0:
        raise ValueError("the frames hold no photons; cannot scale a probe to them")
    geometry = Geometry(frame_size=n)
    pixel_nm = geometry.pixel_size_nm
    target = float(beam_diameter_px)
    geometric = target
    probe = None
    for _ in range(6):
        geometric = float(np.clip(geometric, 2.0, 0.95 * n))
        probe = zone_plate_probe(geometry, beam_diameter_nm=geometric * pixel_nm, pupil_radius_px=r_out,
                                 central_stop=stop, photons_per_second=flux)
        measured = power_diameter(probe, 1.0, fraction)
        if abs(measured - target) < 0.25 or measured <= 0:
            break
        geometric *= target / measured
    assert probe is not None
    logger.info("modelled zone-plate probe: pupil radius %.1f px, central stop %.2f, %.1f px beam, %.3g photons",
                r_out, stop, target, flux)
    return probe.astype(np.complex64)

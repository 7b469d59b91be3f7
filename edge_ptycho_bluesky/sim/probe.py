"""Illumination: a defocused Fresnel-zone-plate probe (a donut).

A zone plate with a central stop focuses an annular pupil. Out of focus, the beam in the sample plane
is a ring ("donut") whose diameter grows with the defocus. We build it the physical way: an annular
pupil in the far field (the detector's bright-field disk) times a Fresnel defocus phase, propagated
to the sample plane by an inverse FFT.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .geometry import Geometry


def zone_plate_probe(
    geometry: Geometry = Geometry(),
    *,
    beam_diameter_nm: float = 800.0,
    pupil_radius_px: float = 20.0,
    central_stop: float = 0.5,
    photons_per_second: float = 1e9,
) -> NDArray[np.complex64]:
    """Defocused zone-plate probe on the object grid.

    Parameters
    ----------
    geometry
        Beamline geometry; sets the grid size and the object pixel.
    beam_diameter_nm
        Outer diameter of the defocused beam (the paper's probe is about 800 nm).
    pupil_radius_px
        Radius of the bright-field disk on the detector, in detector pixels.
    central_stop
        Central-stop radius as a fraction of the zone-plate radius (0 for a full lens).
    photons_per_second
        Flux in the probe: ``sum(|probe|**2) == photons_per_second``.

    Returns
    -------
    probe : (N, N) complex64
        Complex illumination in sqrt(photons / s) per object pixel.
    """
    n = geometry.frame_size
    if not 0 < pupil_radius_px < n / 2:
        raise ValueError(f"pupil_radius_px must be in (0, {n / 2}), got {pupil_radius_px!r}")
    if not 0 <= central_stop < 1:
        raise ValueError(f"central_stop must be in [0, 1), got {central_stop!r}")
    if not beam_diameter_nm > 0 or not photons_per_second > 0:
        raise ValueError("beam_diameter_nm and photons_per_second must be positive")
    dx = geometry.pixel_size_nm
    window_nm = n * dx
    if beam_diameter_nm >= window_nm:
        raise ValueError(
            f"a {beam_diameter_nm} nm beam does not fit the {window_nm:.0f} nm field of view "
            f"({n} pixels of {dx:.2f} nm): use a smaller beam or a larger frame/pixel")
    freq = np.fft.fftshift(np.fft.fftfreq(n, d=dx))  # cycles / nm, zero at the centre
    fy, fx = np.meshgrid(freq, freq, indexing="ij")
    f2 = fx**2 + fy**2
    f_max = pupil_radius_px / window_nm
    radius = np.sqrt(f2) / f_max
    # Soft-edged annulus (a quarter-pixel edge avoids ringing from a hard aperture).
    edge = 0.5 / pupil_radius_px
    pupil = (np.clip((1 - radius) / edge + 0.5, 0, 1)
             * np.clip((radius - central_stop) / edge + 0.5, 0, 1))
    # Geometric beam diameter 2 * dz * lambda * f_max fixes the defocus dz.
    wavelength = geometry.wavelength_nm
    dz = beam_diameter_nm / (2 * wavelength * f_max)
    field = pupil * np.exp(-1j * np.pi * wavelength * dz * f2)
    probe = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(field)))
    probe *= np.sqrt(photons_per_second / np.sum(np.abs(probe) ** 2))
    return probe.astype(np.complex64)


def beam_diameter_nm(probe: NDArray[np.complexfloating], pixel_size_nm: float, fraction: float = 0.9) -> float:
    """Diameter of the disk holding ``fraction`` of the probe's power (centred on its centroid)."""
    power = np.abs(probe) ** 2
    n0, n1 = power.shape
    rows, cols = np.mgrid[:n0, :n1]
    total = power.sum()
    r0, c0 = (rows * power).sum() / total, (cols * power).sum() / total
    radius = np.hypot(rows - r0, cols - c0).ravel()
    order = np.argsort(radius)
    cumulative = np.cumsum(power.ravel()[order]) / total
    return float(2 * radius[order][np.searchsorted(cumulative, fraction)] * pixel_size_nm)

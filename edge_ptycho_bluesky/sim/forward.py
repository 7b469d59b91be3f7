"""Far-field forward model: exit waves, diffraction intensities, photon counting.

Conventions (shared with reconstruction and stitching):

* ``positions`` are object-pixel coordinates ``(row, col)`` of the top-left corner of the probe
  window in the object array, as floats (sub-pixel). The integer part selects the object window and
  the fractional part shifts the probe by a Fourier phase ramp.
* Diffraction patterns are fftshifted (zero frequency at pixel ``(N/2, N/2)``) and use the unitary
  FFT, so ``sum(I) == sum(|probe * object|**2)`` (Parseval): a pure-phase object scatters all the
  probe's photons.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from .. import FRAME_SIZE
from .geometry import Geometry

#: Frames are simulated in chunks of this many to bound memory.
_CHUNK = 256


def shift_probe(probe: NDArray[np.complexfloating], shifts: NDArray[np.floating]) -> NDArray[np.complex64]:
    """Sub-pixel shifted copies of the probe.

    Parameters
    ----------
    probe : (N, N) complex
    shifts : (M, 2) float
        ``(row, col)`` shifts in pixels (typically the fractional part of the positions).

    Returns
    -------
    shifted : (M, N, N) complex64
    """
    n0, n1 = probe.shape
    f0 = np.fft.fftfreq(n0)[None, :, None]
    f1 = np.fft.fftfreq(n1)[None, None, :]
    ramp = np.exp(-2j * np.pi * (f0 * shifts[:, 0, None, None] + f1 * shifts[:, 1, None, None]))
    return np.fft.ifft2(np.fft.fft2(probe)[None] * ramp).astype(np.complex64)


def check_positions(positions: NDArray[np.floating], object_shape: tuple[int, int], window: int) -> NDArray[np.float64]:
    """Validate probe-window positions against the object; return them as float64 (M, 2)."""
    positions = np.asarray(positions, dtype=np.float64)
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise ValueError(f"positions must have shape (N, 2) as (row, col), got {positions.shape}")
    if len(positions) == 0:
        raise ValueError("positions is empty: a scan needs at least one point")
    if not np.all(np.isfinite(positions)):
        raise ValueError("positions contain NaN or inf")
    low = positions.min(axis=0)
    high = np.floor(positions.max(axis=0)) + window + 1
    if np.any(low < 0) or high[0] > object_shape[0] or high[1] > object_shape[1]:
        raise ValueError(
            f"probe windows reach outside the object: positions span {low} to "
            f"{positions.max(axis=0)} (+{window} px window) but the object is {object_shape}; "
            "use a larger object or a smaller scan")
    return positions


def exit_waves(obj: NDArray[np.complexfloating], probe: NDArray[np.complexfloating],
               positions: NDArray[np.floating]) -> NDArray[np.complex64]:
    """Exit waves ``probe(r - frac) * object(r + floor(position))``.

    Parameters
    ----------
    obj : (H, W) complex
    probe : (N, N) complex
    positions : (M, 2) float

    Returns
    -------
    psi : (M, N, N) complex64
    """
    n = probe.shape[0]
    positions = check_positions(positions, obj.shape, n)
    corner = np.floor(positions).astype(np.int64)
    shifted = shift_probe(probe, positions - corner)
    rows = corner[:, 0, None, None] + np.arange(n)[None, :, None]
    cols = corner[:, 1, None, None] + np.arange(n)[None, None, :]
    return (shifted * obj[rows, cols]).astype(np.complex64)


def diffraction(obj: NDArray[np.complexfloating], probe: NDArray[np.complexfloating],
                positions: NDArray[np.floating], exposure_s: float = 1.0) -> NDArray[np.float32]:
    """Noise-free far-field intensities (expected photons per pixel).

    Parameters
    ----------
    obj : (H, W) complex
        Object transmission.
    probe : (N, N) complex
        Probe in sqrt(photons / s).
    positions : (M, 2) float
    exposure_s
        Exposure time per frame in seconds.

    Returns
    -------
    intensity : (M, N, N) float32
        fftshifted ``|FFT(exit wave)|**2 * exposure_s``.
    """
    if not exposure_s > 0:
        raise ValueError(f"exposure_s must be positive, got {exposure_s!r}")
    positions = check_positions(positions, obj.shape, probe.shape[0])
    out = np.empty((len(positions),) + probe.shape, dtype=np.float32)
    for start in range(0, len(positions), _CHUNK):
        psi = exit_waves(obj, probe, positions[start:start + _CHUNK])
        far = np.fft.fftshift(np.fft.fft2(psi, norm="ortho"), axes=(-2, -1))
        out[start:start + _CHUNK] = (far.real**2 + far.imag**2) * exposure_s
    return out


def photon_counts(intensity: NDArray[np.floating], rng: np.random.Generator | int | None = None,
                  saturation: int = 2**32 - 1) -> NDArray[np.uint32]:
    """Poisson counting noise, clipped at the detector's saturation count. Returns uint32."""
    rng = np.random.default_rng(rng)
    counts = rng.poisson(np.asarray(intensity, dtype=np.float64))
    return np.minimum(counts, saturation).astype(np.uint32)


@dataclass
class SimulatedSample:
    """A sample on the stage: the object transmission, the probe, and where stage (0, 0) is.

    Stage coordinates ``(x, y)`` in micrometres put the beam centre at object pixel
    ``(row, col) = centre + (y, x) / pixel``; :meth:`window_positions` turns stage coordinates into
    probe-window positions for the forward model.

    Parameters
    ----------
    transmission : (H, W) complex64
        Object transmission (``exp(i phase)`` for a pure-phase sample).
    probe : (N, N) complex64
        Probe in sqrt(photons / s).
    geometry
        Beamline geometry; its pixel size maps micrometres to object pixels.
    """

    transmission: NDArray[np.complex64]
    probe: NDArray[np.complex64]
    geometry: Geometry = field(default_factory=Geometry)

    @property
    def pixel_size_um(self) -> float:
        return self.geometry.pixel_size_nm * 1e-3

    @property
    def centre_px(self) -> NDArray[np.float64]:
        return np.array(self.transmission.shape, dtype=np.float64) / 2

    def window_positions(self, xy_um: NDArray[np.floating]) -> NDArray[np.float64]:
        """Probe-window positions ``(M, 2)`` (row, col) for stage positions ``(M, 2)`` (x, y) in um."""
        xy_um = np.atleast_2d(np.asarray(xy_um, dtype=np.float64))
        rc = xy_um[:, ::-1] / self.pixel_size_um
        return rc + self.centre_px - self.probe.shape[0] / 2

    def stage_limits_um(self) -> tuple[float, float]:
        """Largest |x| and |y| (um) the beam window can reach inside the object."""
        half = (np.array(self.transmission.shape) - self.probe.shape[0] - 2) / 2
        return float(half[1] * self.pixel_size_um), float(half[0] * self.pixel_size_um)

    def expected_intensity(self, xy_um: NDArray[np.floating], exposure_s: float) -> NDArray[np.float32]:
        """Noise-free diffraction ``(M, N, N)`` at stage positions ``(M, 2)`` (x, y) um."""
        return diffraction(self.transmission, self.probe, self.window_positions(xy_um), exposure_s)

    def measure(self, xy_um: NDArray[np.floating], exposure_s: float,
                rng: np.random.Generator | int | None = None) -> NDArray[np.uint32]:
        """Photon-counted diffraction ``(M, N, N)`` uint32 at stage positions (x, y) um."""
        return photon_counts(self.expected_intensity(xy_um, exposure_s), rng)

    @property
    def phase(self) -> NDArray[np.float32]:
        """True phase of the object (radians)."""
        return np.angle(self.transmission).astype(np.float32)


def object_shape_for_scan(xy_um: NDArray[np.floating], pixel_size_nm: float, window: int = FRAME_SIZE,
                          margin: int = 8) -> tuple[int, int]:
    """Smallest square object (centred on stage 0, 0) that holds every probe window of a scan."""
    xy_um = np.asarray(xy_um, dtype=np.float64)
    reach = float(np.max(np.abs(xy_um))) * 1e3 / pixel_size_nm if xy_um.size else 0.0
    size = int(2 * np.ceil(reach) + window + 2 * margin)
    return size + size % 2, size + size % 2

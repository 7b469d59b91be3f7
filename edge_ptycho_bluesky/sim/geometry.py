"""Beamline geometry: energy, detector, and the object pixel size they imply.

The defaults follow the paper's set-up (10 keV X-rays) with a 128 x 128 region of an Eiger-type
detector (75 um pixels) at 0.9 m, which gives a reconstructed (object) pixel of about 11.6 nm.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .. import FRAME_SIZE

#: h * c in keV * nm.
HC_KEV_NM = 1.23984198


@dataclass(frozen=True)
class Geometry:
    """Far-field ptychography geometry.

    Parameters
    ----------
    energy_kev : float
        Photon energy in keV.
    detector_distance_m : float
        Sample-to-detector distance in metres.
    detector_pixel_m : float
        Detector pixel pitch in metres (after any binning).
    frame_size : int
        Detector frame edge in pixels (frames are ``frame_size x frame_size``).
    """

    energy_kev: float = 10.0
    detector_distance_m: float = 0.9
    detector_pixel_m: float = 75e-6
    frame_size: int = FRAME_SIZE

    def __post_init__(self) -> None:
        for name in ("energy_kev", "detector_distance_m", "detector_pixel_m"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"Geometry.{name} must be positive, got {value!r}")
        if self.frame_size < 8 or self.frame_size % 2:
            raise ValueError(f"Geometry.frame_size must be an even number >= 8, got {self.frame_size!r}")

    @property
    def wavelength_nm(self) -> float:
        """X-ray wavelength in nm."""
        return HC_KEV_NM / self.energy_kev

    @property
    def pixel_size_nm(self) -> float:
        """Object (reconstruction) pixel size in nm: lambda z / (N p)."""
        return (self.wavelength_nm * 1e-9 * self.detector_distance_m
                / (self.frame_size * self.detector_pixel_m)) * 1e9

    def as_dict(self) -> dict[str, float]:
        """Geometry with the derived quantities, for run metadata and CXI files."""
        out: dict[str, float] = asdict(self)
        out["wavelength_nm"] = self.wavelength_nm
        out["pixel_size_nm"] = self.pixel_size_nm
        return out

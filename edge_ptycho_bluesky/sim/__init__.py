"""Physics simulator: probe, phantoms, spiral scans, far-field forward model, photon noise.

Pure numpy: no Bluesky, no devices. :func:`make_sample` assembles a simulated sample for a scan.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from .forward import SimulatedSample, diffraction, exit_waves, object_shape_for_scan, photon_counts
from .geometry import Geometry
from .phantoms import etched_features, letters, thickness_to_transmission, varied_features
from .probe import beam_diameter_nm, zone_plate_probe
from .scan import dose_photons_per_nm2, fermat_spiral, overlap_ratio, paper_route, step_for_overlap

__all__ = [
    "Geometry", "SimulatedSample", "beam_diameter_nm", "diffraction", "dose_photons_per_nm2",
    "etched_features", "exit_waves", "fermat_spiral", "letters", "make_sample", "object_shape_for_scan",
    "overlap_ratio", "paper_route", "photon_counts", "step_for_overlap", "thickness_to_transmission",
    "varied_features", "zone_plate_probe",
]


def make_sample(
    kind: str = "train",
    *,
    extent_um: float = 1.5,
    geometry: Geometry = Geometry(),
    beam_diameter_nm: float = 800.0,
    photons_per_second: float = 1e9,
    seed: int | None = 0,
    text: str = "APS AI ptycho",
) -> SimulatedSample:
    """A simulated sample large enough for scans reaching ``extent_um`` from the stage origin.

    Parameters
    ----------
    kind
        ``"train"`` (random etched features), ``"varied"`` (etched features, star sectors, gratings,
        grainy patches, words in several fonts: :func:`varied_features`) or ``"test"`` (letters
        and shapes).
    extent_um
        Largest |x| or |y| (um) of the beam centre the sample must allow.
    geometry, beam_diameter_nm, photons_per_second
        Probe and pixel settings (see :func:`zone_plate_probe`).
    seed
        Seed for the phantom.
    """
    if kind not in ("train", "varied", "test"):
        raise ValueError(f"kind must be 'train', 'varied' or 'test', got {kind!r}")
    if not extent_um >= 0:
        raise ValueError(f"extent_um must be >= 0, got {extent_um!r}")
    probe = zone_plate_probe(geometry, beam_diameter_nm=beam_diameter_nm,
                             photons_per_second=photons_per_second)
    corners: NDArray[np.float64] = np.array([[extent_um, extent_um]])
    shape = object_shape_for_scan(corners, geometry.pixel_size_nm, geometry.frame_size)
    thickness = {"train": lambda: etched_features(shape, seed), "varied": lambda: varied_features(shape, seed),
                 "test": lambda: letters(shape, text, seed)}[kind]()
    return SimulatedSample(thickness_to_transmission(thickness, geometry), probe, geometry)

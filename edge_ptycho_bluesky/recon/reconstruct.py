"""rPIE of a whole scan: a :class:`~edge_ptycho_bluesky.io.cxi.PtychoScan` or a stored run.

The starting probe is chosen from what the scan records: a probe given by the caller, else the
scan's own (a CXI illumination, or a probe recorded with the run), else the zone-plate model of
the recorded (or given) beam diameter, else the data-derived guess of
:func:`~edge_ptycho_bluesky.recon.rpie.rpie`.
"""

from __future__ import annotations

from typing import Any

from numpy.typing import ArrayLike

from ..io.cxi import PtychoScan
from ..runs import read_scan
from .rpie import rpie
from .rpie_options import RPIEResult

__all__ = ["recon_from_run", "reconstruct_scan"]


def reconstruct_scan(scan: PtychoScan, *, probe: ArrayLike | None = None, beam_diameter_nm: float | None = None,
                     object_shape: tuple[int, int] | None = None, **rpie_kwargs: Any) -> RPIEResult:
    """Run :func:`~edge_ptycho_bluesky.recon.rpie.rpie` on a scan.

    Parameters
    ----------
    scan
        Frames, positions (m), geometry, and optionally a probe and beam diameter.
    probe
        Starting probe instead of ``scan.probe``.
    beam_diameter_nm
        Beam diameter for a modelled starting probe instead of ``scan.beam_diameter_nm``.
    object_shape
        Object grid (stage (0, 0) at its centre, e.g. the simulated sample's shape, so that the
        result lines up with the truth); None: sized from the scan.
    rpie_kwargs
        ``options``, ``callback`` and option changes, as :func:`rpie` takes them.
    """
    positions, shape = scan.to_window_positions(object_shape)
    pixel_nm = scan.geometry.pixel_size_nm
    if probe is None:
        probe = scan.probe
    diameter = beam_diameter_nm if beam_diameter_nm is not None else scan.beam_diameter_nm
    beam_px = None if diameter is None or probe is not None else float(diameter) / pixel_nm
    return rpie(scan.frames, positions, probe=probe, object_shape=shape, pixel_size_nm=pixel_nm,
                beam_diameter_px=beam_px, **rpie_kwargs)


def recon_from_run(run: Any, **kwargs: Any) -> RPIEResult:
    """Reconstruct a raw ptychography run read from Tiled (a BlueskyRun node):
    :func:`reconstruct_scan` of :func:`~edge_ptycho_bluesky.runs.read_scan`, same keywords."""
    return reconstruct_scan(read_scan(run), **kwargs)

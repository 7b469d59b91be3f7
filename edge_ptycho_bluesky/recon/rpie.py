"""rPIE in one call: :func:`rpie` on frames and positions in memory (for a whole scan or a stored
run: :mod:`~edge_ptycho_bluesky.recon.reconstruct`).

The project's own iterative solver (Maiden, Johnson & Li, "Further improvements to the
ptychographical iterative engine", Optica 4, 736 (2017)), used to make training labels and ground
truth; it runs on the CPU and, where torch sees one, on a CUDA GPU. The algorithm is
:class:`~edge_ptycho_bluesky.recon.reconstructor.RPIEReconstructor` (see its module notes), its
settings :class:`~edge_ptycho_bluesky.recon.rpie_options.RPIEOptions`.
"""

from __future__ import annotations

import logging
from typing import Any

from numpy.typing import ArrayLike

from .positions import object_shape_for_positions, validate_scan
from .reconstructor import RPIEReconstructor
from .rpie_options import ProgressCallback, RPIEOptions, RPIEResult

__all__ = ["rpie"]

logger = logging.getLogger(__name__)


def rpie(
    frames: ArrayLike,
    positions: ArrayLike,
    probe: ArrayLike | None = None,
    object_shape: tuple[int, int] | None = None,
    iterations: int | None = None,
    *,
    options: RPIEOptions | None = None,
    pixel_size_nm: float | None = None,
    initial_object: ArrayLike | None = None,
    callback: ProgressCallback | None = None,
    beam_diameter_px: float | None = None,
    **option_changes: Any,
) -> RPIEResult:
    """Reconstruct a scan with rPIE.

    Parameters
    ----------
    frames : (M, N, N) float or integer
        fftshifted diffraction intensities (photon counts).
    positions : (M, 2) float
        Top-left window corners (row, col) in object pixels.
    probe : (N, N) or (K, N, N) complex, optional
        Initial probe in sqrt(photons) per pixel *per frame* (a simulator's probe per second must be
        scaled by ``sqrt(exposure_s)``); None: the zone-plate model of ``beam_diameter_px``
        (:func:`modelled_probe`), or without it the flat-phase guess (:func:`initial_probe_from_frames`).
    object_shape : (int, int), optional
        Object size; None: the smallest that holds every window (:func:`object_shape_for_positions`).
    iterations : int, optional
        Overrides ``options.iterations``.
    options : RPIEOptions, optional
        Settings; keyword arguments named like its fields (``alpha=0.2``, ``update_probe=False``...)
        override them.
    pixel_size_nm, initial_object, callback, beam_diameter_px
        See :class:`RPIEReconstructor`.

    Returns
    -------
    RPIEResult

    Raises
    ------
    ValueError
        Empty scan, length mismatch, NaN frames, windows outside the object, bad options.
    """
    opts = options if options is not None else RPIEOptions()
    if option_changes:
        opts = opts.with_updates(**option_changes)
    if iterations is not None:
        opts = opts.with_updates(iterations=iterations)
    frames32, pos = validate_scan(frames, positions)
    if object_shape is None:
        if (pos < 0).any():
            raise ValueError(f"positions must be >= 0 (top-left window corners), got minimum {pos.min(0)}")
        object_shape = object_shape_for_positions(pos, frames32.shape[-1])
    rec = RPIEReconstructor(object_shape, probe=probe, options=opts, pixel_size_nm=pixel_size_nm,
                            initial_object=initial_object, callback=callback,
                            beam_diameter_px=beam_diameter_px)
    rec.add_frames(frames32, pos)
    rec.iterate(opts.iterations)
    result = rec.result()
    logger.info("rPIE: %d frames x %d iterations in %.2f s (%.0f frame-updates/s), final error %.3g",
                len(pos), result.iterations, result.time_s, result.frame_updates_per_s,
                result.errors[-1] if len(result.errors) else float("nan"))
    return result

"""Regularised ptychographic iterative engine (rPIE) in torch, batched over scan positions.

This is the project's own iterative solver (Maiden, Johnson & Li, "Further improvements to the
ptychographical iterative engine", Optica 4, 736 (2017)), used to make training labels and ground
truth. It runs on the CPU and, where torch sees one, on a CUDA GPU.

Algorithm
---------
One *iteration* (epoch) visits every frame once, in mini-batches of ``batch_size`` positions
("compact"/"batched" PIE, as in Tike and pty-chi). For a batch of frames ``j`` with measured
intensities ``I_j``:

1. exit waves ``psi_jk = P_k(r - f_j) O(r + c_j)`` for every probe mode ``k``, where ``c_j`` is the
   integer and ``f_j`` the fractional part of the window position; the fractional shift is applied to
   the probe by a Fourier phase ramp, exactly as :mod:`edge_ptycho_bluesky.sim.forward` does;
2. one batched FFT (unitary, ``norm="ortho"``), the modulus constraint
   ``Psi'_jk = Psi_jk sqrt(I_j) / sqrt(sum_k |Psi_jk|^2)``, one batched inverse FFT, giving
   ``dpsi_jk = psi'_jk - psi_jk``;
3. the object update, summed over the batch and scattered onto the object grid with
   ``index_add_``::

       O <- O + beta * sum_jk conj(P_jk) dpsi_jk / ((1 - alpha) D + alpha max(D)),
       D = sum_jk |P_jk|^2  (the batch's illumination on the object grid);

4. the probe update numerator ``sum_j conj(O_j) dpsi_jk`` (shifted back by ``-f_j``) and denominator
   ``sum_j |O_j|^2`` are accumulated over the iteration, and the probe is updated once at the end of
   it: ``P_k <- P_k + probe_beta * num_k / ((1 - probe_alpha) d + probe_alpha max(d))``.

With a batch of one frame this is Maiden's rPIE exactly (Table 1 of the paper). ``alpha = 1`` turns
the denominator into ``max(D)``: the ePIE update with step ``beta`` (ePIE-like behaviour, slower but
very robust); small ``alpha`` approaches the original PIE's ``1 / |P|^2`` weighting (fast, but
noise in weakly lit pixels is amplified). Maiden et al. recommend ``alpha`` ~ 0.05-0.25. The
regularising term is floored at ``1e-4 max(D)`` so that ``alpha = 0`` cannot divide by zero.

Robustness: an iteration that makes the error, object or probe non-finite is undone and
:class:`RPIEDivergenceError` is raised, naming the remedies (see :meth:`RPIEReconstructor.iterate`).

Starting probe
--------------
Without a probe, the reconstructor models the optics when the beam diameter is known
(:func:`modelled_probe`: a defocused zone plate whose pupil is measured from the mean pattern and
whose defocus gives the known beam diameter; :func:`recon_from_run` passes the recorded one).
Only when nothing is known does it fall back to :func:`initial_probe_from_frames` (flat Fourier
phase), which is a focused-beam guess: for a defocused zone-plate probe it does not converge.

Sub-pixel positions
-------------------
``subpixel_bins=None`` shifts the probe exactly for every frame (two extra FFTs per frame).
``subpixel_bins=k`` (default 8) rounds every fractional shift to a multiple of ``1 / k`` pixel and
precomputes the ``k * k`` shifted probes once per iteration, which costs almost nothing; the rounding
error is at most ``1 / (2 k)`` pixel (0.7 nm at the default 11.6 nm pixel and ``k = 8``).
``subpixel_bins=1`` uses whole-pixel positions.

Global phase reference
----------------------
A ptychographic reconstruction is defined up to a constant phase ``O e^{i c}, P e^{-i c}``. After
every iteration the object is multiplied by ``exp(-i c)`` with ``c = arg sum_r D_tot(r) O(r)``
(``D_tot`` the scan's total illumination), and the probe by ``exp(+i c)``: the illumination-weighted
circular mean phase of the object over the scanned region is 0, and the exit waves (hence the
error) are unchanged. Unscanned object pixels keep their initial value 1.

Data conventions
----------------
``frames`` are ``(M, N, N)`` fftshifted intensities (zero frequency at ``(N/2, N/2)``) in photons,
``positions`` ``(M, 2)`` float ``(row, col)`` top-left window corners in object pixels (the
project-wide convention). The square root of the frames is taken once, when frames are added.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "ProgressCallback",
    "RPIEDivergenceError",
    "RPIEOptions",
    "RPIEReconstructor",
    "RPIEResult",
    "initial_probe_from_frames",
    "modelled_probe",
    "object_shape_for_positions",
    "recon_from_run",
    "rpie",
    "validate_scan",
    "window_positions_from_stage",
]

logger = logging.getLogger(__name__)

#: ``callback(iteration, error)``: ``iteration`` counts from 1 over the reconstructor's life.
ProgressCallback = Callable[[int, float], None]

#: Data keys and metadata paths of a raw ptychography run in Tiled (see ``recon_from_run``).
FRAMES_KEY = "ptycho_det_image"
STAGE_X_KEY = "stage_x"
STAGE_Y_KEY = "stage_y"


class RPIEDivergenceError(RuntimeError):
    """The reconstruction produced NaN/inf; the reconstructor was rolled back to its last good state."""


# --------------------------------------------------------------------------------------------
# Options and result
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RPIEOptions:
    """Settings of an rPIE reconstruction (validated on construction; unknown keys are rejected).

    Parameters
    ----------
    iterations : int
        Iterations (epochs over all frames) that :func:`rpie` runs.
    alpha : float
        Object regularisation in [0, 1] (Maiden 2017's alpha). 1: ePIE-like.
    beta : float
        Object step size in (0, 2].
    probe_alpha, probe_beta : float
        The same for the probe.
    update_probe : bool
        Refine the probe. With a known probe (simulations) set False.
    probe_update_start : int
        First iteration (0-based) at which the probe is updated.
    probe_modes : int
        Incoherent probe modes (1: fully coherent). Extra modes start as weak, orthogonal variants
        of the main mode and are kept orthogonal (sorted by power) after each probe update.
    batch_size : int
        Frames per mini-batch.
    batching : {"sparse", "compact", "random"}
        How positions are grouped. ``"sparse"``: every batch spreads over the whole scan (frames
        of a batch overlap little, so an iteration behaves like sequential rPIE; the default).
        ``"compact"``: batches are spatial clusters (Z-order chunks). ``"random"``: a fresh random
        partition every iteration. The batch order is shuffled each iteration in every mode.
    subpixel_bins : int or None
        Sub-pixel handling (see the module notes): None exact, k >= 1 rounds to 1/k pixel.
    phase_reference : bool
        Remove the global phase after each iteration (see the module notes).
    device : str or None
        ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; None: CUDA when available, else CPU.
    seed : int
        Seeds the batch shuffling and the extra probe modes.
    progress : bool
        Show a tqdm progress bar (when tqdm is installed).
    """

    iterations: int = 100
    alpha: float = 0.1
    beta: float = 1.0
    probe_alpha: float = 0.1
    probe_beta: float = 1.0
    update_probe: bool = True
    probe_update_start: int = 1
    probe_modes: int = 1
    batch_size: int = 64
    batching: Literal["sparse", "compact", "random"] = "sparse"
    subpixel_bins: int | None = 8
    phase_reference: bool = True
    device: str | None = None
    seed: int = 0
    progress: bool = False

    def __post_init__(self) -> None:
        def _int(name: str, low: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"RPIEOptions.{name} must be an integer >= {low}, got {value!r}")

        _int("iterations", 0)
        _int("probe_update_start", 0)
        _int("probe_modes", 1)
        _int("batch_size", 1)
        _int("seed", 0)
        for name in ("alpha", "probe_alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
                raise ValueError(f"RPIEOptions.{name} must be in [0, 1], got {value!r}")
        for name in ("beta", "probe_beta"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0.0 < value <= 2.0):
                raise ValueError(f"RPIEOptions.{name} must be in (0, 2], got {value!r}")
        if self.batching not in ("sparse", "compact", "random"):
            raise ValueError(
                f"RPIEOptions.batching must be 'sparse', 'compact' or 'random', got {self.batching!r}")
        if self.subpixel_bins is not None:
            _int("subpixel_bins", 1)
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as exc:
                raise ValueError(f"RPIEOptions.device {self.device!r} is not a torch device: {exc}") from exc

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> RPIEOptions:
        """Options from a dict (e.g. JSON); unknown keys raise TypeError naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TypeError(f"unknown rPIE option(s) {unknown}; known options: {sorted(known)}")
        return cls(**dict(values))

    def with_updates(self, **changes: Any) -> RPIEOptions:
        """A copy with some fields changed (validated; unknown names raise TypeError)."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise TypeError(f"unknown rPIE option(s) {unknown}; known options: {sorted(known)}")
        return replace(self, **changes)


@dataclass(frozen=True, eq=False)
class RPIEResult:
    """The outcome of a reconstruction.

    Attributes
    ----------
    object : (H, W) complex64
        Object transmission (global phase removed; see the module notes).
    probe : (N, N) complex64 or (modes, N, N) complex64
        Refined probe in sqrt(photons) per pixel (one array when there is one mode).
    positions : (M, 2) float64
        Window positions (row, col) used.
    errors : (iterations,) float64
        Normalised amplitude error ``sum (|Psi| - sqrt(I))^2 / sum I`` of every iteration.
    pixel_size_nm : float or None
        Object pixel size, when known.
    iterations : int
        Iterations run in total.
    time_s : float
        Wall time spent iterating.
    illumination : (H, W) float32
        Total probe intensity of the scan on the object grid (``sum_j |P_j|^2``).
    options : RPIEOptions
        The settings used.
    """

    object: NDArray[np.complex64]
    probe: NDArray[np.complex64]
    positions: NDArray[np.float64]
    errors: NDArray[np.float64]
    pixel_size_nm: float | None
    iterations: int
    time_s: float
    illumination: NDArray[np.float32]
    options: RPIEOptions = field(default_factory=RPIEOptions)

    @property
    def phase(self) -> NDArray[np.float32]:
        """Object phase in radians, (H, W) float32."""
        return np.angle(self.object).astype(np.float32)

    def scanned_mask(self, threshold: float = 0.1) -> NDArray[np.bool_]:
        """Pixels whose illumination exceeds ``threshold`` times its maximum, (H, W) bool."""
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        return self.illumination > threshold * float(self.illumination.max())

    @property
    def frame_updates_per_s(self) -> float:
        """Throughput: frames times iterations per second of iterating."""
        return len(self.positions) * self.iterations / self.time_s if self.time_s > 0 else float("nan")


# --------------------------------------------------------------------------------------------
# Validation and helpers
# --------------------------------------------------------------------------------------------


def validate_scan(frames: ArrayLike, positions: ArrayLike) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Check a scan and return ``frames`` as float32 and ``positions`` as float64.

    Parameters
    ----------
    frames : (M, N, N) real
        Diffraction intensities (counts), fftshifted.
    positions : (M, 2) float
        Window positions (row, col) in object pixels.

    Raises
    ------
    ValueError
        Empty scan, wrong shapes, lengths that differ, NaN/inf or negative intensities, NaN
        positions. (Whether the windows fit an object is checked by :func:`check_inside`.)
    """
    frames_arr = np.asarray(frames)
    if np.iscomplexobj(frames_arr):
        raise TypeError("frames must be real intensities, got a complex array")
    if frames_arr.ndim == 2:
        raise ValueError(f"frames must be a stack (M, N, N), got one image of shape {frames_arr.shape}; "
                         "use frames[None] for a single frame")
    if frames_arr.ndim != 3:
        raise ValueError(f"frames must have shape (M, N, N), got {frames_arr.shape}")
    if frames_arr.shape[0] == 0:
        raise ValueError("the scan is empty: frames has no frame (M = 0)")
    if frames_arr.shape[1] != frames_arr.shape[2] or frames_arr.shape[1] % 2:
        raise ValueError(f"frames must be square with an even side, got {frames_arr.shape[1:]}")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2:
        raise ValueError(f"positions must have shape (M, 2) as (row, col), got {pos.shape}")
    if len(pos) != len(frames_arr):
        raise ValueError(f"frames and positions differ in length: {len(frames_arr)} frames but "
                         f"{len(pos)} positions; pass one (row, col) per frame")
    if not np.isfinite(pos).all():
        raise ValueError(f"positions contain NaN/inf at rows {np.flatnonzero(~np.isfinite(pos).all(1))[:10]}")
    out = frames_arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(out).all(axis=(1, 2))
    if bad.any():
        raise ValueError(f"{int(bad.sum())} frame(s) contain NaN/inf (first: {np.flatnonzero(bad)[:10]}); "
                         "drop or repair those frames before reconstructing")
    if (out < 0).any():
        raise ValueError("frames contain negative intensities; clip them at 0 (e.g. after background "
                         "subtraction) before reconstructing")
    return out, pos


def object_shape_for_positions(positions: ArrayLike, frame_size: int, margin: int = 2) -> tuple[int, int]:
    """Smallest object holding every window (with ``margin`` pixels beyond the last one)."""
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not len(pos):
        raise ValueError(f"positions must have shape (M, 2) with M >= 1, got {pos.shape}")
    if (pos < 0).any():
        raise ValueError(f"positions must be >= 0 (top-left window corners), got minimum {pos.min(0)}")
    high = np.floor(pos.max(axis=0)).astype(int) + frame_size + 1 + margin
    return int(high[0]), int(high[1])


def check_inside(positions: NDArray[np.float64], object_shape: tuple[int, int], frame_size: int) -> None:
    """Raise ValueError unless every window (plus one pixel for the sub-pixel shift) fits."""
    low = positions.min(axis=0)
    high = np.floor(positions.max(axis=0)) + frame_size + 1
    if (low < 0).any() or high[0] > object_shape[0] or high[1] > object_shape[1]:
        raise ValueError(
            f"probe windows reach outside the object: positions span {low} to {positions.max(axis=0)} "
            f"(+{frame_size} px window +1) but the object is {tuple(object_shape)}; use a larger "
            "object_shape (or object_shape=None to size it from the positions) or drop those points")


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
    from ..sim.geometry import Geometry
    from ..sim.probe import beam_diameter_nm as power_diameter
    from ..sim.probe import zone_plate_probe

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


def _resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but torch sees no CUDA GPU; use device='cpu'")
    return dev


def _morton_order(positions: NDArray[np.float64], cell: float) -> NDArray[np.int64]:
    """Indices sorting positions along a Z-order (Morton) curve of ``cell``-pixel cells."""
    cells = np.floor((positions - positions.min(axis=0)) / cell).astype(np.int64)
    code = np.zeros(len(positions), dtype=np.int64)
    for bit in range(20):
        code |= ((cells[:, 0] >> bit) & 1) << (2 * bit + 1)
        code |= ((cells[:, 1] >> bit) & 1) << (2 * bit)
    return np.argsort(code, kind="stable")


def _ramps(freq: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Fourier phase ramps ``exp(-2 pi i (f0 s0 + f1 s1))`` of shape (S, N, N) for shifts (S, 2)."""
    r0 = torch.exp(-2j * math.pi * shifts[:, 0, None] * freq[None, :])
    r1 = torch.exp(-2j * math.pi * shifts[:, 1, None] * freq[None, :])
    return (r0[:, :, None] * r1[:, None, :]).to(torch.complex64)


def _fast_len(n: int) -> int:
    """Smallest length >= n whose only prime factors are 2, 3 and 5 (fast FFTs)."""
    m = max(int(n), 1)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _orthogonalize_modes(probe: torch.Tensor) -> torch.Tensor:
    """Orthogonal modes with the same density matrix, sorted by power (K, N, N)."""
    k = probe.shape[0]
    flat = probe.reshape(k, -1)
    gram = flat.conj() @ flat.T  # (K, K) Hermitian: <p_a, p_b>
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    new = evecs[:, order].T @ flat
    return new.reshape(probe.shape).to(torch.complex64)


# --------------------------------------------------------------------------------------------
# The streaming reconstructor
# --------------------------------------------------------------------------------------------


class RPIEReconstructor:
    """rPIE on a growing set of frames: ``add_frames(...)`` then ``iterate(n)``, repeatedly.

    Parameters
    ----------
    object_shape : (int, int)
        Object array size (H, W); every window must fit (see :func:`object_shape_for_positions`).
    probe : (N, N) or (K, N, N) complex, optional
        Initial probe in sqrt(photons) per pixel per frame. None: built from the frames present at
        the first :meth:`iterate` (see ``beam_diameter_px``).
    options : RPIEOptions
        Settings (``options.iterations`` is ignored here: :meth:`iterate` takes the count).
    pixel_size_nm : float, optional
        Object pixel size, carried into the result.
    initial_object : (H, W) complex, optional
        Starting object (default: ones).
    callback : ProgressCallback, optional
        Called after every iteration with ``(iteration, error)``.
    beam_diameter_px : float, optional
        Beam diameter (power-90 % disk, object pixels) for the modelled zone-plate starting probe
        (:func:`modelled_probe`) when no probe is given. Without it the start is the flat-phase
        guess of :func:`initial_probe_from_frames`, which does not converge for a defocused probe.

    Examples
    --------
    >>> rec = RPIEReconstructor((300, 300), probe=probe)        # doctest: +SKIP
    >>> rec.add_frames(frames[:100], positions[:100])           # doctest: +SKIP
    >>> rec.iterate(10)                                          # doctest: +SKIP
    >>> rec.add_frames(frames[100:], positions[100:])           # doctest: +SKIP
    >>> result = rec.iterate(50) and rec.result()                # doctest: +SKIP
    """

    def __init__(
        self,
        object_shape: tuple[int, int],
        *,
        probe: ArrayLike | None = None,
        options: RPIEOptions | None = None,
        pixel_size_nm: float | None = None,
        initial_object: ArrayLike | None = None,
        callback: ProgressCallback | None = None,
        beam_diameter_px: float | None = None,
    ) -> None:
        self.options = options if options is not None else RPIEOptions()
        if not isinstance(self.options, RPIEOptions):
            raise TypeError(f"options must be RPIEOptions, got {type(self.options).__name__}")
        shape = tuple(int(s) for s in object_shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"object_shape must be (H, W) positive, got {object_shape!r}")
        self.object_shape: tuple[int, int] = (shape[0], shape[1])
        if pixel_size_nm is not None and not pixel_size_nm > 0:
            raise ValueError(f"pixel_size_nm must be positive, got {pixel_size_nm!r}")
        self.pixel_size_nm = None if pixel_size_nm is None else float(pixel_size_nm)
        self.callback = callback
        if beam_diameter_px is not None and not beam_diameter_px > 0:
            raise ValueError(f"beam_diameter_px must be positive, got {beam_diameter_px!r}")
        self.beam_diameter_px = beam_diameter_px
        self.device = _resolve_device(self.options.device)
        self._rng = np.random.default_rng(self.options.seed)
        self._n: int | None = None
        self._probe: torch.Tensor | None = None
        if probe is not None:
            self._set_probe(np.asarray(probe))
        if initial_object is None:
            obj = torch.ones(self.object_shape, dtype=torch.complex64, device=self.device)
        else:
            init = np.asarray(initial_object)
            if init.shape != self.object_shape:
                raise ValueError(f"initial_object has shape {init.shape}, expected {self.object_shape}")
            if not np.isfinite(init).all():
                raise ValueError("initial_object contains NaN/inf")
            obj = torch.as_tensor(init.astype(np.complex64), device=self.device).clone()
        self._object = obj
        # Frames: pending numpy chunks, merged into device tensors at the next iterate().
        self._pending: list[tuple[NDArray[np.float32], NDArray[np.float64]]] = []
        self._amp: torch.Tensor | None = None  # (M, N, N) float32, ifftshifted sqrt(I)
        self._positions = np.zeros((0, 2), dtype=np.float64)
        self._total_intensity = 0.0
        self._errors: list[float] = []
        self._warned_growth = False
        self._iterations = 0
        self._time_s = 0.0
        self._illumination: torch.Tensor | None = None
        self._plan: dict[str, Any] | None = None
        self._den_cache: dict[int, torch.Tensor] = {}
        # Sub-pixel-shifted probes (and conjugates), kept while the probe is unchanged.
        self._shift_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # ------------------------------------------------------------------ data in

    def _set_probe(self, probe: NDArray[Any]) -> None:
        if probe.ndim == 2:
            probe = probe[None]
        if probe.ndim != 3 or probe.shape[1] != probe.shape[2]:
            raise ValueError(f"probe must be (N, N) or (modes, N, N), got {probe.shape}")
        if not np.isfinite(probe).all():
            raise ValueError("probe contains NaN/inf")
        if self._n is not None and probe.shape[-1] != self._n:
            raise ValueError(f"probe is {probe.shape[-1]} px but the frames are {self._n} px")
        self._n = int(probe.shape[-1])
        t = torch.as_tensor(probe.astype(np.complex64), device=self.device).clone()
        self._probe = self._with_modes(t)
        self._shift_cache = None

    def _with_modes(self, probe: torch.Tensor) -> torch.Tensor:
        """Pad (or trim) the probe to ``options.probe_modes`` modes."""
        k = self.options.probe_modes
        if probe.shape[0] >= k:
            return probe[:k].contiguous()
        n = probe.shape[-1]
        main = probe[0]
        power = float((main.abs() ** 2).sum())
        coords = torch.linspace(-1, 1, n, device=self.device)
        rows, cols = torch.meshgrid(coords, coords, indexing="ij")
        gen = torch.Generator(device="cpu").manual_seed(self.options.seed)
        extra = []
        for m in range(probe.shape[0], k):
            # Low-order polynomial variants of the main mode (Hermite-like), with a random phase.
            poly = (rows if m % 2 else cols) ** ((m + 1) // 2)
            phase = torch.rand((), generator=gen).item() * 2 * math.pi
            mode = main * poly.to(torch.complex64) * complex(math.cos(phase), math.sin(phase))
            mode = mode * math.sqrt(0.05 * power / max(float((mode.abs() ** 2).sum()), 1e-30))
            extra.append(mode)
        return _orthogonalize_modes(torch.cat([probe, torch.stack(extra)]))

    def add_frames(self, frames: ArrayLike, positions: ArrayLike) -> None:
        """Queue frames ``(m, N, N)`` (fftshifted intensities) at window positions ``(m, 2)``.

        Raises
        ------
        ValueError
            See :func:`validate_scan`; also when windows leave the object or the frame size
            differs from earlier frames or the probe.
        """
        frames32, pos = validate_scan(frames, positions)
        n = frames32.shape[-1]
        if self._n is not None and n != self._n:
            raise ValueError(f"frames are {n} px but the probe/earlier frames are {self._n} px")
        check_inside(pos, self.object_shape, n)
        self._n = n
        self._pending.append((frames32, pos))

    @property
    def num_frames(self) -> int:
        """Frames added so far (including those not yet merged)."""
        return len(self._positions) + sum(len(p) for _, p in self._pending)

    def _merge_pending(self) -> None:
        if not self._pending:
            return
        frames = np.concatenate([f for f, _ in self._pending])
        pos = np.concatenate([p for _, p in self._pending])
        if self._probe is None:
            if self._amp is None:
                if self.beam_diameter_px is not None:
                    self._set_probe(modelled_probe(frames, self.beam_diameter_px))
                else:
                    # Last resort: nothing is known about the optics.
                    self._set_probe(initial_probe_from_frames(frames))
                    logger.warning("no probe and no beam diameter: starting from the flat-phase guess of "
                                   "%d diffraction patterns, which fails for a defocused probe; pass "
                                   "probe=... or beam_diameter_px=...", len(frames))
        amp = torch.as_tensor(np.sqrt(frames), device=self.device)
        amp = torch.fft.ifftshift(amp, dim=(-2, -1)).contiguous()
        self._amp = amp if self._amp is None else torch.cat([self._amp, amp])
        self._positions = np.concatenate([self._positions, pos])
        self._total_intensity += float(frames.sum(dtype=np.float64))
        self._pending.clear()
        self._plan = None

    # ------------------------------------------------------------------ planning

    def _build_plan(self) -> dict[str, Any]:
        """Integer corners, sub-pixel bins and batches for the current positions."""
        opts = self.options
        n = self._n
        assert n is not None
        pos = self._positions
        corner = np.floor(pos).astype(np.int64)
        frac = pos - corner
        k = opts.subpixel_bins
        plan: dict[str, Any] = {}
        if k is not None:
            q = np.rint(frac * k).astype(np.int64)
            carry = q >= k
            corner = corner + carry
            q = np.where(carry, 0, q)
            plan["bins"] = torch.as_tensor(q[:, 0] * k + q[:, 1], device=self.device)
            qr, qc = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
            plan["bin_shifts"] = torch.as_tensor(np.column_stack([qr.ravel(), qc.ravel()]) / k,
                                                 dtype=torch.float64, device=self.device)
            plan["any_shift"] = bool(k > 1 and (q != 0).any())
        else:
            plan["frac"] = torch.as_tensor(frac, device=self.device)
            plan["any_shift"] = bool((frac != 0).any())
        plan["corner"] = torch.as_tensor(corner, device=self.device)
        plan["corner_np"] = corner
        m = len(pos)
        nb = math.ceil(m / min(opts.batch_size, m))
        order = _morton_order(pos, cell=max(n / 8, 1.0))
        if opts.batching == "compact":
            batches = [order[i * m // nb:(i + 1) * m // nb] for i in range(nb)]
        else:  # sparse (random is redrawn per iteration)
            batches = [order[i::nb] for i in range(nb)]
        plan["batches"] = [np.sort(b) for b in batches]
        plan["nb"] = nb
        plan["scan_box"] = self._box(corner)
        plan["freq"] = torch.fft.fftfreq(n, device=self.device, dtype=torch.float64)
        plan["rows"] = torch.arange(n, device=self.device)
        if k is not None and plan["any_shift"]:
            plan["bin_ramps"] = _ramps(plan["freq"], plan["bin_shifts"])  # (Q, N, N)
        # Work buffers for the largest batch (reused: no per-batch allocation in the hot loop).
        bmax = max(len(b) for b in batches) + 1
        kk = self.options.probe_modes
        c64, f32 = torch.complex64, torch.float32
        plan["buf"] = {
            "o": torch.empty((bmax, n, n), dtype=c64, device=self.device),
            "oc": torch.empty((bmax, n, n), dtype=c64, device=self.device),
            "p": torch.empty((bmax, kk, n, n), dtype=c64, device=self.device),
            "pc": torch.empty((bmax, kk, n, n), dtype=c64, device=self.device),
            "w": torch.empty((bmax, kk, n, n), dtype=c64, device=self.device),
            "g": torch.empty((bmax, kk, n, n), dtype=c64, device=self.device),
            "m": torch.empty((bmax, n, n), dtype=f32, device=self.device),
            "f": torch.empty((bmax, n, n), dtype=f32, device=self.device),
            "a": torch.empty((bmax, n, n), dtype=f32, device=self.device),
            "idx": torch.empty((bmax, n * n), dtype=torch.int64, device=self.device),
        }
        self._den_cache = {}
        self._shift_cache = None
        return plan

    def _box(self, corners: NDArray[np.int64]) -> tuple[int, int, int, int]:
        """Bounding box ``(row0, col0, height, width)`` of the windows at ``corners``."""
        n = self._n
        assert n is not None
        r0, c0 = corners.min(axis=0)
        r1, c1 = corners.max(axis=0) + n
        return int(r0), int(c0), int(r1 - r0), int(c1 - c0)

    # ------------------------------------------------------------------ iterations

    def iterate(self, n: int = 1, callback: ProgressCallback | None = None) -> list[float]:
        """Run ``n`` iterations over all frames added so far; returns their errors.

        Raises
        ------
        ValueError
            When no frame has been added.
        RPIEDivergenceError
            When an iteration makes the error, object or probe NaN/inf; that iteration is undone
            first, so :meth:`result` returns the last good state.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        self._merge_pending()
        if self._amp is None or self._probe is None:
            raise ValueError("no frames: call add_frames(frames, positions) before iterate()")
        if self._plan is None:
            self._plan = self._build_plan()
        callbacks = [c for c in (self.callback, callback) if c is not None]
        steps: Any = range(n)
        if self.options.progress:
            try:
                from tqdm.auto import tqdm

                steps = tqdm(steps, desc="rPIE", unit="it")
            except ImportError:  # tqdm is optional
                logger.debug("tqdm not installed; no progress bar")
        errors: list[float] = []
        for _ in steps:
            t0 = time.perf_counter()
            saved = (self._object.clone(), self._probe.clone(), self._illumination)
            with torch.no_grad():
                err = self._epoch()
                finite = (math.isfinite(err) and bool(torch.isfinite(self._probe).all())
                          and bool(torch.isfinite(self._object).all()))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._time_s += time.perf_counter() - t0
            if not finite:
                # Roll back to the last good state, so result() and further calls stay usable.
                self._object, self._probe, self._illumination = saved
                self._den_cache.clear()
                self._shift_cache = None
                raise RPIEDivergenceError(
                    f"rPIE diverged at iteration {self._iterations + 1} (error {err!r}, non-finite object or "
                    f"probe); the reconstruction was rolled back to iteration {self._iterations}. Give a "
                    "better starting probe (probe=..., or beam_diameter_px=... for a zone-plate model), "
                    "raise alpha/probe_alpha (e.g. 0.5), lower probe_beta, or set update_probe=False")
            self._iterations += 1
            if (self._errors and err > 5 * min(self._errors) and not self._warned_growth):
                self._warned_growth = True
                logger.warning("rPIE error grew from %.3g to %.3g (iteration %d): the reconstruction is "
                               "drifting away; check the starting probe (probe=... or beam_diameter_px=...) "
                               "or raise alpha/probe_alpha", min(self._errors), err, self._iterations)
            self._errors.append(err)
            errors.append(err)
            if hasattr(steps, "set_postfix"):
                steps.set_postfix(error=f"{err:.3g}")
            logger.debug("rPIE iteration %d: error %.4g", self._iterations, err)
            for cb in callbacks:
                cb(self._iterations, err)
        return errors

    def _delta_map(self, corners: torch.Tensor, box: tuple[int, int, int, int],
                   shape: tuple[int, int]) -> torch.Tensor:
        """Count of window corners per pixel of ``box`` (zero-padded to ``shape``), float32."""
        r0, c0, _, _ = box
        flat = (corners[:, 0] - r0) * shape[1] + (corners[:, 1] - c0)
        delta = torch.zeros(shape[0] * shape[1], dtype=torch.float32, device=self.device)
        delta.index_add_(0, flat, torch.ones(len(flat), dtype=torch.float32, device=self.device))
        return delta.view(shape)

    def _batch_illumination(self, key: int | None, corners: torch.Tensor, box: tuple[int, int, int, int],
                            power: torch.Tensor, kernels: dict[tuple[int, int], torch.Tensor]) -> torch.Tensor:
        """``sum_j |P|^2`` placed at the batch's corners, on ``box``: (bh, bw) float32.

        Computed by FFT convolution of the corner map with the probe intensity (on a zero-padded,
        FFT-friendly grid, so nothing wraps) and cached per batch while the probe is unchanged.
        """
        if key is not None and key in self._den_cache:
            return self._den_cache[key]
        _, _, bh, bw = box
        shape = (_fast_len(bh), _fast_len(bw))
        kern = kernels.get(shape)
        if kern is None:
            kern = kernels[shape] = torch.fft.rfft2(power, s=shape)
        den = torch.fft.irfft2(torch.fft.rfft2(self._delta_map(corners, box, shape)) * kern, s=shape)
        den = den[:bh, :bw].clamp_min(0.0).contiguous()
        if key is not None:
            self._den_cache[key] = den
        return den

    def _shifted_probes(self, probe: torch.Tensor) -> torch.Tensor:
        """Probe modes shifted by every sub-pixel bin: (Q, K, N, N)."""
        return torch.fft.ifft2(torch.fft.fft2(probe)[None] * self._plan["bin_ramps"][:, None])  # type: ignore[index]

    def _epoch(self) -> float:
        """One iteration over all frames; returns the normalised amplitude error."""
        plan = self._plan
        assert plan is not None and self._amp is not None and self._probe is not None
        opts = self.options
        n = self._n
        assert n is not None
        obj = self._object
        probe = self._probe
        k_modes = probe.shape[0]
        update_probe = opts.update_probe and self._iterations >= opts.probe_update_start
        binned = opts.subpixel_bins is not None
        shifted = plan["any_shift"]
        freq = plan["freq"]
        rows = plan["rows"]
        buf = plan["buf"]
        dev = self.device
        h, w = self.object_shape

        # Probes for this iteration: one per sub-pixel bin (or the Fourier transform for exact shifts).
        if binned:
            if self._shift_cache is None:
                probes_b = self._shifted_probes(probe).contiguous() if shifted else probe[None].clone()
                self._shift_cache = (probes_b, probes_b.conj().resolve_conj())
            probes_b, probes_bc = self._shift_cache
        fprobe = torch.fft.fft2(probe) if (not binned and shifted) else None
        # Object-update denominator: the batch's illumination (whole-pixel probe intensity; it only
        # preconditions the step, the fixed point does not depend on it).
        power = (probe.real.square() + probe.imag.square()).sum(0)
        kernels: dict[tuple[int, int], torch.Tensor] = {}
        cache_den = opts.batching != "random"

        # Row segments of the object: gathering N rows of N pixels per window is one index_select.
        segments = obj.view(-1).unfold(0, n, 1)  # (H*W - N + 1, N) view, no copy
        sr0, sc0, sh, sw = plan["scan_box"]
        illum = torch.zeros((sh, sw), dtype=torch.float32, device=dev)
        if update_probe:
            num_p = torch.zeros((probes_b.shape[0] if binned else 1, k_modes, n, n),
                                dtype=torch.complex64, device=dev)
        err_parts: list[torch.Tensor] = []

        if opts.batching == "random":
            order = [(None, b) for b in np.array_split(self._rng.permutation(len(self._positions)), plan["nb"])]
        else:
            order = [(int(i), plan["batches"][i]) for i in self._rng.permutation(plan["nb"])]
        alpha, beta = opts.alpha, opts.beta
        for key, sel in order:
            b = len(sel)
            idx = torch.as_tensor(sel, device=dev)
            corners = plan["corner"][idx]
            r0, c0 = corners[:, 0], corners[:, 1]
            o_j = buf["o"][:b]
            seg_idx = ((r0[:, None] + rows[None, :]) * w + c0[:, None]).view(-1)
            torch.index_select(segments, 0, seg_idx, out=o_j.view(b * n, n))
            psi = buf["w"][:b]
            ramp_j = None
            if binned:
                if shifted:
                    bins = plan["bins"][idx]
                    p_j = torch.index_select(probes_b, 0, bins, out=buf["p"][:b])
                    pc_j = torch.index_select(probes_bc, 0, bins, out=buf["pc"][:b])
                else:
                    bins = torch.zeros_like(idx)
                    p_j, pc_j = probes_b, probes_bc  # (1, K, N, N) broadcasts
            elif shifted:
                ramp_j = _ramps(freq, plan["frac"][idx])  # (B, N, N)
                p_j = torch.fft.ifft2(fprobe[None] * ramp_j[:, None])
                pc_j = p_j.conj().resolve_conj()
            else:
                p_j = probe[None]
                pc_j = p_j.conj().resolve_conj()
            torch.mul(p_j, o_j[:, None], out=psi)  # exit waves (B, K, N, N)
            far = torch.fft.fft2(psi, norm="ortho", out=psi)
            model = buf["m"][:b]
            if k_modes == 1:
                torch.mul(far.real[:, 0], far.real[:, 0], out=model)
                model.addcmul_(far.imag[:, 0], far.imag[:, 0])
            else:
                torch.sum(far.real.square() + far.imag.square(), dim=1, out=model)
            # factor = sqrt(I) / |Psi| - 1, so that Psi * factor = Psi' - Psi (modulus constraint).
            factor = torch.add(model, 1e-20, out=buf["f"][:b]).rsqrt_()
            factor.mul_(torch.index_select(self._amp, 0, idx, out=buf["a"][:b])).sub_(1.0)
            err_parts.append(torch.dot(model.mul_(factor).view(-1), factor.view(-1)))
            far.mul_(factor[:, None])
            dpsi = torch.fft.ifft2(far, norm="ortho", out=far)  # (B, K, N, N) = psi' - psi

            if update_probe:
                # Probe numerator with the object before this batch's update (simultaneous update).
                oc = torch.conj_physical(o_j, out=buf["oc"][:b])
                g = torch.mul(oc[:, None], dpsi, out=buf["g"][:b])
                if binned:
                    if dev.type == "cpu":  # complex index_add_ on CPU: ~15x faster than on the real view
                        num_p.index_add_(0, bins, g)
                    else:
                        torch.view_as_real(num_p).index_add_(0, bins, torch.view_as_real(g))
                else:
                    if ramp_j is not None:
                        g = torch.fft.fft2(g).mul_(ramp_j.conj()[:, None])
                    num_p[0] += g.sum(0)

            # Object update: the numerator scattered onto the batch's bounding box.
            box = plan["scan_box"] if opts.batching != "compact" else self._box(plan["corner_np"][sel])
            br, bc, bh, bw = box
            upd = dpsi.mul_(pc_j)
            upd = upd.sum(1) if k_modes > 1 else upd[:, 0]
            if dev.type == "cpu":
                # One slice-add per window: cheaper on CPU than building a (B*N*N) int64 index and
                # scattering through it with index_add_.
                num = torch.zeros((bh, bw), dtype=torch.complex64, device=dev)
                local = plan["corner_np"][sel] - np.array([br, bc])
                for j, (rj, cj) in enumerate(local.tolist()):
                    num[rj:rj + n, cj:cj + n] += upd[j]
            else:
                offsets = (rows[:, None] * bw + rows[None, :]).view(1, -1)
                flat = torch.add(((r0 - br) * bw + (c0 - bc))[:, None], offsets, out=buf["idx"][:b])
                num = torch.zeros(bh * bw, dtype=torch.complex64, device=dev)
                num.index_add_(0, flat.view(-1), upd.reshape(-1))
            den = self._batch_illumination(key if cache_den else None, corners, box, power, kernels)
            step = num.view(bh, bw).div_(den * (1 - alpha) + max(alpha, 1e-4) * den.max() + 1e-30)
            obj[br:br + bh, bc:bc + bw].add_(step, alpha=beta)
            illum[br - sr0:br - sr0 + bh, bc - sc0:bc - sc0 + bw] += den

        if update_probe:
            if binned and shifted:
                # Undo each bin's sub-pixel shift, then sum the bins.
                num_probe = torch.fft.ifft2(
                    (torch.fft.fft2(num_p) * plan["bin_ramps"].conj()[:, None]).sum(0))
            elif not binned and shifted:
                num_probe = torch.fft.ifft2(num_p[0])
            else:
                num_probe = num_p.sum(0)
            # Denominator sum_j |O_j|^2: cross-correlation of |O|^2 with the corner map (FFT).
            box_obj = obj[sr0:sr0 + sh, sc0:sc0 + sw]
            o2 = box_obj.real.square() + box_obj.imag.square()
            shape = (_fast_len(sh + n), _fast_len(sw + n))
            corr = torch.fft.irfft2(torch.fft.rfft2(o2, s=shape) * torch.fft.rfft2(
                self._delta_map(plan["corner"], plan["scan_box"], shape)).conj(), s=shape)
            den_p = corr[:n, :n].clamp_min(0.0)
            pa, pb = opts.probe_alpha, opts.probe_beta
            probe += pb * num_probe / ((1 - pa) * den_p + max(pa, 1e-4) * den_p.max() + 1e-30)
            if k_modes > 1:
                self._probe = probe = _orthogonalize_modes(probe)
            self._den_cache.clear()
            self._shift_cache = None
        full = torch.zeros((h, w), dtype=torch.float32, device=dev)
        full[sr0:sr0 + sh, sc0:sc0 + sw] = illum
        self._illumination = full
        if opts.phase_reference:
            c = torch.angle((obj[sr0:sr0 + sh, sc0:sc0 + sw] * illum).sum())
            rot = torch.polar(torch.ones((), device=dev), c.float())
            obj.mul_(rot.conj())
            self._probe.mul_(rot)
            if self._shift_cache is not None:
                self._shift_cache[0].mul_(rot)
                self._shift_cache[1].mul_(rot.conj())
        err = torch.stack(err_parts).double().sum() if err_parts else torch.zeros(())
        return float(err.item()) / max(self._total_intensity, 1e-30)

    # ------------------------------------------------------------------ results

    @property
    def object(self) -> NDArray[np.complex64]:
        """Current object (H, W) complex64 (a copy)."""
        return self._object.cpu().numpy().copy()

    @property
    def probe(self) -> NDArray[np.complex64] | None:
        """Current probe (K, N, N) complex64 (a copy), or None before any data."""
        return None if self._probe is None else self._probe.cpu().numpy().copy()

    def result(self) -> RPIEResult:
        """Snapshot of the reconstruction as an :class:`RPIEResult`."""
        self._merge_pending()
        if self._probe is None:
            raise ValueError("nothing to return: no frames and no probe")
        probe = self._probe.cpu().numpy().copy()
        if probe.shape[0] == 1:
            probe = probe[0]
        if self._illumination is None:
            illum = np.zeros(self.object_shape, dtype=np.float32)
        else:
            illum = self._illumination.cpu().numpy().astype(np.float32)
        return RPIEResult(
            object=self.object,
            probe=probe,
            positions=self._positions.copy(),
            errors=np.asarray(self._errors, dtype=np.float64),
            pixel_size_nm=self.pixel_size_nm,
            iterations=self._iterations,
            time_s=self._time_s,
            illumination=illum,
            options=self.options,
        )


# --------------------------------------------------------------------------------------------
# Batch function
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Stage coordinates and Tiled runs
# --------------------------------------------------------------------------------------------


def _pixel_size_nm_from_geometry(geometry: Mapping[str, Any]) -> float:
    if "pixel_size_nm" in geometry:
        value = float(geometry["pixel_size_nm"])
    else:
        from ..sim.geometry import Geometry

        known = {f.name for f in fields(Geometry)}
        try:
            value = Geometry(**{k: v for k, v in geometry.items() if k in known}).pixel_size_nm
        except TypeError as exc:
            raise ValueError(f"geometry {dict(geometry)!r} has neither pixel_size_nm nor the fields "
                             f"of sim.Geometry ({sorted(known)})") from exc
    if not value > 0:
        raise ValueError(f"geometry pixel_size_nm must be positive, got {value!r}")
    return value


def window_positions_from_stage(
    x_um: ArrayLike,
    y_um: ArrayLike,
    geometry: Mapping[str, Any],
    *,
    frame_size: int | None = None,
    object_shape: tuple[int, int] | None = None,
    margin: int = 8,
) -> tuple[NDArray[np.float64], tuple[int, int]]:
    """Window positions of a scan from stage coordinates: the core of :func:`recon_from_run`.

    The convention is the simulator's (:meth:`edge_ptycho_bluesky.sim.SimulatedSample.window_positions`):
    stage ``(0, 0)`` puts the beam centre at object pixel ``object_shape / 2``, and
    ``(row, col) = (y, x) / pixel + object_shape / 2 - N / 2``.

    Parameters
    ----------
    x_um, y_um : (M,) float
        Stage positions in micrometres.
    geometry : mapping
        Needs ``pixel_size_nm`` (or the :class:`~edge_ptycho_bluesky.sim.Geometry` fields it
        derives from); ``frame_size`` is read from it when not given (default 128). An
        ``object_shape`` entry (e.g. the simulated sample's) is used when ``object_shape`` is None.
    frame_size : int, optional
        Window size N.
    object_shape : (int, int), optional
        Object size; None: the smallest square centred on stage (0, 0) holding every window plus
        ``margin`` pixels (:func:`edge_ptycho_bluesky.sim.object_shape_for_scan`).

    Returns
    -------
    positions : (M, 2) float64
        (row, col) top-left window corners.
    object_shape : (int, int)
    """
    x = np.asarray(x_um, dtype=np.float64).reshape(-1)
    y = np.asarray(y_um, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x_um and y_um differ in length: {x.size} vs {y.size}")
    if not x.size:
        raise ValueError("the scan is empty: no stage positions")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("stage positions contain NaN/inf")
    pixel_nm = _pixel_size_nm_from_geometry(geometry)
    n = int(frame_size if frame_size is not None else geometry.get("frame_size", 128))
    if object_shape is None and geometry.get("object_shape") is not None:
        object_shape = tuple(int(s) for s in geometry["object_shape"])  # type: ignore[assignment]
    if object_shape is None:
        from ..sim.forward import object_shape_for_scan

        object_shape = object_shape_for_scan(np.column_stack([x, y]), pixel_nm, n, margin)
    shape = (int(object_shape[0]), int(object_shape[1]))
    rc = np.column_stack([y, x]) * 1e3 / pixel_nm
    positions = rc + np.array(shape, dtype=np.float64) / 2 - n / 2
    return positions, shape


def _read_key(stream: Any, key: str) -> NDArray[Any]:
    """An array from a Tiled stream node, whichever layout the writer used."""
    for path in ((key,), ("data", key), ("internal", key)):
        node = stream
        try:
            for part in path:
                node = node[part]
            return np.asarray(node.read())
        except (KeyError, AttributeError, TypeError):
            continue
    raise KeyError(f"data key {key!r} not found in stream {stream!r}")


def recon_from_run(run: Any, *, probe: ArrayLike | None = None, options: RPIEOptions | None = None,
                   callback: ProgressCallback | None = None, object_shape: tuple[int, int] | None = None,
                   **option_changes: Any) -> RPIEResult:
    """Reconstruct a raw ptychography run read from Tiled (a BlueskyRun client node).

    Reads the frames ``primary/<image_key>`` (``start["edge_ptycho"]["image_key"]``, default
    ``ptycho_det_image``) ``(M, N, N)``, the stage positions ``stage_x``, ``stage_y`` (um) and
    the geometry ``start["edge_ptycho"]["geometry"]``, converts the stage positions with
    :func:`window_positions_from_stage` and runs :func:`rpie`. Without ``probe``, a complex probe
    stored at ``start["edge_ptycho"]["probe"]`` (array, or ``{"real": ..., "imag": ...}``) is
    used, else the zone-plate model of the recorded ``start["edge_ptycho"]["beam_diameter_nm"]``
    (:func:`modelled_probe`), else (no diameter recorded) the flat-phase data-derived guess.
    ``object_shape`` fixes the object grid (stage (0, 0) at its centre, e.g. the simulated
    sample's shape so that the result lines up with the truth); None: sized from the scan.
    """
    start = run.metadata["start"]
    try:
        meta = start["edge_ptycho"]
        geometry = meta["geometry"]
    except (KeyError, TypeError) as exc:
        raise ValueError("the run's start document has no edge_ptycho.geometry; it was not "
                         "recorded by the edge_ptycho plans") from exc
    stream = run["primary"]
    frames = _read_key(stream, str(meta.get("image_key", FRAMES_KEY)))
    x = _read_key(stream, STAGE_X_KEY)
    y = _read_key(stream, STAGE_Y_KEY)
    pixel_nm = _pixel_size_nm_from_geometry(geometry)
    positions, shape = window_positions_from_stage(x, y, geometry, frame_size=frames.shape[-1],
                                                   object_shape=object_shape)
    if probe is None and meta.get("probe") is not None:
        stored = meta["probe"]
        if isinstance(stored, Mapping):
            probe = np.asarray(stored["real"]) + 1j * np.asarray(stored["imag"])
        elif np.iscomplexobj(np.asarray(stored)):
            probe = np.asarray(stored)
    diameter = meta.get("beam_diameter_nm")
    return rpie(frames, positions, probe=probe, object_shape=shape, options=options,
                pixel_size_nm=pixel_nm, callback=callback,
                beam_diameter_px=None if diameter is None else float(diameter) / pixel_nm,
                **option_changes)

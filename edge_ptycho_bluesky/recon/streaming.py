"""Streaming, AI-seeded rPIE: :class:`StreamingRefiner` turns the network's live mosaic into an
iterative-quality image while the scan runs.

How it works
------------
The object canvas is fixed up front (the scan's planned extent). Frames arrive in chunks with their
window positions and, when the edge worker has inferred them, their phase patches:

1. **Seed.** Where the canvas has no estimate yet, the window starts from the network's patch
   (``exp(i phase)``). "No estimate yet" means a frame density (see 4.) still below
   ``min_density``: sweeps over the edge of a growing scan, where a frame has few neighbours yet,
   leave poor values that are better replaced by the network's (seeding only never-lit pixels
   left those values in place, and a scan streamed in chunks ended below one seeded all at once).
   Pixels measured densely enough keep their iterative estimate. The
   patches are also stitched into the AI mosaic (:class:`~edge_ptycho_bluesky.stitching.IncrementalStitcher`).
2. **Sweep.** :meth:`StreamingRefiner.sweep` runs an rPIE pass over the frames that arrived since
   the last sweep, then one rPIE iteration (the project's own
   :class:`~edge_ptycho_bluesky.recon.reconstructor.RPIEReconstructor`) over every frame received so
   far, with the probe fixed (optionally refined once ``probe_refine_after`` frames have arrived).
   The frames live in a bounded buffer (``buffer_frames``): the oldest are forgotten first, their
   contribution stays in the object.
3. **Refine after the scan.** :meth:`StreamingRefiner.refine` keeps sweeping for a time budget, or
   until a sweep changes the data error by less than ``tolerance`` (relative).
4. **Keep the AI estimate where the data cannot decide.** Iterative phase retrieval needs overlap:
   at overlap 0 rPIE alone does not converge (SSIM ~0 against the truth), and it walks away from a
   seed it is given. :attr:`StreamingRefiner.image` therefore blends, per pixel, the refined
   object and the AI mosaic by the local *frame density*: the probe intensity (normalised to 1 at
   its peak) summed over the frames that lit a pixel and averaged over a beam-sized square. Below
   ``min_density`` the AI mosaic is kept, above ``full_density`` the refined object, linearly
   between. On the simulated beamline (letters, 200-frame Fermat spirals) the density over the
   scanned area is 18-36 at overlap 0.9, 0.67-1.11 at 0.3 and 0.01-0.44 at 0 (5th percentile to
   maximum, ``benchmarks/bench_refine.py``), so the defaults (0.45, 0.7) take the refined image at 0.9 and 0.3 and the AI image
   at 0. The AI mosaic's
   constant phase offset (which one frame's counts cannot fix) is aligned to the refined object's
   where both are trusted, so the blend has no seam.

Threads: :meth:`sweep` sets torch's intra-op threads to ``threads`` (default 1) so that the refiner
never starves the AI path that shares the machine.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from scipy.ndimage import uniform_filter

from ..options import check_known_keys
from ..sim.probe import beam_diameter_nm
from ..stitching import IncrementalStitcher
from .reconstructor import RPIEReconstructor
from .rpie_options import RPIEOptions

__all__ = ["RefineOptions", "RefinedImage", "StreamingRefiner", "refine_scan"]

logger = logging.getLogger(__name__)

#: Probe amplitude (fraction of its peak) above which a window's pixel counts as lit for seeding.
SEED_THRESHOLD = 0.1


@dataclass(frozen=True)
class RefineOptions:
    """Settings of a :class:`StreamingRefiner` (validated; unknown keys are rejected).

    Parameters
    ----------
    buffer_frames : int
        Frames kept for the sweeps; the oldest are forgotten beyond it (memory: 64 KiB per
        128 x 128 frame).
    tolerance : float
        :meth:`StreamingRefiner.refine` stops when a sweep changes rPIE's data error by less than
        this fraction of it (0: only the time budget stops it).
    min_density, full_density : float
        Frame density below which the AI mosaic is kept and above which the refined object is
        taken (see the module notes).
    probe_refine_after : int or None
        Refine the probe once this many frames have arrived (None: the probe stays fixed).
    threads : int
        torch intra-op threads of the sweeps.
    live_duty : float
        Fraction of the wall time the sweeps may take while frames are arriving (:meth:`sweep`
        sleeps for the rest, leaving the CPU to the AI path); :meth:`StreamingRefiner.refine`
        after the scan runs at full speed.
    alpha, beta : float
        rPIE's object regularisation and step (see :class:`RPIEOptions`).
    batch_size : int
        Frames per rPIE mini-batch.
    batching : {"compact", "sparse"}
        rPIE's grouping of frames into batches (see :class:`RPIEOptions`). Compact batches touch
        only their own part of the canvas: faster on large canvases (sparse scans).
    seed : int
        Seeds rPIE's batch order.
    """

    buffer_frames: int = 20_000
    tolerance: float = 1e-5
    min_density: float = 0.45
    full_density: float = 0.7
    probe_refine_after: int | None = None
    threads: int = 1
    live_duty: float = 0.5
    alpha: float = 0.1
    beta: float = 1.0
    batch_size: int = 64
    batching: str = "compact"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("buffer_frames", "threads", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"RefineOptions.{name} must be an integer >= 1, got {value!r}")
        if not (isinstance(self.live_duty, (int, float)) and 0 < self.live_duty <= 1):
            raise ValueError(f"RefineOptions.live_duty must be in (0, 1], got {self.live_duty!r}")
        if not (isinstance(self.tolerance, (int, float)) and self.tolerance >= 0):
            raise ValueError(f"RefineOptions.tolerance must be >= 0, got {self.tolerance!r}")
        if not 0 <= self.min_density < self.full_density:
            raise ValueError("RefineOptions needs 0 <= min_density < full_density, got "
                             f"{self.min_density!r} and {self.full_density!r}")
        if self.probe_refine_after is not None and not (
                isinstance(self.probe_refine_after, int) and self.probe_refine_after >= 1):
            raise ValueError(f"RefineOptions.probe_refine_after must be None or an integer >= 1, "
                             f"got {self.probe_refine_after!r}")
        self.rpie_options()  # alpha, beta, seed checked by rPIE's own options

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> RefineOptions:
        """Options from a dict (unknown keys raise :class:`~edge_ptycho_bluesky.options.UnknownOptionError`)."""
        check_known_keys("RefineOptions", values, (f.name for f in fields(cls)))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def rpie_options(self, update_probe: bool = False) -> RPIEOptions:
        return RPIEOptions(alpha=self.alpha, beta=self.beta, batch_size=self.batch_size, seed=self.seed,
                           batching=self.batching,  # type: ignore[arg-type]
                           update_probe=update_probe, probe_update_start=0, device="cpu",
                           # The canvas keeps the network's phase reference, which later seeds share.
                           phase_reference=False)


@dataclass
class RefineStats:
    """What a :class:`StreamingRefiner` has done so far (:meth:`to_dict` for metadata and PV attributes)."""

    frames_used: int = 0
    sweeps: int = 0
    seconds: float = 0.0
    frame_updates: int = 0
    #: rPIE's normalised amplitude error of the last sweep (NaN before any).
    error: float = math.nan
    skipped: Counter = field(default_factory=Counter)

    @property
    def frame_updates_per_s(self) -> float:
        return self.frame_updates / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"frames_used": self.frames_used, "sweeps": self.sweeps, "seconds": round(self.seconds, 3),
                "frame_updates": self.frame_updates,
                "frame_updates_per_s": round(self.frame_updates_per_s, 1),
                "error": None if math.isnan(self.error) else round(self.error, 6),
                "skipped": dict(self.skipped)}


class StreamingRefiner:
    """rPIE on a growing scan, seeded by the network's patches (see the module notes).

    Parameters
    ----------
    shape : (int, int)
        Object canvas (rows, cols); window corners are canvas pixels.
    probe : (N, N) complex
        The probe in sqrt(counts) per pixel per frame, as rPIE takes it.
    beam_diameter_px : float, optional
        Beam diameter in canvas pixels (the square over which the frame density is averaged);
        None: the probe's own (the disk holding 90 % of its power).
    options : RefineOptions, optional

    Examples
    --------
    >>> ref = StreamingRefiner(shape, probe, beam_diameter_px=69)     # doctest: +SKIP
    >>> ref.add(frames[:50], corners[:50], patches[:50]); ref.sweep() # doctest: +SKIP
    >>> ref.add(frames[50:], corners[50:], patches[50:])              # doctest: +SKIP
    >>> ref.refine(seconds=10); phase = ref.image                     # doctest: +SKIP
    """

    def __init__(self, shape: tuple[int, int], probe: ArrayLike, *, beam_diameter_px: float | None = None,
                 options: RefineOptions | None = None) -> None:
        self.options = options if options is not None else RefineOptions()
        p = np.asarray(probe)
        if p.ndim == 3:
            p = p[0]
        if p.ndim != 2 or p.shape[0] != p.shape[1] or not np.isfinite(p).all() or not np.abs(p).max() > 0:
            raise ValueError(f"probe must be a finite, non-zero (N, N) complex array, got shape {p.shape}")
        if beam_diameter_px is None:
            beam_diameter_px = beam_diameter_nm(p, 1.0)
        if not beam_diameter_px > 0:
            raise ValueError(f"beam_diameter_px must be positive, got {beam_diameter_px!r}")
        self.shape = (int(shape[0]), int(shape[1]))
        self.probe = p.astype(np.complex64)
        self.n = p.shape[0]
        self.beam_diameter_px = float(beam_diameter_px)
        self._lit = np.abs(p) > SEED_THRESHOLD * np.abs(p).max()
        self._rec: RPIEReconstructor | None = None  # made at the first frames (probe scaled to them)
        self._probe_refining = False
        self._ai: IncrementalStitcher | None = None
        self._intensity = (np.abs(p) ** 2 / float((np.abs(p) ** 2).max())).astype(np.float32)
        self._lit_sum = np.zeros(self.shape, dtype=np.float32)  # every accepted frame, dropped ones too
        self._received = 0
        self._new = 0  # frames added since the last sweep (visited first by the next one)
        self.stats = RefineStats()

    # ------------------------------------------------------------------ frames in

    def add(self, frames: ArrayLike, positions: ArrayLike, patches: ArrayLike | None = None) -> int:
        """Add frames ``(m, N, N)`` at window corners ``(m, 2)`` (canvas pixels), with the network's
        phase patches ``(m, h, w)`` (centred on the windows) when there are.

        Frames with a NaN position, NaN/negative counts or a window outside the canvas are
        skipped and counted in ``stats.skipped`` (``no_position``, ``bad_frame``, ``outside``); a
        patch with NaN is not used as a seed (``bad_patch``), its frame is kept. Returns the number
        of frames accepted.
        """
        f = np.asarray(frames, dtype=np.float32)
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
        if f.ndim == 2:
            f = f[None]
        if f.ndim != 3 or f.shape[1:] != (self.n, self.n) or len(f) != len(pos):
            raise ValueError(f"frames must be (m, {self.n}, {self.n}) with one (row, col) each; "
                             f"got frames {f.shape} and positions {pos.shape}")
        ph = None if patches is None else np.asarray(patches, dtype=np.float32)
        if ph is not None:
            if ph.ndim == 2:
                ph = ph[None]
            if ph.ndim != 3 or len(ph) != len(f) or ph.shape[1] > self.n or ph.shape[2] > self.n:
                raise ValueError(f"patches must be (m, h, w) with h, w <= {self.n}, one per frame; got {ph.shape}")
        ok = np.ones(len(f), dtype=bool)
        reasons = (
            ("no_position", ~np.isfinite(pos).all(axis=1)),
            ("bad_frame", ~(np.isfinite(f).all(axis=(1, 2)) & (np.nan_to_num(f, nan=-1.0).min(axis=(1, 2)) >= 0))),
        )
        for reason, bad in reasons:
            bad &= ok
            self.stats.skipped[reason] += int(bad.sum())
            ok &= ~bad
        with np.errstate(invalid="ignore"):
            corner = np.floor(np.nan_to_num(pos, nan=-1.0))
        outside = ok & ((corner < 0).any(axis=1) | (corner[:, 0] + self.n > self.shape[0])
                        | (corner[:, 1] + self.n > self.shape[1]))
        self.stats.skipped["outside"] += int(outside.sum())
        ok &= ~outside
        if bad_total := int((~ok).sum()):
            logger.warning("refiner: skipped %d of %d frames (%s)", bad_total, len(f), dict(self.stats.skipped))
        if not ok.any():
            return 0
        f, pos = f[ok], pos[ok]
        rec = self._reconstructor(f)
        if ph is not None:
            ph = ph[ok]
            finite = np.isfinite(ph).all(axis=(1, 2))
            self.stats.skipped["bad_patch"] += int((~finite).sum())  # the frame is kept, unseeded
            if finite.any():
                self._seed(pos[finite], ph[finite])
        for r, c in corner[ok].astype(np.int64):
            self._lit_sum[r:r + self.n, c:c + self.n] += self._intensity
        rec.add_frames(f, pos)
        self._new += len(f)
        self._received += len(f)
        excess = rec.num_frames - self.options.buffer_frames
        if excess > 0:
            rec.drop_oldest(excess)
        self.stats.frames_used = self._received
        return int(ok.sum())

    def _reconstructor(self, frames: NDArray[np.float32]) -> RPIEReconstructor:
        """The rPIE engine, made at the first frames with the probe scaled to their counts: for an
        object of unit amplitude a frame holds sum |P|^2 counts, so that the network's patches
        (phase only, amplitude 1) are seeds on the data's scale whatever units the probe came in."""
        if self._rec is None:
            power = float(np.sum(np.abs(self.probe) ** 2))
            counts = float(np.median(frames.sum(axis=(1, 2))))
            if counts > 0:
                self.probe = (self.probe * np.sqrt(counts / power)).astype(np.complex64)
            self._rec = RPIEReconstructor(self.shape, probe=self.probe, options=self.options.rpie_options())
        return self._rec

    def _seed(self, pos: NDArray[np.float64], patches: NDArray[np.float32]) -> None:
        h, w = patches.shape[1:]
        off = np.array([(self.n - h) / 2, (self.n - w) / 2])
        if self._ai is None:
            weight = np.abs(self.probe)[(self.n - h) // 2:(self.n - h) // 2 + h, (self.n - w) // 2:(self.n - w) // 2 + w]
            self._ai = IncrementalStitcher(self.shape, patch_shape=(h, w), weight=weight, fill=0.0)
        self._ai.add(patches, pos + off)
        lit = self._lit[(self.n - h) // 2:(self.n - h) // 2 + h, (self.n - w) // 2:(self.n - w) // 2 + w]
        corners = np.rint(pos + off).astype(np.int64)
        corners = np.clip(corners, 0, np.array(self.shape) - (h, w))
        # No estimate yet: pixels too sparsely measured so far for rPIE to have fixed them (sweeps
        # over the edge of a growing scan leave poor values there), and not seeded by this chunk.
        # The density is computed only around this chunk's windows (the filter needs half a beam more).
        top, left = corners.min(axis=0)
        bottom, right = corners.max(axis=0) + (h, w)
        unsettled = self._density_in(top, bottom, left, right) < self.options.min_density
        seeded = np.zeros(unsettled.shape, dtype=bool)
        assert self._rec is not None
        for (r, c), patch in zip(corners, patches):
            window = (slice(r - top, r - top + h), slice(c - left, c - left + w))
            new = lit & unsettled[window] & ~seeded[window]
            if new.any():
                self._rec.seed_object((r, c), np.exp(1j * patch).astype(np.complex64), new)
            seeded[window] |= lit

    # ------------------------------------------------------------------ sweeps

    def sweep(self, duty: float | None = None) -> float:
        """One rPIE iteration over the buffered frames, then a pause that keeps the sweeps to
        ``duty`` of the wall time (default ``options.live_duty``); returns the normalised
        amplitude error."""
        if self._rec is None or self._rec.num_frames == 0:
            return math.nan
        after = self.options.probe_refine_after
        if after is not None and not self._probe_refining and self._received >= after:
            self._rec.options = self.options.rpie_options(update_probe=True)
            self._probe_refining = True
        threads = torch.get_num_threads()
        torch.set_num_threads(self.options.threads)
        try:
            t0 = time.perf_counter()
            buffered = self._rec.num_frames
            newest = min(self._new, buffered)
            if newest and newest < buffered:  # newest first, then all
                self._rec.update_frames(np.arange(buffered - newest, buffered))
                self.stats.frame_updates += newest
            self._new = 0
            error = self._rec.iterate(1)[0]
            took = time.perf_counter() - t0
            self.stats.seconds += took
        finally:
            torch.set_num_threads(threads)
        duty = self.options.live_duty if duty is None else duty
        if duty < 1:
            time.sleep(took * (1 / duty - 1))
        self.stats.sweeps += 1
        self.stats.error = float(error)
        self.stats.frame_updates += self._rec.num_frames
        return error

    def refine(self, seconds: float, tolerance: float | None = None) -> int:
        """Sweep until ``seconds`` have passed or a sweep lowers the data error by less than the
        tolerance, relatively (``options.tolerance`` by default); returns the sweeps run."""
        tol = self.options.tolerance if tolerance is None else float(tolerance)
        if not math.isfinite(seconds) or seconds < 0:
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds!r}")
        deadline = time.perf_counter() + seconds
        done, previous = 0, math.inf
        while time.perf_counter() < deadline and self._rec is not None and self._rec.num_frames:
            error = self.sweep(duty=1.0)
            done += 1
            if math.isfinite(previous) and abs(previous - error) < tol * previous:
                logger.info("refiner: converged after %d sweeps (error %.3g -> %.3g)", done, previous, error)
                break
            previous = error
        return done

    # ------------------------------------------------------------------ images

    @property
    def buffered_frames(self) -> int:
        """Frames in the buffer that the sweeps visit."""
        return 0 if self._rec is None else self._rec.num_frames

    @property
    def density(self) -> NDArray[np.float32]:
        """Frames per pixel (probe intensity normalised to its peak), averaged over a beam-sized square."""
        return self._density_in(0, self.shape[0], 0, self.shape[1])

    def _density_in(self, top: int, bottom: int, left: int, right: int) -> NDArray[np.float32]:
        """:attr:`density` on rows ``top:bottom`` and columns ``left:right`` only (the same values)."""
        size = max(round(self.beam_diameter_px), 1)
        pad = size // 2 + 1
        r0, c0 = max(top - pad, 0), max(left - pad, 0)
        r1, c1 = min(bottom + pad, self.shape[0]), min(right + pad, self.shape[1])
        local = uniform_filter(self._lit_sum[r0:r1, c0:c1], size=size)
        return local[top - r0:bottom - r0, left - c0:right - c0].astype(np.float32)

    @property
    def ai_image(self) -> NDArray[np.float32] | None:
        """The stitched AI phase (0 where no patch landed), or None without patches."""
        return None if self._ai is None else self._ai.image.astype(np.float32)

    @property
    def object(self) -> NDArray[np.complex64]:
        """The refined complex object (before blending with the AI mosaic; ones before any frame)."""
        return np.ones(self.shape, np.complex64) if self._rec is None else self._rec.object

    @property
    def image(self) -> NDArray[np.float32]:
        """The refined phase, blended with the AI mosaic where the frame density is low."""
        obj = self.object
        if self._ai is None:
            return np.angle(obj).astype(np.float32)
        o = self.options
        trust = np.clip((self.density - o.min_density) / (o.full_density - o.min_density), 0.0, 1.0)
        ai = np.exp(1j * self._ai.image)
        # Align the AI mosaic's constant phase to the refined object's where both are trusted.
        both = trust * self._ai.coverage
        if both.sum() > 0:
            ai = ai * np.exp(1j * np.angle(np.sum(both * obj * np.conj(ai))))
        amp = np.abs(obj)
        blended = trust * obj / np.maximum(amp, 1e-12) + (1.0 - trust) * ai
        return np.angle(blended).astype(np.float32)


@dataclass(frozen=True)
class RefinedImage:
    """A whole scan refined at once (:func:`refine_scan`): the phase and what it took."""

    phase: NDArray[np.float32]
    stats: dict[str, Any]

    @property
    def sweeps(self) -> int:
        return int(self.stats["sweeps"])

    @property
    def seconds(self) -> float:
        return float(self.stats["seconds"])

    @property
    def frame_updates_per_s(self) -> float:
        return float(self.stats["frame_updates_per_s"])


def refine_scan(frames: ArrayLike, corners: ArrayLike, patches: ArrayLike | None, shape: tuple[int, int],
                probe: ArrayLike, *, seconds: float, beam_diameter_px: float | None = None,
                options: RefineOptions | None = None) -> RefinedImage:
    """Refine a stored scan with its AI patches for ``seconds`` (what ``edge-ptycho infer
    --refine`` and ``edge-ptycho reproduce`` run): all frames at once, then sweeps."""
    ref = StreamingRefiner(shape, probe, beam_diameter_px=beam_diameter_px, options=options)
    ref.add(frames, corners, patches)
    ref.refine(seconds)
    return RefinedImage(phase=ref.image, stats=ref.stats.to_dict())

"""The rPIE engine: :class:`RPIEReconstructor`, in torch, batched over scan positions.

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

The starting probe, when none is given, comes from :mod:`edge_ptycho_bluesky.recon.probe_init`;
sub-pixel positions and the global phase reference are described with the options
(:mod:`edge_ptycho_bluesky.recon.rpie_options`), frames and positions in
:mod:`edge_ptycho_bluesky.recon.positions`. The square root of the frames is taken once, when
frames are added.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from .positions import check_inside, validate_scan
from .probe_init import initial_probe_from_frames, modelled_probe
from .rpie_helpers import fast_fft_len, morton_order, orthogonalize_modes, resolve_device, shift_ramps
from .rpie_options import ProgressCallback, RPIEOptions, RPIEResult

__all__ = ["RPIEDivergenceError", "RPIEReconstructor"]

logger = logging.getLogger(__name__)


class RPIEDivergenceError(RuntimeError):
    """The reconstruction produced NaN/inf; the reconstructor was rolled back to its last good state."""


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
        self.device = resolve_device(self.options.device)
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
        return orthogonalize_modes(torch.cat([probe, torch.stack(extra)]))

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

    def seed_object(self, corner: tuple[int, int], values: ArrayLike, where: ArrayLike) -> None:
        """Set the object at ``corner`` (row, col) to ``values`` (h, w) complex where ``where`` is true.

        For a starting estimate of newly covered area (e.g. a network's phase patch) while frames
        keep arriving; pixels outside ``where`` keep their current value.

        Raises
        ------
        ValueError
            Shapes that differ, NaN/inf values, or a region outside the object.
        """
        vals = np.asarray(values)
        mask = np.asarray(where, dtype=bool)
        if vals.ndim != 2 or mask.shape != vals.shape:
            raise ValueError(f"values {vals.shape} and where {mask.shape} must be the same 2-D shape")
        if not np.isfinite(vals).all():
            raise ValueError("seed values contain NaN/inf")
        r, c = (int(v) for v in corner)
        h, w = vals.shape
        if r < 0 or c < 0 or r + h > self.object_shape[0] or c + w > self.object_shape[1]:
            raise ValueError(f"a {h} x {w} seed at {(r, c)} leaves the {self.object_shape} object")
        region = self._object[r:r + h, c:c + w]
        sel = torch.as_tensor(mask, device=self.device)
        region[sel] = torch.as_tensor(vals.astype(np.complex64), device=self.device)[sel]

    def update_frames(self, indices: ArrayLike) -> float:
        """One object-only pass over the frames at ``indices`` (e.g. the newest, before a sweep
        over all); not counted as an iteration (the error history, probe and illumination stay).
        Returns the pass's error (those frames' amplitude error over all frames' counts).

        Raises
        ------
        RPIEDivergenceError
            When the pass makes the object non-finite (it is undone first).
        """
        self._merge_pending()
        if self._amp is None or self._probe is None:
            raise ValueError("no frames: call add_frames(frames, positions) first")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size == 0:
            return 0.0
        if idx.min() < 0 or idx.max() >= len(self._positions):
            raise ValueError(f"frame indices must lie in [0, {len(self._positions)}), got {idx.min()}..{idx.max()}")
        if self._plan is None:
            self._plan = self._build_plan()
        t0 = time.perf_counter()
        saved = self._object.clone()
        with torch.no_grad():
            err = self._epoch(subset=idx)
        self._time_s += time.perf_counter() - t0
        if not (math.isfinite(err) and bool(torch.isfinite(self._object).all())):
            self._object = saved
            raise RPIEDivergenceError(f"an rPIE pass over {idx.size} frames diverged (error {err!r}); undone")
        return err

    def drop_oldest(self, count: int) -> None:
        """Forget the ``count`` oldest frames (their contribution stays in the object): a bounded
        frame buffer for long streams."""
        self._merge_pending()
        count = min(int(count), len(self._positions))
        if count <= 0 or self._amp is None:
            return
        gone = self._amp[:count]
        self._total_intensity -= float(gone.square().sum(dtype=torch.float64))
        self._amp = self._amp[count:].contiguous()
        self._positions = self._positions[count:]
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
        order = morton_order(pos, cell=max(n / 8, 1.0))
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
            plan["bin_ramps"] = shift_ramps(plan["freq"], plan["bin_shifts"])  # (Q, N, N)
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
        shape = (fast_fft_len(bh), fast_fft_len(bw))
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

    def _epoch(self, subset: NDArray[np.int64] | None = None) -> float:
        """One iteration over all frames (or, object only, over ``subset``); returns the normalised
        amplitude error of the frames visited."""
        plan = self._plan
        assert plan is not None and self._amp is not None and self._probe is not None
        opts = self.options
        n = self._n
        assert n is not None
        obj = self._object
        probe = self._probe
        k_modes = probe.shape[0]
        update_probe = opts.update_probe and self._iterations >= opts.probe_update_start and subset is None
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

        if subset is not None:
            capacity = min(opts.batch_size, buf["o"].shape[0] - 1)  # the work buffers' batch size
            chunks = max(1, math.ceil(len(subset) / capacity))
            order = [(None, np.sort(b)) for b in np.array_split(subset, chunks)]
        elif opts.batching == "random":
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
                ramp_j = shift_ramps(freq, plan["frac"][idx])  # (B, N, N)
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
            shape = (fast_fft_len(sh + n), fast_fft_len(sw + n))
            corr = torch.fft.irfft2(torch.fft.rfft2(o2, s=shape) * torch.fft.rfft2(
                self._delta_map(plan["corner"], plan["scan_box"], shape)).conj(), s=shape)
            den_p = corr[:n, :n].clamp_min(0.0)
            pa, pb = opts.probe_alpha, opts.probe_beta
            probe += pb * num_probe / ((1 - pa) * den_p + max(pa, 1e-4) * den_p.max() + 1e-30)
            if k_modes > 1:
                self._probe = probe = orthogonalize_modes(probe)
            self._den_cache.clear()
            self._shift_cache = None
        err = torch.stack(err_parts).double().sum() if err_parts else torch.zeros(())
        if subset is not None:  # not an iteration: illumination and global phase stay as they were
            return float(err.item()) / max(self._total_intensity, 1e-30)
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


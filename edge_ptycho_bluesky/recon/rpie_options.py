"""Settings and outcome of an rPIE reconstruction: :class:`RPIEOptions`, :class:`RPIEResult`.

The solver itself is :class:`edge_ptycho_bluesky.recon.reconstructor.RPIEReconstructor` (its
module notes describe the algorithm); :func:`edge_ptycho_bluesky.recon.rpie.rpie` runs it in one call.

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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from ..options import check_known_keys

__all__ = ["ProgressCallback", "RPIEOptions", "RPIEResult"]

#: ``callback(iteration, error)``: ``iteration`` counts from 1 over the reconstructor's life.
ProgressCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class RPIEOptions:
    """Settings of an rPIE reconstruction (validated on construction; unknown keys are rejected).

    Parameters
    ----------
    iterations : int
        Iterations (epochs over all frames) that :func:`~edge_ptycho_bluesky.recon.rpie.rpie` runs.
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
        """Options from a dict (e.g. JSON); unknown keys raise
        :class:`~edge_ptycho_bluesky.options.UnknownOptionError` (a ValueError) naming them."""
        check_known_keys("rPIE option", values, (f.name for f in fields(cls)))
        return cls(**dict(values))

    def with_updates(self, **changes: Any) -> RPIEOptions:
        """A copy with some fields changed (validated; unknown names raise
        :class:`~edge_ptycho_bluesky.options.UnknownOptionError`, a ValueError)."""
        check_known_keys("rPIE option", changes, (f.name for f in fields(self)))
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


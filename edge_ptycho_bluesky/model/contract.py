"""A model's input contract: how detector counts become the network's input.

The network is not invariant to the count scale (see :mod:`~edge_ptycho_bluesky.model.preprocess`):
it must see frames on the scale of its training data. A model version records that scale
(``extra.preprocess.scale``) and the exposure time of its training frames
(``extra.preprocess.exposure_s``); a frame taken with another exposure is scaled by
``training exposure / frame exposure`` first. :class:`InputContract` is the one place that applies
both, for every path that feeds a network: the edge worker, validation of a deployed model on a
new scan, ``edge-ptycho infer`` and training. So a scan recorded at another exposure is validated
and inferred offline on exactly the input the edge worker gives the network live.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..options import check_known_keys, is_real
from .preprocess import preprocess

__all__ = ["PREPROCESS_OPTIONS", "InputContract"]

#: Keyword options of :func:`~edge_ptycho_bluesky.model.preprocess.preprocess` a contract may carry
#: for detector frames that need binning or cropping (the edge worker's ``--bin``/``--crop-to``...).
PREPROCESS_OPTIONS = frozenset({"size", "mode", "reduce", "crop_to", "scale", "nonnegative"})


def _positive_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not is_real(value) or not value > 0:
        raise ValueError(f"InputContract.{name} must be a positive finite number or None, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class InputContract:
    """How frames become network input for one model.

    Parameters
    ----------
    scale : float or None
        The model's count scale (multiplies the preprocessed counts); None: raw counts.
    exposure_s : float or None
        Exposure time (s) of the model's training frames; None: unknown, frames are not scaled
        for exposure.
    options : mapping
        Options of :func:`~edge_ptycho_bluesky.model.preprocess.preprocess` for the detector's
        frames (binning, cropping, ``nonnegative``; its ``scale`` multiplies on top of ``scale``).
    """

    scale: float | None = None
    exposure_s: float | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _positive_or_none("scale", self.scale))
        object.__setattr__(self, "exposure_s", _positive_or_none("exposure_s", self.exposure_s))
        check_known_keys("preprocess option", self.options, PREPROCESS_OPTIONS)
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @classmethod
    def from_version(cls, version: Any, *, scale: float | None = None, reference_exposure_s: float | None = None,
                     options: Mapping[str, Any] | None = None) -> InputContract:
        """The contract a model version recorded (a registry ``ModelVersion`` or anything with
        ``input_scale`` and ``input_exposure_s``).

        ``scale`` replaces the recorded scale (a hand-set override); ``reference_exposure_s`` stands
        in for a training exposure the version does not record; ``options`` are the detector-side
        :func:`preprocess` options (their ``scale`` multiplies on top of the model's).
        """
        recorded_scale = getattr(version, "input_scale", None)
        exposure = getattr(version, "input_exposure_s", None) or reference_exposure_s
        return cls(scale=recorded_scale if scale is None else scale, exposure_s=exposure, options=options or {})

    def exposure_factors(self, exposure_s: float | Sequence[Any] | None, n: int, *,
                         on_bad_exposure: Callable[[int, Any], None] | None = None) -> NDArray[np.float32] | None:
        """Per-frame count factors ``self.exposure_s / frame exposure``, or None (nothing to scale).

        ``exposure_s`` is one exposure for all ``n`` frames or one per frame (None: unknown, factor
        1). A value that is not a positive time gets factor 1 and is reported through
        ``on_bad_exposure(index, value)``.
        """
        if self.exposure_s is None or exposure_s is None:
            return None
        values = [exposure_s] * n if np.ndim(exposure_s) == 0 else list(exposure_s)  # type: ignore[arg-type]
        if len(values) != n:
            raise ValueError(f"{len(values)} exposure times for {n} frames")
        if all(v is None for v in values):
            return None
        factors = np.ones(n, np.float32)
        for k, v in enumerate(values):
            if is_real(v) and v > 0:
                factors[k] = self.exposure_s / float(v)
            elif v is not None and on_bad_exposure is not None:
                on_bad_exposure(k, v)
        return factors

    def prepare(self, frames: ArrayLike, exposure_s: float | Sequence[Any] | None = None, *,
                on_bad_exposure: Callable[[int, Any], None] | None = None) -> NDArray[np.float32]:
        """Network input ``(N, 1, H, W) float32`` for detector frames ``(N, H, W)`` (or one ``(H, W)``).

        Parameters
        ----------
        frames
            Detector counts (validated: dtype, shape, NaN/inf).
        exposure_s
            The frames' exposure time (s): one for all, one per frame, or None (not known).
        on_bad_exposure
            Called with ``(index, value)`` for a per-frame exposure that is not a positive time
            (that frame is left unscaled).

        Raises
        ------
        InvalidFrameError, ValueError
            As :func:`~edge_ptycho_bluesky.model.preprocess.preprocess`.
        """
        x = preprocess(frames, **self.options)
        factors = self.exposure_factors(exposure_s, len(x), on_bad_exposure=on_bad_exposure)
        if (self.scale is not None or factors is not None) and np.may_share_memory(x, np.asarray(frames)):
            x = x.copy()  # scaled in place below: never the caller's frames
        if self.scale is not None and self.scale != 1.0:
            x *= np.float32(self.scale)
        if factors is not None:
            x *= factors[:, None, None, None]
        return x

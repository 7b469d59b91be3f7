"""Input preprocessing for PtychoNN: detector frames -> ``(N, 1, 128, 128) float32``.

What the network expects
------------------------
PtychoNN 2.0 takes the diffraction *intensity* of one frame as a 128 x 128 float32 image, in
detector counts, fftshifted (zero frequency at the centre, as detectors record it).  The
paper's edge code does nothing else: it crops/bins the frame to 128 x 128 and casts it to
float32 -- no log scaling, no normalisation, no background subtraction
(``frame[2:-2, 2:-2].reshape(128, 4, 128, 4)`` for 516 x 516 Medipix3 frames).  The network is
therefore *not* invariant to the count scale: feed it counts on the scale of its training
data.  Two knobs control that scale here:

* ``reduce``: ``"sum"`` (default) bins by adding the counts of each ``f x f`` block, which keeps
  photon counts (a 512 x 512 frame binned 4 x 4 holds the same total); ``"mean"`` divides by
  ``f**2`` (what the paper's ``framePreProcess.py`` does for 516 x 516 frames).
  Measured on the real APS frames ``test235_truncated.npz`` (512 x 512 -> 128 x 128) with the
  paper's ``ptychoNN_8.onnx``: with ``"sum"`` 47 % of output pixels sit at the tanh limits
  (|phase| > 3.1 rad), with ``"mean"`` 0.6 % -- the paper's network expects mean-binned counts
  (``reduce="mean"``, or ``scale=1/16`` after a sum).  Models trained in this project on
  ``preprocess``-ed data see the same convention at training and inference time either way.
* ``scale``: a constant factor applied after binning, e.g. the ratio of the training exposure
  to the current one (``t_train / t_now``) so counts at 2 kHz match a model trained at 0.4 s, or
  ``1 / f**2`` to turn sums into means.

Frames must not contain NaN/inf.  Negative values are allowed by default (dark-subtracted
frames) and can be refused with ``nonnegative=True`` (raw counts).

The cheap checks in :func:`frame_problem` return a reason string instead of raising, so the
edge worker can count a bad frame as dropped *with a reason* and carry on.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import FRAME_SIZE

__all__ = [
    "FRAME_SIZE",
    "InvalidFrameError",
    "bin_frames",
    "center_crop",
    "frame_problem",
    "preprocess",
    "validate_frame",
    "validate_frames",
]

logger = logging.getLogger(__name__)


Reduce = Literal["sum", "mean"]
Mode = Literal["bin", "crop"]


class InvalidFrameError(ValueError):
    """A frame (or stack of frames) cannot be fed to the network; the message says why."""


def _dtype_problem(dtype: np.dtype) -> str | None:
    if dtype.kind in "biuf":
        return "boolean frames are not detector counts" if dtype.kind == "b" else None
    return f"frames must be integer or float counts, got dtype {dtype}"


def frame_problem(
    frame: ArrayLike,
    *,
    shape: tuple[int, int] | None = (FRAME_SIZE, FRAME_SIZE),
    nonnegative: bool = False,
) -> str | None:
    """Why one frame cannot be inferred, or ``None`` when it can.

    Cheap enough to call on every frame in the edge worker (one pass for NaN/inf on float
    frames, one for negatives when asked).

    Parameters
    ----------
    frame : (H, W) array
        Integer or float counts.
    shape : (int, int) or None
        Required shape; ``None`` accepts any 2-D shape.
    nonnegative : bool
        Also refuse negative values (raw counts cannot be negative; an int16 overflow can).

    Returns
    -------
    str or None
        A short reason such as ``"shape (64, 64) != (128, 128)"``, or ``None``.
    """
    arr = np.asarray(frame)
    problem = _dtype_problem(arr.dtype)
    if problem:
        return problem
    if arr.ndim != 2:
        return f"a frame must be 2-D (H, W), got shape {arr.shape}"
    if arr.size == 0:
        return f"empty frame, shape {arr.shape}"
    if shape is not None and arr.shape != tuple(shape):
        return f"shape {arr.shape} != {tuple(shape)}"
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        return f"{int(np.count_nonzero(~np.isfinite(arr)))} NaN/inf values"
    if nonnegative and arr.dtype.kind in "if" and (arr < 0).any():
        return f"{int(np.count_nonzero(arr < 0))} negative values"
    return None


def validate_frame(
    frame: ArrayLike,
    *,
    shape: tuple[int, int] | None = (FRAME_SIZE, FRAME_SIZE),
    nonnegative: bool = False,
) -> NDArray[np.generic]:
    """Check one frame and return it as an array; raise :class:`InvalidFrameError` if bad.

    Parameters are those of :func:`frame_problem`.
    """
    arr = np.asarray(frame)
    problem = frame_problem(arr, shape=shape, nonnegative=nonnegative)
    if problem:
        raise InvalidFrameError(f"invalid frame: {problem}")
    return arr


def validate_frames(frames: ArrayLike, *, nonnegative: bool = False) -> NDArray[np.generic]:
    """Check a stack of frames and return it as ``(N, H, W)`` (a view where possible).

    Parameters
    ----------
    frames : (N, H, W), (N, 1, H, W) or (H, W) array
        Integer or float counts; a single 2-D frame becomes ``N = 1``.
    nonnegative : bool
        Refuse negative values.

    Raises
    ------
    InvalidFrameError
        Wrong dtype or number of dimensions, no frames, empty frames, NaN/inf, negatives.
    """
    arr = np.asarray(frames)
    problem = _dtype_problem(arr.dtype)
    if problem:
        raise InvalidFrameError(problem)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    elif arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    elif arr.ndim != 3:
        raise InvalidFrameError(
            f"frames must be (N, H, W), (N, 1, H, W) or one (H, W) frame, got shape {arr.shape}"
        )
    if arr.shape[0] == 0:
        raise InvalidFrameError(f"no frames: shape {arr.shape}")
    if arr.shape[1] == 0 or arr.shape[2] == 0:
        raise InvalidFrameError(f"frames are empty: shape {arr.shape}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            which = np.flatnonzero(bad.any(axis=(1, 2)))
            raise InvalidFrameError(
                f"{int(bad.sum())} NaN/inf values in frame(s) {which[:10].tolist()}; "
                "mask or drop those frames first"
            )
    if nonnegative and arr.dtype.kind in "if" and (arr < 0).any():
        which = np.flatnonzero((arr < 0).any(axis=(1, 2)))
        raise InvalidFrameError(
            f"negative counts in frame(s) {which[:10].tolist()} (int16 overflow?); "
            "fix the data or pass nonnegative=False"
        )
    return arr


def center_crop(frames: NDArray[np.generic], size: int | tuple[int, int]) -> NDArray[np.generic]:
    """Centre-crop ``(..., H, W)`` frames to ``size`` (a view; no copy).

    For an odd margin the extra pixel is cut from the end, so index ``H // 2`` (the zero
    frequency of an fftshifted frame) stays at ``size // 2``.

    Raises
    ------
    ValueError
        If ``size`` is larger than the frames.
    """
    rows, cols = (size, size) if isinstance(size, (int, np.integer)) else size
    h, w = frames.shape[-2:]
    if rows < 1 or cols < 1 or rows > h or cols > w:
        raise ValueError(f"cannot crop frames of shape {(h, w)} to {(rows, cols)}; crop size must be 1..frame size")
    r0 = h // 2 - rows // 2
    c0 = w // 2 - cols // 2
    return frames[..., r0 : r0 + rows, c0 : c0 + cols]


def bin_frames(frames: NDArray[np.generic], factor: int, reduce: Reduce = "sum") -> NDArray[np.float32]:
    """Bin ``(N, H, W)`` frames by ``factor x factor`` blocks.

    Parameters
    ----------
    frames : (N, H, W) integer or float array
        ``H`` and ``W`` must be multiples of ``factor``.
    factor : int
        Block side (4 turns 512 x 512 into 128 x 128).
    reduce : {"sum", "mean"}
        Add the block's counts (keeps photon counts) or average them.

    Returns
    -------
    (N, H // factor, W // factor) float32
        Sums are exact for integer input (accumulated in int64) up to 2**24 per pixel.
    """
    if isinstance(factor, bool) or not isinstance(factor, (int, np.integer)) or factor < 1:
        raise ValueError(f"bin factor must be a positive integer, got {factor!r}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    n, h, w = frames.shape
    if h % factor or w % factor:
        raise ValueError(f"frames of shape {(h, w)} cannot be binned by {factor}: not a multiple")
    if factor == 1:
        return np.ascontiguousarray(frames, dtype=np.float32)
    acc = np.int64 if frames.dtype.kind in "biu" else np.float64
    blocks = frames.reshape(n, h // factor, factor, w // factor, factor)
    out = blocks.sum(axis=(2, 4), dtype=acc)
    if reduce == "mean":
        out = out / (factor * factor)
    return out.astype(np.float32)


def preprocess(
    frames: ArrayLike,
    *,
    size: int = FRAME_SIZE,
    mode: Mode = "bin",
    reduce: Reduce = "sum",
    crop_to: int | None = None,
    scale: float | None = None,
    nonnegative: bool = False,
) -> NDArray[np.float32]:
    """Turn detector frames into network input ``(N, 1, size, size) float32``.

    Steps: validate (dtype, ndim, NaN/inf), optional centre-crop to ``crop_to``, then bin by
    the integer factor ``H // size`` (``mode="bin"``) or centre-crop to ``size``
    (``mode="crop"``), cast to float32 and multiply by ``scale``.  No log scaling or
    normalisation (as in the paper's edge code; see the module docstring).

    Parameters
    ----------
    frames : (N, H, W), (N, 1, H, W) or (H, W) array
        Integer (uint8/16/32, int16/32/64) or float counts, fftshifted.
    size : int
        Output side; 128 for PtychoNN 2.0.
    mode : {"bin", "crop"}
        ``"bin"``: ``H`` and ``W`` must be the same integer multiple of ``size`` (after
        ``crop_to``); frames already ``size`` x ``size`` pass through.  ``"crop"``: take the
        central ``size`` x ``size`` pixels.
    reduce : {"sum", "mean"}
        How bins combine counts (``mode="bin"`` only).
    crop_to : int or None
        Centre-crop to ``crop_to`` x ``crop_to`` first, e.g. 512 for 516 x 516 Medipix3 frames
        (the paper's ``frame[2:-2, 2:-2]``), so they can be binned by 4.
    scale : float or None
        Multiply the result by this count scale factor (exposure ratio, ``1/f**2``, ...).
    nonnegative : bool
        Refuse negative values.

    Returns
    -------
    (N, 1, size, size) float32
        C-contiguous, ready for any engine.  When nothing needs converting (float32 frames of
        the right size, no ``scale``) it is a view of ``frames``, not a copy.

    Raises
    ------
    InvalidFrameError
        Bad dtype, ndim, empty input, NaN/inf (or negatives when asked).
    ValueError
        Frames that cannot be binned by an integer factor or cropped to ``size``, bad options.

    Examples
    --------
    >>> x = preprocess(np.ones((2, 512, 512), np.uint16))
    >>> x.shape, x.dtype, float(x[0, 0, 0, 0])
    ((2, 1, 128, 128), dtype('float32'), 16.0)
    """
    if mode not in ("bin", "crop"):
        raise ValueError(f"mode must be 'bin' or 'crop', got {mode!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    arr = validate_frames(frames, nonnegative=nonnegative)
    if crop_to is not None:
        arr = center_crop(arr, crop_to)
    h, w = arr.shape[1:]
    if mode == "crop":
        out = np.ascontiguousarray(center_crop(arr, size), dtype=np.float32)
    else:
        if h % size or w % size or h != w:
            hint = f"; pass crop_to={size * (min(h, w) // size)} first" if min(h, w) >= size else ""
            raise ValueError(
                f"frames of shape {(h, w)} cannot be binned to {(size, size)}: the factor must be the same "
                f"integer on both axes (use mode='crop' to take the centre{hint})"
            )
        out = bin_frames(arr, h // size, reduce)
    if scale is not None and scale != 1.0:
        out = out * np.float32(scale)  # never in place: `out` may share memory with `frames`
    return out[:, np.newaxis]

"""What every inference engine takes: a checked ``(B, 1, H, W) float32`` batch, in chunks.

:func:`as_batch` checks and shapes the frames given to an engine; :func:`split_and_pad` cuts
a batch into the chunks a fixed-batch model (or a bounded one) runs, zero-padding the last.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .preprocess import FRAME_SIZE

FRAME_SHAPE: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)  # the networks' input (ptychonn.FRAME_SHAPE)

__all__ = ["as_batch", "split_and_pad"]


def as_batch(frames: ArrayLike, frame_shape: tuple[int, int] | None = FRAME_SHAPE) -> NDArray[np.float32]:
    """Check engine input and return it as a C-contiguous ``(B, 1, H, W) float32`` array.

    Parameters
    ----------
    frames : (B, H, W), (B, 1, H, W) or (H, W) array
        Preprocessed frames (:func:`~edge_ptycho_bluesky.model.preprocess.preprocess`); a
        single 2-D frame is a batch of one.  Real dtypes are cast to float32.
    frame_shape : (int, int) or None
        Required ``(H, W)``; ``None`` accepts any.

    Raises
    ------
    TypeError
        Non-real dtype.
    ValueError
        Wrong number of dimensions, channel count or frame shape.
    """
    arr = np.asarray(frames)
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"frames must be real numbers (float32), got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[np.newaxis, np.newaxis]
    elif arr.ndim == 3:
        arr = arr[:, np.newaxis]
    elif arr.ndim != 4 or arr.shape[1] != 1:
        raise ValueError(
            f"frames must be (B, H, W) or (B, 1, H, W), got shape {arr.shape}; "
            "use edge_ptycho_bluesky.model.preprocess() to prepare detector frames"
        )
    if frame_shape is not None and arr.shape[-2:] != tuple(frame_shape):
        raise ValueError(
            f"frames are {arr.shape[-2:]}, the model takes {tuple(frame_shape)}; "
            "bin or crop them with edge_ptycho_bluesky.model.preprocess()"
        )
    return np.ascontiguousarray(arr, dtype=np.float32)


def split_and_pad(
    batch: NDArray[np.float32], chunk: int | None, pad: bool
) -> list[tuple[NDArray[np.float32], int]]:
    """Chunks of ``batch`` (each with its count of real frames), zero-padded to ``chunk`` if ``pad``."""
    if chunk is None or len(batch) <= chunk and not pad:
        return [(batch, len(batch))]
    pieces = []
    for start in range(0, len(batch), chunk):
        piece = batch[start : start + chunk]
        n = len(piece)
        if pad and n < chunk:
            piece = np.concatenate([piece, np.zeros((chunk - n, *piece.shape[1:]), np.float32)])
        pieces.append((piece, n))
    return pieces

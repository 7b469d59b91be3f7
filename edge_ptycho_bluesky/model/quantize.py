"""Static int8 quantization of a PtychoNN ONNX model with ONNX Runtime, calibrated on real frames.

:func:`quantize_int8` writes a QDQ int8 model (per-channel weights, activations calibrated on
the frames given, e.g. the paper's real frames binned to 128 x 128); :func:`agreement` compares
its phase with the float model's on held-out frames (SSIM, max |difference|).  Whether int8 pays
off depends on the CPU (VNNI/AVX-512 int8 instructions) and on how much of the network ONNX
Runtime runs in int8: ``benchmarks/bench_infer.py`` measures it next to float32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from .. import FRAME_SIZE
from ..metrics import ssim
from .engines import OnnxRuntimeEngine

logger = logging.getLogger(__name__)

__all__ = ["agreement", "quantize_and_check", "quantize_int8"]


def quantize_int8(model: str | Path, out: str | Path, calibration: NDArray[np.float32], *,
                  per_channel: bool = True, batch: int = 8) -> Path:
    """Write a statically quantized (QDQ, int8) copy of ``model`` to ``out``.

    Parameters
    ----------
    model
        A float32 ONNX model with input ``(N, 1, 128, 128)`` (dynamic batch).
    out
        The int8 model file.
    calibration : (N, 1, 128, 128) float32
        Network inputs (preprocessed frames, scaled as the model expects) for the activation ranges.
    per_channel, batch
        Per-channel weight scales; calibration batch size.

    Raises
    ------
    ValueError
        Calibration data of the wrong shape or with non-finite values.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = np.asarray(calibration, dtype=np.float32)
    if calibration.ndim != 4 or calibration.shape[1:] != (1, FRAME_SIZE, FRAME_SIZE) or len(calibration) == 0:
        raise ValueError(
            f"calibration must be (N, 1, {FRAME_SIZE}, {FRAME_SIZE}) network inputs, got {calibration.shape}"
        )
    if not np.isfinite(calibration).all():
        raise ValueError("calibration frames contain NaN/inf")
    input_name = onnx.load(str(model), load_external_data=False).graph.input[0].name

    class Frames(CalibrationDataReader):
        def __init__(self) -> None:
            self._it: Iterator[dict[str, NDArray[np.float32]]] = (
                {input_name: calibration[i:i + batch]} for i in range(0, len(calibration), batch))

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self._it, None)

    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
        quantize_static(str(prepared), str(out), Frames(), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8)
    logger.info("int8 model %s from %s, calibrated on %d frames", out, model, len(calibration))
    return out


def quantize_and_check(model: str | Path, out: str | Path,
                       inputs: NDArray[np.float32]) -> tuple[Path, dict[str, float]]:
    """Quantize ``model`` calibrated on the first half of ``inputs``; its :func:`agreement` with
    the float model on the other half (plus ``"frames"``, the number compared).

    Raises
    ------
    ValueError
        Fewer than 2 inputs (nothing would be left to check), or as :func:`quantize_int8`.
    """
    if len(inputs) < 2:
        raise ValueError(f"give at least 2 frames (half calibrate, half check), got {len(inputs)}")
    half = len(inputs) // 2
    path = quantize_int8(model, out, inputs[:half])
    held_out = inputs[half:]
    score = agreement(OnnxRuntimeEngine(model).infer(held_out), OnnxRuntimeEngine(path).infer(held_out))
    return path, {**score, "frames": float(len(held_out))}


def agreement(float_phase: NDArray[np.float32], int8_phase: NDArray[np.float32]) -> dict[str, float]:
    """Mean per-frame SSIM and the largest |difference| (rad) between two sets of phase patches."""
    a = np.asarray(float_phase, np.float32).reshape(-1, FRAME_SIZE, FRAME_SIZE)
    b = np.asarray(int8_phase, np.float32).reshape(-1, FRAME_SIZE, FRAME_SIZE)
    mask = np.ones((FRAME_SIZE, FRAME_SIZE), bool)
    scores = [float(ssim(x, y, mask, data_range=2 * np.pi)) for x, y in zip(a, b, strict=True)]
    return {"ssim": float(np.mean(scores)), "max_abs_rad": float(np.abs(a - b).max())}

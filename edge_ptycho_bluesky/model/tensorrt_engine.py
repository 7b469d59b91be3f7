"""TensorRT 10 inference of ONNX PtychoNN files on a CUDA GPU, with an on-disk plan cache.

The engine plan is built from the ONNX file once and cached on disk, keyed by the sha256 of the
model and build options, the GPU name and the TensorRT version.  ``tensorrt`` is imported only
when :class:`TensorRTEngine` is made; without it (or without CUDA)
:func:`tensorrt_unavailable_reason` says why and the engine raises
:class:`~edge_ptycho_bluesky.model.errors.EngineUnavailable`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray

from ..files import atomic_write, sha256_file
from .engine_input import as_batch
from .errors import EngineUnavailable, InvalidModelError
from .onnx_weights import onnx_graph_info, read_onnx
from .ptychonn import FRAME_SHAPE

__all__ = ["TensorRTEngine", "tensorrt_unavailable_reason"]

logger = logging.getLogger(__name__)


def tensorrt_unavailable_reason() -> str | None:
    """Why :class:`TensorRTEngine` cannot run here, or ``None`` when it can."""
    reasons = []
    if not torch.cuda.is_available():
        reasons.append(f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)")
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        reasons.append(
            f"the tensorrt package is not installed ({exc}); install TensorRT 10 from NVIDIA's index "
            "(pip install 'edge_ptycho_bluesky[tensorrt]' on a machine with a CUDA GPU)"
        )
    return "; ".join(reasons) or None


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edge_ptycho_bluesky" / "tensorrt"


class TensorRTEngine:
    """TensorRT 10 inference of an ONNX PtychoNN file on a CUDA GPU.

    The serialized engine plan is built from the ONNX file (with an optimization profile
    ``min_batch <= B <= max_batch`` when the batch axis is dynamic) and cached in ``cache_dir``
    under a key made of the sha256 of the ONNX file and of the build options, the GPU name and
    compute capability, and the TensorRT version; a later engine with the same key deserializes
    the plan in about a second instead of building it for minutes.  Inference runs on torch
    CUDA tensors through ``set_tensor_address`` / ``execute_async_v3`` on a private stream.

    Parameters
    ----------
    onnx_path : str or Path
        The ``.onnx`` file (dynamic batch, or fixed batch -- then chunks are zero-padded).
    fp16 : bool
        Allow float16 kernels (inputs and outputs stay float32).
    int8 : bool
        Allow int8 kernels; needs ``calibration_frames``.
    cache_dir : str, Path or None
        Where plans are cached; default ``$XDG_CACHE_HOME/edge_ptycho_bluesky/tensorrt``.
    min_batch, opt_batch, max_batch : int
        Optimization profile of a dynamic batch axis (ignored for a fixed batch).
    workspace_bytes : int
        Builder workspace memory limit.
    calibration_frames : (N, H, W) or (N, 1, H, W) float32 or None
        Preprocessed frames for int8 entropy calibration (a few hundred representative ones).
    device : int
        CUDA device index.

    Raises
    ------
    EngineUnavailable
        No CUDA device, or the ``tensorrt`` package is missing.
    FileNotFoundError, InvalidModelError
        Missing or corrupt ONNX file, or one TensorRT cannot parse.
    RuntimeError
        The build fails.
    """

    def __init__(
        self,
        onnx_path: str | Path,
        *,
        fp16: bool = True,
        int8: bool = False,
        cache_dir: str | Path | None = None,
        min_batch: int = 1,
        opt_batch: int = 8,
        max_batch: int = 64,
        workspace_bytes: int = 1 << 30,
        calibration_frames: ArrayLike | None = None,
        device: int = 0,
    ) -> None:
        reason = tensorrt_unavailable_reason()
        if reason:
            raise EngineUnavailable(f"TensorRT engine unavailable: {reason}")
        import tensorrt as trt

        if not 1 <= min_batch <= opt_batch <= max_batch:
            raise ValueError(
                f"need 1 <= min_batch <= opt_batch <= max_batch, got {min_batch}, {opt_batch}, {max_batch}"
            )
        if int8 and calibration_frames is None:
            raise ValueError("int8=True needs calibration_frames (a few hundred preprocessed frames)")
        self._trt = trt
        self.path = Path(onnx_path)
        info = onnx_graph_info(read_onnx(self.path))
        self.sha256 = sha256_file(self.path)
        self.device = torch.device("cuda", device)
        self.fixed_batch: int | None = info.fixed_batch
        self.max_batch: int | None = info.fixed_batch or max_batch
        shape = info.input_shape
        self.frame_shape: tuple[int, int] = (
            (int(shape[2]), int(shape[3])) if shape[2] and shape[3] else FRAME_SHAPE  # type: ignore[arg-type]
        )
        self.fp16 = fp16
        self.int8 = int8
        self.name = "tensorrt" + ("-int8" if int8 else "-fp16" if fp16 else "-fp32")
        calib = None if calibration_frames is None else as_batch(calibration_frames, self.frame_shape)
        with torch.cuda.device(self.device):
            gpu_name = torch.cuda.get_device_name(self.device)
            capability = torch.cuda.get_device_capability(self.device)
            options = {
                "fp16": fp16,
                "int8": int8,
                "batch": [min_batch, opt_batch, max_batch] if self.fixed_batch is None else self.fixed_batch,
                "workspace": workspace_bytes,
                "calibration": hashlib.sha256(calib.tobytes()).hexdigest() if calib is not None else None,
            }
            key_text = json.dumps(
                {
                    "onnx": self.sha256,
                    "options": options,
                    "gpu": gpu_name,
                    "capability": list(capability),
                    "tensorrt": trt.__version__,
                },
                sort_keys=True,
            )
            self.cache_key = hashlib.sha256(key_text.encode()).hexdigest()
            self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
            self.plan_path = self.cache_dir / f"{self.path.stem}-{self.cache_key[:32]}.plan"
            self._logger = trt.Logger(trt.Logger.WARNING)
            runtime = trt.Runtime(self._logger)
            engine = None
            if self.plan_path.is_file():
                engine = runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
                if engine is None:
                    logger.warning("cached TensorRT plan %s does not deserialize; rebuilding", self.plan_path)
                else:
                    logger.info("TensorRT plan loaded from cache %s", self.plan_path)
            if engine is None:
                plan = self._build(info.input_name, min_batch, opt_batch, max_batch, workspace_bytes, calib)
                atomic_write(self.plan_path, plan)
                logger.info("TensorRT plan built and cached at %s", self.plan_path)
                engine = runtime.deserialize_cuda_engine(plan)
                if engine is None:
                    raise RuntimeError(f"TensorRT could not deserialize the plan it just built for {self.path}")
            self._engine = engine
            self._context = engine.create_execution_context()
            self._stream = torch.cuda.Stream(self.device)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if len(inputs) != 1 or not outputs:
            raise InvalidModelError(f"{self.path}: expected one input and at least one output, got {names}")
        self.input_name = inputs[0]
        self.output_names = outputs
        self.output_name = "phase" if "phase" in outputs else outputs[-1]

    def _build(
        self,
        input_name: str,
        min_batch: int,
        opt_batch: int,
        max_batch: int,
        workspace_bytes: int,
        calib: NDArray[np.float32] | None,
    ) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(self.path.read_bytes(), str(self.path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InvalidModelError(f"TensorRT cannot parse {self.path}: {errors}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        h, w = self.frame_shape
        profile = None
        if self.fixed_batch is None:
            profile = builder.create_optimization_profile()
            profile.set_shape(input_name, (min_batch, 1, h, w), (opt_batch, 1, h, w), (max_batch, 1, h, w))
            config.add_optimization_profile(profile)
        if self.int8:
            assert calib is not None
            config.set_flag(trt.BuilderFlag.INT8)
            batch = self.fixed_batch or opt_batch
            config.int8_calibrator = _make_calibrator(trt, calib, batch, self.device)
            if profile is not None:
                config.set_calibration_profile(profile)
        logger.info("building TensorRT engine for %s (fp16=%s, int8=%s); this can take minutes",
                    self.path.name, self.fp16, self.int8)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build an engine for {self.path} (see the TensorRT log)")
        return bytes(plan)

    def infer(self, frames: ArrayLike) -> NDArray[np.float32]:
        """Phase ``(B, H, W) float32`` (radians) of frames ``(B, H, W)``/``(B, 1, H, W)`` float32."""
        batch = as_batch(frames, self.frame_shape)
        if len(batch) == 0:
            return np.empty((0, *batch.shape[2:]), np.float32)
        return self.infer_torch(torch.from_numpy(batch)).cpu().numpy()

    def infer_torch(self, frames: torch.Tensor) -> torch.Tensor:
        """Like :meth:`infer` for a torch tensor ``(B, 1, H, W)`` (any device); returns a CUDA
        tensor ``(B, H, W) float32`` and skips the host round trip when frames are on the GPU."""
        trt = self._trt
        dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16}
        in_dtype = dtypes[self._engine.get_tensor_dtype(self.input_name)]
        results = []
        with torch.cuda.device(self.device), torch.cuda.stream(self._stream):
            x_all = frames.to(self.device, dtype=in_dtype, non_blocking=True)
            step = self.max_batch or len(x_all)
            for start in range(0, len(x_all), step):
                x = x_all[start : start + step]
                n = len(x)
                if self.fixed_batch is not None and n < self.fixed_batch:
                    x = torch.cat([x, x.new_zeros((self.fixed_batch - n, *x.shape[1:]))])
                x = x.contiguous()
                self._context.set_input_shape(self.input_name, tuple(x.shape))
                self._context.set_tensor_address(self.input_name, x.data_ptr())
                outs = {}
                for name in self.output_names:
                    shape = tuple(self._context.get_tensor_shape(name))
                    out = torch.empty(shape, dtype=dtypes[self._engine.get_tensor_dtype(name)], device=self.device)
                    self._context.set_tensor_address(name, out.data_ptr())
                    outs[name] = out
                if not self._context.execute_async_v3(self._stream.cuda_stream):
                    raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
                results.append(outs[self.output_name][:n, 0].float())
            self._stream.synchronize()
        return results[0] if len(results) == 1 else torch.cat(results)

    def describe(self) -> dict[str, Any]:
        """Engine metadata (for run start documents and logs)."""
        return {
            "engine": self.name,
            "model_path": str(self.path),
            "model_sha256": self.sha256,
            "plan": str(self.plan_path),
            "tensorrt": self._trt.__version__,
            "max_batch": self.max_batch,
        }

    def __repr__(self) -> str:
        return f"TensorRTEngine({str(self.path)!r}, {self.name}, max_batch={self.max_batch})"


def _make_calibrator(trt: Any, frames: NDArray[np.float32], batch: int, device: torch.device) -> Any:
    """An int8 entropy calibrator feeding ``frames`` in batches of ``batch`` from the GPU."""

    class _Calibrator(trt.IInt8EntropyCalibrator2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._data = torch.from_numpy(frames).to(device)
            self._next = 0
            self._current: torch.Tensor | None = None

        def get_batch_size(self) -> int:
            return batch

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next + batch > len(self._data):
                return None
            self._current = self._data[self._next : self._next + batch].contiguous()
            self._next += batch
            return [int(self._current.data_ptr())]

        def read_calibration_cache(self) -> None:
            return None

        def write_calibration_cache(self, cache: Any) -> None:
            return None

    if len(frames) < batch:
        raise ValueError(f"need at least {batch} calibration frames, got {len(frames)}")
    return _Calibrator()


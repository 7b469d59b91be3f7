"""Inference engines for PtychoNN behind one small interface.

Every engine maps preprocessed diffraction frames ``(B, 128, 128)`` or ``(B, 1, 128, 128)``
float32 to phase patches ``(B, 128, 128)`` float32 in radians:

* :class:`OnnxRuntimeEngine` -- ONNX Runtime, the CPU default.  Works with dynamic-batch ONNX
  files (:func:`~edge_ptycho_bluesky.model.export.export_onnx`) and with fixed-batch ones such
  as the paper's batch-8 ``ptychoNN_8.onnx``: batches are split into chunks of the fixed size
  and the last chunk is zero-padded, so any number of frames works.
* :class:`TorchEngine` -- a torch module on CPU or CUDA (optionally FP16 / channels-last),
  from a module, a state dict saved with ``torch.save(model.state_dict())`` (read with
  ``weights_only=True``) or an ONNX file of PtychoNN 2.0.
* :class:`TensorRTEngine` -- TensorRT 10 on a CUDA GPU, FP16 (and INT8 with calibration
  frames); the engine plan is built from the ONNX file once and cached on disk, keyed by the
  sha256 of the model and build options, the GPU name and the TensorRT version.  ``tensorrt``
  is imported only when this engine is made; without it (or without CUDA)
  :class:`~edge_ptycho_bluesky.model.errors.EngineUnavailable` says why.

:func:`load_engine` picks one by name, or the fastest available with ``kind="auto"``
(TensorRT, then torch on CUDA, then ONNX Runtime).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from numpy.typing import ArrayLike, NDArray
from torch import nn

from .errors import EngineUnavailable, InvalidModelError
from .onnx_weights import inspect_onnx, ptychonn2_from_onnx, read_onnx
from .ptychonn import FRAME_SHAPE, load_model, phase_of

__all__ = [
    "ENGINE_KINDS",
    "InferenceEngine",
    "OnnxRuntimeEngine",
    "TensorRTEngine",
    "TorchEngine",
    "as_batch",
    "available_engines",
    "load_engine",
    "tensorrt_unavailable_reason",
]

logger = logging.getLogger(__name__)

EngineKind = Literal["onnxruntime", "torch", "tensorrt", "auto"]
#: Values accepted by :func:`load_engine`'s ``kind``.
ENGINE_KINDS: tuple[str, ...] = ("onnxruntime", "torch", "tensorrt", "auto")


@runtime_checkable
class InferenceEngine(Protocol):
    """What the edge worker needs from an inference engine.

    Attributes
    ----------
    name : str
        Short engine label for logs and metadata, e.g. ``"onnxruntime"``, ``"torch-cuda-fp16"``.
    max_batch : int or None
        Largest batch one call runs at once (a fixed-batch model's batch, a TensorRT profile's
        maximum); ``infer`` still takes any number of frames.  ``None``: no limit.
    """

    name: str
    max_batch: int | None

    def infer(self, frames: ArrayLike) -> NDArray[np.float32]:
        """Phase ``(B, H, W) float32`` of frames ``(B, H, W)`` or ``(B, 1, H, W)`` float32."""
        ...


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_and_pad(
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


class OnnxRuntimeEngine:
    """ONNX Runtime inference of an ONNX PtychoNN file (CPU by default).

    Parameters
    ----------
    path : str or Path
        The ``.onnx`` file, with a dynamic or a fixed batch axis.
    intra_op_threads : int or None
        Threads inside one operator (``None``: ONNX Runtime's default, all cores).  1 gives the
        per-core figure and leaves cores to the rest of the worker.
    inter_op_threads : int or None
        Threads across operators (this graph is sequential; 1 is best).
    providers : sequence of str or None
        Execution providers, e.g. ``["CUDAExecutionProvider", "CPUExecutionProvider"]``;
        default CPU only.
    output : str or None
        Output to return; default the one named ``"phase"``, else the last.
    allow_spinning : bool or None
        Whether idle intra-op threads busy-wait for the next operator (ONNX Runtime's
        ``session.intra_op.allow_spinning``; ``None``: its default, on).  Spinning lowers latency on
        an otherwise idle machine but burns whole cores between batches; on a machine shared with
        the detector, the stitcher and Tiled (a small edge box), turn it off.

    Attributes
    ----------
    fixed_batch : int or None
        The model's fixed batch size (8 for the paper's file) or ``None`` if dynamic.
    sha256 : str
        Checksum of the model file (a model version for metadata).

    Raises
    ------
    FileNotFoundError, InvalidModelError
        Missing, truncated or corrupt file.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        intra_op_threads: int | None = None,
        inter_op_threads: int | None = 1,
        providers: list[str] | tuple[str, ...] | None = None,
        output: str | None = None,
        allow_spinning: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        proto = read_onnx(self.path)
        # the default-domain opset (not inspect_onnx: quantized QDQ graphs are served too)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        del proto
        self.sha256 = _sha256(self.path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if intra_op_threads is not None:
            options.intra_op_num_threads = int(intra_op_threads)
        if inter_op_threads is not None:
            options.inter_op_num_threads = int(inter_op_threads)
        if allow_spinning is not None:
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        try:
            self._session = ort.InferenceSession(str(self.path), sess_options=options, providers=self.providers)
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise InvalidModelError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        inp = self._session.get_inputs()[0]
        self.input_name: str = inp.name
        outputs = [o.name for o in self._session.get_outputs()]
        if output is None:
            output = "phase" if "phase" in outputs else outputs[-1]
        elif output not in outputs:
            raise ValueError(f"output {output!r} is not in the model's outputs {outputs}")
        self.output_name: str = output
        dims = list(inp.shape)
        if len(dims) != 4:
            raise InvalidModelError(f"{self.path}: input {inp.name!r} has shape {dims}, expected (B, 1, H, W)")
        self.fixed_batch: int | None = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        self.frame_shape: tuple[int, int] | None = (
            (dims[2], dims[3]) if isinstance(dims[2], int) and isinstance(dims[3], int) else None
        )
        self.max_batch: int | None = self.fixed_batch
        self.name = "onnxruntime"
        self.opset = opset
        logger.info(
            "ONNX Runtime engine %s: input %s %s, output %s, providers %s",
            self.path.name, self.input_name, dims, self.output_name, self._session.get_providers(),
        )

    def infer(self, frames: ArrayLike) -> NDArray[np.float32]:
        """Phase ``(B, H, W) float32`` (radians) of frames ``(B, H, W)``/``(B, 1, H, W)`` float32."""
        batch = as_batch(frames, self.frame_shape)
        if len(batch) == 0:
            return np.empty((0, *batch.shape[2:]), np.float32)
        pad = self.fixed_batch is not None
        results = []
        for piece, n in _split_and_pad(batch, self.fixed_batch, pad):
            (out,) = self._session.run([self.output_name], {self.input_name: piece})
            results.append(out[:n, 0])
        out = results[0] if len(results) == 1 else np.concatenate(results)
        return np.ascontiguousarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """Engine metadata (for run start documents and logs)."""
        return {
            "engine": self.name,
            "model_path": str(self.path),
            "model_sha256": self.sha256,
            "opset": self.opset,
            "fixed_batch": self.fixed_batch,
            "providers": self._session.get_providers(),
        }

    def __repr__(self) -> str:
        return f"OnnxRuntimeEngine({str(self.path)!r}, fixed_batch={self.fixed_batch})"


class TorchEngine:
    """Inference with a torch PtychoNN module on CPU or CUDA.

    Parameters
    ----------
    model : torch.nn.Module, str or Path
        A module (deep-copied, so later training of the original does not change the engine),
        a state-dict file (``.pt``/``.pth``, read with ``torch.load(weights_only=True)``), or a
        PtychoNN 2.0 ``.onnx`` file (weights copied into :class:`PtychoNN2`).
    device : str
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
    half : bool
        Run in float16 (CUDA only); the output is returned as float32.
    channels_last : bool
        Use the channels-last memory format (faster convolutions on recent GPUs).
    model_name : str
        Architecture of a state-dict file (see :func:`~edge_ptycho_bluesky.model.build_model`).
    model_kwargs : mapping or None
        Architecture options of a state-dict file (``nconv``, ``n_levels``, ...).
    max_batch : int or None
        Split larger batches into chunks of this size (bounds memory); ``None``: no split.

    Raises
    ------
    EngineUnavailable
        CUDA requested but not available.
    FileNotFoundError, InvalidModelError
        Missing or unreadable weights.
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        *,
        device: str = "cpu",
        half: bool = False,
        channels_last: bool = False,
        model_name: str = "ptychonn2",
        model_kwargs: Mapping[str, Any] | None = None,
        max_batch: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineUnavailable(
                f"device={device!r} requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}; a CPU build or no GPU/driver); use device='cpu'"
            )
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {device!r}")
        if half and self.device.type != "cuda":
            raise ValueError("half=True needs device='cuda' (float16 convolutions are slow or missing on CPU)")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        self.source: str
        if isinstance(model, nn.Module):
            module = copy.deepcopy(model)
            self.source = type(model).__name__
        else:
            path = Path(model)
            if path.suffix.lower() == ".onnx":
                module = ptychonn2_from_onnx(path)
            else:
                module = load_model(path, model_name, **dict(model_kwargs or {}))
            self.source = str(path)
        module = module.to(self.device).eval()
        self.dtype = torch.float16 if half else torch.float32
        module = module.to(self.dtype)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            module = module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        for p in module.parameters():
            p.requires_grad_(False)
        self.model = module
        self.max_batch = max_batch
        self.half = half
        self.name = f"torch-{self.device.type}" + ("-fp16" if half else "")

    @torch.inference_mode()
    def infer(self, frames: ArrayLike) -> NDArray[np.float32]:
        """Phase ``(B, H, W) float32`` (radians) of frames ``(B, H, W)``/``(B, 1, H, W)`` float32."""
        batch = as_batch(frames, None)
        if len(batch) == 0:
            return np.empty((0, *batch.shape[2:]), np.float32)
        results = []
        for piece, _ in _split_and_pad(batch, self.max_batch, pad=False):
            x = torch.from_numpy(piece).to(self.device, non_blocking=True)
            x = x.to(dtype=self.dtype).contiguous(memory_format=self.memory_format)
            phase = phase_of(self.model(x))
            results.append(phase[:, 0].float().cpu().numpy())
        out = results[0] if len(results) == 1 else np.concatenate(results)
        return np.ascontiguousarray(out, dtype=np.float32)

    def describe(self) -> dict[str, Any]:
        """Engine metadata (for run start documents and logs)."""
        return {"engine": self.name, "model": self.source, "device": str(self.device), "half": self.half}

    def __repr__(self) -> str:
        return f"TorchEngine({self.source!r}, device={str(self.device)!r}, half={self.half})"


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


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        info = inspect_onnx(read_onnx(self.path))
        self.sha256 = _sha256(self.path)
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
                _atomic_write(self.plan_path, plan)
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


def available_engines() -> dict[str, str | None]:
    """Each engine kind mapped to ``None`` if it can run here, else the reason it cannot."""
    try:
        import onnxruntime  # noqa: F401

        ort_reason = None
    except ImportError as exc:
        ort_reason = f"onnxruntime is not installed ({exc})"
    cuda_reason = (
        None if torch.cuda.is_available()
        else f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    )
    return {
        "onnxruntime": ort_reason,
        "torch-cpu": None,
        "torch-cuda": cuda_reason,
        "tensorrt": tensorrt_unavailable_reason(),
    }


def load_engine(path: str | Path, kind: EngineKind | str = "auto", **opts: Any) -> InferenceEngine:
    """Make an inference engine for a model file.

    Parameters
    ----------
    path : str or Path
        An ``.onnx`` file (any engine) or a state-dict file (``.pt``/``.pth``; torch only).
    kind : {"auto", "onnxruntime", "torch", "tensorrt"}
        ``"auto"`` takes the first that works here: TensorRT (ONNX files), torch on CUDA, ONNX
        Runtime (ONNX files), torch on CPU (state dicts).
    **opts
        For a named kind: the engine's keyword arguments.  For ``"auto"``: per-kind option
        mappings, e.g. ``load_engine(p, "auto", tensorrt={"fp16": True},
        onnxruntime={"intra_op_threads": 1})``.

    Returns
    -------
    InferenceEngine

    Raises
    ------
    ValueError
        Unknown kind, or a state-dict file given to an ONNX-only engine.
    EngineUnavailable
        A named kind that cannot run here.
    FileNotFoundError, InvalidModelError
        Missing or corrupt model file.
    """
    path = Path(path)
    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine kind {kind!r}; choose one of {ENGINE_KINDS}")
    if not path.is_file():
        raise FileNotFoundError(f"no model file at {path}")
    is_onnx = path.suffix.lower() == ".onnx"
    if kind in ("onnxruntime", "tensorrt") and not is_onnx:
        raise ValueError(f"kind={kind!r} needs an .onnx file, got {path.name}; use kind='torch' for state dicts")
    if kind == "onnxruntime":
        return OnnxRuntimeEngine(path, **opts)
    if kind == "tensorrt":
        return TensorRTEngine(path, **opts)
    if kind == "torch":
        return TorchEngine(path, **opts)

    unknown = set(opts) - {"onnxruntime", "torch", "tensorrt"}
    if unknown:
        raise TypeError(
            f"kind='auto' takes per-engine option mappings (onnxruntime=, torch=, tensorrt=), got {sorted(unknown)}"
        )
    reasons = available_engines()
    if is_onnx and reasons["tensorrt"] is None:
        return TensorRTEngine(path, **opts.get("tensorrt", {}))
    torch_opts = dict(opts.get("torch", {}))
    if reasons["torch-cuda"] is None:
        torch_opts.setdefault("device", "cuda")
        return TorchEngine(path, **torch_opts)
    if is_onnx and reasons["onnxruntime"] is None:
        logger.info("auto engine: ONNX Runtime (tensorrt: %s)", reasons["tensorrt"])
        return OnnxRuntimeEngine(path, **opts.get("onnxruntime", {}))
    return TorchEngine(path, **torch_opts)

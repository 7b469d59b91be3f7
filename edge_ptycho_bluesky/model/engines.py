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
* :class:`~edge_ptycho_bluesky.model.tensorrt_engine.TensorRTEngine` -- TensorRT 10 on a CUDA
  GPU, FP16 (and INT8 with calibration frames); the engine plan is built from the ONNX file once
  and cached on disk, keyed by the sha256 of the model and build options, the GPU name and the
  TensorRT version.  ``tensorrt`` is imported only when this engine is made; without it (or
  without CUDA) :class:`~edge_ptycho_bluesky.model.errors.EngineUnavailable` says why.

:func:`load_engine` picks one by name, or the fastest available with ``kind="auto"``
(TensorRT, then torch on CUDA, then ONNX Runtime).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..files import sha256_file
from .engine_input import as_batch, split_and_pad
from .errors import EngineUnavailable, InvalidModelError
from .onnx_weights import read_onnx

if TYPE_CHECKING:  # torch, and TensorRT, only for their engines: ONNX Runtime runs without them
    from torch import nn

__all__ = [
    "ENGINE_KINDS",
    "InferenceEngine",
    "OnnxRuntimeEngine",
    "TorchEngine",
    "available_engines",
    "load_engine",
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
        # the default-domain opset (not onnx_graph_info: quantized QDQ graphs are served too)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        del proto
        self.sha256 = sha256_file(self.path)
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
        for piece, n in split_and_pad(batch, self.fixed_batch, pad):
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
        import torch

        from .onnx_weights import ptychonn2_from_onnx
        from .ptychonn import load_model

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
        if isinstance(model, torch.nn.Module):
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

    def infer(self, frames: ArrayLike) -> NDArray[np.float32]:
        """Phase ``(B, H, W) float32`` (radians) of frames ``(B, H, W)``/``(B, 1, H, W)`` float32."""
        import torch

        from .ptychonn import phase_of

        batch = as_batch(frames, None)
        if len(batch) == 0:
            return np.empty((0, *batch.shape[2:]), np.float32)
        results = []
        with torch.inference_mode():
            for piece, _ in split_and_pad(batch, self.max_batch, pad=False):
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


def available_engines() -> dict[str, str | None]:
    """Each engine kind mapped to ``None`` if it can run here, else the reason it cannot."""
    try:
        import onnxruntime  # noqa: F401

        ort_reason = None
    except ImportError as exc:
        ort_reason = f"onnxruntime is not installed ({exc})"
    try:
        import torch
    except ImportError as exc:  # a lean edge install: ONNX Runtime only
        missing = f"torch is not installed ({exc})"
        return {"onnxruntime": ort_reason, "torch-cpu": missing, "torch-cuda": missing, "tensorrt": missing}
    from .tensorrt_engine import tensorrt_unavailable_reason

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
        from .tensorrt_engine import TensorRTEngine

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
        from .tensorrt_engine import TensorRTEngine

        return TensorRTEngine(path, **opts.get("tensorrt", {}))
    torch_opts = dict(opts.get("torch", {}))
    if reasons["torch-cuda"] is None:
        torch_opts.setdefault("device", "cuda")
        return TorchEngine(path, **torch_opts)
    if is_onnx and reasons["onnxruntime"] is None:
        logger.info("auto engine: ONNX Runtime (tensorrt: %s)", reasons["tensorrt"])
        return OnnxRuntimeEngine(path, **opts.get("onnxruntime", {}))
    return TorchEngine(path, **torch_opts)

"""PtychoNN networks, ONNX export/import, input preprocessing and inference engines.

Typical use::

    from edge_ptycho_bluesky.model import load_engine, preprocess

    engine = load_engine("ptychoNN_8.onnx")             # TensorRT > torch-CUDA > ONNX Runtime
    phase = engine.infer(preprocess(frames))            # (N, 128, 128) float32 radians

and for training/deployment::

    from edge_ptycho_bluesky.model import build_model, export_onnx, ptychonn2_from_onnx

    model = ptychonn2_from_onnx("ptychoNN_8.onnx")      # the paper's weights in torch
    export_onnx(model, "ptychonn2.onnx")                # dynamic batch, checked
"""

from __future__ import annotations

from .engines import (
    ENGINE_KINDS,
    InferenceEngine,
    OnnxRuntimeEngine,
    TensorRTEngine,
    TorchEngine,
    as_batch,
    available_engines,
    load_engine,
    tensorrt_unavailable_reason,
)
from .errors import EngineUnavailable, InvalidModelError
from .export import export_onnx, save_state_dict
from .onnx_weights import (
    OnnxGraphInfo,
    inspect_onnx,
    load_onnx_weights,
    ptychonn2_from_onnx,
    read_onnx,
)
from .preprocess import (
    FRAME_SIZE,
    InvalidFrameError,
    bin_frames,
    center_crop,
    frame_problem,
    preprocess,
    validate_frame,
    validate_frames,
)
from .ptychonn import (
    FRAME_SHAPE,
    MODEL_NAMES,
    PTYCHONN2_N_PARAMETERS,
    PTYCHONN2_ONNX_INITIALIZER_ELEMENTS,
    PtychoNN,
    PtychoNN2,
    PtychoNNFast,
    build_model,
    count_parameters,
    load_model,
    phase_of,
)

__all__ = [
    "ENGINE_KINDS",
    "FRAME_SHAPE",
    "FRAME_SIZE",
    "MODEL_NAMES",
    "PTYCHONN2_N_PARAMETERS",
    "PTYCHONN2_ONNX_INITIALIZER_ELEMENTS",
    "EngineUnavailable",
    "InferenceEngine",
    "InvalidFrameError",
    "InvalidModelError",
    "OnnxGraphInfo",
    "OnnxRuntimeEngine",
    "PtychoNN",
    "PtychoNN2",
    "PtychoNNFast",
    "TensorRTEngine",
    "TorchEngine",
    "as_batch",
    "available_engines",
    "bin_frames",
    "build_model",
    "center_crop",
    "count_parameters",
    "export_onnx",
    "frame_problem",
    "inspect_onnx",
    "load_engine",
    "load_model",
    "load_onnx_weights",
    "phase_of",
    "preprocess",
    "ptychonn2_from_onnx",
    "read_onnx",
    "save_state_dict",
    "tensorrt_unavailable_reason",
    "validate_frame",
    "validate_frames",
]

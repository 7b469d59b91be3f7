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

import importlib
from typing import Any

# The preprocessing (numpy only) is imported here; the rest lazily (PEP 562), so that the edge
# worker's input contract does not pull in torch, onnx or the engines.
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

_EXPORTS = {
    "ENGINE_KINDS": "engines",
    "EngineUnavailable": "errors",
    "FRAME_SHAPE": "ptychonn",
    "InferenceEngine": "engines",
    "InvalidModelError": "errors",
    "MODEL_NAMES": "ptychonn",
    "OnnxGraphInfo": "onnx_weights",
    "OnnxRuntimeEngine": "engines",
    "PTYCHONN2_N_PARAMETERS": "ptychonn",
    "PTYCHONN2_ONNX_INITIALIZER_ELEMENTS": "ptychonn",
    "PtychoNN": "ptychonn",
    "PtychoNN2": "ptychonn",
    "PtychoNNFast": "ptychonn",
    "TensorRTEngine": "tensorrt_engine",
    "TorchEngine": "engines",
    "as_batch": "engine_input",
    "available_engines": "engines",
    "build_model": "ptychonn",
    "count_parameters": "ptychonn",
    "export_onnx": "export",
    "load_engine": "engines",
    "load_model": "ptychonn",
    "load_onnx_weights": "onnx_weights",
    "onnx_graph_info": "onnx_weights",
    "phase_of": "ptychonn",
    "ptychonn2_from_onnx": "onnx_weights",
    "read_onnx": "onnx_weights",
    "save_state_dict": "export",
    "tensorrt_unavailable_reason": "tensorrt_engine",
}


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
    "load_engine",
    "load_model",
    "load_onnx_weights",
    "onnx_graph_info",
    "phase_of",
    "preprocess",
    "ptychonn2_from_onnx",
    "read_onnx",
    "save_state_dict",
    "tensorrt_unavailable_reason",
    "validate_frame",
    "validate_frames",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

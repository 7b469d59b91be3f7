"""Edge inference: the worker, its transports (pvAccess; in-process for tests), NTNDArray codec.

Typical use::

    from edge_ptycho_bluesky.edge import FramePublisher, PatchSubscriber, loopback_env

    loopback_env()                                        # before any pvapy object
    pub = FramePublisher("ptycho:det:frames")
    pub.publish(frame, unique_id=1, pos=(row, col), scan_uid=uid)
    sub = PatchSubscriber("ptycho:edge:phase", on_patch).start()   # on_patch(Patch)

and the worker itself runs as ``edge-ptycho worker --registry DIR`` (or inside
``pvapy-hpc-consumer``: :mod:`edge_ptycho_bluesky.edge.processor`).
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports are imported lazily (PEP 562), so that ``python -m edge_ptycho_bluesky.edge.cli``
# does not import the command module twice and importing the codec does not pull in torch.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(["ATTR_MODEL_VERSION", "ATTR_POS_X", "ATTR_POS_Y", "ATTR_SCAN_UID", "Frame",
                     "FrameDecodeError", "Patch", "decode_frame", "decode_patch", "encode_frame",
                     "encode_patch"], "ntnda"),
    **dict.fromkeys(["DEFAULT_INPUT_PV", "DEFAULT_OUTPUT_PV", "DEFAULT_STATUS_PV", "FrameSource",
                     "PatchSink", "loopback_env"], "transport"),
    **dict.fromkeys(["InProcessFrameSource", "InProcessPatchSink"], "inprocess"),
    **dict.fromkeys(["FramePublisher", "PvaPatchSink"], "pva_servers"),
    **dict.fromkeys(["PatchSubscriber", "PvaFrameSource", "read_status"], "pva_clients"),
    **dict.fromkeys(["EdgeSessionConfig"], "session"),
    **dict.fromkeys(["DROP_REASONS", "EdgeWorker"], "worker"),
    **dict.fromkeys(["Engine", "FileModelSource", "LoadedModel", "ModelRefused",
                     "RegistryModelSource", "engine_factory"], "model_source"),
    **dict.fromkeys(["WorkerConfig"], "worker_config"),
    **dict.fromkeys(["WorkerStats"], "worker_stats"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = [
    "ATTR_MODEL_VERSION",
    "ATTR_POS_X",
    "ATTR_POS_Y",
    "ATTR_SCAN_UID",
    "DEFAULT_INPUT_PV",
    "DEFAULT_OUTPUT_PV",
    "DEFAULT_STATUS_PV",
    "DROP_REASONS",
    "EdgeSessionConfig",
    "EdgeWorker",
    "Engine",
    "FileModelSource",
    "Frame",
    "FrameDecodeError",
    "FramePublisher",
    "FrameSource",
    "InProcessFrameSource",
    "InProcessPatchSink",
    "LoadedModel",
    "ModelRefused",
    "Patch",
    "PatchSink",
    "PatchSubscriber",
    "PvaFrameSource",
    "PvaPatchSink",
    "RegistryModelSource",
    "WorkerConfig",
    "WorkerStats",
    "decode_frame",
    "decode_patch",
    "encode_frame",
    "encode_patch",
    "engine_factory",
    "loopback_env",
    "read_status",
]

"""Exceptions of the model package."""

from __future__ import annotations

__all__ = ["EngineUnavailable", "InvalidModelError"]


class EngineUnavailable(RuntimeError):
    """An inference engine cannot run here (no CUDA device, package not installed, ...).

    The message says why and what would make it available.
    """


class InvalidModelError(ValueError):
    """A model file is unreadable: truncated, corrupt, not ONNX / not a state dict, or its
    graph does not have the structure that was asked for."""

"""Where the edge worker's models come from: loading, the blank-frame check, hot swap.

:class:`FileModelSource` loads one model file once; :class:`RegistryModelSource` follows a model
registry's deployed version and loads each new one beside the running model (the worker's
watcher thread polls it; the inference thread swaps between batches).  Every candidate is
smoke-tested on a blank frame (:func:`smoke_test`) before it is used; one that fails to load or
infer is refused with :class:`ModelRefused` and the running model stays.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from .. import FRAME_SIZE
from ..files import sha256_file

__all__ = [
    "PATCH_SHAPE",
    "Engine",
    "EngineFactory",
    "FileModelSource",
    "LoadedModel",
    "ModelRefused",
    "ModelSource",
    "RegistryModelSource",
    "engine_factory",
    "smoke_test",
]

#: Shape of one phase patch (and of one preprocessed frame).
PATCH_SHAPE: tuple[int, int] = (FRAME_SIZE, FRAME_SIZE)


@runtime_checkable
class Engine(Protocol):
    """What the worker needs of an inference engine (``model.engines.InferenceEngine`` is one).

    Attributes
    ----------
    name : str
        Engine label, e.g. ``"onnxruntime"``.
    """

    name: str

    def infer(self, frames: NDArray[np.float32]) -> NDArray[np.float32]:
        """``frames : (B, 128, 128) float32`` -> ``phase : (B, 128, 128) float32``."""
        ...


#: Builds an engine from a model file (e.g. ``lambda p: load_engine(p, kind="onnxruntime")``).
EngineFactory = Callable[[Path], Engine]


@dataclass(frozen=True)
class LoadedModel:
    """A loaded, smoke-tested model ready to infer.

    Attributes
    ----------
    engine : Engine
    version : str
        Version label written into every patch it produces.
    path : Path
        The model file.
    input_scale : float or None
        The count scale the model was trained with (a registry version's
        ``extra.preprocess.scale``), applied to every preprocessed batch on top of the
        worker's own ``scale`` option; ``None``: none.
    input_exposure_s : float or None
        The exposure time of the training frames (``extra.preprocess.exposure_s``): a frame with
        an ``exposure_s`` attribute is scaled by ``input_exposure_s / exposure_s``; ``None``: not
        recorded (then :attr:`~.worker_config.WorkerConfig.reference_exposure_s`, if set, stands in).
    """

    engine: Engine
    version: str
    path: Path
    input_scale: float | None = None
    input_exposure_s: float | None = None


class ModelRefused(RuntimeError):
    """A candidate model failed to load, verify or smoke-test; the running one stays."""

    def __init__(self, version: str | None, message: str) -> None:
        super().__init__(message)
        self.version = version


@runtime_checkable
class ModelSource(Protocol):
    """Where the worker's models come from."""

    def load_initial(self) -> LoadedModel | None:
        """The model to start with; None when none is available yet (frames are then dropped
        as ``no_model`` until :meth:`poll` delivers one).

        Raises
        ------
        ModelRefused
            When the available model cannot be used.
        """

    def poll(self) -> LoadedModel | None:
        """A newly deployed model, loaded beside the running one, or None when nothing changed.

        Called every ``poll_period_s`` on the watcher thread, never on the inference thread.

        Raises
        ------
        ModelRefused
            When a new deployment cannot be used (it is not retried until it changes again).
        """


def smoke_test(engine: Engine, version: str) -> None:
    """Infer one blank frame and check the output shape and values (also warms the engine up).

    Raises
    ------
    ModelRefused
        When inference fails, or the output is not ``(1, 128, 128)`` finite values.
    """
    try:
        out = np.asarray(engine.infer(np.zeros((1, *PATCH_SHAPE), np.float32)))
    except Exception as exc:
        raise ModelRefused(version, f"model {version}: smoke-test inference failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
    if out.size != int(np.prod(PATCH_SHAPE)):
        raise ModelRefused(version, f"model {version}: output of shape {out.shape} for one "
                                    f"frame; a (1, {FRAME_SIZE}, {FRAME_SIZE}) phase patch is needed")
    if not np.isfinite(out).all():
        raise ModelRefused(version, f"model {version}: non-finite output for a blank frame")


def _file_version(path: Path) -> str:
    return f"{path.stem}@{sha256_file(path)[:12]}"


class FileModelSource:
    """One model file, loaded once (no hot swap).

    Parameters
    ----------
    path
        The model file (``.onnx``; or whatever ``factory`` takes).
    factory
        Builds the engine.
    version
        Version label; default ``"<stem>@<first 12 hex of sha256>"``.
    """

    def __init__(self, path: str | Path, factory: EngineFactory, version: str | None = None) -> None:
        self.path = Path(path)
        self.factory = factory
        self.version = version

    def load_initial(self) -> LoadedModel:
        if not self.path.is_file():
            raise ModelRefused(self.version, f"no model file at {self.path}; check --model")
        version = self.version or _file_version(self.path)
        try:
            engine = self.factory(self.path)
        except Exception as exc:
            raise ModelRefused(version, f"model {self.path} failed to load: "
                                        f"{type(exc).__name__}: {exc}") from exc
        smoke_test(engine, version)
        return LoadedModel(engine, version, self.path)

    def poll(self) -> None:
        return None


class RegistryModelSource:
    """The deployed version of a model registry, hot-swapped when the deployment changes.

    Polls ``registry.watch_token()`` (one small read of ``CURRENT``); when it changes, reads
    ``registry.current()`` (full verification: checksums, ONNX checks), builds the engine with
    ``factory`` and smoke-tests it.  A version that fails any step raises
    :class:`ModelRefused` once, and is not retried until the deployment changes again.

    Parameters
    ----------
    registry
        A :class:`~edge_ptycho_bluesky.training.registry.ModelRegistry`, or its root folder.
    factory
        Builds an engine from ``ModelVersion.onnx_path``.
    """

    def __init__(self, registry: Any, factory: EngineFactory) -> None:
        if isinstance(registry, (str, Path)):
            from ..training.registry import ModelRegistry

            registry = ModelRegistry(registry, create=False)
        self.registry = registry
        self.factory = factory
        self._token: Any = None
        self._loaded_version: str | None = None

    def _load_current(self) -> LoadedModel | None:
        from ..training.registry_checks import RegistryError

        try:
            mv = self.registry.current(verify=True)
        except RegistryError as exc:
            raise ModelRefused(None, f"deployed model refused: {exc}") from exc
        if mv is None:
            return None
        if mv.version == self._loaded_version:
            return None
        try:
            engine = self.factory(mv.onnx_path)
        except Exception as exc:
            raise ModelRefused(mv.version, f"model {mv.version} ({mv.onnx_path}) failed to "
                                           f"load: {type(exc).__name__}: {exc}") from exc
        smoke_test(engine, mv.version)
        self._loaded_version = mv.version
        return LoadedModel(engine, mv.version, mv.onnx_path, mv.input_scale, mv.input_exposure_s)

    def _token_changed(self) -> bool:
        from ..training.registry_checks import RegistryError

        try:
            token = self.registry.watch_token()
        except RegistryError as exc:
            token = ("corrupt", str(exc))
        if token == self._token:
            return False
        self._token = token
        if isinstance(token, tuple):
            raise ModelRefused(None, f"registry pointer unreadable: {token[1]}")
        return True

    def load_initial(self) -> LoadedModel | None:
        self._token_changed()
        return self._load_current()

    def poll(self) -> LoadedModel | None:
        if not self._token_changed():
            return None
        return self._load_current()


def engine_factory(kind: str = "auto", threads: int | None = None, *, spinning: bool = False) -> EngineFactory:
    """An :data:`EngineFactory` using :func:`edge_ptycho_bluesky.model.engines.load_engine`.

    Parameters
    ----------
    kind : {"auto", "onnxruntime", "torch", "tensorrt"}
    threads
        Intra-op threads for ONNX Runtime / torch on CPU; None leaves the library default.
    spinning
        Let ONNX Runtime's idle threads busy-wait between operators (its own default).  Off by
        default: the worker shares the CPU with the transport (and, on a small edge box, with the
        detector and the stitcher), and spinning threads take the cores those need.  Measured on 2
        cores, fly scan at 500 Hz: p99 latency 91 ms with spinning, 52-70 ms without (docs/benchmarks.md).
    """
    from ..model.engines import ENGINE_KINDS

    if kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {kind!r}; choose one of {ENGINE_KINDS}")

    def factory(path: Path) -> Engine:
        from ..model.engines import load_engine

        ort_opts: dict[str, Any] = {"allow_spinning": bool(spinning)}
        if threads is not None:
            ort_opts["intra_op_threads"] = int(threads)
            if kind != "onnxruntime":  # torch's threads too (a lean edge install has no torch)
                import torch

                torch.set_num_threads(int(threads))
        if kind == "onnxruntime":
            return load_engine(path, "onnxruntime", **ort_opts)
        if kind == "auto":
            return load_engine(path, "auto", onnxruntime=ort_opts)
        return load_engine(path, kind)

    return factory

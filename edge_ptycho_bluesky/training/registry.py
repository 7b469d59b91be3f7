"""Versioned model registry on disk, published and deployed atomically.

The registry is the hand-over point between the retraining service (which publishes a new model)
and the edge inference worker (which loads the deployed one and hot-swaps it when it changes).

Layout::

    ROOT/
      versions/
        v0001/
          model.onnx        the network the edge worker runs (required)
          model.pt          torch state dict for warm starts (optional; only hashed here)
          manifest.json     written last: version, parent, training data, SSIM, sha256 of files
        v0002/ ...
      CURRENT               JSON pointer to the deployed version, replaced atomically
      history.jsonl         one JSON line per deployment (publish, deploy, rollback)
      .lock                 advisory lock serialising writers (publish, deploy, clean-up)

Publishing writes every file into a temporary folder inside ``ROOT``, fsyncs them, checks each
ONNX file (loads, passes ``onnx.checker`` and has a ``(batch, 1, 128, 128)`` input), writes the
manifest last, fsyncs the folder, and only then renames it to ``versions/<version>``. A crash at
any point leaves either no version or a complete one; leftover ``ROOT/.tmp-*`` folders are
ignored by readers and removed by the next writer. ``CURRENT`` is replaced with ``os.replace`` of
an fsynced temporary file, and only after the target version has been verified, so a worker that
reads ``CURRENT`` always finds a complete, verified model.

Nothing in the registry is unpickled: manifests are JSON and ONNX files are protobuf. Torch state
dicts are only hashed; whoever loads them must use ``torch.load(path, weights_only=True)``.

The writer lock is an ``fcntl.flock`` on ``ROOT/.lock``; it serialises writers on one machine
(and on file systems with working ``flock``); readers never take it.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import EllipsisType
from typing import IO, Any

try:  # POSIX only; on other systems writers are not serialised across processes.
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

__all__ = [
    "CURRENT_NAME",
    "DEFAULT_INPUT_SHAPE",
    "MANIFEST_NAME",
    "ONNX_NAME",
    "REGISTRY_ENV",
    "REQUIRED_MANIFEST_KEYS",
    "TORCH_NAME",
    "FileSource",
    "ModelRegistry",
    "ModelVersion",
    "OnnxInfo",
    "RegistryError",
    "WatchToken",
    "add_registry_argument",
    "add_subcommand",
    "import_onnx",
    "inspect_onnx",
]

MANIFEST_NAME = "manifest.json"
CURRENT_NAME = "CURRENT"
HISTORY_NAME = "history.jsonl"
VERSIONS_DIR = "versions"
LOCK_NAME = ".lock"
ONNX_NAME = "model.onnx"
TORCH_NAME = "model.pt"
DEFAULT_INPUT_SHAPE: tuple[int, int, int] = (1, 128, 128)
REQUIRED_MANIFEST_KEYS: tuple[str, ...] = (
    "version",
    "parent",
    "training_data",
    "validation_ssim",
    "files",
    "created",
)
#: Environment variable giving the default ``--registry`` folder of the CLI.
REGISTRY_ENV = "EDGE_PTYCHO_REGISTRY"

_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_AUTO_RE = re.compile(r"^v(\d+)$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 1 << 20

#: A file to publish: a path to copy, the bytes themselves, or a binary file object to read.
FileSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


class RegistryError(ValueError):
    """A registry operation was refused: bad version, corrupt or incompatible model, bad layout.

    The message names the version and file concerned and says what to do about it.
    """


@dataclass(frozen=True)
class OnnxInfo:
    """What the registry checked about an ONNX model.

    Attributes
    ----------
    input_name : str
        Name of the single graph input.
    output_names : tuple of str
        Names of the graph outputs, in order.
    batch : int or None
        Fixed batch size of the input (8 for the paper's ``ptychoNN_8.onnx``), or None when the
        batch dimension is dynamic.
    input_shape : tuple
        Declared input shape; None for a dynamic dimension.
    elem_type : str
        Input element type, ``"float32"`` or ``"float16"``.
    opset : int
        Default-domain opset version.
    """

    input_name: str
    output_names: tuple[str, ...]
    batch: int | None
    input_shape: tuple[int | None, ...]
    elem_type: str
    opset: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, as stored under the manifest's ``onnx`` key."""
        return {
            "input": self.input_name,
            "outputs": list(self.output_names),
            "batch": self.batch,
            "input_shape": list(self.input_shape),
            "elem_type": self.elem_type,
            "opset": self.opset,
        }


@dataclass(frozen=True)
class ModelVersion:
    """One published model version.

    Attributes
    ----------
    version : str
        Version name, e.g. ``"v0003"``.
    path : Path
        The version's folder, ``ROOT/versions/<version>``.
    manifest : dict
        The parsed ``manifest.json`` (a fresh copy; editing it changes nothing on disk).
    """

    version: str
    path: Path
    manifest: dict[str, Any] = field(compare=False, repr=False)

    @property
    def onnx_path(self) -> Path:
        """Path of the ONNX model the edge worker runs."""
        return self.path / ONNX_NAME

    @property
    def torch_path(self) -> Path | None:
        """Path of the torch state dict, or None when the version has none.

        Load it only with ``torch.load(path, weights_only=True)``.
        """
        return self.path / TORCH_NAME if TORCH_NAME in self.manifest.get("files", {}) else None

    @property
    def parent(self) -> str | None:
        """The version this one was trained from, or None."""
        return self.manifest.get("parent")

    @property
    def input_scale(self) -> float | None:
        """The count scale the network was trained with (``extra.preprocess.scale``), or None
        (raw counts, or not recorded); inference must give it frames on the same scale."""
        value = ((self.manifest.get("extra") or {}).get("preprocess") or {}).get("scale")
        return None if value is None else float(value)

    @property
    def input_exposure_s(self) -> float | None:
        """The exposure time (s) of the training frames (``extra.preprocess.exposure_s``), or None
        (not recorded); the worker scales frames of other exposures to it."""
        value = ((self.manifest.get("extra") or {}).get("preprocess") or {}).get("exposure_s")
        return float(value) if isinstance(value, (int, float)) and value > 0 else None

    @property
    def validation_ssim(self) -> float | None:
        """SSIM on the validation data recorded at training, or None."""
        value = self.manifest.get("validation_ssim")
        return None if value is None else float(value)

    @property
    def training_data(self) -> tuple[str, ...]:
        """Scan uids of the training corpus."""
        return tuple(self.manifest.get("training_data", ()))

    @property
    def created(self) -> datetime:
        """Publication time (UTC)."""
        return datetime.fromisoformat(self.manifest["created"])

    @property
    def onnx_batch(self) -> int | None:
        """Fixed batch size of ``model.onnx``, or None when dynamic or not recorded."""
        info = self.manifest.get("onnx", {}).get(ONNX_NAME, {})
        batch = info.get("batch")
        return None if batch is None else int(batch)


@dataclass(frozen=True)
class WatchToken:
    """Cheap fingerprint of ``CURRENT``; a change means a new deployment.

    Compare two tokens with ``!=``. ``os.replace`` gives ``CURRENT`` a new inode on every
    deployment, so the token changes even when two deployments fall in one mtime tick.

    Attributes
    ----------
    version : str or None
        Deployed version, None when nothing is deployed.
    inode : int
        Inode of ``CURRENT`` (0 when absent).
    mtime_ns : int
        Modification time of ``CURRENT`` in ns (0 when absent).
    """

    version: str | None
    inode: int
    mtime_ns: int


# --------------------------------------------------------------------------------------------
# ONNX checks


def inspect_onnx(
    path: str | os.PathLike[str],
    *,
    sample_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
    label: str | None = None,
) -> OnnxInfo:
    """Load and check an ONNX model that maps diffraction frames to phase patches.

    Parameters
    ----------
    path : path-like
        The ``.onnx`` file.
    sample_shape : (3,) ints
        Expected per-sample shape ``(C, H, W)`` of the input (and of outputs that declare a
        shape); ``(1, 128, 128)`` by default.
    label : str, optional
        How to name the file in error messages (defaults to the path).

    Returns
    -------
    OnnxInfo

    Raises
    ------
    RegistryError
        When the file cannot be parsed (truncated, not ONNX), fails ``onnx.checker``, or has not
        exactly one float input of shape ``(batch, *sample_shape)`` (batch fixed or dynamic), or
        an output whose declared shape is incompatible.
    """
    import onnx  # lazy: the worker imports this module without needing onnx for reading CURRENT

    path = Path(path)
    name = label or str(path)
    sample = tuple(int(s) for s in sample_shape)
    fix = (
        "re-export the network with a (batch, 1, 128, 128) float32 input "
        "(edge-ptycho's ONNX export does this) and publish it again"
    )
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError/RuntimeError on truncated files
        raise RegistryError(
            f"{name}: not a readable ONNX model ({type(exc).__name__}: {exc}); the file is "
            f"truncated or corrupt: copy or export it again"
        ) from exc
    try:
        onnx.checker.check_model(model)
    except Exception as exc:  # onnx.checker.ValidationError and friends
        raise RegistryError(
            f"{name}: fails onnx.checker ({exc}); the file is truncated, corrupt or from an "
            f"incompatible exporter: {fix}"
        ) from exc

    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1:
        raise RegistryError(
            f"{name}: expected exactly one graph input (diffraction frames), found "
            f"{[i.name for i in inputs]}: {fix}"
        )
    inp = inputs[0]
    elem_names = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16"}
    tensor_type = inp.type.tensor_type
    if not inp.type.HasField("tensor_type") or tensor_type.elem_type not in elem_names:
        raise RegistryError(
            f"{name}: input {inp.name!r} must be a float32 or float16 tensor, got "
            f"{onnx.helper.printable_type(inp.type)}: {fix}"
        )
    if not tensor_type.HasField("shape"):
        raise RegistryError(f"{name}: input {inp.name!r} declares no shape: {fix}")
    in_shape = _dims(tensor_type.shape)
    expected_text = f"(batch, {', '.join(map(str, sample))})"
    if len(in_shape) != 1 + len(sample) or tuple(in_shape[1:]) != sample:
        raise RegistryError(
            f"{name}: input {inp.name!r} has shape {_shape_text(in_shape)}, expected "
            f"{expected_text} with a fixed or dynamic batch: {fix}"
        )
    batch = in_shape[0]

    if len(graph.output) == 0:
        raise RegistryError(f"{name}: the graph has no outputs: {fix}")
    for out in graph.output:
        out_type = out.type.tensor_type
        if not out.type.HasField("tensor_type") or not out_type.HasField("shape"):
            continue  # shape not declared: nothing to check statically
        out_shape = _dims(out_type.shape)
        compatible = len(out_shape) == len(in_shape) and all(
            o is None or o == s for o, s in zip(out_shape[1:], sample, strict=True)
        )
        if compatible and batch is not None and out_shape[0] is not None:
            compatible = out_shape[0] == batch
        if not compatible:
            raise RegistryError(
                f"{name}: output {out.name!r} has shape {_shape_text(out_shape)}, expected "
                f"{expected_text} matching the input {_shape_text(in_shape)}: {fix}"
            )

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    return OnnxInfo(
        input_name=inp.name,
        output_names=tuple(o.name for o in graph.output),
        batch=batch,
        input_shape=tuple(in_shape),
        elem_type=elem_names[tensor_type.elem_type],
        opset=int(opset),
    )


def _dims(shape: Any) -> list[int | None]:
    """Fixed dimensions as ints, dynamic (symbolic or unknown) ones as None."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in shape.dim]


def _shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


# --------------------------------------------------------------------------------------------
# Durable file helpers


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (new or renamed files) to disk; a no-op where unsupported."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file, fsync, os.replace)."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _write_source(dest: Path, source: FileSource) -> str:
    """Copy one publish source into ``dest`` (which must not exist), fsync it, return its sha256."""
    digest = hashlib.sha256()
    with open(dest, "xb") as out:
        if isinstance(source, (bytes, bytearray, memoryview)):
            out.write(source)
            digest.update(source)
        elif isinstance(source, (str, os.PathLike)):
            with open(source, "rb") as src:
                _copy_stream(src, out, digest)
        else:
            _copy_stream(source, out, digest)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _copy_stream(src: IO[bytes], out: IO[bytes], digest: Any) -> None:
    while True:
        chunk = src.read(_CHUNK)
        if not chunk:
            return
        if not isinstance(chunk, (bytes, bytearray, memoryview)):
            raise TypeError(
                f"file source {src!r} returned {type(chunk).__name__}, not bytes: open it in "
                f"binary mode ('rb')"
            )
        out.write(chunk)
        digest.update(chunk)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


# --------------------------------------------------------------------------------------------
# Argument checks


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise RegistryError(
            f"invalid {what} {value!r}: use 1-128 characters from letters, digits, '.', '_' and "
            f"'-', starting with a letter or digit (e.g. 'v0007' or 'model.onnx')"
        )
    return value


def _check_training_data(training_data: Sequence[str] | str) -> list[str]:
    if isinstance(training_data, str):
        raise RegistryError(
            f"training_data must be a sequence of scan uids, got the single string "
            f"{training_data!r}: wrap it in a list"
        )
    uids = list(training_data)
    bad = [u for u in uids if not isinstance(u, str) or not u]
    if bad:
        raise RegistryError(f"training_data must hold non-empty scan uid strings, got {bad!r}")
    return uids


def _check_ssim(value: object, what: str = "validation_ssim") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise RegistryError(f"{what} must be a float in [-1, 1] or None, got {value!r}")
    ssim = float(value)  # type: ignore[arg-type]
    if not math.isfinite(ssim) or not -1.0 <= ssim <= 1.0:
        raise RegistryError(f"{what} must be a finite float in [-1, 1] or None, got {value!r}")
    return ssim


def _check_input_shape(shape: Sequence[int]) -> list[int]:
    dims = list(shape)
    if len(dims) != 3 or not all(type(d) is int and d > 0 for d in dims):
        raise RegistryError(
            f"input_shape must be three positive ints (C, H, W) such as [1, 128, 128], "
            f"got {shape!r}"
        )
    return dims


def _is_source(value: object) -> bool:
    return isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)) or callable(
        getattr(value, "read", None)
    )


# --------------------------------------------------------------------------------------------
# The registry


class ModelRegistry:
    """A folder of versioned models with an atomically replaced pointer to the deployed one.

    Parameters
    ----------
    root : path-like
        Registry folder. Created (with ``versions/``) unless ``create=False``.
    create : bool
        When False, a folder that is not already a registry is refused.

    Examples
    --------
    >>> reg = ModelRegistry(tmp_path / "models")                       # doctest: +SKIP
    >>> mv = reg.publish({"model.onnx": onnx_path, "model.pt": pt_path},
    ...                  training_data=["3f2a..."], validation_ssim=0.91)  # doctest: +SKIP
    >>> reg.current().onnx_path                                        # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root)
        if create:
            (self.root / VERSIONS_DIR).mkdir(parents=True, exist_ok=True)
        elif not (self.root / VERSIONS_DIR).is_dir():
            raise RegistryError(
                f"{self.root} is not a model registry (no {VERSIONS_DIR}/ folder): check the "
                f"--registry path, or create one by publishing or importing a model"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @property
    def versions_dir(self) -> Path:
        """``ROOT/versions``."""
        return self.root / VERSIONS_DIR

    @property
    def current_file(self) -> Path:
        """``ROOT/CURRENT``, the pointer to the deployed version."""
        return self.root / CURRENT_NAME

    # -- writers -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the exclusive writer lock (released by the OS if the process dies)."""
        fd = os.open(self.root / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def publish(
        self,
        files: Mapping[str, FileSource],
        *,
        parent: str | None | EllipsisType = ...,
        training_data: Sequence[str] = (),
        validation_ssim: float | None = None,
        model: str | None = "ptychonn2",
        version: str | None = None,
        deploy: bool = True,
        input_shape: Sequence[int] = DEFAULT_INPUT_SHAPE,
        notes: str | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> ModelVersion:
        """Publish a new model version atomically, and deploy it unless ``deploy=False``.

        Parameters
        ----------
        files : mapping of file name to source
            Must contain ``"model.onnx"``; ``"model.pt"`` (torch state dict) is conventional.
            A source is a path to copy, the bytes, or a binary file object to read.
        parent : str or None, optional
            Version this model was trained from. Default (``...``): the deployed version.
        training_data : sequence of str
            Scan uids the model was trained on.
        validation_ssim : float or None
            SSIM of the model on its validation data; the retraining policy's expected level.
        model : str or None
            Architecture name, e.g. ``"ptychonn2"``.
        version : str, optional
            Explicit version name; by default the next ``vNNNN`` after the highest existing one.
        deploy : bool
            Point ``CURRENT`` at the new version once it is published.
        input_shape : (3,) ints
            Per-sample input shape ``(C, H, W)`` every ONNX file must accept.
        notes : str, optional
            Free text stored in the manifest.
        extra : mapping, optional
            JSON-serialisable metadata stored under ``extra``.

        Returns
        -------
        ModelVersion

        Raises
        ------
        RegistryError
            For a bad argument, an existing version name, an unknown parent, or an ONNX file
            that fails the checks of :func:`inspect_onnx`. Nothing is left behind and
            ``CURRENT`` is unchanged.
        TypeError
            When a file source is of an unsupported type.
        """
        if not isinstance(files, Mapping) or ONNX_NAME not in files:
            raise RegistryError(
                f"files must be a mapping that includes {ONNX_NAME!r} (the network the edge "
                f"worker runs), got keys {sorted(files) if isinstance(files, Mapping) else files!r}"
            )
        for name, source in files.items():
            _check_name(name, "file name")
            if name == MANIFEST_NAME:
                raise RegistryError(
                    f"{MANIFEST_NAME!r} is written by the registry; pass metadata as keyword "
                    f"arguments instead"
                )
            if not _is_source(source):
                raise TypeError(
                    f"source for {name!r} must be a path, bytes or a binary file object, got "
                    f"{type(source).__name__}"
                )
        uids = _check_training_data(training_data)
        ssim = _check_ssim(validation_ssim)
        shape = _check_input_shape(input_shape)
        if model is not None and not isinstance(model, str):
            raise RegistryError(f"model must be an architecture name (str) or None, got {model!r}")
        if notes is not None and not isinstance(notes, str):
            raise RegistryError(f"notes must be a str or None, got {type(notes).__name__}")
        extra_dict = dict(extra) if extra is not None else None
        if extra_dict is not None:
            try:
                json.dumps(extra_dict, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise RegistryError(f"extra must be JSON-serialisable: {exc}") from exc
        if version is not None:
            _check_name(version, "version")

        with self._locked():
            self._clean_stale_locked()
            if version is None:
                version = self._next_auto_version()
            if (self.versions_dir / version).exists():
                raise RegistryError(
                    f"version {version!r} already exists in {self.versions_dir}: versions are "
                    f"immutable, publish under a new name (or omit version= for the next vNNNN)"
                )
            if parent is ...:
                parent = self._read_pointer(strict=False).get("version")
            elif parent is not None:
                _check_name(parent, "parent version")
                if not (self.versions_dir / parent / MANIFEST_NAME).is_file():
                    raise RegistryError(
                        f"parent version {parent!r} does not exist in {self.versions_dir}: pass "
                        f"an existing version (see `edge-ptycho registry list`) or parent=None"
                    )
            mv = self._stage_and_rename(
                files,
                version=version,
                parent=parent,  # type: ignore[arg-type]
                training_data=uids,
                validation_ssim=ssim,
                model=model,
                input_shape=shape,
                notes=notes,
                extra=extra_dict,
            )
            if deploy:
                self._set_current_locked(mv, action="publish")
        return mv

    def _stage_and_rename(
        self,
        files: Mapping[str, FileSource],
        *,
        version: str,
        parent: str | None,
        training_data: list[str],
        validation_ssim: float | None,
        model: str | None,
        input_shape: list[int],
        notes: str | None,
        extra: dict[str, Any] | None,
    ) -> ModelVersion:
        tmp = self.root / f"{_TMP_PREFIX}{version}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            digests: dict[str, str] = {}
            for name, source in files.items():
                try:
                    digests[name] = _write_source(tmp / name, source)
                except OSError as exc:
                    raise RegistryError(
                        f"cannot read the source of {name!r} for version {version!r}: {exc}"
                    ) from exc
            onnx_info = {
                name: inspect_onnx(
                    tmp / name, sample_shape=input_shape, label=f"{name} of version {version!r}"
                ).to_dict()
                for name in sorted(digests)
                if name.endswith(".onnx")
            }
            manifest: dict[str, Any] = {
                "version": version,
                "parent": parent,
                "created": _utc_now(),
                "model": model,
                "input_shape": input_shape,
                "training_data": training_data,
                "validation_ssim": validation_ssim,
                "files": dict(sorted(digests.items())),
                "onnx": onnx_info,
            }
            if notes is not None:
                manifest["notes"] = notes
            if extra is not None:
                manifest["extra"] = extra
            data = json.dumps(manifest, indent=2, allow_nan=False).encode() + b"\n"
            with open(tmp / MANIFEST_NAME, "xb") as f:  # the manifest is written last
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            final = self.versions_dir / version
            try:
                os.rename(tmp, final)
            except OSError as exc:
                raise RegistryError(
                    f"cannot publish version {version!r}: {final} appeared meanwhile ({exc}); "
                    f"publish under a new name"
                ) from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync_dir(self.versions_dir)
        logger.info(
            "published model %s (parent %s, %d training scans, validation SSIM %s)",
            version,
            parent,
            len(training_data),
            validation_ssim,
        )
        return ModelVersion(version=version, path=final, manifest=manifest)

    def deploy(self, version: str) -> ModelVersion:
        """Verify ``version`` and point ``CURRENT`` at it.

        Raises
        ------
        RegistryError
            When the version is missing or fails :meth:`verify`; ``CURRENT`` is then unchanged.
        """
        with self._locked():
            mv = self.verify(version)
            if self._read_pointer(strict=False).get("version") == mv.version:
                logger.info("model %s is already deployed", mv.version)
                return mv
            self._set_current_locked(mv, action="deploy")
        return mv

    def rollback(self, version: str | None = None) -> ModelVersion:
        """Deploy an earlier version again (logged as a rollback).

        Parameters
        ----------
        version : str, optional
            Version to go back to. Default: the version deployed before the current one
            (recorded in ``CURRENT``), so two rollbacks in a row toggle between two versions.

        Raises
        ------
        RegistryError
            When there is nothing to roll back to, the target is already deployed, or it fails
            :meth:`verify` (``CURRENT`` is then unchanged).
        """
        with self._locked():
            pointer = self._read_pointer(strict=False)
            current = pointer.get("version")
            if version is None:
                version = pointer.get("previous")
                if version is None:
                    raise RegistryError(
                        f"no previous deployment recorded in {self.current_file}: name the "
                        f"version to roll back to (see `edge-ptycho registry list`)"
                    )
            if version == current:
                raise RegistryError(
                    f"version {version!r} is already deployed: name another version to roll back to"
                )
            mv = self.verify(version)
            logger.warning("rolling back the deployed model from %s to %s", current, mv.version)
            self._set_current_locked(mv, action="rollback")
        return mv

    def _set_current_locked(self, mv: ModelVersion, *, action: str) -> None:
        previous = self._read_pointer(strict=False).get("version")
        now = _utc_now()
        pointer = {"version": mv.version, "previous": previous, "deployed": now, "action": action}
        _atomic_write(self.current_file, json.dumps(pointer, indent=2).encode() + b"\n")
        entry = {"time": now, "action": action, "version": mv.version, "previous": previous}
        with open(self.root / HISTORY_NAME, "ab") as f:
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        logger.info("deployed model %s (%s; previously %s)", mv.version, action, previous)

    def clean_stale(self) -> list[Path]:
        """Remove temporary files and folders left by crashed writers.

        Returns
        -------
        list of Path
            What was removed.
        """
        with self._locked():
            return self._clean_stale_locked()

    def _clean_stale_locked(self) -> list[Path]:
        # Holding the writer lock, no other writer is mid-publish: every temp entry is stale.
        removed = []
        for entry in sorted(self.root.glob(f"{_TMP_PREFIX}*")):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
            logger.warning("removed %s left by an interrupted registry write", entry)
            removed.append(entry)
        return removed

    def _next_auto_version(self) -> str:
        numbers = [
            int(m.group(1))
            for p in self.versions_dir.iterdir()
            if (m := _AUTO_RE.fullmatch(p.name))
        ]
        return f"v{max(numbers, default=0) + 1:04d}"

    # -- readers -------------------------------------------------------------------------------

    def _read_pointer(self, *, strict: bool = True) -> dict[str, Any]:
        """Parse ``CURRENT``; ``{}`` when nothing is deployed.

        Writers read it with ``strict=False`` so that deploying repairs a corrupt pointer.
        """
        try:
            data = self.current_file.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            return self._parse_pointer(data)
        except RegistryError as exc:
            if strict:
                raise
            logger.warning("%s; it will be overwritten", exc)
            return {}

    def _parse_pointer(self, data: bytes) -> dict[str, Any]:
        text = data.decode("utf-8", errors="replace").strip()
        try:
            pointer = json.loads(text)
        except json.JSONDecodeError:
            pointer = {"version": text}  # a bare version name written by hand is accepted
        if not isinstance(pointer, dict) or not isinstance(pointer.get("version"), str) or not (
            _NAME_RE.fullmatch(pointer["version"])
        ):
            raise RegistryError(
                f"{self.current_file} is corrupt ({text[:80]!r}): repair it with "
                f"`edge-ptycho registry deploy --registry {self.root} VERSION`"
            )
        return pointer

    def watch_token(self) -> WatchToken:
        """Cheap fingerprint of the deployment (one open, fstat and small read of ``CURRENT``).

        An edge worker polls this and reloads (via :meth:`current`) when it changes.

        Raises
        ------
        RegistryError
            When ``CURRENT`` exists but is corrupt.
        """
        try:
            with open(self.current_file, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read(4096)
        except FileNotFoundError:
            return WatchToken(version=None, inode=0, mtime_ns=0)
        version = self._parse_pointer(data)["version"]
        return WatchToken(version=version, inode=st.st_ino, mtime_ns=st.st_mtime_ns)

    def current_version(self) -> str | None:
        """Name of the deployed version, or None, without reading its manifest."""
        return self._read_pointer().get("version")

    def current(self, *, verify: bool = True) -> ModelVersion | None:
        """The deployed version, or None when nothing has been deployed.

        Parameters
        ----------
        verify : bool
            Run the full :meth:`verify` (checksums and ONNX checks); otherwise only the manifest
            is read.

        Raises
        ------
        RegistryError
            When the deployed version has been damaged since it was deployed.
        """
        name = self.current_version()
        if name is None:
            return None
        return self.verify(name) if verify else self.get(name)

    def get(self, version: str) -> ModelVersion:
        """Read a version's manifest and check its structure (no file hashing).

        Raises
        ------
        RegistryError
            When the version does not exist or its manifest is missing or malformed.
        """
        _check_name(version, "version")
        path = self.versions_dir / version
        if not path.is_dir():
            known = ", ".join(mv.version for mv in self.versions()) or "none"
            raise RegistryError(
                f"no version {version!r} in {self.versions_dir} (published versions: {known})"
            )
        manifest_path = path / MANIFEST_NAME
        fix = (
            f"this folder is not a complete published version: delete {path} and publish the "
            f"model again, or deploy another version"
        )
        try:
            manifest = json.loads(manifest_path.read_bytes())
        except FileNotFoundError:
            raise RegistryError(f"version {version!r}: {manifest_path} is missing; {fix}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RegistryError(
                f"version {version!r}: {manifest_path} is not valid JSON ({exc}); {fix}"
            ) from exc
        self._check_manifest(version, manifest_path, manifest, fix)
        return ModelVersion(version=version, path=path, manifest=manifest)

    @staticmethod
    def _check_manifest(version: str, where: Path, manifest: object, fix: str) -> None:
        def bad(what: str) -> RegistryError:
            return RegistryError(f"version {version!r}: {where} {what}; {fix}")

        if not isinstance(manifest, dict):
            raise bad("is not a JSON object")
        missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
        if missing:
            raise bad(f"lacks the keys {missing}")
        if manifest["version"] != version:
            raise bad(f"names version {manifest['version']!r}, not the folder's {version!r}")
        if manifest["parent"] is not None and not isinstance(manifest["parent"], str):
            raise bad(f"has a parent that is not a string or null: {manifest['parent']!r}")
        uids = manifest["training_data"]
        if not isinstance(uids, list) or not all(isinstance(u, str) for u in uids):
            raise bad("has training_data that is not a list of scan uid strings")
        try:
            _check_ssim(manifest["validation_ssim"])
        except RegistryError as exc:
            raise bad(f"has a bad validation_ssim ({exc})") from None
        files = manifest["files"]
        if not isinstance(files, dict) or ONNX_NAME not in files:
            raise bad(f"has no 'files' entry for {ONNX_NAME!r}")
        for name, digest in files.items():
            if not _NAME_RE.fullmatch(name) or name == MANIFEST_NAME:
                raise bad(f"lists an invalid file name {name!r}")
            if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
                raise bad(f"has no valid sha256 hex digest for {name!r}")
        try:
            created = datetime.fromisoformat(manifest["created"])
        except (TypeError, ValueError):
            raise bad(
                f"has a 'created' time that is not ISO 8601: {manifest['created']!r}"
            ) from None
        if created.tzinfo is None:
            raise bad(f"has a 'created' time without a time zone: {manifest['created']!r}")
        if "input_shape" in manifest:
            try:
                _check_input_shape(manifest["input_shape"])
            except (RegistryError, TypeError) as exc:
                raise bad(f"has a bad input_shape ({exc})") from None

    def verify(self, version: str) -> ModelVersion:
        """Fully check a version before it is deployed or loaded.

        Checks that the manifest is present, parseable and complete; that every listed file
        exists with the recorded sha256; and that every ONNX file loads, passes
        ``onnx.checker`` and takes a ``(batch, *input_shape)`` input.

        Raises
        ------
        RegistryError
            Naming the version, the file and the problem.
        """
        mv = self.get(version)
        fix = (
            "the files were modified or damaged after publishing: deploy another version (see "
            "`edge-ptycho registry list`) and publish this model again as a new version"
        )
        for name, expected in mv.manifest["files"].items():
            path = mv.path / name
            if not path.is_file():
                raise RegistryError(f"version {version!r}: file {path} is missing; {fix}")
            actual = _sha256_file(path)
            if actual != expected:
                raise RegistryError(
                    f"version {version!r}: {path} has sha256 {actual[:12]}..., but the manifest "
                    f"records {expected[:12]}...; {fix}"
                )
        shape = mv.manifest.get("input_shape", list(DEFAULT_INPUT_SHAPE))
        for name in mv.manifest["files"]:
            if name.endswith(".onnx"):
                label = f"version {version!r}: {name}"
                inspect_onnx(mv.path / name, sample_shape=shape, label=label)
        return mv

    def _scan(self, *, check_files: bool) -> list[tuple[str, ModelVersion | None, str | None]]:
        results: list[tuple[str, ModelVersion | None, str | None]] = []
        if not self.versions_dir.is_dir():
            return results
        for path in sorted(self.versions_dir.iterdir()):
            if path.name.startswith(".") or not path.is_dir() or not _NAME_RE.fullmatch(path.name):
                continue
            try:
                mv = self.verify(path.name) if check_files else self.get(path.name)
            except RegistryError as exc:
                results.append((path.name, None, str(exc)))
            else:
                results.append((path.name, mv, None))
        return results

    def versions(self, *, check_files: bool = False) -> list[ModelVersion]:
        """Published versions with a valid manifest, oldest first.

        Parameters
        ----------
        check_files : bool
            Also run the full :meth:`verify` (hashes every file; slower) and leave out versions
            that fail it.

        Returns
        -------
        list of ModelVersion
            Sorted by creation time, then name. Broken versions are left out (see
            :meth:`problems`), and so are temporary folders of interrupted publishes.
        """
        found = [mv for _, mv, _ in self._scan(check_files=check_files) if mv is not None]
        return sorted(found, key=lambda mv: (mv.created, mv.version))

    def problems(self, *, check_files: bool = False) -> dict[str, str]:
        """Version folders that fail the manifest check (or :meth:`verify`), with the reason."""
        return {name: err for name, _, err in self._scan(check_files=check_files) if err}

    def history(self) -> list[dict[str, Any]]:
        """Deployments recorded in ``history.jsonl``, oldest first (malformed lines skipped)."""
        try:
            lines = (self.root / HISTORY_NAME).read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        entries = []
        for line in lines:
            with contextlib.suppress(json.JSONDecodeError):
                entry = json.loads(line)
                if isinstance(entry, dict):
                    entries.append(entry)
        return entries


# --------------------------------------------------------------------------------------------
# Import of existing ONNX models


def import_onnx(
    registry: ModelRegistry,
    onnx_file: str | os.PathLike[str],
    *,
    version: str | None = None,
    deploy: bool = True,
    parent: str | None | EllipsisType = None,
    training_data: Sequence[str] = (),
    validation_ssim: float | None = None,
    model: str | None = "ptychonn2",
    torch_file: str | os.PathLike[str] | None = None,
    notes: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register an existing ONNX model (such as the paper's ``ptychoNN_8.onnx``) as a version.

    The file is checked first (:func:`inspect_onnx`: readable, passes ``onnx.checker``, one
    ``(batch, 1, 128, 128)`` float input, outputs of the same shape), so a bad file is refused
    before the registry is touched.

    Parameters
    ----------
    registry : ModelRegistry
    onnx_file : path-like
        The model; copied into the registry as ``model.onnx``.
    version, deploy, training_data, validation_ssim, model, notes :
        As for :meth:`ModelRegistry.publish`.
    parent : str or None, optional
        Default None: an imported model starts a new lineage. Pass ``...`` to use the deployed
        version.
    torch_file : path-like, optional
        Matching torch state dict, stored as ``model.pt``.
    extra : mapping, optional
        Extra metadata; ``imported_from`` (the source path) is added.

    Returns
    -------
    ModelVersion
    """
    path = Path(onnx_file)
    if not path.is_file():
        raise RegistryError(f"ONNX file {path} does not exist (or is not a file): check the path")
    info = inspect_onnx(path)
    files: dict[str, FileSource] = {ONNX_NAME: path}
    if torch_file is not None:
        if not Path(torch_file).is_file():
            raise RegistryError(f"torch state dict {torch_file} does not exist: check the path")
        files[TORCH_NAME] = Path(torch_file)
    meta = {"imported_from": str(path.resolve()), **(dict(extra) if extra else {})}
    logger.info(
        "importing %s: input %r %s (%s), outputs %s",
        path,
        info.input_name,
        _shape_text(info.input_shape),
        info.elem_type,
        list(info.output_names),
    )
    return registry.publish(
        files,
        parent=parent,
        training_data=training_data,
        validation_ssim=validation_ssim,
        model=model,
        version=version,
        deploy=deploy,
        notes=notes,
        extra=meta,
    )


# --------------------------------------------------------------------------------------------
# CLI


def add_registry_argument(parser: argparse.ArgumentParser) -> None:
    """``--registry DIR``, defaulting to ``$EDGE_PTYCHO_REGISTRY`` (required when that is unset)."""
    env_root = os.environ.get(REGISTRY_ENV)
    parser.add_argument(
        "--registry",
        type=Path,
        default=Path(env_root) if env_root else None,
        required=not env_root,
        metavar="DIR",
        help=f"model registry folder (default: ${REGISTRY_ENV})",
    )


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho import-onnx`` and ``edge-ptycho registry ACTION``.

    ``ACTION`` is one of ``list``, ``show``, ``deploy``, ``rollback``.

    The registry folder comes from ``--registry DIR`` or the ``EDGE_PTYCHO_REGISTRY`` variable.
    """
    common = argparse.ArgumentParser(add_help=False)
    add_registry_argument(common)

    imp = subparsers.add_parser(
        "import-onnx",
        parents=[common],
        help="register an existing ONNX model as a new version",
        description="Check an ONNX model ((batch, 1, 128, 128) input) and publish it into the "
        "registry as a new version, deployed unless --no-deploy.",
    )
    imp.add_argument("onnx_file", type=Path, metavar="FILE.onnx")
    imp.add_argument("--version", help="version name (default: the next vNNNN)")
    imp.add_argument("--no-deploy", action="store_true", help="publish without deploying")
    imp.add_argument("--torch", type=Path, metavar="FILE.pt", help="matching torch state dict")
    imp.add_argument(
        "--model", default="ptychonn2", help="architecture name (default: %(default)s)"
    )
    imp.add_argument("--validation-ssim", type=float, metavar="SSIM", help="expected SSIM level")
    imp.add_argument("--notes", help="free text stored in the manifest")
    imp.set_defaults(func=_cmd_import_onnx)

    reg = subparsers.add_parser(
        "registry",
        help="list, inspect, deploy or roll back model versions",
        description="Inspect the model registry and change the deployed version.",
    )
    actions = reg.add_subparsers(dest="registry_action", metavar="{list,show,deploy,rollback}")
    actions.required = True
    lst = actions.add_parser("list", parents=[common], help="list versions (* = deployed)")
    lst.add_argument("--verify", action="store_true", help="also check every file's sha256")
    lst.set_defaults(func=_cmd_list)
    show = actions.add_parser("show", parents=[common], help="print a version's manifest")
    show.add_argument("version", nargs="?", help="version (default: the deployed one)")
    show.set_defaults(func=_cmd_show)
    dep = actions.add_parser("deploy", parents=[common], help="verify and deploy a version")
    dep.add_argument("version")
    dep.set_defaults(func=_cmd_deploy)
    rb = actions.add_parser("rollback", parents=[common], help="deploy an earlier version again")
    rb.add_argument("version", nargs="?", help="version (default: the previously deployed one)")
    rb.set_defaults(func=_cmd_rollback)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def _cmd_import_onnx(args: argparse.Namespace) -> int:
    try:
        mv = import_onnx(
            ModelRegistry(args.registry),
            args.onnx_file,
            version=args.version,
            deploy=not args.no_deploy,
            torch_file=args.torch,
            model=args.model,
            validation_ssim=args.validation_ssim,
            notes=args.notes,
        )
    except RegistryError as exc:
        return _fail(exc)
    state = "deployed" if not args.no_deploy else "not deployed"
    print(f"imported {args.onnx_file} as {mv.version} ({state}) in {args.registry}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    try:
        registry = ModelRegistry(args.registry, create=False)
        current = registry.current_version()
        scan = registry._scan(check_files=args.verify)
    except RegistryError as exc:
        return _fail(exc)
    good = sorted((mv for _, mv, _ in scan if mv is not None), key=lambda m: (m.created, m.version))
    print(
        f"  {'VERSION':<12} {'CREATED (UTC)':<19} {'PARENT':<12} {'SSIM':>6} {'SCANS':>5}  MODEL"
    )
    for mv in good:
        mark = "*" if mv.version == current else " "
        ssim = "-" if mv.validation_ssim is None else f"{mv.validation_ssim:.3f}"
        print(
            f"{mark} {mv.version:<12} {mv.created:%Y-%m-%d %H:%M:%S} {mv.parent or '-':<12} "
            f"{ssim:>6} {len(mv.training_data):>5}  {mv.manifest.get('model') or '-'}"
        )
    broken = [(name, err) for name, mv, err in scan if mv is None]
    for name, err in broken:
        print(f"! {name:<12} BROKEN: {err}")
    if current is None:
        print("(nothing deployed)")
    return 1 if broken else 0


def _cmd_show(args: argparse.Namespace) -> int:
    try:
        registry = ModelRegistry(args.registry, create=False)
        version = args.version or registry.current_version()
        if version is None:
            return _fail(RegistryError("nothing is deployed: name a version to show"))
        mv = registry.get(version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"# {mv.path}")
    print(json.dumps(mv.manifest, indent=2))
    try:
        registry.verify(version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"# verified: all {len(mv.manifest['files'])} files match their sha256")
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    try:
        mv = ModelRegistry(args.registry, create=False).deploy(args.version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"deployed {mv.version}")
    return 0


def _cmd_rollback(args: argparse.Namespace) -> int:
    try:
        mv = ModelRegistry(args.registry, create=False).rollback(args.version)
    except RegistryError as exc:
        return _fail(exc)
    print(f"rolled back to {mv.version}")
    return 0

"""Checks of the model registry: names and arguments, manifests, file hashes and the ONNX contract.

The contract every published ONNX file keeps (:func:`check_onnx_contract`): it loads, passes
``onnx.checker`` and has exactly one float input of shape ``(batch, 1, 128, 128)`` (batch fixed or
dynamic) and outputs of the same shape. A refused check raises :class:`RegistryError`, naming the
version and file concerned and what to do about it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from ..files import sha256_file
from .model_version import (
    DEFAULT_INPUT_SHAPE,
    MANIFEST_NAME,
    ONNX_NAME,
    REQUIRED_MANIFEST_KEYS,
    ModelVersion,
)

__all__ = [
    "NAME_RE",
    "OnnxInfo",
    "RegistryError",
    "check_input_shape",
    "check_manifest",
    "check_name",
    "check_onnx_contract",
    "check_ssim",
    "check_training_data",
    "check_version_files",
    "shape_text",
]

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")

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


# --------------------------------------------------------------------------------------------
# ONNX checks


def check_onnx_contract(
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
            f"{name}: input {inp.name!r} has shape {shape_text(in_shape)}, expected "
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
                f"{name}: output {out.name!r} has shape {shape_text(out_shape)}, expected "
                f"{expected_text} matching the input {shape_text(in_shape)}: {fix}"
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


def shape_text(shape: Sequence[int | None]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"


# --------------------------------------------------------------------------------------------
# Argument checks


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise RegistryError(
            f"invalid {what} {value!r}: use 1-128 characters from letters, digits, '.', '_' and "
            f"'-', starting with a letter or digit (e.g. 'v0007' or 'model.onnx')"
        )
    return value


def check_training_data(training_data: Sequence[str] | str) -> list[str]:
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


def check_ssim(value: object, what: str = "validation_ssim") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not hasattr(value, "__float__"):
        raise RegistryError(f"{what} must be a float in [-1, 1] or None, got {value!r}")
    ssim = float(value)  # type: ignore[arg-type]
    if not math.isfinite(ssim) or not -1.0 <= ssim <= 1.0:
        raise RegistryError(f"{what} must be a finite float in [-1, 1] or None, got {value!r}")
    return ssim


def check_input_shape(shape: Sequence[int]) -> list[int]:
    dims = list(shape)
    if len(dims) != 3 or not all(type(d) is int and d > 0 for d in dims):
        raise RegistryError(
            f"input_shape must be three positive ints (C, H, W) such as [1, 128, 128], "
            f"got {shape!r}"
        )
    return dims



# --------------------------------------------------------------------------------------------
# Manifests and files


def check_manifest(version: str, where: Path, manifest: object, fix: str) -> None:
    """Check the structure of a version's parsed ``manifest.json`` (no file hashing).

    Raises
    ------
    RegistryError
        Naming the version, the manifest file, what is wrong and ``fix``.
    """

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
        check_ssim(manifest["validation_ssim"])
    except RegistryError as exc:
        raise bad(f"has a bad validation_ssim ({exc})") from None
    files = manifest["files"]
    if not isinstance(files, dict) or ONNX_NAME not in files:
        raise bad(f"has no 'files' entry for {ONNX_NAME!r}")
    for name, digest in files.items():
        if not NAME_RE.fullmatch(name) or name == MANIFEST_NAME:
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
            check_input_shape(manifest["input_shape"])
        except (RegistryError, TypeError) as exc:
            raise bad(f"has a bad input_shape ({exc})") from None


def check_version_files(mv: ModelVersion) -> None:
    """Check that every file the manifest lists exists with the recorded sha256, and that every
    ONNX file keeps the contract of :func:`check_onnx_contract` for the version's input shape.

    Raises
    ------
    RegistryError
        Naming the version, the file and the problem.
    """
    version = mv.version
    fix = (
        "the files were modified or damaged after publishing: deploy another version (see "
        "`edge-ptycho registry list`) and publish this model again as a new version"
    )
    for name, expected in mv.manifest["files"].items():
        path = mv.path / name
        if not path.is_file():
            raise RegistryError(f"version {version!r}: file {path} is missing; {fix}")
        actual = sha256_file(path)
        if actual != expected:
            raise RegistryError(
                f"version {version!r}: {path} has sha256 {actual[:12]}..., but the manifest "
                f"records {expected[:12]}...; {fix}"
            )
    shape = mv.manifest.get("input_shape", list(DEFAULT_INPUT_SHAPE))
    for name in mv.manifest["files"]:
        if name.endswith(".onnx"):
            label = f"version {version!r}: {name}"
            check_onnx_contract(mv.path / name, sample_shape=shape, label=label)

"""Writing one model version folder durably: the step of publishing that touches the disk.

:func:`write_version_folder` copies every file source into a temporary folder inside the registry
root (fsynced, hashed), checks each ONNX file (:func:`~.registry_checks.check_onnx_contract`),
writes ``manifest.json`` last, fsyncs the folder and only then renames it to
``versions/<version>``. A crash at any point leaves either no version or a complete one; the
temporary folder (named with :data:`~edge_ptycho_bluesky.files.TMP_PREFIX`) is ignored by readers
and removed by the registry's next writer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ..files import TMP_PREFIX, fsync_dir
from .model_version import MANIFEST_NAME, ONNX_NAME, ModelVersion
from .registry_checks import RegistryError, check_name, check_onnx_contract

logger = logging.getLogger(__name__)

__all__ = ["FileSource", "check_file_sources", "utc_now", "write_version_folder"]

_CHUNK = 1 << 20

#: A file to publish: a path to copy, the bytes themselves, or a binary file object to read.
FileSource = str | os.PathLike[str] | bytes | bytearray | memoryview | IO[bytes]


def check_file_sources(files: Mapping[str, FileSource]) -> None:
    """Check the ``files`` argument of a publish: a mapping with ``model.onnx``, valid file names
    (not ``manifest.json``), and sources that are paths, bytes or binary file objects.

    Raises
    ------
    RegistryError
        A bad mapping or file name.
    TypeError
        A source of an unsupported type.
    """
    if not isinstance(files, Mapping) or ONNX_NAME not in files:
        raise RegistryError(
            f"files must be a mapping that includes {ONNX_NAME!r} (the network the edge "
            f"worker runs), got keys {sorted(files) if isinstance(files, Mapping) else files!r}"
        )
    for name, source in files.items():
        check_name(name, "file name")
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


def _is_source(value: object) -> bool:
    return isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview)) or callable(
        getattr(value, "read", None)
    )


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


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def write_version_folder(
    root: Path,
    versions_dir: Path,
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
    """Write the version folder ``versions_dir/<version>`` from checked publish arguments.

    The caller holds the registry's writer lock and has checked the arguments; ``root`` is where
    the temporary folder is made (on the same file system as ``versions_dir``).

    Raises
    ------
    RegistryError
        A source cannot be read, an ONNX file fails :func:`~.registry_checks.check_onnx_contract`,
        or the version folder appeared meanwhile; nothing is left behind.
    """
    tmp = root / f"{TMP_PREFIX}{version}-{secrets.token_hex(4)}"
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
            name: check_onnx_contract(
                tmp / name, sample_shape=input_shape, label=f"{name} of version {version!r}"
            ).to_dict()
            for name in sorted(digests)
            if name.endswith(".onnx")
        }
        manifest: dict[str, Any] = {
            "version": version,
            "parent": parent,
            "created": utc_now(),
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
        fsync_dir(tmp)
        final = versions_dir / version
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
    fsync_dir(versions_dir)
    logger.info(
        "published model %s (parent %s, %d training scans, validation SSIM %s)",
        version,
        parent,
        len(training_data),
        validation_ssim,
    )
    return ModelVersion(version=version, path=final, manifest=manifest)

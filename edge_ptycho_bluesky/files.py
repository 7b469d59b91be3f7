"""File plumbing shared by the registry, the engines and the worker: durable atomic writes and
content hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from pathlib import Path

__all__ = ["TMP_PREFIX", "atomic_write", "fsync_dir", "sha256_file"]

#: Prefix of the temporary files :func:`atomic_write` leaves behind only when the process dies
#: mid-write (readers ignore them; the registry's next writer removes them).
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flush a directory entry (new or renamed files) to disk; a no-op where unsupported."""
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably (temp file beside it, fsync,
    ``os.replace``, fsync of the folder): a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{secrets.token_hex(4)}")
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
    fsync_dir(path.parent)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()

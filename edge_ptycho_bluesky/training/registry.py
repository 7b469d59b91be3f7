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

import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import EllipsisType
from typing import Any

try:  # POSIX only; on other systems writers are not serialised across processes.
    import fcntl
except ImportError:  # pragma: no cover - exercised only on Windows
    fcntl = None  # type: ignore[assignment]

from ..files import TMP_PREFIX, atomic_write
from .model_version import (
    CURRENT_NAME,
    DEFAULT_INPUT_SHAPE,
    HISTORY_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    ONNX_NAME,
    TORCH_NAME,
    VERSIONS_DIR,
    ModelVersion,
)
from .registry_checks import (
    NAME_RE,
    RegistryError,
    check_input_shape,
    check_manifest,
    check_name,
    check_onnx_contract,
    check_ssim,
    check_training_data,
    check_version_files,
    shape_text,
)
from .version_folder import (
    FileSource,
    check_file_sources,
    utc_now,
    write_version_folder,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ModelRegistry",
    "WatchToken",
    "import_onnx",
]

_AUTO_RE = re.compile(r"^v(\d+)$")


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
            that fails the checks of :func:`~.registry_checks.check_onnx_contract`. Nothing is
            left behind and ``CURRENT`` is unchanged.
        TypeError
            When a file source is of an unsupported type.
        """
        check_file_sources(files)
        uids = check_training_data(training_data)
        ssim = check_ssim(validation_ssim)
        shape = check_input_shape(input_shape)
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
            check_name(version, "version")

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
                check_name(parent, "parent version")
                if not (self.versions_dir / parent / MANIFEST_NAME).is_file():
                    raise RegistryError(
                        f"parent version {parent!r} does not exist in {self.versions_dir}: pass "
                        f"an existing version (see `edge-ptycho registry list`) or parent=None"
                    )
            mv = write_version_folder(
                self.root,
                self.versions_dir,
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
        now = utc_now()
        pointer = {"version": mv.version, "previous": previous, "deployed": now, "action": action}
        atomic_write(self.current_file, json.dumps(pointer, indent=2).encode() + b"\n")
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
        for entry in sorted(self.root.glob(f"{TMP_PREFIX}*")):
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
            NAME_RE.fullmatch(pointer["version"])
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
        check_name(version, "version")
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
        check_manifest(version, manifest_path, manifest, fix)
        return ModelVersion(version=version, path=path, manifest=manifest)

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
        check_version_files(mv)
        return mv

    def scan(self, *, check_files: bool) -> list[tuple[str, ModelVersion | None, str | None]]:
        """Every version folder as ``(name, version, None)``, or ``(name, None, reason)`` when it
        fails the manifest check (or :meth:`verify` with ``check_files``); sorted by name."""
        results: list[tuple[str, ModelVersion | None, str | None]] = []
        if not self.versions_dir.is_dir():
            return results
        for path in sorted(self.versions_dir.iterdir()):
            if path.name.startswith(".") or not path.is_dir() or not NAME_RE.fullmatch(path.name):
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
        found = [mv for _, mv, _ in self.scan(check_files=check_files) if mv is not None]
        return sorted(found, key=lambda mv: (mv.created, mv.version))

    def problems(self, *, check_files: bool = False) -> dict[str, str]:
        """Version folders that fail the manifest check (or :meth:`verify`), with the reason."""
        return {name: err for name, _, err in self.scan(check_files=check_files) if err}

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

    The file is checked first (:func:`~.registry_checks.check_onnx_contract`: readable, passes
    ``onnx.checker``, one ``(batch, 1, 128, 128)`` float input, outputs of the same shape), so a
    bad file is refused before the registry is touched.

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
    info = check_onnx_contract(path)
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
        shape_text(info.input_shape),
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

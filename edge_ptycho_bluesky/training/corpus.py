"""A growing corpus of labelled scans for continual training.

The paper (Babu, Zhou et al., Nat. Commun. 2023, Methods, "Neural network training") appends
every newly reconstructed scan -- its diffraction patterns paired with 128 x 128 crops of the
iterative phase -- to the existing corpus and trains on the *whole* corpus again. This module
keeps that corpus: scans are added one at a time (a scan uid can be added only once), and the
training arrays are the concatenation of all scans in the order they were added.

The records are :class:`edge_ptycho_bluesky.recon.labels.LabelledScan` objects, and files are
that module's corpus files (:func:`~edge_ptycho_bluesky.recon.labels.save_corpus` /
:func:`~edge_ptycho_bluesky.recon.labels.load_corpus`, NPZ or HDF5, one or several scans per
file). With a ``directory`` the corpus is also kept on disk -- one ``.npz`` per scan plus an
``index.json`` recording the order -- so that a restarted retraining service finds it again
(:meth:`TrainingCorpus.open`) and data-parallel workers can read it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from .. import FRAME_SIZE
from ..files import atomic_write
from ..recon.labels import LabelledScan, concatenate, load_corpus, save_corpus

logger = logging.getLogger(__name__)

__all__ = [
    "INDEX_NAME",
    "TrainingCorpus",
    "check_labelled_scan",
    "load_labelled_files",
]

#: Name of the file that lists a corpus directory's scans in order.
INDEX_NAME = "index.json"
_INDEX_SCHEMA = 1
_SAFE_RE = re.compile(r"[^A-Za-z0-9._-]+")


def check_labelled_scan(scan: object) -> LabelledScan:
    """Check that ``scan`` can be trained on; return it.

    Raises
    ------
    TypeError
        When ``scan`` is not a :class:`~edge_ptycho_bluesky.recon.labels.LabelledScan`.
    ValueError
        When frames are not 128 x 128, the scan is empty, or frames/phases hold NaN/inf.
    """
    if not isinstance(scan, LabelledScan):
        raise TypeError(
            f"expected a recon.labels.LabelledScan, got {type(scan).__name__}; build one with "
            f"edge_ptycho_bluesky.recon.labels.labels_from_reconstruction() or LabelledScan(...)"
        )
    uid = scan.scan_uid
    if scan.frames.shape[1:] != (FRAME_SIZE, FRAME_SIZE):
        raise ValueError(
            f"scan {uid!r}: frames must be (N, {FRAME_SIZE}, {FRAME_SIZE}), got {scan.frames.shape}"
        )
    if len(scan) == 0:
        raise ValueError(f"scan {uid!r} holds no frames")
    for name in ("frames", "phases"):
        arr = getattr(scan, name)
        if not np.isfinite(arr).all():
            raise ValueError(f"scan {uid!r}: {name} contain NaN/inf; drop those frames first")
    return scan


def load_labelled_files(paths: Sequence[str | os.PathLike[str]]) -> list[LabelledScan]:
    """Every scan in the given corpus files (``recon.labels.load_corpus``), in order.

    Raises
    ------
    FileNotFoundError
        When a file does not exist.
    """
    scans: list[LabelledScan] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise FileNotFoundError(f"no labelled corpus file at {path}")
        scans.extend(load_corpus(path))
    return scans


class TrainingCorpus:
    """Labelled scans to train on, growing scan by scan.

    Parameters
    ----------
    scans : iterable of LabelledScan
        Initial scans, added in order.
    directory : path-like, optional
        Keep the corpus on disk as well: every added scan is written there (``NNNN_<uid>.npz``)
        and listed in ``index.json``. :meth:`open` reads such a directory back.

    Examples
    --------
    >>> corpus = TrainingCorpus(directory="corpus")   # doctest: +SKIP
    >>> corpus.add(labelled_scan)                    # doctest: +SKIP
    >>> frames, phases = corpus.arrays()             # doctest: +SKIP
    """

    def __init__(
        self,
        scans: Iterable[LabelledScan] = (),
        *,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        self._scans: list[LabelledScan] = []
        self._files: list[Path] = []
        self._cache: tuple[NDArray[np.float32], NDArray[np.float32]] | None = None
        self.directory = Path(directory) if directory is not None else None
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
        for scan in scans:
            self.add(scan)

    def __repr__(self) -> str:
        where = str(self.directory) if self.directory is not None else None
        return (
            f"{type(self).__name__}(scans={len(self._scans)}, frames={self.n_frames}, "
            f"directory={where!r})"
        )

    def __len__(self) -> int:
        return len(self._scans)

    def __iter__(self) -> Iterator[LabelledScan]:
        return iter(self._scans)

    def __contains__(self, uid: object) -> bool:
        return any(s.scan_uid == uid for s in self._scans)

    @property
    def scans(self) -> tuple[LabelledScan, ...]:
        """The scans, in the order they were added."""
        return tuple(self._scans)

    @property
    def uids(self) -> list[str]:
        """Scan uids in the order they were added (the registry's ``training_data``)."""
        return [s.scan_uid for s in self._scans]

    @property
    def n_frames(self) -> int:
        """Frames (training pairs) in the whole corpus."""
        return sum(len(s) for s in self._scans)

    @property
    def files(self) -> list[Path]:
        """Files of the scans on disk (only with a ``directory``), in order."""
        return list(self._files)

    def add(self, scan: LabelledScan) -> None:
        """Append a labelled scan (and write it to the directory, if any).

        Raises
        ------
        ValueError
            When a scan with the same uid is already in the corpus (training twice on one scan
            would weight it double), or the scan is malformed (:func:`check_labelled_scan`).
        TypeError
            When ``scan`` is not a ``LabelledScan``.
        """
        check_labelled_scan(scan)
        if scan.scan_uid in self:
            raise ValueError(
                f"scan {scan.scan_uid!r} is already in the corpus; each scan is added once "
                f"(label it under a new uid to add it again)"
            )
        if self.directory is not None:
            name = f"{len(self._scans):04d}_{_SAFE_RE.sub('_', scan.scan_uid)[:80]}.npz"
            self._files.append(save_corpus(self.directory / name, scan))
        self._scans.append(scan)
        self._cache = None
        if self.directory is not None:
            self._write_index()
        logger.info(
            "corpus: added scan %s (%d frames); now %d scans, %d frames",
            scan.scan_uid, len(scan), len(self._scans), self.n_frames,
        )

    def extend(self, scans: Iterable[LabelledScan]) -> None:
        """:meth:`add` each scan in order."""
        for scan in scans:
            self.add(scan)

    def arrays(self) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
        """All frames and label phases, concatenated in the order the scans were added.

        Returns
        -------
        frames : (N, 128, 128) float32
            Counts as stored (the trainer applies the model's ``preprocess``).
        phases : (N, 128, 128) float32
            Label phases in radians.

        Raises
        ------
        ValueError
            When the corpus is empty.
        """
        if not self._scans:
            raise ValueError("the corpus is empty: add labelled scans first")
        if self._cache is None:
            frames, phases, _ = concatenate(self._scans)
            self._cache = (frames, phases)
        return self._cache

    def _write_index(self) -> None:
        assert self.directory is not None
        index = {
            "schema": _INDEX_SCHEMA,
            "scans": [
                {"scan_uid": s.scan_uid, "file": f.name, "n_frames": len(s)}
                for s, f in zip(self._scans, self._files, strict=True)
            ],
        }
        atomic_write(self.directory / INDEX_NAME, json.dumps(index, indent=1).encode("utf-8"))

    @classmethod
    def from_files(cls, paths: Sequence[str | os.PathLike[str]]) -> TrainingCorpus:
        """An in-memory corpus of every scan in the given corpus files, in order."""
        return cls(load_labelled_files(paths))

    @classmethod
    def open(cls, directory: str | os.PathLike[str]) -> TrainingCorpus:
        """Read back a corpus kept in ``directory``; new scans are added there too.

        Raises
        ------
        FileNotFoundError
            When the directory has no ``index.json``.
        ValueError
            When the index is malformed or disagrees with the files.
        """
        directory = Path(directory)
        index_path = directory / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a corpus directory (no {INDEX_NAME}); create one with "
                f"TrainingCorpus(directory=...)"
            )
        try:
            entries = json.loads(index_path.read_text(encoding="utf-8"))["scans"]
            names = [(str(e["scan_uid"]), str(e["file"])) for e in entries]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path} is not a valid corpus index: {exc}") from exc
        corpus = cls()
        corpus.directory = directory
        for uid, name in names:
            path = directory / name
            found = load_labelled_files([path])
            if [s.scan_uid for s in found] != [uid]:
                raise ValueError(
                    f"{path} holds scans {[s.scan_uid for s in found]} but {index_path} lists "
                    f"{uid!r}"
                )
            corpus._scans.append(check_labelled_scan(found[0]))
            corpus._files.append(path)
        return corpus

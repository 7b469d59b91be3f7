"""Training labels from an iterative reconstruction: the phase under every beam position.

PtychoNN learns the map from one diffraction frame to the phase of the sample *in the probe's
frame*: a 128 x 128 patch whose pixel ``(i, j)`` is the object at ``position + (i, j)``, where
``position`` is the frame's (sub-pixel) top-left window corner (the convention of the forward model,
where the probe sits at the same place in every window). :func:`extract_labels` cuts those patches
from a reconstruction with bilinear interpolation, and :func:`labels_from_reconstruction` pairs them
with the frames as a :class:`LabelledScan`, the training-corpus record.

Phase reference
---------------
A reconstruction's phase is defined up to a constant. Every patch of a scan is referred to the same
constant: the **median phase of the object over the scanned region is set to 0** (robust to the
scan's content; computed on the complex object around its circular mean, so a phase that wraps at
+-pi does not bias it). Patches are then ``angle(O(position + (i, j)) * exp(-i ref))`` in
``(-pi, pi]``. Interpolating the complex object rather than the wrapped phase keeps pixels next to a
phase wrap correct.

Storage
-------
:func:`save_corpus` / :func:`load_corpus` write one or several scans to NPZ (``.npz``, loaded with
``allow_pickle=False``) or HDF5 (``.h5``/``.hdf5``); :func:`concatenate` stacks scans for training.
:meth:`LabelledScan.to_arrays` gives the arrays and a JSON-ready metadata dict for storing the labels
in Tiled next to the raw run (linked by ``scan_uid``); :func:`store_labels` emits them as a derived
Bluesky run (``purpose="rpie_labels"``, ``original_run_uid`` = the raw run) through a TiledWriter and
:func:`find_labels` reads the newest one back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import ArrayLike, NDArray

from .. import FRAME_SIZE
from ..runs import read_array

if TYPE_CHECKING:
    from .rpie_options import RPIEResult

__all__ = [
    "LabelledScan",
    "concatenate",
    "extract_labels",
    "labels_from_reconstruction",
    "LABELS_PURPOSE",
    "find_labels",
    "load_corpus",
    "phase_reference",
    "save_corpus",
    "store_labels",
]

logger = logging.getLogger(__name__)

#: Patches processed per vectorised chunk (bounds temporary memory).
_CHUNK = 128
#: Corpus file format version (stored in the file).
CORPUS_FORMAT = 1
#: ``purpose`` of the derived Bluesky run that stores a scan's labels in Tiled.
LABELS_PURPOSE = "rpie_labels"


@dataclass(frozen=True, eq=False)
class LabelledScan:
    """Diffraction frames paired with their phase labels: one scan of the training corpus.

    Attributes
    ----------
    frames : (N, 128, 128) float32
        fftshifted diffraction intensities (counts), as the detector gave them.
    phases : (N, 128, 128) float32
        Phase labels in radians (see the module notes for the reference).
    positions : (N, 2) float64
        Window positions (row, col) in object pixels the labels were cut at.
    scan_uid : str
        The raw run's uid (Bluesky start uid), linking the labels to the raw data.
    pixel_size_nm : float
        Object pixel size.
    phase_reference : float
        The phase (radians) that was subtracted (the median over the scanned region).
    metadata : mapping
        JSON-serialisable provenance (solver, iterations, final error, ...).
    """

    frames: NDArray[np.float32]
    phases: NDArray[np.float32]
    positions: NDArray[np.float64]
    scan_uid: str
    pixel_size_nm: float
    phase_reference: float = 0.0
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        frames = np.asarray(self.frames)
        phases = np.asarray(self.phases)
        positions = np.asarray(self.positions)
        if frames.ndim != 3 or phases.shape != frames.shape:
            raise ValueError(f"frames and phases must both be (N, H, W), got {frames.shape} and {phases.shape}")
        if positions.shape != (len(frames), 2):
            raise ValueError(f"positions must be ({len(frames)}, 2), got {positions.shape}")
        if not isinstance(self.scan_uid, str) or not self.scan_uid:
            raise ValueError(f"scan_uid must be a non-empty string, got {self.scan_uid!r}")
        if not self.pixel_size_nm > 0:
            raise ValueError(f"pixel_size_nm must be positive, got {self.pixel_size_nm!r}")
        try:
            json.dumps(dict(self.metadata))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable: {exc}") from exc
        object.__setattr__(self, "frames", frames.astype(np.float32, copy=False))
        object.__setattr__(self, "phases", phases.astype(np.float32, copy=False))
        object.__setattr__(self, "positions", positions.astype(np.float64, copy=False))

    def __len__(self) -> int:
        return len(self.frames)

    def to_arrays(self) -> tuple[dict[str, NDArray[Any]], dict[str, Any]]:
        """Arrays and a JSON-ready metadata dict, e.g. for writing into Tiled beside the raw run.

        Returns
        -------
        arrays : dict
            ``{"frames": (N, H, W) float32, "phases": (N, H, W) float32, "positions": (N, 2) float64}``
        metadata : dict
            ``scan_uid``, ``pixel_size_nm``, ``phase_reference``, ``phase_reference_method``,
            ``num_frames``, ``patch_shape``, ``corpus_format`` and the provenance ``metadata``.
        """
        arrays = {"frames": self.frames, "phases": self.phases, "positions": self.positions}
        meta = {
            "scan_uid": self.scan_uid,
            "pixel_size_nm": float(self.pixel_size_nm),
            "phase_reference": float(self.phase_reference),
            "phase_reference_method": "median over the scanned region set to 0",
            "num_frames": len(self),
            "patch_shape": list(self.phases.shape[1:]),
            "corpus_format": CORPUS_FORMAT,
            "metadata": dict(self.metadata),
        }
        return arrays, meta

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, ArrayLike], metadata: Mapping[str, Any]) -> LabelledScan:
        """Inverse of :meth:`to_arrays`."""
        missing = {"frames", "phases", "positions"} - set(arrays)
        if missing:
            raise KeyError(f"labelled-scan arrays lack {sorted(missing)}")
        return cls(
            frames=np.asarray(arrays["frames"]),
            phases=np.asarray(arrays["phases"]),
            positions=np.asarray(arrays["positions"]),
            scan_uid=str(metadata["scan_uid"]),
            pixel_size_nm=float(metadata["pixel_size_nm"]),
            phase_reference=float(metadata.get("phase_reference", 0.0)),
            metadata=dict(metadata.get("metadata", {})),
        )


# --------------------------------------------------------------------------------------------
# Extraction
# --------------------------------------------------------------------------------------------


def phase_reference(image: ArrayLike, mask: ArrayLike) -> float:
    """The median phase of ``image`` over ``mask`` (radians, in (-pi, pi]).

    Parameters
    ----------
    image : (H, W) complex or float
        Complex object (preferred) or phase image.
    mask : (H, W) bool
        The scanned region.
    """
    img = np.asarray(image)
    m = np.asarray(mask, dtype=bool)
    if m.shape != img.shape:
        raise ValueError(f"mask has shape {m.shape} but the image is {img.shape}")
    if not m.any():
        raise ValueError("the mask selects no pixel: cannot compute a phase reference")
    obj = img if np.iscomplexobj(img) else np.exp(1j * img.astype(np.float64))
    values = obj[m]
    centre = np.angle(np.sum(values / np.maximum(np.abs(values), 1e-30)))
    rel = np.angle(values * np.exp(-1j * centre))
    return float(np.angle(np.exp(1j * (centre + np.median(rel)))))


def _coverage_mask(shape: tuple[int, int], positions: NDArray[np.float64], n: int) -> NDArray[np.bool_]:
    mask = np.zeros(shape, dtype=bool)
    corners = np.floor(positions).astype(int)
    for r, c in corners:  # cheap: one slice per window, only to build a mask
        mask[max(r, 0):r + n + 1, max(c, 0):c + n + 1] = True
    return mask


def extract_labels(
    image: ArrayLike,
    positions: ArrayLike,
    *,
    patch_size: int = FRAME_SIZE,
    mask: ArrayLike | None = None,
    reference: str | float = "median",
) -> tuple[NDArray[np.float32], float]:
    """Phase patches of ``patch_size`` pixels at every (sub-pixel) window position.

    Patch ``k`` pixel ``(i, j)`` is the image bilinearly interpolated at
    ``positions[k] + (i, j)`` (identical to ``scipy.ndimage.map_coordinates(..., order=1)``, computed
    as a weighted sum of four whole-pixel windows).

    Parameters
    ----------
    image : (H, W) complex or float
        The reconstructed object (complex, preferred: interpolated as a complex field) or its phase.
    positions : (N, 2) float
        Top-left window corners (row, col); every window plus one pixel must lie in the image.
    patch_size : int
        Patch edge (the frame size).
    mask : (H, W) bool, optional
        The scanned region for the reference; default: the union of the windows.
    reference : {"median", "none"} or float
        ``"median"``: subtract the median phase over ``mask``; ``"none"``: subtract nothing; a
        number: subtract that phase.

    Returns
    -------
    phases : (N, patch_size, patch_size) float32
        Labels in (-pi, pi].
    reference : float
        The subtracted phase.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {img.shape}")
    pos = np.asarray(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != 2 or not len(pos):
        raise ValueError(f"positions must have shape (N, 2) with N >= 1, got {pos.shape}")
    if not np.isfinite(pos).all():
        raise ValueError("positions contain NaN/inf")
    n = int(patch_size)
    corner = np.floor(pos).astype(np.int64)
    if (corner < 0).any() or (corner[:, 0] + n + 1 > img.shape[0]).any() or (corner[:, 1] + n + 1 > img.shape[1]).any():
        raise ValueError(f"label windows ({n} px + 1) at positions {pos.min(0)} to {pos.max(0)} reach outside "
                         f"the image {img.shape}")
    complex_input = np.iscomplexobj(img)
    field_img = img.astype(np.complex64) if complex_input else np.exp(1j * img.astype(np.float32)).astype(np.complex64)
    if isinstance(reference, str):
        if reference == "median":
            region = _coverage_mask(img.shape, pos, n) if mask is None else np.asarray(mask, dtype=bool)
            ref = phase_reference(field_img, region)
        elif reference == "none":
            ref = 0.0
        else:
            raise ValueError(f"reference must be 'median', 'none' or a number, got {reference!r}")
    else:
        ref = float(reference)
    rotated = field_img * np.complex64(np.exp(-1j * ref))
    windows = sliding_window_view(rotated, (n + 1, n + 1))  # view, no copy
    frac = (pos - corner).astype(np.float32)
    out = np.empty((len(pos), n, n), dtype=np.float32)
    for start in range(0, len(pos), _CHUNK):
        c = corner[start:start + _CHUNK]
        fr = frac[start:start + _CHUNK, 0, None, None]
        fc = frac[start:start + _CHUNK, 1, None, None]
        win = windows[c[:, 0], c[:, 1]]  # (B, n+1, n+1)
        val = ((1 - fr) * (1 - fc) * win[:, :n, :n] + (1 - fr) * fc * win[:, :n, 1:]
               + fr * (1 - fc) * win[:, 1:, :n] + fr * fc * win[:, 1:, 1:])
        out[start:start + _CHUNK] = np.angle(val)
    return out, ref


def labels_from_reconstruction(
    result: RPIEResult,
    frames: ArrayLike,
    *,
    scan_uid: str,
    positions: ArrayLike | None = None,
    mask_threshold: float = 0.1,
    metadata: Mapping[str, Any] | None = None,
) -> LabelledScan:
    """Pair a scan's frames with phase labels cut from its reconstruction.

    Parameters
    ----------
    result : RPIEResult
        The reconstruction (its ``object``, ``positions``, ``illumination``, ``pixel_size_nm``).
    frames : (N, 128, 128)
        The frames that were reconstructed, in the same order as ``result.positions``.
    scan_uid : str
        The raw run's uid.
    positions : (N, 2) float, optional
        Where to cut the labels (default ``result.positions``).
    mask_threshold : float
        The scanned region for the phase reference: illumination above this fraction of its maximum.
    metadata : mapping, optional
        Extra provenance (merged over the solver's).
    """
    frames_arr = np.asarray(frames)
    pos = np.asarray(result.positions if positions is None else positions, dtype=np.float64)
    if len(frames_arr) != len(pos):
        raise ValueError(f"{len(frames_arr)} frames but {len(pos)} positions")
    if result.pixel_size_nm is None:
        raise ValueError("the reconstruction has no pixel_size_nm; pass pixel_size_nm to rpie()")
    n = frames_arr.shape[-1]
    mask = result.scanned_mask(mask_threshold) if result.illumination.any() else None
    phases, ref = extract_labels(result.object, pos, patch_size=n, mask=mask)
    meta: dict[str, Any] = {
        "solver": "edge_ptycho_bluesky.recon.rpie",
        "iterations": int(result.iterations),
        "final_error": float(result.errors[-1]) if len(result.errors) else None,
        "alpha": result.options.alpha,
        "probe_modes": result.options.probe_modes,
    }
    meta.update(dict(metadata or {}))
    return LabelledScan(frames=frames_arr.astype(np.float32), phases=phases, positions=pos,
                        scan_uid=scan_uid, pixel_size_nm=float(result.pixel_size_nm),
                        phase_reference=ref, metadata=meta)


# --------------------------------------------------------------------------------------------
# Corpus files
# --------------------------------------------------------------------------------------------


def concatenate(scans: Sequence[LabelledScan]) -> tuple[NDArray[np.float32], NDArray[np.float32], NDArray[np.int64]]:
    """Stack several scans for training.

    Returns
    -------
    frames : (sum N, H, W) float32
    phases : (sum N, H, W) float32
    scan_index : (sum N,) int64
        Index into ``scans`` of every row.
    """
    scans = list(scans)
    if not scans:
        raise ValueError("no scans to concatenate")
    shapes = {s.frames.shape[1:] for s in scans}
    if len(shapes) != 1:
        raise ValueError(f"scans have different frame shapes {sorted(shapes)}")
    frames = np.concatenate([s.frames for s in scans])
    phases = np.concatenate([s.phases for s in scans])
    index = np.concatenate([np.full(len(s), i, dtype=np.int64) for i, s in enumerate(scans)])
    return frames, phases, index


def save_corpus(path: str | Path, scans: LabelledScan | Sequence[LabelledScan]) -> Path:
    """Write scans to ``path``: NPZ for ``.npz``, HDF5 for ``.h5``/``.hdf5``. Returns the path.

    Layout: concatenated ``frames``, ``phases``, ``positions`` and ``scan_index`` (row -> scan), and
    per scan ``scan_uids``, ``pixel_size_nm``, ``phase_reference``, ``metadata_json`` (strings and
    numbers only: the NPZ loads with ``allow_pickle=False``).
    """
    items = [scans] if isinstance(scans, LabelledScan) else list(scans)
    if not items:
        raise ValueError("no scans to save")
    path = Path(path)
    frames, phases, index = concatenate(items)
    columns: dict[str, NDArray[Any]] = {
        "frames": frames,
        "phases": phases,
        "positions": np.concatenate([s.positions for s in items]),
        "scan_index": index,
        "scan_uids": np.array([s.scan_uid for s in items], dtype=np.str_),
        "pixel_size_nm": np.array([s.pixel_size_nm for s in items], dtype=np.float64),
        "phase_reference": np.array([s.phase_reference for s in items], dtype=np.float64),
        "metadata_json": np.array([json.dumps(dict(s.metadata)) for s in items], dtype=np.str_),
        "corpus_format": np.array(CORPUS_FORMAT),
    }
    suffix = path.suffix.lower()
    if suffix == ".npz":
        np.savez(path, **columns)
    elif suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "w") as f:
            for key, value in columns.items():
                if value.dtype.kind == "U":
                    f.create_dataset(key, data=value.astype(object), dtype=h5py.string_dtype())
                elif value.ndim == 3:
                    f.create_dataset(key, data=value, chunks=(1,) + value.shape[1:])
                else:
                    f.create_dataset(key, data=value)
    else:
        raise ValueError(f"corpus path must end in .npz, .h5 or .hdf5, got {path.name!r}")
    logger.info("saved %d scans (%d frames) to %s", len(items), len(frames), path)
    return path


def load_corpus(path: str | Path) -> list[LabelledScan]:
    """Read the scans written by :func:`save_corpus`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    elif suffix in (".h5", ".hdf5"):
        import h5py

        with h5py.File(path, "r") as f:
            data = {}
            for key in f:
                value = f[key][()]
                if isinstance(value, np.ndarray) and value.dtype == object:
                    value = np.array([v.decode() if isinstance(v, bytes) else str(v) for v in value])
                data[key] = np.asarray(value)
    else:
        raise ValueError(f"corpus path must end in .npz, .h5 or .hdf5, got {path.name!r}")
    required = {"frames", "phases", "positions", "scan_index", "scan_uids", "pixel_size_nm",
                "phase_reference", "metadata_json"}
    missing = required - set(data)
    if missing:
        raise ValueError(f"{path} is not a labelled corpus: missing {sorted(missing)}")
    scans = []
    for i, uid in enumerate(data["scan_uids"]):
        rows = data["scan_index"] == i
        scans.append(LabelledScan(
            frames=data["frames"][rows], phases=data["phases"][rows], positions=data["positions"][rows],
            scan_uid=str(uid), pixel_size_nm=float(data["pixel_size_nm"][i]),
            phase_reference=float(data["phase_reference"][i]),
            metadata=json.loads(str(data["metadata_json"][i]))))
    return scans


# --------------------------------------------------------------------------------------------
# Tiled (derived runs)
# --------------------------------------------------------------------------------------------


def store_labels(callback: Any, labels: LabelledScan, write_dir: str | Path) -> str:
    """Store ``labels`` as a derived run of ``labels.scan_uid``; returns the derived run's uid.

    Parameters
    ----------
    callback
        Document consumer, e.g. a TiledWriter (see :func:`edge_ptycho_bluesky.storage.make_tiled_writer`).
    labels : LabelledScan
        Frames ``(N, H, W)``, phases ``(N, H, W)`` and positions ``(N, 2)`` go to the stream
        ``primary`` (HDF5 under ``write_dir``, which Tiled must be able to read); the metadata of
        :meth:`LabelledScan.to_arrays` goes to the start document under ``labels``.
    write_dir
        Directory for the HDF5 file (e.g. ``StorageConfig.frames_dir``).
    """
    from ..derived import emit_derived_run

    if not isinstance(labels, LabelledScan):
        raise TypeError(f"labels must be a LabelledScan, got {type(labels).__name__}")
    arrays, meta = labels.to_arrays()
    return emit_derived_run(callback, original_run_uid=labels.scan_uid, purpose=LABELS_PURPOSE,
                            write_dir=write_dir, streams={"primary": arrays}, md={"labels": meta})


def find_labels(client: Any, original_run_uid: str) -> LabelledScan:
    """The newest labels stored by :func:`store_labels` for the raw run ``original_run_uid``.

    Raises
    ------
    KeyError
        When no ``rpie_labels`` run links to that uid.
    """
    from ..derived import find_derived_runs

    runs = find_derived_runs(client, original_run_uid, LABELS_PURPOSE)
    if not runs:
        raise KeyError(f"no {LABELS_PURPOSE!r} run for raw run {original_run_uid!r}; reconstruct it and "
                       "store its labels with store_labels() first")
    run = runs[-1]
    stream = run["primary"]
    arrays = {key: read_array(stream, key) for key in ("frames", "phases", "positions")}
    return LabelledScan.from_arrays(arrays, run.metadata["start"]["labels"])

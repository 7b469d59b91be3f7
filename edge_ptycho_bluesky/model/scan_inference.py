"""Phase-retrieve a whole stored scan with a registry model, stitch it, write it to CXI.

The core of ``edge-ptycho infer`` (:mod:`~edge_ptycho_bluesky.model.infer_cli`). ``INPUT`` is a CXI
file (:func:`edge_ptycho_bluesky.io.cxi.read_cxi`) or the uid of a run in the configured Tiled
catalog (:func:`edge_ptycho_bluesky.runs.read_scan`). Every frame is inferred with the registry's
deployed model (or a chosen version), after its checksums and ONNX graph have been verified
(:meth:`ModelRegistry.verify`), on the input its
:class:`~edge_ptycho_bluesky.model.contract.InputContract` prepares (the version's count scale and
training exposure). Fixed-batch models such as the paper's ``ptychoNN_8.onnx`` work for any number
of frames (the engine pads the last batch).

The per-frame phase patches are stitched onto the object grid
(:func:`edge_ptycho_bluesky.stitching.stitch`), weighted by the probe amplitude when the input
carries a probe, and written to ``OUT.cxi`` together with the scan:

==================================  ==========================================================
``/entry_1/image_1/data``           stitched phase ``(H, W)`` float32 (radians; 0 where no
                                    frame contributed, see ``coverage``)
``/entry_1/image_1/coverage``       summed stitching weights ``(H, W)`` float32
``/entry_1/image_1/patches``        per-frame phase ``(N, 128, 128)`` float32
``/entry_1/image_1/positions``      patch top-left corners ``(N, 2)`` (row, col) in image pixels
``/entry_1/image_1/x_pixel_size``   object pixel (m), and ``y_pixel_size``
``/entry_1/image_1/data_type``      ``"phase"``
==================================  ==========================================================

Attributes of ``/entry_1/image_1``: ``model_version``, ``model_sha256``, ``registry``,
``engine``, ``count_scale``, ``source`` (input path or uid) and ``n_frames``.

With a refinement (:func:`refine_result`, ``edge-ptycho infer --refine SECONDS``) the file also holds
``/entry_1/image_2/data``: the AI-seeded rPIE phase (float32 radians, on the grid of
``image_1``; see :mod:`edge_ptycho_bluesky.recon.streaming`), with attributes ``refine_seconds``,
``sweeps``, ``frame_updates_per_s``, ``probe_source`` and ``data_type`` ``"phase"``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from numpy.typing import NDArray

from .. import FRAME_SIZE
from ..io.cxi import PtychoScan, read_cxi, write_cxi
from ..recon.streaming import RefinedImage, RefineOptions, refine_scan
from ..runs import read_scan
from ..stitching import stitch
from ..storage import StorageConfig, connect, get_run
from ..training.registry import ModelRegistry
from ..training.registry_checks import RegistryError
from .contract import InputContract
from .engines import load_engine

logger = logging.getLogger(__name__)

__all__ = ["FILE_SUFFIXES", "InferenceResult", "LoadedScan", "infer_scan", "load_scan", "refine_result",
           "refinement_probe", "write_result"]

#: Suffixes treated as file paths (never as run uids) when the file does not exist.
FILE_SUFFIXES = (".cxi", ".h5", ".hdf5", ".nxs")


@dataclass(frozen=True)
class LoadedScan:
    """A scan ready for inference.

    Attributes
    ----------
    scan : PtychoScan
        Frames, physical positions, geometry, probe, uid (written back to the output file).
    positions : (N, 2) float64
        Window top-left corners (row, col) in object pixels.
    object_shape : (int, int)
        Object grid that holds every window.
    source : str
        The input path or run uid.
    """

    scan: PtychoScan
    positions: NDArray[np.float64]
    object_shape: tuple[int, int]
    source: str


@dataclass(frozen=True)
class InferenceResult:
    """Output of :func:`infer_scan`.

    Attributes
    ----------
    patches : (N, 128, 128) float32
        Phase per frame (radians).
    image : (H, W) float32
        Stitched phase; ``fill`` where ``coverage == 0``.
    coverage : (H, W) float32
        Summed stitching weights.
    positions : (N, 2) float64
        Patch corners (row, col) in ``image`` pixels.
    version : str
        Registry version used.
    sha256 : str
        sha256 of the version's ``model.onnx``.
    engine : str
        Engine name (``onnxruntime-cpu``, ``torch-cpu``, ...).
    count_scale : float or None
        Input scale given to :func:`~edge_ptycho_bluesky.model.preprocess`.
    seconds : float
        Wall time of the inference alone.
    """

    patches: NDArray[np.float32]
    image: NDArray[np.float32]
    coverage: NDArray[np.float32]
    positions: NDArray[np.float64]
    version: str
    sha256: str
    engine: str
    count_scale: float | None
    seconds: float


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------


def _looks_like_file(text: str) -> bool:
    return Path(text).suffix.lower() in FILE_SUFFIXES or "/" in text or "\\" in text


def load_scan(source: str | Path) -> LoadedScan:
    """Read a scan from a CXI file, or from the configured Tiled catalog by run uid.

    Parameters
    ----------
    source : str or Path
        An existing file (read as CXI); otherwise a run uid (or unique uid prefix).

    Raises
    ------
    FileNotFoundError
        ``source`` looks like a file path (has a CXI/HDF5 suffix or a ``/``) but does not exist.
    ValueError
        The file is not a usable CXI scan, or the run lacks the ``edge_ptycho`` metadata.
    KeyError
        No run with that uid in the catalog.
    """
    text = str(source)
    path = Path(text)
    if path.is_file():
        scan = read_cxi(path)
        positions, shape = scan.to_window_positions()
        return LoadedScan(scan=scan, positions=positions, object_shape=shape, source=str(path))
    if path.exists():
        raise ValueError(f"{path} is not a file; give a CXI file or a run uid")
    if _looks_like_file(text):
        raise FileNotFoundError(f"no scan file at {path} (and it does not look like a run uid)")
    return _load_from_tiled(text)


def _load_from_tiled(uid: str) -> LoadedScan:
    scan = read_scan(get_run(connect(StorageConfig.from_env()), uid))
    positions, shape = scan.to_window_positions()
    return LoadedScan(scan=scan, positions=positions, object_shape=shape, source=uid)


# --------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------


def _probe_weight(probe: NDArray[np.complexfloating] | None, patch_shape: tuple[int, int]) -> NDArray[np.float32] | None:
    """Probe amplitude (all modes) normalised to a maximum of 1, or None."""
    if probe is None:
        return None
    p = np.asarray(probe)
    amp = np.sqrt(np.sum(np.abs(p.reshape(-1, *p.shape[-2:])) ** 2, axis=0))
    if amp.shape != patch_shape or not np.isfinite(amp).all() or amp.max() <= 0:
        return None
    return (amp / amp.max()).astype(np.float32)


def infer_scan(
    loaded: LoadedScan,
    registry: str | Path,
    *,
    version: str | None = None,
    engine: str = "auto",
    batch_size: int = 64,
    scale: float | None = None,
    weight: str = "probe",
    fill: float = 0.0,
) -> InferenceResult:
    """Infer and stitch every frame of a scan with a registry model.

    Parameters
    ----------
    loaded : LoadedScan
        From :func:`load_scan`.
    registry : path-like
        Model registry folder.
    version : str or None
        Version to use; None: the deployed one. Either way its files are verified first.
    engine : {"auto", "onnxruntime", "torch", "tensorrt"}
        Inference engine (see :func:`~edge_ptycho_bluesky.model.engines.load_engine`).
    batch_size : int
        Frames handed to the engine at a time (a fixed-batch model pads the last chunk).
    scale : float or None
        Input count scale; None: the scale recorded in the version's manifest (if any). Frames
        are prepared by the version's :class:`~edge_ptycho_bluesky.model.contract.InputContract`
        (scale, and the training exposure against the scan's), as the edge worker prepares them.
    weight : {"probe", "uniform"}
        Stitching weight: the probe amplitude (when the scan has a probe) or a plain average.
    fill : float
        Stitched value where no frame contributed.

    Raises
    ------
    RegistryError
        No such registry or version, nothing deployed, or damaged files.
    ValueError
        Bad options or frames.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if weight not in ("probe", "uniform"):
        raise ValueError(f"weight must be 'probe' or 'uniform', got {weight!r}")
    reg = ModelRegistry(registry, create=False)
    if version is None:
        mv = reg.current(verify=True)
        if mv is None:
            raise RegistryError(f"no model is deployed in {reg.root}: deploy one "
                                "(`edge-ptycho registry deploy V`) or pass --version")
    else:
        mv = reg.verify(version)
    contract = InputContract.from_version(mv, scale=scale)
    eng = load_engine(mv.onnx_path, engine)
    frames = loaded.scan.frames
    n = len(frames)
    out = np.empty((n, FRAME_SIZE, FRAME_SIZE), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        x = contract.prepare(frames[i:i + batch_size], loaded.scan.exposure_s)
        out[i:i + len(x)] = eng.infer(x)
    seconds = time.perf_counter() - t0
    logger.info("%s %s: %d frames in %.2f s (%.0f frames/s)", mv.version, eng.name, n, seconds,
                n / max(seconds, 1e-9))
    h = loaded.scan.frames.shape[-1]
    w = _probe_weight(loaded.scan.probe, out.shape[1:]) if weight == "probe" and h == out.shape[-1] else None
    # Binning detector frames by f keeps the object pixel (lambda z / (N p)) and shrinks the
    # field of view to the central N/f pixels of the window: the patch sits at its centre.
    positions = loaded.positions + (h - out.shape[-1]) / 2
    image, coverage = stitch(out, positions, shape=loaded.object_shape, weight=w, fill=fill)
    return InferenceResult(patches=out, image=image, coverage=coverage, positions=positions,
                           version=mv.version, sha256=str(mv.manifest["files"]["model.onnx"]),
                           engine=eng.name, count_scale=contract.scale, seconds=seconds)


def refinement_probe(loaded: LoadedScan, registry: str | Path, version: str,
                     probe_file: str | Path | None = None) -> tuple[NDArray[np.complex64], str]:
    """The probe for a refinement and where it came from: ``probe_file`` (a ``.npy``), else the
    scan's own (a CXI illumination or the run's metadata), else the model version's ``probe.npy``.

    Raises
    ------
    ValueError
        No probe anywhere (the message says how to give one), or one that does not match the frames.
    """
    n = loaded.scan.frames.shape[-1]
    if probe_file is not None:
        probe, source = np.load(probe_file), str(probe_file)
    elif loaded.scan.probe is not None:
        probe, source = loaded.scan.probe, "scan"
    else:
        probe = ModelRegistry(registry, create=False).get(version).load_probe()
        if probe is None:
            raise ValueError(
                "no probe to refine with: the scan records none (a CXI file's "
                "/entry_1/instrument_1/source_1/illumination, or the run's probe) and model version "
                f"{version} has no probe.npy; pass --probe FILE.npy (e.g. the probe of an rPIE "
                "reconstruction: `edge-ptycho recon` writes it as the output's illumination)")
        source = f"model {version}"
    probe = np.asarray(probe)
    if probe.ndim == 3:
        probe = probe[0]
    if probe.shape != (n, n) or not np.isfinite(probe).all():
        raise ValueError(f"the probe from {source} is {probe.shape} (or not finite); the frames are {n} x {n}")
    return probe.astype(np.complex64), source


def refine_result(loaded: LoadedScan, result: InferenceResult, probe: NDArray[np.complex64], *,
                  seconds: float, options: RefineOptions | None = None) -> RefinedImage:
    """AI-seeded rPIE of the whole scan for ``seconds``, on the grid of ``result.image``."""
    beam_px = None
    if loaded.scan.beam_diameter_nm is not None:
        beam_px = float(loaded.scan.beam_diameter_nm) / loaded.scan.geometry.pixel_size_nm
    return refine_scan(loaded.scan.frames, loaded.positions, result.patches, result.image.shape, probe,
                       seconds=seconds, beam_diameter_px=beam_px, options=options)


def write_result(path: str | Path, loaded: LoadedScan, result: InferenceResult, *, registry: str | Path = "",
                 refined: RefinedImage | None = None, probe_source: str = "") -> Path:
    """Write the scan and the AI phase (and the refined phase, when given; see the module notes
    for the layout) to a new CXI file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write_cxi(tmp, loaded.scan)
    pixel_m = loaded.scan.pixel_size_m
    with h5py.File(tmp, "a") as f:
        image = f.create_group("entry_1/image_1")
        image.create_dataset("data", data=result.image)
        image.create_dataset("coverage", data=result.coverage)
        image.create_dataset("patches", data=result.patches, chunks=(1,) + result.patches.shape[1:])
        image.create_dataset("positions", data=result.positions)
        image.create_dataset("x_pixel_size", data=pixel_m)
        image.create_dataset("y_pixel_size", data=pixel_m)
        image.create_dataset("data_type", data="phase")
        attrs = {
            "model_version": result.version,
            "model_sha256": result.sha256,
            "registry": str(registry),
            "engine": result.engine,
            "count_scale": np.nan if result.count_scale is None else float(result.count_scale),
            "source": loaded.source,
            "n_frames": len(result.patches),
        }
        for key, value in attrs.items():
            image.attrs[key] = value
        if refined is not None:
            image2 = f.create_group("entry_1/image_2")
            image2.create_dataset("data", data=refined.phase.astype(np.float32))
            image2.create_dataset("x_pixel_size", data=pixel_m)
            image2.create_dataset("y_pixel_size", data=pixel_m)
            image2.create_dataset("data_type", data="phase")
            image2.attrs["refine_seconds"] = refined.seconds
            image2.attrs["sweeps"] = refined.sweeps
            image2.attrs["frame_updates_per_s"] = refined.frame_updates_per_s
            image2.attrs["probe_source"] = probe_source
    tmp.replace(path)
    logger.info("wrote %s (%d patches, image %s, model %s)", path, len(result.patches),
                result.image.shape, result.version)
    return path

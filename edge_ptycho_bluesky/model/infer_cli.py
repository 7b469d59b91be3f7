"""``edge-ptycho infer``: phase-retrieve a stored scan with a registry model and stitch it.

::

    edge-ptycho infer INPUT --registry DIR --out OUT.cxi [--version V]
                      [--engine auto|onnxruntime|torch|tensorrt] [--batch-size 64]

``INPUT`` is a CXI file (:func:`edge_ptycho_bluesky.io.cxi.read_cxi`) or the uid of a run in
the configured Tiled catalog (:meth:`edge_ptycho_bluesky.storage.StorageConfig.from_env`). Every
frame is inferred with the registry's deployed model (or ``--version``), after its checksums and
ONNX graph have been verified (:meth:`ModelRegistry.verify`), with the input scale recorded in
the version's manifest (``extra.preprocess.scale``). Fixed-batch models such as the paper's
``ptychoNN_8.onnx`` work for any number of frames (the engine pads the last batch).

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
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    from ..io.cxi import PtychoScan

logger = logging.getLogger(__name__)

__all__ = ["InferenceResult", "LoadedScan", "add_subcommand", "infer_scan", "load_scan", "write_result"]

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
    from ..io.cxi import read_cxi

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
    from dataclasses import fields

    from ..io.cxi import PtychoScan
    from ..recon.rpie import FRAMES_KEY, STAGE_X_KEY, STAGE_Y_KEY, _read_key, window_positions_from_stage
    from ..sim.geometry import Geometry
    from ..storage import StorageConfig, connect, get_run

    config = StorageConfig.from_env()
    client = connect(config)
    run = get_run(client, uid)
    start = run.metadata["start"]
    meta = start.get("edge_ptycho") if isinstance(start, Mapping) else None
    if not isinstance(meta, Mapping) or not isinstance(meta.get("geometry"), Mapping):
        raise ValueError(f"run {uid!r} has no edge_ptycho.geometry in its start document; it was "
                         "not recorded by the edge_ptycho plans")
    geometry_meta: Mapping[str, Any] = meta["geometry"]
    stream = run["primary"]
    frames = _read_key(stream, str(meta.get("image_key", FRAMES_KEY)))
    x_um = np.asarray(_read_key(stream, STAGE_X_KEY), dtype=np.float64).reshape(-1)
    y_um = np.asarray(_read_key(stream, STAGE_Y_KEY), dtype=np.float64).reshape(-1)
    if frames.ndim == 4 and frames.shape[1] == 1:  # (N, 1, H, W) from some detectors
        frames = frames[:, 0]
    positions, shape = window_positions_from_stage(x_um, y_um, geometry_meta, frame_size=frames.shape[-1])
    known = {f.name for f in fields(Geometry)}
    kwargs = {k: geometry_meta[k] for k in known if k in geometry_meta}
    kwargs.setdefault("frame_size", int(frames.shape[-1]))
    try:
        geometry = Geometry(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run {uid!r}: cannot build the geometry from {dict(geometry_meta)!r}: {exc}") from exc
    probe = None
    stored = meta.get("probe")
    if stored is not None:
        probe = (np.asarray(stored["real"]) + 1j * np.asarray(stored["imag"])
                 if isinstance(stored, Mapping) else np.asarray(stored))
        if probe.shape[-2:] != frames.shape[-2:]:
            logger.warning("ignoring the stored probe of shape %s (frames %s)", probe.shape, frames.shape)
            probe = None
    scan = PtychoScan(frames=frames, positions_m=np.column_stack([x_um, y_um]) * 1e-6,
                      geometry=geometry, probe=probe, uid=str(start.get("uid", uid)))
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
        Input count scale; None: the scale recorded in the version's manifest (if any).
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
    from ..stitching import stitch
    from ..training.registry import ModelRegistry, RegistryError
    from .engines import load_engine
    from .preprocess import preprocess

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
    if scale is None:
        scale = mv.input_scale
    eng = load_engine(mv.onnx_path, engine)
    frames = loaded.scan.frames
    n = len(frames)
    out = np.empty((n, 128, 128), dtype=np.float32)
    t0 = time.perf_counter()
    for i in range(0, n, batch_size):
        x = preprocess(frames[i:i + batch_size], scale=scale)
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
                           engine=eng.name, count_scale=scale, seconds=seconds)


def write_result(path: str | Path, loaded: LoadedScan, result: InferenceResult, *, registry: str | Path = "") -> Path:
    """Write the scan and the AI phase (see the module notes for the layout) to a new CXI file."""
    import h5py

    from ..io.cxi import write_cxi

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
    tmp.replace(path)
    logger.info("wrote %s (%d patches, image %s, model %s)", path, len(result.patches),
                result.image.shape, result.version)
    return path


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``edge-ptycho infer`` on the top-level CLI's subparsers."""
    from ..training.registry import add_registry_argument

    p = subparsers.add_parser(
        "infer",
        help="phase-retrieve a stored scan (CXI file or Tiled run uid) with a registry model",
        description="Infer every frame of a scan with the deployed (or --version) registry model, "
        "stitch the phase and write it, with the per-frame patches, to a CXI file.",
    )
    p.add_argument("input", metavar="INPUT", help="CXI file, or the uid of a run in the configured Tiled")
    add_registry_argument(p)
    p.add_argument("--out", type=Path, required=True, metavar="OUT.cxi", help="output CXI file")
    p.add_argument("--version", default=None, help="registry version (default: the deployed one)")
    p.add_argument("--engine", choices=("auto", "onnxruntime", "torch", "tensorrt"), default="auto")
    p.add_argument("--batch-size", type=int, default=64, help="frames per engine call (default: %(default)s)")
    p.add_argument("--scale", type=float, default=None,
                   help="input count scale (default: the one recorded with the model)")
    p.add_argument("--weight", choices=("probe", "uniform"), default="probe",
                   help="stitching weight (default: probe amplitude when the input has a probe)")
    p.set_defaults(func=_cmd_infer)


def _cmd_infer(args: argparse.Namespace) -> int:
    from .errors import EngineUnavailable
    from ..storage import StorageError
    from ..training.registry import RegistryError

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
        out = Path(args.out)
        if Path(args.input).exists() and out.resolve() == Path(args.input).resolve():
            raise ValueError(f"--out {out} is the input file; write to another file")
        loaded = load_scan(args.input)
        result = infer_scan(loaded, args.registry, version=args.version, engine=args.engine,
                            batch_size=args.batch_size, scale=args.scale, weight=args.weight)
        write_result(out, loaded, result, registry=args.registry)
    except (RegistryError, EngineUnavailable, StorageError, ValueError, FileNotFoundError, KeyError, OSError) as exc:
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 1
    n = len(result.patches)
    print(f"{result.version} ({result.engine}): {n} frames in {result.seconds:.2f} s "
          f"({n / max(result.seconds, 1e-9):.0f} frames/s); stitched phase {result.image.shape} -> {out}")
    return 0

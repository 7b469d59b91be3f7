"""CXI (Coherent X-ray Imaging data bank, HDF5) import and export of ptychography scans.

Layout written (and read) here, following the CXI 1.6 specification and what ptychodus reads:

==============================================  =======================================================
``/cxi_version``                                160
``/entry_1/experiment_identifier``              scan uid (string), when known
``/entry_1/instrument_1/detector_1/data``       frames ``(N, H, W)`` (fftshifted intensities)
``/entry_1/data_1/data``                        soft link to the detector data
``/entry_1/instrument_1/detector_1/distance``   sample-detector distance (m)
``/entry_1/instrument_1/detector_1/x_pixel_size``, ``y_pixel_size``   detector pixel (m)
``/entry_1/instrument_1/detector_1/count_time`` exposure time per frame (s), when known
``/entry_1/instrument_1/source_1/energy``       photon energy (J, as CXI specifies)
``/entry_1/instrument_1/source_1/illumination`` complex probe ``(N, N)`` or ``(modes, N, N)``, optional
``/entry_1/sample_1/geometry_1/translation``    ``(N, 3)`` positions (x, y, z) in metres
``/entry_1/data_1/translation``                 soft link to the translation
``/entry_1/image_1/data``                       reconstructed complex object ``(H, W)``, optional
``/entry_1/image_1/x_pixel_size``, ``y_pixel_size``   object pixel (m)
``/entry_1/image_1/patches``                    ``(N, 128, 128)`` float32 phase patches (AI inference), optional
==============================================  =======================================================

Positions convention: ``positions_m[:, 0]`` is x and ``[:, 1]`` is y of the **beam centre on the
sample** in the project's stage frame (the simulator's ``stage_x``, ``stage_y``): the window moves
``+col`` with ``+x`` and ``+row`` with ``+y``. Other programs' sign conventions for the CXI
translation (sample vs beam motion) differ; flip signs when exchanging files with them.

Note: ptychodus' product files keep the *probe* in ``image_1`` and the object in ``image_2``; the
project's files keep the object in ``image_1`` (and the probe as the illumination).
"""

from __future__ import annotations

import bz2
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ..recon.positions import object_shape_for_positions, window_positions_from_stage
from ..sim.geometry import Geometry

__all__ = [
    "CXIReconstruction",
    "PtychoScan",
    "load_siemens_star",
    "read_cxi",
    "read_reconstruction",
    "write_cxi",
]

logger = logging.getLogger(__name__)

#: Joules per electron-volt (exact, SI 2019).
EV_J = 1.602176634e-19
CXI_VERSION = 160

DATA = "/entry_1/data_1/data"
DETECTOR_DATA = "/entry_1/instrument_1/detector_1/data"
DISTANCE = "/entry_1/instrument_1/detector_1/distance"
X_PIXEL = "/entry_1/instrument_1/detector_1/x_pixel_size"
Y_PIXEL = "/entry_1/instrument_1/detector_1/y_pixel_size"
COUNT_TIME = "/entry_1/instrument_1/detector_1/count_time"
ENERGY = "/entry_1/instrument_1/source_1/energy"
ILLUMINATION = "/entry_1/instrument_1/source_1/illumination"
TRANSLATION = "/entry_1/sample_1/geometry_1/translation"
DATA_TRANSLATION = "/entry_1/data_1/translation"
UID = "/entry_1/experiment_identifier"
IMAGE = "/entry_1/image_1/data"
IMAGE_X_PIXEL = "/entry_1/image_1/x_pixel_size"
IMAGE_Y_PIXEL = "/entry_1/image_1/y_pixel_size"
PATCHES = "/entry_1/image_1/patches"


@dataclass(frozen=True, eq=False)
class PtychoScan:
    """A far-field ptychography scan, independent of file format.

    Attributes
    ----------
    frames : (N, H, H) float32 or integer
        fftshifted diffraction intensities.
    positions_m : (N, 2) float64
        Beam-centre positions (x, y) in metres (see the module notes for the sign convention).
    geometry : Geometry
        Energy, detector distance and pixel; fixes the object pixel.
    probe : (H, H) or (modes, H, H) complex64, optional
        Illumination in sqrt(photons) per object pixel.
    uid : str, optional
        Scan identifier (the Bluesky run uid).
    exposure_s : float, optional
        Exposure time per frame (s), when known: the model input is scaled by it.
    beam_diameter_nm : float, optional
        Recorded beam diameter (nm), for a modelled starting probe when there is no probe.
    """

    frames: NDArray[Any]
    positions_m: NDArray[np.float64]
    geometry: Geometry
    probe: NDArray[np.complex64] | None = None
    uid: str | None = None
    exposure_s: float | None = None
    beam_diameter_nm: float | None = None

    def __post_init__(self) -> None:
        frames = np.asarray(self.frames)
        if frames.ndim != 3 or frames.shape[1] != frames.shape[2]:
            raise ValueError(f"frames must have shape (N, H, H), got {frames.shape}")
        if not len(frames):
            raise ValueError("the scan is empty: no frames")
        pos = np.asarray(self.positions_m, dtype=np.float64)
        if pos.shape != (len(frames), 2):
            raise ValueError(f"positions_m must have shape ({len(frames)}, 2) as (x, y) metres, got {pos.shape}")
        if not np.isfinite(pos).all():
            raise ValueError("positions_m contain NaN/inf")
        if not isinstance(self.geometry, Geometry):
            raise TypeError(f"geometry must be a sim.Geometry, got {type(self.geometry).__name__}")
        if self.geometry.frame_size != frames.shape[-1]:
            raise ValueError(f"geometry.frame_size {self.geometry.frame_size} differs from the frames' "
                             f"{frames.shape[-1]} px")
        if self.probe is not None:
            probe = np.asarray(self.probe)
            if probe.shape[-2:] != frames.shape[1:] or probe.ndim not in (2, 3):
                raise ValueError(f"probe must be (H, H) or (modes, H, H) matching the frames, got {probe.shape}")
            object.__setattr__(self, "probe", probe.astype(np.complex64, copy=False))
        object.__setattr__(self, "frames", frames)
        object.__setattr__(self, "positions_m", pos)

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def pixel_size_m(self) -> float:
        """Object pixel size (m): lambda z / (N p)."""
        return self.geometry.pixel_size_nm * 1e-9

    def to_window_positions(self, object_shape: tuple[int, int] | None = None,
                            margin: int = 8) -> tuple[NDArray[np.float64], tuple[int, int]]:
        """Window positions (row, col) in object pixels, and the object shape they fit.

        Stage (0, 0) maps to the object's centre, as in the simulator; with ``object_shape=None``
        the object is the smallest square centred on (0, 0) holding every window plus ``margin``.
        """
        return window_positions_from_stage(
            self.positions_m[:, 0] * 1e6, self.positions_m[:, 1] * 1e6,
            {"pixel_size_nm": self.geometry.pixel_size_nm}, frame_size=self.frames.shape[-1],
            object_shape=object_shape, margin=margin)

    @classmethod
    def from_window_positions(cls, frames: ArrayLike, positions: ArrayLike, geometry: Geometry,
                              object_shape: tuple[int, int], **kwargs: Any) -> PtychoScan:
        """Inverse of :meth:`to_window_positions` for a given ``object_shape``."""
        pos = np.asarray(positions, dtype=np.float64)
        n = np.asarray(frames).shape[-1]
        rc = pos - np.asarray(object_shape, dtype=np.float64) / 2 + n / 2
        pixel_m = geometry.pixel_size_nm * 1e-9
        return cls(frames=np.asarray(frames), positions_m=rc[:, ::-1] * pixel_m, geometry=geometry, **kwargs)

    @classmethod
    def from_cxi(cls, path: str | Path) -> PtychoScan:
        """Read a scan from a CXI file (see :func:`read_cxi`)."""
        return read_cxi(path)

    def to_cxi(self, path: str | Path, reconstruction: CXIReconstruction | None = None) -> Path:
        """Write the scan (and optionally a reconstruction) to a CXI file (see :func:`write_cxi`)."""
        return write_cxi(path, self, reconstruction)


@dataclass(frozen=True, eq=False)
class CXIReconstruction:
    """A reconstruction stored in ``/entry_1/image_1``.

    Attributes
    ----------
    object : (H, W) complex64
    pixel_size_m : (float, float)
        Object pixel (x, y) in metres.
    probe : (N, N) or (modes, N, N) complex64, optional
        Refined probe, written as the illumination.
    patches : (N, 128, 128) float32, optional
        Per-frame phase patches (AI inference output).
    """

    object: NDArray[np.complex64]
    pixel_size_m: tuple[float, float]
    probe: NDArray[np.complex64] | None = None
    patches: NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        obj = np.asarray(self.object)
        if obj.ndim != 2:
            raise ValueError(f"object must be (H, W), got {obj.shape}")
        px = tuple(float(v) for v in self.pixel_size_m)
        if len(px) != 2 or not all(v > 0 for v in px):
            raise ValueError(f"pixel_size_m must be two positive numbers (x, y), got {self.pixel_size_m!r}")
        object.__setattr__(self, "object", obj.astype(np.complex64, copy=False))
        object.__setattr__(self, "pixel_size_m", px)
        if self.probe is not None:
            object.__setattr__(self, "probe", np.asarray(self.probe).astype(np.complex64, copy=False))
        if self.patches is not None:
            patches = np.asarray(self.patches)
            if patches.ndim != 3:
                raise ValueError(f"patches must be (N, H, W), got {patches.shape}")
            object.__setattr__(self, "patches", patches.astype(np.float32, copy=False))


def write_cxi(path: str | Path, scan: PtychoScan, reconstruction: CXIReconstruction | None = None) -> Path:
    """Write ``scan`` (and ``reconstruction``) to a new CXI file at ``path`` (overwritten)."""
    import h5py

    path = Path(path)
    g = scan.geometry
    with h5py.File(path, "w") as f:
        f.create_dataset("cxi_version", data=CXI_VERSION)
        entry = f.create_group("entry_1")
        if scan.uid:
            entry.create_dataset("experiment_identifier", data=str(scan.uid))
        det = f.create_group("entry_1/instrument_1/detector_1")
        det.create_dataset("data", data=scan.frames, chunks=(1,) + scan.frames.shape[1:])
        det.create_dataset("distance", data=float(g.detector_distance_m))
        det.create_dataset("x_pixel_size", data=float(g.detector_pixel_m))
        det.create_dataset("y_pixel_size", data=float(g.detector_pixel_m))
        if scan.exposure_s is not None:
            det.create_dataset("count_time", data=float(scan.exposure_s))
        src = f.create_group("entry_1/instrument_1/source_1")
        src.create_dataset("energy", data=float(g.energy_kev) * 1e3 * EV_J)
        probe = reconstruction.probe if reconstruction is not None and reconstruction.probe is not None else scan.probe
        if probe is not None:
            src.create_dataset("illumination", data=probe)
        translation = np.zeros((len(scan), 3), dtype=np.float64)
        translation[:, :2] = scan.positions_m
        f.create_group("entry_1/sample_1/geometry_1").create_dataset("translation", data=translation)
        data_1 = f.create_group("entry_1/data_1")
        data_1["data"] = h5py.SoftLink(DETECTOR_DATA)
        data_1["translation"] = h5py.SoftLink(TRANSLATION)
        if reconstruction is not None:
            image = f.create_group("entry_1/image_1")
            image.create_dataset("data", data=reconstruction.object)
            image.create_dataset("x_pixel_size", data=reconstruction.pixel_size_m[0])
            image.create_dataset("y_pixel_size", data=reconstruction.pixel_size_m[1])
            image.create_dataset("data_type", data="object")
            if reconstruction.patches is not None:
                image.create_dataset("patches", data=reconstruction.patches,
                                     chunks=(1,) + reconstruction.patches.shape[1:])
    logger.info("wrote %d frames%s to %s", len(scan), " and a reconstruction" if reconstruction else "", path)
    return path


def _required(f: Any, path_in_file: str, file: Path) -> Any:
    if path_in_file not in f:
        raise ValueError(f"{file} is not a usable CXI ptychography file: dataset {path_in_file} is missing")
    return f[path_in_file][()]


def _positive_number(value: Any, path_in_file: str, file: Path) -> float:
    """A dataset that must hold one finite positive number (a scalar or a 1-element array)."""
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "iuf":
        raise ValueError(f"{file}: {path_in_file} must be one number, got {array.dtype} of shape {array.shape}")
    number = float(array.reshape(()))
    if not np.isfinite(number) or number <= 0:
        raise ValueError(f"{file}: {path_in_file} must be a positive finite number, got {number!r}")
    return number


def read_cxi(path: str | Path) -> PtychoScan:
    """Read a scan from a CXI file.

    Requires the frames (``/entry_1/data_1/data`` or the detector data), the translation
    (``/entry_1/sample_1/geometry_1/translation`` or ``/entry_1/data_1/translation``), the detector
    distance and pixel size and the source energy; reads the illumination and uid when present.

    Raises
    ------
    ValueError
        A required dataset is missing or malformed (the message names it), or the file is not HDF5.
    FileNotFoundError
        No such file.
    """
    import h5py

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no CXI file at {path}")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(f"{path} is not an HDF5/CXI file: {exc}") from exc
    with f:
        data_path = DATA if DATA in f else DETECTOR_DATA
        frames = np.asarray(_required(f, data_path, path))
        trans_path = TRANSLATION if TRANSLATION in f else DATA_TRANSLATION
        translation = np.asarray(_required(f, trans_path, path))
        distance = _positive_number(_required(f, DISTANCE, path), DISTANCE, path)
        x_pixel = _positive_number(_required(f, X_PIXEL, path), X_PIXEL, path)
        y_pixel = _positive_number(f[Y_PIXEL][()], Y_PIXEL, path) if Y_PIXEL in f else x_pixel
        energy_j = _positive_number(_required(f, ENERGY, path), ENERGY, path)
        probe = np.asarray(f[ILLUMINATION][()]) if ILLUMINATION in f else None
        uid = f[UID][()] if UID in f else None
        exposure_s = _positive_number(f[COUNT_TIME][()], COUNT_TIME, path) if COUNT_TIME in f else None
    if frames.ndim != 3 or frames.dtype.kind not in "iuf" or 0 in frames.shape:
        raise ValueError(f"{path}: {data_path} must be a non-empty numeric (N, H, W) array, got "
                         f"{frames.dtype} of shape {frames.shape}")
    if translation.dtype.kind not in "iuf":
        raise ValueError(f"{path}: {trans_path} must be numeric, got {translation.dtype}")
    translation = translation.astype(np.float64)
    if translation.ndim != 2 or translation.shape[1] not in (2, 3) or len(translation) != len(frames):
        raise ValueError(f"{path}: {trans_path} must be ({len(frames)}, 3), got {translation.shape}")
    if abs(x_pixel - y_pixel) > 1e-6 * x_pixel:
        raise ValueError(f"{path}: non-square detector pixels ({x_pixel} x {y_pixel} m) are not supported")
    if isinstance(uid, bytes):
        uid = uid.decode()
    try:
        geometry = Geometry(energy_kev=energy_j / EV_J / 1e3, detector_distance_m=distance,
                            detector_pixel_m=x_pixel, frame_size=int(frames.shape[-1]))
        return PtychoScan(frames=frames, positions_m=translation[:, :2], geometry=geometry,
                          probe=probe, uid=None if uid is None else str(uid), exposure_s=exposure_s)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} is not a usable CXI ptychography scan: {exc}") from exc


def read_reconstruction(path: str | Path) -> CXIReconstruction:
    """Read ``/entry_1/image_1`` (object, pixel size, patches) and the illumination of a CXI file."""
    import h5py

    path = Path(path)
    with h5py.File(path, "r") as f:
        obj = np.asarray(_required(f, IMAGE, path))
        x_px = float(_required(f, IMAGE_X_PIXEL, path))
        y_px = float(f[IMAGE_Y_PIXEL][()]) if IMAGE_Y_PIXEL in f else x_px
        probe = np.asarray(f[ILLUMINATION][()]) if ILLUMINATION in f else None
        patches = np.asarray(f[PATCHES][()]) if PATCHES in f else None
    return CXIReconstruction(object=obj, pixel_size_m=(x_px, y_px), probe=probe, patches=patches)


def load_siemens_star(path: str | Path, geometry: Geometry | None = None,
                      margin: int = 2) -> tuple[PtychoScan, NDArray[np.float64]]:
    """The measured Siemens-star scan from Tike's test data (``siemens-star-small.npz.bz2``).

    The file holds ``data`` (1, 516, 128, 128) float32 counts stored **unshifted** (zero frequency
    at the corner; shifted here to the project's centred convention), ``probe`` (1, 1, 1, 1, 128,
    128) complex64 and ``scan`` (1, 516, 2) float32 minimum-corner positions (row, col) in object
    pixels, with negative values. It carries no geometry: we assume ``geometry`` (default: the
    project's :class:`~edge_ptycho_bluesky.sim.Geometry`, 10 keV, 0.9 m, 75 um pixels, 128 px, so an
    11.6 nm object pixel); only the conversion of pixels to metres depends on it. The probe is
    rescaled so that ``sum |P|^2`` equals the mean frame sum (the file's probe is not on the
    unitary-FFT scale), i.e. assuming a mostly transparent sample.

    Returns
    -------
    scan : PtychoScan
        With ``uid="siemens-star-small"``.
    positions : (516, 2) float64
        Window positions (row, col) shifted to start at ``margin`` pixels (ready for :func:`rpie`
        with ``object_shape=None``).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Siemens-star file at {path}")
    raw = bz2.open(path).read() if path.suffix == ".bz2" else path.read_bytes()
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        missing = {"data", "probe", "scan"} - set(z.files)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}; expected Tike's siemens-star-small layout")
        data = np.asarray(z["data"])[0]
        probe = np.asarray(z["probe"]).reshape(-1, *z["probe"].shape[-2:])[0]
        scan = np.asarray(z["scan"], dtype=np.float64)[0]
    frames = np.fft.fftshift(data, axes=(-2, -1)).astype(np.float32)
    probe = probe * np.sqrt(frames.sum(axis=(1, 2)).mean() / np.sum(np.abs(probe) ** 2))
    positions = scan - scan.min(axis=0) + margin
    geometry = geometry or Geometry(frame_size=frames.shape[-1])
    shape = object_shape_for_positions(positions, frames.shape[-1], margin)
    ptycho = PtychoScan.from_window_positions(frames, positions, geometry, shape,
                                              probe=probe.astype(np.complex64), uid="siemens-star-small")
    return ptycho, positions

"""The run format: what a ptychography run records, and how a stored run becomes a scan.

The plans write the scan's ptychography facts into the start document under the key
:data:`META_KEY` (``"edge_ptycho"``): geometry, beam size, exposure, dose, overlap, the frames'
data key, whether the scan is labelled, and for fly scans the channel its frames were streamed
to. :class:`EdgePtychoMeta` is that record, typed; it is the only reader and writer of it.
:func:`read_scan` is the only reader of a stored run's layout in Tiled: it turns a run into a
:class:`~edge_ptycho_bluesky.io.cxi.PtychoScan` (frames, positions in metres, geometry, probe,
exposure), downloading the frames once.

Keys of the record (all optional but ``geometry`` for anything that reconstructs or stitches):

============================  ====================================================================
``geometry``                  :meth:`Geometry.as_dict <edge_ptycho_bluesky.sim.Geometry.as_dict>`
                              (energy, detector distance and pixel, frame size, pixel size in nm)
``step_um``, ``num_points``   the spiral's step (um) and number of points
``detector``, ``image_key``   the detector and the data key of its frames
``frame_shape``               ``[H, W]`` of the frames
``exposure_s``                exposure time per frame (s)
``beam_diameter_nm``          beam diameter (for the overlap ratio and a modelled starting probe)
``photons_per_second``        flux; with the exposure: ``photons_per_point``, ``dose_photons_per_nm2``
``overlap_ratio``             ``1 - step / beam diameter``
``labelled``                  a source of rPIE training labels
``mode``, ``frame_rate_hz``   ``"fly"`` and the frame rate for fly scans
``streamed_to``               pvAccess channel the detector streamed its frames to (fly scans)
``position_keys``             ``[x, y]`` data keys of the scan positions (default ``stage_x``, ``stage_y``)
``position_units``            their unit: ``m``, ``mm``, ``um`` (default) or ``nm``; ``step_um`` and
                              ``beam_diameter_nm`` are always in um and nm
``probe``                     complex probe, as an array, ``{"real": ..., "imag": ...}``, or a
                              reference to a ``.npy`` file ``{"file": PATH, "sha256": HEX}``
                              (:func:`probe_record`)
============================  ====================================================================

Keys this version does not know are kept as written (:attr:`EdgePtychoMeta.extra`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .io.cxi import PtychoScan
from .sim.geometry import Geometry

__all__ = ["DEFAULT_IMAGE_KEY", "META_KEY", "POSITION_UNITS_M", "STAGE_X_KEY", "STAGE_Y_KEY", "EdgePtychoMeta", "RunFormatError",
           "geometry_record", "probe_record", "read_array", "read_scan"]

logger = logging.getLogger(__name__)

#: Key of the ptychography record in a run's start document.
META_KEY = "edge_ptycho"
#: Data key of the frames when the record does not name one (the simulated step detector's).
DEFAULT_IMAGE_KEY = "ptycho_det_image"
#: Data keys of the stage positions (micrometres) in the primary stream.
STAGE_X_KEY = "stage_x"
STAGE_Y_KEY = "stage_y"
#: Metres per unit of the position units a run may record (``position_units``).
POSITION_UNITS_M = {"m": 1.0, "mm": 1e-3, "um": 1e-6, "µm": 1e-6, "nm": 1e-9}


class RunFormatError(ValueError):
    """A run lacks what this package needs from it (the message says what and how to get it)."""


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class EdgePtychoMeta:
    """A run's ptychography record (the start document's ``edge_ptycho`` entry), typed."""

    geometry: Mapping[str, Any] | None = None
    step_um: float | None = None
    num_points: int | None = None
    detector: str | None = None
    image_key: str | None = None
    frame_shape: tuple[int, int] | None = None
    exposure_s: float | None = None
    beam_diameter_nm: float | None = None
    photons_per_second: float | None = None
    photons_per_point: float | None = None
    dose_photons_per_nm2: float | None = None
    overlap_ratio: float | None = None
    labelled: bool = False
    mode: str | None = None
    frame_rate_hz: float | None = None
    streamed_to: str | None = None
    position_keys: tuple[str, str] | None = None
    position_units: str | None = None
    probe: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    # -- reading and writing the record -------------------------------------------------------

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> EdgePtychoMeta:
        """Parse a record; unknown keys go to :attr:`extra`. Raises RunFormatError on bad values."""
        if not isinstance(record, Mapping):
            raise RunFormatError(f"the {META_KEY} record must be a mapping, got {type(record).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        values = {k: v for k, v in record.items() if k in known}
        extra = {k: v for k, v in record.items() if k not in known}
        try:
            for key in ("step_um", "exposure_s", "beam_diameter_nm", "photons_per_second", "photons_per_point",
                        "dose_photons_per_nm2", "overlap_ratio", "frame_rate_hz"):
                if key in values:
                    values[key] = _float(values[key])
            if values.get("num_points") is not None:
                values["num_points"] = int(values["num_points"])
            if values.get("frame_shape") is not None:
                values["frame_shape"] = tuple(int(n) for n in values["frame_shape"])
            if values.get("position_keys") is not None:
                keys = tuple(str(k) for k in values["position_keys"])
                if len(keys) != 2:
                    raise ValueError(f"position_keys must be [x, y], got {values['position_keys']!r}")
                values["position_keys"] = keys
            units = values.get("position_units")
            if units is not None and units not in POSITION_UNITS_M:
                raise ValueError(f"position_units {units!r} is not one of {sorted(POSITION_UNITS_M)}")
            values["labelled"] = bool(values.get("labelled", False))
        except (TypeError, ValueError) as exc:
            raise RunFormatError(f"the {META_KEY} record has a bad value: {exc}") from exc
        geometry = values.get("geometry")
        if geometry is not None and not isinstance(geometry, Mapping):
            raise RunFormatError(f"{META_KEY}.geometry must be a mapping, got {type(geometry).__name__}")
        return cls(**values, extra=extra)

    @classmethod
    def from_start(cls, start: Mapping[str, Any], *, required: bool = True) -> EdgePtychoMeta | None:
        """The record of a start document.

        Without one: RunFormatError when ``required``, else None (a run of another plan).
        """
        record = start.get(META_KEY) if isinstance(start, Mapping) else None
        if record is None:
            if not required:
                return None
            uid = start.get("uid") if isinstance(start, Mapping) else None
            raise RunFormatError(f"run {uid!r} has no {META_KEY} metadata: it was not recorded by the "
                                 "edge_ptycho plans (spiral_ptycho_scan, spiral_ptycho_flyscan)")
        return cls.from_dict(record)

    def to_dict(self) -> dict[str, Any]:
        """The record as the plans write it: fields that are set, then :attr:`extra`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or value is None:
                continue
            if f.name in ("frame_shape", "position_keys"):
                value = list(value)
            elif f.name == "geometry":
                value = dict(value)
            out[f.name] = value
        out.update(self.extra)
        return out

    # -- derived facts --------------------------------------------------------------------------

    @property
    def frames_key(self) -> str:
        """Data key of the frames: the recorded ``image_key``, else :data:`DEFAULT_IMAGE_KEY`."""
        return self.image_key or DEFAULT_IMAGE_KEY

    def require_geometry(self) -> Mapping[str, Any]:
        """The geometry record, or RunFormatError saying how to record one."""
        if not isinstance(self.geometry, Mapping):
            raise RunFormatError(f"the run has no {META_KEY}.geometry (energy, detector distance and pixel): "
                                 "record it with the edge_ptycho plans and a detector that reports it")
        return self.geometry

    def to_geometry(self, frame_size: int | None = None) -> Geometry:
        """The recorded geometry as a :class:`~edge_ptycho_bluesky.sim.Geometry` (``frame_size``
        from the frames when the record has none)."""
        record = self.require_geometry()
        known = {f.name for f in fields(Geometry)}
        kwargs = {k: v for k, v in record.items() if k in known}
        if frame_size is not None:
            kwargs.setdefault("frame_size", int(frame_size))
        try:
            return Geometry(**kwargs)
        except (TypeError, ValueError) as exc:
            raise RunFormatError(f"the recorded geometry {dict(record)!r} is not usable: {exc}") from exc

    @property
    def pixel_size_nm(self) -> float:
        """Object pixel size (nm): the recorded value, else derived from the geometry."""
        record = self.require_geometry()
        if record.get("pixel_size_nm") is not None:
            return float(record["pixel_size_nm"])
        return self.to_geometry().pixel_size_nm

    @property
    def xy_keys(self) -> tuple[str, str]:
        """Data keys of the x and y positions."""
        return self.position_keys or (STAGE_X_KEY, STAGE_Y_KEY)

    @property
    def position_unit_m(self) -> float:
        """Metres per position unit (um unless the run records another)."""
        return POSITION_UNITS_M[self.position_units or "um"]

    def probe_array(self, frame_shape: tuple[int, ...] | None = None) -> NDArray[np.complex64] | None:
        """The recorded complex probe ``(H, W)`` or ``(modes, H, W)``, or None.

        A record that is not a complex probe, or whose shape does not match ``frame_shape``
        (when given), is ignored with a warning: reconstruction then models its starting probe.
        """
        if self.probe is None:
            return None
        try:
            stored = self.probe
            if isinstance(stored, Mapping) and "file" in stored:
                probe = _load_probe_file(stored)
            elif isinstance(stored, Mapping):
                probe = np.asarray(stored["real"]) + 1j * np.asarray(stored["imag"])
            else:
                probe = np.asarray(stored)
        except (KeyError, TypeError, ValueError, OSError) as exc:
            logger.warning("ignoring the recorded probe: %s", exc)
            return None
        if not np.iscomplexobj(probe) or probe.ndim not in (2, 3):
            logger.warning("ignoring the recorded probe: not a complex (H, W) or (modes, H, W) array")
            return None
        if frame_shape is not None and probe.shape[-2:] != tuple(frame_shape)[-2:]:
            logger.warning("ignoring the recorded probe of shape %s (frames %s)", probe.shape, tuple(frame_shape))
            return None
        return probe.astype(np.complex64)


def _load_probe_file(record: Mapping[str, Any]) -> NDArray[Any]:
    from .files import sha256_file

    path = Path(record["file"])
    expected = record.get("sha256")
    if expected and sha256_file(path) != expected:
        raise ValueError(f"{path} changed since the run recorded it (sha256 differs)")
    return np.load(path, allow_pickle=False)


def probe_record(probe: str | os.PathLike[str]) -> dict[str, str]:
    """The ``probe`` entry for a probe kept in a ``.npy`` file, or in a model version's folder
    (its ``probe.npy``): the absolute path and its sha256, checked when the run is read.

    Raises
    ------
    ValueError
        Not a file or version folder with a complex (N, N) or (modes, N, N) probe.
    """
    from .files import sha256_file

    path = Path(probe).expanduser().resolve()
    if path.is_dir():
        path = path / "probe.npy"
    if not path.is_file():
        raise ValueError(f"probe={probe!r}: no such file (give a .npy file holding the complex probe, "
                         "or a model version's folder with probe.npy)")
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"probe={probe!r}: not a .npy array ({exc})") from exc
    if not np.iscomplexobj(array) or array.ndim not in (2, 3) or array.shape[-1] != array.shape[-2]:
        raise ValueError(f"probe={probe!r}: expected a complex (N, N) or (modes, N, N) array, got "
                         f"{array.dtype} {array.shape}")
    return {"file": str(path), "sha256": sha256_file(path)}


def geometry_record(geometry: Geometry | Mapping[str, Any]) -> dict[str, Any]:
    """The ``geometry`` entry for a :class:`~edge_ptycho_bluesky.sim.Geometry` or a mapping of its
    fields (``energy_kev``, ``detector_distance_m``, ``detector_pixel_m``, ``frame_size``).

    Raises
    ------
    ValueError
        Unknown keys (named, with the valid ones) or values the geometry refuses.
    """
    from .options import check_known_keys

    if isinstance(geometry, Geometry):
        return geometry.as_dict()
    if not isinstance(geometry, Mapping):
        raise ValueError(f"geometry must be a Geometry or a mapping of its fields, got {type(geometry).__name__}")
    known = [f.name for f in fields(Geometry)]
    # wavelength and object pixel are derived (as_dict writes them): a recorded geometry is accepted back
    given = {k: v for k, v in geometry.items() if k not in ("wavelength_nm", "pixel_size_nm")}
    check_known_keys("geometry", given, known)
    try:
        return Geometry(**given).as_dict()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"geometry {dict(geometry)!r}: {exc}") from exc


# -- the Tiled layout ----------------------------------------------------------------------------


def read_array(stream: Any, key: str) -> NDArray[Any]:
    """An array of a Tiled stream node, whichever layout the writer used (``key``,
    ``data/key`` or ``internal/key``). Raises KeyError naming the key when it is absent."""
    for path in ((key,), ("data", key), ("internal", key)):
        node = stream
        try:
            for part in path:
                node = node[part]
            return np.asarray(node.read())
        except (KeyError, AttributeError, TypeError):
            continue
    raise KeyError(f"data key {key!r} not found in stream {stream!r}")


def image_key_of(data_keys: Mapping[str, Mapping[str, Any]]) -> str | None:
    """The frames of a detector that records no ``image_key``: the first data key that is
    external (in a file) and at least 2-D, or None."""
    return next((key for key, info in data_keys.items()
                 if info.get("external") and len(info.get("shape") or []) >= 2), None)


def _frames_key(meta: EdgePtychoMeta, stream: Any) -> str:
    if meta.image_key:
        return meta.image_key
    try:
        for descriptor in stream.descriptors:
            key = image_key_of(descriptor.get("data_keys", {}))
            if key is not None:
                return key
    except (AttributeError, KeyError, TypeError):
        pass
    return meta.frames_key


def read_scan(run: Any) -> PtychoScan:
    """A stored raw ptychography run (a Tiled BlueskyRun node) as a scan.

    Frames ``primary/<image_key>`` (read once; ``(N, 1, H, W)`` is squeezed; without a recorded
    ``image_key``, the first external 2-D data key: :func:`image_key_of`), positions from the
    recorded ``position_keys`` (default ``stage_x``/``stage_y``) in ``position_units`` (default um)
    as metres, the recorded geometry, probe (when it matches the frames) and exposure, and the
    run's uid.

    Raises
    ------
    RunFormatError
        The run was not recorded by the edge_ptycho plans, or lacks the geometry.
    KeyError
        A data key is missing from the primary stream.
    """
    start = run.metadata["start"]
    meta = EdgePtychoMeta.from_start(start)
    assert meta is not None
    meta.require_geometry()
    stream = run["primary"]
    frames = read_array(stream, _frames_key(meta, stream))
    if frames.ndim == 4 and frames.shape[1] == 1:  # (N, 1, H, W) from some detectors
        frames = frames[:, 0]
    x_key, y_key = meta.xy_keys
    x = np.asarray(read_array(stream, x_key), dtype=np.float64).reshape(-1)
    y = np.asarray(read_array(stream, y_key), dtype=np.float64).reshape(-1)
    return PtychoScan(frames=frames, positions_m=np.column_stack([x, y]) * meta.position_unit_m,
                      geometry=meta.to_geometry(frame_size=frames.shape[-1]),
                      probe=meta.probe_array(frames.shape), uid=str(start.get("uid")),
                      exposure_s=meta.exposure_s, beam_diameter_nm=meta.beam_diameter_nm)

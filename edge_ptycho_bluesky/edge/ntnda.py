"""NTNDArray encode/decode for detector frames and phase patches, and the attribute convention.

Frames and phase patches travel over pvAccess as ``epics:nt/NTNDArray:1.0`` structures, the way
areaDetector's PVA plugin publishes images: a 2-D image is a flat ``value`` union (``ushortValue``,
``uintValue``, ``intValue``, ``floatValue``, ...), ``dimension[0]`` is the number of columns (x) and
``dimension[1]`` the number of rows (y), and ``uniqueId`` numbers the frames.

Attribute convention (NTAttributes in the ``attribute`` array)
--------------------------------------------------------------
Input frames (published by the simulated fly detector and the forwarding callback):

``pos_x``, ``pos_y`` : double
    The frame's scan position, ``pos = (pos_x, pos_y)``, carried verbatim in the order and units
    the publisher gives.  In this project that is ``(row, col)`` in object pixels of the top-left
    corner of the 128 x 128 probe window (docs/conventions.md); a publisher using other units says so
    in an extra attribute (e.g. ``pos_units``), which the worker forwards unchanged.
``scan_uid`` : string
    The Bluesky run start uid the frame belongs to.
``ColorMode`` : int
    Always 0 (mono), as areaDetector writes it.
anything else : double, long or string
    Forwarded unchanged to the output patch (e.g. ``pos_units``, ``frame_index``).

``timeStamp`` of an input frame is the time it was published (epoch seconds); it becomes the
patch's ``t_in`` and is the start of the end-to-end latency.

Output phase patches (published by the edge worker) are float32 128 x 128 NTNDArrays with the
input's ``uniqueId``, all of the input's attributes, and ``model_version`` (string) naming the
model that produced them; ``dataTimeStamp`` carries ``t_in`` and ``timeStamp`` the time the patch
was published.

Encoding reuses a cached, pre-built NTNDArray per image shape and sets attributes as plain
dictionaries: about 40 us per 128 x 128 frame here, against about 300 us when every
``NtNdArray`` and ``NtAttribute`` is constructed afresh.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
from numpy.typing import NDArray

import pvaccess as pva

__all__ = [
    "ATTR_MODEL_VERSION",
    "ATTR_POS_X",
    "ATTR_POS_Y",
    "ATTR_SCAN_UID",
    "AttributeValue",
    "Frame",
    "FrameDecodeError",
    "Patch",
    "decode_frame",
    "decode_patch",
    "encode_frame",
    "encode_patch",
    "empty_ntndarray",
]

logger = logging.getLogger(__name__)

#: Attribute holding the first scan coordinate of a frame (``pos[0]``).
ATTR_POS_X = "pos_x"
#: Attribute holding the second scan coordinate of a frame (``pos[1]``).
ATTR_POS_Y = "pos_y"
#: Attribute holding the Bluesky scan (run start) uid.
ATTR_SCAN_UID = "scan_uid"
#: Attribute of output patches naming the model version that produced them.
ATTR_MODEL_VERSION = "model_version"
_ATTR_COLOR_MODE = "ColorMode"
_RESERVED = frozenset({ATTR_POS_X, ATTR_POS_Y, ATTR_SCAN_UID, ATTR_MODEL_VERSION, _ATTR_COLOR_MODE})

#: Scalar types an extra attribute may hold.
AttributeValue = Union[float, int, str, bool]

# numpy dtype -> NTNDArray value-union field
_FIELD_OF_DTYPE: dict[np.dtype[Any], str] = {
    np.dtype(np.uint8): "ubyteValue",
    np.dtype(np.int8): "byteValue",
    np.dtype(np.uint16): "ushortValue",
    np.dtype(np.int16): "shortValue",
    np.dtype(np.uint32): "uintValue",
    np.dtype(np.int32): "intValue",
    np.dtype(np.uint64): "ulongValue",
    np.dtype(np.int64): "longValue",
    np.dtype(np.float32): "floatValue",
    np.dtype(np.float64): "doubleValue",
}
_DTYPE_OF_FIELD = {v: k for k, v in _FIELD_OF_DTYPE.items()}


class FrameDecodeError(ValueError):
    """An NTNDArray update that cannot be turned into a frame.

    Attributes
    ----------
    reason : str
        Short machine-readable reason, used as the drop-reason key: ``"empty"`` (no dimensions or
        no value selected: the first update of a freshly created record), ``"bad_shape"`` (not
        2-D, or value size does not match the dimensions), ``"bad_dtype"`` (non-numeric value),
        ``"compressed"`` (a codec is set; the worker takes uncompressed frames).
    unique_id : int or None
        The update's ``uniqueId`` where it could be read.
    """

    def __init__(self, reason: str, message: str, unique_id: int | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.unique_id = unique_id


@dataclass(frozen=True, eq=False)
class Frame:
    """One detector frame as received by the edge worker.

    Attributes
    ----------
    unique_id : int
        NTNDArray ``uniqueId``.
    data : (H, W) uint16, uint32, int32 or float32
        The image, rows first.
    pos : tuple of two floats or None
        Scan position ``(pos_x, pos_y)`` from the attributes; None when either is missing.
    scan_uid : str or None
        Run start uid from the ``scan_uid`` attribute.
    t_in : float
        Publication time of the frame (epoch seconds); the receive time when the publisher sent
        none.
    attributes : mapping of str to scalar
        Every other attribute, forwarded to the output patch.
    """

    unique_id: int
    data: NDArray[Any]
    pos: tuple[float, float] | None
    scan_uid: str | None
    t_in: float
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Patch:
    """One phase patch produced by the edge worker.

    Attributes
    ----------
    unique_id : int
        ``uniqueId`` of the input frame.
    phase : (128, 128) float32
        Phase in radians.
    pos : tuple of two floats or None
        The input frame's scan position, verbatim.
    scan_uid : str
        The input frame's scan uid ("" when it had none).
    model_version : str
        Version of the model that produced the patch.
    t_in : float
        Publication time of the input frame (epoch seconds).
    attributes : mapping of str to scalar
        The input frame's other attributes.
    """

    unique_id: int
    phase: NDArray[np.float32]
    pos: tuple[float, float] | None
    scan_uid: str
    model_version: str
    t_in: float
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# encoding

_templates: dict[tuple[int, int], pva.NtNdArray] = {}
_templates_lock = threading.Lock()


def _template(ny: int, nx: int) -> pva.NtNdArray:
    """A pre-built NTNDArray with the dimensions of a ``(ny, nx)`` image (never mutated)."""
    key = (ny, nx)
    tpl = _templates.get(key)
    if tpl is None:
        with _templates_lock:
            tpl = _templates.get(key)
            if tpl is None:
                tpl = pva.NtNdArray()
                tpl["dimension"] = [pva.PvDimension(nx, 0, nx, 1, False),
                                    pva.PvDimension(ny, 0, ny, 1, False)]
                tpl["descriptor"] = "edge_ptycho_bluesky"
                _templates[key] = tpl
    return tpl


def empty_ntndarray() -> pva.NtNdArray:
    """An empty NTNDArray, the initial value of a freshly created frame or patch record."""
    return pva.NtNdArray()


def _pv_scalar(name: str, value: AttributeValue) -> Any:
    if isinstance(value, bool):
        return pva.PvBoolean(value)
    if isinstance(value, (int, np.integer)):
        return pva.PvLong(int(value))
    if isinstance(value, (float, np.floating)):
        return pva.PvDouble(float(value))
    if isinstance(value, str):
        return pva.PvString(value)
    raise TypeError(f"attribute {name!r} must be a float, int, bool or str, got "
                    f"{type(value).__name__} {value!r}; convert it before publishing")


def _encode(data: NDArray[Any], unique_id: int, attributes: list[dict[str, Any]],
            timestamp: float, data_timestamp: float) -> pva.NtNdArray:
    if data.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {data.shape}")
    key = _FIELD_OF_DTYPE.get(data.dtype)
    if key is None:
        raise TypeError(f"image dtype {data.dtype} has no NTNDArray field; use one of "
                        f"{sorted(str(d) for d in _FIELD_OF_DTYPE)}")
    ny, nx = data.shape
    nt = _template(ny, nx).copy()
    flat = np.ascontiguousarray(data).ravel()
    nbytes = int(flat.nbytes)
    nt.set({
        "uniqueId": int(unique_id),
        "value": {key: flat},
        "compressedSize": nbytes,
        "uncompressedSize": nbytes,
        "timeStamp": pva.PvTimeStamp(timestamp),
        "dataTimeStamp": pva.PvTimeStamp(data_timestamp),
        "attribute": attributes,
    })
    return nt


def _attribute_list(pos: tuple[float, float] | None, scan_uid: str | None,
                    extra: Mapping[str, AttributeValue] | None,
                    model_version: str | None = None) -> list[dict[str, Any]]:
    attrs: list[dict[str, Any]] = [{"name": _ATTR_COLOR_MODE, "value": pva.PvInt(0)}]
    if pos is not None:
        if len(pos) != 2:
            raise ValueError(f"pos must be a pair (pos_x, pos_y), got {pos!r}")
        attrs.append({"name": ATTR_POS_X, "value": pva.PvDouble(float(pos[0]))})
        attrs.append({"name": ATTR_POS_Y, "value": pva.PvDouble(float(pos[1]))})
    if scan_uid is not None:
        attrs.append({"name": ATTR_SCAN_UID, "value": pva.PvString(str(scan_uid))})
    if model_version is not None:
        attrs.append({"name": ATTR_MODEL_VERSION, "value": pva.PvString(str(model_version))})
    for name, value in (extra or {}).items():
        if name in _RESERVED:
            raise ValueError(f"extra attribute {name!r} is reserved; pass it through the "
                             f"dedicated argument instead")
        attrs.append({"name": str(name), "value": _pv_scalar(name, value)})
    return attrs


def encode_frame(
    data: NDArray[Any],
    unique_id: int,
    *,
    pos: tuple[float, float] | None = None,
    scan_uid: str | None = None,
    attributes: Mapping[str, AttributeValue] | None = None,
    timestamp: float | None = None,
) -> pva.NtNdArray:
    """Encode one detector frame as an NTNDArray with the project's attributes.

    Parameters
    ----------
    data : (H, W) uint16, uint32, int32 or float32
        The frame (any numeric dtype encodes; the worker accepts those four).
    unique_id
        NTNDArray ``uniqueId``; consecutive frames should have consecutive ids, so that the
        receiver can count gaps.
    pos
        Scan position ``(pos_x, pos_y)`` (see the module docstring for units).
    scan_uid
        Run start uid.
    attributes
        Extra scalar attributes forwarded by the worker to the output patch.
    timestamp
        Publication time (epoch seconds); now when None.

    Returns
    -------
    pvaccess.NtNdArray
        A new object, safe to keep.
    """
    t = time.time() if timestamp is None else float(timestamp)
    return _encode(np.asarray(data), unique_id, _attribute_list(pos, scan_uid, attributes), t, t)


def encode_patch(patch: Patch, *, timestamp: float | None = None) -> pva.NtNdArray:
    """Encode a phase patch as a float32 NTNDArray (see the module docstring).

    Parameters
    ----------
    patch
        The patch; ``patch.phase`` must be 2-D and is sent as float32.
    timestamp
        Publication time (epoch seconds); now when None.
    """
    t = time.time() if timestamp is None else float(timestamp)
    phase = np.asarray(patch.phase, dtype=np.float32)
    attrs = _attribute_list(patch.pos, patch.scan_uid, patch.attributes, patch.model_version)
    return _encode(phase, patch.unique_id, attrs, t, patch.t_in)


# ---------------------------------------------------------------------------------------------
# decoding

def _epoch(ts: Mapping[str, Any] | None) -> float:
    if not ts:
        return 0.0
    return float(ts.get("secondsPastEpoch", 0)) + 1e-9 * float(ts.get("nanoseconds", 0))


def _attributes(pv: Any) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {}
    for attr in pv["attribute"]:
        value = attr["value"]
        # a variant union reads as ({'value': x}, {'value': type}) or () when unset
        if value and isinstance(value[0], Mapping) and "value" in value[0]:
            out[attr["name"]] = value[0]["value"]
    return out


def _image(pv: Any) -> tuple[int, NDArray[Any], dict[str, AttributeValue], Mapping[str, Any]]:
    """(uniqueId, (H, W) copy of the image, attributes, raw structure dict of time stamps)."""
    unique_id = int(pv["uniqueId"])
    dims = pv["dimension"]
    if len(dims) == 0:
        raise FrameDecodeError("empty", f"NTNDArray update uniqueId={unique_id} has no "
                               f"dimensions (empty initial record value?)", unique_id)
    if len(dims) != 2:
        raise FrameDecodeError("bad_shape", f"NTNDArray uniqueId={unique_id} has {len(dims)} "
                               f"dimensions; a mono 2-D image is needed", unique_id)
    codec = pv["codec"]["name"]
    if codec:
        raise FrameDecodeError("compressed", f"NTNDArray uniqueId={unique_id} is compressed "
                               f"with codec {codec!r}; publish uncompressed frames", unique_id)
    try:
        key = pv.getSelectedUnionFieldName()
    except Exception as exc:  # pvaccess raises its own types when no field is selected
        raise FrameDecodeError("empty", f"NTNDArray uniqueId={unique_id} has no value "
                               f"selected: {exc}", unique_id) from exc
    if not key:
        raise FrameDecodeError("empty", f"NTNDArray uniqueId={unique_id} has no value selected",
                               unique_id)
    if key not in _DTYPE_OF_FIELD:
        raise FrameDecodeError("bad_dtype", f"NTNDArray uniqueId={unique_id} value field "
                               f"{key!r} is not numeric", unique_id)
    nx, ny = int(dims[0]["size"]), int(dims[1]["size"])
    flat = np.asarray(pv["value"][0][key])
    if flat.size == 0:
        raise FrameDecodeError("empty", f"NTNDArray uniqueId={unique_id} has an empty value",
                               unique_id)
    if flat.size != nx * ny:
        raise FrameDecodeError("bad_shape", f"NTNDArray uniqueId={unique_id}: value has "
                               f"{flat.size} elements but dimensions say {ny} x {nx}", unique_id)
    data = np.array(flat, dtype=_DTYPE_OF_FIELD[key], copy=True).reshape(ny, nx)
    return unique_id, data, _attributes(pv), pv


def _split(attrs: dict[str, AttributeValue]) -> tuple[tuple[float, float] | None, str | None]:
    x, y = attrs.pop(ATTR_POS_X, None), attrs.pop(ATTR_POS_Y, None)
    pos: tuple[float, float] | None = None
    if isinstance(x, (int, float)) and isinstance(y, (int, float)):
        pos = (float(x), float(y))
        if not (math.isfinite(pos[0]) and math.isfinite(pos[1])):
            pos = None
    uid = attrs.pop(ATTR_SCAN_UID, None)
    attrs.pop(_ATTR_COLOR_MODE, None)
    return pos, (str(uid) if uid is not None else None)


def decode_frame(pv: Any, *, t_recv: float | None = None) -> Frame:
    """Decode an NTNDArray update (a ``pvaccess.PvObject``) into a :class:`Frame`.

    Parameters
    ----------
    pv
        The monitor update.
    t_recv
        Receive time (epoch seconds), used as ``t_in`` when the update carries no time stamp.

    Raises
    ------
    FrameDecodeError
        With ``reason`` "empty", "bad_shape", "bad_dtype" or "compressed".
    """
    unique_id, data, attrs, raw = _image(pv)
    pos, scan_uid = _split(attrs)
    attrs.pop(ATTR_MODEL_VERSION, None)
    t_in = _epoch(raw["timeStamp"])
    if t_in <= 0.0:
        t_in = time.time() if t_recv is None else t_recv
    return Frame(unique_id, data, pos, scan_uid, t_in, attrs)


def decode_patch(pv: Any) -> Patch:
    """Decode an output NTNDArray of the edge worker into a :class:`Patch`.

    Raises
    ------
    FrameDecodeError
        As :func:`decode_frame`; also "bad_dtype" when the value is not float32.
    """
    unique_id, data, attrs, raw = _image(pv)
    if data.dtype != np.float32:
        raise FrameDecodeError("bad_dtype", f"patch uniqueId={unique_id} is {data.dtype}, "
                               f"expected float32", unique_id)
    pos, scan_uid = _split(attrs)
    version = attrs.pop(ATTR_MODEL_VERSION, "")
    return Patch(unique_id, data, pos, scan_uid or "", str(version),
                 _epoch(raw["dataTimeStamp"]), attrs)

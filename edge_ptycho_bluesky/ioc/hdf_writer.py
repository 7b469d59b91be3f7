"""An NDFileHDF5-compatible file writer (``PREFIX + "HDF1:"``): the records that ophyd's
``HDF5Plugin`` and ophyd-async's HDF writer use, writing frames the way areaDetector's HDF5
plugin does.

``Capture`` = 1 opens ``FullFileName_RBV`` (``FileTemplate`` applied to ``FilePath``,
``FileName``, ``FileNumber``, C-printf style) and appends every frame the driver sends to
``/entry/data/data`` (one chunk per frame) with its NDAttributes as
``/entry/instrument/NDAttributes/<name>`` (and ``NDArrayUniqueId``, ``NDArrayTimeStamp``), in
SWMR mode, flushed at each frame so that readers see it at once. ``NumCaptured_RBV`` counts the
frames; ``NumCapture`` frames end the capture (0: until ``Capture`` = 0). A client that waits on
its ``Capture`` put is answered when the capture ends and the file is closed, as for the real
(busy) record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np
from caproto import SkipWrite
from numpy.typing import NDArray

from .records import RecordSet, Refused

__all__ = ["HDF5Writer", "format_file_name"]

logger = logging.getLogger(__name__)

FRAME_DATASET = "/entry/data/data"
ATTRIBUTE_GROUP = "/entry/instrument/NDAttributes"
#: Chunk of an NDAttribute dataset (what areaDetector uses and ophyd-async declares).
ATTRIBUTE_CHUNK = 16384
YES_NO = ["No", "Yes"]


def format_file_name(template: str, path: str, name: str, number: int) -> str:
    """areaDetector's file name: ``template`` (C printf, e.g. ``"%s%s_%6.6d.h5"``) applied to as
    many of (path, name, number) as it has conversions."""
    conversions = len(re.findall(r"%(?!%)", template.replace("%%", "")))
    args = (path, name, int(number))[:conversions]
    try:
        return template % args
    except (TypeError, ValueError) as exc:
        raise Refused(f"FileTemplate {template!r} does not fit (path, name, number): {exc}") from exc


def ndarray_base_records(r: RecordSet, *, port: str, frame_shape: tuple[int, int], data_type: str,
                         attributes_xml: str = "", driver: bool = False,
                         data_type_check: Any = None) -> dict[str, Any]:
    """The records every areaDetector driver and plugin has (NDArrayBase.template); a ``driver``
    has ``DataType`` and ``ColorMode`` settings too (a plugin only their readbacks)."""
    h, w = frame_shape
    out = {
        "unique_id": r.long("UniqueId_RBV"),
        "array_counter": r.setting("long", "ArrayCounter", 0)[1],
        "time_stamp": r.double("TimeStamp_RBV"),
    }
    r.string("PortName_RBV", port)
    out["attributes_file"] = r.text("NDAttributesFile", attributes_xml)
    for name, value in (("ArraySizeX_RBV", w), ("ArraySizeY_RBV", h), ("ArraySizeZ_RBV", 0), ("ArraySize0_RBV", w),
                        ("ArraySize1_RBV", h), ("ArraySize2_RBV", 0), ("NDimensions_RBV", 2)):
        r.long(name, value)
    if driver:
        out["data_type"] = r.setting("enum", "DataType", data_type, choices=DATA_TYPES, check=data_type_check)[1]
        r.long("DataType_RBV.DISA", 0)  # the record's disable field (ophyd reads it)
        r.setting("enum", "ColorMode", "Mono", choices=COLOR_MODES)
    else:
        r.enum("DataType_RBV", data_type, choices=DATA_TYPES)
        r.enum("ColorMode_RBV", "Mono", choices=COLOR_MODES)
    r.string("ADCoreVersion_RBV", "3.12.1")
    r.string("DriverVersion_RBV", "edge_ptycho_bluesky sim")
    return out


DATA_TYPES = ["Int8", "UInt8", "Int16", "UInt16", "Int32", "UInt32", "Int64", "UInt64", "Float32", "Float64"]
COLOR_MODES = ["Mono", "Bayer", "RGB1", "RGB2", "RGB3", "YUV444", "YUV422", "YUV421"]


class HDF5Writer:
    """The ``HDF1:`` plugin; the driver calls :meth:`write` with each frame while capturing."""

    def __init__(self, prefix: str, *, frame_shape: tuple[int, int], data_type: str = "UInt32") -> None:
        r = self.records = RecordSet(prefix)
        self.prefix = prefix
        base = ndarray_base_records(r, port="FileHDF1", frame_shape=frame_shape, data_type=data_type)
        self.unique_id, self.array_counter = base["unique_id"], base["array_counter"]
        h, w = frame_shape
        r.long("ArraySize0", w)
        r.long("ArraySize1", h)
        r.long("ArraySize2", 0)
        r.string("PluginType_RBV", "NDFileHDF5")
        self.file_path = r.setting("text", "FilePath", "", check=self._check_path)[1]
        self.path_exists = r.enum("FilePathExists_RBV", "No", choices=YES_NO)
        self.file_name = r.setting("text", "FileName", "")[1]
        self.template = r.setting("text", "FileTemplate", "%s%s_%6.6d.h5")[1]
        self.full_name = r.text("FullFileName_RBV", "")
        self.file_number, self.file_number_rbv = r.setting("long", "FileNumber", 0)
        self.auto_increment = r.setting("enum", "AutoIncrement", "Yes", choices=YES_NO)[1]
        r.setting("enum", "FileWriteMode", "Stream", choices=["Single", "Capture", "Stream"])
        self.num_capture = r.setting("long", "NumCapture", 0, check=_non_negative("NumCapture"))[1]
        self.num_captured = r.long("NumCaptured_RBV", 0)
        self.capture = r.enum("Capture", "Done", choices=["Done", "Capture"], on_put=self._put_capture)
        self.capture_rbv = r.enum("Capture_RBV", "Done", choices=["Done", "Capture"])
        self.create_directory = r.setting("long", "CreateDirectory", 0)[1]
        for name, value in (("LazyOpen", "No"), ("SWMRMode", "Yes"), ("ChunkSizeAuto", "Yes"), ("PositionMode", "No"),
                            ("StoreAttr", "Yes"), ("StorePerform", "No"), ("AutoSave", "No"),
                            ("BlockingCallbacks", "No")):
            r.setting("enum", name, value, choices=YES_NO)
        r.setting("enum", "Compression", "None", choices=["None", "N-bit", "szip", "zlib", "Blosc", "BSLZ4", "LZ4",
                                                          "JPEG"])
        r.setting("long", "NumFramesChunks", 1, check=_non_negative("NumFramesChunks"))
        r.setting("long", "NumExtraDims", 0)
        r.setting("text", "XMLFileName", "")
        r.enum("FlushNow", "No", choices=YES_NO, on_put=self._put_flush)
        r.setting("string", "NDArrayPort", "SIM1")
        r.setting("enum", "EnableCallbacks", "Enable", choices=["Disable", "Enable"])
        r.setting("long", "NDArrayAddress", 0)
        r.setting("long", "QueueSize", 2000)
        for axis in ("X", "Y", "N"):  # extra dimensions: none
            r.setting("long", f"ExtraDimSize{axis}", 1)
            r.string(f"ExtraDimName{axis}_RBV", "")
        for name in ("Dim0SA", "Dim1SA", "Dim2SA"):
            r.long(name, 0)
        r.text("WriteMessage", "")
        r.long("WriteStatus", 0)
        self._file: h5py.File | None = None
        self._attribute_names: tuple[str, ...] = ()
        self._ended = asyncio.Event()
        self._ended.set()
        self._write_lock = asyncio.Lock()

    @property
    def capturing(self) -> bool:
        return self._file is not None

    # -- records -----------------------------------------------------------------------------
    async def _check_path(self, value: str) -> str:
        path = str(value)
        if path and not path.endswith(("/", "\\")):
            path += "/"
        if path and int(self.create_directory.value) != 0:
            os.makedirs(path, exist_ok=True)
        exists = bool(path) and os.path.isdir(path) and os.access(path, os.W_OK)
        await self.path_exists.write("Yes" if exists else "No")
        return path

    async def _put_capture(self, value: Any) -> Any:
        start = value in (1, "Capture")
        if not start:
            await self.close_file("Capture = 0")
            return "Done"
        if self._file is not None:
            raise Refused(f"{self.prefix}Capture: already capturing to {self.full_name.value}")
        if self.path_exists.value != "Yes":
            raise Refused(f"{self.prefix}FilePath {self.file_path.value!r} does not exist or is not writable")
        full = format_file_name(str(self.template.value), str(self.file_path.value), str(self.file_name.value),
                                int(self.file_number.value))
        if os.path.exists(full):
            raise Refused(f"{self.prefix}: {full} exists already; areaDetector would overwrite it, this IOC "
                          "keeps it (change FileName or FileNumber)")
        self._file = h5py.File(full, "w", libver="latest")
        self._attribute_names = ()
        await self.full_name.write(full)
        await self.num_captured.write(0)
        if self.auto_increment.value == "Yes":
            await self.file_number.write(int(self.file_number.value) + 1)
        await self.capture_rbv.write("Capture")
        self._ended.clear()
        logger.info("%s: capturing to %s", self.prefix, full)
        await self.capture.write("Capture", verify_value=False)  # the record reads Capture until the end
        await self._ended.wait()  # a waiting client is answered when the file is closed
        raise SkipWrite()

    async def _put_flush(self, value: Any) -> str:
        if self._file is not None:
            async with self._write_lock:
                self._file.flush()
        return "No"

    async def close_file(self, why: str) -> None:
        async with self._write_lock:
            f, self._file = self._file, None
            if f is not None:
                try:
                    f.close()
                except Exception:
                    logger.exception("%s: closing %s failed", self.prefix, self.full_name.value)
        if f is not None:
            logger.info("%s: capture ended (%s): %d frames in %s", self.prefix, why, self.num_captured.value,
                        self.full_name.value)
        await self.capture.write("Done", verify_value=False)
        await self.capture_rbv.write("Done")
        self._ended.set()

    # -- frames --------------------------------------------------------------------------------
    async def write(self, frames: NDArray[Any], first_unique_id: int, timestamps: Sequence[float],
                    attributes: Sequence[Mapping[str, float]]) -> None:
        """Append a batch of frames (the driver's callback); a no-op unless capturing."""
        if self._file is None:
            return
        async with self._write_lock:
            f = self._file
            if f is None:
                return
            n = int(self.num_captured.value)
            limit = int(self.num_capture.value)
            take = len(frames) if not limit else min(len(frames), limit - n)
            try:
                await asyncio.to_thread(self._append, f, n, frames[:take], first_unique_id, timestamps[:take],
                                        attributes[:take])
            except Exception as exc:
                logger.exception("%s: writing frames %d-%d failed", self.prefix, n, n + take - 1)
                await self.records.pvdb[self.prefix + "WriteMessage"].write(str(exc)[:200])
                await self.records.pvdb[self.prefix + "WriteStatus"].write(1)
                raise
        await self.num_captured.write(n + take)
        await self.unique_id.write(first_unique_id + take - 1)
        await self.array_counter.write(int(self.array_counter.value) + take)
        if limit and n + take >= limit:
            await self.close_file(f"NumCapture = {limit} frames written")

    def _append(self, f: h5py.File, n: int, frames: NDArray[Any], first_unique_id: int, timestamps: Sequence[float],
                attributes: Sequence[Mapping[str, float]]) -> None:
        shape = frames.shape[1:]
        if n == 0:  # the layout is fixed by the first frame, then SWMR
            f.create_dataset(FRAME_DATASET, shape=(0, *shape), maxshape=(None, *shape), chunks=(1, *shape),
                             dtype=frames.dtype)
            self._attribute_names = ("NDArrayUniqueId", "NDArrayTimeStamp", *attributes[0])
            for name in self._attribute_names:
                f.create_dataset(f"{ATTRIBUTE_GROUP}/{name}", shape=(0,), maxshape=(None,),
                                 chunks=(ATTRIBUTE_CHUNK,), dtype="<i4" if name == "NDArrayUniqueId" else "<f8")
            f.swmr_mode = True
        stop = n + len(frames)
        columns = {"NDArrayUniqueId": np.arange(first_unique_id, first_unique_id + len(frames)),
                   "NDArrayTimeStamp": np.asarray(timestamps, dtype=np.float64)}
        for name in self._attribute_names[2:]:
            columns[name] = np.array([a.get(name, np.nan) for a in attributes], dtype=np.float64)
        data = f[FRAME_DATASET]
        data.resize(stop, axis=0)
        data[n:stop] = frames
        for name in self._attribute_names:
            d = f[f"{ATTRIBUTE_GROUP}/{name}"]
            d.resize(stop, axis=0)
            d[n:stop] = columns[name]
        f.flush()


def _non_negative(name: str):
    async def check(value: Any) -> int:
        if int(value) < 0:
            raise Refused(f"{name} must be >= 0, got {value!r}")
        return int(value)
    return check


"""An ADSimDetector-compatible driver (``PREFIX + "cam1:"``) whose frames are the simulated
sample's diffraction at the stage's position, with its PVA plugin (``PREFIX + "Pva1:Image"``).

The records are those ophyd's ``SimDetectorCam`` and ophyd-async's ``adsimdetector`` use:
``Acquire`` (a busy record: a client waiting on its put is answered when the acquisition ends),
``AcquireTime``, ``AcquirePeriod``, ``NumImages``, ``ImageMode`` (Single, Multiple, Continuous),
``TriggerMode``, ``DataType``, ``ArrayCounter``, ``DetectorState_RBV``, ``NDAttributesFile``...
Frame ``i`` of an acquisition is exposed from ``t0 + i * max(AcquirePeriod, AcquireTime)`` for
``AcquireTime``; the stage position at mid-exposure decides what it sees. Frames whose time has
come are simulated together (a thread, so the records stay responsive) and then, in order,
published as NTNDArrays (``uniqueId``, time stamps, NDAttributes) and handed to the HDF5 writer.

NDAttributes follow ``NDAttributesFile`` (XML, or the path of an XML file), as areaDetector's:
``type="EPICS_PV"`` attributes read this IOC's records (a motor's ``.RBV`` at the frame's
mid-exposure), ``type="PARAM"`` ones the driver's ``ACQ_TIME``, ``ACQ_PERIOD``, ``UNIQUE_ID``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from caproto import SkipWrite
from numpy.typing import NDArray

from .hdf_writer import DATA_TYPES, HDF5Writer, ndarray_base_records
from .records import RecordSet, Refused

__all__ = ["NDAttribute", "SimDetectorDriver", "default_attributes_xml", "parse_attributes"]

logger = logging.getLogger(__name__)

STATES = ["Idle", "Acquire", "Readout", "Correct", "Saving", "Aborting", "Error", "Waiting", "Initializing",
          "Disconnected", "Aborted"]
#: Frame data types the simulated driver produces (counts converted, clipped to the type's range).
SUPPORTED_TYPES = {"UInt16": np.uint16, "UInt32": np.uint32, "Int32": np.int32, "Float32": np.float32}
#: Most frames simulated in one go when acquisition runs behind its schedule.
MAX_BATCH = 64


@dataclass(frozen=True)
class NDAttribute:
    """One NDAttribute: ``name``, ``kind`` (``EPICS_PV`` or ``PARAM``) and its ``source``."""

    name: str
    kind: str
    source: str


def default_attributes_xml(prefix: str) -> str:
    """The IOC's NDAttributes at start: the stage readbacks (``SampleX`` = ``m1.RBV``, ``SampleY`` =
    ``m2.RBV``, um) and the exposure (``exposure_s``, what the edge worker scales counts by)."""
    return ("<?xml version=\"1.0\" standalone=\"no\" ?><Attributes>"
            f"<Attribute name=\"SampleX\" type=\"EPICS_PV\" source=\"{prefix}m1.RBV\" dbrtype=\"DBR_DOUBLE\" "
            "description=\"stage x readback (um)\"/>"
            f"<Attribute name=\"SampleY\" type=\"EPICS_PV\" source=\"{prefix}m2.RBV\" dbrtype=\"DBR_DOUBLE\" "
            "description=\"stage y readback (um)\"/>"
            "<Attribute name=\"exposure_s\" type=\"PARAM\" source=\"ACQ_TIME\" datatype=\"DOUBLE\" "
            "description=\"exposure time (s)\"/></Attributes>")


def parse_attributes(text: str) -> list[NDAttribute]:
    """The attributes of an NDAttributes XML string or file (``""``: none)."""
    text = text.strip()
    if not text:
        return []
    if "<Attributes" not in text:
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise Refused(f"NDAttributesFile {text!r} is neither XML nor a readable file: {exc}") from exc
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise Refused(f"NDAttributesFile is not valid XML: {exc}") from exc
    out = []
    for element in root:
        name, kind, source = (element.attrib.get(k, "") for k in ("name", "type", "source"))
        if not name or not source or kind not in ("EPICS_PV", "PARAM"):
            raise Refused(f"NDAttribute {element.attrib!r}: needs a name, a source and type EPICS_PV or PARAM")
        out.append(NDAttribute(name, kind, source))
    return out


class SimDetectorDriver:
    """The ``cam1:`` driver.

    Parameters
    ----------
    prefix
        Record prefix (``"13SIM1:cam1:"``).
    measure
        ``measure(xy_um (M, 2), exposure_s) -> (M, H, W)`` counts (the simulated sample).
    positions
        Motor ``.RBV`` record names -> ``position(t_monotonic)`` (the axes' exact positions).
    pvdb
        Every record of the IOC (for EPICS_PV attributes that are not motor readbacks).
    axes
        The two ``.RBV`` names whose positions are the beam position on the sample (x, y; um).
    writer
        The HDF5 plugin fed with each frame.
    publish
        ``publish(frame, unique_id, attributes, timestamp)``: the PVA plugin (None: no stream).
    frame_shape
        Detector size.
    attributes_xml
        The NDAttributes at start.
    """

    def __init__(self, prefix: str, *, measure: Callable[[NDArray[np.float64], float], NDArray[Any]],
                 positions: Mapping[str, Callable[[float], float]], pvdb: Mapping[str, Any],
                 axes: tuple[str, str], writer: HDF5Writer,
                 publish: Callable[[NDArray[Any], int, dict[str, float], float], None] | None,
                 frame_shape: tuple[int, int], attributes_xml: str = "") -> None:
        self.prefix = prefix
        self._measure, self._positions, self._pvdb, self._axes = measure, positions, pvdb, axes
        self.writer, self._publish = writer, publish
        r = self.records = RecordSet(prefix)
        base = ndarray_base_records(r, port="SIM1", frame_shape=frame_shape, data_type="UInt32",
                                    attributes_xml=attributes_xml, driver=True,
                                    data_type_check=self._check_data_type)
        self.unique_id, self.array_counter_rbv = base["unique_id"], base["array_counter"]
        self.array_counter = r.pvdb[prefix + "ArrayCounter"]
        self.array_counter.on_put = self._put_counter
        self.time_stamp = base["time_stamp"]
        base["attributes_file"].on_put = self._put_attributes
        self._attributes = parse_attributes(attributes_xml)
        self.acquire_time = r.setting("double", "AcquireTime", 0.01, check=self._check_time("AcquireTime", 0.0),
                                      units="s", precision=6)[1]
        self.acquire_period = r.setting("double", "AcquirePeriod", 0.0, check=self._check_time("AcquirePeriod", None),
                                        units="s", precision=6)[1]
        self.num_images = r.setting("long", "NumImages", 1, check=self._check_num_images)[1]
        self.image_mode = r.setting("enum", "ImageMode", "Single", choices=["Single", "Multiple", "Continuous"])[1]
        r.setting("enum", "TriggerMode", "Internal", choices=["Internal", "External"], check=self._check_trigger)
        self.data_type = base["data_type"]
        h, w = frame_shape
        for name, value in (("SizeX", w), ("SizeY", h), ("MinX", 0), ("MinY", 0), ("BinX", 1), ("BinY", 1)):
            r.setting("long", name, value, check=self._fixed(name, value))
        r.long("MaxSizeX_RBV", w)
        r.long("MaxSizeY_RBV", h)
        r.long("ArraySize_RBV", w * h * 4)
        r.setting("double", "Gain", 1.0)
        r.setting("long", "NumExposures", 1, check=self._fixed("NumExposures", 1))
        r.long("NumExposuresCounter_RBV", 0)
        r.setting("enum", "ArrayCallbacks", "Enable", choices=["Disable", "Enable"])
        for name in ("ReverseX", "ReverseY"):
            r.setting("enum", name, "No", choices=["No", "Yes"])
        # ADSimDetector's own pattern settings (unused: the frames are the sample's diffraction)
        for name in ("GainRed", "GainGreen", "GainBlue", "GainX", "GainY"):
            r.setting("double", name, 1.0)
        for name in ("PeakNumX", "PeakNumY", "PeakStartX", "PeakStartY", "PeakStepX", "PeakStepY", "PeakWidthX",
                     "PeakWidthY"):
            r.setting("long", name, 1)
        self.num_images_counter = r.long("NumImagesCounter_RBV", 0)
        self.state = r.enum("DetectorState_RBV", "Idle", choices=STATES)
        self.message = r.text("StatusMessage_RBV", "Waiting for acquire command")
        self.acquire = r.enum("Acquire", "Done", choices=["Done", "Acquire"], on_put=self._put_acquire)
        self.acquire_rbv = r.enum("Acquire_RBV", "Done", choices=["Done", "Acquire"])
        r.enum("WaitForPlugins", "No", choices=["No", "Yes"])
        for name, value in (("Manufacturer_RBV", "Simulated detector"), ("Model_RBV", "edge_ptycho_bluesky IOC"),
                            ("SerialNumber_RBV", "0"), ("SDKVersion_RBV", "n/a"), ("FirmwareVersion_RBV", "n/a")):
            r.string(name, value)
        self._task: asyncio.Task[None] | None = None
        self._finishing = False  # the acquisition has ended and is posting its final state
        self._stop = False
        self.frames_total = 0
        self.late_frames = 0

    # -- settings --------------------------------------------------------------------------------
    @staticmethod
    def _check_time(name: str, minimum_exclusive: float | None):
        async def check(value: float) -> float:
            value = float(value)
            ok = math.isfinite(value) and (value > minimum_exclusive if minimum_exclusive is not None else value >= 0)
            if not ok:
                bound = f"> {minimum_exclusive}" if minimum_exclusive is not None else ">= 0"
                raise Refused(f"{name} must be {bound} seconds, got {value!r}")
            return value
        return check

    async def _check_num_images(self, value: int) -> int:
        if int(value) < 1:
            raise Refused(f"NumImages must be >= 1, got {value!r}")
        return int(value)

    async def _check_trigger(self, value: Any) -> Any:
        if value in (1, "External"):
            raise Refused("TriggerMode External: this simulated detector has no trigger input; use Internal")
        return value

    async def _check_data_type(self, value: Any) -> Any:
        name = DATA_TYPES[value] if isinstance(value, int) else str(value)
        if name not in SUPPORTED_TYPES:
            raise Refused(f"DataType {name}: the simulated detector gives {', '.join(SUPPORTED_TYPES)}")
        return value

    @staticmethod
    def _fixed(name: str, fixed: int):
        async def check(value: int) -> int:
            if int(value) != fixed:
                raise Refused(f"{name} is fixed at {fixed} on the simulated detector, got {value!r}")
            return fixed
        return check

    async def _put_counter(self, value: int) -> int:
        await self.array_counter_rbv.write(int(value))
        return int(value)

    async def _put_attributes(self, value: Any) -> Any:
        text = value if isinstance(value, str) else bytes(value).decode(errors="replace")
        self._attributes = parse_attributes(text)
        return value

    # -- acquisition -------------------------------------------------------------------------------
    async def _put_acquire(self, value: Any) -> Any:
        if value not in (1, "Acquire"):
            self._stop = True
            if self._task is not None:
                await asyncio.shield(self._task)
            return "Done"
        if self._task is not None and not self._task.done():
            if not self._finishing:
                raise SkipWrite()  # already acquiring: as areaDetector, a second Acquire = 1 changes nothing
            await asyncio.shield(self._task)  # a client saw Done and triggers again: the next acquisition
        self._stop, self._finishing = False, False
        await self.acquire.write("Acquire", verify_value=False)
        await self.acquire_rbv.write("Acquire")
        await self.state.write("Acquire")
        await self.message.write("Acquiring data")
        self._task = asyncio.get_running_loop().create_task(self._acquire())
        await asyncio.shield(self._task)  # a client waiting on the put is answered at the end
        raise SkipWrite()

    async def _acquire(self) -> None:
        mode = self.image_mode.value
        count = 1 if mode == "Single" else int(self.num_images.value) if mode == "Multiple" else None
        exposure = float(self.acquire_time.value)
        period = max(float(self.acquire_period.value), exposure)
        dtype = SUPPORTED_TYPES[str(self.data_type.value)]
        attributes = list(self._attributes)
        await self.num_images_counter.write(0)
        t0, done, failed = time.monotonic(), 0, None
        try:
            while (count is None or done < count) and not self._stop:
                due = int((time.monotonic() - t0 - exposure) // period) + 1  # frames whose exposure has ended
                if due <= done:
                    await asyncio.sleep(max(t0 + done * period + exposure - time.monotonic(), 0.0))
                    continue
                if due - done > 1:
                    self.late_frames += due - done - 1
                n = min(due - done, MAX_BATCH, (count - done) if count is not None else MAX_BATCH)
                mid = [t0 + (done + k) * period + exposure / 2 for k in range(n)]
                xy = np.array([[self._positions[a](t) for a in self._axes] for t in mid])
                frames = await asyncio.to_thread(self._measure, xy, exposure)
                await self._deliver(np.asarray(frames).astype(dtype, copy=False), exposure, period, attributes, mid)
                done += n
        except Exception as exc:  # the acquisition ends in Error; what was written stays written
            failed = exc
            logger.exception("%s: acquisition failed after %d frames", self.prefix, done)
        finally:
            self._finishing = True
            final = "Error" if failed else "Aborted" if self._stop and (count is None or done < count) else "Idle"
            await self.state.write(final)
            await self.message.write(f"{final}: {failed}" if failed else f"{final}: {done} frames")
            await self.acquire.write("Done", verify_value=False)
            await self.acquire_rbv.write("Done")  # last: clients (ophyd's SingleTrigger) watch the readback

    async def _deliver(self, frames: NDArray[Any], exposure: float, period: float, attributes: list[NDAttribute],
                       t_mid: list[float]) -> None:
        """Publish each frame (PVA), then hand them to the file writer and count them (once per batch:
        clients see the counters step by the batch when acquisition runs behind)."""
        first = int(self.unique_id.value) + 1
        offset = time.time() - time.monotonic()
        stamps = [offset + t for t in t_mid]
        values = [{a.name: self._attribute_value(a, exposure, period, t, first + k) for a in attributes}
                  for k, t in enumerate(t_mid)]
        if self._publish is not None:
            for k, frame in enumerate(frames):
                self._publish(frame, first + k, values[k], stamps[k])
        await self.writer.write(frames, first, stamps, values)
        n = len(frames)
        self.frames_total += n
        await self.unique_id.write(first + n - 1)
        await self.array_counter_rbv.write(int(self.array_counter_rbv.value) + n)
        await self.num_images_counter.write(int(self.num_images_counter.value) + n)
        await self.time_stamp.write(stamps[-1])

    def _attribute_value(self, attribute: NDAttribute, exposure: float, period: float, t_mid: float,
                         unique_id: int) -> float:
        if attribute.kind == "PARAM":
            params = {"ACQ_TIME": exposure, "ACQ_PERIOD": period, "UNIQUE_ID": float(unique_id)}
            return float(params.get(attribute.source, math.nan))
        if attribute.source in self._positions:
            return float(self._positions[attribute.source](t_mid))
        channel = self._pvdb.get(attribute.source)
        try:
            return float(channel.value)
        except (AttributeError, TypeError, ValueError):
            return math.nan

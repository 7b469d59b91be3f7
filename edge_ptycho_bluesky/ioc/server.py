"""The simulated beamline IOC: two motor axes, an ADSimDetector-compatible detector with its HDF5
and PVA plugins, one Channel Access server (caproto) and one pvAccess server (pvapy).

Records (``PREFIX`` e.g. ``13SIM1:``)::

    PREFIX m1, PREFIX m2        motor records (um): .VAL .RBV .DMOV .VELO .HLM .LLM .STOP ...
    PREFIX cam1:                 the detector driver (Acquire, AcquireTime, ImageMode, NumImages ...)
    PREFIX HDF1:                 the HDF5 file writer (FilePath, FileName, Capture, NumCaptured_RBV ...)
    PREFIX Pva1:Image            pvAccess NTNDArray of every frame, with its NDAttributes
                                 (SampleX, SampleY: the stage readbacks at the frame; exposure_s)

Run it with ``edge-ptycho ioc --prefix PREFIX`` (or :class:`IocProcess` from Python). It serves
loopback only unless ``--host`` says otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

import numpy as np

from edge_ptycho_bluesky.sim import Geometry, make_sample

from .detector import SimDetectorDriver, default_attributes_xml
from .hdf_writer import HDF5Writer, ndarray_base_records
from .motor import MotorAxis
from .records import RecordSet

__all__ = ["DEFAULT_PREFIX", "READY_LINE", "BeamlineIOC", "serve_forever"]

logger = logging.getLogger(__name__)

DEFAULT_PREFIX = "13SIM1:"
#: What the IOC prints on stdout once its servers answer (``IocProcess`` waits for it).
READY_LINE = "edge-ptycho ioc ready"
#: Set by a parent that starts the IOC as its child (tests, the profile): the IOC stops when that
#: process has gone, however it ended, instead of holding the Channel Access search port.
PARENT_ENV = "EDGE_PTYCHO_IOC_PARENT_PID"


class BeamlineIOC:
    """The records of the simulated beamline (``pvdb``) and the pvAccess image channel.

    Parameters
    ----------
    prefix
        Prefix of every record.
    sample
        ``"train"``, ``"varied"`` or ``"test"`` (:func:`~edge_ptycho_bluesky.sim.make_sample`).
    extent_um
        Largest |x|, |y| of the beam on the sample; the axes' soft limits match it.
    seed
        Seed of the sample and of the photon noise.
    pva
        Serve ``PREFIX Pva1:Image`` (pvapy); False for a CA-only IOC.
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, sample: str = "test", extent_um: float = 1.6,
                 seed: int = 0, velocity_um_s: float = 200.0, pva: bool = True) -> None:
        self.prefix = prefix
        self.sample = make_sample(sample, extent_um=extent_um, geometry=Geometry(), seed=seed)
        rng = np.random.default_rng(seed)
        x_max, y_max = self.sample.stage_limits_um()
        self.m1 = MotorAxis(prefix, "m1", limits=(-x_max, x_max), velocity=velocity_um_s)
        self.m2 = MotorAxis(prefix, "m2", limits=(-y_max, y_max), velocity=velocity_um_s)
        shape = (self.sample.geometry.frame_size,) * 2
        self.hdf = HDF5Writer(prefix + "HDF1:", frame_shape=shape)
        self.publisher: Any = None
        pva_records = RecordSet(prefix + "Pva1:")
        ndarray_base_records(pva_records, port="PVA1", frame_shape=shape, data_type="UInt32")
        self._pva_enabled = pva_records.setting("enum", "EnableCallbacks", "Enable", choices=["Disable", "Enable"])[1]
        if pva:
            from edge_ptycho_bluesky.edge.pva_servers import FramePublisher

            self.publisher = FramePublisher(prefix + "Pva1:Image")
        self.pvdb: dict[str, Any] = {}
        positions = {self.m1.name + ".RBV": self.m1.position, self.m2.name + ".RBV": self.m2.position}
        self.cam = SimDetectorDriver(
            prefix + "cam1:", measure=lambda xy, exposure: self.sample.measure(xy, exposure, rng),
            positions=positions, pvdb=self.pvdb, axes=(self.m1.name + ".RBV", self.m2.name + ".RBV"),
            writer=self.hdf, publish=self._publish if pva else None, frame_shape=shape,
            attributes_xml=default_attributes_xml(prefix))
        for records in (self.m1.records, self.m2.records, self.cam.records, self.hdf.records, pva_records):
            self.pvdb.update(records.pvdb)

    @property
    def image_channel(self) -> str:
        return self.prefix + "Pva1:Image"

    def _publish(self, frame: Any, unique_id: int, attributes: dict[str, float], timestamp: float) -> None:
        if self._pva_enabled.value == "Enable":
            self.publisher.publish(frame, unique_id, attributes=attributes, timestamp=timestamp)

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None


async def serve(ioc: BeamlineIOC, host: str) -> None:
    """Serve ``ioc`` over Channel Access on ``host`` until cancelled."""
    from caproto.asyncio.server import Context

    ctx = Context(ioc.pvdb, [host])

    async def ready(async_lib: Any) -> None:
        print(READY_LINE, flush=True)

    await ctx.run(log_pv_names=False, startup_hook=ready)


async def _stop_with_parent(pid: int, task: asyncio.Task[None]) -> None:
    while os.getppid() == pid:
        await asyncio.sleep(1.0)
    logger.warning("the process that started this IOC (pid %d) has ended: stopping", pid)
    task.cancel()


def serve_forever(prefix: str = DEFAULT_PREFIX, *, host: str = "127.0.0.1", sample: str = "test",
                  extent_um: float = 1.6, seed: int = 0, velocity_um_s: float = 200.0, pva: bool = True,
                  save_probe: str | os.PathLike[str] | None = None, list_pvs: bool = False) -> int:
    """Serve the IOC until SIGINT/SIGTERM, or until the process named by ``EDGE_PTYCHO_IOC_PARENT_PID``
    ends (``edge-ptycho ioc``); ``list_pvs``: print the record names and return."""
    if host in ("127.0.0.1", "localhost"):  # pvAccess too: loopback only
        os.environ.setdefault("EPICS_PVAS_INTF_ADDR_LIST", "127.0.0.1")
    ioc = BeamlineIOC(prefix, sample=sample, extent_um=extent_um, seed=seed, velocity_um_s=velocity_um_s, pva=pva)
    try:
        if list_pvs:
            print("\n".join(sorted(ioc.pvdb)))
            return 0
        if save_probe is not None:
            np.save(save_probe, ioc.sample.probe.astype(np.complex64))
        loop = asyncio.new_event_loop()
        task = loop.create_task(serve(ioc, host))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        parent = os.environ.get(PARENT_ENV, "")
        watcher = loop.create_task(_stop_with_parent(int(parent), task)) if parent.isdigit() else None
        try:
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            pass
        finally:  # frames already captured stay in a closed, readable file
            if watcher is not None:
                watcher.cancel()
            loop.run_until_complete(ioc.hdf.close_file("IOC stopped"))
            loop.close()
        return 0
    finally:
        ioc.close()

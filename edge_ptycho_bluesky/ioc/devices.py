"""The beamline of ``edge-ptycho ioc`` as a session sees it: stock ophyd-async devices only
(``adsimdetector.SimDetector`` with its HDF5 writer, ``epics.motor.Motor``), started and connected
by :func:`connect_ioc_beamline` (what the profile does with ``EDGE_PTYCHO_BEAMLINE=ioc``)."""

from __future__ import annotations

import atexit
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edge_ptycho_bluesky.sim import Geometry

from .process import IocProcess
from .server import DEFAULT_PREFIX

__all__ = ["IocBeamline", "connect_ioc_beamline", "ioc_answers"]

logger = logging.getLogger(__name__)

ENV_PREFIX = "EDGE_PTYCHO_IOC_PREFIX"
ENV_PROBE = "EDGE_PTYCHO_IOC_PROBE"


def ioc_answers(prefix: str, timeout: float = 1.0) -> bool:
    """Whether an IOC with this prefix answers over Channel Access (its detector's model record)."""
    from caproto.sync.client import read

    try:
        read(prefix + "cam1:Model_RBV", timeout=timeout)
        return True
    except Exception:
        return False


@dataclass
class IocBeamline:
    """``stage`` (``stage.x``, ``stage.y``: motors ``m1``, ``m2``, um), ``det`` (step and fly scans),
    ``plan_defaults`` (the plans' ``geometry=`` and ``probe=`` for this beamline), and the IOC
    process when this session started it."""

    prefix: str
    stage: Any
    det: Any
    plan_defaults: dict[str, Any] = field(default_factory=dict)
    process: IocProcess | None = None

    @property
    def image_channel(self) -> str:
        """The detector's NTNDArray stream (what the session's relay reads)."""
        return self.prefix + "Pva1:Image"


def _stage_class() -> type:
    from ophyd_async.core import Device
    from ophyd_async.epics.motor import Motor

    class Stage(Device):
        """Two stock motor records as ``x`` and ``y``."""

        def __init__(self, prefix: str, name: str = "") -> None:
            self.x = Motor(prefix + "m1")
            self.y = Motor(prefix + "m2")
            super().__init__(name=name)

    return Stage


def connect_ioc_beamline(frames_dir: str | os.PathLike[str], *, prefix: str | None = None,
                         log_dir: str | os.PathLike[str] | None = None, start: bool = True,
                         timeout: float = 60.0) -> IocBeamline:
    """Connect stock ophyd-async devices to the IOC ``prefix`` (``EDGE_PTYCHO_IOC_PREFIX``, default
    ``13SIM1:``), starting ``edge-ptycho ioc`` first when none answers and ``start``.

    Parameters
    ----------
    frames_dir
        Where the detector's HDF5 writer puts its files (Tiled must be able to read them).
    log_dir
        Where a started IOC logs (``ioc.log``) and saves its probe (``ioc-probe.npy``).
    """
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider, init_devices
    from ophyd_async.epics import adsimdetector
    from ophyd_async.epics.adcore import ADWriterFactory

    from .process import loopback_ca_env

    prefix = prefix or os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX
    process = None
    probe = os.environ.get(ENV_PROBE)
    if not ioc_answers(prefix):
        loopback_ca_env()
        if not ioc_answers(prefix) and start:
            log_dir = Path(log_dir or frames_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            probe = probe or str(log_dir / "ioc-probe.npy")
            process = IocProcess(prefix, ["--save-probe", probe], log_path=log_dir / "ioc.log").start(timeout)
            atexit.register(process.stop)
            logger.info("started the simulated IOC %s (log %s)", prefix, log_dir / "ioc.log")
        elif not ioc_answers(prefix):
            raise RuntimeError(f"no IOC answers on {prefix}cam1:Model_RBV: start one with `edge-ptycho ioc --prefix "
                               f"{prefix}` or check EPICS_CA_ADDR_LIST")
    Path(frames_dir).mkdir(parents=True, exist_ok=True)
    path_provider = StaticPathProvider(UUIDFilenameProvider(), Path(frames_dir))
    with init_devices():
        stage = _stage_class()(prefix, name="stage")
        det = adsimdetector.SimDetector(prefix, ADWriterFactory.hdf(path_provider), name="det")
    defaults: dict[str, Any] = {"geometry": Geometry()}  # the simulated IOC's
    if probe and Path(probe).is_file():
        defaults["probe"] = probe
    return IocBeamline(prefix=prefix, stage=stage, det=det, plan_defaults=defaults, process=process)

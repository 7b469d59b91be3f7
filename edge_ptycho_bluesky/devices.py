"""ophyd devices of the simulated ptychography beamline.

* :class:`PiezoStage` - x/y piezo stage (micrometres) with travel limits.
* :class:`PtychoDetector` - a 128 x 128 photon-counting detector that returns the far-field
  diffraction pattern of the sample at the stage's current position, with Poisson noise. Frames go
  to an HDF5 file (SWMR, one chunk per frame) announced by StreamResource/StreamDatum documents,
  the way areaDetector and ophyd-async detectors write; events carry only the hinted total counts.
* :func:`make_simulated_beamline` - the documented factory used by the profile, CLI and tests.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from event_model import compose_stream_resource
from ophyd import Component as Cpt
from ophyd import Device, Signal
from ophyd.sim import SynAxis
from ophyd.status import Status
from ophyd.utils import LimitError

from .sim import Geometry, SimulatedSample, beam_diameter_nm, make_sample

logger = logging.getLogger(__name__)

#: HDF5 dataset that holds the frames, as areaDetector's HDF5 plugin names it.
FRAME_DATASET = "/entry/data/data"


class PiezoAxis(SynAxis):
    """A simulated piezo axis in micrometres that refuses moves outside its travel."""

    def __init__(self, *args: Any, limits: tuple[float, float] = (-50.0, 50.0), **kwargs: Any) -> None:
        kwargs.setdefault("egu", "um")
        super().__init__(*args, **kwargs)
        self._limits = (float(limits[0]), float(limits[1]))

    @property
    def limits(self) -> tuple[float, float]:
        return self._limits

    @limits.setter
    def limits(self, value: tuple[float, float]) -> None:
        low, high = float(value[0]), float(value[1])
        if not low < high:
            raise ValueError(f"limits must be (low, high) with low < high, got {value!r}")
        self._limits = (low, high)

    def set(self, value: float) -> Status:  # type: ignore[override]
        low, high = self._limits
        if not np.isfinite(value) or not low <= value <= high:
            raise LimitError(f"{self.name}: {value} um is outside the travel [{low}, {high}] um")
        return super().set(value)


class PiezoStage(Device):
    """x/y piezo stage; positions in micrometres (``stage_x``, ``stage_y`` in documents)."""

    x = Cpt(PiezoAxis, delay=0.0, kind="hinted")
    y = Cpt(PiezoAxis, delay=0.0, kind="hinted")

    def set_limits(self, x: tuple[float, float], y: tuple[float, float]) -> None:
        """Travel of each axis (um)."""
        self.x.limits = x
        self.y.limits = y


class PtychoDetector(Device):
    """Simulated far-field detector for ptychography (step mode).

    Each ``trigger()`` reads the stage position, simulates the photon-counted diffraction pattern
    of ``sample`` there for ``exposure_time`` seconds, appends it to the HDF5 file opened by
    ``stage()``, and emits a StreamDatum. The hinted ``total_counts`` is read in the event so that
    BestEffortCallback draws a live scatter of the scan.

    Parameters
    ----------
    sample
        The simulated sample (object, probe, geometry).
    stage
        The stage whose ``x``/``y`` readbacks (um) give the beam position.
    write_dir
        Directory for the HDF5 frame files (created if missing).
    seed
        Seed of the photon-noise generator (None: fresh entropy).
    """

    exposure_time = Cpt(Signal, value=0.01, kind="config")
    total_counts = Cpt(Signal, value=0, kind="hinted")

    def __init__(self, *args: Any, sample: SimulatedSample, stage: PiezoStage, write_dir: str | Path,
                 seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample = sample
        self.stage_device = stage
        self.write_dir = Path(write_dir)
        self._rng = np.random.default_rng(seed)
        self._file: h5py.File | None = None
        self._path: Path | None = None
        self._bundle: Any = None
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()
        self._index = 0
        self._lock = threading.Lock()

    @property
    def image_key(self) -> str:
        return f"{self.name}_image"

    @property
    def frame_shape(self) -> tuple[int, int]:
        n = self.sample.geometry.frame_size
        return (n, n)

    @property
    def file_path(self) -> Path | None:
        """The HDF5 file of the current (or last) acquisition."""
        return self._path

    def stage(self) -> list[Any]:
        self.write_dir.mkdir(parents=True, exist_ok=True)
        path = self._path = (self.write_dir / f"{uuid.uuid4()}.h5").resolve()
        self._file = h5py.File(path, "w", libver="latest")
        self._file.create_dataset(FRAME_DATASET, shape=(0, *self.frame_shape), maxshape=(None, *self.frame_shape),
                                  chunks=(1, *self.frame_shape), dtype="<u4")
        self._file.swmr_mode = True
        self._index = 0
        self._bundle = compose_stream_resource(
            mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=self.image_key,
            parameters={"dataset": FRAME_DATASET, "chunk_shape": [1, *self.frame_shape], "swmr": True})
        self._asset_docs.append(("stream_resource", self._bundle.stream_resource_doc))
        logger.debug("%s: writing frames to %s", self.name, path)
        return super().stage()

    def unstage(self) -> list[Any]:
        if self._file is not None:
            self._file.close()
            self._file = None
        return super().unstage()

    def trigger(self) -> Status:
        if self._file is None:
            raise RuntimeError(f"{self.name} is not staged: run it inside a plan (the RunEngine stages it)")
        xy = (self.stage_device.x.readback.get(), self.stage_device.y.readback.get())
        frame = self.sample.measure(np.array([xy]), float(self.exposure_time.get()), self._rng)[0]
        with self._lock:
            dataset = self._file[FRAME_DATASET]
            dataset.resize(self._index + 1, axis=0)
            dataset[self._index] = frame
            dataset.flush()
            self._asset_docs.append(
                ("stream_datum", self._bundle.compose_stream_datum(indices={"start": self._index,
                                                                            "stop": self._index + 1})))
            self._index += 1
        self.total_counts.put(int(frame.sum(dtype=np.uint64)))
        status = Status(obj=self)
        status.set_finished()
        return status

    def describe(self) -> dict[str, dict[str, Any]]:
        description = super().describe()
        description[self.image_key] = {
            "source": f"sim:{self.name}:image",
            "dtype": "array",
            "dtype_numpy": "<u4",
            "shape": list(self.frame_shape),
            "external": "STREAM:",
        }
        return description

    def ptycho_metadata(self) -> dict[str, Any]:
        """Geometry and illumination facts that plans record under ``start["edge_ptycho"]``."""
        probe = self.sample.probe
        return {
            "geometry": self.sample.geometry.as_dict(),
            "beam_diameter_nm": beam_diameter_nm(probe, self.sample.geometry.pixel_size_nm),
            "photons_per_second": float(np.sum(np.abs(probe) ** 2)),
            "frame_shape": list(self.frame_shape),
            "image_key": self.image_key,
        }

    def collect_asset_docs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._lock:
            while self._asset_docs:
                yield self._asset_docs.popleft()


@dataclass
class SimulatedBeamline:
    """The devices of the simulated beamline and the sample they look at."""

    stage: PiezoStage
    det: PtychoDetector
    sample: SimulatedSample


def make_simulated_beamline(
    write_dir: str | Path,
    *,
    sample: str | SimulatedSample = "train",
    extent_um: float = 1.6,
    exposure_s: float = 0.01,
    geometry: Geometry = Geometry(),
    beam_diameter_nm: float = 800.0,
    photons_per_second: float = 1e9,
    seed: int | None = 0,
) -> SimulatedBeamline:
    """Build the simulated beamline: piezo stage ``stage`` and detector ``ptycho_det``.

    Parameters
    ----------
    write_dir
        Where the detector writes its HDF5 frame files (Tiled must be able to read them).
    sample
        ``"train"`` (random etched features), ``"test"`` (letters) or a ready
        :class:`~edge_ptycho_bluesky.sim.SimulatedSample`.
    extent_um
        Largest |x|, |y| (um) of the beam the sample must allow; the stage travel is set to match.
    exposure_s
        Initial detector exposure time (s).
    geometry, beam_diameter_nm, photons_per_second
        Beamline physics (see :mod:`edge_ptycho_bluesky.sim`).
    seed
        Seed of the phantom and of the photon noise.
    """
    if isinstance(sample, str):
        sample = make_sample(sample, extent_um=extent_um, geometry=geometry, beam_diameter_nm=beam_diameter_nm,
                             photons_per_second=photons_per_second, seed=seed)
    stage = PiezoStage(name="stage")
    x_max, y_max = sample.stage_limits_um()
    stage.set_limits((-x_max, x_max), (-y_max, y_max))
    det = PtychoDetector(name="ptycho_det", sample=sample, stage=stage, write_dir=write_dir, seed=seed)
    det.exposure_time.put(exposure_s)
    return SimulatedBeamline(stage=stage, det=det, sample=sample)

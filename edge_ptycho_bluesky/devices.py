"""ophyd devices of the simulated ptychography beamline.

* :class:`PiezoStage` - x/y piezo stage (micrometres) with travel limits.
* :class:`PtychoDetector` - a 128 x 128 photon-counting detector that returns the far-field
  diffraction pattern of the sample at the stage's current position, with Poisson noise. Frames go
  to an HDF5 file (SWMR, one chunk per frame) announced by StreamResource/StreamDatum documents,
  the way areaDetector and ophyd-async detectors write; events carry only the hinted total counts.
* :class:`FlyingPtychoDetector` - the same detector free-running for fly scans: frames stream over
  pvAccess (NTNDArray, as areaDetector's PVA plugin serves them) at a set rate and go to HDF5 with
  the stage position of each frame.
* :func:`make_simulated_beamline` - the documented factory used by the profile, CLI and tests.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from numpy.typing import NDArray
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


def _available_memory() -> int:
    """Bytes of memory available now (Linux ``MemAvailable``; physical memory elsewhere)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

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


class _SimulatedDetector(Device):
    """What the step and the fly detector share: the sample, the HDF5 folder, the metadata."""

    exposure_time = Cpt(Signal, value=0.01, kind="config")

    def __init__(self, *args: Any, sample: SimulatedSample, stage: PiezoStage, write_dir: str | Path,
                 seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sample = sample
        self.stage_device = stage
        self.write_dir = Path(write_dir)
        self._rng = np.random.default_rng(seed)
        self._file: h5py.File | None = None
        self._path: Path | None = None
        self._asset_docs: deque[tuple[str, dict[str, Any]]] = deque()
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

    def _open_file(self) -> Path:
        self.write_dir.mkdir(parents=True, exist_ok=True)
        path = self._path = (self.write_dir / f"{uuid.uuid4()}.h5").resolve()
        self._file = h5py.File(path, "w", libver="latest")
        self._file.create_dataset(FRAME_DATASET, shape=(0, *self.frame_shape), maxshape=(None, *self.frame_shape),
                                  chunks=(1, *self.frame_shape), dtype="<u4")
        logger.debug("%s: writing frames to %s", self.name, path)
        return path

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _image_description(self) -> dict[str, Any]:
        return {"source": f"sim:{self.name}:image", "dtype": "array", "dtype_numpy": "<u4",
                "shape": list(self.frame_shape), "external": "STREAM:"}

    def ptycho_metadata(self) -> dict[str, Any]:
        """Geometry and illumination facts that plans record in the run's edge_ptycho record
        (:class:`~edge_ptycho_bluesky.runs.EdgePtychoMeta`)."""
        probe = self.sample.probe
        return {
            "geometry": self.sample.geometry.as_dict(),
            "beam_diameter_nm": beam_diameter_nm(probe, self.sample.geometry.pixel_size_nm),
            "photons_per_second": float(np.sum(np.abs(probe) ** 2)),
            "frame_shape": list(self.frame_shape),
            "image_key": self.image_key,
        }

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        with self._lock:
            while self._asset_docs:
                yield self._asset_docs.popleft()


class PtychoDetector(_SimulatedDetector):
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

    total_counts = Cpt(Signal, value=0, kind="hinted")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._bundle: Any = None
        self._index = 0

    def stage(self) -> list[Any]:
        path = self._open_file()
        self._file.swmr_mode = True
        self._index = 0
        self._bundle = compose_stream_resource(
            mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=self.image_key,
            parameters={"dataset": FRAME_DATASET, "chunk_shape": [1, *self.frame_shape], "swmr": True})
        self._asset_docs.append(("stream_resource", self._bundle.stream_resource_doc))
        return super().stage()

    def unstage(self) -> list[Any]:
        self._close_file()
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
        description[self.image_key] = self._image_description()
        return description


#: Default pvAccess channel of the simulated fly-scan detector.
DEFAULT_FLY_CHANNEL = "sim:ptycho_fly:Pva1:Image"
#: HDF5 datasets of the fly detector's per-frame stage positions (areaDetector NDAttributes layout).
POSITION_DATASETS = ("/entry/instrument/NDAttributes/stage_x", "/entry/instrument/NDAttributes/stage_y")


class FlyingPtychoDetector(_SimulatedDetector):
    """Simulated detector for fly scans: frames stream over pvAccess at a set rate, and go to HDF5.

    It plays the part of an areaDetector with its PVA plugin, HDF5 plugin and position capture
    (a PandA, say): :meth:`kickoff` starts free-running acquisition at ``frame_rate`` while the
    stage follows the trajectory; each frame is published as an NTNDArray (with its position,
    run uid and frame index as attributes) the moment it is "taken", so an edge worker monitoring
    the channel sees it at once; frames and the stage positions at each frame are appended to one
    HDF5 file in blocks, announced by StreamResource/StreamDatum documents (data keys
    ``<name>_image`` and the stage's ``stage_x``/``stage_y``), which :meth:`collect_asset_docs`
    hands to the RunEngine during the fly (``collect_while_completing``): one StreamDatum per data key
    for all frames written since the last collect.

    The diffraction patterns are simulated in :meth:`prepare` (the forward model costs ~5 ms a
    frame, far more than a 2 kHz frame period); kickoff then streams them in real time.

    Parameters
    ----------
    sample, stage, write_dir, seed
        As for :class:`PtychoDetector`.
    channel
        pvAccess channel (NTNDArray) to serve the frames on, like areaDetector's
        ``<prefix>Pva1:Image``; a private pvAccess server is started at the first scan.
    publisher
        Instead of ``channel``: an object with ``publish(frame, unique_id, pos=, scan_uid=,
        attributes=)`` and a ``channel`` attribute (e.g. the edge session's
        :class:`~edge_ptycho_bluesky.edge.FramePublisher`, so the fly frames reach its worker).
    block_frames
        Frames per HDF5 write (and per StreamDatum).
    """

    frame_rate = Cpt(Signal, value=2000.0, kind="config")
    scan_uid = Cpt(Signal, value="", kind="omitted")

    def __init__(self, *args: Any, channel: str | None = None, publisher: Any = None, block_frames: int = 100,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if block_frames < 1:
            raise ValueError(f"block_frames must be >= 1, got {block_frames}")
        self.channel = channel
        self.publisher = publisher
        self.block_frames = int(block_frames)
        self._frames: NDArray[np.uint32] | None = None
        self._xy: NDArray[np.float64] | None = None
        self._bundles: dict[str, Any] = {}
        self._index = self._announced = 0
        self._thread: threading.Thread | None = None
        self._abort = threading.Event()
        self._complete: Status | None = None
        self.stats: dict[str, float] = {}
        #: Most memory ``prepare`` may use for the simulated frames (None: half the available memory).
        self.max_prepare_bytes: int | None = None
        self.exposure_time.put(0.0005)

    @property
    def position_keys(self) -> tuple[str, str]:
        """Data keys of the per-frame stage positions (the stage readbacks' names)."""
        return self.stage_device.x.name, self.stage_device.y.name

    @property
    def streamed_to(self) -> str | None:
        """The pvAccess channel the frames are served on."""
        return getattr(self.publisher, "channel", None) or self.channel

    def ptycho_metadata(self) -> dict[str, Any]:
        meta = super().ptycho_metadata()
        meta.update(mode="fly", frame_rate_hz=float(self.frame_rate.get()), streamed_to=self.streamed_to)
        return meta

    # -- fly protocol ---------------------------------------------------------------------
    def prepare(self, value: dict[str, Any]) -> Status:
        """Simulate the frames of the coming fly scan: ``value = {"positions": (N, 2) um}``."""
        xy = np.asarray(value["positions"], dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2 or not len(xy):
            raise ValueError(f"positions must be (N, 2) x/y in um, got shape {xy.shape}")
        for axis, values in zip((self.stage_device.x, self.stage_device.y), xy.T):
            low, high = axis.limits
            if values.min() < low or values.max() > high:
                raise LimitError(f"{axis.name}: the trajectory spans [{values.min():.4g}, {values.max():.4g}] um, "
                                 f"outside the travel [{low}, {high}] um")
        need = len(xy) * int(np.prod(self.frame_shape)) * 4  # uint32 counts
        limit = self.max_prepare_bytes if self.max_prepare_bytes is not None else _available_memory() // 2
        if need > limit:
            raise ValueError(f"{self.name}: a fly scan of {len(xy)} frames needs {need / 2**30:.2f} GiB to simulate "
                             f"(the simulated detector computes every frame before the flight), more than the "
                             f"{limit / 2**30:.2f} GiB allowed (half the available memory, or max_prepare_bytes): "
                             f"split the scan or lower num_points")
        exposure = float(self.exposure_time.get())
        t0 = time.perf_counter()
        chunks = range(0, len(xy), 256)
        if len(xy) > 2000:  # ~5 ms a frame: show progress beyond ~10 s
            from tqdm.auto import tqdm

            chunks = tqdm(chunks, desc=f"{self.name}: simulating {len(xy)} frames", unit="x256 frames", leave=False)
        self._frames = np.concatenate([self.sample.measure(xy[i:i + 256], exposure, self._rng) for i in chunks])
        self._xy = xy
        logger.info("%s: %d frames simulated for the fly scan in %.1f s", self.name, len(xy), time.perf_counter() - t0)
        status = Status(obj=self)
        status.set_finished()
        return status

    def stage(self) -> list[Any]:
        if self.publisher is None:
            if not self.channel:
                raise ValueError(f"{self.name}: give a pvAccess channel or a publisher to stream the frames to")
            from .edge.pva_servers import FramePublisher

            self.publisher = FramePublisher(self.channel)
        path = self._open_file()
        for dataset in POSITION_DATASETS:
            self._file.create_dataset(dataset, shape=(0,), maxshape=(None,), dtype="<f8",
                                      chunks=(self.block_frames,))
        self._file.swmr_mode = True
        self._index = self._announced = 0
        keys = (self.image_key, *self.position_keys)
        datasets = (FRAME_DATASET, *POSITION_DATASETS)
        chunks = ([1, *self.frame_shape], [self.block_frames], [self.block_frames])
        self._bundles = {}
        for key, dataset, chunk in zip(keys, datasets, chunks):
            bundle = self._bundles[key] = compose_stream_resource(
                mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=key,
                parameters={"dataset": dataset, "chunk_shape": chunk, "swmr": True})
            self._asset_docs.append(("stream_resource", bundle.stream_resource_doc))
        return super().stage()

    def unstage(self) -> list[Any]:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._close_file()
        return super().unstage()

    def stop(self, *, success: bool = False) -> None:
        self._abort.set()

    def kickoff(self) -> Status:
        if self._file is None or self._frames is None:
            raise RuntimeError(f"{self.name}: prepare (the trajectory) and stage before kickoff; "
                               "use spiral_ptycho_flyscan")
        rate = float(self.frame_rate.get())
        if not rate > 0:
            raise ValueError(f"{self.name}.frame_rate must be positive (Hz), got {rate}")
        self._abort.clear()
        started = Status(obj=self)
        self._complete = Status(obj=self)
        self._thread = threading.Thread(target=self._acquire, args=(rate, started), name=f"{self.name}-fly",
                                        daemon=True)
        self._thread.start()
        return started

    def complete(self) -> Status:
        if self._complete is None:
            raise RuntimeError(f"{self.name}: complete() before kickoff()")
        return self._complete

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        description = {self.image_key: self._image_description()}
        for axis, key in zip((self.stage_device.x, self.stage_device.y), self.position_keys):
            description[key] = {"source": f"sim:{self.name}:{key}", "dtype": "number", "dtype_numpy": "<f8",
                                "shape": [], "external": "STREAM:", "units": "um"}
        return description

    def get_index(self) -> int:
        return self._index

    def collect_asset_docs(self, index: int | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
        """StreamResources once, then one StreamDatum per data key for the frames written since."""
        yield from super().collect_asset_docs(index)
        thread = self._thread
        if self._abort.is_set() and thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)  # stopped: its last frames reach the file before they are announced
        with self._lock:
            stop = self._index if index is None else min(int(index), self._index)
            if stop > self._announced:
                for bundle in self._bundles.values():
                    yield "stream_datum", bundle.compose_stream_datum(indices={"start": self._announced, "stop": stop})
                self._announced = stop

    def _acquire(self, rate: float, started: Status) -> None:
        """The acquisition thread: publish each frame on time; a writer thread appends HDF5 blocks."""
        frames, xy, uid = self._frames, self._xy, str(self.scan_uid.get())
        exposure = float(self.exposure_time.get())  # sent with each frame: the worker scales counts by it
        assert frames is not None and xy is not None and self._complete is not None
        blocks: queue.SimpleQueue[tuple[int, int] | None] = queue.SimpleQueue()
        writer_error: list[BaseException] = []

        def write() -> None:
            while (block := blocks.get()) is not None:
                try:
                    self._write_block(*block)
                except BaseException as exc:  # reported by the acquisition thread
                    writer_error.append(exc)
                    return

        writer = threading.Thread(target=write, name=f"{self.name}-hdf5", daemon=True)
        writer.start()
        period = 1.0 / rate
        late = queued = 0  # frames over one period late; frames handed to the writer
        i = -1
        started.set_finished()
        t0, t_start = time.perf_counter(), time.time()
        try:
            for i in range(len(frames)):
                delay = t0 + i * period - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                elif delay < -period:
                    late += 1
                self.publisher.publish(frames[i], i + 1, pos=(float(xy[i, 0]), float(xy[i, 1])), scan_uid=uid,
                                       attributes={"frame_index": i, "exposure_s": exposure})
                if self._abort.is_set():
                    raise RuntimeError(f"{self.name}: fly scan stopped at frame {i}")
                if (i + 1) % self.block_frames == 0 or i + 1 == len(frames):
                    blocks.put((queued, i + 1))
                    queued = i + 1
                    if writer_error:
                        raise writer_error[0]
            elapsed = time.perf_counter() - t0
            blocks.put(None)
            writer.join()
            if writer_error:
                raise writer_error[0]
            self.stats = {"frames": len(frames), "elapsed_s": elapsed, "rate_hz": len(frames) / elapsed,
                          "late_frames": late, "t_start": t_start}
            logger.info("%s: %d frames published in %.3f s (%.0f frames/s, asked %.0f; %d over one period late)",
                        self.name, len(frames), elapsed, len(frames) / elapsed, rate, late)
            self._complete.set_finished()
        except BaseException as exc:
            published = i + 1  # the frame that failed counts as published (it may have been)
            if queued < published and not writer_error:  # frames already published are kept in the file too
                blocks.put((queued, published))
            blocks.put(None)
            writer.join(timeout=30)
            logger.exception("%s: fly acquisition failed", self.name)
            self._complete.set_exception(exc)

    def _write_block(self, start: int, stop: int) -> None:
        assert self._file is not None and self._frames is not None and self._xy is not None
        with self._lock:
            for dataset, values in zip((FRAME_DATASET, *POSITION_DATASETS),
                                       (self._frames, self._xy[:, 0], self._xy[:, 1])):
                data = self._file[dataset]
                data.resize(stop, axis=0)
                data[start:stop] = values[start:stop]
                data.flush()
            self._index = stop
        # The stage has followed the trajectory to the last frame of the block.
        self.stage_device.x.set(float(self._xy[stop - 1, 0]))
        self.stage_device.y.set(float(self._xy[stop - 1, 1]))


@dataclass
class SimulatedBeamline:
    """The devices of the simulated beamline and the sample they look at."""

    stage: PiezoStage
    det: PtychoDetector
    sample: SimulatedSample
    fly_det: FlyingPtychoDetector


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
    fly_channel: str = DEFAULT_FLY_CHANNEL,
) -> SimulatedBeamline:
    """Build the simulated beamline: stage ``stage``, step detector ``ptycho_det``, fly detector ``ptycho_fly``.

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
    fly_channel
        pvAccess channel the fly-scan detector ``ptycho_fly`` serves its frames on (from its first
        fly scan on).
    """
    if isinstance(sample, str):
        sample = make_sample(sample, extent_um=extent_um, geometry=geometry, beam_diameter_nm=beam_diameter_nm,
                             photons_per_second=photons_per_second, seed=seed)
    stage = PiezoStage(name="stage")
    x_max, y_max = sample.stage_limits_um()
    stage.set_limits((-x_max, x_max), (-y_max, y_max))
    det = PtychoDetector(name="ptycho_det", sample=sample, stage=stage, write_dir=write_dir, seed=seed)
    det.exposure_time.put(exposure_s)
    fly_det = FlyingPtychoDetector(name="ptycho_fly", sample=sample, stage=stage, write_dir=write_dir,
                                   seed=None if seed is None else seed + 1, channel=fly_channel)
    return SimulatedBeamline(stage=stage, det=det, sample=sample, fly_det=fly_det)

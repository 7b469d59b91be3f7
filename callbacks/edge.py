"""Callbacks that connect a scan to the edge worker and stitch its phase patches live.

* :class:`FrameForwarder` sends each frame of a step scan (read from the detector's HDF5 file as
  it is written, SWMR) with its position and the run uid to the worker's input channel.
* :class:`LiveStitchCallback` receives the worker's patches for the current run, stitches them
  incrementally, and at stop stores the stitched image and the per-frame patches as a derived
  run linked to the raw run (``original_run_uid``).
* :class:`~callbacks.plot.LivePhasePlot` (in :mod:`callbacks.plot`) draws the stitched phase, and
  the live refined image beside it, growing during the scan.

None of them can take a scan down: their failures are logged and counted in ``errors``. Heavy work
(HDF5 reads, publishing) runs off the RunEngine thread behind a bounded queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import h5py
import numpy as np
from event_model import DocumentRouter
from numpy.typing import NDArray

from edge_ptycho_bluesky import FRAME_SIZE
from edge_ptycho_bluesky.derived import emit_derived_run
from edge_ptycho_bluesky.runs import EdgePtychoMeta, image_key_of
from edge_ptycho_bluesky.stitching import IncrementalStitcher
from edge_ptycho_bluesky.stitching_grid import PhysicalGrid, grid_from_positions

logger = logging.getLogger(__name__)


class FramePublisherLike(Protocol):
    def publish(self, frame: NDArray[Any], unique_id: int, *, pos: tuple[float, float] | None = None,
                scan_uid: str | None = None, attributes: dict[str, Any] | None = None) -> None: ...


class IsolatedCallback(DocumentRouter):
    """A document router whose exceptions are logged and counted (``errors``), never raised.

    The RunEngine lets a subscribed callback's exception end the scan; the edge callbacks are
    subscribed to it (and fed replays) directly, so they isolate themselves here, at the call
    through which every document reaches them. Subclasses implement the document methods as any
    :class:`event_model.DocumentRouter` (one that implements only ``event`` gets each event of an
    event page).
    """

    def __init__(self) -> None:
        super().__init__()
        self.errors = 0

    def __call__(self, name: str, doc: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(name, doc, *args, **kwargs)
        except Exception:
            self.errors += 1
            logger.exception("%s failed on a %s document (the scan goes on)", type(self).__name__, name)
            return None


def _motor_fields(start: dict[str, Any], meta: EdgePtychoMeta) -> tuple[str, str]:
    if meta.position_keys is not None:
        return meta.position_keys
    motors = start.get("motors") or []
    if len(motors) < 2:
        raise ValueError("the start document names no x/y motors ('motors'); cannot position frames")
    return motors[0], motors[1]


#: A value stored in an HDF5 file: (path, dataset, index).
_Stored = tuple[Path, str, int]


class FrameForwarder(IsolatedCallback):
    """Send every frame of a scan to the edge worker.

    Frames are paired with positions in order: the k-th frame announced by StreamDatum documents
    with the k-th event, so the same callback serves live runs and runs replayed from Tiled (where
    stream datums come consolidated). Detectors that announce their frames the ophyd v1 way (an
    areaDetector with an HDF5 plugin: Resource ``AD_HDF5`` and one Datum per event, the event
    holding the datum id) are read the same way: each datum's ``point_number`` selects
    ``frame_per_point`` frames of ``/entry/data/data``, all at the event's position. In fly scans the positions are stream data too (the motor
    fields' StreamDatums): the k-th frame goes with the k-th recorded position.

    A fly scan whose detector streamed its frames over pvAccess itself
    (the run record's ``streamed_to``, :class:`~edge_ptycho_bluesky.runs.EdgePtychoMeta`) is left alone, since the worker has had its frames
    already; set ``forward_streamed`` (as :meth:`EdgeSession.replay` does) to send them again.

    Parameters
    ----------
    publisher
        Has ``publish(frame, unique_id, pos=(x, y), scan_uid=..., attributes=...)`` (a
        :class:`~edge_ptycho_bluesky.edge.FramePublisher` or an in-process source).
    image_key
        Data key of the frames (default: the run record's ``image_key``).
    queue_size
        Frames waiting to be sent; beyond it a frame is dropped and counted (``dropped``).
    read_timeout
        Seconds to wait for a frame to become visible in the HDF5 file.
    forward_streamed
        Forward runs whose detector streamed the frames itself (replays of fly scans).
    path_map
        ``{prefix as the IOC writes it: prefix here}``: a detector's file path that starts with a
        key is read under the value instead (an IOC writing ``/data/ioc/...`` that this machine
        mounts at ``/mnt/beamline/...``). Without a match the path is read as written.

    Without an ``image_key`` (given, or in the run record), the frames are the first data key of
    the run's descriptors that is external and at least 2-D.
    """

    def __init__(self, publisher: FramePublisherLike, *, image_key: str | None = None, queue_size: int = 4096,
                 read_timeout: float = 5.0, forward_streamed: bool = False,
                 path_map: dict[str, str] | None = None) -> None:
        super().__init__()
        self.path_map = dict(path_map or {})
        self.forward_streamed = forward_streamed
        self.skipped_runs = 0
        self.publisher = publisher
        self._image_key_default = image_key
        self.read_timeout = read_timeout
        self._queue: queue.Queue[tuple[str, Path, str, int, int, tuple[float, float], dict[str, Any]] | None] = (
            queue.Queue(queue_size))
        self._next_unique_id = 1
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        self._files: dict[Path, h5py.File] = {}
        self._thread = threading.Thread(target=self._run, name="frame-forwarder", daemon=True)
        self._thread.start()
        self._reset()

    def _reset(self) -> None:
        self._uid: str | None = None
        self._image_key: str | None = self._image_key_default
        self._run_attributes: dict[str, Any] = {}
        self._descriptors: set[str] = set()
        self._resources: dict[str, tuple[Path, str, str]] = {}
        self._v1_resources: dict[str, tuple[Path, str, int]] = {}  # Resource uid -> (file, dataset, frames per point)
        self._datums: dict[str, tuple[str, int]] = {}  # datum id -> (Resource uid, point number)
        self._frames: deque[tuple[Path, str, int]] = deque()
        self._positions: deque[tuple[int, tuple[float, float] | tuple[_Stored, _Stored]]] = deque()
        self._stored_xy: tuple[deque[_Stored], deque[_Stored]] = (deque(), deque())
        self._recorded = 0
        self._fields: tuple[str, str] = ("", "")

    def start(self, doc: dict[str, Any]) -> None:
        self._reset()
        meta = EdgePtychoMeta.from_start(doc, required=False) or EdgePtychoMeta()
        streamed_to = meta.streamed_to
        if streamed_to and not self.forward_streamed:
            self.skipped_runs += 1
            logger.info("run %s: the detector streamed its frames to %s itself; not forwarding them",
                        doc["uid"], streamed_to)
            return
        self._uid = doc["uid"]
        self._image_key = self._image_key_default or meta.image_key
        # the worker scales each frame to its model's training exposure by this attribute
        self._run_attributes = {} if meta.exposure_s is None else {"exposure_s": meta.exposure_s}
        self._fields = _motor_fields(doc, meta)

    def descriptor(self, doc: dict[str, Any]) -> None:
        if self._uid is None:
            return
        if self._image_key is None:
            self._image_key = image_key_of(doc["data_keys"])
        if self._image_key in doc["data_keys"]:
            self._descriptors.add(doc["uid"])

    def local_path(self, path: str | Path) -> Path:
        """A detector's file path as this machine reads it (``path_map``)."""
        text = str(path)
        for remote, local in self.path_map.items():
            if text == remote or text.startswith(remote.rstrip("/") + "/"):
                return Path(local) / Path(text).relative_to(remote)
        return Path(text)

    def stream_resource(self, doc: dict[str, Any]) -> None:
        if self._uid is not None and doc["data_key"] in (self._image_key, *self._fields):
            self._resources[doc["uid"]] = (self.local_path(urlparse(doc["uri"]).path), doc["parameters"]["dataset"],
                                           doc["data_key"])

    def resource(self, doc: dict[str, Any]) -> None:
        if self._uid is None:
            return
        if not str(doc.get("spec", "")).startswith("AD_HDF5"):
            logger.warning("run %s: Resource spec %r is not read (only AD_HDF5 files)", self._uid, doc.get("spec"))
            return
        path = Path(doc.get("root") or "/") / doc["resource_path"]
        per_point = int((doc.get("resource_kwargs") or {}).get("frame_per_point", 1))
        self._v1_resources[doc["uid"]] = (self.local_path(path), "/entry/data/data", per_point)

    def datum(self, doc: dict[str, Any]) -> None:
        if doc["resource"] in self._v1_resources:
            self._datums[doc["datum_id"]] = (doc["resource"], int(doc["datum_kwargs"].get("point_number", 0)))

    def stream_datum(self, doc: dict[str, Any]) -> None:
        if doc["stream_resource"] in self._resources:
            path, dataset, key = self._resources[doc["stream_resource"]]
            indices = range(doc["indices"]["start"], doc["indices"]["stop"])
            if key == self._image_key:
                self._frames.extend((path, dataset, index) for index in indices)
            else:  # a position recorded per frame (fly scans)
                self._stored_xy[self._fields.index(key)].extend((path, dataset, index) for index in indices)
                x, y = self._stored_xy
                while x and y:
                    self._recorded += 1
                    self._positions.append((self._recorded, (x.popleft(), y.popleft())))
            self._pair()

    def event(self, doc: dict[str, Any]) -> None:
        if self._uid is not None and doc["descriptor"] in self._descriptors:
            x_key, y_key = self._fields
            pos = (float(doc["data"][x_key]), float(doc["data"][y_key]))
            datum = self._datums.pop(str(doc["data"].get(self._image_key)), None)
            if datum is not None:  # ophyd v1: this event's frames are in the datum's file
                path, dataset, per_point = self._v1_resources[datum[0]]
                first = datum[1] * per_point
                self._frames.extend((path, dataset, index) for index in range(first, first + per_point))
                self._positions.extend((doc["seq_num"], pos) for _ in range(per_point))
            else:
                self._positions.append((doc["seq_num"], pos))
            self._pair()

    def _pair(self) -> None:
        while self._frames and self._positions:
            path, dataset, index = self._frames.popleft()
            seq_num, pos = self._positions.popleft()
            job = (self._uid or "", path, dataset, index, seq_num, pos, self._run_attributes)
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                self.dropped += 1
                logger.warning("frame %d of run %s dropped: forwarding queue full", index, self._uid)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued frame was sent (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        """Stop the sending thread and close the HDF5 files."""
        self._queue.put(None)
        self._thread.join(timeout=10)
        for handle in self._files.values():
            handle.close()
        self._files.clear()

    def _position(self, pos: tuple[float, float] | tuple[_Stored, _Stored]) -> tuple[float, float]:
        if isinstance(pos[0], tuple):
            return tuple(float(self._read_frame(*stored)) for stored in pos)  # type: ignore[return-value]
        return pos  # type: ignore[return-value]

    def _read_frame(self, path: Path, dataset: str, index: int) -> NDArray[Any]:
        deadline = time.monotonic() + self.read_timeout
        while True:
            handle = self._files.get(path)
            if handle is None:
                handle = self._files[path] = h5py.File(path, "r", libver="latest", swmr=True)
            data = handle[dataset]
            data.refresh()
            if index < data.shape[0]:
                return data[index]
            if time.monotonic() > deadline:
                raise TimeoutError(f"frame {index} never appeared in {path}:{dataset} ({data.shape[0]} frames)")
            time.sleep(0.002)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                scan_uid, path, dataset, index, seq_num, pos, run_attributes = job
                frame = self._read_frame(path, dataset, index)
                self.publisher.publish(frame, self._next_unique_id, pos=self._position(pos), scan_uid=scan_uid,
                                       attributes={"frame_index": int(index), "seq_num": int(seq_num),
                                                   **run_attributes})
                self._next_unique_id += 1
                self.sent += 1
            except Exception:
                self.failed += 1
                logger.exception("could not forward a frame to the edge worker")
            finally:
                self._queue.task_done()


@dataclass
class StitchResult:
    """What :class:`LiveStitchCallback` made of one run."""

    run_uid: str
    image: NDArray[np.float32]
    coverage: NDArray[np.float32]
    patches: NDArray[np.float32]
    frame_indices: NDArray[np.int64]
    positions_um: NDArray[np.float64]
    model_versions: list[str]
    expected: int
    missing: list[int] = field(default_factory=list)
    derived_run_uid: str | None = None
    #: Window corners (row, col) of the patches on the grid of ``image``.
    corners: NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 2)))
    #: The refined phase on the grid of ``image`` (None without one; ``refine_reason`` says why).
    refined: NDArray[np.float32] | None = None
    refine_stats: dict[str, Any] = field(default_factory=dict)
    refine_reason: str = ""


class _RunStitch:
    """Per-run state of the live stitcher (thread-safe through the owner's lock)."""

    def __init__(self, start: dict[str, Any], margin: int, weight: NDArray[np.floating] | None) -> None:
        try:
            meta = EdgePtychoMeta.from_start(start)
            assert meta is not None
            pixel = meta.pixel_size_nm * 1e-9 / meta.position_unit_m  # in the positions' unit
            (x0, x1), (y0, y1) = start["extents"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError("the start document lacks edge_ptycho.geometry.pixel_size_nm or extents; "
                             "cannot place patches") from err
        corners = np.array([[x0, y0], [x1, y1]], dtype=np.float64)
        self.grid = PhysicalGrid.from_positions(corners, pixel, order="xy", margin=margin)
        shape, origin = grid_from_positions(self.grid.to_pixels(corners, order="xy"), (FRAME_SIZE, FRAME_SIZE), margin)
        self.stitcher = IncrementalStitcher(shape, origin, weight=weight)
        self.uid = start["uid"]
        self.meta = meta
        self.patches: dict[int, tuple[NDArray[np.float32], tuple[float, float], str]] = {}

    def refine_run(self, probe_fallback: Callable[[], NDArray[np.complex64] | None] | None) -> Any:
        """What the live refiner needs for this run, or a string saying why it cannot refine."""
        from edge_ptycho_bluesky.edge.refine_process import RefineRun

        probe = self.meta.probe_array((FRAME_SIZE, FRAME_SIZE))
        if probe is None and probe_fallback is not None:
            probe = probe_fallback()
        if probe is None:
            return ("no probe: the run records none (md edge_ptycho.probe) and the deployed model "
                    "version has no probe.npy")
        beam = self.meta.beam_diameter_nm
        return RefineRun(uid=self.uid, grid=self.grid, origin=self.stitcher.origin, shape=self.stitcher.shape,
                         probe=probe, beam_diameter_px=None if beam is None else beam / self.meta.pixel_size_nm)


class LiveStitchCallback(IsolatedCallback):
    """Stitch the edge worker's patches of the current run; store the result at stop.

    Give :meth:`on_patch` to a :class:`~edge_ptycho_bluesky.edge.PatchSubscriber`; subscribe the
    object itself to the RunEngine (or to a replay).

    Parameters
    ----------
    store
        Document callback that stores the derived run (e.g. a TiledWriter); None: keep in memory only.
    write_dir
        Where the derived run's HDF5 file goes (required with ``store``).
    weight : (FRAME_SIZE, FRAME_SIZE) float or None
        Stitching weight, e.g. the probe amplitude.
    wait_timeout
        At stop, seconds to wait for patches still in flight.
    margin
        Grid pixels around the scanned area.
    refiner : RefinerProcess, optional
        The live refiner (:mod:`edge_ptycho_bluesky.edge.refine_process`): told of each run's
        start and stop; the derived run is then stored once its refined image has come (or with
        the reason there is none), off the RunEngine thread (:meth:`wait_stored`).
    refine_seconds
        The refiner's budget after each stop.
    probe_fallback
        Returns a probe for runs that record none (e.g. the deployed model version's).
    """

    def __init__(self, *, store: Callable[[str, dict[str, Any]], Any] | None = None, write_dir: str | Path | None = None,
                 weight: NDArray[np.floating] | None = None, wait_timeout: float = 10.0, margin: int = 8,
                 refiner: Any = None, refine_seconds: float = 20.0,
                 probe_fallback: Callable[[], NDArray[np.complex64] | None] | None = None) -> None:
        super().__init__()
        if store is not None and write_dir is None:
            raise ValueError("LiveStitchCallback(store=...) needs write_dir for the derived run's HDF5 file")
        self.store = store
        self.write_dir = None if write_dir is None else Path(write_dir)
        self.weight = weight
        self.wait_timeout = wait_timeout
        self.margin = margin
        self.results: dict[str, StitchResult] = {}
        self.ignored = 0
        self._lock = threading.Condition()
        self._run: _RunStitch | None = None
        self._early: dict[str, list[Any]] = {}
        self._expected = 0
        self.refiner = refiner
        self.refine_seconds = float(refine_seconds)
        self.probe_fallback = probe_fallback
        self._refining: dict[str, str] = {}  # uid -> why it is not refined ("" when it is)
        self._storing: dict[str, threading.Thread] = {}
        self._store_lock = threading.Lock()

    # -- patches (pvAccess thread) -------------------------------------------------------------
    def on_patch(self, patch: Any) -> None:
        """Receive one :class:`~edge_ptycho_bluesky.edge.Patch` (any thread)."""
        with self._lock:
            run = self._run
            if run is None or patch.scan_uid != run.uid:
                early = self._early.setdefault(patch.scan_uid, [])
                if len(early) < 100_000 and patch.scan_uid not in self.results:
                    early.append(patch)
                else:
                    self.ignored += 1
                return
            self._add(run, patch)
            self._lock.notify_all()

    def _add(self, run: _RunStitch, patch: Any) -> None:
        index = int(patch.attributes.get("frame_index", patch.unique_id))
        if patch.pos is None or index in run.patches:
            self.ignored += 1
            return
        pixels = run.grid.to_pixels(np.array([patch.pos], dtype=np.float64), order="xy")
        run.stitcher.add(patch.phase[None], pixels)
        run.patches[index] = (patch.phase, (float(patch.pos[0]), float(patch.pos[1])), patch.model_version)

    # -- documents (RunEngine thread) ----------------------------------------------------------
    def start(self, doc: dict[str, Any]) -> None:
        run = _RunStitch(doc, self.margin, self.weight)
        if self.refiner is not None:
            refine = run.refine_run(self.probe_fallback)
            if isinstance(refine, str):
                self._refining[run.uid] = refine
                logger.warning("run %s is not refined live: %s", run.uid, refine)
            else:
                self._refining[run.uid] = ""
                self.refiner.begin(refine)
        with self._lock:
            self._run = run
            for patch in self._early.pop(run.uid, []):
                self._add(run, patch)
            self._early.clear()

    def stop(self, doc: dict[str, Any]) -> None:
        run = self._run
        if run is None or doc["run_start"] != run.uid:
            return
        expected = int(sum((doc.get("num_events") or {}).values()) or 0)
        primary = (doc.get("num_events") or {}).get("primary")
        expected = int(primary) if primary is not None else expected
        deadline = time.monotonic() + self.wait_timeout
        with self._lock:
            while len(run.patches) < expected and time.monotonic() < deadline:
                self._lock.wait(deadline - time.monotonic())
            self._run = None
        self.results[run.uid] = result = self._result(run, expected)
        if result.missing:
            logger.warning("run %s: %d of %d patches never arrived (frames %s...)", run.uid, len(result.missing),
                           expected, result.missing[:10])
        why_not = self._refining.pop(run.uid, None)
        if self.refiner is not None and why_not == "":
            self.refiner.end(run.uid, expected, self.refine_seconds)
            thread = threading.Thread(target=self._refined_and_store, args=(result,), daemon=True,
                                      name=f"edge-store-{run.uid[:8]}")
            self._storing[run.uid] = thread
            thread.start()
            return
        if why_not:
            result.refine_reason = why_not
        elif self.refiner is None:
            result.refine_reason = "live refinement is off"
        if self.store is not None and result.patches.size:
            with self._store_lock:
                result.derived_run_uid = self._store(result)

    def _refined_and_store(self, result: StitchResult) -> None:
        from edge_ptycho_bluesky.edge.refine_process import DRAIN_S

        outcome = self.refiner.outcome(result.run_uid, timeout=self.refine_seconds + DRAIN_S + 30.0)
        result.refined, result.refine_stats, result.refine_reason = outcome.phase, outcome.stats, outcome.reason
        if outcome.phase is None:
            logger.warning("run %s: no refined image (%s); the AI image is stored", result.run_uid, outcome.reason)
        if self.store is not None and result.patches.size:
            try:
                with self._store_lock:
                    result.derived_run_uid = self._store(result)
            except Exception:
                logger.exception("run %s: storing the derived run failed", result.run_uid)

    def wait_stored(self, uid: str, timeout: float | None = None) -> bool:
        """Wait until the run's derived run is stored (immediate without a refiner); False on timeout."""
        thread = self._storing.get(uid)
        if thread is None:
            return True
        thread.join(timeout)
        if thread.is_alive():
            return False
        self._storing.pop(uid, None)
        return True

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait for every pending store (the session's close calls it: nothing is lost at exit)."""
        deadline = time.monotonic() + timeout
        return all(self.wait_stored(uid, max(deadline - time.monotonic(), 0.0)) for uid in list(self._storing))

    @property
    def current(self) -> tuple[NDArray[np.float32], NDArray[np.float32], int] | None:
        """(image, coverage, patch count) of the run being stitched, or None between runs."""
        run = self._run
        if run is None:
            return None
        image, coverage = run.stitcher.snapshot()
        return image, coverage, run.stitcher.n_patches

    @property
    def current_extent_um(self) -> tuple[float, float, float, float] | None:
        """The current run's grid as an ``imshow`` extent (left, right, bottom, top) in the scan's
        position units (micrometres), or None between runs."""
        run = self._run
        if run is None:
            return None
        (py, px), (gy, gx) = run.grid.pixel_size, run.grid.origin
        (oy, ox), (h, w) = run.stitcher.origin, run.stitcher.shape
        return (gx + (ox - 0.5) * px, gx + (ox + w - 0.5) * px, gy + (oy + h - 0.5) * py, gy + (oy - 0.5) * py)

    def _result(self, run: _RunStitch, expected: int) -> StitchResult:
        image, coverage = run.stitcher.snapshot()
        indices = np.array(sorted(run.patches), dtype=np.int64)
        patches = (np.stack([run.patches[i][0] for i in indices]) if len(indices)
                   else np.zeros((0, FRAME_SIZE, FRAME_SIZE), "f4"))
        positions = np.array([run.patches[i][1] for i in indices], dtype=np.float64).reshape(-1, 2)
        versions = sorted({run.patches[i][2] for i in indices})
        missing = sorted(set(range(expected)) - set(indices.tolist()))
        corners = (run.grid.to_pixels(positions, order="xy") - np.asarray(run.stitcher.origin) if len(positions)
                   else np.zeros((0, 2)))
        return StitchResult(run.uid, image, coverage, patches.astype(np.float32), indices, positions, versions,
                            expected, missing, corners=corners)

    def _store(self, result: StitchResult) -> str:
        streams: dict[str, dict[str, NDArray[Any]]] = {
            "primary": {"phase_patch": result.patches, "frame_index": result.frame_indices,
                        "pos_x": result.positions_um[:, 0], "pos_y": result.positions_um[:, 1]},
            "stitched": {"stitched_phase": result.image[None], "coverage": result.coverage[None]},
        }
        md: dict[str, Any] = {"model_versions": result.model_versions, "frames_expected": result.expected,
                              "frames_missing": result.missing}
        if result.refined is not None:
            streams["refined"] = {"refined_phase": result.refined[None]}
            md["refined"] = {k: v for k, v in result.refine_stats.items() if k != "skipped"}
            md["refined"]["skipped"] = {k: int(v) for k, v in result.refine_stats.get("skipped", {}).items()}
        else:
            md["refined_missing"] = result.refine_reason or "live refinement is off"
        return emit_derived_run(self.store, original_run_uid=result.run_uid, purpose="edge_inference",
                                write_dir=self.write_dir, streams=streams, md=md)

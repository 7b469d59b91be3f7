"""The live refiner in its own process: streaming, AI-seeded rPIE beside the edge worker.

:class:`RefinerProcess` starts a child process that subscribes, over pvAccess, to the same frame
channel as the worker (``ptycho:det:frames``) and to the worker's patch channel
(``ptycho:edge:phase``), pairs each frame with its patch by run uid and frame index, and feeds a
:class:`~edge_ptycho_bluesky.recon.streaming.StreamingRefiner` while the scan runs. It publishes
the refined phase as an NTNDArray (float32 radians, attributes ``run_uid``, ``frames_used``,
``sweeps``, ``seconds``) on ``ptycho:edge:image`` about once a second and when it finishes.

The session tells it what the channels cannot: at a run's start, the canvas (the live stitch's
grid) and the probe (:class:`RefineRun`); at its stop, how many frames to expect and the refinement
budget. After the stop it keeps sweeping for the budget (or until the data error settles), then
sends the final image back (:class:`RefineOutcome`); frames whose patch never came are refined
without a seed.

The child never competes with the AI path for the CPU: it runs at the idle scheduling class
(``SCHED_IDLE``, else nice 19), with ``RefineOptions.threads`` torch threads, and while frames
arrive its sweeps take at most ``RefineOptions.live_duty`` of the wall time. If it dies or falls
behind, the outcome says so and the session stores the AI image without a refined one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from ..recon.streaming import RefineOptions
from ..stitching_grid import PhysicalGrid
from .session import DEFAULT_IMAGE_PV
from .transport import DEFAULT_INPUT_PV, DEFAULT_OUTPUT_PV

__all__ = ["DEFAULT_IMAGE_PV", "RefineOutcome", "RefineRun", "RefinerProcess"]

logger = logging.getLogger(__name__)

#: Seconds between live image publications.
PUBLISH_INTERVAL_S = 1.0
#: Seconds the child waits, after a stop, for frames and patches still in flight.
DRAIN_S = 3.0
#: Frames (or patches) held while their partner or their run's start has not arrived (32 KiB a frame).
MAX_PENDING = 4096


@dataclass(frozen=True)
class RefineRun:
    """What the refiner needs to know about a run (from its start document)."""

    uid: str
    grid: PhysicalGrid
    origin: tuple[float, float]
    shape: tuple[int, int]
    probe: NDArray[np.complex64]
    beam_diameter_px: float | None = None

    def corners(self, pos_xy: NDArray[np.float64]) -> NDArray[np.float64]:
        """Window corners on the canvas for (x, y) scan positions."""
        return self.grid.to_pixels(np.asarray(pos_xy, dtype=np.float64).reshape(-1, 2), order="xy") - np.asarray(self.origin)


@dataclass
class RefineOutcome:
    """The refiner's result for one run: the phase (None when there is none, and ``reason`` why)."""

    uid: str
    phase: NDArray[np.float32] | None
    stats: dict[str, Any] = field(default_factory=dict)
    reason: str = ""


def _encode(kind: str, meta: dict[str, Any] | None = None, **arrays: NDArray[Any]) -> bytes:
    """One message: a kind, JSON metadata and numpy arrays, as ``.npz`` bytes (no pickle)."""
    buf = io.BytesIO()
    np.savez(buf, __kind__=np.array(kind), __meta__=np.array(json.dumps(meta or {})), **arrays)
    return buf.getvalue()


def _decode(data: bytes) -> tuple[str, dict[str, Any], dict[str, NDArray[Any]]]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in ("__kind__", "__meta__")}
        return str(npz["__kind__"]), json.loads(str(npz["__meta__"])), arrays


def _encode_run(run: RefineRun) -> bytes:
    g = run.grid
    meta = {"uid": run.uid, "pixel_size": list(g.pixel_size), "grid_origin": list(g.origin),
            "patch_shape": list(g.patch_shape), "beam_center": None if g.beam_center is None else list(g.beam_center),
            "origin": list(run.origin), "shape": list(run.shape), "beam_diameter_px": run.beam_diameter_px}
    return _encode("begin", meta, probe=np.asarray(run.probe, np.complex64))


def _decode_run(meta: dict[str, Any], arrays: dict[str, NDArray[Any]]) -> RefineRun:
    grid = PhysicalGrid(tuple(meta["pixel_size"]), tuple(meta["grid_origin"]), tuple(meta["patch_shape"]),
                        None if meta["beam_center"] is None else tuple(meta["beam_center"]))
    return RefineRun(meta["uid"], grid, tuple(meta["origin"]), tuple(meta["shape"]), arrays["probe"],
                     meta["beam_diameter_px"])


class RefinerProcess:
    """Parent side of the live refiner (see the module notes).

    The child is ``python -m edge_ptycho_bluesky.edge.refine_process``; the two talk over an
    authenticated local socket in messages of JSON and numpy arrays (no pickle). Its log goes to
    ``log_path``.

    Parameters
    ----------
    input_pv, output_pv, image_pv : str
        Frame channel (as the worker's input), patch channel (the worker's output) and the
        channel it serves the refined image on.
    options : RefineOptions, optional
    log_path : path, optional
        The child's log (default: a temporary file).
    """

    def __init__(self, input_pv: str = DEFAULT_INPUT_PV, output_pv: str = DEFAULT_OUTPUT_PV,
                 image_pv: str = DEFAULT_IMAGE_PV, *, options: RefineOptions | None = None,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.channels = (input_pv, output_pv, image_pv)
        self.options = options if options is not None else RefineOptions()
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="edge-refiner-", suffix=".log")[1])
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: Any = None
        self._send_lock = threading.Lock()
        self._outcomes: dict[str, RefineOutcome] = {}
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._closed = False
        #: The newest live image: (run uid, phase, stats), or None.
        self.latest: tuple[str, NDArray[np.float32], dict[str, Any]] | None = None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> RefinerProcess:
        """Start the child and wait until it has subscribed; RuntimeError (with its log) when not."""
        from multiprocessing.connection import Listener

        folder = Path(tempfile.mkdtemp(prefix="edge-refiner-"))
        authkey = secrets.token_bytes(32)
        listener = Listener(str(folder / "socket"), family="AF_UNIX", authkey=authkey)
        env = {**os.environ, "EDGE_PTYCHO_REFINER_KEY": authkey.hex()}
        cmd = [sys.executable, "-m", "edge_ptycho_bluesky.edge.refine_process", str(folder / "socket"),
               json.dumps(list(self.channels)), json.dumps(self.options.to_dict())]
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        accepted: list[Any] = []
        waiter = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        waiter.start()
        waiter.join(timeout)
        listener.close()
        shutil.rmtree(folder, ignore_errors=True)
        if not accepted:
            self.close()
            tail = self.log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the refiner process did not start within {timeout:.0f} s; its log "
                               f"{self.log_path}:\n{tail}")
        self._conn = accepted[0]
        kind, _, _ = _decode(self._conn.recv_bytes())
        if kind != "ready":
            raise RuntimeError(f"the refiner process sent {kind!r} instead of 'ready'")
        self._reader = threading.Thread(target=self._read, name="edge-refiner-results", daemon=True)
        self._reader.start()
        logger.info("refiner started (pid %s, log %s): frames %s + patches %s -> %s", self._proc.pid,
                    self.log_path, *self.channels)
        return self

    def _send(self, data: bytes) -> None:
        try:
            with self._send_lock:
                self._conn.send_bytes(data)
        except (OSError, AttributeError) as exc:
            logger.warning("refiner: could not reach the process (%s)", exc)

    def begin(self, run: RefineRun) -> None:
        """A run starts: make its canvas."""
        self._send(_encode_run(run))

    def end(self, uid: str, expected: int, seconds: float) -> None:
        """A run stopped after ``expected`` frames: refine for ``seconds`` and send the outcome."""
        self._send(_encode("end", {"uid": uid, "expected": int(expected), "seconds": float(seconds)}))

    def outcome(self, uid: str, timeout: float) -> RefineOutcome:
        """The run's outcome; one with ``phase=None`` and a reason when the child died or took
        longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while uid not in self._outcomes:
                if not self.alive:
                    code = None if self._proc is None else self._proc.poll()
                    return RefineOutcome(uid, None, reason=f"the refiner process died (exit code {code}; "
                                                           f"log {self.log_path})")
                left = deadline - time.monotonic()
                if left <= 0:
                    return RefineOutcome(uid, None, reason=f"the refiner fell behind: no refined image "
                                                           f"{timeout:.0f} s after the stop")
                self._cond.wait(min(left, 0.5))
            return self._outcomes.pop(uid)

    def _read(self) -> None:
        while True:
            try:
                kind, meta, arrays = _decode(self._conn.recv_bytes())
            except (EOFError, OSError, ValueError):
                with self._cond:
                    self._cond.notify_all()
                return
            if kind == "image":
                self.latest = (meta["uid"], arrays["phase"], meta["stats"])
            elif kind == "outcome":
                phase = arrays.get("phase")
                outcome = RefineOutcome(meta["uid"], phase, meta.get("stats", {}), meta.get("reason", ""))
                if phase is not None:
                    self.latest = (outcome.uid, phase, outcome.stats)
                with self._cond:
                    self._outcomes[outcome.uid] = outcome
                    self._cond.notify_all()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the child."""
        if self._closed:
            return
        self._closed = True
        if self.alive and self._conn is not None:
            self._send(_encode("quit"))
        if self._proc is not None:
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.terminate()
                self._proc.wait(5)
        if self._conn is not None:
            self._conn.close()
        logger.info("refiner stopped (exit code %s)", None if self._proc is None else self._proc.returncode)


# ------------------------------------------------------------------------------------------------
# The child process
# ------------------------------------------------------------------------------------------------


def _lower_priority() -> None:
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        try:
            os.nice(19)
        except OSError:
            pass


class _Child:
    """The child's state: one run at a time, frames and patches paired by (uid, frame index)."""

    def __init__(self, channels: tuple[str, str, str], options: RefineOptions, conn: Any) -> None:
        from .pva_servers import FramePublisher

        self.options = options
        self.conn = conn
        self.inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.publisher = FramePublisher(channels[2])
        self.run: RefineRun | None = None
        self.refiner: Any = None
        self.frames: dict[tuple[str, int], tuple[NDArray[Any], tuple[float, float]]] = {}
        self.patches: dict[tuple[str, int], NDArray[np.float32]] = {}
        self.paired: set[tuple[str, int]] = set()
        self.published = 0
        self.ignored = 0
        self.last_publish = 0.0
        self.failed = ""

    # pvAccess threads: only enqueue (bounded: while a run is being refined after its stop, the
    # next run's frames wait here; beyond MAX_PENDING they are left to the AI path alone).
    def on_frame(self, frame: Any) -> None:
        if self.inbox.qsize() >= 2 * MAX_PENDING:
            self.ignored += 1
            return
        self.inbox.put(("frame", frame))

    def on_reject(self, reason: str, detail: str, unique_id: int | None) -> None:
        logger.debug("refiner: frame rejected (%s): %s", reason, detail)

    def on_patch(self, patch: Any) -> None:
        if self.inbox.qsize() >= 2 * MAX_PENDING:
            self.ignored += 1
            return
        self.inbox.put(("patch", patch))

    # main thread
    def begin(self, run: RefineRun) -> None:
        from ..recon.streaming import StreamingRefiner

        self.run, self.failed = run, ""
        try:
            self.refiner = StreamingRefiner(run.shape, run.probe, beam_diameter_px=run.beam_diameter_px,
                                            options=self.options)
        except ValueError as exc:
            self.refiner, self.failed = None, f"the refiner could not start: {exc}"
            logger.error("refiner: run %s: %s", run.uid, self.failed)
        # Drop what belongs to older runs; keep this run's early arrivals.
        self.frames = {k: v for k, v in self.frames.items() if k[0] == run.uid}
        self.patches = {k: v for k, v in self.patches.items() if k[0] == run.uid}
        self.paired = set()

    def drain(self) -> None:
        """Move what arrived into the pending maps, and paired frames into the refiner."""
        while True:
            try:
                kind, item = self.inbox.get_nowait()
            except queue.Empty:
                break
            uid = item.scan_uid
            if uid is None or (self.run is not None and uid != self.run.uid):
                self.ignored += 1  # another run's (one not refined, or already ended)
                continue
            index = int(item.attributes.get("frame_index", item.unique_id))
            if kind == "frame":
                if item.pos is not None and len(self.frames) < MAX_PENDING:
                    self.frames[(uid, index)] = (item.data, (float(item.pos[0]), float(item.pos[1])))
            elif len(self.patches) < MAX_PENDING:
                self.patches[(uid, index)] = item.phase
        if self.run is None or self.refiner is None:
            return
        keys = [k for k in self.frames if k in self.patches]
        if keys:
            self._add(keys, with_patches=True)

    def _add(self, keys: list[tuple[str, int]], *, with_patches: bool) -> None:
        assert self.run is not None
        frames = np.stack([self.frames[k][0] for k in keys]).astype(np.float32)
        pos = np.array([self.frames[k][1] for k in keys], dtype=np.float64)
        patches = np.stack([self.patches.pop(k) for k in keys]) if with_patches else None
        for k in keys:
            del self.frames[k]
        self.paired.update(keys)
        try:
            self.refiner.add(frames, self.run.corners(pos), patches)
        except ValueError as exc:
            logger.warning("refiner: %d frames not added: %s", len(keys), exc)

    def publish(self, final: bool = False) -> NDArray[np.float32] | None:
        """Serve the refined image (at most once per PUBLISH_INTERVAL_S unless ``final``); returns it."""
        if self.run is None or self.refiner is None or not self.refiner.stats.frames_used:
            return None
        now = time.monotonic()
        if not final and now - self.last_publish < PUBLISH_INTERVAL_S:
            return None
        self.last_publish = now
        phase = self.refiner.image
        stats = self.refiner.stats.to_dict()
        self.published += 1
        self.publisher.publish(phase.astype(np.float32), self.published, scan_uid=self.run.uid, attributes={
            "run_uid": self.run.uid, "frames_used": int(stats["frames_used"]), "sweeps": int(stats["sweeps"]),
            "seconds": float(stats["seconds"]), "final": int(final)})
        if not final:
            self.conn.send_bytes(_encode("image", {"uid": self.run.uid, "stats": stats}, phase=phase))
        return phase

    def end(self, uid: str, expected: int, seconds: float) -> None:
        run = self.run
        if run is None or run.uid != uid or self.refiner is None:
            reason = self.failed or f"the refiner saw no start of run {uid}"
            self.conn.send_bytes(_encode("outcome", {"uid": uid, "reason": reason}))
            return
        deadline = time.monotonic() + DRAIN_S
        while time.monotonic() < deadline and len(self.paired) < expected:
            self.drain()
            time.sleep(0.02)
        self.drain()
        unpaired = [k for k in self.frames if k[0] == uid]
        if unpaired:  # the worker dropped these: refine them without a seed
            self._add(unpaired, with_patches=False)
        if not self.refiner.stats.frames_used:
            reason = (f"no usable frame reached the refiner ({len(self.paired)} paired, skipped "
                      f"{dict(self.refiner.stats.skipped)}; frames must match the probe's size)")
            self.conn.send_bytes(_encode("outcome", {"uid": uid, "reason": reason}))
            self.run, self.refiner = None, None
            return
        self.refiner.refine(seconds)
        phase = self.publish(final=True)
        stats = {**self.refiner.stats.to_dict(), "frames_expected": expected,
                 "frames_without_patch": len(unpaired), "refine_seconds_after_scan": seconds}
        self.conn.send_bytes(_encode("outcome", {"uid": uid, "stats": stats}, phase=phase))
        self.run, self.refiner = None, None
        self.frames = {k: v for k, v in self.frames.items() if k[0] != uid}
        self.patches = {k: v for k, v in self.patches.items() if k[0] != uid}

    def step(self) -> None:
        """One sweep (at the live duty cycle) when there are frames; else a short wait."""
        if self.refiner is not None and self.refiner.buffered_frames:
            self.refiner.sweep()
            self.publish()
        else:
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    """The child: ``python -m edge_ptycho_bluesky.edge.refine_process SOCKET CHANNELS OPTIONS``."""
    from multiprocessing.connection import Client

    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s refiner %(levelname)s %(name)s: %(message)s")
    _lower_priority()
    import torch

    from .pva_clients import PatchSubscriber, PvaFrameSource

    channels = tuple(json.loads(args[1]))
    opts = RefineOptions.from_mapping(json.loads(args[2]))
    torch.set_num_threads(opts.threads)
    conn = Client(args[0], family="AF_UNIX", authkey=bytes.fromhex(os.environ["EDGE_PTYCHO_REFINER_KEY"]))
    child = _Child(channels, opts, conn)  # type: ignore[arg-type]
    source = PvaFrameSource(channels[0])
    source.start(child)
    subscriber = PatchSubscriber(channels[1], child.on_patch).start()
    conn.send_bytes(_encode("ready"))
    try:
        while True:
            if conn.poll(0):
                try:
                    kind, meta, arrays = _decode(conn.recv_bytes())
                except (EOFError, OSError):
                    break  # the session is gone
                if kind == "quit":
                    break
                try:
                    if kind == "begin":
                        child.begin(_decode_run(meta, arrays))
                    elif kind == "end":
                        child.end(meta["uid"], meta["expected"], meta["seconds"])
                except Exception as exc:  # one run's failure must not end the process
                    logger.exception("refiner: %s failed", kind)
                    if kind == "end":
                        conn.send_bytes(_encode("outcome", {"uid": meta["uid"], "reason": f"refiner error: {exc}"}))
                    child.run, child.refiner = None, None
                continue
            child.drain()
            child.step()
    finally:
        source.stop()
        subscriber.stop()
        child.publisher.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

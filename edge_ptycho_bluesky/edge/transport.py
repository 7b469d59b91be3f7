"""Transports between detector, edge worker and clients: pvAccess (real) and in-process (tests).

The edge worker is transport-agnostic: it reads frames from a :class:`FrameSource` and writes
phase patches and its status to a :class:`PatchSink`.

pvAccess (the real path, via pvapy)
    :class:`FramePublisher` serves detector frames as NTNDArrays (the way areaDetector's PVA
    plugin and the simulated fly detector do); :class:`PvaFrameSource` monitors such a channel
    for the worker; :class:`PvaPatchSink` serves the worker's output patches and status from a
    ``pvaccess.PvaServer``; :class:`PatchSubscriber` monitors the output channel(s) and hands
    decoded :class:`~edge_ptycho_bluesky.edge.ntnda.Patch` objects to a callback;
    :func:`read_status` reads the status channel once.
In-process (unit tests, and the pvapy hpc processor)
    :class:`InProcessFrameSource` and :class:`InProcessPatchSink`, same interfaces, no sockets.

Loopback: call :func:`loopback_env` before the first pvapy object of a process is created;
pvAccess reads the ``EPICS_PVA*`` variables when its contexts start.

Monitor queues (measured with pvapy 5.6 on this machine): a pvapy monitor with a Python-side
queue (``Channel.setMonitorMaxQueueLength(n)``, n != 0) runs its callbacks on a pvapy background
thread that, in this build, intermittently never delivers any update although the channel's
monitor counters grow; with the queue disabled (0, pvapy's default) callbacks run directly on
the pvAccess client thread and are reliable.  Bursts are therefore absorbed by the server-side
monitor queue, requested with ``record[queueSize=N]`` (what ``pvapy-hpc-consumer
--server-queue-size`` does): with N >= 100 and a fast callback, 3,000 frames at ~3-4 kHz
arrived with no gap; with N unset about 1 % were lost.  Whatever is lost still shows as a
gap in ``uniqueId``, which the worker counts.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from .ntnda import (
    AttributeValue,
    Frame,
    FrameDecodeError,
    Patch,
    decode_frame,
    decode_patch,
    empty_ntndarray,
    encode_frame,
    encode_patch,
)

__all__ = [
    "DEFAULT_INPUT_PV",
    "DEFAULT_OUTPUT_PV",
    "DEFAULT_STATUS_PV",
    "FrameHandler",
    "FramePublisher",
    "FrameSource",
    "InProcessFrameSource",
    "InProcessPatchSink",
    "LOOPBACK_ENV",
    "PatchSink",
    "PatchSubscriber",
    "PvaFrameSource",
    "PvaPatchSink",
    "loopback_env",
    "read_status",
]

logger = logging.getLogger(__name__)

#: Default channel names of the edge worker.
DEFAULT_INPUT_PV = "ptycho:det:frames"
DEFAULT_OUTPUT_PV = "ptycho:edge:phase"
DEFAULT_STATUS_PV = "ptycho:edge:status"

#: The EPICS variables that keep pvAccess on 127.0.0.1 (clients and servers).
LOOPBACK_ENV: dict[str, str] = {
    "EPICS_PVA_ADDR_LIST": "127.0.0.1",
    "EPICS_PVA_AUTO_ADDR_LIST": "NO",
    "EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1",
}


def loopback_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the EPICS variables that keep pvAccess on loopback.

    Sets ``EPICS_PVA_ADDR_LIST=127.0.0.1``, ``EPICS_PVA_AUTO_ADDR_LIST=NO`` and
    ``EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1``; the broadcast and server ports stay at their
    defaults (several servers on one host find each other through pvAccess's local multicast
    fan-out, checked here with three servers in three processes).  Call it before the process
    creates its first pvapy ``Channel`` or ``PvaServer``.

    Parameters
    ----------
    environ
        Mapping to update; ``os.environ`` when None (pass a copy to build a subprocess's env).

    Returns
    -------
    dict
        The variables set.
    """
    target = os.environ if environ is None else environ
    target.update(LOOPBACK_ENV)
    return dict(LOOPBACK_ENV)


# ---------------------------------------------------------------------------------------------
# interfaces


@runtime_checkable
class FrameHandler(Protocol):
    """What a :class:`FrameSource` delivers to (the edge worker implements it).

    Both methods are called on the transport's thread and must return quickly.
    """

    def on_frame(self, frame: Frame) -> None:
        """A decoded frame."""

    def on_reject(self, reason: str, detail: str, unique_id: int | None) -> None:
        """An update that could not be decoded (``reason`` as in :class:`FrameDecodeError`)."""

    # Optional (the edge worker has them; :class:`PvaFrameSource` uses them when present):
    # ``saturated() -> bool`` says the handler would drop a frame anyway (its queue is full);
    # the source then reads only the ``uniqueId`` and calls ``on_overflow(unique_id)``
    # instead of decoding the update and calling ``on_frame``.


@runtime_checkable
class FrameSource(Protocol):
    """A stream of detector frames."""

    def start(self, handler: FrameHandler) -> None:
        """Begin delivering updates to ``handler``."""

    def stop(self) -> None:
        """Stop delivering; no handler call starts after this returns."""

    @property
    def connected(self) -> bool:
        """Whether the source is connected to its producer."""

    def stats(self) -> dict[str, int]:
        """Transport-level counters (e.g. monitor overruns)."""


@runtime_checkable
class PatchSink(Protocol):
    """Where the edge worker puts phase patches and its status."""

    def start(self) -> None:
        """Create channels/resources; called before the first publish."""

    def publish(self, patch: Patch) -> None:
        """Publish one patch (called from the worker's inference thread)."""

    def publish_status(self, status: Mapping[str, Any]) -> None:
        """Publish the worker's status (a JSON-serialisable mapping)."""

    def stop(self) -> None:
        """Release channels/resources."""


# ---------------------------------------------------------------------------------------------
# in-process transport

_STOP = object()


class InProcessFrameSource:
    """Queue-based frame source with :class:`FramePublisher`'s publishing interface.

    Updates are delivered, in order, on a delivery thread (as pvapy delivers monitor updates on
    its own thread), so a slow handler shows the same back-pressure behaviour as pvAccess
    without sockets.  Frames published before :meth:`start` are delivered once it is called.
    """

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._handler: FrameHandler | None = None
        self._thread: threading.Thread | None = None
        self._published = 0
        self._delivered = 0
        self._idle = threading.Condition()

    # producer side -----------------------------------------------------------------------
    def publish(
        self,
        frame: NDArray[Any],
        unique_id: int,
        *,
        pos: tuple[float, float] | None = None,
        scan_uid: str | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: float | None = None,
    ) -> None:
        """Publish a frame (same arguments as :meth:`FramePublisher.publish`)."""
        t = time.time() if timestamp is None else float(timestamp)
        data = np.array(frame, copy=True)
        self._put(Frame(int(unique_id), data, None if pos is None else (float(pos[0]),
                        float(pos[1])), scan_uid, t, dict(attributes or {})))

    def publish_frame(self, frame: Frame) -> None:
        """Publish an already built :class:`Frame` (any dtype/shape: for bad-input tests)."""
        self._put(frame)

    def publish_reject(self, reason: str, detail: str = "", unique_id: int | None = None) -> None:
        """Publish an undecodable update, as pvAccess would report it (e.g. ``"empty"``)."""
        self._put((reason, detail, unique_id))

    def _put(self, item: Any) -> None:
        with self._idle:
            self._published += 1
        self._queue.put(item)

    def wait_delivered(self, timeout: float = 10.0) -> bool:
        """Wait until every published update has been handed to the handler."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._delivered < self._published:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # FrameSource --------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, handler: FrameHandler) -> None:
        if self._thread is not None:
            raise RuntimeError("InProcessFrameSource already started")
        self._handler = handler
        self._thread = threading.Thread(target=self._run, name="inproc-frames", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        assert self._handler is not None
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            try:
                if isinstance(item, Frame):
                    self._handler.on_frame(item)
                else:
                    self._handler.on_reject(*item)
            except Exception:
                logger.exception("frame handler raised")
            with self._idle:
                self._delivered += 1
                self._idle.notify_all()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join(timeout=10.0)
        self._thread = None

    def stats(self) -> dict[str, int]:
        return {"published": self._published, "delivered": self._delivered}


class InProcessPatchSink:
    """Collects patches and status in memory, optionally forwarding each patch to a callback.

    Parameters
    ----------
    on_patch
        Called with every patch on the worker's inference thread (exceptions propagate to the
        worker, which counts them as ``publish_error``).
    on_status
        Called with every status mapping.
    keep
        Keep patches in :attr:`patches` (disable for long runs).
    """

    def __init__(self, on_patch: Callable[[Patch], None] | None = None,
                 on_status: Callable[[Mapping[str, Any]], None] | None = None,
                 keep: bool = True) -> None:
        self.patches: list[Patch] = []
        self.statuses: list[dict[str, Any]] = []
        self._on_patch = on_patch
        self._on_status = on_status
        self._keep = keep
        self._count = 0
        self._cond = threading.Condition()

    def start(self) -> None:
        """Nothing to create."""

    def stop(self) -> None:
        """Nothing to release."""

    def publish(self, patch: Patch) -> None:
        if self._on_patch is not None:
            self._on_patch(patch)
        with self._cond:
            if self._keep:
                self.patches.append(patch)
            self._count += 1
            self._cond.notify_all()

    def publish_status(self, status: Mapping[str, Any]) -> None:
        with self._cond:
            self.statuses.append(dict(status))
        if self._on_status is not None:
            self._on_status(status)

    @property
    def count(self) -> int:
        """Patches published so far."""
        return self._count

    def wait_for(self, n: int, timeout: float = 10.0) -> bool:
        """Wait until at least ``n`` patches were published; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._count < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True


# ---------------------------------------------------------------------------------------------
# pvAccess transport


def _pva() -> Any:
    import pvaccess

    return pvaccess


def _monitor_request(server_queue_size: int) -> str:
    return f"record[queueSize={int(server_queue_size)}]field()" if server_queue_size > 0 else ""


class FramePublisher:
    """pvAccess server side for detector frames: one NTNDArray record.

    The record starts empty, so a client's first monitor update is an empty NTNDArray (as for
    a freshly created areaDetector PVA plugin record).

    Parameters
    ----------
    channel
        Record name, e.g. ``"ptycho:det:frames"``.
    server
        A running ``pvaccess.PvaServer`` to add the record to; a private one when None.

    Examples
    --------
    >>> pub = FramePublisher("ptycho:det:frames")                      # doctest: +SKIP
    >>> pub.publish(frame, unique_id=1, pos=(10.0, 12.5), scan_uid=uid)  # doctest: +SKIP
    """

    def __init__(self, channel: str, server: Any | None = None) -> None:
        pva = _pva()
        self.channel = channel
        self._own_server = server is None
        self._server = pva.PvaServer() if server is None else server
        self._server.addRecord(channel, empty_ntndarray(), None)
        self._lock = threading.Lock()
        self.published = 0
        logger.debug("serving frames on %s", channel)

    def publish(
        self,
        frame: NDArray[Any],
        unique_id: int,
        *,
        pos: tuple[float, float] | None = None,
        scan_uid: str | None = None,
        attributes: Mapping[str, AttributeValue] | None = None,
        timestamp: float | None = None,
    ) -> None:
        """Publish one frame.

        Parameters
        ----------
        frame : (H, W) uint16, uint32, int32 or float32
            The detector frame.
        unique_id
            NTNDArray ``uniqueId``: consecutive integers, so that receivers can count gaps.
        pos
            Scan position ``(pos_x, pos_y)`` (see :mod:`.ntnda` for the convention).
        scan_uid
            Run start uid.
        attributes
            Extra scalar attributes (forwarded by the worker to the patch).
        timestamp
            Publication time (epoch seconds); now when None.
        """
        nt = encode_frame(frame, unique_id, pos=pos, scan_uid=scan_uid, attributes=attributes,
                          timestamp=timestamp)
        self.publish_raw(nt)

    def publish_raw(self, pv_object: Any) -> None:
        """Publish a ready-made NTNDArray ``PvObject`` (e.g. a malformed one, in tests)."""
        with self._lock:
            self._server.update(self.channel, pv_object)
            self.published += 1

    def close(self) -> None:
        """Remove the record and stop a private server."""
        try:
            self._server.removeRecord(self.channel)
        except Exception:  # already removed or server stopped
            logger.debug("could not remove record %s", self.channel, exc_info=True)
        if self._own_server:
            self._server.stop()

    def __enter__(self) -> FramePublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PvaFrameSource:
    """Frames from an NTNDArray channel over pvAccess (the worker's input).

    Parameters
    ----------
    channel
        Input channel name.
    server_queue_size
        Server-side monitor queue (``record[queueSize=N]``) absorbing bursts; 0 for the
        server's default.
    monitor_queue_length
        pvapy's client-side queue (``Channel.setMonitorMaxQueueLength``).  Keep 0 (updates
        handled directly on the pvAccess thread): see the module docstring for why.
    """

    def __init__(self, channel: str, *, server_queue_size: int = 1000,
                 monitor_queue_length: int = 0) -> None:
        self.channel_name = channel
        self.server_queue_size = int(server_queue_size)
        self.monitor_queue_length = int(monitor_queue_length)
        self._channel: Any = None
        self._handler: FrameHandler | None = None
        self._connected = False
        self._active = False
        # Connection changes are only recorded by the pvAccess callback and handled by a
        # watchdog thread (_watch): Python work inside pvapy's connection callback, or a new
        # monitor started from it, crashed the interpreter in some runs.
        self._events: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._updates = 0
        self._watchdog: threading.Thread | None = None
        self._retired: list[Any] = []  # pvapy channels replaced, kept alive (destroying one can crash)
        self.connects = 0
        self.disconnects = 0
        self.resubscribes = 0

    @property
    def connected(self) -> bool:
        return self._connected

    def _on_connection(self, is_connected: bool) -> None:
        self._connected = bool(is_connected)
        self._events.put(bool(is_connected))

    def _watch(self, silent_s: float = 1.0) -> None:
        """Count and log connection changes; re-monitor when a reconnected monitor stays silent.

        With pvapy 5.6 the monitor stayed silent after the detector's server restarted while the
        connection callback did Python work; with the callback reduced to a queue put it resumes
        (a live monitor is handed the record's current value on connecting).  As a safeguard, a
        reconnected monitor that delivers nothing for ``silent_s`` is replaced by one on a fresh
        channel object (monitoring again on the same object crashes); the old one is kept alive,
        stopped.
        """
        was_connected = False
        pending: tuple[float, int] | None = None  # (reconnected at, updates then)
        while self._active:
            try:
                connected = self._events.get(timeout=0.2)
            except queue.Empty:
                connected = None
            if connected is True and not was_connected:
                self.connects += 1
                if self.connects == 1:
                    logger.info("input channel %s connected", self.channel_name)
                else:
                    logger.warning("input channel %s reconnected (connection %d)", self.channel_name,
                                   self.connects)
                    pending = (time.monotonic(), self._updates)
            elif connected is False and was_connected:
                self.disconnects += 1
                pending = None
                logger.warning("input channel %s disconnected (the detector or its IOC stopped?): "
                               "frames published meanwhile are lost upstream; waiting to reconnect",
                               self.channel_name)
            if connected is not None:
                was_connected = connected
            if pending is not None and time.monotonic() - pending[0] >= silent_s:
                if self._updates == pending[1] and self._active:
                    self.resubscribes += 1
                    logger.warning("input channel %s: no update since it reconnected; monitoring "
                                   "again on a fresh channel", self.channel_name)
                    old = self._channel
                    self._channel = self._monitor()
                    try:
                        old.stopMonitor()
                    except Exception:
                        logger.debug("stopMonitor failed on %s", self.channel_name, exc_info=True)
                    self._retired.append(old)
                pending = None

    def _monitor(self) -> Any:
        channel = _pva().Channel(self.channel_name)
        channel.setConnectionCallback(self._on_connection)
        channel.setMonitorMaxQueueLength(self.monitor_queue_length)
        channel.monitor(self._on_update, _monitor_request(self.server_queue_size))
        return channel

    def _on_update(self, pv: Any) -> None:
        self._updates += 1
        handler = self._handler
        if handler is None or not self._active:
            return
        saturated = getattr(handler, "saturated", None)
        if saturated is not None and saturated():
            # overloaded: count the drop without paying for the decode (~0.1-0.2 ms a frame)
            try:
                unique_id = int(pv["uniqueId"])
            except Exception:
                unique_id = None
            if unique_id is not None:
                try:
                    handler.on_overflow(unique_id)  # type: ignore[attr-defined]
                except Exception:
                    logger.exception("overflow handler raised for uniqueId %d", unique_id)
                return
        t_recv = time.time()
        try:
            frame = decode_frame(pv, t_recv=t_recv)
        except FrameDecodeError as exc:
            handler.on_reject(exc.reason, str(exc), exc.unique_id)
            return
        except Exception as exc:  # a malformed structure must never kill the monitor
            handler.on_reject("decode_error", f"{type(exc).__name__}: {exc}", None)
            return
        try:
            handler.on_frame(frame)
        except Exception:
            logger.exception("frame handler raised for uniqueId %d", frame.unique_id)

    def start(self, handler: FrameHandler) -> None:
        self._handler = handler
        self._active = True
        self._channel = self._monitor()
        self._watchdog = threading.Thread(target=self._watch, daemon=True,
                                          name=f"pva-watch-{self.channel_name}")
        self._watchdog.start()
        logger.info("monitoring %s (server queue %d)", self.channel_name, self.server_queue_size)

    def stop(self) -> None:
        self._active = False
        if self._watchdog is not None:
            self._watchdog.join(5.0)
            self._watchdog = None
        if self._channel is not None:
            try:
                self._channel.stopMonitor()
            except Exception:
                logger.debug("stopMonitor failed on %s", self.channel_name, exc_info=True)
            self._channel = None
        self._connected = False

    def stats(self) -> dict[str, int]:
        if self._channel is None:
            return {}
        counts = {"connects": self.connects, "disconnects": self.disconnects,
                  "resubscribes": self.resubscribes}
        try:
            counts.update({f"monitor_{k}": int(v) for k, v in self._channel.getMonitorCounters().items()})
        except Exception:
            pass
        return counts


#: Typed fields of the status record; ``json`` holds the full status mapping.
STATUS_FIELDS: dict[str, str] = {
    "received": "ULONG",
    "inferred": "ULONG",
    "dropped": "ULONG",
    "gaps": "ULONG",
    "queue_depth": "UINT",
    "infer_p50_ms": "DOUBLE",
    "infer_p99_ms": "DOUBLE",
    "e2e_p50_ms": "DOUBLE",
    "e2e_p99_ms": "DOUBLE",
    "fps": "DOUBLE",
    "model_version": "STRING",
    "engine": "STRING",
    "input_connected": "BOOLEAN",
    "json": "STRING",
}


def _status_object(status: Mapping[str, Any] | None = None) -> Any:
    pva = _pva()
    types = {k: getattr(pva, v) for k, v in STATUS_FIELDS.items()}
    values: dict[str, Any] = {}
    if status is not None:
        flat = dict(status)
        if isinstance(flat.get("dropped"), Mapping):  # the reason counts live in ``json``
            flat["dropped"] = flat.get("dropped_total", sum(flat["dropped"].values()))
        for key, kind in STATUS_FIELDS.items():
            if key == "json":
                values[key] = json.dumps(status, sort_keys=True, default=str)
            elif flat.get(key) is not None:
                value = flat[key]
                if kind == "STRING":
                    values[key] = str(value)
                elif kind == "BOOLEAN":
                    values[key] = bool(value)
                elif kind == "DOUBLE":
                    values[key] = float(value) if np.isfinite(value) else 0.0
                else:
                    values[key] = int(value)
    return pva.PvObject(types, values)


class PvaPatchSink:
    """Serves the worker's phase patches (NTNDArray) and status over pvAccess.

    Parameters
    ----------
    output_channel
        Patch record name (float32 NTNDArray, see :mod:`.ntnda`).
    status_channel
        Status record name (a structure of the fields in :data:`STATUS_FIELDS`; ``json`` holds
        the complete status); None for no status record.
    server
        A running ``pvaccess.PvaServer``; a private one when None.
    """

    def __init__(self, output_channel: str, status_channel: str | None = None,
                 server: Any | None = None) -> None:
        self.output_channel = output_channel
        self.status_channel = status_channel
        self._server = server
        self._own_server = server is None
        self._lock = threading.Lock()
        self.published = 0

    def start(self) -> None:
        pva = _pva()
        if self._server is None:
            self._server = pva.PvaServer()
        self._server.addRecord(self.output_channel, empty_ntndarray(), None)
        if self.status_channel:
            self._server.addRecord(self.status_channel, _status_object(), None)
        logger.info("serving patches on %s, status on %s", self.output_channel,
                    self.status_channel)

    def publish(self, patch: Patch) -> None:
        nt = encode_patch(patch)
        with self._lock:
            self._server.update(self.output_channel, nt)
            self.published += 1

    def publish_status(self, status: Mapping[str, Any]) -> None:
        if not self.status_channel or self._server is None:
            return
        obj = _status_object(status)
        with self._lock:
            self._server.update(self.status_channel, obj)

    def stop(self) -> None:
        if self._server is None:
            return
        for name in (self.output_channel, self.status_channel):
            if name:
                try:
                    self._server.removeRecord(name)
                except Exception:
                    logger.debug("could not remove record %s", name, exc_info=True)
        if self._own_server:
            self._server.stop()
        self._server = None


def read_status(channel: str = DEFAULT_STATUS_PV, timeout: float = 2.0) -> dict[str, Any]:
    """Read the edge worker's status channel once.

    Returns
    -------
    dict
        The full status mapping (decoded from the record's ``json`` field); empty when the
        worker has not published a status yet.

    Raises
    ------
    pvaccess.PvaException
        When the channel cannot be reached within ``timeout``.
    """
    pva = _pva()
    ch = pva.Channel(channel)
    ch.setTimeout(timeout)
    text = ch.get("field(json)")["json"]
    return dict(json.loads(text)) if text else {}


class PatchSubscriber:
    """pvAccess client for the worker's phase patches.

    Each decoded :class:`Patch` is handed to ``callback`` on the pvAccess thread, so keep the
    callback short (enqueue and return).  Exceptions raised by the callback are logged and
    counted, never propagated into pvAccess.

    Parameters
    ----------
    channels
        Output channel name, or several (one per ``pvapy-hpc-consumer`` consumer).
    callback
        Called with every patch.
    server_queue_size
        Server-side monitor queue (``record[queueSize=N]``).

    Attributes
    ----------
    received : int
        Patches delivered to the callback.
    gaps : int
        Ids skipped within a channel's stream of ``uniqueId`` (frames the worker dropped,
        or patches lost in transport).  With several consumer channels fed by a distributor,
        each channel skips the ids the others serve; account with the union of the ids then.
    errors : int
        Updates that failed to decode (other than the empty initial one) or callbacks that
        raised.
    repeats : int
        Patches skipped because their ``uniqueId`` equals the previous one on the channel: the
        current value that pvAccess hands a monitor again when it reconnects.
    """

    def __init__(self, channels: str | Sequence[str], callback: Callable[[Patch], None], *,
                 server_queue_size: int = 1000) -> None:
        self.channels = [channels] if isinstance(channels, str) else list(channels)
        if not self.channels:
            raise ValueError("PatchSubscriber needs at least one channel name")
        self._callback = callback
        self._server_queue_size = int(server_queue_size)
        self._chans: list[Any] = []
        self._last_id: dict[str, int] = {}
        self._first_update: set[str] = set()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._active = False
        self.received = 0
        self.gaps = 0
        self.errors = 0
        self.repeats = 0

    def start(self) -> PatchSubscriber:
        """Connect and start monitoring; returns self."""
        pva = _pva()
        self._active = True
        for name in self.channels:
            ch = pva.Channel(name)
            ch.setMonitorMaxQueueLength(0)
            ch.monitor(lambda pv, _n=name: self._on_update(_n, pv),
                       _monitor_request(self._server_queue_size))
            self._chans.append(ch)
        return self

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """Wait until every channel delivered its initial update (the monitor is live)."""
        deadline = time.monotonic() + timeout
        with self._ready:
            while len(self._first_update) < len(self.channels):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._ready.wait(remaining)
        return True

    def _on_update(self, name: str, pv: Any) -> None:
        if not self._active:
            return
        with self._ready:
            first = name not in self._first_update
            if first:
                self._first_update.add(name)
                self._ready.notify_all()
        try:
            patch = decode_patch(pv)
        except FrameDecodeError as exc:
            if not (first and exc.reason == "empty"):
                with self._lock:
                    self.errors += 1
                logger.warning("undecodable patch on %s: %s", name, exc)
            return
        except Exception as exc:
            with self._lock:
                self.errors += 1
            logger.warning("undecodable patch on %s: %s", name, exc)
            return
        with self._lock:
            last = self._last_id.get(name)
            if patch.unique_id == last:
                # a monitor that reconnects is handed the channel's current value again
                self.repeats += 1
                logger.debug("patch uniqueId %d on %s delivered again (reconnection): skipped",
                             patch.unique_id, name)
                return
            if last is not None and patch.unique_id > last + 1:
                self.gaps += patch.unique_id - last - 1
            self._last_id[name] = patch.unique_id
            self.received += 1
        try:
            self._callback(patch)
        except Exception:
            with self._lock:
                self.errors += 1
            logger.exception("PatchSubscriber callback raised for uniqueId %d",
                             patch.unique_id)

    def stop(self) -> None:
        """Stop monitoring."""
        self._active = False
        for ch in self._chans:
            try:
                ch.stopMonitor()
            except Exception:
                logger.debug("stopMonitor failed", exc_info=True)
        self._chans.clear()

    def __enter__(self) -> PatchSubscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def iter_names(names: str | Iterable[str]) -> list[str]:
    """Split a comma-separated channel list (CLI helper)."""
    if isinstance(names, str):
        return [n.strip() for n in names.split(",") if n.strip()]
    return [str(n) for n in names]

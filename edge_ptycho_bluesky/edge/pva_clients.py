"""pvAccess client side: the worker's frame input (:class:`PvaFrameSource`, which follows its
channel through disconnections), the patch subscriber (:class:`PatchSubscriber`) and a one-off
status read (:func:`read_status`).

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
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pvaccess as pva

from .ntnda import FrameDecodeError, Patch, decode_frame, decode_patch
from .transport import DEFAULT_STATUS_PV, FrameHandler

__all__ = ["PatchSubscriber", "PvaFrameSource", "read_status"]

logger = logging.getLogger(__name__)


def _monitor_request(server_queue_size: int) -> str:
    return f"record[queueSize={int(server_queue_size)}]field()" if server_queue_size > 0 else ""


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
        channel = pva.Channel(self.channel_name)
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

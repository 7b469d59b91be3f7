"""In-process transport (unit tests, and the pvapy hpc processor): the worker's
:class:`~.transport.FrameSource` and :class:`~.transport.PatchSink` interfaces without sockets."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .ntnda import AttributeValue, Frame, Patch
from .transport import FrameHandler

__all__ = ["InProcessFrameSource", "InProcessPatchSink"]

logger = logging.getLogger(__name__)


_STOP = object()


class InProcessFrameSource:
    """Queue-based frame source with :class:`~.pva_servers.FramePublisher`'s publishing interface.

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
        """Publish a frame (same arguments as :meth:`~.pva_servers.FramePublisher.publish`)."""
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

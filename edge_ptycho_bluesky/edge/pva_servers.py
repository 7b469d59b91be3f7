"""pvAccess server side: detector frames (:class:`FramePublisher`) and the worker's phase
patches and status (:class:`PvaPatchSink`), each served from a ``pvaccess.PvaServer``.

Call :func:`~.transport.loopback_env` before the first pvapy object of a process is created to
keep pvAccess on 127.0.0.1.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import pvaccess as pva
from numpy.typing import NDArray

from .ntnda import AttributeValue, Patch, empty_ntndarray, encode_frame, encode_patch

__all__ = ["STATUS_FIELDS", "FramePublisher", "PvaPatchSink"]

logger = logging.getLogger(__name__)


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

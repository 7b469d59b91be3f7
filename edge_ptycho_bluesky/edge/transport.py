"""Transports between detector, edge worker and clients: the interfaces, channel names, loopback.

The edge worker is transport-agnostic: it reads frames from a :class:`FrameSource` and writes
phase patches and its status to a :class:`PatchSink`.  The implementations:

pvAccess (the real path, via pvapy)
    Server side (:mod:`.pva_servers`): :class:`~.pva_servers.FramePublisher` serves detector
    frames as NTNDArrays (the way areaDetector's PVA plugin and the simulated fly detector do);
    :class:`~.pva_servers.PvaPatchSink` serves the worker's output patches and status from a
    ``pvaccess.PvaServer``.
    Client side (:mod:`.pva_clients`): :class:`~.pva_clients.PvaFrameSource` monitors a frame
    channel for the worker; :class:`~.pva_clients.PatchSubscriber` monitors the output
    channel(s) and hands decoded :class:`~edge_ptycho_bluesky.edge.ntnda.Patch` objects to a
    callback; :func:`~.pva_clients.read_status` reads the status channel once.
In-process (unit tests, and the pvapy hpc processor; :mod:`.inprocess`)
    :class:`~.inprocess.InProcessFrameSource` and :class:`~.inprocess.InProcessPatchSink`, same
    interfaces, no sockets.

Loopback: call :func:`loopback_env` before the first pvapy object of a process is created;
pvAccess reads the ``EPICS_PVA*`` variables when its contexts start.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any, Protocol, runtime_checkable

from .ntnda import Frame, Patch

__all__ = [
    "DEFAULT_INPUT_PV",
    "DEFAULT_OUTPUT_PV",
    "DEFAULT_STATUS_PV",
    "FrameHandler",
    "FrameSource",
    "LOOPBACK_ENV",
    "PatchSink",
    "embedded_worker_env",
    "loopback_env",
]

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


def embedded_worker_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Let a session reach its embedded worker on loopback without cutting it off from the network.

    The session's own servers (the worker's input channel) listen on 127.0.0.1 only
    (``EPICS_PVAS_INTF_ADDR_LIST``). Its clients search 127.0.0.1 *as well as* the addresses the
    beamline configured: ``127.0.0.1`` is appended to ``EPICS_PVA_ADDR_LIST`` and
    ``EPICS_PVA_AUTO_ADDR_LIST`` is left as set, so pvAccess devices and a worker on another host
    stay reachable. With no address list configured at all, the whole of :data:`LOOPBACK_ENV` is
    set (a session on its own, as in the simulated beamline). Call it before the first pvapy
    ``Channel`` or ``PvaServer`` of the process.

    Returns
    -------
    dict
        The variables changed.
    """
    target = os.environ if environ is None else environ
    configured = target.get("EPICS_PVA_ADDR_LIST", "").split()
    if not configured:
        changes = dict(LOOPBACK_ENV)
    else:
        changes = {"EPICS_PVAS_INTF_ADDR_LIST": "127.0.0.1"}
        if "127.0.0.1" not in configured:
            changes["EPICS_PVA_ADDR_LIST"] = " ".join([*configured, "127.0.0.1"])
    changes = {k: v for k, v in changes.items() if target.get(k) != v}
    target.update(changes)
    return changes


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

    # Optional (the edge worker has them; :class:`~.pva_clients.PvaFrameSource` uses them when present):
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

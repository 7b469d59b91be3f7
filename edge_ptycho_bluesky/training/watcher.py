"""New labelled runs found in Tiled, queued for retraining (a retraining service without a RunEngine)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from edge_ptycho_bluesky.training.service import RetrainService

logger = logging.getLogger(__name__)

__all__ = ["TiledRunWatcher"]


class TiledRunWatcher:
    """Polls a Tiled catalog for newly finished labelled scans and queues them for retraining.

    The alternative to subscribing :class:`~edge_ptycho_bluesky.callbacks.retrain.RetrainCallback`
    to the RunEngine: a retraining service that runs elsewhere (another process, the HPC side)
    learns of new runs from Tiled.
    Runs already in the catalog when the watcher starts are not queued (pass ``since=0`` to
    queue every stored labelled scan). A run is queued once it has a stop document with
    ``exit_status == "success"``.

    Parameters
    ----------
    client
        Tiled client of the catalog (``storage.connect``).
    service : RetrainService
        Receives ``submit(uid, trigger="tiled")``.
    interval_s : float
        Polling period (seconds).
    since : float, optional
        Only runs started at or after this time (``time.time`` seconds); default: now.
    """

    def __init__(self, client: Any, service: RetrainService, interval_s: float = 10.0,
                 since: float | None = None) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be > 0 seconds, got {interval_s!r}")
        self.client = client
        self.service = service
        self.interval_s = float(interval_s)
        self.since = time.time() if since is None else float(since)
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="retrain-tiled-watch", daemon=True)

    def start(self) -> TiledRunWatcher:
        """Start polling (returns self)."""
        self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop polling."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def poll(self) -> list[str]:
        """Look once; return the uids queued."""
        from tiled.queries import Key

        results = self.client.search(Key("start.edge_ptycho.labelled") == True)  # noqa: E712
        results = results.search(Key("start.time") >= self.since)
        queued = []
        for uid, node in results.items():
            if uid in self._seen:
                continue
            stop = node.metadata.get("stop")
            if not stop:
                continue  # still running
            self._seen.add(uid)
            if stop.get("exit_status") != "success":
                logger.info("Tiled watcher: run %s ended with %s; not queued", uid, stop.get("exit_status"))
                continue
            self.service.submit(uid, trigger="tiled")
            queued.append(uid)
        return queued

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:
                logger.exception("Tiled watcher: polling %s failed; trying again in %.0f s",
                                 getattr(self.client, "uri", self.client), self.interval_s)
            self._stop.wait(self.interval_s)

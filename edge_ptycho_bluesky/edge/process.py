"""Start and stop ``edge-ptycho worker`` as a separate process (the demo and the profile use it).

The worker runs in its own process, as it would on an edge machine next to the detector; this
module starts it on pvAccess loopback, waits until its channels are served, and stops it with
SIGINT so that it drains its queue and writes its final statistics.

With ``supervise=True`` a watcher thread restarts a worker that exits on its own (killed, crashed,
out of memory) with the same command and channels, so it reconnects to the detector's channel
and serves the same output channel again: subscribers' pvAccess monitors reconnect by
themselves.  Frames published while it was down never reach it; the live stitch callback lists
them (``StitchResult.missing``) and a replay of the stored run re-infers them.  Restarts are
logged, counted (:attr:`WorkerProcess.restarts`) and limited (``max_restarts`` within
``restart_window`` seconds) so that a worker that dies at once every time is not restarted
forever.  For a worker started by hand on an edge machine, the same job is a service manager's:
``docs/reliability.md`` has a systemd unit.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .transport import loopback_env

__all__ = ["WorkerChannels", "WorkerProcess"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerChannels:
    """The three pvAccess channel names of one worker."""

    input: str
    output: str
    status: str

    @classmethod
    def unique(cls, prefix: str = "edge_ptycho") -> WorkerChannels:
        """Channel names no other worker on this host uses (a random tag)."""
        tag = uuid.uuid4().hex[:8]
        return cls(f"{prefix}:{tag}:frames", f"{prefix}:{tag}:phase", f"{prefix}:{tag}:status")


class WorkerProcess:
    """An ``edge-ptycho worker`` subprocess on pvAccess loopback.

    Parameters
    ----------
    registry : path, optional
        Model registry folder (the deployed version is served and hot-swapped on change).
    model : path, optional
        One ONNX file instead of a registry.
    channels : WorkerChannels, optional
        Channel names; default: unique ones.
    engine : str
        ``auto``, ``onnxruntime``, ``torch`` or ``tensorrt``.
    extra_args : list of str
        More ``edge-ptycho worker`` options (``["--batch-size", "16"]``...).
    log_path : path, optional
        Where the worker's output goes (default: a temporary file, see :attr:`log_path`); each
        restart appends to it.
    supervise : bool
        Restart the worker when it exits without :meth:`stop` (see the module docstring).
    max_restarts, restart_window : int, float
        At most this many restarts within this many seconds; then it stays down (logged).

    Attributes
    ----------
    restarts : int
        Times the supervisor restarted the worker.
    exits : list of dict
        Every unexpected exit: ``{"time", "pid", "returncode", "restarted"}``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, registry: str | os.PathLike[str] | None = None, *,
                 model: str | os.PathLike[str] | None = None, channels: WorkerChannels | None = None,
                 engine: str = "onnxruntime", extra_args: list[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None, supervise: bool = False,
                 max_restarts: int = 5, restart_window: float = 300.0) -> None:
        if (registry is None) == (model is None):
            raise ValueError("give exactly one of registry= (a model registry folder) or model= (an ONNX file)")
        self.source = ["--registry", str(registry)] if registry is not None else ["--model", str(model)]
        self.channels = channels or WorkerChannels.unique()
        self.engine = engine
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="edge-worker-", suffix=".log")[1])
        self._stats_path = self.log_path.with_suffix(".stats.json")
        self._proc: subprocess.Popen[str] | None = None
        self.supervise = supervise
        self.max_restarts = int(max_restarts)
        self.restart_window = float(restart_window)
        self.exits: list[dict[str, Any]] = []
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        proc = self._proc
        return proc is not None and proc.poll() is None

    @property
    def restarts(self) -> int:
        """Times the supervisor restarted the worker."""
        return sum(1 for e in self.exits if e["restarted"])

    @property
    def pid(self) -> int | None:
        """Process id of the running worker (changes at each restart), None when down."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until it serves its channels (then supervise it if asked).

        Raises
        ------
        RuntimeError
            The worker exited or did not start within ``timeout`` s; the message holds its log.
        """
        self._stopping.clear()
        self._launch(timeout, append=False)
        if self.supervise and (self._watcher is None or not self._watcher.is_alive()):
            self._watcher = threading.Thread(target=self._watch, args=(timeout,), daemon=True,
                                             name="edge-worker-supervisor")
            self._watcher.start()
        return self

    def _launch(self, timeout: float, append: bool) -> None:
        cmd = [sys.executable, "-m", "edge_ptycho_bluesky.cli", "worker", *self.source,
               "--input", self.channels.input, "--output", self.channels.output,
               "--status", self.channels.status, "--engine", self.engine,
               "--stats-json", str(self._stats_path), *self.extra_args]
        env = dict(os.environ)
        loopback_env(env)
        self._stats_path.unlink(missing_ok=True)
        offset = self.log_path.stat().st_size if append and self.log_path.exists() else 0
        log = self.log_path.open("a" if append else "w")
        proc = self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"event": "started"' in self._log_since(offset):
                logger.info("edge worker pid %d serving %s -> %s (log %s)", proc.pid,
                            self.channels.input, self.channels.output, self.log_path)
                return
            if proc.poll() is not None or self._stopping.is_set():
                break
            time.sleep(0.1)
        self._terminate(proc, timeout=5)
        raise RuntimeError(f"the edge worker did not start (command: {' '.join(cmd)}); its log "
                           f"{self.log_path}:\n{self._log_since(offset)[-3000:]}")

    def _log_since(self, offset: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _watch(self, timeout: float) -> None:
        """Supervisor thread: restart the worker when it exits without :meth:`stop`."""
        recent: list[float] = []
        while not self._stopping.wait(0.2):
            proc = self._proc
            if proc is None or proc.poll() is None:
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                now = time.monotonic()
                recent = [t for t in recent if now - t < self.restart_window]
                exit_info = {"time": time.time(), "pid": proc.pid, "returncode": proc.returncode,
                             "restarted": False}
                self.exits.append(exit_info)
                if len(recent) >= self.max_restarts:
                    logger.error("edge worker pid %d exited (code %s); it was restarted %d times in "
                                 "%.0f s: not restarting again (see %s)", proc.pid, proc.returncode,
                                 len(recent), self.restart_window, self.log_path)
                    self._proc = None
                    return
                logger.error("edge worker pid %d exited unexpectedly (code %s): restarting it "
                             "(log %s)", proc.pid, proc.returncode, self.log_path)
                recent.append(now)
                try:
                    self._launch(timeout, append=True)
                except RuntimeError as exc:
                    logger.error("edge worker restart failed: %s", exc)
                    continue
                exit_info["restarted"] = True

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the worker (SIGINT: it drains its queue) and return its final statistics.

        Returns an empty dict when the worker wrote none (it was killed or never started).
        """
        self._stopping.set()
        with self._lock:  # not while the supervisor is restarting it
            proc, self._proc = self._proc, None
        self._terminate(proc, timeout)
        if self._stats_path.exists():
            return dict(json.loads(self._stats_path.read_text()))
        return {}

    @staticmethod
    def _terminate(proc: subprocess.Popen[str] | None, timeout: float) -> None:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("edge worker pid %d ignored SIGINT for %.0f s: killed", proc.pid, timeout)
                proc.kill()
                proc.wait()

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

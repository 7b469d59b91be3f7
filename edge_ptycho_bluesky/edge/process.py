"""Start and stop ``edge-ptycho worker`` as a separate process (the demo and the profile use it).

The worker runs in its own process, as it would on an edge machine next to the detector; this
module starts it on pvAccess loopback, waits until its channels are served, and stops it with
SIGINT so that it drains its queue and writes its final statistics.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
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
        Where the worker's output goes (default: a temporary file, see :attr:`log_path`).

    Use as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, registry: str | os.PathLike[str] | None = None, *,
                 model: str | os.PathLike[str] | None = None, channels: WorkerChannels | None = None,
                 engine: str = "onnxruntime", extra_args: list[str] | None = None,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        if (registry is None) == (model is None):
            raise ValueError("give exactly one of registry= (a model registry folder) or model= (an ONNX file)")
        self.source = ["--registry", str(registry)] if registry is not None else ["--model", str(model)]
        self.channels = channels or WorkerChannels.unique()
        self.engine = engine
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="edge-worker-", suffix=".log")[1])
        self._stats_path = self.log_path.with_suffix(".stats.json")
        self._proc: subprocess.Popen[str] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker and wait until it serves its channels.

        Raises
        ------
        RuntimeError
            The worker exited or did not start within ``timeout`` s; the message holds its log.
        """
        cmd = [sys.executable, "-m", "edge_ptycho_bluesky.cli", "worker", *self.source,
               "--input", self.channels.input, "--output", self.channels.output,
               "--status", self.channels.status, "--engine", self.engine,
               "--stats-json", str(self._stats_path), *self.extra_args]
        env = dict(os.environ)
        loopback_env(env)
        self._stats_path.unlink(missing_ok=True)
        log = self.log_path.open("w")
        self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if '"event": "started"' in self.log_path.read_text():
                logger.info("edge worker pid %d serving %s -> %s (log %s)", self._proc.pid,
                            self.channels.input, self.channels.output, self.log_path)
                return self
            if self._proc.poll() is not None:
                break
            time.sleep(0.1)
        self.stop(timeout=5)
        raise RuntimeError(f"the edge worker did not start (command: {' '.join(cmd)}); its log "
                           f"{self.log_path}:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout: float = 30.0) -> dict[str, Any]:
        """Stop the worker (SIGINT: it drains its queue) and return its final statistics.

        Returns an empty dict when the worker wrote none (it was killed or never started).
        """
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.error("edge worker pid %d ignored SIGINT for %.0f s: killed", proc.pid, timeout)
                proc.kill()
                proc.wait()
        if self._stats_path.exists():
            return dict(json.loads(self._stats_path.read_text()))
        return {}

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Run the simulated beamline IOC as a child process (tests, the profile's ``ioc`` beamline)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from .server import DEFAULT_PREFIX, PARENT_ENV, READY_LINE

__all__ = ["IocProcess", "loopback_ca_env"]

logger = logging.getLogger(__name__)


def loopback_ca_env() -> dict[str, str]:
    """Point this process's Channel Access (and pvAccess) clients at loopback, keeping any
    address list already configured; returns what it changed."""
    changed = {}
    for key in ("EPICS_CA_ADDR_LIST", "EPICS_PVA_ADDR_LIST"):
        current = os.environ.get(key, "").split()
        if "127.0.0.1" not in current:
            os.environ[key] = changed[key] = " ".join([*current, "127.0.0.1"])
    for key in ("EPICS_CA_AUTO_ADDR_LIST", "EPICS_PVA_AUTO_ADDR_LIST"):
        if key not in os.environ:
            os.environ[key] = changed[key] = "NO"
    return changed


class IocProcess:
    """``edge-ptycho ioc`` in a child process.

    Parameters
    ----------
    prefix
        Record prefix.
    args
        More ``edge-ptycho ioc`` options (``["--sample", "train", "--save-probe", "p.npy"]``).
    log_path
        Where its output goes (default: discarded after the ready line).
    """

    def __init__(self, prefix: str = DEFAULT_PREFIX, args: Sequence[str] = (), *,
                 log_path: str | os.PathLike[str] | None = None) -> None:
        self.prefix = prefix
        self.args = list(args)
        self.log_path = None if log_path is None else Path(log_path)
        self.proc: subprocess.Popen[str] | None = None
        self._lines: list[str] = []

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> IocProcess:
        """Start it and wait until it serves its records (RuntimeError with its output if not)."""
        cmd = [sys.executable, "-m", "edge_ptycho_bluesky.ioc.cli", "--prefix", self.prefix, *self.args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{PARENT_ENV: str(os.getpid())})  # ends with this process
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.proc, ready), daemon=True, name="ioc-output").start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = "".join(self._lines[-40:])
                self.stop()
                raise RuntimeError(f"the simulated IOC ({' '.join(cmd)}) did not start within {timeout:g} s:\n{output}")
        logger.info("simulated IOC %s running (pid %d)", self.prefix, self.proc.pid)
        return self

    def _pump(self, proc: subprocess.Popen[str], ready: threading.Event) -> None:
        log = open(self.log_path, "a") if self.log_path is not None else None
        try:
            for line in proc.stdout:  # type: ignore[union-attr]
                if READY_LINE in line:
                    ready.set()
                self._lines.append(line)
                del self._lines[:-200]
                if log is not None:
                    log.write(line)
                    log.flush()
        finally:
            if log is not None:
                log.close()

    def kill(self) -> None:
        """Kill it at once (SIGKILL), as a crashing IOC."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop it (SIGTERM: an open capture file is closed), then kill it if it does not end."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("simulated IOC %s did not stop within %g s: killed", self.prefix, timeout)
            self.kill()

    @property
    def output(self) -> str:
        """Its last lines of output."""
        return "".join(self._lines)

    def __enter__(self) -> IocProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

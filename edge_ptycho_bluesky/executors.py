"""Executors for the HPC side (reconstruction and retraining jobs).

Anything implementing :class:`concurrent.futures.Executor` runs the retraining job
(:func:`edge_ptycho_bluesky.training.jobs.run_retraining_job`); :func:`make_executor` builds
the usual ones:

``"process"`` (default)
    A local :class:`~concurrent.futures.ProcessPoolExecutor` with the ``spawn`` start method
    (the RunEngine process has threads; forking it is unsafe).
``"thread"``
    A :class:`~concurrent.futures.ThreadPoolExecutor` (tests, debugging; shares the GIL).
``"dask"``
    Dask distributed: a :class:`distributed.LocalCluster` of ``n_workers`` processes, or the
    scheduler at ``address`` (a cluster started with ``dask-jobqueue``, ``dask-gateway``...).
    Needs ``pip install "edge_ptycho_bluesky[dask]"``.
``"globus"``
    Globus Compute: ``globus_compute_sdk.Executor(endpoint_id=...)``, jobs run on a facility's
    endpoint. Needs ``pip install "edge_ptycho_bluesky[globus]"`` and a login; see
    ``docs/executors.md`` for an endpoint configuration.

Optional libraries are imported only when their executor is asked for.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["EXECUTOR_KINDS", "ExecutorUnavailable", "OwningExecutor", "make_executor", "executor_name"]

#: Kinds understood by :func:`make_executor`.
EXECUTOR_KINDS: tuple[str, ...] = ("process", "thread", "dask", "globus")


class ExecutorUnavailable(RuntimeError):
    """The executor's library is not installed or its service cannot be reached."""


class OwningExecutor(Executor):
    """An executor that also closes the resources it was built on (a Dask client and cluster).

    Parameters
    ----------
    inner : Executor
        Receives every :meth:`submit`.
    closers : sequence of callables
        Called in order after ``inner.shutdown()``.
    name : str
        Label for logs and records (``"dask"``, ``"globus"``).
    """

    def __init__(self, inner: Executor, closers: tuple[Callable[[], Any], ...] = (), name: str = "") -> None:
        self.inner = inner
        self.name = name or type(inner).__name__
        self._closers = closers
        self._closed = False

    def __repr__(self) -> str:
        return f"OwningExecutor({self.name!r}, {self.inner!r})"

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self.inner.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.inner.shutdown(wait=wait)
        finally:
            for close in self._closers:
                try:
                    close()
                except Exception:  # a cluster already gone
                    logger.warning("closing %s: %s failed", self.name, close, exc_info=True)


def executor_name(executor: Executor) -> str:
    """A short label of an executor for records (``"process"``, ``"dask"``...)."""
    if isinstance(executor, OwningExecutor):
        return executor.name
    if isinstance(executor, ProcessPoolExecutor):
        return "process"
    if isinstance(executor, ThreadPoolExecutor):
        return "thread"
    return type(executor).__name__


def make_executor(kind: str = "process", *, max_workers: int = 1, address: str | None = None,
                  n_workers: int = 2, threads_per_worker: int = 1, endpoint_id: str | None = None,
                  **kwargs: Any) -> Executor:
    """Build an executor for retraining jobs.

    Parameters
    ----------
    kind : {"process", "thread", "dask", "globus"}
    max_workers : int
        Workers of the process or thread pool. Jobs are submitted one at a time by
        :class:`~edge_ptycho_bluesky.training.service.RetrainService`, so 1 is enough; a
        persistent worker keeps its Tiled connection between jobs.
    address : str, optional
        ``"dask"``: scheduler address (``"tcp://host:8786"``); None starts a LocalCluster.
    n_workers, threads_per_worker : int
        ``"dask"`` LocalCluster size (worker processes).
    endpoint_id : str, optional
        ``"globus"``: the Globus Compute endpoint UUID (required).
    **kwargs
        Passed to the LocalCluster (``"dask"``) or to ``globus_compute_sdk.Executor``.

    Returns
    -------
    concurrent.futures.Executor
        Shut it down when done (``"dask"``: also closes the client and the cluster it started).

    Raises
    ------
    ValueError
        Unknown kind or bad sizes.
    ExecutorUnavailable
        The library of a ``"dask"``/``"globus"`` executor is not installed.
    """
    if kind not in EXECUTOR_KINDS:
        raise ValueError(f"unknown executor kind {kind!r}; choose one of {EXECUTOR_KINDS}")
    if not isinstance(max_workers, int) or max_workers < 1:
        raise ValueError(f"max_workers must be an integer >= 1, got {max_workers!r}")
    if kind == "process":
        return ProcessPoolExecutor(max_workers=max_workers, mp_context=multiprocessing.get_context("spawn"))
    if kind == "thread":
        return ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="retrain-job")
    if kind == "dask":
        return _dask_executor(address, n_workers, threads_per_worker, **kwargs)
    return _globus_executor(endpoint_id, **kwargs)


def _dask_executor(address: str | None, n_workers: int, threads_per_worker: int, **kwargs: Any) -> Executor:
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"the Dask executor needs dask distributed ({exc}); install it with "
            f"pip install 'edge_ptycho_bluesky[dask]'") from exc
    closers: list[Callable[[], Any]] = []
    if address is None:
        if not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers must be an integer >= 1, got {n_workers!r}")
        kwargs.setdefault("processes", True)
        kwargs.setdefault("dashboard_address", None)
        kwargs.setdefault("host", "127.0.0.1")
        cluster = LocalCluster(n_workers=n_workers, threads_per_worker=threads_per_worker, **kwargs)
        client = Client(cluster)
        closers = [client.close, cluster.close]
        logger.info("Dask LocalCluster with %d worker processes at %s", n_workers, cluster.scheduler_address)
    else:
        if kwargs:
            raise ValueError(f"LocalCluster options {sorted(kwargs)} make no sense with address={address!r}")
        client = Client(address)
        closers = [client.close]
        logger.info("Dask client connected to %s", address)
    return OwningExecutor(client.get_executor(pure=False), tuple(closers), name="dask")


def _globus_executor(endpoint_id: str | None, **kwargs: Any) -> Executor:
    if not endpoint_id:
        raise ValueError("the Globus Compute executor needs endpoint_id='<endpoint UUID>' (see "
                         "`globus-compute-endpoint list` on the facility's login node)")
    try:
        from globus_compute_sdk import Executor as GlobusExecutor
    except ImportError as exc:
        raise ExecutorUnavailable(
            f"the Globus Compute executor needs globus-compute-sdk ({exc}); install it with "
            f"pip install 'edge_ptycho_bluesky[globus]'") from exc
    return OwningExecutor(GlobusExecutor(endpoint_id=endpoint_id, **kwargs), name="globus")

"""Labelled scans from stored raw runs: the labels stored in Tiled for a run, else an rPIE
reconstruction of it cut into training labels (:func:`label_run`), used by ``edge-ptycho train
--scan`` (:func:`load_labelled_scan_from_tiled`) and by the retraining job."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any


from ..recon.labels import LabelledScan, find_labels, labels_from_reconstruction
from ..recon.reconstruct import reconstruct_scan
from ..recon.rpie_options import RPIEOptions
from ..runs import EdgePtychoMeta, read_scan

logger = logging.getLogger(__name__)

__all__ = ["label_run", "load_labelled_scan_from_tiled"]


def _local_dask() -> Any:
    """Make Tiled's dask-backed array reads compute in this process.

    Inside a Dask distributed worker, ``dask.compute`` would otherwise ship the read to the
    cluster, and a Tiled client of an embedded (in-process) catalog cannot be pickled.
    """
    try:
        import dask
    except ImportError:  # pragma: no cover - tiled depends on dask
        return contextlib.nullcontext()
    return dask.config.set(scheduler="synchronous")


def _stored_labels(client: Any, uid: str) -> Any:
    """Labels of ``uid`` stored in Tiled (``recon.labels.find_labels``), or None."""
    try:
        return find_labels(client, uid)
    except KeyError:
        return None


def label_run(client: Any, run: Any, *, reuse_stored_labels: bool = True, rpie_iterations: int | None = None,
              rpie_options: Mapping[str, Any] | None = None,
              timings: dict[str, float] | None = None) -> tuple[Any, str]:
    """The labelled scan (``recon.labels.LabelledScan``) of a stored raw run, and where it came from.

    The labels stored in Tiled for the run (``recon.labels.store_labels``) when there are some and
    ``reuse_stored_labels``, else rPIE of the run (``"rpie"``).  The scan's exposure
    (``exposure_s`` in the run's edge_ptycho metadata) goes into the labels' metadata, so that a model trained
    on them records it and the edge worker can scale frames of other exposures to it.

    Raises
    ------
    RunFormatError
        When the run was not recorded by the edge_ptycho plans (no edge_ptycho metadata).
    """
    timings = {} if timings is None else timings
    meta = EdgePtychoMeta.from_start(run.metadata["start"])
    uid = run.metadata["start"]["uid"]
    with _local_dask():
        labelled = _stored_labels(client, uid) if reuse_stored_labels else None
        if labelled is not None:
            source = "tiled"
            logger.info("scan %s: using the labels stored in Tiled (no reconstruction)", uid)
        else:
            source = "rpie"
            t = time.perf_counter()
            scan = read_scan(run)  # the frames are downloaded once, for rPIE and the labels
            timings["read"] = time.perf_counter() - t
            kwargs: dict[str, Any] = {}
            if rpie_iterations is not None:
                kwargs["iterations"] = rpie_iterations
            t = time.perf_counter()
            result = reconstruct_scan(scan, options=RPIEOptions.from_mapping(rpie_options) if rpie_options else None,
                                      **kwargs)
            timings["rpie"] = time.perf_counter() - t
            t = time.perf_counter()
            labelled = labels_from_reconstruction(result, scan.frames, scan_uid=uid,
                                                  metadata={"labelled_by": "rpie"})
            timings["labels"] = time.perf_counter() - t
    if meta.exposure_s is not None and "exposure_s" not in labelled.metadata:
        labelled = replace(labelled, metadata={**labelled.metadata, "exposure_s": meta.exposure_s})
    return labelled, source


def load_labelled_scan_from_tiled(uid: str, *, client: Any = None, rpie_iterations: int | None = None) -> LabelledScan:
    """The labelled scan of a stored raw scan, by uid, from the configured Tiled
    (:meth:`~edge_ptycho_bluesky.storage.StorageConfig.from_env`): its labels stored in Tiled when
    there are some, else rPIE of the scan (see :func:`label_run`).
    ``client``: a Tiled client to reuse (default: connect to the configured one).

    Raises
    ------
    KeyError
        No run with that uid.
    ValueError
        The run was not recorded by the edge_ptycho plans.
    StorageError
        Tiled cannot be reached.
    """
    from ..storage import StorageConfig, connect, get_run

    client = client if client is not None else connect(StorageConfig.from_env())
    run = get_run(client, uid)
    labelled, source = label_run(client, run, rpie_iterations=rpie_iterations)
    logger.info("scan %s: %d labelled frames (%s)", uid, len(labelled), source)
    return labelled

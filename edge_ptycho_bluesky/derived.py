"""Derived data (inferred patches, stitched images, labels) stored as Bluesky runs beside the raw run.

A derived run is an ordinary Bluesky run whose start document names the raw run in
``original_run_uid`` (the LiveDispatcher convention) and says what it holds in ``purpose``. Arrays
go to an HDF5 file announced by StreamResource/StreamDatum (as detector frames are); scalars and
strings go into the events. Send its documents to a TiledWriter and Tiled stores it next to the raw
run; find it again with :func:`find_derived_runs`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from event_model import compose_run
from numpy.typing import NDArray

logger = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict[str, Any]], Any]


def emit_derived_run(
    callback: DocumentCallback,
    *,
    original_run_uid: str,
    purpose: str,
    write_dir: str | Path,
    streams: Mapping[str, Mapping[str, NDArray[Any]]],
    md: Mapping[str, Any] | None = None,
) -> str:
    """Emit one derived run through ``callback``; return its uid.

    Parameters
    ----------
    callback
        Document consumer, e.g. a TiledWriter.
    original_run_uid
        uid of the raw run the data derive from.
    purpose
        What the run holds, e.g. ``"edge_inference"`` or ``"rpie_labels"``.
    write_dir
        Directory for the HDF5 file of the arrays (Tiled must be able to read it).
    streams
        ``{stream_name: {key: array (N, ...)}}``; every key of a stream has the same length N (one
        event per row). Keys whose rows are arrays go to HDF5; scalar and string rows stay in events.
    md
        More start-document metadata.
    """
    if not streams:
        raise ValueError("a derived run needs at least one stream")
    bundle = compose_run(metadata={"original_run_uid": original_run_uid, "purpose": purpose, **(md or {})})
    uid = bundle.start_doc["uid"]
    write_dir = Path(write_dir)
    write_dir.mkdir(parents=True, exist_ok=True)
    path = (write_dir / f"{uid}.h5").resolve()
    callback("start", bundle.start_doc)
    with h5py.File(path, "w") as h5:
        for stream_name, columns in streams.items():
            _emit_stream(callback, bundle, h5, path, stream_name, columns)
    callback("stop", bundle.compose_stop(exit_status="success"))
    logger.info("stored %s run %s for raw run %s (%s)", purpose, uid, original_run_uid, path)
    return uid


def _emit_stream(callback: DocumentCallback, bundle: Any, h5: h5py.File, path: Path, stream_name: str,
                 columns: Mapping[str, NDArray[Any]]) -> None:
    arrays = {key: np.asarray(value) for key, value in columns.items()}
    lengths = {len(value) for value in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"stream {stream_name!r}: columns have different lengths {sorted(lengths)}")
    (n_rows,) = lengths
    data_keys: dict[str, dict[str, Any]] = {}
    external = {key: value for key, value in arrays.items() if value.ndim > 1}
    for key, value in arrays.items():
        if key in external:
            data_keys[key] = {"source": f"derived:{key}", "dtype": "array", "shape": list(value.shape[1:]),
                              "dtype_numpy": value.dtype.str, "external": "STREAM:"}
        elif value.dtype.kind in "US":
            data_keys[key] = {"source": f"derived:{key}", "dtype": "string", "shape": []}
        else:
            data_keys[key] = {"source": f"derived:{key}", "dtype": "number", "shape": [],
                              "dtype_numpy": value.dtype.str}
    descriptor = bundle.compose_descriptor(name=stream_name, data_keys=data_keys)
    callback("descriptor", descriptor.descriptor_doc)
    for key, value in external.items():
        dataset = f"/{stream_name}/{key}"
        h5.create_dataset(dataset, data=value, chunks=(1, *value.shape[1:]))
        resource = bundle.compose_stream_resource(
            mimetype="application/x-hdf5", uri=f"file://localhost{path}", data_key=key,
            parameters={"dataset": dataset, "chunk_shape": [1, *value.shape[1:]], "swmr": False})
        callback("stream_resource", resource.stream_resource_doc)
        callback("stream_datum", resource.compose_stream_datum(
            indices={"start": 0, "stop": n_rows}, seq_nums={"start": 1, "stop": n_rows + 1},
            descriptor=descriptor.descriptor_doc))
    h5.flush()
    scalars = [key for key in arrays if key not in external]
    now = time.time()
    for row in range(n_rows):
        data = {key: arrays[key][row].item() for key in scalars}
        callback("event", descriptor.compose_event(data=data, timestamps=dict.fromkeys(data, now), seq_num=row + 1))


def find_derived_runs(client, original_run_uid: str, purpose: str | None = None) -> list[Any]:
    """Derived runs of ``original_run_uid`` in a Tiled catalog (newest last)."""
    from tiled.queries import Key

    from .storage import get_run

    results = client.search(Key("original_run_uid") == original_run_uid)
    if purpose is not None:
        results = results.search(Key("purpose") == purpose)
    runs = [get_run(client, uid) for uid in results]
    return sorted(runs, key=lambda run: run.metadata["start"]["time"])

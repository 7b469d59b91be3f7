"""The frame forwarder reads frames announced the ophyd v1 way (an areaDetector HDF5 plugin's
Resource ``AD_HDF5`` and one Datum per event), with the IOC's file path mapped to this machine's."""

from __future__ import annotations

import time
from pathlib import Path

import h5py
import numpy as np
from event_model import compose_run

from edge_ptycho_bluesky.callbacks import FrameForwarder


class Recorder:
    def __init__(self):
        self.published = []

    def publish(self, frame, unique_id, **kwargs):
        self.published.append((np.array(frame), unique_id, kwargs))


def _v1_documents(root_on_ioc: str, n: int, per_point: int = 1):
    """The documents of a v1 step scan: a stock AD detector ``det`` (data key ``det_image``) and
    motors ``mx``/``my``, with no edge_ptycho record (stock devices give none)."""
    bundle = compose_run(metadata={"motors": ["mx", "my"], "plan_name": "spiral_ptycho_scan"})
    docs = [("start", bundle.start_doc)]
    desc = bundle.compose_descriptor(name="primary", data_keys={
        "det_image": {"source": "PV:det:image", "dtype": "array", "shape": [8, 8], "external": "FILESTORE:"},
        "mx": {"source": "PV:mx", "dtype": "number", "shape": []},
        "my": {"source": "PV:my", "dtype": "number", "shape": []}})
    docs.append(("descriptor", desc.descriptor_doc))
    res = bundle.compose_resource(spec="AD_HDF5", root=root_on_ioc, resource_path="scan/det_000.h5",
                                  resource_kwargs={"frame_per_point": per_point})
    docs.append(("resource", res.resource_doc))
    for i in range(n):
        datum = res.compose_datum(datum_kwargs={"point_number": i})
        docs.append(("datum", datum))
        docs.append(("event", desc.compose_event(
            data={"det_image": datum["datum_id"], "mx": 0.1 * i, "my": -0.1 * i},
            timestamps={"det_image": 0.0, "mx": 0.0, "my": 0.0}, filled={"det_image": False}, seq_num=i + 1)))
    docs.append(("stop", bundle.compose_stop()))
    return bundle.start_doc["uid"], docs


def test_resource_and_datum_frames_are_forwarded_from_the_mapped_path(tmp_path):
    frames = np.arange(6 * 8 * 8, dtype=np.uint16).reshape(6, 8, 8)
    local_root = tmp_path / "mnt" / "beamline"
    (local_root / "scan").mkdir(parents=True)
    with h5py.File(local_root / "scan" / "det_000.h5", "w", libver="latest") as f:
        f.create_dataset("/entry/data/data", data=frames)
    recorder = Recorder()
    forwarder = FrameForwarder(recorder, path_map={"/data/ioc": str(local_root)})
    uid, docs = _v1_documents("/data/ioc", 3, per_point=2)
    try:
        for name, doc in docs:
            forwarder(name, doc)
        assert forwarder.flush(10)
    finally:
        forwarder.close()
    assert forwarder.sent == 6 and forwarder.failed == 0 and forwarder.errors == 0
    np.testing.assert_array_equal(np.stack([p[0] for p in recorder.published]), frames)
    # two frames per point, both at that point's position; indices are the file's
    assert [p[2]["pos"] for p in recorder.published] == [(0.1 * i, -0.1 * i) for i in range(3) for _ in range(2)]
    assert [p[2]["attributes"]["frame_index"] for p in recorder.published] == list(range(6))
    assert {p[2]["scan_uid"] for p in recorder.published} == {uid}


def test_an_unmapped_path_is_read_as_written_and_a_missing_file_is_counted(tmp_path):
    root = tmp_path / "as_written"
    (root / "scan").mkdir(parents=True)
    with h5py.File(root / "scan" / "det_000.h5", "w", libver="latest") as f:
        f.create_dataset("/entry/data/data", data=np.ones((2, 8, 8), np.uint16))
    recorder = Recorder()
    forwarder = FrameForwarder(recorder, path_map={"/elsewhere": "/not/used"}, read_timeout=0.2)
    _, docs = _v1_documents(str(root), 2)
    _, missing = _v1_documents(str(tmp_path / "nowhere"), 1)
    try:
        for name, doc in docs + missing:
            forwarder(name, doc)
        deadline = time.monotonic() + 10
        while forwarder.sent + forwarder.failed < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        forwarder.close()
    assert forwarder.sent == 2 and forwarder.failed == 1
    assert forwarder.local_path("/elsewhere/a/b.h5") == Path("/not/used/a/b.h5")
    assert forwarder.local_path("/elsewhereX/b.h5") == Path("/elsewhereX/b.h5")

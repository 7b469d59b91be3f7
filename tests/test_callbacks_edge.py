"""Scan -> forwarding callback -> edge worker over pvAccess -> live stitch -> Tiled, and replay."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

pytest.importorskip("pvaccess")

from edge_ptycho_bluesky.callbacks import FrameForwarder, LivePhasePlot, LiveStitchCallback  # noqa: E402
from edge_ptycho_bluesky.derived import find_derived_runs  # noqa: E402
from edge_ptycho_bluesky.edge.pva_clients import PatchSubscriber, PvaFrameSource  # noqa: E402
from edge_ptycho_bluesky.edge.pva_servers import FramePublisher, PvaPatchSink  # noqa: E402
from edge_ptycho_bluesky.edge.model_source import FileModelSource, engine_factory  # noqa: E402
from edge_ptycho_bluesky.edge.worker import EdgeWorker  # noqa: E402
from edge_ptycho_bluesky.edge.worker_config import WorkerConfig  # noqa: E402
from edge_ptycho_bluesky.metrics import ssim  # noqa: E402
from edge_ptycho_bluesky.plans import spiral_ptycho_scan  # noqa: E402
from edge_ptycho_bluesky.stitching import stitch  # noqa: E402
from edge_ptycho_bluesky.storage import get_run, make_tiled_writer, replay  # noqa: E402

from .conftest import tiny_onnx  # noqa: E402


class EdgeChain:
    """A worker thread over real pvAccess on loopback, a publisher and a subscriber."""

    def __init__(self, model_path, stitch_cb):
        tag = uuid.uuid4().hex[:8]
        names = [f"test:{tag}:{k}" for k in ("frames", "phase", "status")]
        self.publisher = FramePublisher(names[0])
        self.worker = EdgeWorker(FileModelSource(model_path, engine_factory("onnxruntime", threads=1)),
                                 PvaFrameSource(names[0]), PvaPatchSink(names[1], names[2]),
                                 WorkerConfig(max_wait_ms=2.0))
        self.subscriber = PatchSubscriber(names[1], stitch_cb.on_patch)
        self.worker.start()
        self.subscriber.start()
        assert self.subscriber.wait_ready(10.0)
        deadline = time.monotonic() + 10
        while self.worker.stats().received < 1 and time.monotonic() < deadline:  # the empty initial update
            time.sleep(0.01)

    def close(self):
        stats = self.worker.stop()
        self.subscriber.stop()
        self.publisher.close()
        return stats


@pytest.mark.slow
def test_scan_is_inferred_stitched_stored_and_replayed(RE, beamline, tiled_client, storage_config, tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    writer = make_tiled_writer(tiled_client, storage_config)
    stitch_cb = LiveStitchCallback(store=writer, write_dir=storage_config.frames_dir, wait_timeout=20)
    plot = LivePhasePlot(stitch_cb, interval=0.0)
    chain = EdgeChain(tiny_onnx(tmp_path / "x2.onnx", 2.0), stitch_cb)
    forwarder = FrameForwarder(chain.publisher)
    try:
        RE.subscribe(writer)
        RE.subscribe(forwarder)
        RE.subscribe(stitch_cb)
        RE.subscribe(plot)
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=30))
        stats = chain.close()
    finally:
        forwarder.close()
    assert forwarder.sent == 30 and forwarder.failed == forwarder.dropped == forwarder.errors == 0
    assert stats.inferred == 30
    result = stitch_cb.results[uid]
    assert result.missing == [] and len(result.frame_indices) == 30 and stitch_cb.errors == 0
    frames = get_run(tiled_client, uid)["primary"]["ptycho_det_image"].read().astype(np.float32)
    np.testing.assert_allclose(result.patches, 2.0 * frames, rtol=1e-6)  # each patch is its own frame's
    # The live (incremental) stitch equals an offline stitch of the same patches: SSIM 1.
    pixels = stitch_cb_grid_pixels(result, get_run(tiled_client, uid).metadata["start"])
    offline, _ = stitch(result.patches, pixels[0], shape=result.image.shape, origin=pixels[1])
    assert ssim(offline, result.image) == pytest.approx(1.0, abs=1e-6)
    assert plot.redraws > 0 and np.array_equal(plot._image.get_array(), result.image, equal_nan=True)

    derived = find_derived_runs(tiled_client, uid, "edge_inference")
    assert [run.metadata["start"]["uid"] for run in derived] == [result.derived_run_uid]
    stored = derived[0]
    np.testing.assert_array_equal(stored["primary"]["phase_patch"].read(), result.patches)
    np.testing.assert_array_equal(stored["stitched"]["stitched_phase"].read()[0], result.image)

    # Replay the stored scan through the same callbacks with a newer model (x3): a second derived run.
    stitch_cb2 = LiveStitchCallback(store=writer, write_dir=storage_config.frames_dir, wait_timeout=20)
    chain2 = EdgeChain(tiny_onnx(tmp_path / "x3.onnx", 3.0), stitch_cb2)
    forwarder2 = FrameForwarder(chain2.publisher)
    try:
        replay(get_run(tiled_client, uid), forwarder2, stitch_cb2)
        chain2.close()
    finally:
        forwarder2.close()
    again = stitch_cb2.results[uid]
    assert again.missing == [] and len(again.frame_indices) == 30
    np.testing.assert_allclose(again.patches, 3.0 * frames, rtol=1e-6)
    # the new stitched image is stored next to the old one, each tagged with its model version
    old_run, new_run = find_derived_runs(tiled_client, uid, "edge_inference")
    assert old_run.metadata["start"]["uid"] == result.derived_run_uid
    assert new_run.metadata["start"]["uid"] == again.derived_run_uid
    assert old_run.metadata["start"]["model_versions"] == result.model_versions
    assert new_run.metadata["start"]["model_versions"] == again.model_versions
    assert result.model_versions[0].startswith("x2@") and again.model_versions[0].startswith("x3@")
    new_image = new_run["stitched"]["stitched_phase"].read()[0]
    np.testing.assert_array_equal(new_image, again.image)
    np.testing.assert_array_equal(old_run["stitched"]["stitched_phase"].read()[0], result.image)
    np.testing.assert_allclose(new_image, 1.5 * result.image, rtol=1e-5, equal_nan=True)


def stitch_cb_grid_pixels(result, start):
    """Pixel positions and grid origin the live stitcher used, recomputed independently."""
    from edge_ptycho_bluesky.stitching_grid import PhysicalGrid, grid_from_positions
    pixel_um = start["edge_ptycho"]["geometry"]["pixel_size_nm"] * 1e-3
    (x0, x1), (y0, y1) = start["extents"]
    corners = np.array([[x0, y0], [x1, y1]])
    grid = PhysicalGrid.from_positions(corners, pixel_um, order="xy", margin=8)
    _, origin = grid_from_positions(grid.to_pixels(corners, order="xy"), (128, 128), 8)
    return grid.to_pixels(result.positions_um, order="xy"), origin


def test_forwarding_failures_never_stop_the_scan(RE, beamline):
    class BrokenPublisher:
        def publish(self, *args, **kwargs):
            raise ConnectionError("worker input channel gone")

    forwarder = FrameForwarder(BrokenPublisher())
    stitch_cb = LiveStitchCallback(wait_timeout=0.1)
    try:
        RE.subscribe(forwarder)
        RE.subscribe(stitch_cb)
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=5))
        assert forwarder.flush(10)
    finally:
        forwarder.close()
    assert forwarder.failed == 5 and forwarder.sent == 0
    assert stitch_cb.results[uid].missing == [0, 1, 2, 3, 4]



def test_forwarded_frames_carry_the_exposure_of_their_scan(RE, beamline):
    """Each frame goes out with its run's exposure (``exposure_s``), by which the worker brings it to
    the count level its model was trained on."""
    sent: list[dict] = []

    class Recorder:
        def publish(self, frame, unique_id, **kwargs):
            sent.append(kwargs["attributes"])

    forwarder = FrameForwarder(Recorder())
    try:
        RE.subscribe(forwarder)
        RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=4,
                              exposure=0.003))
        assert forwarder.flush(10)
    finally:
        forwarder.close()
    assert [a["frame_index"] for a in sent] == [0, 1, 2, 3]
    assert all(a["exposure_s"] == pytest.approx(0.003) for a in sent)

def test_callback_errors_are_counted_not_raised(RE, beamline):
    stitch_cb = LiveStitchCallback(wait_timeout=0.1)
    stitch_cb("start", {"uid": "x", "time": 0})  # no geometry: cannot place patches
    assert stitch_cb.errors == 1


def test_event_pages_reach_the_forwarder_event_by_event(tmp_path):
    """The forwarder implements only ``event``: the document router unpacks event pages for it."""
    import h5py
    from event_model import pack_event_page

    path = tmp_path / "frames.h5"
    with h5py.File(path, "w", libver="latest") as f:
        f["data"] = np.arange(3 * 128 * 128, dtype=np.uint16).reshape(3, 128, 128)
    sent: list[tuple[int, dict]] = []

    class Recorder:
        def publish(self, frame, unique_id, **kwargs):
            sent.append((int(frame[0, 0]), kwargs))

    forwarder = FrameForwarder(Recorder(), image_key="img")
    try:
        forwarder("start", {"uid": "run-1", "time": 0, "motors": ["x", "y"]})
        forwarder("descriptor", {"uid": "d-1", "run_start": "run-1", "time": 0, "name": "primary",
                                 "data_keys": {"img": {}, "x": {}, "y": {}}})
        forwarder("stream_resource", {"uid": "r-1", "data_key": "img", "uri": f"file://localhost{path}",
                                      "parameters": {"dataset": "data"}})
        forwarder("stream_datum", {"uid": "r-1/0", "stream_resource": "r-1", "descriptor": "d-1",
                                   "indices": {"start": 0, "stop": 3}, "seq_nums": {"start": 1, "stop": 4}})
        forwarder("event_page", pack_event_page(*[
            {"uid": f"e-{i}", "time": 0, "seq_num": i, "descriptor": "d-1", "data": {"x": 0.1 * i, "y": -0.1 * i},
             "timestamps": {"x": 0, "y": 0}, "filled": {}} for i in (1, 2, 3)]))
        assert forwarder.flush(10)
    finally:
        forwarder.close()
    assert forwarder.errors == forwarder.failed == 0
    assert [first for first, _ in sent] == [0, 128 * 128, 2 * 128 * 128]
    assert [kw["attributes"]["seq_num"] for _, kw in sent] == [1, 2, 3]
    assert [kw["pos"] for _, kw in sent] == [pytest.approx((0.1 * i, -0.1 * i)) for i in (1, 2, 3)]
    assert {kw["scan_uid"] for _, kw in sent} == {"run-1"}

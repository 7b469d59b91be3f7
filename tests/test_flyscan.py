"""Fly scans: the simulated detector free-runs at a set rate, streams NTNDArrays over pvAccess, writes
HDF5 with the stage position of each frame, and the fly plan collects StreamResource/StreamDatum
documents into Tiled while it flies.  The edge worker gets the frames straight from the detector.

Real parts: RunEngine, embedded Tiled, pvAccess on loopback, the ``edge-ptycho worker`` process,
ONNX Runtime.  Rates here are modest; the 963-frame 2 kHz figures are a benchmark
(``benchmarks/bench_flyscan.py``, ``docs/benchmarks.md``).
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest

pytest.importorskip("pvaccess")
pytest.importorskip("onnxruntime")

from edge_ptycho_bluesky.callbacks.session import EdgeSession  # noqa: E402
from edge_ptycho_bluesky.devices import FlyingPtychoDetector, make_simulated_beamline  # noqa: E402
from edge_ptycho_bluesky.edge.session import EdgeSessionConfig  # noqa: E402
from edge_ptycho_bluesky.edge.inprocess import InProcessFrameSource  # noqa: E402
from edge_ptycho_bluesky.plans import spiral_ptycho_flyscan, spiral_ptycho_pattern  # noqa: E402
from edge_ptycho_bluesky.storage import get_run, make_tiled_writer, replay  # noqa: E402
from edge_ptycho_bluesky.training.registry import ModelRegistry  # noqa: E402

from .conftest import tiny_onnx  # noqa: E402


def _channel(tag: str) -> str:
    return f"test:{tag}:{uuid.uuid4().hex[:8]}:Pva1:Image"


@pytest.fixture
def fly_line(storage_config):
    return make_simulated_beamline(storage_config.frames_dir, sample="train", extent_um=1.0, seed=3,
                                   fly_channel=_channel("fly"))


@pytest.mark.slow
def test_a_fly_scan_stores_every_frame_and_position_in_tiled(RE, fly_line, tiled_client, storage_config, docs):
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    names: list[str] = []
    RE.subscribe(lambda name, doc: names.append(name))
    RE.subscribe(docs.cb)
    (uid,) = RE(spiral_ptycho_flyscan(fly_line.fly_det, fly_line.stage.x, fly_line.stage.y, step=0.05,
                                      num_points=250, rate=1000, flush_period=0.05))
    assert names.count("stream_resource") == 3 and "event" not in names
    assert names.count("stream_datum") >= 3  # collected while flying and at the end
    (start,) = docs["start"]
    assert start["edge_ptycho"]["mode"] == "fly" and start["edge_ptycho"]["frame_rate_hz"] == 1000
    assert start["edge_ptycho"]["streamed_to"] == fly_line.fly_det.channel
    assert docs["stop"][0]["num_events"] == {"primary": 250}

    run = get_run(tiled_client, uid)
    primary = run["primary"]
    frames = np.asarray(primary["ptycho_fly_image"].read())
    x, y = np.asarray(primary["stage_x"].read()), np.asarray(primary["stage_y"].read())
    assert frames.shape == (250, 128, 128) and frames.sum(axis=(1, 2)).min() > 0
    np.testing.assert_allclose(np.column_stack([x, y]), spiral_ptycho_pattern(0, 0, 0.05, 250))
    # the stage followed the trajectory to its last point
    assert fly_line.stage.x.position == pytest.approx(x[-1]) and fly_line.stage.y.position == pytest.approx(y[-1])
    stats = fly_line.fly_det.stats
    assert stats["frames"] == 250 and stats["rate_hz"] > 500  # asked 1000/s; a loaded CI core is slower

    # the frames match the forward model at the recorded positions (same photon statistics)
    expected = fly_line.sample.expected_intensity(np.column_stack([x, y])[:5], 1e-3)
    assert abs(frames[:5].sum() / expected.sum() - 1) < 0.02

    # replayed from Tiled, the frame forwarder pairs each frame with its recorded position
    sink = InProcessFrameSource()
    received = []
    sink.start(type("H", (), {"on_frame": lambda self, f: received.append(f),
                              "on_reject": lambda self, *a: None})())
    from edge_ptycho_bluesky.callbacks.edge import FrameForwarder

    skipping, forwarding = FrameForwarder(sink), FrameForwarder(sink, forward_streamed=True)
    try:
        replay(run, skipping, forwarding)
        assert forwarding.flush(20) and skipping.sent == 0 and skipping.skipped_runs == 1
        assert sink.wait_delivered(20)
    finally:
        skipping.close()
        forwarding.close()
    assert forwarding.sent == 250 and len(received) == 250
    by_index = {int(f.attributes["frame_index"]): f for f in received}
    np.testing.assert_array_equal(by_index[17].data, frames[17])
    assert by_index[17].pos == pytest.approx((x[17], y[17]))


@pytest.mark.slow
def test_a_fly_scan_streams_straight_to_the_edge_worker_and_replays(RE, fly_line, tiled_client, storage_config,
                                                                    tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    registry.publish({"model.onnx": tiny_onnx(tmp_path / "x2.onnx", 2.0)}, model="tiny")
    tag = uuid.uuid4().hex[:8]
    session = EdgeSession(RE, tiled_client, storage_config, EdgeSessionConfig(
        registry=registry.root, input_pv=f"fly:{tag}:frames", output_pv=f"fly:{tag}:phase",
        status_pv=f"fly:{tag}:status", engine="onnxruntime", refine=False), plot=False)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    try:
        session.attach_fly_detector(fly_line.fly_det)
        (uid,) = RE(spiral_ptycho_flyscan(fly_line.fly_det, fly_line.stage.x, fly_line.stage.y, step=0.05,
                                          num_points=300, rate=2000))
        assert session.forwarder.skipped_runs == 1 and session.forwarder.sent == 0  # the detector sent them
        live = session.stitch.results[uid]
        assert live.expected == 300
        assert len(live.frame_indices) + len(live.missing) == 300 and len(live.frame_indices) > 0
        frames = np.asarray(get_run(tiled_client, uid)["primary"]["ptycho_fly_image"].read(), np.float32)
        np.testing.assert_allclose(live.patches, 2.0 * frames[live.frame_indices], rtol=1e-5)
        # replay sends the stored frames through the same worker: a complete image
        replayed = session.replay(uid)
        assert replayed.missing == [] and replayed.frame_indices.tolist() == list(range(300))
        np.testing.assert_allclose(replayed.patches, 2.0 * frames, rtol=1e-5)
    finally:
        session.close()


def test_the_fly_plan_refuses_a_step_detector_and_a_too_long_exposure(fly_line, beamline):
    with pytest.raises(TypeError, match="not a fly-scan detector"):
        list(spiral_ptycho_flyscan(beamline.det, beamline.stage.x, beamline.stage.y, step=0.05, num_points=10))
    with pytest.raises(ValueError, match="frame period"):
        list(spiral_ptycho_flyscan(fly_line.fly_det, fly_line.stage.x, fly_line.stage.y, step=0.05, num_points=10,
                                   rate=2000, exposure=0.01))
    with pytest.raises(ValueError, match="rate must be a positive"):
        list(spiral_ptycho_flyscan(fly_line.fly_det, fly_line.stage.x, fly_line.stage.y, step=0.05, num_points=10,
                                   rate=0))
    assert isinstance(fly_line.fly_det, FlyingPtychoDetector)


class RecordingPublisher:
    """Stands in for the detector's pvAccess publisher: records what it is given."""

    channel = "recorder"

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.attributes: list[dict] = []

    def publish(self, frame, unique_id, **kwargs):
        self.ids.append(unique_id)
        self.attributes.append(kwargs.get("attributes") or {})


def _once_published(recorder: RecordingPublisher, n: int, action) -> threading.Thread:
    """A started thread that calls ``action()`` once ``n`` frames are published (or after 30 s)."""

    def wait_then_act():
        deadline = time.monotonic() + 30
        while len(recorder.ids) < n and time.monotonic() < deadline:
            time.sleep(0.001)
        action()

    thread = threading.Thread(target=wait_then_act, daemon=True)
    thread.start()
    return thread


def _assert_tiled_has_every_taken_frame(tiled_client, docs, taken: int, num_points: int) -> None:
    primary = get_run(tiled_client, docs["start"][0]["uid"])["primary"]
    frames = np.asarray(primary["ptycho_fly_image"].read())
    x, y = np.asarray(primary["stage_x"].read()), np.asarray(primary["stage_y"].read())
    assert frames.shape == (taken, 128, 128) and frames.sum(axis=(1, 2)).min() > 0
    np.testing.assert_allclose(np.column_stack([x, y]), spiral_ptycho_pattern(0, 0, 0.05, num_points)[:taken])


def test_a_fly_scan_stopped_midway_keeps_every_published_frame_in_the_file(fly_line):
    import h5py

    from edge_ptycho_bluesky.devices import FRAME_DATASET

    det = fly_line.fly_det
    recorder = det.publisher = RecordingPublisher()
    det.frame_rate.put(200.0)
    det.exposure_time.put(0.001)
    det.prepare({"positions": spiral_ptycho_pattern(0, 0, 0.05, 300)}).wait(30)
    det.stage()
    try:
        det.kickoff().wait(5)
        _once_published(recorder, 30, det.stop).join(35)  # 0.15 s at 200 Hz: not one full block
        with pytest.raises(Exception, match="stopped at frame"):
            det.complete().wait(10)
    finally:
        det.unstage()
    with h5py.File(det.file_path, "r") as f:
        stored = f[FRAME_DATASET].shape[0]
    assert 30 <= len(recorder.ids) < 300 and stored == len(recorder.ids)


@pytest.mark.slow
def test_an_aborted_fly_scan_announces_every_written_frame_to_tiled(RE, fly_line, tiled_client, storage_config, docs):
    """Paused mid-flight (Ctrl-C) and aborted: the detector stops, the run ends as aborted, and Tiled
    has every frame taken, with its position, though the last collect was long before."""
    from bluesky.utils import RunEngineInterrupted

    det = fly_line.fly_det
    recorder = det.publisher = RecordingPublisher()
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    RE.subscribe(docs.cb)
    pauser = _once_published(recorder, 40, lambda: RE.request_pause(defer=False))
    with pytest.raises(RunEngineInterrupted):
        RE(spiral_ptycho_flyscan(det, fly_line.stage.x, fly_line.stage.y, step=0.05, num_points=400, rate=100,
                                 flush_period=60.0))  # no collect before the abort
    pauser.join(5)
    RE.abort("test: aborted mid-flight")
    assert docs["stop"][0]["exit_status"] == "abort"
    taken = len(recorder.ids)
    assert 40 <= taken < 400
    _assert_tiled_has_every_taken_frame(tiled_client, docs, taken, 400)


@pytest.mark.slow
def test_a_failed_fly_scan_announces_every_written_frame_to_tiled(RE, fly_line, tiled_client, storage_config, docs):
    """The detector fails midway (here: stopped from outside): the run ends as failed, and Tiled has
    every frame taken before, with its position (the StreamDatums after the last collect too)."""
    from bluesky.utils import FailedStatus

    det = fly_line.fly_det
    recorder = det.publisher = RecordingPublisher()
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    RE.subscribe(docs.cb)
    stopper = _once_published(recorder, 40, det.stop)
    with pytest.raises(FailedStatus):
        RE(spiral_ptycho_flyscan(det, fly_line.stage.x, fly_line.stage.y, step=0.05, num_points=400, rate=200,
                                 flush_period=10.0))  # no collect before the failure: all announced after it
    stopper.join(5)
    assert docs["stop"][0]["exit_status"] == "fail"
    exposures = {a["exposure_s"] for a in recorder.attributes}  # the worker scales counts by it
    assert len(exposures) == 1 and exposures.pop() == pytest.approx(1 / 200)
    taken = len(recorder.ids)
    assert 40 <= taken < 400
    _assert_tiled_has_every_taken_frame(tiled_client, docs, taken, 400)


def test_a_fly_scan_too_large_to_simulate_in_memory_is_refused_before_it_starts(fly_line):
    det = fly_line.fly_det
    det.max_prepare_bytes = 2**20  # 1 MiB: 16 frames of 64 KiB
    with pytest.raises(ValueError, match=r"100 frames needs 0\.01 GiB .* split the scan or lower num_points"):
        det.prepare({"positions": spiral_ptycho_pattern(0, 0, 0.05, 100)})
    assert det.prepare({"positions": spiral_ptycho_pattern(0, 0, 0.05, 16)}).done
    det.max_prepare_bytes = None  # half the available memory: the paper's 963 frames are 63 MiB
    assert det.prepare({"positions": spiral_ptycho_pattern(0, 0, 0.05, 20)}).done

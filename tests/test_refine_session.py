"""The live refiner in a session: RunEngine scan -> worker (shipped model) and refiner processes over
loopback pvAccess -> the derived run holds the AI mosaic and the refined image, and the refined
image is closer to the truth."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

pytest.importorskip("pvaccess")
pytest.importorskip("onnxruntime")

from edge_ptycho_bluesky.callbacks.session import EdgeSession  # noqa: E402
from edge_ptycho_bluesky.derived import find_derived_runs  # noqa: E402
from edge_ptycho_bluesky.edge.pva_clients import PvaFrameSource  # noqa: E402
from edge_ptycho_bluesky.edge.session import EdgeSessionConfig  # noqa: E402
from edge_ptycho_bluesky.metrics import compare  # noqa: E402
from edge_ptycho_bluesky.plans import spiral_ptycho_scan  # noqa: E402
from edge_ptycho_bluesky.storage import make_tiled_writer  # noqa: E402
from edge_ptycho_bluesky.training.shipped import init_registry  # noqa: E402


def _truth_on_live_grid(result, sample, shape):
    """The sample's phase on the live stitch's canvas (the two grids differ by whole pixels)."""
    canvas = result.corners
    on_sample = sample.window_positions(result.positions_um)
    shift = np.rint(on_sample - canvas).astype(int)
    assert (shift == shift[0]).all()
    pad = 300
    r, c = shift[0] + pad
    truth = np.pad(sample.phase, pad)[r:r + shape[0], c:c + shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for rr, cc in np.floor(canvas).astype(int):
        mask[rr + 40:rr + 88, cc + 40:cc + 88] = True
    return truth, mask


@pytest.mark.slow
def test_a_scan_is_refined_live_and_both_images_are_stored(RE, beamline, tiled_client, storage_config, tmp_path):
    init_registry(tmp_path / "registry")
    tag = uuid.uuid4().hex[:8]
    session = EdgeSession(RE, tiled_client, storage_config, EdgeSessionConfig(
        registry=tmp_path / "registry", input_pv=f"ref:{tag}:frames", output_pv=f"ref:{tag}:phase",
        status_pv=f"ref:{tag}:status", image_pv=f"ref:{tag}:image", engine="onnxruntime",
        refine_seconds=5.0), plot=False)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    images = []
    watcher = _ImageWatcher(images)
    source = PvaFrameSource(f"ref:{tag}:image")
    source.start(watcher)
    try:
        assert session.refiner is not None and session.refiner.alive
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                       num_points=60))
        result = session.wait_stored(uid, timeout=90)
        assert result.derived_run_uid is not None, result.refine_reason
        assert result.refined is not None, result.refine_reason
        stats = result.refine_stats
        assert stats["frames_used"] == 60 and stats["sweeps"] > 5 and stats["refine_seconds_after_scan"] == 5.0
        assert session.refiner.latest is not None and session.refiner.latest[0] == uid
        derived = find_derived_runs(tiled_client, uid, "edge_inference")[-1]
        assert derived.metadata["start"]["uid"] == result.derived_run_uid
        assert derived.metadata["start"]["refined"]["sweeps"] == stats["sweeps"]
        stored = derived["refined"]["refined_phase"].read()[0]
        np.testing.assert_array_equal(stored, result.refined)
        np.testing.assert_array_equal(derived["stitched"]["stitched_phase"].read()[0], result.image)
        # ptycho:edge:image served the refined canvas, the last one final and equal to the stored image
        ours = [f for f in images if f.attributes.get("run_uid") == uid]
        assert ours and ours[-1].attributes["final"] == 1 and ours[-1].attributes["frames_used"] == 60
        assert ours[-1].data.dtype == np.float32
        np.testing.assert_array_equal(ours[-1].data, result.refined)
        truth, mask = _truth_on_live_grid(result, beamline.det.sample, result.image.shape)
        ai = compare(truth, np.nan_to_num(result.image), mask)["ssim"]
        refined = compare(truth, result.refined, mask)["ssim"]
        assert refined > 0.8 and refined > ai + 0.1, (refined, ai)

        # The refiner dies: the next scan's AI image is stored as before, and the derived run says why.
        session.refiner._proc.kill()  # noqa: SLF001  (a crash, as a segfault would be)
        session.refiner._proc.wait(10)  # noqa: SLF001
        (uid2,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                        num_points=20))
        second = session.wait_stored(uid2, timeout=60)
        assert second.refined is None and "died" in second.refine_reason
        assert len(second.frame_indices) == 20 and second.derived_run_uid is not None
        stored2 = find_derived_runs(tiled_client, uid2, "edge_inference")[-1]
        assert "died" in stored2.metadata["start"]["refined_missing"]
        np.testing.assert_array_equal(stored2["stitched"]["stitched_phase"].read()[0], second.image)
    finally:
        source.stop()
        session.close()
    assert not session.refiner.alive


class _ImageWatcher:
    """Collects the NTNDArrays of the refined-image channel."""

    def __init__(self, images):
        self.images = images

    def on_frame(self, frame):
        self.images.append(frame)

    def on_reject(self, reason, detail, unique_id):
        pass


@pytest.mark.slow
def test_an_external_worker_on_the_detectors_channel_is_stitched_and_refined(RE, beamline, tiled_client,
                                                                          storage_config, tmp_path):
    """The facility layout: the detector serves its frames (here a forwarder plays its PVA plugin),
    a worker started elsewhere reads them; the session serves no input channel, and still stitches,
    refines and stores."""
    from edge_ptycho_bluesky.callbacks.edge import FrameForwarder
    from edge_ptycho_bluesky.edge.process import WorkerChannels, WorkerProcess
    from edge_ptycho_bluesky.edge.pva_servers import FramePublisher

    init_registry(tmp_path / "registry")
    channels = WorkerChannels.unique("ext")
    detector_plugin = FramePublisher(channels.input)          # the detector IOC's PVA plugin
    plugin_feed = FrameForwarder(detector_plugin)
    worker = WorkerProcess(registry=tmp_path / "registry", channels=channels).start(60)
    session = EdgeSession(RE, tiled_client, storage_config, EdgeSessionConfig(
        worker="external", registry=tmp_path / "registry", input_pv=channels.input, output_pv=channels.output,
        status_pv=channels.status,
        image_pv=channels.input + ":image", refine_seconds=3.0), plot=False)
    RE.subscribe(plugin_feed)
    try:
        assert session.publisher is None and session.forwarder is None and session.worker is None
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                       num_points=30))
        result = session.wait_stored(uid, timeout=90)
        assert len(result.frame_indices) == 30 and result.missing == []
        assert result.refined is not None and result.refine_stats["frames_used"] == 30, result.refine_reason
        assert result.derived_run_uid is not None
        with pytest.raises(RuntimeError, match="edge-ptycho infer"):
            session.replay(uid)
    finally:
        session.close()
        plugin_feed.close()
        worker.stop()
        detector_plugin.close()


def test_the_refiner_switch_budget_and_path_map_come_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_REFINE", "0")
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_REFINE_SECONDS", "7.5")
    config = EdgeSessionConfig.from_env(tmp_path)
    assert config.refine is False and config.refine_seconds == 7.5 and config.image_pv == "ptycho:edge:image"
    monkeypatch.delenv("EDGE_PTYCHO_EDGE_REFINE")
    assert EdgeSessionConfig.from_env(tmp_path).refine is True
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_REFINE_PROBE_AFTER", "250")
    assert EdgeSessionConfig.from_env(tmp_path).refine_probe_after == 250
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_PATH_MAP", "/data/ioc=/mnt/beamline; /b=/c")
    assert EdgeSessionConfig.from_env(tmp_path).path_map == (("/data/ioc", "/mnt/beamline"), ("/b", "/c"))
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_PATH_MAP", "/data/ioc")
    with pytest.raises(ValueError, match="IOC_PREFIX=LOCAL_PREFIX"):
        EdgeSessionConfig.from_env(tmp_path)
    monkeypatch.delenv("EDGE_PTYCHO_EDGE_PATH_MAP")
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_REFINE_SECONDS", "soon")
    with pytest.raises(ValueError, match="EDGE_PTYCHO_EDGE_REFINE_SECONDS"):
        EdgeSessionConfig.from_env(tmp_path)

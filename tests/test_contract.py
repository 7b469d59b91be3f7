"""A model's input contract: the one place that turns counts into network input."""

from __future__ import annotations

from types import SimpleNamespace

import h5py
import numpy as np
import pytest

from edge_ptycho_bluesky.model.contract import InputContract
from edge_ptycho_bluesky.options import UnknownOptionError


def test_scale_and_exposure_ratio_are_applied_once() -> None:
    frames = np.full((3, 128, 128), 10, np.uint32)
    version = SimpleNamespace(input_scale=0.5, input_exposure_s=0.1)
    contract = InputContract.from_version(version)
    x = contract.prepare(frames, 0.05)  # half the training exposure: counts doubled, then scaled
    assert x.shape == (3, 1, 128, 128) and x.dtype == np.float32
    np.testing.assert_allclose(x, 10 * 2 * 0.5)
    np.testing.assert_allclose(contract.prepare(frames, [0.1, 0.05, None]).reshape(3, -1)[:, 0], [5, 10, 5])
    np.testing.assert_allclose(contract.prepare(frames), 5)  # exposure unknown: not scaled for it


def test_overrides_and_reference_exposure() -> None:
    version = SimpleNamespace(input_scale=0.5, input_exposure_s=None)
    contract = InputContract.from_version(version, scale=2.0, reference_exposure_s=0.2)
    assert contract.scale == 2.0 and contract.exposure_s == 0.2
    assert InputContract.from_version(SimpleNamespace(input_scale=None, input_exposure_s=0.3),
                                      reference_exposure_s=0.2).exposure_s == 0.3  # the recorded one wins


def test_bad_exposures_are_reported_and_left_unscaled() -> None:
    bad: list[tuple[int, object]] = []
    contract = InputContract(exposure_s=0.1)
    x = contract.prepare(np.ones((2, 128, 128), np.float32), [-1.0, 0.1], on_bad_exposure=lambda k, v: bad.append((k, v)))
    assert bad == [(0, -1.0)]
    np.testing.assert_allclose(x, 1.0)


def test_the_callers_frames_are_never_scaled_in_place() -> None:
    frames = np.ones((2, 128, 128), np.float32)
    InputContract(scale=3.0, exposure_s=1.0).prepare(frames, 0.5)
    assert float(frames.max()) == 1.0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        InputContract(scale=0.0)
    with pytest.raises(UnknownOptionError, match="unknown preprocess option keys \\['binning'\\]"):
        InputContract(options={"binning": 4})
    with pytest.raises(ValueError, match="3 exposure times for 2 frames"):
        InputContract(exposure_s=1.0).prepare(np.ones((2, 128, 128)), [1.0, 1.0, 1.0])


def test_a_scan_at_another_exposure_gets_the_same_network_input_on_every_path(tmp_path) -> None:
    """Validation of the deployed model, the live edge worker and ``edge-ptycho infer`` feed the
    network the same input for a scan taken at twice the training exposure. The model multiplies
    its input by 1, so its output *is* the network input."""
    from edge_ptycho_bluesky.edge.inprocess import InProcessFrameSource, InProcessPatchSink
    from edge_ptycho_bluesky.edge.model_source import RegistryModelSource, engine_factory
    from edge_ptycho_bluesky.edge.worker import EdgeWorker
    from edge_ptycho_bluesky.edge.worker_config import WorkerConfig
    from edge_ptycho_bluesky.io.cxi import PtychoScan
    from edge_ptycho_bluesky.cli import main
    from edge_ptycho_bluesky.recon.labels import LabelledScan
    from edge_ptycho_bluesky.sim import Geometry
    from edge_ptycho_bluesky.training.jobs import validate_deployed
    from edge_ptycho_bluesky.training.registry import ModelRegistry

    from .conftest import tiny_onnx

    registry = ModelRegistry(tmp_path / "models")
    version = registry.publish({"model.onnx": tiny_onnx(tmp_path / "identity.onnx", 1.0)},
                               extra={"preprocess": {"scale": 0.5, "exposure_s": 0.01}})
    rng = np.random.default_rng(3)
    frames = rng.poisson(20.0, (5, 128, 128)).astype(np.uint32)
    exposure = 0.02  # twice the training exposure: counts are halved, then scaled by 0.5
    expected = frames.astype(np.float32) * 0.5 * 0.5
    positions = np.array([[0, 0], [0, 40], [40, 0], [40, 40], [20, 20]], np.float64)

    # validation on labels that are exactly the expected network input
    labelled = LabelledScan(frames=frames.astype(np.float32), phases=expected, positions=positions,
                            scan_uid="scan", pixel_size_nm=10.0, metadata={"exposure_s": exposure})
    assert validate_deployed(version, labelled) == pytest.approx(1.0, abs=1e-6)
    wrong = LabelledScan(frames=frames.astype(np.float32), phases=expected, positions=positions,
                         scan_uid="scan", pixel_size_nm=10.0)  # exposure unknown: not scaled for it
    assert validate_deployed(version, wrong) < 0.99

    # live: frames carry their run's exposure as the frame forwarder sends them
    source, sink = InProcessFrameSource(), InProcessPatchSink()
    with EdgeWorker(RegistryModelSource(registry, engine_factory("onnxruntime", threads=1)), source, sink,
                    WorkerConfig(max_wait_ms=1.0)):
        for i, frame in enumerate(frames, start=1):
            source.publish(frame, i, pos=(0.0, 0.0), attributes={"exposure_s": exposure})
        assert sink.wait_for(len(frames), 10.0)
    live = np.stack([p.phase for p in sorted(sink.patches, key=lambda p: p.unique_id)])
    np.testing.assert_allclose(live, expected, rtol=1e-6)

    # offline: the edge-ptycho infer command on the scan's CXI file, which records its exposure
    scan = PtychoScan(frames=frames, positions_m=positions[:, ::-1] * 1e-8, geometry=Geometry(), exposure_s=exposure)
    path = scan.to_cxi(tmp_path / "scan.cxi")
    out = tmp_path / "inferred.cxi"
    assert main(["infer", str(path), "--registry", str(registry.root), "--out", str(out)]) == 0
    with h5py.File(out, "r") as f:
        np.testing.assert_allclose(f["/entry_1/image_1/patches"][()], expected, rtol=1e-6)

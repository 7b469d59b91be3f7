"""``edge-ptycho infer``: CXI in, registry model, stitched phase and patches out."""

from __future__ import annotations

import argparse
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from edge_ptycho_bluesky.io.cxi import PtychoScan, read_cxi, write_cxi
from edge_ptycho_bluesky.model import build_model
from edge_ptycho_bluesky.model.engines import OnnxRuntimeEngine
from edge_ptycho_bluesky.model.export import export_onnx
from edge_ptycho_bluesky.model.infer_cli import add_subcommand
from edge_ptycho_bluesky.model.scan_inference import infer_scan, load_scan
from edge_ptycho_bluesky.model.preprocess import preprocess
from edge_ptycho_bluesky.sim import fermat_spiral, make_sample, step_for_overlap
from edge_ptycho_bluesky.stitching import stitch
from edge_ptycho_bluesky.training.registry import ModelRegistry, import_onnx
from edge_ptycho_bluesky.training.registry_checks import RegistryError
from edge_ptycho_bluesky.training.registry_cli import add_subcommand as registry_cli

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPER_ONNX = SHARED_DATA / "ptychoNN_8.onnx"
N_FRAMES = 13  # not a multiple of the paper model's fixed batch of 8


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-ptycho")
    sub = parser.add_subparsers(dest="command", required=True)
    registry_cli(sub)  # import-onnx, registry ...
    add_subcommand(sub)
    args = parser.parse_args(argv)
    return int(args.func(args))


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory) -> Path:
    """A 13-point simulated Fermat-spiral scan of the test phantom, as a CXI file with its probe."""
    sample = make_sample("test", extent_um=0.3, seed=0)
    xy_um = fermat_spiral(N_FRAMES, step_for_overlap(0.9, 0.8))
    frames = sample.measure(xy_um, 0.01, rng=0)
    scan = PtychoScan(frames=frames, positions_m=xy_um * 1e-6, geometry=sample.geometry,
                      probe=sample.probe, uid="sim-test-13")
    return write_cxi(tmp_path_factory.mktemp("scan") / "scan.cxi", scan)


@pytest.fixture(scope="module")
def tiny_registry(tmp_path_factory) -> Path:
    """A registry with two small dynamic-batch models: v0001 (deployed) and v0002."""
    root = tmp_path_factory.mktemp("registry")
    reg = ModelRegistry(root)
    for seed, version, deploy in ((0, "v0001", True), (1, "v0002", False)):
        torch.manual_seed(seed)
        model = build_model("ptychonn2", nconv=4, n_levels=2)
        onnx = export_onnx(model, root.parent / f"tiny{seed}.onnx", exporter="legacy")
        import_onnx(reg, onnx, version=version, deploy=deploy, model="ptychonn2-tiny",
                    extra={"preprocess": {"scale": 0.005}})
    return root


@pytest.fixture(scope="module")
def paper_registry(tmp_path_factory) -> Path:
    if not PAPER_ONNX.is_file():
        pytest.skip(f"the paper's ONNX model is not at {PAPER_ONNX}")
    root = tmp_path_factory.mktemp("paper-registry")
    assert _run(["import-onnx", str(PAPER_ONNX), "--registry", str(root), "--version", "paper8"]) == 0
    return root


def test_infer_cxi_with_paper_fixed_batch_model(scan_file, paper_registry, tmp_path, capsys):
    out = tmp_path / "ai.cxi"
    assert _run(["infer", str(scan_file), "--registry", str(paper_registry), "--out", str(out),
                 "--engine", "onnxruntime", "--batch-size", "5"]) == 0
    assert "paper8" in capsys.readouterr().out
    scan = read_cxi(scan_file)
    with h5py.File(out, "r") as f:
        image = f["/entry_1/image_1"]
        patches = image["patches"][()]
        phase = image["data"][()]
        coverage = image["coverage"][()]
        assert image.attrs["model_version"] == "paper8"
        assert len(image.attrs["model_sha256"]) == 64
        assert image.attrs["n_frames"] == N_FRAMES
        assert image["data_type"][()].decode() == "phase"
    assert patches.shape == (N_FRAMES, 128, 128) and patches.dtype == np.float32
    assert np.isfinite(patches).all() and np.ptp(patches) > 0
    # Each patch is the paper model's output for that frame (batches of 5 padded to 8 by the engine).
    direct = OnnxRuntimeEngine(PAPER_ONNX).infer(preprocess(scan.frames))
    np.testing.assert_allclose(patches, direct, rtol=1e-4, atol=1e-4)
    # The stitched image is the probe-weighted stitch of the patches on the scan's object grid.
    positions, shape = scan.to_window_positions()
    amp = np.abs(scan.probe)
    expected, cov = stitch(direct, positions, shape=shape, weight=amp / amp.max(), fill=0.0)
    assert phase.shape == shape
    np.testing.assert_allclose(phase, expected, atol=1e-4)
    np.testing.assert_allclose(coverage, cov, rtol=1e-5, atol=1e-6)
    # The output is still a readable CXI scan with the input's frames.
    again = read_cxi(out)
    np.testing.assert_array_equal(again.frames, scan.frames)
    np.testing.assert_allclose(again.positions_m, scan.positions_m)


def test_version_scale_and_batch_size(scan_file, tiny_registry, tmp_path):
    loaded = load_scan(scan_file)
    deployed = infer_scan(loaded, tiny_registry, batch_size=4, weight="uniform")
    other = infer_scan(loaded, tiny_registry, version="v0002", batch_size=13, weight="uniform")
    assert deployed.version == "v0001" and other.version == "v0002"
    assert deployed.count_scale == 0.005  # read from the manifest's extra.preprocess.scale
    assert not np.allclose(deployed.patches, other.patches)
    # Batch size does not change the result; the manifest scale is applied to the input.
    one_batch = infer_scan(loaded, tiny_registry, batch_size=64, weight="uniform")
    np.testing.assert_allclose(deployed.patches, one_batch.patches, atol=1e-5)
    onnx = ModelRegistry(tiny_registry).get("v0001").onnx_path
    direct = OnnxRuntimeEngine(onnx).infer(preprocess(loaded.scan.frames, scale=0.005))
    np.testing.assert_allclose(deployed.patches, direct, atol=1e-5)
    # Uniform weights: the coverage counts the patches over each pixel.
    assert deployed.coverage.max() <= N_FRAMES and deployed.coverage.max() >= 2

    out = tmp_path / "v2.cxi"
    assert _run(["infer", str(scan_file), "--registry", str(tiny_registry), "--out", str(out),
                 "--version", "v0002", "--engine", "torch"]) == 0
    with h5py.File(out, "r") as f:
        assert f["/entry_1/image_1"].attrs["model_version"] == "v0002"
        assert f["/entry_1/image_1"].attrs["engine"].startswith("torch")
        np.testing.assert_allclose(f["/entry_1/image_1/patches"][()], other.patches, atol=1e-4)


def test_missing_input_file(tiny_registry, tmp_path, capsys):
    out = tmp_path / "x.cxi"
    rc = _run(["infer", str(tmp_path / "nope.cxi"), "--registry", str(tiny_registry), "--out", str(out)])
    assert rc != 0
    err = capsys.readouterr().err
    assert "nope.cxi" in err and "no scan file" in err
    assert not out.exists()


def test_unknown_version(scan_file, tiny_registry, tmp_path, capsys):
    out = tmp_path / "x.cxi"
    rc = _run(["infer", str(scan_file), "--registry", str(tiny_registry), "--out", str(out),
               "--version", "v0099"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "v0099" in err and "v0001" in err  # names the bad version and the published ones
    assert not out.exists()


def test_not_a_registry_and_not_cxi(scan_file, tmp_path, capsys):
    rc = _run(["infer", str(scan_file), "--registry", str(tmp_path / "empty"), "--out", str(tmp_path / "o.cxi")])
    assert rc != 0 and "not a model registry" in capsys.readouterr().err
    junk = tmp_path / "junk.cxi"
    junk.write_bytes(b"not hdf5")
    rc = _run(["infer", str(junk), "--registry", str(tmp_path), "--out", str(tmp_path / "o.cxi")])
    assert rc != 0 and "not an HDF5/CXI file" in capsys.readouterr().err


def test_damaged_model_is_refused(scan_file, tiny_registry, tmp_path, capsys):
    import shutil

    root = tmp_path / "reg"
    shutil.copytree(tiny_registry, root)
    onnx = ModelRegistry(root).get("v0001").onnx_path
    onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(RegistryError, match="sha256"):
        infer_scan(load_scan(scan_file), root)
    rc = _run(["infer", str(scan_file), "--registry", str(root), "--out", str(tmp_path / "o.cxi")])
    assert rc != 0 and "sha256" in capsys.readouterr().err


def test_nothing_deployed(scan_file, tmp_path, capsys):
    ModelRegistry(tmp_path / "reg")
    rc = _run(["infer", str(scan_file), "--registry", str(tmp_path / "reg"), "--out", str(tmp_path / "o.cxi")])
    assert rc != 0 and "no model is deployed" in capsys.readouterr().err


@pytest.mark.slow
def test_infer_a_run_stored_in_tiled(RE, beamline, tiled_client, storage_config, tiny_registry, tmp_path,
                                     monkeypatch, capsys):
    """INPUT as a run uid: frames, stage positions and geometry come from the configured Tiled."""
    from edge_ptycho_bluesky.plans import spiral_ptycho_scan
    from edge_ptycho_bluesky.recon.positions import window_positions_from_stage
    from edge_ptycho_bluesky.storage import ENV_DATA_DIR, ENV_TILED_URI, get_run, make_tiled_writer

    monkeypatch.setenv(ENV_DATA_DIR, str(storage_config.data_dir))
    monkeypatch.delenv(ENV_TILED_URI, raising=False)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                   num_points=9))
    out = tmp_path / "run.cxi"
    assert _run(["infer", uid, "--registry", str(tiny_registry), "--out", str(out)]) == 0
    run = get_run(tiled_client, uid)
    frames = run["primary"]["ptycho_det_image"].read()
    x, y = run["primary"]["stage_x"].read(), run["primary"]["stage_y"].read()
    positions, shape = window_positions_from_stage(x, y, run.metadata["start"]["edge_ptycho"]["geometry"])
    direct = OnnxRuntimeEngine(ModelRegistry(tiny_registry).get("v0001").onnx_path).infer(
        preprocess(frames, scale=0.005))
    expected, _ = stitch(direct, positions, shape=shape, fill=0.0)
    with h5py.File(out, "r") as f:
        assert f["/entry_1/image_1"].attrs["source"] == uid
        assert f["/entry_1/experiment_identifier"][()].decode() == uid
        np.testing.assert_allclose(f["/entry_1/image_1/patches"][()], direct, atol=1e-5)
        np.testing.assert_allclose(f["/entry_1/image_1/data"][()], expected, atol=1e-5)
    np.testing.assert_array_equal(read_cxi(out).frames, frames)

    rc = _run(["infer", "0123456789abcdef-no-such-run", "--registry", str(tiny_registry),
               "--out", str(tmp_path / "none.cxi")])
    assert rc != 0 and "no run" in capsys.readouterr().err


@pytest.fixture(scope="module")
def dense_scan(tmp_path_factory):
    """A 60-point scan at overlap 0.9 as CXI (with its probe), and its sample (the truth)."""
    sample = make_sample("test", extent_um=0.5, seed=2, beam_diameter_nm=800)
    xy_um = fermat_spiral(60, step_for_overlap(0.9, 0.8))
    frames = sample.measure(xy_um, 0.01, rng=0)
    scan = PtychoScan(frames=frames, positions_m=xy_um * 1e-6, geometry=sample.geometry,
                      probe=sample.probe, uid="sim-dense-60", exposure_s=0.01)
    return write_cxi(tmp_path_factory.mktemp("dense") / "dense.cxi", scan), sample, xy_um


def test_refine_writes_an_iterative_image_beside_the_ai_one(dense_scan, tiny_registry, tmp_path, capsys):
    from edge_ptycho_bluesky.metrics import compare

    path, sample, xy_um = dense_scan
    out = tmp_path / "refined.cxi"
    assert _run(["infer", str(path), "--registry", str(tiny_registry), "--out", str(out), "--refine", "3"]) == 0
    assert "image_2" in capsys.readouterr().out
    with h5py.File(out, "r") as f:
        ai = f["/entry_1/image_1/data"][()]
        image2 = f["/entry_1/image_2"]
        refined = image2["data"][()]
        assert refined.dtype == np.float32 and refined.shape == ai.shape
        assert 0 < image2.attrs["refine_seconds"] <= 4 and image2.attrs["sweeps"] >= 3
        assert image2.attrs["frame_updates_per_s"] > 0 and image2.attrs["probe_source"] == "scan"
    # The truth on the file's grid: the file's window corners are the sample's, shifted by whole pixels.
    corners, shape = read_cxi(path).to_window_positions()
    shift = np.rint(sample.window_positions(xy_um) - corners).astype(int)
    assert (shift == shift[0]).all()
    r, c = shift[0]
    truth = np.pad(sample.phase, 200)[200 + r:200 + r + shape[0], 200 + c:200 + c + shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for rr, cc in np.floor(corners).astype(int):
        mask[rr + 40:rr + 88, cc + 40:cc + 88] = True
    refined_ssim, ai_ssim = compare(truth, refined, mask)["ssim"], compare(truth, ai, mask)["ssim"]
    assert refined_ssim > 0.8 and refined_ssim > ai_ssim + 0.3, (refined_ssim, ai_ssim)


def test_refine_without_any_probe_says_how_to_give_one(tiny_registry, tmp_path, capsys):
    sample = make_sample("test", extent_um=0.3, seed=0)
    xy_um = fermat_spiral(8, step_for_overlap(0.9, 0.8))
    scan = PtychoScan(frames=sample.measure(xy_um, 0.01, rng=0), positions_m=xy_um * 1e-6,
                      geometry=sample.geometry, uid="no-probe")
    path = write_cxi(tmp_path / "noprobe.cxi", scan)
    out = tmp_path / "out.cxi"
    assert _run(["infer", str(path), "--registry", str(tiny_registry), "--out", str(out), "--refine", "1"]) == 1
    err = capsys.readouterr().err
    assert "no probe" in err and "--probe FILE.npy" in err
    assert not out.exists()
    # With --probe it works.
    np.save(tmp_path / "probe.npy", sample.probe)
    assert _run(["infer", str(path), "--registry", str(tiny_registry), "--out", str(out), "--refine", "0.5",
                 "--probe", str(tmp_path / "probe.npy")]) == 0
    with h5py.File(out, "r") as f:
        assert f["/entry_1/image_2"].attrs["probe_source"].endswith("probe.npy")

"""Label-free adaptation: the deployed model fine-tuned on a scan's own frames with the physics loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edge_ptycho_bluesky.cli import main
from edge_ptycho_bluesky.io.cxi import PtychoScan
from edge_ptycho_bluesky.model import PtychoNN2, export_onnx, save_state_dict
from edge_ptycho_bluesky.sim import fermat_spiral, make_sample
from edge_ptycho_bluesky.training.adapt import adapt_scan, usable_frames
from edge_ptycho_bluesky.training.config import TrainConfig
from edge_ptycho_bluesky.training.registry import ModelRegistry

pytestmark = pytest.mark.slow  # trains a network


@pytest.fixture(scope="module")
def scan() -> PtychoScan:
    """A small scan of letters (photon-counted, 0.05 s) whose probe is recorded."""
    sample = make_sample("test", extent_um=0.3, seed=2)
    xy = fermat_spiral(40, 0.05)
    frames = sample.measure(xy, 0.05, rng=3)
    return PtychoScan(frames=frames, positions_m=xy * 1e-6, geometry=sample.geometry, probe=sample.probe,
                      uid="letters", exposure_s=0.05)


def small_registry(tmp_path, seed: int = 0) -> ModelRegistry:
    tmp_path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = PtychoNN2(nconv=4, n_levels=3)
    registry = ModelRegistry(tmp_path / "models")
    registry.publish({"model.onnx": export_onnx(model, tmp_path / "m.onnx"), "model.pt": save_state_dict(model, tmp_path / "m.pt")},
                     extra={"model_kwargs": {"nconv": 4, "n_levels": 3}, "preprocess": {"scale": 0.01}})
    return registry


def test_adaptation_lowers_the_held_out_physics_loss_and_deploys(scan, tmp_path) -> None:
    registry = small_registry(tmp_path)
    first = registry.current_version()
    result = adapt_scan(scan, registry, seconds=60, epochs=4)
    assert result.loss_after < result.loss_before
    assert result.deployed and registry.current_version() == result.version != first
    assert result.frames_held_out == 8 and result.frames_used == 32 and result.frames_skipped == 0
    manifest = registry.get(result.version).manifest
    assert manifest["parent"] == first and manifest["extra"]["adaptation"]["loss"] == "physics"
    assert manifest["extra"]["preprocess"]["scale"] == 0.01  # the same input contract as its parent


def test_a_worse_model_is_published_but_not_deployed(scan, tmp_path) -> None:
    registry = small_registry(tmp_path)
    first = registry.current_version()
    wild = TrainConfig(batch_size=8, lr_min=5.0, lr_max=5.0, device="cpu", progress=False)  # diverges
    result = adapt_scan(scan, registry, seconds=60, epochs=2, config=wild)
    assert not result.loss_after < result.loss_before
    assert not result.deployed and registry.current_version() == first
    assert result.version in [v.version for v in registry.versions()]


def test_the_command_prints_one_json_line_and_refuses_a_scan_without_probe(scan, tmp_path, capsys) -> None:
    registry = small_registry(tmp_path)
    bad = scan.frames.astype(np.float32)
    bad[0] = np.nan
    bad[1] = 0
    path = PtychoScan(frames=bad, positions_m=scan.positions_m, geometry=scan.geometry, probe=scan.probe,
                      exposure_s=0.05).to_cxi(tmp_path / "scan.cxi")
    assert usable_frames(bad).sum() == len(bad) - 2
    assert main(["adapt", str(path), "--registry", str(registry.root), "--seconds", "30", "--epochs", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"version", "loss_before", "loss_after", "seconds", "deployed"} <= set(line)
    assert line["frames_skipped"] == 2 and line["seconds"] < 30
    # the adapted version keeps the probe it was adapted with: a later scan without one can use it
    assert registry.get(line["version"]).probe_path is not None
    fresh = small_registry(tmp_path / "fresh")  # a model without a probe, a scan without one
    bare = PtychoScan(frames=scan.frames, positions_m=scan.positions_m, geometry=scan.geometry).to_cxi(tmp_path / "bare.cxi")
    assert main(["adapt", str(bare), "--registry", str(fresh.root)]) == 1
    assert "--probe FILE.npy" in capsys.readouterr().err

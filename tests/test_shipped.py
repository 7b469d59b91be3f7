"""The model shipped with the package: a new registry gets it verified and deployed, and it infers."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ptycho_bluesky.cli import main
from edge_ptycho_bluesky.io.cxi import PtychoScan
from edge_ptycho_bluesky.model.scan_inference import infer_scan, load_scan
from edge_ptycho_bluesky.sim import fermat_spiral, make_sample
from edge_ptycho_bluesky.training.adapt import adapt_scan
from edge_ptycho_bluesky.training.registry import ModelRegistry
from edge_ptycho_bluesky.training.shipped import init_registry_if_empty, shipped_model_info


def test_registry_init_deploys_the_shipped_model_verified_and_it_infers(tmp_path, capsys) -> None:
    root = tmp_path / "registry"
    assert main(["registry", "init", str(root)]) == 0
    assert "verified, deployed" in capsys.readouterr().out
    registry = ModelRegistry(root, create=False)
    mv = registry.current(verify=True)
    info = shipped_model_info()
    assert mv.manifest["model"] == info["model"] and mv.input_scale == info["preprocess"]["scale"]
    assert mv.manifest["extra"]["shipped"]["recipe"]  # how it was made travels with it
    sample = make_sample("test", extent_um=0.2, seed=4)
    xy = fermat_spiral(12, 0.05)
    scan = PtychoScan(frames=sample.measure(xy, 0.01, rng=1), positions_m=xy * 1e-6, geometry=sample.geometry,
                      exposure_s=0.01)
    result = infer_scan(load_scan(scan.to_cxi(tmp_path / "scan.cxi")), root)
    assert result.patches.shape == (12, 128, 128) and np.isfinite(result.patches).all()
    assert result.patches.std() > 0  # not a constant image
    # never over an existing registry
    assert main(["registry", "init", str(root)]) == 1
    assert "already holds model versions" in capsys.readouterr().err
    assert init_registry_if_empty(root) is None and registry.current_version() == mv.version


def test_an_empty_registry_gets_the_shipped_model_once(tmp_path, monkeypatch, capsys) -> None:
    first = init_registry_if_empty(tmp_path / "new")
    assert first is not None and first.version == ModelRegistry(tmp_path / "new").current_version()
    assert init_registry_if_empty(tmp_path / "new") is None
    monkeypatch.delenv("EDGE_PTYCHO_REGISTRY", raising=False)
    assert main(["registry", "init"]) == 1
    assert "give the registry folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_scan_without_probe_adapts_with_the_probe_the_shipped_model_was_trained_with(tmp_path) -> None:
    root = tmp_path / "registry"
    shipped = init_registry_if_empty(root)
    assert shipped.probe_path is not None
    sample = make_sample("test", extent_um=0.3, seed=6)
    xy = fermat_spiral(30, 0.05)
    scan = PtychoScan(frames=sample.measure(xy, 0.01, rng=2), positions_m=xy * 1e-6, geometry=sample.geometry,
                      exposure_s=0.01, uid="no-probe")  # no probe recorded, as the simulated detector's runs
    result = adapt_scan(scan, root, seconds=20, epochs=2)
    assert result.parent == shipped.version and np.isfinite(result.loss_after)
    adapted = ModelRegistry(root).get(result.version)
    np.testing.assert_array_equal(np.load(adapted.probe_path), np.load(shipped.probe_path))  # kept in the lineage

"""The profile's edge wiring (startup/40-edge.py): worker started, scan inferred, stitch stored,
hot swap to a newly imported model, replay stored beside the first stitch."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

pytest.importorskip("pvaccess")
pytest.importorskip("onnxruntime")

from edge_ptycho_bluesky.callbacks.session import start_edge_session  # noqa: E402
from edge_ptycho_bluesky.edge.session import EdgeSessionConfig  # noqa: E402
from edge_ptycho_bluesky.storage import StorageConfig  # noqa: E402

from .conftest import tiny_onnx  # noqa: E402

#: whole scans, subprocesses or training: not in the quick loop (pytest -m "not slow")
pytestmark = pytest.mark.slow

PROFILE = Path(__file__).resolve().parents[1] / "profile_collection"
EDGE_ENV = ("EDGE_PTYCHO_EDGE", "EDGE_PTYCHO_EDGE_WORKER", "EDGE_PTYCHO_REGISTRY",
            "EDGE_PTYCHO_EDGE_INPUT", "EDGE_PTYCHO_EDGE_OUTPUT", "EDGE_PTYCHO_EDGE_STATUS",
            "EDGE_PTYCHO_EDGE_ENGINE", "EDGE_PTYCHO_TILED_URI", "EDGE_PTYCHO_RETRAIN",
            "EDGE_PTYCHO_RETRAIN_EXECUTOR", "EDGE_PTYCHO_RETRAIN_EPOCHS")

SCRIPT = """
import time
import numpy as np
from edge_ptycho_bluesky.derived import find_derived_runs
uid, = RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=12))
res = edge.stitch.results[uid]
print('PATCHES', len(res.frame_indices), res.missing, res.model_versions)
derived = find_derived_runs(catalog, uid, 'edge_inference')
print('DERIVED', len(derived), derived[0].metadata['start']['original_run_uid'] == uid)
stitched = derived[0]['stitched']['stitched_phase'].read()[0]
patches = derived[0]['primary']['phase_patch'].read()
raw = get_run(catalog, uid)['primary']['ptycho_det_image'].read().astype(np.float32)
print('STITCHED', np.array_equal(stitched, res.image, equal_nan=True), np.isfinite(stitched).any())
print('PATCHES_ARE_2X_FRAMES', np.allclose(patches, 2.0 * raw, rtol=1e-6))
deadline = time.monotonic() + 10
while edge.status().get('inferred', 0) < 12 and time.monotonic() < deadline:
    time.sleep(0.1)
st = edge.status()
print('STATUS', st['inferred'], st['model_version'], st['dropped'])
print('ERRORS', edge.forwarder.errors + edge.forwarder.failed + edge.stitch.errors)
# a newer model is deployed: the worker hot-swaps to it; replaying the scan re-infers it
from edge_ptycho_bluesky.training.registry import ModelRegistry, import_onnx
import_onnx(ModelRegistry(REGISTRY), X3, version='v-x3')
deadline = time.monotonic() + 20
while edge.status().get('model_version') != 'v-x3' and time.monotonic() < deadline:
    time.sleep(0.1)
again = edge.replay(uid)
print('REPLAYED', len(again.frame_indices), again.missing, again.model_versions)
old, new = find_derived_runs(catalog, uid, 'edge_inference')
print('SIDE_BY_SIDE', new.metadata['start']['uid'] == again.derived_run_uid,
      old.metadata['start']['model_versions'], new.metadata['start']['model_versions'])
print('RATIO', np.allclose(new['stitched']['stitched_phase'].read()[0], 1.5 * stitched, rtol=1e-5, equal_nan=True))
"""


RETRAIN_SCRIPT = """
import time
from edge_ptycho_bluesky.training.registry import ModelRegistry
print('RETRAIN_ON', retrain is not None, retrain.status()['executor'])
uid, = RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=16, labelled=True))
print('IDLE', retrain.wait_idle(600))
o = retrain.outcomes[-1]
print('OUTCOME', o.scan_uid == uid, o.status, o.model_before, o.published_version is not None, o.errors)
print('DEPLOYED', ModelRegistry(REGISTRY).current_version() == o.published_version)
deadline = time.monotonic() + 60
while edge.status().get('model_version') != o.published_version and time.monotonic() < deadline:
    time.sleep(0.2)
print('SERVED', edge.status().get('model_version') == o.published_version)
test, = RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=12, labelled=False))
print('LIVE', edge.stitch.results[test].model_versions == [o.published_version])
print('RECORDED', len(find_derived_runs(catalog, uid, 'retraining_job')))
"""


def _clean_env(data_dir: Path) -> dict[str, str]:
    env = {**os.environ, "EDGE_PTYCHO_DATA_DIR": str(data_dir), "MPLBACKEND": "Agg"}
    for key in EDGE_ENV:
        env.pop(key, None)
    env["EDGE_PTYCHO_RETRAIN"] = "0"  # labelled scans would start retraining jobs
    return env


def _run_profile(tmp_path: Path, env: dict[str, str], script: str) -> subprocess.CompletedProcess:
    (tmp_path / "scan.py").write_text(script)
    return subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", f"--profile-dir={PROFILE}", "--colors=nocolor",
         "--HistoryManager.enabled=False", str(tmp_path / "scan.py")],
        env=env, capture_output=True, text=True, timeout=900)


def _import(tmp_path: Path, registry: Path, env: dict[str, str]) -> None:
    """The documented way to put a model in the registry."""
    imported = subprocess.run(
        [sys.executable, "-m", "edge_ptycho_bluesky.cli", "import-onnx",
         str(tiny_onnx(tmp_path / "x2.onnx", 2.0)), "--registry", str(registry), "--version", "v-x2"],
        env=env, capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]


def _channels(env: dict[str, str]) -> None:
    tag = uuid.uuid4().hex[:8]
    env.update({"EDGE_PTYCHO_EDGE_INPUT": f"test:{tag}:frames", "EDGE_PTYCHO_EDGE_OUTPUT": f"test:{tag}:phase",
                "EDGE_PTYCHO_EDGE_STATUS": f"test:{tag}:status", "EDGE_PTYCHO_EDGE_ENGINE": "onnxruntime"})


def test_profile_starts_the_worker_and_stores_the_live_stitch(tmp_path):
    data = tmp_path / "data"
    registry = data / "registry"
    env = _clean_env(data)
    _import(tmp_path, registry, env)
    _channels(env)
    x3 = tiny_onnx(tmp_path / "x3.onnx", 3.0)
    result = _run_profile(tmp_path, env, f"REGISTRY, X3 = {str(registry)!r}, {str(x3)!r}\n" + SCRIPT)
    out = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, out
    assert "PATCHES 12 [] ['v-x2']" in result.stdout, out
    assert "DERIVED 1 True" in result.stdout, out
    assert "STITCHED True True" in result.stdout, out
    assert "PATCHES_ARE_2X_FRAMES True" in result.stdout, out
    assert "STATUS 12 v-x2 {'empty': 1}" in result.stdout, out
    assert "ERRORS 0" in result.stdout, out
    # replay with the newer model: a second stitched image stored next to the first
    assert "REPLAYED 12 [] ['v-x3']" in result.stdout, out
    assert "SIDE_BY_SIDE True ['v-x2'] ['v-x3']" in result.stdout, out
    assert "RATIO True" in result.stdout, out
    # the embedded worker was stopped at exit (SIGINT: it drained and printed its final counts)
    log = (data / "logs" / "edge-worker.log").read_text()
    assert '"event": "stopped"' in log and '"inferred": 24' in log, log[-2000:]


def test_a_labelled_scan_in_the_profile_retrains_and_the_worker_serves_the_new_model(tmp_path):
    """Continual learning driven only by RE(...) in the profile: labelled scan -> job in a process pool
    (rPIE, labels, validation of the deployed model, training) -> new version deployed -> the
    running worker swaps it in -> the next scan is inferred with it; the job is stored in Tiled."""
    data = tmp_path / "data"
    registry = data / "registry"
    env = _clean_env(data)
    _import(tmp_path, registry, env)   # a "model" that doubles its input: far from the labels
    _channels(env)
    env.update({"EDGE_PTYCHO_RETRAIN": "1", "EDGE_PTYCHO_RETRAIN_EPOCHS": "1"})
    # Job processes are spawned, and spawning re-runs a script's unguarded code: guard it, as
    # any script that starts processes must (the profile's 50-retrain.py says so).
    script = (f"REGISTRY = {str(registry)!r}\nfrom edge_ptycho_bluesky.derived import find_derived_runs\n"
              "if __name__ == '__main__':\n" + textwrap.indent(RETRAIN_SCRIPT, "    "))
    result = _run_profile(tmp_path, env, script)
    out = result.stdout + result.stderr[-3000:]
    assert result.returncode == 0, out
    assert "RETRAIN_ON True process" in result.stdout, out
    assert "IDLE True" in result.stdout, out
    assert "OUTCOME True retrained v-x2 True ()" in result.stdout, out
    assert "DEPLOYED True" in result.stdout, out
    assert "SERVED True" in result.stdout, out
    assert "LIVE True" in result.stdout, out
    assert "RECORDED 1" in result.stdout, out


def test_no_model_means_one_clear_line_and_no_worker(tmp_path, monkeypatch, caplog):
    for key in EDGE_ENV:
        monkeypatch.delenv(key, raising=False)
    storage = StorageConfig(data_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="edge_ptycho_bluesky.callbacks.session"):
        assert start_edge_session(None, None, storage) is None
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "edge-ptycho import-onnx" in lines[0]
    assert str(tmp_path / "registry") in lines[0]
    monkeypatch.setenv("EDGE_PTYCHO_EDGE", "0")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="edge_ptycho_bluesky.callbacks.session"):
        assert start_edge_session(None, None, storage) is None
    assert "disabled" in caplog.text
    monkeypatch.setenv("EDGE_PTYCHO_EDGE", "1")
    monkeypatch.setenv("EDGE_PTYCHO_REGISTRY", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_WORKER", "external")
    config = EdgeSessionConfig.from_env(tmp_path)
    assert config.registry == tmp_path / "elsewhere" and config.worker == "external" and config.enabled
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_WORKER", "remote")
    with pytest.raises(ValueError, match="embedded"):
        EdgeSessionConfig.from_env(tmp_path)


def test_a_worker_that_cannot_start_leaves_the_session_without_edge(tmp_path, monkeypatch, caplog):
    from edge_ptycho_bluesky.training.registry import ModelRegistry, import_onnx

    for key in EDGE_ENV:
        monkeypatch.delenv(key, raising=False)
    import_onnx(ModelRegistry(tmp_path / "registry"), tiny_onnx(tmp_path / "x2.onnx", 2.0))
    tag = uuid.uuid4().hex[:8]
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_INPUT", f"test:{tag}:frames")
    monkeypatch.setenv("EDGE_PTYCHO_EDGE_ENGINE", "no-such-engine")  # the worker exits at once
    with caplog.at_level(logging.INFO, logger="edge_ptycho_bluesky.callbacks.session"):
        assert start_edge_session(None, None, StorageConfig(data_dir=tmp_path)) is None
    assert "could not start" in caplog.text and "did not start" in caplog.text
    assert "invalid choice" in (tmp_path / "logs" / "edge-worker.log").read_text()

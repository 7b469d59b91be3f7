"""The IPython profile: every startup file runs in a real IPython and a scan runs from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

#: whole scans, subprocesses or training: not in the quick loop (pytest -m "not slow")
pytestmark = pytest.mark.slow

PROFILE = Path(__file__).resolve().parents[1] / "profile_collection"


def test_profile_startup_files_run_and_a_scan_is_stored(tmp_path):
    startup = sorted((PROFILE / "startup").glob("*.py"))
    assert [p.name[:2] for p in startup] == sorted(p.name[:2] for p in startup) and len(startup) >= 4
    script = (
        "uid, = RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=6))\n"
        "run = get_run(catalog, uid)\n"
        "print('FRAMES', run['primary']['ptycho_det_image'].read().shape)\n"
        "print('REPLAYED', replay(run, lambda name, doc: None))\n"
        "print('SCAN_ID', run.metadata['start']['scan_id'])\n"
        "names = set(dir())\n"
        "print('NAMES', {'RE', 'bec', 'stage', 'det', 'catalog', 'spiral_ptycho_scan', 'rel_spiral_ptycho_scan',"
        " 'replay'} <= names)\n"
    )
    (tmp_path / "scan.py").write_text(script)
    env = {**os.environ, "EDGE_PTYCHO_DATA_DIR": str(tmp_path / "data"), "MPLBACKEND": "Agg"}
    env.pop("EDGE_PTYCHO_TILED_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", f"--profile-dir={PROFILE}", "--colors=nocolor",
         "--HistoryManager.enabled=False", str(tmp_path / "scan.py")],
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FRAMES (6, 128, 128)" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]
    assert "NAMES True" in result.stdout
    assert "REPLAYED" in result.stdout
    # RE.md persists: a second session continues the scan ids of the first
    again = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", f"--profile-dir={PROFILE}", "--colors=nocolor",
         "--HistoryManager.enabled=False", str(tmp_path / "scan.py")],
        env=env, capture_output=True, text=True, timeout=300)
    assert "SCAN_ID 1" in result.stdout and "SCAN_ID 2" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]


def test_the_profile_on_the_ioc_beamline_runs_the_readme_scan(tmp_path):
    """EDGE_PTYCHO_BEAMLINE=ioc: the profile starts `edge-ptycho ioc`, connects stock ophyd-async devices,
    and the README's scan is stored, inferred live from the IOC's stream and stitched."""
    import uuid

    pytest.importorskip("caproto")
    pytest.importorskip("ophyd_async")
    script = (
        "uid, = RE(spiral_ptycho_scan([det], stage.x, stage.y, step=0.05, num_points=20))\n"
        "from edge_ptycho_bluesky.runs import read_scan\n"
        "print('FRAMES', read_scan(get_run(catalog, uid)).frames.shape)\n"
        "print('TYPES', type(det).__module__, type(stage.x).__module__)\n"
        "result = edge.wait_stored(uid, timeout=120)\n"
        "print('STITCHED', len(result.frame_indices), result.derived_run_uid is not None)\n"
    )
    (tmp_path / "scan.py").write_text(script)
    tag = uuid.uuid4().hex[:6]
    env = {**os.environ, "EDGE_PTYCHO_DATA_DIR": str(tmp_path / "data"), "MPLBACKEND": "Agg",
           "EDGE_PTYCHO_BEAMLINE": "ioc", "EDGE_PTYCHO_IOC_PREFIX": f"P{tag}:",
           "EDGE_PTYCHO_EDGE_INPUT": f"prof:{tag}:frames", "EDGE_PTYCHO_EDGE_OUTPUT": f"prof:{tag}:phase",
           "EDGE_PTYCHO_EDGE_STATUS": f"prof:{tag}:status", "EDGE_PTYCHO_EDGE_IMAGE": f"prof:{tag}:image",
           "EDGE_PTYCHO_EDGE_REFINE_SECONDS": "2", "EDGE_PTYCHO_EDGE_ENGINE": "onnxruntime"}
    env.pop("EDGE_PTYCHO_TILED_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "IPython", "--no-banner", f"--profile-dir={PROFILE}", "--colors=nocolor",
         "--HistoryManager.enabled=False", str(tmp_path / "scan.py")],
        env=env, capture_output=True, text=True, timeout=240)
    out = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, out
    assert "FRAMES (20, 128, 128)" in result.stdout, out
    assert "TYPES ophyd_async.epics.adsimdetector ophyd_async.epics.motor" in result.stdout, out
    assert "STITCHED 20 True" in result.stdout, out

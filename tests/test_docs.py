"""The documentation site builds (mkdocs, strict: broken links and missing pages fail)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "index.html").exists()
    for page in ("concepts", "beamline", "configuration", "results", "benchmarks", "reliability", "executors",
                 "troubleshooting"):
        assert (tmp_path / page / "index.html").exists(), page
    assert (tmp_path / "reliability" / "index.html").read_text().count("<table>") >= 2
    assert (tmp_path / "images" / "overlap_curve.png").exists()

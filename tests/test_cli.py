"""The command line: ``edge-ptycho demo`` writes its pictures and summary."""

from __future__ import annotations

import json

import pytest

from edge_ptycho_bluesky.cli import main


def test_demo_quick_writes_summary_and_pictures(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out"), "--quick"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert len(summary["scans"]) == 2 and all(isinstance(uid, str) and len(uid) == 36 for uid in summary["scans"])
    assert summary["frames_stored"] == 60 + 40
    assert summary["replayed_documents"] > 40
    assert (tmp_path / "out" / "scan_positions.png").stat().st_size > 10_000


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err

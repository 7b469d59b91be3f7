"""The command line: ``edge-ptycho demo`` runs the whole workflow (with the shipped model, or ``--full`` from
scratch) and writes its pictures and summary."""

from __future__ import annotations

import json

import pytest

from edge_ptycho_bluesky.cli import main


#: The figures every demo summary holds (README, "The demo").
SUMMARY_KEYS = {"scans", "frames_stored", "ssim_rpie_vs_truth", "model_version", "model_versions", "retrain_decisions",
                "frames_sent", "frames_inferred", "frames_dropped", "latency_p50_ms", "latency_p99_ms", "transport",
                "ssim_ai_vs_rpie", "ssim_ai_vs_truth", "ssim_first_model", "ssim_second_model", "time_s",
                "ssim_refined_vs_truth", "refine_seconds_after_scan"}


@pytest.mark.slow
def test_demo_with_the_shipped_model_adapts_it_to_the_test_scan(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out"), "--quick"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert len(summary["scans"]) == 2 and summary["frames_stored"] == 60 + 40
    assert summary["frames_sent"] == 40 and summary["frames_inferred"] + summary["frames_dropped"] == 40
    assert summary["model_versions"][0] == summary["model_version"] == "v0001"  # the shipped model
    (decision,) = summary["retrain_decisions"]
    assert decision.split(": ")[1].startswith(("adapted", "not adapted"))
    assert summary["replay_model_versions"] == summary["model_versions"][-1:]
    assert -1 <= summary["ssim_second_model"] <= 1 and -1 <= summary["ssim_ai_vs_truth"] <= 1
    # The live refiner (the shipped model's probe) turns the AI mosaic into an iterative image.
    assert summary["ssim_refined_vs_truth"] > max(summary["ssim_ai_vs_truth"] + 0.2, 0.8), summary
    assert 0 < summary["refine_seconds_after_scan"] < 60
    assert (tmp_path / "out" / "ai_vs_rpie.png").stat().st_size > 10_000


@pytest.mark.slow
def test_demo_quick_writes_summary_and_pictures(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "out"), "--quick", "--full"]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert len(summary["scans"]) == 3 and all(isinstance(uid, str) and len(uid) == 36 for uid in summary["scans"])
    assert summary["frames_stored"] == 60 + 40 + 60
    assert summary["replayed_documents"] > 40
    for picture in ("scan_positions.png", "rpie_vs_truth.png", "ai_vs_rpie.png"):
        assert (tmp_path / "out" / picture).stat().st_size > 10_000
    # rPIE (20 iterations in quick mode) already resolves the training phantom.
    assert summary["ssim_rpie_vs_truth"] > 0.6 and summary["pearson_rpie_vs_truth"] > 0.9
    # Live inference over pvAccess: every test frame sent and accounted for.
    assert summary["transport"] == "pvAccess (loopback)"
    assert summary["frames_sent"] == 40
    assert summary["frames_inferred"] + summary["frames_dropped"] == 40
    assert summary["latency_p99_ms"] >= summary["latency_p50_ms"] > 0
    assert summary["model_version"] and summary["inference_run_uid"] and summary["labels_run_uid"]
    # Two training epochs make a poor network; the figures are measured and in range, not judged here.
    assert -1 <= summary["ssim_ai_vs_rpie"] <= 1 and -1 <= summary["ssim_ai_vs_truth"] <= 1
    # The closed loop: the first model comes from the retraining job; the second labelled scan is
    # validated against it and, its SSIM being below the demo's floor (0.85), retrains; the worker
    # hot-swaps the new version and the replay of the test scan uses it.
    assert summary["model_versions"][0] == summary["model_version"]
    assert len(summary["retrain_decisions"]) == 2
    assert summary["retrain_decisions"][0].split(": ")[1].startswith("trained")
    assert summary["retrain_decisions"][1].split(": ")[1].startswith("retrained")
    assert len(summary["model_versions"]) == 2 and len(set(summary["model_versions"])) == 2
    assert summary["replay_model_versions"] == summary["model_versions"][-1:]
    assert -1 <= summary["ssim_second_model"] <= 1


def test_unknown_subcommand_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_a_command_imports_only_its_own_module():
    """A worker process starts without loading the trainer, the demo or torch."""
    import subprocess
    import sys

    code = ("import sys; from edge_ptycho_bluesky.cli import build_parser; build_parser('worker'); "
            "print(sorted(m for m in ('torch', 'edge_ptycho_bluesky.training.cli', 'edge_ptycho_bluesky.demo') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    with pytest.raises(SystemExit) as info:  # every command is still listed in the help
        main(["--help"])
    assert info.value.code == 0

"""``edge-ptycho reproduce``: the paper's results on simulated data, at a size CI can afford.

The figures are the same code as ``--quick`` and the full run; the scans, epochs and overlaps are
fewer, so the network is weaker than in docs/results.md.  The bounds test the paper's claims in a
form such a network must still satisfy (measured on this configuration; the full-size values are
in docs/results.md).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from edge_ptycho_bluesky.reproduce import FIGURES, ROW_FIELDS, ReproduceConfig, run_reproduce

#: whole scans, subprocesses or training: not in the quick loop (pytest -m "not slow")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    config = ReproduceConfig.quick_config(
        out, train_scans=4, increments=(2, 4), epochs=6, frames_per_scan=120, test_frames=120,
        overlaps=(0.9, 0.0), downscales=(1000,), downscale_epochs=2, countrates=(16,), batches=(8,), threads=1,
        refine_seconds=3.0)
    rows = run_reproduce(config)
    return out, rows


def value(rows, figure, method, condition, metric="ssim"):
    (row,) = [r for r in rows if (r["figure"], r["method"], r["condition"], r["metric"]) ==
              (figure, method, condition, metric)]
    return row["value"]


def test_results_json_has_the_contract_rows_and_a_picture_per_figure(results):
    out, rows = results
    assert json.loads((out / "results.json").read_text()) == rows
    assert all(tuple(r) == ROW_FIELDS for r in rows)
    assert {r["figure"] for r in rows} == set(FIGURES)
    assert {r["method"] for r in rows} == {"ai", "rpie", "ai+rpie"}
    for figure in FIGURES:
        assert (out / f"{figure}.png").stat().st_size > 10_000
    assert all(np.isfinite(r["value"]) for r in rows)
    assert value(rows, "fig4", "ai", "upscale=10") is not None
    assert [r["paper"] for r in rows if r["figure"] == "fig4" and r["metric"] == "ssim" and r["method"] == "ai"
            and r["condition"] == "upscale=10"] == [0.86]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["timings_s"]["total"] > 0 and summary["train_frames"] == 4 * 120


def test_iterative_needs_overlap_and_the_network_does_not(results):
    _, rows = results
    rpie_09, rpie_0 = value(rows, "fig3", "rpie", "overlap=0.9"), value(rows, "fig3", "rpie", "overlap=0")
    ai_09, ai_0 = value(rows, "fig3", "ai", "overlap=0.9"), value(rows, "fig3", "ai", "overlap=0")
    assert rpie_09 > 0.85 and rpie_0 < rpie_09 - 0.5          # rPIE fails without overlap
    assert ai_0 > rpie_0                                      # the paper: AI above iterative at zero overlap
    assert ai_0 >= 0.5 * ai_09                                # and it keeps (most of) what it had
    dose = {c: value(rows, "fig3", "rpie", c, "dose_photons_per_nm2") for c in ("overlap=0.9", "overlap=0")}
    assert dose["overlap=0.9"] > 50 * dose["overlap=0"]       # 10x the step: 100x less dose


def test_the_refined_image_is_at_least_as_good_as_the_better_of_ai_and_rpie(results):
    _, rows = results
    for condition in ("overlap=0.9", "overlap=0"):
        refined = value(rows, "fig3", "ai+rpie", condition)
        best = max(value(rows, "fig3", "ai", condition), value(rows, "fig3", "rpie", condition))
        assert refined >= best - 0.02, (condition, refined, best)
    assert value(rows, "fig3", "ai+rpie", "overlap=0.9") > 0.9
    assert value(rows, "fig2", "ai+rpie", "overlap=0.9", "pearson") > value(rows, "fig2", "ai", "overlap=0.9", "pearson")
    assert value(rows, "fig4", "ai+rpie", "upscale=10") > value(rows, "fig4", "ai", "upscale=10")


def test_low_dose_scaling_and_training_distribution(results):
    _, rows = results
    # a 1/10-dose scan: scaling the counts back up is what makes the model usable (Fig. 4)
    assert value(rows, "fig4", "ai", "upscale=10", "pearson") > value(rows, "fig4", "ai", "upscale=1", "pearson") + 0.1
    assert value(rows, "fig4", "rpie", "exposure=1/10") > 0.6
    # continual learning: the familiar area (the training distribution) is imaged better than the unseen one
    assert value(rows, "fig5", "ai", "scans=4, area=familiar") > value(rows, "fig5", "ai", "scans=4, area=unseen")
    # inference time per frame was measured for the trained model, float32 and int8
    times = [r for r in rows if r["figure"] == "table2"]
    assert len(times) >= 2 and all(0 < r["value"] < 1e6 for r in times)

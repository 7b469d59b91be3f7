"""Spiral plans against the simulated beamline with a real RunEngine."""

from __future__ import annotations

import numpy as np
import pytest
from event_model import DocumentNames, schema_validators
from ophyd.utils import LimitError

from edge_ptycho_bluesky.plans import rel_spiral_ptycho_scan, spiral_ptycho_pattern, spiral_ptycho_scan
from edge_ptycho_bluesky.sim import fermat_spiral


def validate(docs) -> None:
    for name, items in docs.items():
        for doc in items:
            schema_validators[DocumentNames(name)].validate(doc)


def test_scan_documents_validate_and_follow_the_fermat_spiral(RE, docs, beamline):
    RE.subscribe(docs.cb)
    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                   num_points=25, x_center=0.1, y_center=-0.05))
    validate(docs)
    assert {k: len(v) for k, v in docs.items()} == {"start": 1, "descriptor": 1, "stream_resource": 1,
                                                   "event": 25, "stream_datum": 25, "stop": 1}
    expected = fermat_spiral(25, 0.05) + [0.1, -0.05]
    x = [e["data"]["stage_x"] for e in docs["event"]]
    y = [e["data"]["stage_y"] for e in docs["event"]]
    np.testing.assert_allclose(np.column_stack([x, y]), expected, atol=1e-12)
    start = docs["start"][0]
    assert start["uid"] == uid and start["plan_name"] == "spiral_ptycho_scan"
    assert start["plan_pattern"] == "spiral_ptycho_pattern"
    meta = start["edge_ptycho"]
    assert meta["geometry"]["pixel_size_nm"] == pytest.approx(beamline.sample.geometry.pixel_size_nm)
    assert meta["step_um"] == 0.05 and meta["num_points"] == 25
    assert 0.85 < meta["overlap_ratio"] < 0.92 and meta["labelled"] is True
    assert meta["dose_photons_per_nm2"] > 0 and meta["exposure_s"] == beamline.det.exposure_time.get()
    descriptor = docs["descriptor"][0]
    image = descriptor["data_keys"]["ptycho_det_image"]
    assert image["external"] == "STREAM:" and image["dtype_numpy"] == "<u4" and image["shape"] == [128, 128]
    assert descriptor["hints"]["ptycho_det"]["fields"] == ["ptycho_det_total_counts"]
    assert all(e["data"]["ptycho_det_total_counts"] > 0 for e in docs["event"])
    assert "ptycho_det_image" not in docs["event"][0]["data"]  # frames are external, not in events
    assert docs["stream_datum"][-1]["indices"] == {"start": 24, "stop": 25}


def test_exposure_argument_sets_the_detector_and_the_dose(RE, docs, beamline):
    RE.subscribe(docs.cb)
    RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.2, num_points=3, exposure=0.002))
    meta = docs["start"][0]["edge_ptycho"]
    assert meta["exposure_s"] == 0.002 and meta["labelled"] is False
    assert meta["photons_per_point"] == pytest.approx(meta["photons_per_second"] * 0.002)


def test_relative_scan_is_centred_on_the_current_position_and_restores_it(RE, docs, beamline):
    stage = beamline.stage
    RE(__import__("bluesky.plan_stubs", fromlist=["mv"]).mv(stage.x, 0.2, stage.y, -0.1))
    RE.subscribe(docs.cb)
    RE(rel_spiral_ptycho_scan([beamline.det], stage.x, stage.y, step=0.05, num_points=10))
    xy = np.array([[e["data"]["stage_x"], e["data"]["stage_y"]] for e in docs["event"]])
    np.testing.assert_allclose(xy, spiral_ptycho_pattern(0.2, -0.1, 0.05, 10), atol=1e-12)
    assert stage.x.position == pytest.approx(0.2) and stage.y.position == pytest.approx(-0.1)
    assert docs["start"][0]["plan_name"] == "rel_spiral_ptycho_scan"


def test_geometry_probe_and_md_merge_into_the_ptychography_record(RE, docs, beamline, tmp_path):
    from edge_ptycho_bluesky.runs import EdgePtychoMeta

    probe = (beamline.det.sample.probe * 2).astype(np.complex64)
    np.save(tmp_path / "probe.npy", probe)
    RE.subscribe(docs.cb)
    RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.2, num_points=3,
                          geometry={"energy_kev": 8.0, "detector_distance_m": 2.0}, probe=tmp_path / "probe.npy",
                          md={"edge_ptycho": {"labelled": True, "sample_name": "star"}, "operator": "me"}))
    start = docs["start"][0]
    meta = EdgePtychoMeta.from_start(start)
    # the plan's geometry wins over the detector's; the detector fills the rest (beam, flux, frames)
    assert meta.geometry["energy_kev"] == 8.0 and meta.geometry["detector_distance_m"] == 2.0
    assert meta.to_geometry().pixel_size_nm != beamline.det.sample.geometry.pixel_size_nm
    assert meta.beam_diameter_nm and meta.frame_shape == (128, 128)
    # md merged key by key: the record keeps its geometry, gains the user's keys
    assert meta.labelled is True and meta.extra["sample_name"] == "star" and start["operator"] == "me"
    # the probe is recorded by reference and read back (checked against its sha256)
    assert set(start["edge_ptycho"]["probe"]) == {"file", "sha256"}
    np.testing.assert_array_equal(meta.probe_array((128, 128)), probe)
    np.save(tmp_path / "probe.npy", probe * 3)  # changed afterwards: ignored, with a warning
    assert meta.probe_array((128, 128)) is None


@pytest.mark.parametrize("kwargs, match", [
    ({"geometry": {"energy": 8.0}}, "unknown geometry keys \\['energy'\\]"),
    ({"geometry": {"energy_kev": -1.0}}, "energy"),
    ({"probe": "/no/such/probe.npy"}, "no such file"),
])
def test_bad_geometry_or_probe_fails_before_the_scan(RE, docs, beamline, kwargs, match):
    RE.subscribe(docs.cb)
    with pytest.raises(ValueError, match=match):
        RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.2, num_points=3, **kwargs))
    assert not docs["start"]


@pytest.mark.parametrize("kwargs, error, match", [
    ({"step": -0.05, "num_points": 10}, ValueError, "positive"),
    ({"step": 0.0, "num_points": 10}, ValueError, "positive"),
    ({"step": 50, "num_points": 10}, ValueError, "nm pass step=0.05"),
    ({"step": 0.05, "num_points": 0}, ValueError, "num_points must be >= 1"),
    ({"step": 0.05, "num_points": 2.5}, TypeError, "integer"),
    ({"step": "50nm", "num_points": 10}, TypeError, "number"),
    ({"step": float("nan"), "num_points": 10}, ValueError, "finite"),
    ({"step": 0.3, "num_points": 900}, ValueError, "travel"),
    ({"step": 0.05, "num_points": 10, "exposure": -1}, ValueError, "exposure"),
])
def test_bad_arguments_fail_before_anything_moves(RE, docs, beamline, kwargs, error, match):
    RE.subscribe(docs.cb)
    before = (beamline.stage.x.position, beamline.stage.y.position)
    with pytest.raises(error, match=match):
        RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, **kwargs))
    assert (beamline.stage.x.position, beamline.stage.y.position) == before
    assert not docs["start"]


def test_empty_detector_list_is_refused(beamline):
    with pytest.raises(TypeError, match="detectors"):
        list(spiral_ptycho_scan([], beamline.stage.x, beamline.stage.y, step=0.05, num_points=3))


def test_stage_refuses_moves_outside_its_travel(beamline):
    with pytest.raises(LimitError, match="travel"):
        beamline.stage.x.set(1e3)


def test_best_effort_callback_draws_the_live_scatter(RE, beamline):
    import matplotlib
    matplotlib.use("Agg")
    from bluesky.callbacks.best_effort import BestEffortCallback

    bec = BestEffortCallback()
    bec.disable_table()
    RE.subscribe(bec)
    RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=8))
    scatters = [cb for per_run in bec._live_scatters.values() for cb in per_run.values()]
    assert scatters, "BestEffortCallback drew no LiveScatter for the spiral"
    assert type(scatters[0]).__name__ == "LiveScatter"

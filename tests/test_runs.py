"""The run format: the typed edge_ptycho record and reading a stored run as a scan."""

from __future__ import annotations

import numpy as np
import pytest

from edge_ptycho_bluesky.plans import spiral_ptycho_scan
from edge_ptycho_bluesky.runs import META_KEY, EdgePtychoMeta, RunFormatError, read_scan
from edge_ptycho_bluesky.sim import Geometry
from edge_ptycho_bluesky.storage import get_run, make_tiled_writer


def test_record_round_trips_and_keeps_keys_it_does_not_know() -> None:
    record = {"geometry": Geometry().as_dict(), "step_um": 0.05, "num_points": 10, "exposure_s": 0.1,
              "labelled": True, "frame_shape": [128, 128], "beamline_note": {"hutch": "B"}}
    meta = EdgePtychoMeta.from_dict(record)
    assert meta.exposure_s == 0.1 and meta.labelled is True and meta.frame_shape == (128, 128)
    assert meta.extra == {"beamline_note": {"hutch": "B"}}
    assert meta.image_key is None and meta.frames_key == "ptycho_det_image"  # not recorded: the step detector's
    assert meta.to_dict() == record
    assert meta.pixel_size_nm == pytest.approx(Geometry().pixel_size_nm)
    assert meta.to_geometry() == Geometry()


def test_missing_or_bad_records_say_what_is_wrong() -> None:
    with pytest.raises(RunFormatError, match="not recorded by the edge_ptycho plans"):
        EdgePtychoMeta.from_start({"uid": "abc"})
    assert EdgePtychoMeta.from_start({"uid": "abc"}, required=False) is None
    with pytest.raises(RunFormatError, match="bad value"):
        EdgePtychoMeta.from_dict({"exposure_s": "fast"})
    with pytest.raises(RunFormatError, match="no edge_ptycho.geometry"):
        EdgePtychoMeta.from_dict({"labelled": True}).require_geometry()
    with pytest.raises(RunFormatError, match="not usable"):
        EdgePtychoMeta.from_dict({"geometry": {"energy_kev": -1}}).to_geometry()


def test_recorded_probe_is_decoded_by_one_rule() -> None:
    probe = (np.ones((8, 8)) * (1 + 2j)).astype(np.complex64)
    as_parts = EdgePtychoMeta(probe={"real": probe.real.tolist(), "imag": probe.imag.tolist()})
    np.testing.assert_array_equal(as_parts.probe_array((8, 8)), probe)
    np.testing.assert_array_equal(EdgePtychoMeta(probe=probe).probe_array(), probe)
    assert as_parts.probe_array((16, 16)) is None  # does not match the frames: ignored
    assert EdgePtychoMeta(probe=np.ones((8, 8))).probe_array() is None  # real, not a complex probe


def test_position_keys_and_units_are_recorded_and_converted(RE, beamline, storage_config, tiled_client) -> None:
    """Motors in mm: the record says so, and every reader converts (positions, step, live grid)."""
    from edge_ptycho_bluesky.callbacks.edge import _RunStitch

    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.1, num_points=4,
                                   position_units="mm", beam_size=0.8))
    run = get_run(tiled_client, uid)
    start = run.metadata["start"]
    meta = EdgePtychoMeta.from_start(start)
    assert meta.position_keys == ("stage_x", "stage_y") and meta.position_units == "mm"
    assert meta.step_um == pytest.approx(100.0) and meta.beam_diameter_nm == pytest.approx(800e3)
    from edge_ptycho_bluesky.sim import overlap_ratio

    assert meta.overlap_ratio == pytest.approx(overlap_ratio(100e3, 800e3))  # step and beam both in mm
    x = np.asarray(run["primary"]["stage_x"].read())
    np.testing.assert_allclose(read_scan(run).positions_m[:, 0], x * 1e-3)
    grid = _RunStitch(start, 8, None).grid  # the live stitch: object pixels in mm
    assert grid.pixel_size[0] == pytest.approx(meta.pixel_size_nm * 1e-6)
    with pytest.raises(ValueError, match="position_units"):
        RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.1, num_points=4,
                              position_units="inch"))


def test_a_stored_run_reads_as_one_scan(RE, beamline, storage_config, tiled_client) -> None:
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.1, num_points=6,
                                   exposure=0.05))
    run = get_run(tiled_client, uid)
    meta = EdgePtychoMeta.from_start(run.metadata["start"])
    assert run.metadata["start"][META_KEY] == meta.to_dict()
    scan = read_scan(run)
    assert scan.uid == uid and scan.frames.shape == (6, 128, 128) and scan.exposure_s == 0.05
    assert scan.beam_diameter_nm == pytest.approx(meta.beam_diameter_nm)
    assert scan.geometry == meta.to_geometry()
    x = run["primary"]["stage_x"].read()
    np.testing.assert_allclose(scan.positions_m[:, 0], np.asarray(x) * 1e-6)

"""The simulated beamline IOC (``edge-ptycho ioc``) driven by stock ophyd-async devices: every frame
stored in Tiled through the stock documents, inferred live from the IOC's own ``Pva1:Image``
stream, stitched, refined and stored; replayed; labelled by rPIE."""

from __future__ import annotations

import contextlib
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pvaccess")
pytest.importorskip("caproto")
pytest.importorskip("ophyd_async")

from edge_ptycho_bluesky.ioc.process import IocProcess, loopback_ca_env

loopback_ca_env()


@pytest.fixture(scope="module")
def ioc(tmp_path_factory):
    prefix = f"T{uuid.uuid4().hex[:6]}:"
    probe = tmp_path_factory.mktemp("ioc") / "probe.npy"
    process = IocProcess(prefix, ["--save-probe", str(probe), "--seed", "3"]).start()
    process.probe_path = probe
    yield process
    process.stop()


@pytest.fixture(scope="module")
def RE():
    """One RunEngine (one event loop) for the module: aioca binds its channels to the first loop
    that uses them, as a beamline session has one RunEngine."""
    import asyncio

    from bluesky import RunEngine

    loop = asyncio.new_event_loop()
    engine = RunEngine({}, loop=loop)
    yield engine
    loop.call_soon_threadsafe(loop.stop)
    engine._th.join()
    loop.close()


@contextlib.contextmanager
def watchdog(RE, seconds: float):
    """Pause a plan that has not finished after ``seconds`` (a status that never completes would
    otherwise hang the RunEngine forever), so the test fails saying which message it waited on."""
    last: list = [None]
    hook = RE.msg_hook
    RE.msg_hook = lambda msg: last.__setitem__(0, msg)
    timer = threading.Timer(seconds, RE.request_pause, kwargs={"defer": False})
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        RE.msg_hook = hook
        if RE.state == "paused":
            RE.abort(f"the plan did not finish in {seconds} s")
            pytest.fail(f"the plan did not finish in {seconds} s; its last message: {last[0]}")


@contextlib.contextmanager
def edge_session(RE, ioc, tiled_client, storage_config, tmp_path, **config):
    """The edge session on the IOC's ``Pva1:Image`` stream (embedded worker, the shipped model) and a
    Tiled writer, both removed afterwards: the module's tests share one RunEngine."""
    from edge_ptycho_bluesky.callbacks.session import EdgeSession
    from edge_ptycho_bluesky.edge.session import EdgeSessionConfig
    from edge_ptycho_bluesky.storage import make_tiled_writer
    from edge_ptycho_bluesky.training.shipped import init_registry

    init_registry(tmp_path / "registry")
    tag = uuid.uuid4().hex[:8]
    session = EdgeSession(RE, tiled_client, storage_config, EdgeSessionConfig(
        registry=tmp_path / "registry", input_pv=f"ioc:{tag}:frames", output_pv=f"ioc:{tag}:phase",
        status_pv=f"ioc:{tag}:status", image_pv=f"ioc:{tag}:image", engine="onnxruntime",
        detector_pv=ioc.prefix + "Pva1:Image", **{"refine": False, **config}), plot=False)
    writer = RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    try:
        yield session
    finally:
        RE.unsubscribe(writer)
        session.close()


def _read(RE, signal):
    out = []

    def plan():
        import bluesky.plan_stubs as bps

        out.append((yield from bps.rd(signal)))

    RE(plan())
    return out[0]


@pytest.fixture(scope="module")
def stock_devices(RE, ioc, storage_config):
    """ophyd-async's stock SimDetector (HDF5 writer) and motors, connected to the IOC."""
    from ophyd_async.core import StaticPathProvider, UUIDFilenameProvider
    from ophyd_async.epics import adsimdetector
    from ophyd_async.epics.adcore import ADWriterFactory
    from ophyd_async.epics.motor import Motor
    from ophyd_async.plan_stubs import ensure_connected

    path_provider = StaticPathProvider(UUIDFilenameProvider(), Path(storage_config.frames_dir))
    det = adsimdetector.SimDetector(ioc.prefix, ADWriterFactory.hdf(path_provider), name="det")
    mx, my = Motor(ioc.prefix + "m1", name="mx"), Motor(ioc.prefix + "m2", name="my")
    RE(ensure_connected(det, mx, my))
    return det, mx, my


GEOMETRY = {"energy_kev": 10.0, "detector_distance_m": 1.0, "detector_pixel_m": 75e-6, "frame_size": 128}


def test_ioc_serves_what_stock_devices_read_and_refuses_bad_writes(RE, ioc, stock_devices):
    import bluesky.plan_stubs as bps

    det, mx, my = stock_devices
    RE(bps.mv(mx, 0.3, my, -0.2))
    assert _read(RE, mx) == pytest.approx(0.3)
    # A negative exposure is refused, as areaDetector refuses it: the put fails, nothing changes.
    # (ophyd-async 0.21 does not report a failed CA put; a plain CA client sees the failure.)
    from caproto.sync.client import write

    with pytest.raises(Exception, match="(?i)fail|AcquireTime"):
        write(ioc.prefix + "cam1:AcquireTime", [-1.0], notify=True, timeout=5)
    RE(bps.mv(det.driver.acquire_time, -1.0))
    assert _read(RE, det.driver.acquire_time) == pytest.approx(0.01)
    with pytest.raises(Exception, match="(?i)limit"):  # beyond the soft limits: refused before moving
        RE(bps.mv(mx, 1e4))
    assert _read(RE, mx) == pytest.approx(0.3)


@pytest.mark.slow
def test_a_stock_ophyd_async_scan_is_stored_inferred_stitched_replayed_and_labelled(
        RE, ioc, stock_devices, tiled_client, storage_config, tmp_path):
    from edge_ptycho_bluesky.derived import find_derived_runs
    from edge_ptycho_bluesky.plans import spiral_ptycho_scan
    from edge_ptycho_bluesky.runs import read_scan
    from edge_ptycho_bluesky.training.labelling import label_run

    det, mx, my = stock_devices
    with edge_session(RE, ioc, tiled_client, storage_config, tmp_path, refine=True, refine_seconds=3.0) as session:
        assert session.relay is not None
        with watchdog(RE, seconds=240):
            (uid,) = RE(spiral_ptycho_scan([det], mx, my, step=0.05, num_points=60, geometry=GEOMETRY,
                                           probe=ioc.probe_path))
        run = tiled_client[uid]
        start = run.metadata["start"]["edge_ptycho"]
        assert start["labelled"] and start["overlap_ratio"] > 0.8 and start["exposure_s"] > 0
        scan = read_scan(run)  # every frame in Tiled, through the stock documents
        assert scan.frames.shape == (60, 128, 128) and scan.frames.sum() > 0
        hw = run["primary"]["SampleX"].read()  # the IOC's per-frame readbacks (NDAttributes)
        np.testing.assert_allclose(hw, run["primary"]["mx"].read(), atol=1e-3)

        result = session.wait_stored(uid, timeout=120)
        assert session.relay.counts["relayed"] >= 60, session.relay.counts
        assert len(result.frame_indices) == 60 and not result.missing, result.missing  # every frame inferred live
        assert result.derived_run_uid is not None
        assert result.refined is not None, result.refine_reason
        derived = find_derived_runs(tiled_client, uid, "edge_inference")[-1]
        assert derived["primary"]["phase_patch"].read().shape == (60, 128, 128)

        replayed = session.replay(uid)  # frames read back from the IOC's HDF5 file
        assert len(replayed.frame_indices) == 60 and replayed.derived_run_uid != result.derived_run_uid

        labelled, source = label_run(tiled_client, run, rpie_iterations=5)
        assert source == "rpie" and labelled.frames.shape[0] == 60 and np.isfinite(labelled.phases).all()


@pytest.mark.slow
def test_an_ophyd_async_fly_scan_at_500_hz_stores_and_infers_every_frame_at_its_measured_position(
        RE, ioc, stock_devices, tiled_client, storage_config, tmp_path):
    from edge_ptycho_bluesky.plans import spiral_ptycho_flyscan
    from edge_ptycho_bluesky.runs import read_scan

    det, mx, my = stock_devices
    with edge_session(RE, ioc, tiled_client, storage_config, tmp_path) as session:
        with watchdog(RE, seconds=240):
            (uid,) = RE(spiral_ptycho_flyscan(det, mx, my, step=0.05, num_points=300, rate=500.0,
                                              frames_per_point=2, geometry=GEOMETRY, probe=ioc.probe_path))
        run = tiled_client[uid]
        scan = read_scan(run)  # positions: the SampleX/SampleY the IOC recorded with each frame
        assert scan.frames.shape == (600, 128, 128)
        route = run.metadata["start"]["plan_pattern_args"]
        assert route["num_points"] == 300
        xy_um = scan.positions_m * 1e6
        assert np.isfinite(xy_um).all() and np.ptp(xy_um[:, 0]) > 0.5  # the stage moved along the spiral
        assert run.metadata["start"]["edge_ptycho"]["frame_rate_hz"] == 500.0
        result = session.wait_stored(uid, timeout=120)
        assert len(result.frame_indices) == 600 and not result.missing, (len(result.frame_indices), result.missing[:5])
        np.testing.assert_allclose(result.positions_um, xy_um[result.frame_indices], atol=1e-6)


@pytest.mark.slow
def test_ophyd_v1_areadetector_and_epics_motors_resource_datum_end_to_end(
        RE, ioc, tiled_client, storage_config, tmp_path):
    """ophyd v1's stock SimDetector (SimDetectorCam + HDF5 plugin: Resource/Datum) and EpicsMotor on the
    same IOC: stored, inferred live from its stream, stitched, replayed from its file, labelled."""
    from ophyd import Component, EpicsMotor
    from ophyd.areadetector import SimDetector, SingleTrigger
    from ophyd.areadetector.filestore_mixins import FileStoreHDF5IterativeWrite
    from ophyd.areadetector.plugins import HDF5Plugin
    from ophyd.signal import EpicsSignalBase

    from edge_ptycho_bluesky.plans import spiral_ptycho_scan
    from edge_ptycho_bluesky.runs import read_scan
    from edge_ptycho_bluesky.training.labelling import label_run

    EpicsSignalBase.set_defaults(connection_timeout=60.0, timeout=30.0)  # a loaded CI machine
    frames_dir = str(storage_config.frames_dir) + "/"

    class HDF5(HDF5Plugin, FileStoreHDF5IterativeWrite):
        pass

    class Detector(SingleTrigger, SimDetector):
        hdf1 = Component(HDF5, "HDF1:", write_path_template=frames_dir, read_path_template=frames_dir)

    det = Detector(ioc.prefix, name="v1det")
    det.hdf1.kind = "normal"
    det.cam.stage_sigs["num_images"] = 1  # as beamline profiles do: SingleTrigger takes NumImages frames a trigger
    mx, my = EpicsMotor(ioc.prefix + "m1", name="v1x"), EpicsMotor(ioc.prefix + "m2", name="v1y")
    for device in (det, mx, my):
        device.wait_for_connection(timeout=60)
    with edge_session(RE, ioc, tiled_client, storage_config, tmp_path) as session:
        # ophyd's SingleTrigger returns None from trigger() when the acquisition ends before trigger()
        # returns (it takes 5-50 ms here): an exposure well above that
        with watchdog(RE, seconds=240):
            (uid,) = RE(spiral_ptycho_scan([det], mx, my, step=0.05, num_points=60, exposure=0.2,
                                           geometry=GEOMETRY, probe=ioc.probe_path))
        run = tiled_client[uid]
        assert run.metadata["start"]["edge_ptycho"]["exposure_s"] == pytest.approx(0.2)
        scan = read_scan(run)
        assert scan.frames.shape == (60, 128, 128) and scan.frames.sum() > 0
        result = session.wait_stored(uid, timeout=120)
        assert len(result.frame_indices) == 60 and not result.missing, result.missing
        assert result.derived_run_uid is not None
        replayed = session.replay(uid)  # Resource/Datum: the forwarder reads the IOC's file
        assert len(replayed.frame_indices) == 60
        np.testing.assert_allclose(replayed.positions_um, result.positions_um, atol=2e-3)
        labelled, _ = label_run(tiled_client, run, rpie_iterations=3)
        assert labelled.frames.shape[0] == 60


@pytest.mark.slow
def test_an_ioc_that_dies_mid_scan_fails_the_plan_cleanly_and_the_relay_reconnects_when_it_returns(
        RE, ioc, stock_devices, tiled_client, storage_config, tmp_path):
    """The IOC is killed (SIGKILL) during a scan: the plan fails with the run closed, the frames the
    IOC wrote before dying are stored and readable; started again, its stream reaches the session's
    relay again (the devices reconnect as Channel Access clients do: seconds to a minute later).
    The module's IOC: the last test of the module (one simulated IOC on loopback at a time: a Channel
    Access search sent to 127.0.0.1 reaches only one of several servers there)."""
    import time

    from caproto.sync.client import write

    from edge_ptycho_bluesky.plans import spiral_ptycho_scan
    from edge_ptycho_bluesky.runs import read_scan

    det, mx, my = stock_devices
    dying, prefix, probe = ioc, ioc.prefix, ioc.probe_path
    events: list[str] = []

    def kill_after_20(name, doc):
        if name == "start":
            events.append(doc["uid"])
        elif name == "event" and len(events) == 21:
            threading.Thread(target=dying.kill, daemon=True).start()
        if name == "event":
            events.append(doc["uid"])

    killer = RE.subscribe(kill_after_20)
    back = None
    with edge_session(RE, ioc, tiled_client, storage_config, tmp_path) as session:
        try:
            with watchdog(RE, seconds=240), pytest.raises(Exception) as failure:
                RE(spiral_ptycho_scan([det], mx, my, step=0.05, num_points=60, geometry=GEOMETRY, probe=probe))
            RE.unsubscribe(killer)
            assert dying.proc.poll() is not None, f"the IOC was not killed; the plan failed otherwise: {failure.value}"
            run = tiled_client[events[0]]
            assert run.metadata["stop"]["exit_status"] == "fail"  # the run is closed
            scan = read_scan(run)  # what the IOC wrote before it died: stored and readable
            n = scan.frames.shape[0]
            assert 20 <= n < 60 and scan.frames.sum() > 0 and scan.positions_m.shape == (n, 2)

            assert not session.relay.connected
            back = IocProcess(prefix, ioc.args).start()  # the IOC returns, same records
            deadline = time.monotonic() + 60
            while not session.relay.connected and time.monotonic() < deadline:
                time.sleep(0.2)
            assert session.relay.connected, "the relay did not reconnect to the IOC's stream"
            between = session.relay.counts["between_runs"]  # 10 frames outside any run, started by hand
            for name, value in (("ImageMode", [1]), ("NumImages", [10]), ("AcquireTime", [0.01]), ("Acquire", [1])):
                write(prefix + "cam1:" + name, value, notify=True, timeout=30)
            deadline = time.monotonic() + 60
            while session.relay.counts["between_runs"] < between + 10 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert session.relay.counts["between_runs"] == between + 10, session.relay.counts  # the stream is back
        finally:
            if back is not None:
                back.stop()

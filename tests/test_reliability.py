"""Fault injection: a killed edge worker, pvAccess publisher restarts and uniqueId jumps, a Tiled
key refused mid-session, and the security rules (keys, no pickles, loopback only).

Real parts: RunEngine, simulated beamline, embedded Tiled (and its HTTP server), pvAccess on
loopback, the ``edge-ptycho worker`` process, ONNX Runtime.  The long load runs are benchmarks
(``docs/reliability.md``).
"""

from __future__ import annotations

import os
import re
import signal
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

pva = pytest.importorskip("pvaccess")
pytest.importorskip("onnxruntime")

import bluesky.plan_stubs as bps  # noqa: E402

from edge_ptycho_bluesky.edge.model_source import FileModelSource, engine_factory  # noqa: E402
from edge_ptycho_bluesky.edge.pva_clients import PatchSubscriber, PvaFrameSource, read_status  # noqa: E402
from edge_ptycho_bluesky.edge.pva_servers import FramePublisher, PvaPatchSink  # noqa: E402
from edge_ptycho_bluesky.callbacks.session import EdgeSession  # noqa: E402
from edge_ptycho_bluesky.edge.session import EdgeSessionConfig  # noqa: E402
from edge_ptycho_bluesky.edge.worker import EdgeWorker  # noqa: E402
from edge_ptycho_bluesky.edge.worker_config import WorkerConfig  # noqa: E402
from edge_ptycho_bluesky.plans import spiral_ptycho_scan  # noqa: E402
from edge_ptycho_bluesky.storage import (  # noqa: E402
    StorageConfig,
    TiledServer,
    connect,
    get_run,
    make_tiled_writer,
    upload_backups,
)
from edge_ptycho_bluesky.training.registry import ModelRegistry  # noqa: E402

from .conftest import tiny_onnx, wait_until as _wait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _names(prefix: str) -> tuple[str, str, str]:
    tag = uuid.uuid4().hex[:8]
    return tuple(f"{prefix}:{tag}:{k}" for k in ("frames", "phase", "status"))  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# 2. the edge worker is killed mid-scan


@pytest.mark.slow
def test_a_killed_worker_is_restarted_resumes_and_replay_completes_the_image(
        RE, beamline, tiled_client, storage_config, tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    registry.publish({"model.onnx": tiny_onnx(tmp_path / "x2.onnx", 2.0)}, model="tiny")
    inp, out, status = _names("crash")
    session = EdgeSession(RE, tiled_client, storage_config,
                          EdgeSessionConfig(registry=registry.root, input_pv=inp, output_pv=out, status_pv=status,
                                            engine="onnxruntime", refine=False), plot=False)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    steps = [0]
    killed: dict[str, int] = {}

    def worker_serving() -> bool:
        try:
            return read_status(status, timeout=0.5).get("received", 0) >= 1
        except Exception:
            return False

    def per_step(detectors, step, pos_cache, take_reading=None):
        i = steps[0]
        steps[0] += 1
        if i == 15:  # kill -9 the worker: the next frames have nobody to receive them
            killed["pid"] = session.worker.pid
            os.kill(killed["pid"], signal.SIGKILL)
        if i == 25:  # then wait for the supervisor's restart before the scan goes on
            deadline = time.monotonic() + 60
            while not (session.worker.restarts >= 1 and worker_serving()) and time.monotonic() < deadline:
                yield from bps.sleep(0.2)
            yield from bps.sleep(1.0)  # the patch subscriber's monitor reconnects
        yield from bps.one_nd_step(detectors, step, pos_cache, take_reading=take_reading)

    try:
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                       num_points=40, per_step=per_step))
        assert session.worker.restarts == 1 and session.worker.pid not in (None, killed["pid"])
        assert session.worker.exits[0]["returncode"] == -signal.SIGKILL
        live = session.stitch.results[uid]
        # the frames published while the worker was down are listed, in Tiled too; the rest arrived
        assert live.missing and set(live.missing) <= set(range(8, 25)), live.missing
        assert set(range(25, 40)) <= set(live.frame_indices.tolist())
        derived = get_run(tiled_client, live.derived_run_uid)
        assert derived.metadata["start"]["frames_missing"] == live.missing
        assert session.status()["worker_restarts"] == 1
        # replay re-infers the stored scan through the restarted worker: the image is complete
        replayed = session.replay(uid)
        assert replayed.missing == [] and replayed.frame_indices.tolist() == list(range(40))
        assert replayed.derived_run_uid != live.derived_run_uid
        frames = get_run(tiled_client, uid)["primary"]["ptycho_det_image"].read()
        np.testing.assert_allclose(replayed.patches, 2.0 * np.asarray(frames, np.float32), rtol=1e-5)
    finally:
        session.close()
    assert session.worker_stats.get("inferred", 0) >= 40   # the restarted worker's own count


@pytest.mark.slow
def test_a_worker_that_keeps_dying_is_not_restarted_forever(tmp_path, caplog):
    from edge_ptycho_bluesky.edge.process import WorkerChannels, WorkerProcess

    worker = WorkerProcess(model=tiny_onnx(tmp_path / "m.onnx", 1.0), channels=WorkerChannels(*_names("dying")),
                           extra_args=["--threads", "1"], supervise=True, max_restarts=1, restart_window=600)
    worker.start()
    try:
        first = worker.pid
        os.kill(first, signal.SIGKILL)
        assert _wait(lambda: worker.restarts == 1 and worker.pid not in (None, first), 60)
        os.kill(worker.pid, signal.SIGKILL)
        assert _wait(lambda: len(worker.exits) == 2, 10)
        time.sleep(1.0)
        assert worker.pid is None and worker.restarts == 1
        assert [e["restarted"] for e in worker.exits] == [True, False]
        assert "not restarting again" in caplog.text
    finally:
        worker.stop()


# ---------------------------------------------------------------------------------------------
# 3. pvAccess faults


def test_publisher_restart_disconnect_and_unique_id_jumps_are_detected_and_recovered(tmp_path, caplog):
    caplog.set_level("INFO")
    inp, out, status = _names("pvfault")
    publisher = FramePublisher(inp)
    patches = []
    source = PvaFrameSource(inp)
    worker = EdgeWorker(FileModelSource(tiny_onnx(tmp_path / "m.onnx", 1.0), engine_factory("onnxruntime", threads=1)),
                        source, PvaPatchSink(out, status), WorkerConfig(max_wait_ms=2.0)).start()
    subscriber = PatchSubscriber(out, patches.append).start()
    frame = np.full((128, 128), 3, np.uint16)
    try:
        assert subscriber.wait_ready(20) and _wait(lambda: worker.stats().received >= 1, 20)
        for i in range(1, 11):
            publisher.publish(frame, i, pos=(float(i), 0.0), scan_uid="a")
        assert _wait(lambda: len(patches) == 10, 20)

        publisher.close()  # the detector's IOC stops: the channel disconnects
        assert _wait(lambda: not worker.stats().input_connected, 30)
        assert _wait(lambda: worker.stats().transport.get("disconnects") == 1, 5)  # counted while running
        publisher = FramePublisher(inp)  # ... and comes back, counting from 1 again
        # the monitor is live again once the new record's (empty) initial value arrived
        assert _wait(lambda: worker.stats().input_connected and worker.stats().dropped.get("empty", 0) >= 2, 30)
        for i in range(1, 11):
            publisher.publish(frame, i, pos=(float(i), 1.0), scan_uid="b")
            time.sleep(0.002)
        for i in (11, 12, 20):  # 13..19 are lost upstream
            publisher.publish(frame, i, pos=(float(i), 1.0), scan_uid="b")
        assert _wait(lambda: len(patches) == 23, 20), str([(p.scan_uid, p.unique_id) for p in patches])
    finally:
        stats = worker.stop()
        subscriber.stop()
        publisher.close()
    assert (source.disconnects, source.connects) == (1, 2)
    assert stats.id_resets == 1                      # the restart is a new acquisition, not a gap
    assert stats.dropped.get("gap") == 7             # the jump is counted frame by frame
    assert stats.inferred == 23
    assert [p.unique_id for p in patches if p.scan_uid == "b"] == [*range(1, 13), 20]
    log = caplog.text
    assert "disconnected" in log and "reconnected" in log
    assert "uniqueId went from 10 back to 1" in log and "7 frame(s) missing before uniqueId=20" in log


# ---------------------------------------------------------------------------------------------
# 4. Tiled faults (the server stopping mid-session is in test_storage.py)


@pytest.mark.slow
def test_a_key_revoked_mid_session_keeps_the_run_engine_running_and_the_run_backed_up(RE, beamline, tmp_path,
                                                                                        caplog):
    config = StorageConfig(data_dir=tmp_path)
    beamline.det.write_dir = config.frames_dir
    with TiledServer(tmp_path) as server:
        client = connect(server.config(tmp_path))
        RE.subscribe(make_tiled_writer(client, config))
        (first,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                         num_points=5))
        client.context.api_key = "revoked-" + "0" * 24   # what the server now refuses
        (second,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05,
                                          num_points=5))
        assert RE.state == "idle"
        backups = list(config.backup_dir.glob("*.jsonl"))
        assert backups and second in backups[0].read_text()
        assert server.api_key not in caplog.text

        client.context.api_key = server.api_key
        assert upload_backups(client, config) == [second]
        for uid in (first, second):
            assert get_run(client, uid)["primary"]["ptycho_det_image"].read().shape == (5, 128, 128)


# ---------------------------------------------------------------------------------------------
# 7. security


@pytest.mark.slow
def test_the_tiled_server_refuses_requests_without_the_key_and_network_use_without_a_chosen_key(tmp_path):
    import httpx

    with pytest.raises(ValueError, match="api_key of at least 16 characters"):
        TiledServer(tmp_path, host="0.0.0.0")
    with pytest.raises(ValueError, match="api_key of at least 16 characters"):
        TiledServer(tmp_path, host="10.1.2.3", api_key="short")
    with TiledServer(tmp_path) as server:
        base = server.uri.rstrip("/").removesuffix("/api/v1")
        assert base.startswith("http://127.0.0.1:")
        anonymous = httpx.get(f"{base}/api/v1/metadata/")
        assert anonymous.status_code == 401
        write = httpx.post(f"{base}/api/v1/metadata/", json={"structure_family": "container", "metadata": {},
                                                             "specs": []})
        assert write.status_code == 401
        with_key = httpx.get(f"{base}/api/v1/metadata/", headers={"Authorization": f"Apikey {server.api_key}"})
        assert with_key.status_code == 200


@pytest.mark.slow
def test_no_secret_is_logged(RE, beamline, tmp_path, caplog):
    caplog.set_level("DEBUG")
    secret = uuid.uuid4().hex  # Tiled wants a hex key
    config = StorageConfig(data_dir=tmp_path)
    beamline.det.write_dir = config.frames_dir
    with TiledServer(tmp_path, api_key=secret) as server:
        cfg = server.config(tmp_path)
        client = connect(cfg)
        RE.subscribe(make_tiled_writer(client, config))
        RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=3))
        with pytest.raises(Exception) as refused:
            connect(StorageConfig(data_dir=tmp_path, uri=server.uri, api_key=secret + "x"))
    assert secret not in caplog.text
    assert secret not in repr(cfg) and secret not in str(refused.value)


_UNSAFE_LOADS = [
    (re.compile(r"\bpickle\.loads?\("), "pickle.load"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load(allow_pickle=True)"),
    (re.compile(r"\bcloudpickle\.loads?\("), "cloudpickle.load"),
]


def test_no_pickle_is_loaded_from_the_registry_or_tiled():
    """No module unpickles files, and every ``torch.load`` passes ``weights_only=True``."""
    offenders = []
    for path in [*ROOT.glob("edge_ptycho_bluesky/**/*.py"), *ROOT.glob("callbacks/*.py"),
                 *ROOT.glob("plans/*.py")]:
        text = path.read_text()
        for pattern, what in _UNSAFE_LOADS:
            if pattern.search(text):
                offenders.append(f"{path.relative_to(ROOT)}: {what}")
        for call in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in call.group(1):
                offenders.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_a_pickled_payload_in_the_registry_is_never_executed(tmp_path):
    """A model.pt that would run code when unpickled is refused, and the code does not run."""
    import pickle

    from edge_ptycho_bluesky.model.errors import InvalidModelError
    from edge_ptycho_bluesky.model.ptychonn import load_model

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "model.pt"
    evil.write_bytes(pickle.dumps({"weight": Payload()}))
    with pytest.raises(InvalidModelError, match="cannot read weights"):
        load_model(evil)
    assert not marker.exists()


def _listening_sockets() -> list[tuple[str, str]]:
    """(protocol, local address hex) of this process's listening TCP sockets."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    found = []
    for proto in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{proto}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # LISTEN
                found.append((proto, fields[1].split(":")[0]))
    return found


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
@pytest.mark.slow
def test_servers_listen_on_loopback_only(tmp_path):
    inp, out, status = _names("bind")
    with TiledServer(tmp_path), FramePublisher(inp):
        sink = PvaPatchSink(out, status)
        sink.start()
        try:
            sockets = _listening_sockets()
        finally:
            sink.stop()
    assert sockets
    loopback = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1
    assert all(addr in loopback for _, addr in sockets), sockets

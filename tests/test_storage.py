"""Scans into the embedded Tiled and back: Tiled client, databroker, replay, failures."""

from __future__ import annotations

from collections import Counter

import h5py
import numpy as np
import pytest

from edge_ptycho_bluesky.devices import FRAME_DATASET
from edge_ptycho_bluesky.plans import spiral_ptycho_scan
from edge_ptycho_bluesky.storage import StorageConfig, StorageError, TiledServer, connect, get_run, \
    make_tiled_writer, replay, tiled_retries, upload_backups


def scan(beamline, n=12, step=0.05):
    return spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=step, num_points=n)


def test_round_trip_through_tiled_and_databroker(RE, docs, beamline, tiled_client, storage_config):
    RE.subscribe(docs.cb)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(scan(beamline))
    with h5py.File(beamline.det.file_path, "r") as f:
        written = f[FRAME_DATASET][:]
    x = np.array([e["data"]["stage_x"] for e in docs["event"]])
    y = np.array([e["data"]["stage_y"] for e in docs["event"]])

    run = get_run(tiled_client, uid)
    frames = run["primary"]["ptycho_det_image"].read()
    assert frames.shape == (12, 128, 128) and frames.dtype == np.uint32
    np.testing.assert_array_equal(frames, written)
    np.testing.assert_array_equal(run["primary"]["stage_x"].read(), x)
    np.testing.assert_array_equal(run["primary"]["stage_y"].read(), y)
    assert run.metadata["start"]["edge_ptycho"] == docs["start"][0]["edge_ptycho"]
    assert run.metadata["stop"]["exit_status"] == "success"

    from databroker.v1 import Broker
    header = Broker(tiled_client)[uid]
    np.testing.assert_array_equal(np.stack(list(header.data("ptycho_det_image", fill=True))), written)
    np.testing.assert_array_equal(header.table()["stage_x"].to_numpy(), x)


def test_replay_drives_a_callback_with_the_same_documents(RE, docs, beamline, tiled_client, storage_config):
    RE.subscribe(docs.cb)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(scan(beamline, n=9))
    replayed: dict[str, list] = {}
    count = replay(get_run(tiled_client, uid), lambda name, doc: replayed.setdefault(name, []).append(doc))
    assert count == sum(len(v) for v in replayed.values())
    for key in ("uid", "plan_name", "edge_ptycho", "num_points"):
        assert replayed["start"][0][key] == docs["start"][0][key]
    assert replayed["stop"][0]["uid"] == docs["stop"][0]["uid"]
    assert replayed["descriptor"][0]["uid"] == docs["descriptor"][0]["uid"]
    assert replayed["descriptor"][0]["data_keys"]["ptycho_det_image"]["dtype_numpy"] == "<u4"
    events = [e for page in replayed.get("event_page", []) for e in _unpack(page)] + replayed.get("event", [])
    assert [e["data"]["stage_x"] for e in events] == [e["data"]["stage_x"] for e in docs["event"]]
    # Stream datums may be consolidated, but they cover the same frames of the same resource.
    covered = sorted(i for d in replayed["stream_datum"] for i in range(d["indices"]["start"], d["indices"]["stop"]))
    assert covered == list(range(9))
    assert replayed["stream_resource"][0]["uri"] == docs["stream_resource"][0]["uri"]


def _unpack(page):
    from event_model import unpack_event_page
    return unpack_event_page(page)


def test_unreachable_server_gives_a_clear_error(tmp_path):
    # One retry within 1 s instead of Tiled's default ~25-45 s of retrying: the error is the same.
    with tiled_retries(attempts=2, timeout_s=1.0), \
            pytest.raises(StorageError, match="cannot use the Tiled server at http://127.0.0.1:9"):
        connect(StorageConfig(data_dir=tmp_path, uri="http://127.0.0.1:9", api_key="secret-key"))


@pytest.mark.slow
def test_wrong_api_key_gives_a_clear_error(tmp_path):
    with TiledServer(tmp_path) as server:
        with pytest.raises(StorageError) as info:
            connect(StorageConfig(data_dir=tmp_path, uri=server.uri, api_key="wrong"))
        assert server.api_key not in str(info.value)


def test_detector_failing_mid_scan_keeps_what_was_stored(RE, docs, beamline, tiled_client, storage_config,
                                                        monkeypatch):
    RE.subscribe(docs.cb)
    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    real_measure = beamline.sample.measure
    calls = Counter()

    def failing_measure(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError("detector lost its link")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(beamline.sample, "measure", failing_measure)
    with pytest.raises(OSError, match="lost its link"):
        RE(scan(beamline, n=12))
    uid = docs["start"][0]["uid"]
    run = get_run(tiled_client, uid)
    assert run.metadata["stop"]["exit_status"] == "fail"
    frames = run["primary"]["ptycho_det_image"].read()
    assert frames.shape[0] == 5
    with h5py.File(beamline.det.file_path, "r") as f:
        np.testing.assert_array_equal(frames, f[FRAME_DATASET][:5])


@pytest.mark.slow
def test_server_down_mid_session_backs_the_run_up_and_uploads_it_later(RE, beamline, tmp_path):
    config = StorageConfig(data_dir=tmp_path)
    beamline.det.write_dir = config.frames_dir
    server = TiledServer(tmp_path)
    client = connect(server.config(tmp_path))
    RE.subscribe(make_tiled_writer(client, config))
    (first,) = RE(scan(beamline, n=6))
    server.stop()
    # Writes to the stopped server fail after one retry instead of Tiled's ~25-45 s of retrying.
    with tiled_retries(attempts=2, timeout_s=1.0):
        (second,) = RE(scan(beamline, n=6))  # the RunEngine keeps running; Tiled is gone
    assert [p.name for p in config.backup_dir.glob("*.jsonl")], "the failed run was not backed up"

    with TiledServer(tmp_path) as again:
        client = connect(again.config(tmp_path))
        assert get_run(client, first)["primary"]["ptycho_det_image"].read().shape == (6, 128, 128)
        assert upload_backups(client, config) == [second]
        assert get_run(client, second)["primary"]["ptycho_det_image"].read().shape == (6, 128, 128)
        assert not list(config.backup_dir.glob("*.jsonl"))


@pytest.mark.slow
def test_a_tiled_profile_names_the_facility_server(RE, beamline, tmp_path, monkeypatch):
    """EDGE_PTYCHO_TILED_PROFILE: the client comes from a Tiled profile file, as a facility ships it."""
    import tiled.profiles

    from edge_ptycho_bluesky.storage import make_tiled_writer

    beamline.det.write_dir = StorageConfig(data_dir=tmp_path).frames_dir
    with TiledServer(tmp_path) as server:
        profiles = tmp_path / "profiles"
        profiles.mkdir()
        (profiles / "facility.yml").write_text(f"facility:\n  uri: {server.uri}\n")  # keys are not kept in profiles
        monkeypatch.setattr(tiled.profiles, "paths", [*tiled.profiles.paths, profiles])
        tiled.profiles.load_profiles.cache_clear()
        monkeypatch.setenv("EDGE_PTYCHO_TILED_PROFILE", "facility")
        monkeypatch.delenv("EDGE_PTYCHO_TILED_URI", raising=False)
        monkeypatch.setenv("EDGE_PTYCHO_TILED_API_KEY", server.api_key)
        config = StorageConfig.from_env()
        assert config.profile == "facility" and config.uri is None
        client = connect(config)
        RE.subscribe(make_tiled_writer(client, StorageConfig(data_dir=tmp_path)))
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=4))
        assert get_run(client, uid)["primary"]["ptycho_det_image"].read().shape == (4, 128, 128)
        with pytest.raises(StorageError, match="tiled profile list"):
            connect(StorageConfig(profile="no-such-profile"))
    tiled.profiles.load_profiles.cache_clear()
    with pytest.raises(ValueError, match="not both"):
        StorageConfig(uri="http://x", profile="facility")


@pytest.mark.slow
def test_a_separate_tiled_server_set_up_like_a_facility_stores_the_scan(RE, beamline, tmp_path):
    """`tiled serve config` in its own process, as a facility runs it: its own catalog, writable
    storage for arrays and for tables (the events), the beamline's frame directory as readable
    storage, an API key. The session's writer
    registers the detector's files there, the frames read back, and a wrong key is refused."""
    import secrets
    import socket
    import subprocess
    import sys
    import time

    from edge_ptycho_bluesky.runs import read_scan
    from edge_ptycho_bluesky.storage import make_tiled_writer

    beamline_storage = StorageConfig(data_dir=tmp_path / "beamline")  # the acquisition side
    beamline_storage.frames_dir.mkdir(parents=True)
    beamline.det.write_dir = beamline_storage.frames_dir
    server_dir = tmp_path / "server"
    (server_dir / "data").mkdir(parents=True)
    key = secrets.token_hex(16)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    (server_dir / "config.yml").write_text(
        f"authentication:\n  single_user_api_key: \"{key}\"\n"
        "trees:\n  - path: /\n    tree: catalog\n    args:\n"
        f"      uri: \"sqlite:///{server_dir / 'catalog.db'}\"\n"
        f"      writable_storage:\n        - \"{server_dir / 'data'}\"\n"
        f"        - \"sqlite:///{server_dir / 'tabular.db'}\"\n"
        f"      readable_storage:\n        - \"{beamline_storage.frames_dir}\"\n"
        "      init_if_not_exists: true\n")
    log = open(tmp_path / "tiled.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "tiled", "serve", "config", str(server_dir / "config.yml"),
                             "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        facility = StorageConfig(data_dir=tmp_path / "beamline", uri=f"http://127.0.0.1:{port}/api", api_key=key)
        deadline = time.monotonic() + 60
        while True:
            try:
                client = connect(facility)
                break
            except StorageError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        RE.subscribe(make_tiled_writer(client, facility))
        (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=6))
        scan = read_scan(get_run(client, uid))  # the server reads the detector's file from readable storage
        assert scan.frames.shape == (6, 128, 128) and scan.frames.sum() > 0
        assert not list(facility.backup_dir.glob("*.jsonl"))  # nothing fell back to a local backup
        with pytest.raises(StorageError):
            connect(StorageConfig(data_dir=tmp_path / "other", uri=facility.uri, api_key="wrong-key"))
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()

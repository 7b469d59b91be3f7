"""NTNDArray codec and the edge transports: in-process, and real pvAccess on loopback."""

from __future__ import annotations

import threading
import uuid
from typing import Any

import numpy as np
import pytest

pva = pytest.importorskip("pvaccess")

from edge_ptycho_bluesky.edge.ntnda import (  # noqa: E402
    Frame,
    FrameDecodeError,
    Patch,
    decode_frame,
    decode_patch,
    empty_ntndarray,
    encode_frame,
    encode_patch,
)
from edge_ptycho_bluesky.edge.inprocess import InProcessFrameSource, InProcessPatchSink  # noqa: E402
from edge_ptycho_bluesky.edge.pva_clients import PatchSubscriber, PvaFrameSource, read_status  # noqa: E402
from edge_ptycho_bluesky.edge.pva_servers import FramePublisher, PvaPatchSink  # noqa: E402
from edge_ptycho_bluesky.edge.transport import LOOPBACK_ENV, embedded_worker_env, loopback_env  # noqa: E402

from .conftest import wait_until as _wait  # noqa: E402


def _name(kind: str) -> str:
    """A channel name no other test (or developer on this machine) uses."""
    return f"test:{uuid.uuid4().hex[:10]}:{kind}"


class Collector:
    """A FrameHandler that records what a source delivers."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.rejects: list[tuple[str, str, int | None]] = []
        self.lock = threading.Lock()

    def on_frame(self, frame: Frame) -> None:
        with self.lock:
            self.frames.append(frame)

    def on_reject(self, reason: str, detail: str, unique_id: int | None) -> None:
        with self.lock:
            self.rejects.append((reason, detail, unique_id))


# -- loopback ---------------------------------------------------------------------------------


def test_a_session_keeps_the_beamlines_address_list_and_adds_loopback() -> None:
    beamline = {"EPICS_PVA_ADDR_LIST": "10.0.0.5 10.0.0.255", "EPICS_PVA_AUTO_ADDR_LIST": "YES"}
    changed = embedded_worker_env(beamline)
    assert beamline["EPICS_PVA_ADDR_LIST"] == "10.0.0.5 10.0.0.255 127.0.0.1"
    assert beamline["EPICS_PVA_AUTO_ADDR_LIST"] == "YES"          # broadcast discovery still on
    assert beamline["EPICS_PVAS_INTF_ADDR_LIST"] == "127.0.0.1"   # its own servers: loopback only
    assert set(changed) == {"EPICS_PVA_ADDR_LIST", "EPICS_PVAS_INTF_ADDR_LIST"}
    assert embedded_worker_env(beamline) == {}                    # idempotent
    alone: dict[str, str] = {}
    assert embedded_worker_env(alone) == LOOPBACK_ENV and alone == LOOPBACK_ENV


def test_loopback_env_sets_the_epics_variables() -> None:
    env: dict[str, str] = {"EPICS_PVA_ADDR_LIST": "10.0.0.255", "OTHER": "kept"}
    returned = loopback_env(env)
    assert env["EPICS_PVA_ADDR_LIST"] == "127.0.0.1"
    assert env["EPICS_PVA_AUTO_ADDR_LIST"] == "NO"
    assert env["EPICS_PVAS_INTF_ADDR_LIST"] == "127.0.0.1"
    assert env["OTHER"] == "kept"
    assert returned == LOOPBACK_ENV
    assert "EPICS_PVA_SERVER_PORT" not in env and "EPICS_PVA_BROADCAST_PORT" not in env


# -- codec ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "float32"])
def test_frame_round_trip(dtype: str) -> None:
    rng = np.random.default_rng(0)
    data = (rng.integers(0, 60000, (64, 128)) if dtype != "float32"
            else rng.normal(size=(64, 128))).astype(dtype)
    nt = encode_frame(data, 42, pos=(12.5, -3.25), scan_uid="run-1",
                      attributes={"pos_units": "px", "frame_index": 7, "exposure": 5e-4},
                      timestamp=1_700_000_000.25)
    frame = decode_frame(nt)
    assert frame.unique_id == 42
    assert frame.data.dtype == np.dtype(dtype)
    assert frame.data.shape == (64, 128)  # rows, cols: dimension[0] is x (columns)
    np.testing.assert_array_equal(frame.data, data)
    assert frame.pos == (12.5, -3.25)
    assert frame.scan_uid == "run-1"
    assert frame.t_in == pytest.approx(1_700_000_000.25, abs=1e-6)
    assert frame.attributes == {"pos_units": "px", "frame_index": 7, "exposure": 5e-4}


def test_frame_without_attributes_decodes_with_no_position() -> None:
    frame = decode_frame(encode_frame(np.zeros((128, 128), np.uint16), 1))
    assert frame.pos is None and frame.scan_uid is None and frame.attributes == {}


def _nt_with(dims: list[int], values: np.ndarray, codec: str = "") -> Any:
    nt = pva.NtNdArray()
    nt["uniqueId"] = 5
    nt["dimension"] = [pva.PvDimension(d, 0, d, 1, False) for d in dims]
    nt["value"] = {"ushortValue": values}
    if codec:
        nt["codec"] = pva.PvCodec(codec, pva.PvInt(int(pva.USHORT)))
    return nt


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: empty_ntndarray(), "empty"),
        (lambda: _nt_with([4, 4, 4], np.zeros(64, np.uint16)), "bad_shape"),
        (lambda: _nt_with([128], np.zeros(128, np.uint16)), "bad_shape"),
        (lambda: _nt_with([128, 128], np.zeros(100, np.uint16)), "bad_shape"),
        (lambda: _nt_with([8, 8], np.zeros(64, np.uint16), codec="lz4"), "compressed"),
    ],
    ids=["empty", "3d", "1d", "size-mismatch", "compressed"],
)
def test_decode_refuses_malformed_updates(make: Any, reason: str) -> None:
    with pytest.raises(FrameDecodeError) as info:
        decode_frame(make())
    assert info.value.reason == reason


def test_encode_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2-D"):
        encode_frame(np.zeros((2, 8, 8), np.uint16), 1)
    with pytest.raises(TypeError, match="dtype"):
        encode_frame(np.zeros((8, 8), np.complex64), 1)
    with pytest.raises(ValueError, match="reserved"):
        encode_frame(np.zeros((8, 8), np.uint16), 1, attributes={"pos_x": 1.0})
    with pytest.raises(ValueError, match="pair"):
        encode_frame(np.zeros((8, 8), np.uint16), 1, pos=(1.0, 2.0, 3.0))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="attribute 'bad'"):
        encode_frame(np.zeros((8, 8), np.uint16), 1, attributes={"bad": [1, 2]})  # type: ignore[dict-item]


def test_patch_round_trip() -> None:
    phase = np.random.default_rng(1).uniform(-np.pi, np.pi, (128, 128)).astype(np.float32)
    patch = Patch(9, phase, (3.0, 4.0), "scan-9", "v0007", 1_700_000_001.5, {"frame_index": 9})
    back = decode_patch(encode_patch(patch))
    np.testing.assert_array_equal(back.phase, phase)
    assert back.phase.dtype == np.float32
    assert (back.unique_id, back.pos, back.scan_uid, back.model_version) == (9, (3.0, 4.0),
                                                                             "scan-9", "v0007")
    assert back.t_in == pytest.approx(1_700_000_001.5, abs=1e-6)
    assert back.attributes == {"frame_index": 9}
    with pytest.raises(FrameDecodeError) as info:
        decode_patch(encode_frame(np.zeros((128, 128), np.uint16), 1))
    assert info.value.reason == "bad_dtype"


# -- in-process transport ---------------------------------------------------------------------


def test_in_process_source_delivers_in_order_on_its_own_thread() -> None:
    src = InProcessFrameSource()
    got = Collector()
    threads: set[int] = set()

    class Handler(Collector):
        def on_frame(self, frame: Frame) -> None:
            threads.add(threading.get_ident())
            got.on_frame(frame)

        def on_reject(self, reason: str, detail: str, unique_id: int | None) -> None:
            got.on_reject(reason, detail, unique_id)

    for i in range(1, 21):
        src.publish(np.full((128, 128), i, np.uint16), i, pos=(i, 0.0), scan_uid="s")
    src.publish_reject("empty", "initial", 0)
    src.start(Handler())
    assert src.wait_delivered(5.0)
    src.stop()
    assert [f.unique_id for f in got.frames] == list(range(1, 21))
    assert all(int(f.data[0, 0]) == f.unique_id for f in got.frames)
    assert got.rejects == [("empty", "initial", 0)]
    assert threading.get_ident() not in threads
    assert src.stats() == {"published": 21, "delivered": 21}


def test_in_process_sink_collects_and_forwards() -> None:
    forwarded: list[int] = []
    sink = InProcessPatchSink(on_patch=lambda p: forwarded.append(p.unique_id))
    phase = np.zeros((128, 128), np.float32)
    for i in range(3):
        sink.publish(Patch(i, phase, None, "", "v", 0.0))
    sink.publish_status({"inferred": 3})
    assert sink.wait_for(3, 1.0) and not sink.wait_for(4, 0.05)
    assert forwarded == [0, 1, 2] and sink.count == 3
    assert sink.statuses == [{"inferred": 3}]


# -- pvAccess on loopback ---------------------------------------------------------------------


def test_pva_frames_arrive_complete_and_in_order() -> None:
    channel = _name("frames")
    got = Collector()
    with FramePublisher(channel) as pub:
        src = PvaFrameSource(channel, server_queue_size=1000)
        src.start(got)
        try:
            # the first update of a fresh record is its empty initial value
            assert _wait(lambda: len(got.rejects) >= 1), "monitor never connected"
            assert got.rejects[0][0] == "empty"
            assert src.connected
            rng = np.random.default_rng(2)
            frames = rng.integers(0, 1000, (300, 128, 128)).astype(np.uint16)
            for i, frame in enumerate(frames, start=1):  # as fast as one thread can publish
                pub.publish(frame, i, pos=(float(i), 2.0 * i), scan_uid="scan-A",
                            attributes={"frame_index": i - 1})
            assert _wait(lambda: len(got.frames) >= 300), f"only {len(got.frames)} of 300"
        finally:
            src.stop()
    ids = [f.unique_id for f in got.frames]
    assert ids == list(range(1, 301))
    for f in got.frames[::37]:
        np.testing.assert_array_equal(f.data, frames[f.unique_id - 1])
        assert f.pos == (float(f.unique_id), 2.0 * f.unique_id)
        assert f.scan_uid == "scan-A" and f.attributes == {"frame_index": f.unique_id - 1}
        assert f.t_in > 0
    assert pub.published == 300
    assert src.stats() == {}  # released after stop


def test_pva_malformed_updates_are_reported_not_raised() -> None:
    channel = _name("frames")
    got = Collector()
    with FramePublisher(channel) as pub:
        src = PvaFrameSource(channel)
        src.start(got)
        try:
            assert _wait(lambda: len(got.rejects) >= 1)
            pub.publish_raw(_nt_with([128, 128], np.zeros(100, np.uint16)))
            pub.publish(np.ones((128, 128), np.uint16), 6, pos=(0.0, 0.0), scan_uid="s")
            assert _wait(lambda: len(got.frames) >= 1)
        finally:
            src.stop()
    assert [r[0] for r in got.rejects] == ["empty", "bad_shape"]
    assert got.rejects[1][2] == 5
    assert got.frames[0].unique_id == 6


def test_pva_patches_and_status_reach_clients() -> None:
    out, status = _name("phase"), _name("status")
    sink = PvaPatchSink(out, status)
    sink.start()
    received: list[Patch] = []
    sub = PatchSubscriber(out, received.append)
    try:
        sub.start()
        assert sub.wait_ready(10.0)
        phase = np.arange(128 * 128, dtype=np.float32).reshape(128, 128)
        ids = [i for i in range(1, 61) if i != 30]  # one id missing: a gap of one
        for i in ids:
            sink.publish(Patch(i, phase + i, (i, -i), "scan-B", "v0001", 100.0 + i))
        sink.publish_status({"received": 60, "inferred": 59, "dropped": {"nan": 1},
                             "dropped_total": 1, "model_version": "v0001", "fps": 12.5,
                             "input_connected": True, "e2e_p50_ms": float("nan")})
        assert _wait(lambda: len(received) >= len(ids))
        st = read_status(status)
    finally:
        sub.stop()
        sink.stop()
    assert [p.unique_id for p in received] == ids
    assert sub.received == len(ids) and sub.gaps == 1 and sub.errors == 0
    p = received[10]
    np.testing.assert_array_equal(p.phase, phase + p.unique_id)
    assert (p.pos, p.scan_uid, p.model_version) == ((p.unique_id, -p.unique_id), "scan-B",
                                                    "v0001")
    assert p.t_in == pytest.approx(100.0 + p.unique_id)
    assert st["inferred"] == 59 and st["dropped"] == {"nan": 1}
    assert st["model_version"] == "v0001"


def test_patch_subscriber_isolates_callback_errors() -> None:
    out = _name("phase")
    sink = PvaPatchSink(out)
    sink.start()
    seen: list[int] = []

    def callback(p: Patch) -> None:
        seen.append(p.unique_id)
        if p.unique_id == 2:
            raise RuntimeError("boom")

    sub = PatchSubscriber([out], callback)
    try:
        sub.start()
        assert sub.wait_ready(10.0)
        for i in (1, 2, 3):
            sink.publish(Patch(i, np.zeros((128, 128), np.float32), None, "", "v", 0.0))
        assert _wait(lambda: len(seen) >= 3)
    finally:
        sub.stop()
        sink.stop()
    assert seen == [1, 2, 3] and sub.errors == 1


def test_patch_subscriber_needs_a_channel() -> None:
    with pytest.raises(ValueError, match="at least one channel"):
        PatchSubscriber([], lambda p: None)


def test_pva_source_skips_decoding_while_the_handler_is_saturated() -> None:
    """An overloaded handler gets ``on_overflow(uniqueId)`` instead of a decoded frame."""

    class Saturable(Collector):
        def __init__(self) -> None:
            super().__init__()
            self.full = False
            self.overflow: list[int] = []

        def saturated(self) -> bool:
            return self.full

        def on_overflow(self, unique_id: int) -> None:
            self.overflow.append(unique_id)

    handler = Saturable()
    source = PvaFrameSource(_name("frames"))
    source._handler, source._active = handler, True  # drive the monitor callback directly
    frame = np.ones((128, 128), np.uint16)
    source._on_update(encode_frame(frame, 1, pos=(0.0, 0.0)))
    handler.full = True
    source._on_update(encode_frame(frame, 2, pos=(0.0, 0.0)))
    source._on_update(encode_frame(frame, 3))
    handler.full = False
    source._on_update(encode_frame(frame, 4, pos=(0.0, 0.0)))
    assert [f.unique_id for f in handler.frames] == [1, 4]
    assert handler.overflow == [2, 3] and handler.rejects == []

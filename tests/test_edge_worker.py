"""The edge worker: batching, accounting of every frame, bad input, hot swap, pvAccess, pvapy hpc.

Models are tiny real ONNX graphs (``phase = scale * frame``) run in real ONNX Runtime, so each
patch shows which model produced it: ``phase / frame`` is the model's scale.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pva = pytest.importorskip("pvaccess")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edge_ptycho_bluesky.edge.inprocess import InProcessFrameSource, InProcessPatchSink  # noqa: E402
from edge_ptycho_bluesky.edge.model_source import (  # noqa: E402
    Engine,
    FileModelSource,
    ModelRefused,
    RegistryModelSource,
    engine_factory,
)
from edge_ptycho_bluesky.edge.ntnda import Frame, Patch, encode_frame  # noqa: E402
from edge_ptycho_bluesky.edge.pva_clients import PatchSubscriber, PvaFrameSource, read_status  # noqa: E402
from edge_ptycho_bluesky.edge.pva_servers import FramePublisher, PvaPatchSink  # noqa: E402
from edge_ptycho_bluesky.edge.transport import loopback_env  # noqa: E402
from edge_ptycho_bluesky.edge.worker import EdgeWorker  # noqa: E402
from edge_ptycho_bluesky.edge.worker_config import WorkerConfig  # noqa: E402
from edge_ptycho_bluesky.training.registry import ModelRegistry  # noqa: E402

from .conftest import wait_until as _wait  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ORT = engine_factory("onnxruntime", threads=1)


def make_onnx(path: Path, scale: float) -> Path:
    """A dynamic-batch ONNX model ``(N, 1, 128, 128) -> scale * input``."""
    x = helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["N", 1, 128, 128])
    y = helper.make_tensor_value_info("phase", TensorProto.FLOAT, ["N", 1, 128, 128])
    k = numpy_helper.from_array(np.array(scale, dtype=np.float32), "scale")
    graph = helper.make_graph([helper.make_node("Mul", ["frames", "scale"], ["phase"])],
                              "tiny", [x], [y], initializer=[k])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.fixture
def model2(tmp_path: Path) -> Path:
    return make_onnx(tmp_path / "times2.onnx", 2.0)


def frames_u16(n: int, seed: int = 0, shape: tuple[int, int] = (128, 128)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 200, (n, *shape)).astype(np.uint16)


def _name(kind: str) -> str:
    return f"test:{uuid.uuid4().hex[:10]}:{kind}"


def accounted(stats: Any) -> int:
    """Frames the worker accounts for, not counting ids it never received."""
    return stats.inferred + stats.dropped_total - stats.gaps


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    loopback_env(env)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


class SlowEngine:
    """Wraps a real engine and sleeps per batch: inference slower than the frame rate."""

    def __init__(self, inner: Engine, seconds: float) -> None:
        self.inner, self.seconds, self.name = inner, seconds, f"slow-{inner.name}"

    def infer(self, frames: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return self.inner.infer(frames)


# -- in-process: batching and accounting ------------------------------------------------------


def test_every_frame_inferred_with_its_metadata(model2: Path) -> None:
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(FileModelSource(model2, ORT), src, sink,
                        WorkerConfig(batch_size=8, max_wait_ms=2.0))
    worker.start()
    frames = frames_u16(30)
    big = frames_u16(5, seed=1, shape=(512, 512))  # binned 4 x 4 (sum) by the preprocessing
    for i, f in enumerate(frames, start=1):
        src.publish(f, i, pos=(float(i), 0.5 * i), scan_uid="scan-1",
                    attributes={"frame_index": i - 1})
    for j, f in enumerate(big, start=31):
        src.publish(f, j, pos=(0.0, 0.0), scan_uid="scan-1")
    assert sink.wait_for(35, 20.0)
    stats = worker.stop()
    patches = {p.unique_id: p for p in sink.patches}
    assert sorted(patches) == list(range(1, 36))
    for i, f in enumerate(frames, start=1):
        p = patches[i]
        np.testing.assert_allclose(p.phase, 2.0 * f.astype(np.float32))
        assert p.phase.dtype == np.float32 and p.phase.shape == (128, 128)
        assert p.pos == (float(i), 0.5 * i) and p.scan_uid == "scan-1"
        assert p.attributes == {"frame_index": i - 1}
        assert p.model_version.startswith("times2@") and p.t_in > 0
    binned = big.reshape(5, 128, 4, 128, 4).sum(axis=(2, 4)).astype(np.float32)
    np.testing.assert_allclose(patches[33].phase, 2.0 * binned[2])
    assert stats.received == 35 and stats.inferred == 35 and stats.dropped == {}
    assert stats.pending == 0 and stats.engine == "onnxruntime"
    assert 35 / 8 <= stats.batches <= 35
    assert stats.e2e_p50_ms > 0 and stats.infer_p99_ms >= stats.infer_p50_ms > 0
    assert sink.statuses[-1]["inferred"] == 35  # the final status is published


def test_slow_trickle_is_not_held_back_by_batching(model2: Path) -> None:
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(FileModelSource(model2, ORT), src, sink,
                        WorkerConfig(batch_size=64, max_wait_ms=5.0))
    with worker:
        for i, f in enumerate(frames_u16(3), start=1):
            src.publish(f, i, pos=(0.0, 0.0))
        # far fewer frames than a batch: they come out after max_wait, without stop()
        assert sink.wait_for(3, 10.0)
        assert worker.stats().inferred == 3


def test_overload_drops_are_counted_and_the_queue_stays_bounded(model2: Path) -> None:
    slow = lambda p: SlowEngine(ORT(p), 0.02)  # noqa: E731  ~2 frames per 20 ms at batch 2
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(FileModelSource(model2, slow), src, sink,
                        WorkerConfig(batch_size=2, max_wait_ms=1.0, queue_size=4))
    worker.start()
    frames = frames_u16(120)
    for i, f in enumerate(frames, start=1):  # all at once: far faster than the engine
        src.publish(f, i, pos=(0.0, 0.0), scan_uid="s")
    assert src.wait_delivered(10.0)
    stats = worker.stop(drain=True)
    assert stats.received == 120
    assert stats.dropped.get("queue_full", 0) > 0
    assert set(stats.dropped) == {"queue_full"}
    assert stats.inferred + stats.dropped["queue_full"] == 120  # honest: nothing lost silently
    assert stats.queue_high_water <= 4 and stats.queue_capacity == 4
    assert stats.engine == "slow-onnxruntime"
    ids = [p.unique_id for p in sink.patches]
    assert len(ids) == len(set(ids)) == stats.inferred
    for p in sink.patches[:5]:
        np.testing.assert_allclose(p.phase, 2.0 * frames[p.unique_id - 1])


def test_memory_stays_flat_when_frames_outrun_the_engine(model2: Path) -> None:
    """Sustained overload: the bounded queue drops, and memory does not grow with the stream."""
    import tracemalloc

    slow = lambda p: SlowEngine(ORT(p), 0.01)  # noqa: E731
    src, sink = InProcessFrameSource(), InProcessPatchSink(keep=False)
    worker = EdgeWorker(FileModelSource(model2, slow), src, sink,
                        WorkerConfig(batch_size=2, max_wait_ms=1.0, queue_size=16,
                                     latency_window=64))
    frames = frames_u16(8, seed=9)
    per_round, rounds, n = 300, 5, 0
    tracemalloc.start()
    try:
        with worker:
            traced, peaks = [], []
            for _ in range(rounds):
                for _ in range(per_round // 20):  # chunks of 20 at once: far faster than the engine
                    for _ in range(20):
                        n += 1
                        src.publish(frames[n % 8], n, pos=(0.0, 0.0), scan_uid="flood")
                    assert src.wait_delivered(20.0)
                peaks.append(tracemalloc.get_traced_memory()[1])  # while the queue is full
                assert _wait(lambda: worker.stats().pending == 0, 20.0)
                traced.append(tracemalloc.get_traced_memory()[0])
                tracemalloc.reset_peak()
            stats = worker.stats()
    finally:
        tracemalloc.stop()
    assert stats.received == n == per_round * rounds
    assert stats.dropped.get("queue_full", 0) > (rounds - 1) * per_round // 2
    assert stats.inferred + stats.dropped["queue_full"] == n and sink.count == stats.inferred
    assert stats.queue_high_water <= 16
    # 1,200 more frames went through after the first round (38 MB of uint16 alone if any part
    # of the path kept them); the traced heap may move by allocator noise only
    grown = traced[-1] - traced[0]
    streamed = (rounds - 1) * per_round * frames[0].nbytes
    assert grown < 0.05 * streamed, (traced, streamed)
    # during the flood the heap holds at most the bounded queue, one batch and one chunk in
    # transit (~40 frames), not the ~300 frames of a round
    assert max(peaks[1:]) - traced[0] < 100 * frames[0].nbytes, (peaks, traced)


def test_status_is_logged_with_counts_latencies_and_model(model2: Path, caplog: Any) -> None:
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(FileModelSource(model2, ORT), src, sink,
                        WorkerConfig(max_wait_ms=1.0, status_period_s=0.05))
    with caplog.at_level("INFO", logger="edge_ptycho_bluesky.edge.worker"), worker:
        src.publish(frames_u16(1)[0], 1, pos=(0.0, 0.0))
        src.publish(frames_u16(1)[0], 2)  # no position
        assert sink.wait_for(1, 10.0)
        def logged() -> list[str]:
            return [r.getMessage() for r in list(caplog.records)
                    if all(k in r.getMessage() for k in ("received=2 ", "inferred=1 ",
                                                           "dropped[no_position=1]"))]

        assert _wait(lambda: bool(logged()))
    line = logged()[0]
    for part in ("queue=0/256", "infer p50/p99=",
                 "e2e p50/p99=", "model=times2@", "engine=onnxruntime"):
        assert part in line, line
    assert sink.statuses and sink.statuses[-1]["model_version"].startswith("times2@")


def test_bad_input_is_counted_by_reason_and_the_worker_keeps_running(model2: Path) -> None:
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(FileModelSource(model2, ORT), src, sink, WorkerConfig(max_wait_ms=1.0))
    good = frames_u16(2)
    nan = np.ones((128, 128), np.float32)
    nan[5, 5] = np.nan
    with worker:
        src.publish_reject("empty", "initial update of a fresh record", 0)
        src.publish(good[0], 1, pos=(0.0, 0.0))
        src.publish(np.ones((100, 100), np.uint16), 2, pos=(0.0, 0.0))     # wrong shape
        src.publish(np.ones((128, 128), np.float64), 3, pos=(0.0, 0.0))   # wrong dtype
        src.publish(np.ones((128, 128), np.int16), 4, pos=(0.0, 0.0))     # wrong dtype
        src.publish(nan, 5, pos=(0.0, 0.0))                                # NaN
        src.publish(good[1], 6)                                            # no position
        src.publish_frame(Frame(7, np.ones((2, 64, 64), np.uint16), (0.0, 0.0), None, 0.0))
        src.publish(good[1], 8, pos=(1.0, 1.0))                            # good again
        assert sink.wait_for(2, 10.0)
        assert src.wait_delivered(5.0)
        stats = worker.stats()
    assert [p.unique_id for p in sink.patches] == [1, 8]
    assert stats.dropped == {"empty": 1, "bad_shape": 2, "bad_dtype": 2, "nan": 1,
                             "no_position": 1}
    assert stats.received == 9 and accounted(stats) == 9


def test_positions_are_optional_when_configured(model2: Path) -> None:
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    config = WorkerConfig(require_position=False, max_wait_ms=1.0)
    with EdgeWorker(FileModelSource(model2, ORT), src, sink, config):
        src.publish(frames_u16(1)[0], 1)
        assert sink.wait_for(1, 10.0)
    assert sink.patches[0].pos is None


def test_gaps_in_unique_id_are_counted_and_a_restart_is_not_a_gap(model2: Path) -> None:
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    f = frames_u16(1)[0]
    with EdgeWorker(FileModelSource(model2, ORT), src, sink,
                    WorkerConfig(max_wait_ms=1.0)) as worker:
        for uid in (1, 2, 3, 7, 8, 1, 2):  # 4, 5, 6 lost upstream; then a new acquisition
            src.publish(f, uid, pos=(0.0, 0.0))
        assert sink.wait_for(7, 10.0)
        stats = worker.stats()
    assert stats.dropped == {"gap": 3} and stats.gaps == 3
    assert stats.id_resets == 1 and stats.inferred == 7


def test_a_model_that_fails_to_load_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(ModelRefused, match="failed to load"):
        FileModelSource(bad, ORT).load_initial()
    # a worker without a usable model keeps running and counts frames as no_model
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    with EdgeWorker(FileModelSource(bad, ORT), src, sink, WorkerConfig(max_wait_ms=1.0)) as w:
        src.publish(frames_u16(1)[0], 1, pos=(0.0, 0.0))
        assert src.wait_delivered(5.0)
        assert _wait(lambda: w.stats().dropped.get("no_model", 0) == 1)
        assert w.stats().models_refused == 1 and w.stats().model_version is None


# -- hot swap ---------------------------------------------------------------------------------


def test_hot_swap_during_streaming_infers_every_frame_exactly_once(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    v1 = reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)})
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(RegistryModelSource(reg, ORT), src, sink,
                        WorkerConfig(batch_size=8, max_wait_ms=2.0, queue_size=4000,
                                     poll_period_s=0.05))
    pool = frames_u16(64, seed=3)
    rate_hz, deploy_at, after_swap = 400.0, 80, 80
    v2_version = ""
    n = 0
    worker.start()
    try:
        # stream at a steady rate; deploy v2 at frame 80 and keep streaming until the worker
        # has swapped and 80 more frames went out (however long loading v2 takes here)
        t0, swapped_at = time.perf_counter(), None
        while n < 3000:
            n += 1
            if n == deploy_at:
                v2_version = reg.publish({"model.onnx": make_onnx(tmp_path / "b.onnx", 3.0)}).version
            src.publish(pool[n % 64], n, pos=(float(n), 0.0), scan_uid="swap-scan")
            if swapped_at is None and n > deploy_at and worker.stats().swaps:
                swapped_at = n
            if swapped_at is not None and n >= swapped_at + after_swap:
                break
            delay = t0 + n / rate_hz - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        assert swapped_at is not None, "the worker never swapped to the new version"
        assert sink.wait_for(n, 20.0)
    finally:
        stats = worker.stop()
    scale = {v1.version: 2.0, v2_version: 3.0}
    ids = [p.unique_id for p in sink.patches]
    assert sorted(ids) == list(range(1, n + 1))      # every frame, exactly once
    versions = [p.model_version for p in sorted(sink.patches, key=lambda p: p.unique_id)]
    switch = versions.index(v2_version)
    assert deploy_at - 1 <= switch <= swapped_at      # v2 only after it was deployed
    assert versions[:switch] == [v1.version] * switch
    assert versions[switch:] == [v2_version] * (n - switch)  # and no way back
    for p in sink.patches:                            # each patch made by the model it names
        np.testing.assert_allclose(p.phase, scale[p.model_version] * pool[p.unique_id % 64])
    assert stats.swaps == 1 and stats.dropped == {} and stats.models_refused == 0
    assert stats.model_version == v2_version


def test_a_damaged_deployment_is_refused_and_the_running_model_stays(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    v1 = reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)})
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(RegistryModelSource(reg, ORT), src, sink,
                        WorkerConfig(max_wait_ms=1.0, poll_period_s=0.05))
    f = frames_u16(1)[0]
    with worker:
        src.publish(f, 1, pos=(0.0, 0.0))
        assert sink.wait_for(1, 10.0)
        # a version whose model file was damaged after publication gets deployed by hand
        v2 = reg.publish({"model.onnx": make_onnx(tmp_path / "b.onnx", 3.0)}, deploy=False)
        v2.onnx_path.write_bytes(v2.onnx_path.read_bytes()[:-20])
        tmp = reg.current_file.with_suffix(".tmp-test")
        tmp.write_text(json.dumps({"version": v2.version}))
        os.replace(tmp, reg.current_file)
        assert _wait(lambda: worker.stats().models_refused == 1)
        src.publish(f, 2, pos=(0.0, 0.0))
        assert sink.wait_for(2, 10.0)
        # a good deployment afterwards is taken
        v3 = reg.publish({"model.onnx": make_onnx(tmp_path / "c.onnx", 5.0)})
        assert _wait(lambda: worker.stats().model_version == v3.version)
        src.publish(f, 3, pos=(0.0, 0.0))
        assert sink.wait_for(3, 10.0)
    assert [p.model_version for p in sink.patches] == [v1.version, v1.version, v3.version]
    np.testing.assert_allclose(sink.patches[2].phase, 5.0 * f)


def test_empty_registry_drops_as_no_model_until_a_deployment(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path / "models")
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(RegistryModelSource(reg, ORT), src, sink,
                        WorkerConfig(max_wait_ms=1.0, poll_period_s=0.05))
    f = frames_u16(1)[0]
    with worker:
        src.publish(f, 1, pos=(0.0, 0.0))
        assert _wait(lambda: worker.stats().dropped.get("no_model", 0) == 1)
        v1 = reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)})
        assert _wait(lambda: worker.stats().model_version == v1.version)
        src.publish(f, 2, pos=(0.0, 0.0))
        assert sink.wait_for(1, 10.0)
    assert [p.unique_id for p in sink.patches] == [2]


def test_the_input_scale_recorded_with_a_version_is_applied(tmp_path: Path) -> None:
    """A version trained on scaled counts (manifest ``extra.preprocess.scale``) gets them scaled
    the same way, on top of the worker's own ``scale`` (an exposure ratio)."""
    reg = ModelRegistry(tmp_path / "models")
    v1 = reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)},
                     extra={"preprocess": {"scale": 0.25}})
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    config = WorkerConfig(max_wait_ms=1.0, preprocess_options={"scale": 3.0})
    frames = frames_u16(2, seed=4)
    with EdgeWorker(RegistryModelSource(reg, ORT), src, sink, config) as worker:
        for i, f in enumerate(frames, start=1):
            src.publish(f, i, pos=(0.0, 0.0))
        assert sink.wait_for(2, 10.0)
    assert worker.stats().model_version == v1.version
    for p in sink.patches:
        np.testing.assert_allclose(p.phase, 2.0 * 0.25 * 3.0 * frames[p.unique_id - 1], rtol=1e-6)



def test_frames_are_scaled_to_the_exposure_the_model_was_trained_with(tmp_path: Path) -> None:
    """A 0.5 ms fly-scan frame reaches a model trained on 10 ms frames with 20x its counts (the
    version's ``extra.preprocess.exposure_s``, else ``reference_exposure_s``); frames without an
    ``exposure_s`` attribute, or with a nonsense one, are left as they are and still inferred."""
    reg = ModelRegistry(tmp_path / "models")
    reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)},
                extra={"preprocess": {"scale": 0.5, "exposure_s": 0.01}})
    assert reg.current().input_exposure_s == 0.01
    frames = frames_u16(4, seed=5)
    exposures = [0.0005, 0.01, None, -1.0]
    expected = [20.0, 1.0, 1.0, 1.0]

    def run(source_of_models: Any, config: WorkerConfig) -> dict[int, np.ndarray]:
        src, sink = InProcessFrameSource(), InProcessPatchSink()
        with EdgeWorker(source_of_models, src, sink, config) as worker:
            for i, (f, e) in enumerate(zip(frames, exposures), start=1):
                src.publish(f, i, pos=(0.0, 0.0), attributes={} if e is None else {"exposure_s": e})
            assert sink.wait_for(4, 10.0)
        assert worker.stats().inferred == 4
        return {p.unique_id: p.phase for p in sink.patches}

    got = run(RegistryModelSource(reg, ORT), WorkerConfig(max_wait_ms=20.0))
    for i, factor in enumerate(expected, start=1):
        np.testing.assert_allclose(got[i], 2.0 * 0.5 * factor * frames[i - 1], rtol=1e-6)
    # a model file without a recorded exposure: the worker option stands in; without it, no scaling
    plain = make_onnx(tmp_path / "b.onnx", 2.0)
    got = run(FileModelSource(plain, ORT), WorkerConfig(max_wait_ms=20.0, reference_exposure_s=0.002))
    np.testing.assert_allclose(got[1], 2.0 * 4.0 * frames[0], rtol=1e-6)
    got = run(FileModelSource(plain, ORT), WorkerConfig(max_wait_ms=20.0))
    np.testing.assert_allclose(got[1], 2.0 * frames[0], rtol=1e-6)
    with pytest.raises(ValueError, match="reference_exposure_s"):
        WorkerConfig(reference_exposure_s=0.0)


# -- pvAccess on loopback ---------------------------------------------------------------------


def test_pvaccess_end_to_end_every_frame_accounted(model2: Path) -> None:
    inp, out, status = _name("frames"), _name("phase"), _name("status")
    pub = FramePublisher(inp)
    worker = EdgeWorker(FileModelSource(model2, ORT), PvaFrameSource(inp),
                        PvaPatchSink(out, status),
                        WorkerConfig(max_wait_ms=2.0, status_period_s=0.1))
    received: list[Patch] = []
    sub = PatchSubscriber(out, received.append)
    n = 200
    frames = frames_u16(n, seed=4)
    try:
        worker.start()
        sub.start()
        assert sub.wait_ready(10.0)
        assert _wait(lambda: worker.stats().received >= 1)  # the record's empty initial value
        for i, f in enumerate(frames, start=1):
            pub.publish(f, i, pos=(float(i), 1.0), scan_uid="pva-scan")
        assert _wait(lambda: accounted(worker.stats()) >= n + 1, 20.0)
        assert _wait(lambda: len(received) >= worker.stats().inferred, 10.0)
        assert _wait(lambda: read_status(status).get("inferred", -1) == worker.stats().inferred)
        st = read_status(status)
    finally:
        stats = worker.stop()
        sub.stop()
        pub.close()
    assert stats.received == n + 1 and stats.dropped.get("empty") == 1
    assert stats.inferred + stats.dropped_total - stats.gaps - 1 == n  # all N accounted for
    assert stats.inferred == len(received) == n  # on an idle loopback nothing is lost
    for p in received[::41]:
        np.testing.assert_allclose(p.phase, 2.0 * frames[p.unique_id - 1])
        assert p.pos == (float(p.unique_id), 1.0) and p.scan_uid == "pva-scan"
    assert st["model_version"] == stats.model_version and st["input_connected"] is True


def test_pvaccess_overload_counts_gaps_and_queue_overflow(model2: Path) -> None:
    """Frames faster than the engine over pvAccess, with ids lost upstream: every id accounted."""
    inp, out = _name("frames"), _name("phase")
    pub = FramePublisher(inp)
    slow = lambda p: SlowEngine(ORT(p), 0.02)  # noqa: E731
    worker = EdgeWorker(FileModelSource(model2, slow), PvaFrameSource(inp), PvaPatchSink(out),
                        WorkerConfig(batch_size=2, max_wait_ms=1.0, queue_size=8))
    received: list[Patch] = []
    sub = PatchSubscriber(out, received.append)
    n, lost = 400, set(range(40, 401, 40)) - {400}  # 9 ids never published (lost upstream)
    frames = frames_u16(16, seed=8)
    try:
        worker.start()
        sub.start()
        assert sub.wait_ready(10.0)
        assert _wait(lambda: worker.stats().received >= 1)  # the empty initial update
        for i in range(1, n + 1):
            if i not in lost:
                pub.publish(frames[i % 16], i, pos=(float(i), 0.0), scan_uid="flood")
        # every id up to n is either received or counted as a gap (pvAccess may lose more)
        _wait(lambda: worker.stats().received - 1 + worker.stats().gaps >= n, 20.0)
        stats = worker.stop(drain=True)
        assert _wait(lambda: len(received) >= stats.inferred, 10.0)
    finally:
        worker.stop()
        sub.stop()
        pub.close()
    assert stats.gaps >= len(lost)                        # ids lost upstream are counted
    assert stats.received - 1 + stats.gaps == n           # ... and nothing else goes unseen
    assert stats.dropped.get("queue_full", 0) > 0         # overflow counted, not buffered
    assert set(stats.dropped) <= {"empty", "gap", "queue_full"}
    assert stats.received == stats.inferred + stats.dropped_total - stats.gaps
    assert stats.queue_high_water <= 8
    ids = [p.unique_id for p in received]
    assert len(ids) == len(set(ids)) == stats.inferred and not set(ids) & lost
    for p in received[:5]:
        np.testing.assert_allclose(p.phase, 2.0 * frames[p.unique_id % 16])


def _bad_frames(pub: FramePublisher, start: int) -> dict[str, int]:
    """Publish one malformed frame per reason over pvAccess; returns the expected counts."""
    nan = np.ones((128, 128), np.float32)
    nan[0, 0] = np.nan
    pub.publish(nan, start, pos=(0.0, 0.0))
    pub.publish(np.ones((64, 64), np.uint16), start + 1, pos=(0.0, 0.0))
    pub.publish(np.ones((128, 128), np.int8), start + 2, pos=(0.0, 0.0))
    pub.publish(np.ones((128, 128), np.uint16), start + 3)  # no position
    return {"nan": 1, "bad_shape": 1, "bad_dtype": 1, "no_position": 1}


@pytest.mark.slow
def test_worker_subprocess_over_pvaccess(tmp_path: Path) -> None:
    """The real process (`python -m edge_ptycho_bluesky.edge.cli --registry`): pvAccess in
    and out, bad input, a hot swap between two streamed runs of frames, SIGINT."""
    reg = ModelRegistry(tmp_path / "models")
    v1 = reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)})
    inp, out, status = _name("frames"), _name("phase"), _name("status")
    stats_file = tmp_path / "stats.json"
    pub = FramePublisher(inp)
    received: list[Patch] = []
    sub = PatchSubscriber(out, received.append)
    cmd = [sys.executable, "-m", "edge_ptycho_bluesky.edge.cli", "--registry", str(reg.root),
           "--engine", "onnxruntime", "--threads", "1", "--input", inp, "--output", out,
           "--status", status, "--status-period", "0.1", "--poll-period", "0.1",
           "--max-wait-ms", "2", "--stats-json", str(stats_file), "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)

    def status_now() -> dict[str, Any]:
        try:
            return read_status(status, timeout=1.0)
        except Exception:
            return {}

    frames = frames_u16(100, seed=5)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "started"  # type: ignore[union-attr]
        sub.start()
        assert sub.wait_ready(20.0)
        assert _wait(lambda: status_now().get("received", 0) >= 1, 20.0)
        for i in range(1, 61):
            pub.publish(frames[i - 1], i, pos=(float(i), 0.0), scan_uid="sub-scan")
        assert _wait(lambda: len(received) >= 60, 20.0)
        v2 = reg.publish({"model.onnx": make_onnx(tmp_path / "b.onnx", 3.0)})
        assert _wait(lambda: status_now().get("model_version") == v2.version, 20.0)
        for i in range(61, 101):
            pub.publish(frames[i - 1], i, pos=(float(i), 0.0), scan_uid="sub-scan")
        expected_bad = _bad_frames(pub, 101)
        assert _wait(lambda: len(received) >= 100, 20.0)
        assert _wait(lambda: status_now().get("received", 0) >= 105, 20.0)
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
        sub.stop()
        pub.close()
    assert proc.returncode == 0, stderr[-2000:]
    final = json.loads(stdout.strip().splitlines()[-1])
    assert final["event"] == "stopped"
    assert json.loads(stats_file.read_text())["inferred"] == final["inferred"]
    assert final["received"] == 1 + 100 + 4
    assert final["inferred"] == 100 == len(received)
    assert final["dropped"] == {"empty": 1, **expected_bad}
    assert final["swaps"] == 1 and final["model_version"] == v2.version
    by_id = {p.unique_id: p for p in received}
    assert sorted(by_id) == list(range(1, 101))   # each frame exactly once
    for i, p in by_id.items():
        version, scale = (v1.version, 2.0) if i <= 60 else (v2.version, 3.0)
        assert p.model_version == version
        np.testing.assert_allclose(p.phase, scale * frames[i - 1])


def test_cli_registers_the_worker_subcommand(model2: Path) -> None:
    import argparse

    from edge_ptycho_bluesky.edge.cli import add_subcommand

    parser = argparse.ArgumentParser()
    add_subcommand(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["worker", "--model", str(model2), "--batch-size", "4",
                              "--max-wait-ms", "3", "--queue-size", "16", "--engine", "onnxruntime"])
    assert args.func.__name__ == "run_worker"
    assert (args.batch_size, args.max_wait_ms, args.queue_size) == (4, 3.0, 16)
    assert args.input == "ptycho:det:frames" and args.output == "ptycho:edge:phase"
    with pytest.raises(SystemExit):  # --model and --registry are exclusive
        parser.parse_args(["worker", "--model", "a.onnx", "--registry", "r"])
    with pytest.raises(ValueError, match="batch_size"):
        WorkerConfig(batch_size=0)


# -- pvapy hpc processor ----------------------------------------------------------------------


class _CapturePublisher:
    def __init__(self) -> None:
        self.objects: list[Any] = []

    def updateOutputChannel(self, pv: Any) -> None:  # noqa: N802 (pvapy's name)
        self.objects.append(pv)


def test_processor_configure_and_process(model2: Path, tmp_path: Path) -> None:
    from edge_ptycho_bluesky.edge.ntnda import decode_patch
    from edge_ptycho_bluesky.edge.processor import EdgePtychoProcessor

    with pytest.raises(ValueError, match="exactly one"):
        EdgePtychoProcessor({"engine": "onnxruntime"})
    with pytest.raises(ValueError, match="unknown processor arguments"):
        EdgePtychoProcessor({"model": str(model2), "colour": "red"})
    proc = EdgePtychoProcessor({"model": str(model2), "processorId": 1,
                                "objectIdField": "uniqueId"})
    proc.configure({"engine": "onnxruntime", "threads": 1, "maxWaitMs": 1.0})
    capture = _CapturePublisher()
    proc.outputChannel, proc.dataPublisher = "test:out", capture
    frames = frames_u16(12, seed=6)
    try:
        for i, f in enumerate(frames, start=1):
            pv = encode_frame(f, i, pos=(float(i), 3.0), scan_uid="hpc-scan")
            assert proc.process(pv) is pv
        assert _wait(lambda: len(capture.objects) >= 12)
        # at run time, configure({"model": ...}) swaps models between batches
        proc.configure({"model": str(make_onnx(tmp_path / "times3.onnx", 3.0))})
        proc.process(encode_frame(frames[0], 13, pos=(0.0, 0.0)))
        assert _wait(lambda: len(capture.objects) >= 13)
        stats = proc.getStats()
    finally:
        proc.stop()
    patches = [decode_patch(pv) for pv in capture.objects]
    assert [p.unique_id for p in patches] == list(range(1, 14))
    np.testing.assert_allclose(patches[4].phase, 2.0 * frames[4])
    assert patches[4].pos == (5.0, 3.0) and patches[4].scan_uid == "hpc-scan"
    np.testing.assert_allclose(patches[12].phase, 3.0 * frames[0])
    assert patches[12].model_version.startswith("times3@")
    assert stats["nFramesInferred"] == 13 and stats["nFramesDropped"] == 0
    assert stats["nModelSwaps"] == 1
    assert set(stats) == set(proc.getStatsPvaTypes())
    assert proc.getOutputPvObjectType(None).getStructureDict() == pva.NtNdArray().getStructureDict()


def _start_consumer(cmd: list[str]) -> subprocess.Popen:
    """``pvapy-hpc-consumer`` in its own process group, with SIGINT at its default.

    A shell that starts pytest in the background makes SIGINT ignored, children inherit that,
    and Python then installs no KeyboardInterrupt handler: the consumer would never stop.
    """
    return subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _stop_consumer(proc: subprocess.Popen, timeout: float) -> tuple[str, bool]:
    """SIGINT the consumer and collect its output; kill its whole process group (consumer
    processes of ``--n-consumers`` included) if it does not stop in ``timeout``.

    Returns the output and whether it stopped on SIGINT (its final statistics are printed then).
    """
    proc.send_signal(signal.SIGINT)
    try:
        return proc.communicate(timeout=timeout)[0], True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.communicate(timeout=30)[0] or "", False


@pytest.mark.slow
def test_real_pvapy_hpc_consumer_run(model2: Path) -> None:
    exe = shutil.which("pvapy-hpc-consumer", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("pvapy-hpc-consumer is not installed beside this python")
    inp, out = _name("frames"), _name("phase")
    pub = FramePublisher(inp)
    args = {"model": str(model2), "engine": "onnxruntime", "threads": 1, "maxWaitMs": 2}
    cmd = [exe, "--input-channel", inp, "--output-channel", out,
           "--processor-class", "edge_ptycho_bluesky.edge.processor.EdgePtychoProcessor",
           "--processor-args", json.dumps(args), "--server-queue-size", "1000",
           "--runtime", "60", "--disable-curses"]
    proc = _start_consumer(cmd)
    received: list[Patch] = []
    sub = PatchSubscriber(out, received.append)
    frames = frames_u16(50, seed=7)
    try:
        sub.start()  # the consumer creates its output record on its first (skipped) update
        assert sub.wait_ready(30.0), "consumer output channel never appeared"
        for i, f in enumerate(frames, start=1):
            pub.publish(f, i, pos=(float(i), 0.0), scan_uid="hpc")
        assert _wait(lambda: len(received) >= 50, 30.0)
    finally:
        output, stopped = _stop_consumer(proc, 30.0)
        sub.stop()
        pub.close()
    assert sorted(p.unique_id for p in received) == list(range(1, 51)), output[-2000:]
    p = received[10]
    np.testing.assert_allclose(p.phase, 2.0 * frames[p.unique_id - 1])
    assert p.scan_uid == "hpc" and p.model_version.startswith("times2@")
    if stopped:  # killed consumers print no final statistics
        assert "'nFramesInferred': 50" in output


@pytest.mark.slow
def test_real_pvapy_hpc_consumer_scales_out_with_n_consumers(model2: Path) -> None:
    """`pvapy-hpc-consumer --n-consumers 2 --distributor-updates 4`: each consumer serves its own
    output channel; together they infer every frame exactly once, in blocks of 4."""
    exe = shutil.which("pvapy-hpc-consumer", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("pvapy-hpc-consumer is not installed beside this python")
    tag = uuid.uuid4().hex[:10]
    inp = f"test:{tag}:frames"
    outs = [f"test:{tag}:{i}:phase" for i in (1, 2)]
    pub = FramePublisher(inp)
    args = {"model": str(model2), "engine": "onnxruntime", "threads": 1, "maxWaitMs": 2}
    cmd = [exe, "--input-channel", inp, "--output-channel", f"test:{tag}:*:phase",
           "--processor-class", "edge_ptycho_bluesky.edge.processor.EdgePtychoProcessor",
           "--processor-args", json.dumps(args), "--server-queue-size", "1000",
           "--n-consumers", "2", "--distributor-updates", "4", "--report-period", "600",
           "--runtime", "90", "--disable-curses"]
    proc = _start_consumer(cmd)
    received: dict[str, list[Patch]] = {name: [] for name in outs}
    subs = [PatchSubscriber(name, received[name].append) for name in outs]
    n = 40
    frames = frames_u16(n, seed=10)
    try:
        for sub in subs:
            sub.start()
        assert all(sub.wait_ready(60.0) for sub in subs), "consumer output channels never appeared"
        for i, f in enumerate(frames, start=1):
            pub.publish(f, i, pos=(float(i), 0.0), scan_uid="hpc2")
        assert _wait(lambda: sum(map(len, received.values())) >= n, 60.0)
    finally:
        output, _ = _stop_consumer(proc, 60.0)
        for sub in subs:
            sub.stop()
        pub.close()
    ids = {name: [p.unique_id for p in patches] for name, patches in received.items()}
    assert sorted(ids[outs[0]] + ids[outs[1]]) == list(range(1, n + 1)), output[-2000:]
    assert all(ids.values())                                   # both consumers took a share
    for name, got in ids.items():                              # whole blocks of 4 per consumer
        blocks = {(i - 1) // 4 for i in got}
        assert sorted(got) == sorted(i for b in blocks for i in range(4 * b + 1, 4 * b + 5)), name
    for p in received[outs[1]][:3]:
        np.testing.assert_allclose(p.phase, 2.0 * frames[p.unique_id - 1])
        assert p.scan_uid == "hpc2" and p.model_version.startswith("times2@")


def test_positions_from_configured_attributes_in_other_units(model2: Path) -> None:
    """A stock areaDetector frame: no pos_x/pos_y, the motor readbacks as NDAttributes in nm."""
    src, sink = InProcessFrameSource(), InProcessPatchSink()
    worker = EdgeWorker(FileModelSource(model2, ORT), src, sink, WorkerConfig(
        max_wait_ms=1.0, position_attributes=("SampleX", "SampleY"), position_scale=1e-3))
    worker.start()
    frames = frames_u16(3)
    src.publish(frames[0], 1, attributes={"SampleX": 1500.0, "SampleY": -250.0})
    src.publish(frames[1], 2, pos=(7.0, 8.0))                       # pos_x/pos_y win
    src.publish(frames[2], 3, attributes={"SampleX": 1.0})          # no y: no position
    assert sink.wait_for(2, 20.0)
    stats = worker.stop()
    patches = {p.unique_id: p for p in sink.patches}
    assert patches[1].pos == (1.5, -0.25) and patches[2].pos == (7.0, 8.0) and 3 not in patches
    assert stats.dropped == {"no_position": 1}
    with pytest.raises(ValueError, match="position_attributes"):
        WorkerConfig(position_attributes=("SampleX",))
    with pytest.raises(ValueError, match="position_scale"):
        WorkerConfig(position_scale=0.0)


#: What the edge box of a beamline lacks when installed with the ``worker`` extra alone.
NOT_ON_THE_EDGE_BOX = ("torch", "bluesky", "ophyd", "ophyd_async", "tiled", "databroker", "scipy", "matplotlib",
                       "skimage", "h5py", "caproto")


def test_the_worker_runs_without_torch_bluesky_or_tiled(tmp_path: Path) -> None:
    """The lean edge install (``pip install edge_ptycho_bluesky[worker]``): the worker process with
    torch, bluesky, Tiled and the rest made unimportable infers every frame with ONNX Runtime."""
    reg = ModelRegistry(tmp_path / "models")
    reg.publish({"model.onnx": make_onnx(tmp_path / "a.onnx", 2.0)})
    inp, out, status = _name("frames"), _name("phase"), _name("status")
    pub = FramePublisher(inp)
    received: list[Patch] = []
    sub = PatchSubscriber(out, received.append)
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in NOT_ON_THE_EDGE_BOX)
    code = (f"import sys; {blocked}; from edge_ptycho_bluesky.cli import main; "
            f"sys.exit(main(['worker', '--registry', {str(reg.root)!r}, '--engine', 'onnxruntime', '--threads', '1', "
            f"'--input', {inp!r}, '--output', {out!r}, '--status', {status!r}, '--status-period', '0.1']))")
    proc = subprocess.Popen([sys.executable, "-c", code], env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    frames = frames_u16(20, seed=6)
    try:
        assert json.loads(proc.stdout.readline())["event"] == "started"  # type: ignore[union-attr]
        sub.start()
        assert sub.wait_ready(20.0)
        assert _wait(lambda: _status_or_empty(status).get("received", 0) >= 1, 20.0)
        for i in range(1, 21):
            pub.publish(frames[i - 1], i, pos=(float(i), 0.0), scan_uid="lean")
        assert _wait(lambda: len(received) >= 20, 20.0)
    finally:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
        sub.stop()
        pub.close()
    assert proc.returncode == 0, stderr[-2000:]
    assert sorted(p.unique_id for p in received) == list(range(1, 21))
    np.testing.assert_allclose(received[0].phase, 2.0 * frames[received[0].unique_id - 1])
    # the other commands say what they need instead of a traceback
    demo = subprocess.run([sys.executable, "-c", f"import sys; {blocked}; from edge_ptycho_bluesky.cli import main; "
                           "sys.exit(main(['demo', '--out', 'x']))"], env=subprocess_env(), capture_output=True,
                          text=True, timeout=60)
    assert demo.returncode == 2 and "edge_ptycho_bluesky[beamline]" in demo.stderr, demo.stderr[-2000:]


def _status_or_empty(channel: str) -> dict[str, Any]:
    try:
        return read_status(channel, timeout=1.0)
    except Exception:
        return {}

"""ONNX export and the inference engines (ONNX Runtime, torch; TensorRT/CUDA on GPU machines)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from edge_ptycho_bluesky.model import (
    EngineUnavailable,
    InferenceEngine,
    InvalidModelError,
    OnnxRuntimeEngine,
    TorchEngine,
    available_engines,
    build_model,
    export_onnx,
    load_engine,
    onnx_graph_info,
    ptychonn2_from_onnx,
    save_state_dict,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPER_ONNX = SHARED_DATA / "ptychoNN_8.onnx"
ATOL = 1e-4  # radians; observed differences are ~5e-6

needs_paper_onnx = pytest.mark.skipif(
    not PAPER_ONNX.is_file(), reason=f"the paper's ONNX model is not at {PAPER_ONNX} (../shared/data absent)"
)
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here (torch.cuda.is_available() is False)")


def _frames(n: int, seed: int = 0) -> np.ndarray:
    """(n, 128, 128) float32 inputs on the scale the trainer gives the network (count_scale
    'auto': brightest pixel ~100, most pixels O(1)). Raw counts of ~500 through the untrained,
    He-initialised network push its activations to ~1e3, where float32 summation order alone
    moves the phase by ~1e-4 rad."""
    return (np.random.default_rng(seed).random((n, 128, 128)) * 5).astype(np.float32)


def _torch_phase(model: torch.nn.Module, frames: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(frames[:, None])).numpy()[:, 0]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return build_model("ptychonn2")


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory) -> Path:
    """The model exported once per module with the default (dynamo) exporter."""
    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "ptychonn2.onnx")


@pytest.fixture(scope="module")
def paper_model():
    if not PAPER_ONNX.is_file():
        pytest.skip(f"the paper's ONNX model is not at {PAPER_ONNX}")
    return ptychonn2_from_onnx(PAPER_ONNX)


# --- export -------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_writes_a_checked_dynamic_batch_graph(exported, model):
    proto = onnx.load(str(exported))
    onnx.checker.check_model(proto, full_check=True)
    info = onnx_graph_info(proto)
    assert info.opset == 17
    assert info.input_name == "diffraction" and info.output_names == ("phase",)
    assert info.input_shape == (None, 1, 128, 128) and info.fixed_batch is None
    assert {r.mode for r in info.resizes} == {"linear"}
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["model_class"] == "PtychoNN2" and props["n_parameters"] == "733921"
    assert not list(exported.parent.glob("*.tmp"))  # written atomically, nothing left over
    # The export round-trips into torch with identical weights.
    again = ptychonn2_from_onnx(exported)
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_legacy_exporter_and_fixed_batch(model, tmp_path):
    path = export_onnx(model, tmp_path / "fixed4.onnx", exporter="legacy", dynamic_batch=False, batch_size=4)
    assert onnx_graph_info(path).input_shape == (4, 1, 128, 128)
    engine = OnnxRuntimeEngine(path, intra_op_threads=1)
    assert engine.fixed_batch == 4 and engine.max_batch == 4
    x = _frames(5)
    np.testing.assert_allclose(engine.infer(x), _torch_phase(model, x), rtol=0, atol=ATOL)


def test_export_two_headed_ptychonn(tmp_path):
    torch.manual_seed(5)
    original = build_model("ptychonn")
    path = export_onnx(original, tmp_path / "ptychonn.onnx", exporter="legacy")
    assert onnx_graph_info(path).output_names == ("amplitude", "phase")
    engine = OnnxRuntimeEngine(path, intra_op_threads=1)
    assert engine.output_name == "phase"
    x = _frames(2)
    with torch.inference_mode():
        _, phase = original(torch.from_numpy(x[:, None]))
    np.testing.assert_allclose(engine.infer(x), phase.numpy()[:, 0], rtol=0, atol=ATOL)
    np.testing.assert_allclose(TorchEngine(original).infer(x), phase.numpy()[:, 0], rtol=0, atol=1e-6)


def test_onnxruntime_spinning_option_reaches_the_session(exported):
    """allow_spinning sets ONNX Runtime's session entry; the worker's factory turns it off by default."""
    from edge_ptycho_bluesky.edge.model_source import engine_factory

    def spinning(engine):
        return engine._session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    x = _frames(3)
    quiet = OnnxRuntimeEngine(exported, intra_op_threads=1, allow_spinning=False)
    assert spinning(quiet) == "0"
    assert spinning(OnnxRuntimeEngine(exported, intra_op_threads=1, allow_spinning=True)) == "1"
    np.testing.assert_array_equal(quiet.infer(x), OnnxRuntimeEngine(exported, intra_op_threads=1).infer(x))
    assert spinning(engine_factory("onnxruntime", threads=1)(exported)) == "0"
    assert spinning(engine_factory("onnxruntime", threads=1, spinning=True)(exported)) == "1"


# --- engines agree with torch ------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3, 8, 17])
def test_onnxruntime_exported_dynamic_batch(exported, model, batch):
    engine = OnnxRuntimeEngine(exported, intra_op_threads=1)
    assert engine.fixed_batch is None and engine.max_batch is None
    x = _frames(batch, seed=batch)
    got = engine.infer(x)
    assert got.shape == (batch, 128, 128) and got.dtype == np.float32
    np.testing.assert_allclose(got, _torch_phase(model, x), rtol=0, atol=ATOL)
    np.testing.assert_allclose(engine.infer(x[:, None]), got, rtol=0, atol=0)  # (B, 1, H, W) too


@needs_paper_onnx
@pytest.mark.parametrize("batch", [1, 3, 8, 17])
def test_onnxruntime_paper_fixed_batch(paper_model, batch):
    engine = OnnxRuntimeEngine(PAPER_ONNX, intra_op_threads=1)
    assert engine.fixed_batch == 8 and engine.input_name == "input.1"
    x = _frames(batch, seed=10 + batch)
    got = engine.infer(x)
    assert got.shape == (batch, 128, 128)
    np.testing.assert_allclose(got, _torch_phase(paper_model, x), rtol=0, atol=ATOL)
    # Padding the last chunk does not change the real frames' results.
    if batch > 1:
        np.testing.assert_allclose(engine.infer(x[:1]), got[:1], rtol=0, atol=1e-6)


def test_torch_engine_sources_agree(model, exported, tmp_path):
    x = _frames(3)
    want = _torch_phase(model, x)
    weights = save_state_dict(model, tmp_path / "w.pt")
    engines = [TorchEngine(model), TorchEngine(weights), TorchEngine(exported, max_batch=2)]
    for engine in engines:
        assert engine.name == "torch-cpu" and isinstance(engine, InferenceEngine)
        np.testing.assert_allclose(engine.infer(x), want, rtol=0, atol=ATOL)
    # The engine holds its own copy: changing the original afterwards does not affect it.
    changed = build_model("ptychonn2")
    changed.load_state_dict(model.state_dict())
    engine = TorchEngine(changed)
    with torch.no_grad():
        changed.decoder2[-2].bias.add_(1.0)
    np.testing.assert_allclose(engine.infer(x), want, rtol=0, atol=ATOL)


def test_torch_engine_channels_last(model):
    x = _frames(2)
    got = TorchEngine(model, channels_last=True).infer(x)
    np.testing.assert_allclose(got, _torch_phase(model, x), rtol=0, atol=ATOL)


# --- errors -------------------------------------------------------------------------------


def test_corrupt_and_missing_onnx(exported, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.read_bytes()[: exported.stat().st_size // 2])
    with pytest.raises(InvalidModelError, match="truncated or corrupt"):
        OnnxRuntimeEngine(truncated)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf" * 100)
    with pytest.raises(InvalidModelError, match=str(garbage.name)):
        load_engine(garbage, "onnxruntime")
    with pytest.raises(InvalidModelError):
        TorchEngine(truncated)
    with pytest.raises(FileNotFoundError, match="no model file"):
        load_engine(tmp_path / "missing.onnx")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        OnnxRuntimeEngine(tmp_path / "missing.onnx")


def test_wrong_input_shapes(exported):
    engine = OnnxRuntimeEngine(exported, intra_op_threads=1)
    with pytest.raises(ValueError, match=r"the model takes \(128, 128\)"):
        engine.infer(np.zeros((2, 64, 64), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W\) or \(B, 1, H, W\)"):
        engine.infer(np.zeros((2, 2, 128, 128), np.float32))
    with pytest.raises(TypeError, match="complex"):
        engine.infer(np.zeros((1, 128, 128), np.complex64))
    assert engine.infer(np.zeros((0, 128, 128), np.float32)).shape == (0, 128, 128)
    assert engine.infer(np.zeros((128, 128), np.uint16)).shape == (1, 128, 128)  # one frame, cast


def test_load_engine_kinds(exported, tmp_path, model):
    assert isinstance(load_engine(exported, "onnxruntime"), OnnxRuntimeEngine)
    assert isinstance(load_engine(exported, "torch"), TorchEngine)
    weights = save_state_dict(model, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="needs an .onnx file"):
        load_engine(weights, "onnxruntime")
    with pytest.raises(ValueError, match="unknown engine kind"):
        load_engine(exported, "openvino")
    with pytest.raises(TypeError, match="per-engine option"):
        load_engine(exported, "auto", intra_op_threads=1)
    if not HAS_CUDA:
        auto = load_engine(exported, "auto", onnxruntime={"intra_op_threads": 1})
        assert isinstance(auto, OnnxRuntimeEngine)
        assert load_engine(weights).name == "torch-cpu"


@pytest.mark.skipif(available_engines()["tensorrt"] is None, reason="TensorRT is available here")
def test_tensorrt_unavailable_says_why(exported):
    with pytest.raises(EngineUnavailable, match="TensorRT engine unavailable: .*(CUDA|tensorrt)"):
        load_engine(exported, "tensorrt")


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is available here")
def test_cuda_unavailable_says_why(model):
    with pytest.raises(EngineUnavailable, match="torch.cuda.is_available"):
        TorchEngine(model, device="cuda")
    with pytest.raises(ValueError, match="half=True needs device='cuda'"):
        TorchEngine(model, half=True)


# --- GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_cuda
def test_torch_cuda_engine(model):
    x = _frames(9)
    want = _torch_phase(model, x)
    np.testing.assert_allclose(TorchEngine(model, device="cuda").infer(x), want, rtol=0, atol=1e-3)
    fp16 = TorchEngine(model, device="cuda", half=True, channels_last=True)
    assert fp16.name == "torch-cuda-fp16"
    assert float(np.abs(fp16.infer(x) - want).mean()) < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(available_engines()["tensorrt"] is not None, reason=str(available_engines()["tensorrt"]))
def test_tensorrt_engine_builds_caches_and_agrees(exported, model, tmp_path):
    from edge_ptycho_bluesky.model import TensorRTEngine

    x = _frames(17)
    want = _torch_phase(model, x)
    fp32 = TensorRTEngine(exported, fp16=False, cache_dir=tmp_path, max_batch=16)
    assert fp32.plan_path.is_file()
    np.testing.assert_allclose(fp32.infer(x), want, rtol=0, atol=1e-3)
    again = TensorRTEngine(exported, fp16=False, cache_dir=tmp_path, max_batch=16)
    assert again.plan_path == fp32.plan_path and len(list(tmp_path.glob("*.plan"))) == 1
    fp16 = TensorRTEngine(exported, fp16=True, cache_dir=tmp_path, max_batch=16)
    assert fp16.plan_path != fp32.plan_path
    assert float(np.abs(fp16.infer(x) - want).mean()) < 0.02
    if PAPER_ONNX.is_file():
        paper = TensorRTEngine(PAPER_ONNX, fp16=False, cache_dir=tmp_path)
        assert paper.max_batch == 8
        np.testing.assert_allclose(
            paper.infer(x), _torch_phase(ptychonn2_from_onnx(PAPER_ONNX), x), rtol=0, atol=1e-3
        )


@pytest.mark.slow
def test_int8_quantization_calibrated_on_real_frames_agrees_with_float32(paper_model, tmp_path):
    """Static int8 (ONNX Runtime, QDQ) of the paper's weights: calibrated on 10 real frames, its
    phase on the other 10 agrees with float32 (measured mean SSIM 0.956, docs/benchmarks.md)."""
    from edge_ptycho_bluesky.model import preprocess
    from edge_ptycho_bluesky.model.quantize import agreement, quantize_int8

    real = SHARED_DATA / "test235_truncated.npz"
    if not real.is_file():
        pytest.skip(f"real frames {real} absent")
    x = preprocess(np.load(real)["reciprocal"], reduce="mean")
    exported = export_onnx(paper_model, tmp_path / "float.onnx")
    with pytest.raises(ValueError, match="calibration must be"):
        quantize_int8(exported, tmp_path / "bad.onnx", x[:, 0])
    int8 = quantize_int8(exported, tmp_path / "int8.onnx", x[:10])
    assert int8.stat().st_size < 0.5 * exported.stat().st_size      # int8 weights
    ref = OnnxRuntimeEngine(exported, intra_op_threads=1).infer(x[10:])
    q = OnnxRuntimeEngine(int8, intra_op_threads=1).infer(x[10:])
    score = agreement(ref, q)
    assert q.shape == (10, 128, 128) and score["ssim"] > 0.9, score
    assert not np.array_equal(ref, q)                                 # it really is another model


@pytest.mark.slow
def test_model_quantize_command(paper_model, tmp_path):
    from edge_ptycho_bluesky.cli import main

    real = SHARED_DATA / "test235_truncated.npz"
    if not real.is_file():
        pytest.skip(f"real frames {real} absent")
    exported = export_onnx(paper_model, tmp_path / "float.onnx")
    out = tmp_path / "int8" / "model.onnx"
    assert main(["model", "quantize", str(exported), str(real), "--key", "reciprocal", "--reduce", "mean",
                 "--out", str(out)]) == 0
    x = np.load(real)["reciprocal"][:2]
    from edge_ptycho_bluesky.model import preprocess
    assert OnnxRuntimeEngine(out, intra_op_threads=1).infer(preprocess(x, reduce="mean")).shape == (2, 128, 128)

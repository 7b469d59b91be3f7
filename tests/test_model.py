"""PtychoNN networks, loading the paper's ONNX weights, and input preprocessing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_ptycho_bluesky.model import (
    PTYCHONN2_N_PARAMETERS,
    PTYCHONN2_ONNX_INITIALIZER_ELEMENTS,
    InvalidFrameError,
    InvalidModelError,
    PtychoNN,
    PtychoNN2,
    bin_frames,
    build_model,
    center_crop,
    count_parameters,
    frame_problem,
    load_model,
    load_onnx_weights,
    onnx_graph_info,
    preprocess,
    ptychonn2_from_onnx,
    validate_frame,
    validate_frames,
)
from edge_ptycho_bluesky.model.export import save_state_dict

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PAPER_ONNX = SHARED_DATA / "ptychoNN_8.onnx"
TEST235 = SHARED_DATA / "test235_truncated.npz"

needs_paper_onnx = pytest.mark.skipif(
    not PAPER_ONNX.is_file(), reason=f"the paper's ONNX model is not at {PAPER_ONNX} (../shared/data absent)"
)
needs_test235 = pytest.mark.skipif(
    not TEST235.is_file(), reason=f"the real APS scan frames are not at {TEST235} (../shared/data absent)"
)


@pytest.fixture(scope="module")
def ort_paper_session():
    ort = pytest.importorskip("onnxruntime")
    if not PAPER_ONNX.is_file():
        pytest.skip(f"the paper's ONNX model is not at {PAPER_ONNX}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(PAPER_ONNX), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def paper_model() -> PtychoNN2:
    if not PAPER_ONNX.is_file():
        pytest.skip(f"the paper's ONNX model is not at {PAPER_ONNX}")
    return ptychonn2_from_onnx(PAPER_ONNX)


def _run_fixed_batch(session, x: np.ndarray, batch: int = 8) -> np.ndarray:
    """Run the paper's batch-8 graph on any number of frames (pad the last chunk)."""
    n = len(x)
    padded = np.concatenate([x, np.zeros((-n % batch, *x.shape[1:]), np.float32)])
    name = session.get_inputs()[0].name
    out = [session.run(None, {name: padded[i : i + batch]})[0] for i in range(0, len(padded), batch)]
    return np.concatenate(out)[:n]


# --- architecture -------------------------------------------------------------------------


def test_ptychonn2_parameter_count_and_shapes():
    model = build_model("ptychonn2")
    assert isinstance(model, PtychoNN2)
    assert count_parameters(model) == PTYCHONN2_N_PARAMETERS == 733_921
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape[:2]) for c in convs] == [
        (16, 1), (16, 16), (32, 16), (32, 32), (64, 32), (64, 64), (128, 64), (128, 128),
        (128, 128), (128, 128), (64, 128), (64, 64), (32, 64), (32, 32), (16, 32), (16, 16), (1, 16),
    ]  # fmt: skip
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is not None for c in convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    ups = [m for m in model.modules() if isinstance(m, nn.Upsample)]
    assert len(ups) == 4 and all(u.mode == "bilinear" and not u.align_corners for u in ups)


def test_ptychonn2_forward_range():
    torch.manual_seed(0)
    model = build_model("ptychonn2")
    with torch.inference_mode():
        out = model(torch.rand(2, 1, 128, 128) * 1e4)
    assert out.shape == (2, 1, 128, 128) and out.dtype == torch.float32
    assert float(out.abs().max()) <= math.pi + 1e-6


def test_ptychonn2_rejects_bad_input():
    model = build_model("ptychonn2")
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        model(torch.zeros(2, 128, 128))
    with pytest.raises(ValueError, match="divisible"):
        model(torch.zeros(1, 1, 100, 100))


def test_original_ptychonn_two_heads():
    torch.manual_seed(0)
    model = build_model("ptychonn")
    assert isinstance(model, PtychoNN) and not model.phase_only
    assert count_parameters(model) == 1_247_074
    with torch.inference_mode():
        amp, phase = model(torch.rand(2, 1, 128, 128))
    assert amp.shape == phase.shape == (2, 1, 128, 128)
    assert float(amp.min()) >= 0.0 and float(amp.max()) <= 1.0
    assert float(phase.abs().max()) <= math.pi + 1e-6
    # The two decoders have identical structure; the amplitude one goes with phase_only.
    phase_only = build_model("ptychonn", phase_only=True)
    assert not hasattr(phase_only, "decoder1")
    assert count_parameters(model) - count_parameters(phase_only) == count_parameters(model.decoder1)
    assert isinstance(phase_only(torch.rand(1, 1, 64, 64)), torch.Tensor)
    # Cherukara et al.'s decoder never drops below 2 * nconv filters (128, 64, 64 for 3 levels).
    head = [m for m in model.decoder2 if isinstance(m, nn.Conv2d)][-1]
    assert tuple(head.weight.shape[:2]) == (1, 64)
    assert count_parameters(build_model("ptychonn", n_levels=4)) == 4_787_554


def test_build_model_errors():
    with pytest.raises(ValueError, match="unknown model name 'unet'"):
        build_model("unet")
    with pytest.raises(ValueError, match="nconv"):
        build_model("ptychonn2", nconv=0)
    assert isinstance(build_model("PtychoNN-2"), PtychoNN2)


def test_state_dict_roundtrip(tmp_path):
    torch.manual_seed(1)
    model = build_model("ptychonn2")
    path = save_state_dict(model, tmp_path / "w.pt")
    loaded = load_model(path)
    x = torch.rand(1, 1, 128, 128) * 100
    with torch.inference_mode():
        assert torch.equal(model(x), loaded(x))
    with pytest.raises(InvalidModelError, match="do not fit"):
        load_model(path, "ptychonn")
    (tmp_path / "bad.pt").write_bytes(path.read_bytes()[:1000])
    with pytest.raises(InvalidModelError, match="cannot read weights"):
        load_model(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.pt")


# --- the paper's ONNX ---------------------------------------------------------------------


@needs_paper_onnx
def test_paper_onnx_structure():
    info = onnx_graph_info(PAPER_ONNX)
    assert info.opset == 12 and info.producer == "pytorch 1.11.0"
    assert info.input_shape == (8, 1, 128, 128) and info.fixed_batch == 8
    assert info.n_initializer_elements == PTYCHONN2_ONNX_INITIALIZER_ELEMENTS == 733_937
    # 733,937 = 733,921 parameters + 4 Resize scale vectors of 4 floats.
    assert info.n_initializer_elements - PTYCHONN2_N_PARAMETERS == 4 * 4
    assert len(info.convs) == 17
    assert all(c.pads == (1, 1, 1, 1) and c.kernel_shape == (3, 3) and c.bias_name for c in info.convs)
    assert [r.mode for r in info.resizes] == ["linear"] * 4
    assert {r.coordinate_transformation_mode for r in info.resizes} == {"pytorch_half_pixel"}
    assert all(r.scales == (1.0, 1.0, 2.0, 2.0) for r in info.resizes)
    assert info.ops[-3:] == ("Conv", "Tanh", "Mul")
    # Decoder's first block stays at 128 filters: 128 -> 128 -> 128.
    assert info.convs[8].weight_shape == (128, 128, 3, 3) and info.convs[9].weight_shape == (128, 128, 3, 3)
    # The initializer names are the torch model's parameter names.
    assert [c.weight_name for c in info.convs] == [
        k for k in PtychoNN2().state_dict() if k.endswith("weight")
    ]


def test_paper_model_matches_onnx_on_random_inputs(paper_model, ort_paper_session):
    rng = np.random.default_rng(0)
    for scale in (1.0, 300.0, 3000.0):
        x = (rng.random((8, 1, 128, 128)) * scale).astype(np.float32)
        want = ort_paper_session.run(None, {"input.1": x})[0]
        with torch.inference_mode():
            got = paper_model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert float(np.abs(want).max()) > 0.5  # a real, non-trivial output


@needs_test235
def test_paper_model_matches_onnx_on_real_frames(paper_model, ort_paper_session):
    reciprocal = np.load(TEST235)["reciprocal"]
    assert reciprocal.shape == (20, 512, 512)
    for reduce in ("sum", "mean"):
        x = preprocess(reciprocal, reduce=reduce)
        assert x.shape == (20, 1, 128, 128)
        want = _run_fixed_batch(ort_paper_session, x)
        with torch.inference_mode():
            got = paper_model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert float(want.std()) > 0.1


def test_load_onnx_weights_checks_structure(tmp_path):
    if not PAPER_ONNX.is_file():
        pytest.skip(f"the paper's ONNX model is not at {PAPER_ONNX}")
    with pytest.raises(InvalidModelError, match="Conv"):
        load_onnx_weights(PtychoNN2(nconv=16, n_levels=3), PAPER_ONNX)
    with pytest.raises(InvalidModelError, match="do not fit"):
        load_onnx_weights(PtychoNN2(nconv=8), PAPER_ONNX)
    wrong_upsampling = PtychoNN2()
    for m in wrong_upsampling.modules():
        if isinstance(m, nn.Upsample):
            m.align_corners = True
    with pytest.raises(InvalidModelError, match="align_corners"):
        load_onnx_weights(wrong_upsampling, PAPER_ONNX)
    truncated = tmp_path / "cut.onnx"
    truncated.write_bytes(PAPER_ONNX.read_bytes()[:100_000])
    with pytest.raises(InvalidModelError, match="not a valid ONNX"):
        ptychonn2_from_onnx(truncated)


# --- preprocessing ------------------------------------------------------------------------


def test_preprocess_bins_by_sum_and_mean():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 60_000, size=(3, 512, 512), dtype=np.uint16)
    x = preprocess(frames)
    assert x.shape == (3, 1, 128, 128) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = frames.astype(np.int64).reshape(3, 128, 4, 128, 4).sum(axis=(2, 4))
    np.testing.assert_array_equal(x[:, 0], expected.astype(np.float32))
    assert x.sum(dtype=np.float64) == frames.sum(dtype=np.float64)  # counts are kept
    np.testing.assert_allclose(preprocess(frames, reduce="mean")[:, 0], expected / 16, rtol=1e-6)
    np.testing.assert_allclose(preprocess(frames, scale=0.5), x * 0.5, rtol=1e-6)


def test_preprocess_single_frame_passthrough_and_crop():
    frame = np.arange(128 * 128, dtype=np.float32).reshape(128, 128)
    x = preprocess(frame)
    assert x.shape == (1, 1, 128, 128)
    np.testing.assert_array_equal(x[0, 0], frame)
    scaled = preprocess(frame, scale=2.0)
    np.testing.assert_array_equal(scaled[0, 0], 2 * frame)
    assert frame[0, 1] == 1.0  # the input is never modified in place
    big = np.zeros((2, 200, 200), np.int32)
    big[:, 100, 100] = 7  # zero frequency of an fftshifted frame
    cropped = preprocess(big, mode="crop")
    assert cropped.shape == (2, 1, 128, 128) and cropped[0, 0, 64, 64] == 7


def test_preprocess_516_frames_like_the_paper():
    frames = np.ones((1, 516, 516), np.uint32)
    with pytest.raises(ValueError, match="crop_to=512"):
        preprocess(frames)
    x = preprocess(frames, crop_to=512, reduce="mean")
    assert x.shape == (1, 1, 128, 128) and np.all(x == 1.0)


@pytest.mark.parametrize(
    ("frames", "error", "match"),
    [
        (np.zeros((2, 2, 128, 128)), InvalidFrameError, "got shape"),
        (np.zeros(128), InvalidFrameError, "got shape"),
        (np.zeros((0, 128, 128)), InvalidFrameError, "no frames"),
        (np.zeros((2, 0, 128)), InvalidFrameError, "empty"),
        (np.full((1, 128, 128), np.nan), InvalidFrameError, "NaN"),
        (np.full((1, 128, 128), np.inf, np.float32), InvalidFrameError, "NaN/inf"),
        (np.zeros((1, 128, 128), complex), InvalidFrameError, "dtype complex"),
        (np.zeros((1, 128, 128), bool), InvalidFrameError, "boolean"),
        (np.zeros((1, 200, 200)), ValueError, "cannot be binned"),
        (np.zeros((1, 100, 100)), ValueError, "cannot be binned"),
        (np.zeros((1, 256, 512)), ValueError, "same integer"),
    ],
)
def test_preprocess_errors(frames, error, match):
    with pytest.raises(error, match=match):
        preprocess(frames)


def test_frame_checks_for_the_edge_worker():
    good = np.zeros((128, 128), np.uint16)
    assert frame_problem(good) is None
    assert validate_frame(good) is good
    assert frame_problem(np.zeros((64, 64))) == "shape (64, 64) != (128, 128)"
    bad = np.zeros((128, 128), np.float32)
    bad[3, 4] = np.nan
    assert frame_problem(bad) == "1 NaN/inf values"
    negative = np.zeros((128, 128), np.int16)
    negative[0, 0] = -5
    assert frame_problem(negative) is None
    assert frame_problem(negative, nonnegative=True) == "1 negative values"
    with pytest.raises(InvalidFrameError, match="negative"):
        validate_frames(negative[np.newaxis], nonnegative=True)
    with pytest.raises(InvalidFrameError, match="2-D"):
        validate_frame(np.zeros((1, 128, 128)))


def test_bin_and_crop_helpers():
    frames = np.arange(2 * 8 * 8, dtype=np.float64).reshape(2, 8, 8)
    assert bin_frames(frames, 2).shape == (2, 4, 4)
    assert bin_frames(frames, 2)[0, 0, 0] == 0 + 1 + 8 + 9
    with pytest.raises(ValueError, match="not a multiple"):
        bin_frames(frames, 3)
    with pytest.raises(ValueError, match="positive integer"):
        bin_frames(frames, 0)
    odd = np.arange(7 * 7).reshape(1, 7, 7)
    assert center_crop(odd, 4)[0, 2, 2] == odd[0, 3, 3]  # the centre pixel stays at size // 2
    with pytest.raises(ValueError, match="cannot crop"):
        center_crop(odd, 8)


@pytest.mark.slow
def test_fast_variant_is_smaller_exports_to_onnx_and_matches_torch(tmp_path: Path) -> None:
    import onnxruntime as ort

    from edge_ptycho_bluesky.model import PtychoNNFast, export_onnx

    torch.manual_seed(0)
    model = build_model("ptychonn2-fast").eval()
    assert isinstance(model, PtychoNNFast) and count_parameters(model) == 184_753
    x = torch.rand(3, 1, 128, 128) * 50
    with torch.no_grad():
        want = model(x).numpy()
    assert want.shape == (3, 1, 128, 128) and np.abs(want).max() <= math.pi
    path = export_onnx(model, tmp_path / "fast.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want, atol=1e-4)
    with pytest.raises(ValueError, match="bin_factor"):
        PtychoNNFast(bin_factor=0)
    with pytest.raises(ValueError, match="divisible"):
        PtychoNNFast(bin_factor=4, n_levels=4)(torch.zeros(1, 1, 32, 32))

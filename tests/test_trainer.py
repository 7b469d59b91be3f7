"""Tests of the continual trainer, the corpus and DDP training (edge_ptycho_bluesky.training).

Real torch training on small simulated scans. Most tests use a narrow PtychoNN 2.0
(``nconv=4``: the same layers with 1/16 of the multiply-adds) so the file stays within a few tens
of seconds on a shared 2-core CPU; the export test uses the real width.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edge_ptycho_bluesky.model import build_model, preprocess
from edge_ptycho_bluesky.recon.labels import LabelledScan, extract_labels
from edge_ptycho_bluesky.sim import fermat_spiral, make_sample
from edge_ptycho_bluesky.training.corpus import TrainingCorpus
from edge_ptycho_bluesky.training.registry import ModelRegistry
from edge_ptycho_bluesky.training.cli import add_subcommand
from edge_ptycho_bluesky.training.config import TrainConfig
from edge_ptycho_bluesky.training.continual import ContinualTrainer
from edge_ptycho_bluesky.training.evaluate import evaluate_scan
from edge_ptycho_bluesky.training.loop import (
    auto_count_scale,
    dihedral,
    fit,
    loss_window,
    prepare_inputs,
    triangular2_lr,
)

torch.set_num_threads(1)

TINY = {"nconv": 4}
SCALE = 1e-3


def make_scan(n: int, seed: int, uid: str | None = None, step_um: float = 0.04) -> LabelledScan:
    """A simulated scan with the true (median-referenced) phase as labels."""
    sample = make_sample("train", extent_um=step_um * np.sqrt(n) + 0.1, seed=seed)
    xy = fermat_spiral(n, step_um)
    positions = sample.window_positions(xy)
    frames = sample.measure(xy, 0.4, rng=seed).astype(np.float32)
    phases, ref = extract_labels(sample.transmission, positions)
    return LabelledScan(frames=frames, phases=phases, positions=positions,
                        scan_uid=uid or f"sim-{seed}", pixel_size_nm=sample.geometry.pixel_size_nm,
                        phase_reference=ref)


@pytest.fixture(scope="module")
def scan_a() -> LabelledScan:
    return make_scan(48, seed=1, uid="scan-a")


@pytest.fixture(scope="module")
def scan_b() -> LabelledScan:
    return make_scan(24, seed=2, uid="scan-b")


def tiny_config(**changes: object) -> TrainConfig:
    base = dict(epochs=3, batch_size=8, half_cycle_epochs=1, count_scale=SCALE, progress=False,
                device="cpu", num_threads=1, seed=0)
    base.update(changes)
    return TrainConfig(**base)  # type: ignore[arg-type]


def states_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


# --------------------------------------------------------------------------------------------
# Configuration and schedule


@pytest.mark.parametrize(
    "changes, word",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr_min": 0.0}, "lr_min"),
        ({"lr_max": 1e-5}, "lr_max"),
        ({"half_cycle_epochs": 0}, "half_cycle_epochs"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"device": "tpu"}, "device"),
        ({"num_threads": 0}, "num_threads"),
        ({"count_scale": -1.0}, "count_scale"),
        ({"loss": "huber"}, "loss"),
        ({"loss_window": 0.0}, "loss_window"),
        ({"loss_window": 1.5}, "loss_window"),
    ],
)
def test_config_rejects_bad_values(changes: dict[str, object], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        TrainConfig(**changes)  # type: ignore[arg-type]


def test_config_defaults_are_the_papers_and_unknown_keys_are_refused() -> None:
    c = TrainConfig()
    assert (c.epochs, c.batch_size, c.lr_min, c.lr_max, c.half_cycle_epochs, c.val_fraction) == (
        50, 64, 1e-4, 5e-4, 6, 0.1)
    assert TrainConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 1e-3})
    with pytest.raises(AttributeError):
        c.epochs = 3  # type: ignore[misc]


def test_triangular2_formula_by_hand() -> None:
    lr = triangular2_lr(np.arange(13), 1.0, 3.0, step_size_up=2)
    # cycle 1: 1 2 3 2 | cycle 2 (half amplitude): 1 1.5 2 1.5 | cycle 3: 1 1.25 1.5 1.25 | 1
    expected = [1, 2, 3, 2, 1, 1.5, 2, 1.5, 1, 1.25, 1.5, 1.25, 1]
    np.testing.assert_allclose(lr, expected)


def test_scheduler_follows_triangular2(scan_b: LabelledScan) -> None:
    # 24 frames: 2 validation, 22 training -> ceil(22 / 8) = 3 steps per epoch; a half cycle of
    # 2 epochs is 6 steps, so 5 epochs (15 steps) cover one full cycle and a bit of the next.
    config = tiny_config(epochs=5, half_cycle_epochs=2)
    torch.manual_seed(0)
    model = build_model("ptychonn2", **TINY)
    result = fit(model, prepare_inputs(scan_b.frames, SCALE), scan_b.phases, config)
    assert (result.n_train, result.n_val, result.steps_per_epoch) == (22, 2, 3)
    assert len(result.lrs) == 5 * 3
    expected = triangular2_lr(np.arange(15), 1e-4, 5e-4, step_size_up=6)
    np.testing.assert_allclose(result.lrs, expected, rtol=1e-9)
    assert result.lrs[0] == pytest.approx(1e-4)            # starts at base_lr
    assert result.lrs[6] == pytest.approx(5e-4)            # first peak after 2 epochs
    assert result.lrs[12] == pytest.approx(1e-4)           # back to base after a full cycle
    assert result.lrs[14] == pytest.approx(1e-4 + 4e-4 / 2 * 2 / 6)   # second cycle: half height
    assert result.history[0].lr == pytest.approx(result.lrs[2])


# --------------------------------------------------------------------------------------------
# Training


def test_loss_decreases_and_best_validation_model_is_kept(scan_a: LabelledScan) -> None:
    config = tiny_config(epochs=4)
    torch.manual_seed(0)
    model = build_model("ptychonn2", **TINY)
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(_record: object) -> None:
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    result = fit(model, prepare_inputs(scan_a.frames, SCALE), scan_a.phases, config,
                 on_epoch=snapshot)
    train = [r.train_loss for r in result.history]
    val = [r.val_loss for r in result.history]
    assert len(result.history) == 4
    assert train[-1] < train[0]
    assert min(val) < val[0]
    assert result.best_val_loss == min(val)
    assert result.best_epoch == int(np.argmin(val)) + 1
    # The returned weights, and those left in the model, are the best epoch's, not the last's.
    best = snapshots[result.best_epoch - 1]
    assert states_close(result.state_dict, best)
    assert states_close({k: v.cpu() for k, v in model.state_dict().items()}, best)
    assert result.samples_per_s > 0 and result.time_s > 0


def test_loss_window_is_the_beam_footprint_and_all_ones_without_radius() -> None:
    w = loss_window((128, 128), 0.3)[0, 0]
    assert w.shape == (128, 128) and float(w[64, 64]) > 0.99 and float(w[0, 0]) < 1e-6
    assert float(w[64, 64 + 50]) < 0.01 and float(w[64, 64 + 28]) > 0.99      # radius 0.3 x 128 = 38 px
    assert torch.equal(loss_window((8, 8), None), torch.ones(1, 1, 8, 8))


def test_fast_variant_trains_with_mse_in_the_beam_footprint_and_augmentation(scan_a: LabelledScan) -> None:
    config = tiny_config(epochs=4, loss="mse", loss_window=0.3, lr_min=1e-3, lr_max=2e-3, augment=True)
    torch.manual_seed(0)
    model = build_model("ptychonn2-fast", nconv=4)
    result = fit(model, prepare_inputs(scan_a.frames, SCALE), scan_a.phases, config)
    train = [r.train_loss for r in result.history]
    assert train[-1] < train[0]
    # the validation figure stays a mean absolute error (rad) inside the window
    assert 0 < result.best_val_loss < float(np.abs(scan_a.phases).mean()) * 2


def test_dihedral_augmentation_is_the_intensity_of_the_turned_exit_wave() -> None:
    rng = np.random.default_rng(0)
    wave = rng.normal(size=(16, 16)) + 1j * rng.normal(size=(16, 16))

    def intensity(w: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.abs(np.fft.fftshift(np.fft.fft2(np.ascontiguousarray(w)))) ** 2)[None, None]

    phase = torch.from_numpy(np.angle(wave))[None, None]
    for k in range(8):
        turned = np.rot90(wave, k % 4)
        turned = np.flip(turned, 1) if k >= 4 else turned
        frames, phases = dihedral(intensity(wave), phase, k)
        torch.testing.assert_close(frames, intensity(turned), rtol=1e-6, atol=1e-6 * float(frames.max()))
        torch.testing.assert_close(phases, torch.from_numpy(np.angle(turned).copy())[None, None])


def test_validation_split_is_fresh_each_epoch(scan_b: LabelledScan) -> None:
    # With the same seed the run is reproducible; with another split seed the validation
    # losses differ from epoch one on (same weights, different held-out samples).
    config = tiny_config(epochs=1, lr_min=1e-12, lr_max=1e-12)
    x = prepare_inputs(scan_b.frames, SCALE)
    losses = []
    for split_seed in (0, 0, 1):
        torch.manual_seed(0)
        model = build_model("ptychonn2", **TINY)
        losses.append(fit(model, x, scan_b.phases, config, split_seed=split_seed)
                      .history[0].val_loss)
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


@pytest.mark.slow
def test_warm_start_continues_from_given_weights(
    tmp_path: Path, scan_a: LabelledScan, scan_b: LabelledScan
) -> None:
    trainer = ContinualTrainer("ptychonn2", tiny_config(epochs=1), tmp_path, model_kwargs=TINY)
    trainer.add_scan(scan_a)
    first = trainer.train()
    assert trainer.increment == 1
    assert states_close(trainer.state_dict, first.state_dict)   # the model holds the best state

    # A frozen learning rate leaves the weights where they started, so what a run returns shows
    # where it started from.
    frozen = ContinualTrainer("ptychonn2", tiny_config(epochs=1, lr_min=1e-12, lr_max=1e-12),
                              tmp_path / "frozen", model_kwargs=TINY)
    frozen.add_scan(scan_b)
    warm = frozen.train(initial_state=first.state_dict)
    assert states_close(warm.state_dict, first.state_dict, atol=1e-8)
    # The continual default: the next increment starts from the previous increment's model.
    again = frozen.train()
    assert states_close(again.state_dict, first.state_dict, atol=1e-8)
    scratch = frozen.train(from_scratch=True)
    assert not states_close(scratch.state_dict, first.state_dict, atol=1e-3)
    # ... and from a saved file (torch.load(weights_only=True)).
    path = tmp_path / "first.pt"
    torch.save(first.state_dict, path)
    warm_file = frozen.train(initial_state=path)
    assert states_close(warm_file.state_dict, first.state_dict, atol=1e-8)
    assert frozen.increment == 4

    # The grown corpus is trained on as a whole.
    trainer.add_scan(scan_b)
    second = trainer.train()
    assert trainer.increment == 2
    assert second.n_train + second.n_val == 72 and second.n_val == 7


def test_curves_are_written_as_picture_and_data(tmp_path: Path, scan_b: LabelledScan) -> None:
    trainer = ContinualTrainer("ptychonn2", tiny_config(epochs=2), tmp_path, model_kwargs=TINY)
    trainer.add_scan(scan_b)
    result = trainer.train()
    folder = tmp_path / "increment_0001"
    assert result.curves == {ext: folder / f"curves.{ext}" for ext in ("png", "json", "csv")}
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (folder / "curves.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert set(rows[0]) == {"epoch", "train_loss", "val_loss", "lr", "time_s"}
    assert float(rows[1]["val_loss"]) == pytest.approx(result.history[1].val_loss, rel=1e-6)
    data = json.loads((folder / "curves.json").read_text())
    assert [h["train_loss"] for h in data["history"]] == [r.train_loss for r in result.history]
    assert data["best_epoch"] == result.best_epoch
    assert len(data["lrs"]) == len(result.lrs)


def test_fit_rejects_bad_inputs(scan_b: LabelledScan) -> None:
    model = build_model("ptychonn2", **TINY)
    x = prepare_inputs(scan_b.frames, SCALE)
    with pytest.raises(ValueError, match="labels"):
        fit(model, x, scan_b.phases[:10], tiny_config())
    with pytest.raises(ValueError, match="at least 2"):
        fit(model, x[:1], scan_b.phases[:1], tiny_config())
    with pytest.raises(ValueError, match="prepare_inputs"):
        fit(model, scan_b.frames, scan_b.phases, tiny_config())


# --------------------------------------------------------------------------------------------
# Corpus


def test_corpus_grows_refuses_duplicates_and_persists(
    tmp_path: Path, scan_a: LabelledScan, scan_b: LabelledScan
) -> None:
    corpus = TrainingCorpus(directory=tmp_path / "corpus")
    corpus.add(scan_a)
    corpus.add(scan_b)
    assert corpus.uids == ["scan-a", "scan-b"] and corpus.n_frames == 72
    frames, phases = corpus.arrays()
    np.testing.assert_array_equal(frames[48:], scan_b.frames)
    np.testing.assert_array_equal(phases[:48], scan_a.phases)
    with pytest.raises(ValueError, match="already in the corpus"):
        corpus.add(scan_a)
    with pytest.raises(TypeError, match="LabelledScan"):
        corpus.add(object())  # type: ignore[arg-type]
    again = TrainingCorpus.open(tmp_path / "corpus")
    assert again.uids == corpus.uids
    np.testing.assert_array_equal(again.arrays()[0], frames)
    assert TrainingCorpus.from_files(again.files).uids == corpus.uids
    with pytest.raises(ValueError, match="empty"):
        TrainingCorpus().arrays()


# --------------------------------------------------------------------------------------------
# Evaluation, export and registry


class ZeroPhase(nn.Module):
    """Predicts a phase of zero everywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x) * self.dummy


def test_evaluate_scan_reports_mae_and_ssim(scan_b: LabelledScan) -> None:
    ev = evaluate_scan(ZeroPhase(), scan_b)
    assert ev.n_frames == 24 and ev.patch_ssim.shape == (24,) and ev.patch_mae.shape == (24,)
    np.testing.assert_allclose(ev.patch_mae, np.abs(scan_b.phases).mean(axis=(1, 2)), rtol=1e-6)
    assert ev.mae == pytest.approx(float(np.abs(scan_b.phases).mean()), rel=1e-5)
    assert abs(ev.ssim) < 0.05                     # a flat image has no structure in common
    assert ev.stitched_ssim is not None and abs(ev.stitched_ssim) < 0.05
    assert ev.data_range == pytest.approx(float(scan_b.phases.max() - scan_b.phases.min()))


@pytest.mark.slow
def test_export_and_publish_matches_torch(tmp_path: Path, scan_b: LabelledScan) -> None:
    import onnxruntime as ort

    config = tiny_config(epochs=1)
    trainer = ContinualTrainer("ptychonn2", config, tmp_path / "work")   # the real width
    trainer.add_scan(scan_b)
    with pytest.raises(ValueError, match="train"):
        trainer.export_and_publish(tmp_path / "registry")
    trainer.train()
    registry = ModelRegistry(tmp_path / "registry")
    mv = trainer.export_and_publish(registry, validation_ssim=0.8)
    assert registry.current_version() == mv.version
    assert mv.training_data == ("scan-b",) and mv.validation_ssim == 0.8 and mv.parent is None
    assert mv.manifest["extra"]["preprocess"] == {"scale": SCALE}
    assert mv.manifest["extra"]["training"]["epochs"] == 1
    assert {"model.onnx", "model.pt", "curves.png", "curves.json"} <= set(mv.manifest["files"])
    registry.verify(mv.version)

    # The ONNX model, fed the way the edge worker feeds it, gives the torch model's phase.
    frames = scan_b.frames[:3]
    session = ort.InferenceSession(str(mv.onnx_path), providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    got = session.run(None, {name: preprocess(frames, scale=SCALE)})[0]
    with torch.no_grad():
        want = trainer.model(torch.from_numpy(prepare_inputs(frames, SCALE))).numpy()
    assert got.shape == (3, 1, 128, 128)
    np.testing.assert_allclose(got, want, atol=1e-4)
    state = torch.load(mv.torch_path, weights_only=True)
    assert states_close(state, trainer.state_dict)

    # The next trainer warm-starts from the deployed version and records it as the parent.
    nxt = ContinualTrainer("ptychonn2", config, tmp_path / "next")
    assert nxt.warm_start_from_registry(registry) == mv
    assert states_close(nxt.state_dict, state) and nxt.parent_version == mv.version
    with pytest.raises(ValueError, match="count_scale"):
        ContinualTrainer("ptychonn2", config.with_updates(count_scale=None),
                         tmp_path / "other").warm_start_from_registry(registry)
    # count_scale="auto" (the default) adopts the warm-start version's recorded scale.
    auto = ContinualTrainer("ptychonn2", config.with_updates(count_scale="auto"), tmp_path / "auto")
    with pytest.raises(ValueError, match="auto"):
        auto.count_scale
    auto.warm_start_from_registry(registry)
    assert auto.count_scale == SCALE


def test_auto_count_scale_brings_the_brightest_pixel_to_about_100(tmp_path: Path,
                                                                 scan_b: LabelledScan) -> None:
    assert TrainConfig().count_scale == "auto"
    trainer = ContinualTrainer("ptychonn2", tiny_config(epochs=1, count_scale="auto"), tmp_path / "w",
                               model_kwargs=TINY)
    trainer.add_scan(scan_b)
    result = trainer.train()
    scale = trainer.count_scale
    brightest = float(scan_b.frames.max())
    assert 50 <= scale * brightest <= 150 and float(f"{scale:.1g}") == scale
    assert result.count_scale == scale  # what the network saw is recorded with the result
    mv = trainer.export_and_publish(tmp_path / "registry", validation_ssim=0.5)
    assert mv.manifest["extra"]["preprocess"] == {"scale": scale}
    with pytest.raises(ValueError, match="no counts"):
        auto_count_scale(np.zeros((2, 128, 128), np.float32))


# --------------------------------------------------------------------------------------------
# DDP


@pytest.mark.slow
def test_ddp_two_ranks_reach_the_single_process_loss(tmp_path: Path) -> None:
    """2 gloo ranks under torchrun against 1 process, same data, seed and global batch.

    The ranks' local batches (8 + 8) are, step by step, exactly the single process's batch of
    16 (DistributedSampler deals one permutation round-robin), and DDP averages equal-size
    local means, so the two runs differ only by floating-point summation order (measured:
    losses within 2e-6 relative, weights within 2e-7 after two epochs). The tolerance, 1e-3,
    leaves room for that rounding to grow (other thread counts, BLAS builds) while a wrong
    gradient scale, a rank training on the wrong shard or a different validation split would
    move the losses by whole per cent.
    """
    from edge_ptycho_bluesky.recon.labels import save_corpus
    from edge_ptycho_bluesky.training.ddp import run_torchrun

    scan = make_scan(64, seed=3, uid="scan-ddp")
    corpus_file = save_corpus(tmp_path / "corpus.npz", scan)
    # 64 frames: 6 validation, 58 training -> batches 16, 16, 16, 10 (8, 8, 8, 5 per rank).
    config = tiny_config(epochs=2, batch_size=16, half_cycle_epochs=1)

    torch.manual_seed(config.seed)
    single = fit(build_model("ptychonn2", **TINY), prepare_inputs(scan.frames, SCALE),
                 scan.phases, config)
    ddp = run_torchrun([corpus_file], tmp_path / "ddp", nproc=2, config=config,
                       model_kwargs=TINY, timeout_s=300)
    assert ddp.world_size == 2 and ddp.n_train == single.n_train == 58
    assert ddp.steps_per_epoch == single.steps_per_epoch == 4
    np.testing.assert_allclose(ddp.lrs, single.lrs, rtol=1e-12)
    for a, b in zip(ddp.history, single.history, strict=True):
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-3)
        assert a.val_loss == pytest.approx(b.val_loss, rel=1e-3)
    assert ddp.history[-1].train_loss < ddp.history[0].train_loss
    assert (tmp_path / "ddp" / "model.pt").is_file()
    assert (tmp_path / "ddp" / "curves.png").is_file()
    model = build_model("ptychonn2", **TINY)
    model.load_state_dict(torch.load(tmp_path / "ddp" / "model.pt", weights_only=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (mixed precision)")
def test_mixed_precision_on_cuda(scan_b: LabelledScan) -> None:
    config = tiny_config(epochs=2, device="cuda", amp=True)
    torch.manual_seed(0)
    result = fit(build_model("ptychonn2"), prepare_inputs(scan_b.frames, SCALE), scan_b.phases,
                 config)
    assert result.device.startswith("cuda")
    assert np.isfinite([r.train_loss for r in result.history]).all()


# --------------------------------------------------------------------------------------------
# CLI


@pytest.mark.slow
def test_cli_trains_on_a_stored_scan_by_uid(tmp_path: Path, RE, beamline, tiled_client, storage_config,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``edge-ptycho train --scan UID`` labels a stored scan with rPIE (no labels stored for it) and
    publishes a model that records the scan's exposure; a wrong uid is a clear error."""
    from edge_ptycho_bluesky.plans import spiral_ptycho_scan
    from edge_ptycho_bluesky.storage import make_tiled_writer
    from edge_ptycho_bluesky.training.registry import ModelRegistry

    RE.subscribe(make_tiled_writer(tiled_client, storage_config))
    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=0.05, num_points=12,
                                   exposure=0.004))
    monkeypatch.setenv("EDGE_PTYCHO_DATA_DIR", str(storage_config.data_dir))
    monkeypatch.delenv("EDGE_PTYCHO_TILED_URI", raising=False)
    parser = argparse.ArgumentParser(prog="edge-ptycho")
    add_subcommand(parser.add_subparsers(dest="command"))
    registry = tmp_path / "r"
    args = parser.parse_args(["train", "--scan", uid, "--registry", str(registry), "--epochs", "1",
                              "--batch-size", "4", "--rpie-iterations", "5", "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0, capsys.readouterr().err
    assert f"SSIM on {uid}" in capsys.readouterr().out
    mv = ModelRegistry(registry).current()
    assert mv.training_data == (uid,) and mv.input_exposure_s == pytest.approx(0.004)
    args = parser.parse_args(["train", "--scan", "no-such-uid", "--registry", str(registry)])
    assert args.func(args) == 1
    assert "no-such-uid" in capsys.readouterr().err
    args = parser.parse_args(["train", "--registry", str(registry)])
    assert args.func(args) == 1
    assert "no training data" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_trains_and_publishes(tmp_path: Path, scan_b: LabelledScan,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    from edge_ptycho_bluesky.recon.labels import save_corpus

    corpus_file = save_corpus(tmp_path / "b.npz", scan_b)
    parser = argparse.ArgumentParser(prog="edge-ptycho")
    add_subcommand(parser.add_subparsers(dest="command"))
    argv = ["train", "--corpus", str(corpus_file), "--registry", str(tmp_path / "reg"),
            "--epochs", "1", "--batch-size", "8", "--count-scale", "1e-3", "--device", "cpu",
            "--threads", "1", "--no-progress", "--workdir", str(tmp_path / "w")]
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    out = capsys.readouterr().out
    mv = ModelRegistry(tmp_path / "reg").current()
    assert mv is not None and mv.version in out
    assert mv.training_data == ("scan-b",) and mv.manifest["extra"]["preprocess"]["scale"] == 1e-3
    assert os.path.isfile(tmp_path / "w" / "increment_0001" / "curves.png")


def test_corpus_exposure_is_recorded_only_when_every_scan_agrees():
    from types import SimpleNamespace

    from edge_ptycho_bluesky.training.continual import corpus_exposure

    def scans(*exposures):
        return [SimpleNamespace(metadata={} if e is None else {"exposure_s": e}) for e in exposures]

    assert corpus_exposure(scans(0.01, 0.01)) == 0.01
    assert corpus_exposure(scans(0.01, 0.02)) is None  # mixed: nothing the worker could scale to
    assert corpus_exposure(scans(0.01, None)) is None
    assert corpus_exposure(scans(None)) is None
    assert corpus_exposure(scans(-1.0)) is None


@pytest.mark.slow
def test_ddp_trains_the_physics_loss_and_every_setting_like_one_process(tmp_path: Path) -> None:
    """The ranks get the whole TrainConfig (the loss included) and the probe: 'mae+physics' under
    torchrun gives the single process's losses."""
    from edge_ptycho_bluesky.recon.labels import save_corpus
    from edge_ptycho_bluesky.sim import zone_plate_probe
    from edge_ptycho_bluesky.training.ddp import run_torchrun
    from edge_ptycho_bluesky.training.physics import probe_for_inputs

    scan = make_scan(64, seed=5, uid="scan-ddp-physics")  # 58 training frames: no rank pads its shard
    corpus_file = save_corpus(tmp_path / "corpus.npz", scan)
    inputs = prepare_inputs(scan.frames, SCALE)
    probe = probe_for_inputs(zone_plate_probe(), inputs)
    config = tiny_config(epochs=1, batch_size=16, loss="mae+physics", loss_window=0.3)
    torch.manual_seed(config.seed)
    single = fit(build_model("ptychonn2", **TINY), inputs, scan.phases, config, probe=probe)
    ddp = run_torchrun([corpus_file], tmp_path / "ddp", nproc=2, config=config, model_kwargs=TINY,
                       timeout_s=300, probe=probe)
    assert ddp.config.loss == "mae+physics" and ddp.config.loss_window == 0.3
    assert ddp.history[0].train_loss == pytest.approx(single.history[0].train_loss, rel=1e-3)
    assert ddp.history[0].val_loss == pytest.approx(single.history[0].val_loss, rel=1e-3)

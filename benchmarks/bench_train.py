"""Continual training of PtychoNN 2.0 on simulated scans, judged on an unseen test scan.

The accuracy experiment (AI against rPIE on features never seen in training), scaled to a CPU:

1. simulate ``--train-scans`` training scans (random etched features, Fermat spiral, 0.4 s
   exposures at 1e9 photons/s as in the paper's training data) and label them: rPIE
   reconstruction (``edge_ptycho_bluesky.recon.rpie``, known probe) and the labels of
   ``recon.labels.labels_from_reconstruction`` (``--labels rpie``, default), or the true phase of
   the simulated sample (``--labels truth``);
2. simulate an unseen test scan (letters, never seen in training) at overlap 0.9 and reconstruct
   it with rPIE: the reference;
3. train continually with :class:`ContinualTrainer`: add one scan, train ``--epochs`` on the whole
   corpus (warm start from the previous increment), evaluate, repeat;
4. after each increment, infer every test frame, stitch the phases (weighted by the probe
   amplitude) onto the rPIE object grid and compute the SSIM against the rPIE phase (and against
   the true phase) over the scanned region (convex hull of the beam centres).

Run::

    .venv/bin/python benchmarks/bench_train.py              # full: minutes to tens of minutes
    .venv/bin/python benchmarks/bench_train.py --quick      # a smoke run, ~1-2 minutes
    .venv/bin/python benchmarks/bench_train.py --accuracy   # the accuracy target (below)

``--accuracy`` measures the accuracy target (stitched AI phase of an unseen scan within SSIM 0.85
of its rPIE reconstruction) under these conditions: training scans at overlap 0.9 (step
``step_for_overlap(0.9, 0.8)`` = 46 nm) with 10 ms exposures, rPIE labels (known probe, 50
iterations), one training increment on the whole corpus with the default recipe, then the unseen
test scan (letters) at overlap 0.9. It also publishes the model into a registry and runs the
test scan through :func:`edge_ptycho_bluesky.model.scan_inference.infer_scan` (ONNX Runtime), and
saves ``truth | rPIE | AI`` to ``--figure`` (default ``docs/images/ai_vs_rpie.png``).

Prints a table (corpus size, training time, samples/s, best validation MAE, test SSIM) and writes
pictures (test images, loss curves) and ``summary.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from edge_ptycho_bluesky import FRAME_SIZE
from edge_ptycho_bluesky.metrics import compare, scanned_mask, ssim
from records import record, write_json  # benchmarks/records.py
from edge_ptycho_bluesky.recon.labels import (LabelledScan, extract_labels, labels_from_reconstruction,
                                              load_corpus, save_corpus)
from edge_ptycho_bluesky.reproduce import BEAM_UM, Scan, rpie_result, simulate_scan
from edge_ptycho_bluesky.sim import overlap_ratio, step_for_overlap
from edge_ptycho_bluesky.stitching import stitch
from edge_ptycho_bluesky.training.config import TrainConfig
from edge_ptycho_bluesky.training.continual import ContinualTrainer
from edge_ptycho_bluesky.training.evaluate import predict_phases

EXPOSURE_S = 0.4
ACCURACY_TARGET_SSIM = 0.85


def simulate(kind: str, n: int, step_um: float, seed: int, exposure_s: float = EXPOSURE_S,
             return_xy: bool = False):
    """A sample, its frames (N, 128, 128) float32 counts and window positions (N, 2)."""
    scan = simulate_scan(kind, n, step_um, seed, exposure_s)
    if return_xy:
        return scan.sample, scan.frames, scan.positions, scan.xy_um
    return scan.sample, scan.frames, scan.positions


def reconstruct(sample, frames, positions, iterations: int):
    """rPIE with the known probe, on the sample's object grid."""
    return rpie_result(Scan(sample, frames, positions, np.zeros((0, 2)), 0.0, 0.0), iterations)


def label_scan(sample, frames, positions, uid: str, mode: str, iterations: int) -> tuple[LabelledScan, float]:
    t0 = time.perf_counter()
    if mode == "rpie":
        result = reconstruct(sample, frames, positions, iterations)
        scan = labels_from_reconstruction(result, frames, scan_uid=uid)
    else:
        phases, ref = extract_labels(sample.transmission, positions)
        scan = LabelledScan(frames=frames, phases=phases, positions=positions, scan_uid=uid,
                            pixel_size_nm=sample.geometry.pixel_size_nm, phase_reference=ref,
                            metadata={"labels": "true phase of the simulated sample"})
    return scan, time.perf_counter() - t0


def stitched_ssim(model, frames, positions, weight, reference, truth, mask, count_scale):
    """Stitch the predicted phases onto the object grid; SSIM vs the rPIE and the true phase."""
    t0 = time.perf_counter()
    pred = predict_phases(model, frames, count_scale=count_scale, batch_size=64)
    infer_s = time.perf_counter() - t0
    image, _ = stitch(pred, positions, shape=reference.shape, weight=weight)
    ok = mask & np.isfinite(image)
    return (ssim(reference, image, ok), ssim(truth, image, ok), image, infer_s)


def save_images(path: Path, images: dict[str, np.ndarray], mask: np.ndarray, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = np.nonzero(mask)
    sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    fig = Figure(figsize=(4 * len(images), 4.2), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, img) in enumerate(images.items()):
        ax = fig.add_subplot(1, len(images), i + 1)
        view = np.where(mask, img - np.nanmean(img[mask]), np.nan)[sl]
        ax.imshow(view, cmap="gray", vmin=-1.0, vmax=1.0)
        ax.set_title(name, fontsize="small")
        ax.set_axis_off()
    fig.suptitle(title, fontsize="small")
    fig.savefig(path)


def save_triptych(path: Path, truth: np.ndarray, rpie_img: np.ndarray, ai: np.ndarray,
                  mask: np.ndarray, title: str, labels: tuple[str, str, str]) -> None:
    """``truth | rPIE | AI`` phase, each shifted to zero mean over ``mask``, same grey scale."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = np.nonzero(mask)
    sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    views = [np.where(mask, img - np.nanmean(img[mask]), np.nan)[sl] for img in (truth, rpie_img, ai)]
    lim = float(np.nanmax(np.abs(views[0])))
    fig = Figure(figsize=(12, 4.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, view, name in zip(axes, views, labels):
        im = ax.imshow(view, cmap="gray", vmin=-lim, vmax=lim)
        ax.set_title(name, fontsize="small")
        ax.set_axis_off()
    fig.colorbar(im, ax=axes, shrink=0.8, label="phase (rad)")
    fig.suptitle(title, fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def accuracy(args: argparse.Namespace) -> int:
    """The accuracy target: AI vs rPIE on an unseen scan (see the module notes)."""
    from edge_ptycho_bluesky.io.cxi import PtychoScan
    from edge_ptycho_bluesky.model.scan_inference import LoadedScan, infer_scan
    from edge_ptycho_bluesky.training.registry import ModelRegistry

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t_all = time.perf_counter()
    step = step_for_overlap(args.overlap, BEAM_UM)
    exposure = args.exposure_s

    # ---- training data: rPIE labels of simulated scans ------------------------------------
    train_scans = []
    label_time = 0.0
    label_quality = []
    tag = f"{args.frames_per_scan}f_{exposure * 1e3:g}ms_ov{args.overlap}_{args.rpie_iterations}it"
    if args.cache is not None:
        args.cache.mkdir(parents=True, exist_ok=True)
    for k in range(args.train_scans):
        cached = None if args.cache is None else args.cache / f"train{k}_{tag}.npz"
        if cached is not None and cached.is_file():
            (scan,) = load_corpus(cached)
            label_quality.append(float(scan.metadata.get("rpie_vs_truth_ssim", np.nan)))
            train_scans.append(scan)
            print(f"# training scan {k}: {len(scan)} frames, labels from {cached}", flush=True)
            continue
        sample, frames, pos = simulate("train", args.frames_per_scan, step, seed=100 + k,
                                       exposure_s=exposure)
        t0 = time.perf_counter()
        result = reconstruct(sample, frames, pos, args.rpie_iterations)
        m = scanned_mask(pos, shape=sample.transmission.shape, method="hull")
        label_quality.append(ssim(sample.phase, result.phase, m))
        scan = labels_from_reconstruction(result, frames, scan_uid=f"sim-train-{k}",
                                          metadata={"rpie_vs_truth_ssim": label_quality[-1]})
        dt = time.perf_counter() - t0
        label_time += dt
        train_scans.append(scan)
        if cached is not None:
            save_corpus(cached, scan)
        print(f"# training scan {k}: {len(scan)} frames, rPIE labels in {dt:.1f} s "
              f"(rPIE vs truth SSIM {label_quality[-1]:.3f})", flush=True)
    frames_max = max(float(s.frames.max()) for s in train_scans)
    count_scale = args.count_scale
    if count_scale is None:  # brightest pixel -> ~100 (see training.continual, "Input scaling")
        count_scale = float(f"{100.0 / frames_max:.1g}")
    print(f"# brightest training pixel {frames_max:.0f} counts; count_scale {count_scale:g}",
          flush=True)

    # ---- unseen test scan and its rPIE reference -------------------------------------------
    t_sample, t_frames, t_pos, t_xy = simulate("test", args.test_frames, step, seed=7,
                                               exposure_s=exposure, return_xy=True)
    t0 = time.perf_counter()
    cached = None if args.cache is None else args.cache / f"test_{args.test_frames}f_{tag}.npy"
    if cached is not None and cached.is_file():
        reference = np.load(cached)
    else:
        reference = reconstruct(t_sample, t_frames, t_pos, args.rpie_iterations).phase
        if cached is not None:
            np.save(cached, reference)
    test_rpie_s = time.perf_counter() - t0
    truth = t_sample.phase
    mask = scanned_mask(t_pos, shape=reference.shape, method="hull")
    weight = np.abs(t_sample.probe)
    rpie_vs_truth = compare(truth, reference, mask)
    print(f"# test scan: {len(t_frames)} frames, overlap {overlap_ratio(step, BEAM_UM):.2f}; "
          f"rPIE in {test_rpie_s:.1f} s, vs truth SSIM {rpie_vs_truth['ssim']:.3f}", flush=True)

    # ---- one increment on the whole corpus, default recipe ----------------------------------
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         device="auto", num_threads=args.threads, count_scale=count_scale,
                         progress=args.progress, loss=args.loss, loss_window=args.loss_window,
                         lr_min=args.lr_min, lr_max=args.lr_max, augment=args.augment)
    trainer = ContinualTrainer(args.model, config, args.out / "work")
    for scan in train_scans:
        trainer.add_scan(scan)
    print(f"# training: {trainer.corpus.n_frames} frames x {args.epochs} epochs", flush=True)
    result = trainer.train()
    print(f"# trained in {result.time_s:.0f} s, {result.samples_per_s:.1f} samples/s, best val "
          f"MAE {result.best_val_loss:.4f} rad at epoch {result.best_epoch}", flush=True)

    # ---- inference on the unseen scan (torch, and the published ONNX via infer_scan) --------
    t0 = time.perf_counter()
    pred = predict_phases(trainer.model, t_frames, count_scale=count_scale, batch_size=64)
    torch_infer_s = time.perf_counter() - t0
    ai, _ = stitch(pred, t_pos, shape=reference.shape, weight=weight)
    ok = mask & np.isfinite(ai)
    ai_vs_rpie = compare(reference, ai, ok)
    ai_vs_truth = compare(truth, ai, ok)
    registry = ModelRegistry(args.out / "registry")
    mv = trainer.export_and_publish(registry, validation_ssim=max(0.0, min(1.0, ai_vs_rpie["ssim"])),
                                    notes="benchmarks/bench_train.py --accuracy")
    loaded = LoadedScan(
        scan=PtychoScan(frames=t_frames, positions_m=t_xy * 1e-6, geometry=t_sample.geometry,
                        probe=t_sample.probe, uid="sim-test"),
        positions=t_pos, object_shape=reference.shape, source="sim-test")
    onnx_res = infer_scan(loaded, registry.root, engine="onnxruntime", fill=np.nan)
    ok_onnx = mask & np.isfinite(onnx_res.image)
    onnx_vs_rpie = compare(reference, onnx_res.image, ok_onnx)
    # the int8 form of the published model (static, calibrated on training frames), same test scan
    from edge_ptycho_bluesky.model import OnnxRuntimeEngine, preprocess
    from edge_ptycho_bluesky.model.quantize import quantize_int8

    calibration = preprocess(train_scans[0].frames[:32], scale=count_scale)
    int8 = quantize_int8(mv.onnx_path, args.out / "model_int8.onnx", calibration)
    int8_phase = OnnxRuntimeEngine(int8).infer(preprocess(t_frames, scale=count_scale))
    int8_phase = int8_phase.reshape(-1, FRAME_SIZE, FRAME_SIZE)
    int8_image, _ = stitch(int8_phase, t_pos, shape=reference.shape, weight=weight)
    int8_vs_rpie = compare(reference, int8_image, mask & np.isfinite(int8_image))
    passed = ai_vs_rpie["ssim"] >= ACCURACY_TARGET_SSIM

    save_triptych(
        args.figure, truth, reference, ai, ok,
        f"unseen test scan (letters), overlap {args.overlap}, {len(t_frames)} frames, "
        f"{exposure * 1e3:g} ms; {args.model} trained on {trainer.corpus.n_frames} rPIE-labelled "
        f"frames, {args.epochs} epochs ({result.time_s / 60:.0f} min CPU)",
        ("true phase",
         f"rPIE, {args.rpie_iterations} it. (SSIM vs truth {rpie_vs_truth['ssim']:.3f})",
         f"AI stitched (SSIM vs rPIE {ai_vs_rpie['ssim']:.3f}, vs truth {ai_vs_truth['ssim']:.3f})"))

    total_s = time.perf_counter() - t_all
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"training data: {args.train_scans} scans x {args.frames_per_scan} frames = "
          f"{trainer.corpus.n_frames} frames (etched features, step {step * 1e3:.1f} nm, overlap "
          f"{args.overlap}, {exposure * 1e3:g} ms), rPIE labels in {label_time:.0f} s")
    print(f"training: {args.epochs} epochs, batch {args.batch_size}, count_scale {count_scale:g}, "
          f"{result.time_s:.0f} s, {result.samples_per_s:.1f} samples/s, best val MAE "
          f"{result.best_val_loss:.4f} rad (epoch {result.best_epoch})")
    print()
    print("| comparison (unseen test scan, scanned region) | SSIM | Pearson | RMS (rad) |")
    print("|---|---|---|---|")
    for name, c in (("AI (torch) vs rPIE", ai_vs_rpie), ("AI (torch) vs truth", ai_vs_truth),
                    (f"AI (ONNX Runtime, registry {mv.version}) vs rPIE", onnx_vs_rpie),
                    ("AI (ONNX Runtime, int8) vs rPIE", int8_vs_rpie),
                    ("rPIE vs truth", rpie_vs_truth)):
        print(f"| {name} | {c['ssim']:.3f} | {c['pearson']:.3f} | {c['rms']:.3f} |")
    print()
    print(f"target SSIM(AI vs rPIE) >= {ACCURACY_TARGET_SSIM}: {'MET' if passed else 'MISSED'}; "
          f"inference {len(t_frames) / torch_infer_s:.0f} frames/s (torch), "
          f"{len(t_frames) / onnx_res.seconds:.0f} frames/s (ONNX Runtime); total {total_s:.0f} s; "
          f"figure {args.figure}")
    summary = {
        "mode": "accuracy",
        "started": started.isoformat(),
        "argv": sys.argv[1:],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "train_frames": trainer.corpus.n_frames,
        "count_scale": count_scale,
        "label_time_s": label_time,
        "label_rpie_vs_truth_ssim": label_quality,
        "train_time_s": result.time_s,
        "samples_per_s": result.samples_per_s,
        "best_val_mae": result.best_val_loss,
        "best_epoch": result.best_epoch,
        "val_curve": [r.val_loss for r in result.history],
        "ai_vs_rpie": ai_vs_rpie,
        "ai_vs_truth": ai_vs_truth,
        "onnx_vs_rpie": onnx_vs_rpie,
        "int8_vs_rpie": int8_vs_rpie,
        "rpie_vs_truth": rpie_vs_truth,
        "target_met": passed,
        "total_s": total_s,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    np.savez_compressed(args.out / "test_images.npz", truth=truth, rpie=reference, ai=ai, mask=mask)
    record("train", engine=f"torch {'cuda' if torch.cuda.is_available() else 'cpu'}", model=args.model,
           batch=args.batch_size, fps=result.samples_per_s, ssim=ai_vs_rpie["ssim"], unit="samples/s",
           train_frames=trainer.corpus.n_frames, epochs=args.epochs, train_s=result.time_s)
    write_json(args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small smoke run")
    p.add_argument("--labels", choices=("rpie", "truth"), default="rpie")
    p.add_argument("--train-scans", type=int, default=3)
    p.add_argument("--frames-per-scan", type=int, default=200)
    p.add_argument("--train-step-um", type=float, default=0.05, help="paper: 50 nm")
    p.add_argument("--epochs", type=int, default=10, help="epochs per increment")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--test-frames", type=int, default=200)
    p.add_argument("--overlap", type=float, default=0.9)
    p.add_argument("--rpie-iterations", type=int, default=50)
    p.add_argument("--count-scale", type=float, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model", default="ptychonn2", help="architecture (ptychonn2, ptychonn2-fast)")
    p.add_argument("--loss", default="mae", choices=("mae", "mse"), help="training loss (paper: mae)")
    p.add_argument("--loss-window", type=float, default=None,
                   help="count only a centred disk of this radius (fraction of the patch side) in the loss")
    p.add_argument("--augment", action="store_true", help="random rotations/reflections (TrainConfig.augment)")
    p.add_argument("--lr-min", type=float, default=1e-4)
    p.add_argument("--lr-max", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_train_out"))
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    p.add_argument("--json", type=Path, default=None, help="write the records (bench.json format) here")
    p.add_argument("--accuracy", action="store_true",
                   help="the accuracy target: one increment, 10 ms, overlap 0.9 (see above)")
    p.add_argument("--cache", type=Path, default=None,
                   help="--accuracy: folder keeping the rPIE labels and test reference between runs")
    p.add_argument("--exposure-s", type=float, default=0.01, help="exposure of --accuracy scans")
    p.add_argument("--figure", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "images" / "ai_vs_rpie.png",
                   help="truth | rPIE | AI figure of --accuracy")
    args = p.parse_args(argv)
    if args.accuracy:
        defaults = {"train_scans": 4, "frames_per_scan": 200, "epochs": 12, "test_frames": 300,
                    "batch_size": 64}
        if args.quick:
            defaults = {"train_scans": 1, "frames_per_scan": 64, "epochs": 1, "test_frames": 64}
            args.rpie_iterations = 20
            if args.figure == p.get_default("figure"):
                args.figure = args.out / "ai_vs_rpie.png"
        for key, value in defaults.items():  # only where not given on the command line
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
        return accuracy(args)
    if args.quick:
        args.train_scans, args.frames_per_scan, args.epochs = 2, 64, 2
        args.test_frames, args.rpie_iterations = 64, 20
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    t_all = time.perf_counter()

    # ---- data -----------------------------------------------------------------------------
    train_scans = []
    label_time = 0.0
    for k in range(args.train_scans):
        sample, frames, pos = simulate("train", args.frames_per_scan, args.train_step_um,
                                       seed=100 + k)
        scan, dt = label_scan(sample, frames, pos, f"sim-train-{k}", args.labels,
                              args.rpie_iterations)
        label_time += dt
        train_scans.append(scan)
        print(f"# training scan {k}: {len(scan)} frames, labels ({args.labels}) in {dt:.1f} s",
              flush=True)
    test_step = step_for_overlap(args.overlap, BEAM_UM)
    t_sample, t_frames, t_pos = simulate("test", args.test_frames, test_step, seed=7)
    t0 = time.perf_counter()
    t_rec = reconstruct(t_sample, t_frames, t_pos, args.rpie_iterations)
    test_rpie_s = time.perf_counter() - t0
    reference = t_rec.phase
    truth = t_sample.phase
    mask = scanned_mask(t_pos, shape=reference.shape, method="hull")
    weight = np.abs(t_sample.probe)
    rpie_vs_truth = ssim(truth, reference, mask)
    print(f"# test scan: {len(t_frames)} frames, step {test_step * 1e3:.1f} nm, overlap "
          f"{overlap_ratio(test_step, BEAM_UM):.2f}; rPIE {args.rpie_iterations} it. in "
          f"{test_rpie_s:.1f} s, SSIM(rPIE vs truth) {rpie_vs_truth:.3f}", flush=True)

    # ---- continual training ---------------------------------------------------------------
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                         device="auto", num_threads=args.threads, count_scale=args.count_scale,
                         progress=args.progress, loss=args.loss, loss_window=args.loss_window,
                         lr_min=args.lr_min, lr_max=args.lr_max, augment=args.augment)
    trainer = ContinualTrainer(args.model, config, args.out / "work")
    rows = []
    image = None
    for scan in train_scans:
        trainer.add_scan(scan)
        result = trainer.train()
        s_rpie, s_truth, image, infer_s = stitched_ssim(
            trainer.model, t_frames, t_pos, weight, reference, truth, mask, args.count_scale)
        row = {
            "increment": trainer.increment,
            "corpus_frames": trainer.corpus.n_frames,
            "epochs": args.epochs,
            "train_s": result.time_s,
            "samples_per_s": result.samples_per_s,
            "best_val_mae": result.best_val_loss,
            "best_epoch": result.best_epoch,
            "ssim_vs_rpie": s_rpie,
            "ssim_vs_truth": s_truth,
            "infer_frames_per_s": len(t_frames) / infer_s,
        }
        rows.append(row)
        print(f"# increment {row['increment']}: {row['corpus_frames']} frames, "
              f"{row['train_s']:.0f} s, {row['samples_per_s']:.1f} samples/s, val MAE "
              f"{row['best_val_mae']:.4f}, SSIM vs rPIE {s_rpie:.3f}, vs truth {s_truth:.3f}",
              flush=True)
    assert image is not None
    save_images(args.out / "test_images.png",
                {f"AI stitched (SSIM vs rPIE {rows[-1]['ssim_vs_rpie']:.3f})": image,
                 "rPIE": reference, "true phase": truth}, mask,
                f"unseen test scan, overlap {args.overlap}, {len(t_frames)} frames; trained on "
                f"{trainer.corpus.n_frames} frames ({args.labels} labels)")

    total_s = time.perf_counter() - t_all
    header = ("| increment | corpus frames | epochs | train time (s) | samples/s | best val MAE "
              "(rad) | test SSIM vs rPIE | test SSIM vs truth |")
    print()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {args.threads} threads, device "
          f"{'cuda' if torch.cuda.is_available() else 'cpu'}")
    print(f"labels: {args.labels}; training scans: {args.train_scans} x {args.frames_per_scan} "
          f"frames (step {args.train_step_um * 1e3:.0f} nm); labelling {label_time:.0f} s")
    print(f"test: {len(t_frames)} frames at overlap {args.overlap}; SSIM(rPIE vs truth) "
          f"{rpie_vs_truth:.3f}")
    print()
    print(header)
    print("|" + "---|" * 8)
    for r in rows:
        print(f"| {r['increment']} | {r['corpus_frames']} | {r['epochs']} | {r['train_s']:.0f} | "
              f"{r['samples_per_s']:.1f} | {r['best_val_mae']:.4f} | {r['ssim_vs_rpie']:.3f} | "
              f"{r['ssim_vs_truth']:.3f} |")
    print()
    print(f"total {total_s:.0f} s; figures in {args.out}")
    summary = {
        "started": started.isoformat(),
        "argv": sys.argv[1:] if argv is None else argv,
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "label_time_s": label_time,
        "test_rpie_s": test_rpie_s,
        "rpie_vs_truth_ssim": rpie_vs_truth,
        "increments": rows,
        "total_s": total_s,
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    for row in rows:
        record("train", engine=f"torch {'cuda' if torch.cuda.is_available() else 'cpu'}", model=args.model,
               batch=args.batch_size, fps=row["samples_per_s"], ssim=row["ssim_vs_rpie"], unit="samples/s",
               train_frames=row["corpus_frames"], epochs=row["epochs"], train_s=row["train_s"])
    write_json(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Continual training of PtychoNN 2.0 on simulated scans, judged on an unseen test scan.

The experiment of issue 4 ("must show"), scaled to a CPU:

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

from edge_ptycho_bluesky.metrics import scanned_mask, ssim
from edge_ptycho_bluesky.recon.labels import LabelledScan, extract_labels, labels_from_reconstruction
from edge_ptycho_bluesky.recon.rpie import rpie
from edge_ptycho_bluesky.sim import fermat_spiral, make_sample, overlap_ratio, step_for_overlap
from edge_ptycho_bluesky.stitching import stitch
from edge_ptycho_bluesky.training.trainer import ContinualTrainer, TrainConfig, predict_phases

BEAM_UM = 0.8
EXPOSURE_S = 0.4


def simulate(kind: str, n: int, step_um: float, seed: int):
    """A sample, its frames (N, 128, 128) float32 counts and window positions (N, 2)."""
    extent = step_um * np.sqrt(n) + 0.05
    sample = make_sample(kind, extent_um=extent, seed=seed, beam_diameter_nm=BEAM_UM * 1e3)
    xy = fermat_spiral(n, step_um)
    frames = sample.measure(xy, EXPOSURE_S, rng=seed).astype(np.float32)
    return sample, frames, sample.window_positions(xy)


def reconstruct(sample, frames, positions, iterations: int):
    """rPIE with the known probe, on the sample's object grid."""
    return rpie(frames, positions, probe=sample.probe, object_shape=sample.transmission.shape,
                iterations=iterations, pixel_size_nm=sample.geometry.pixel_size_nm,
                update_probe=False, seed=0)


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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench_train_out"))
    p.add_argument("--progress", action="store_true", help="tqdm progress bars")
    args = p.parse_args(argv)
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
                         progress=args.progress)
    trainer = ContinualTrainer("ptychonn2", config, args.out / "work")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())

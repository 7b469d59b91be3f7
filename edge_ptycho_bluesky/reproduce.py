"""``edge-ptycho reproduce --out DIR [--quick]``: the paper's results, reproduced on simulated data.

Babu, Zhou et al., Nat. Commun. 14, 7059 (2023) show that a network trained on rPIE labels
(PtychoNN 2.0) images unseen features as well as iterative phase retrieval, keeps working where
iterative methods fail (sparse scans with no overlap, low dose, other count rates) and improves
as the training corpus grows.  This command runs the analogue of each result on simulated scans
with known truth (random etched features for training, letters for the unseen test area) and
writes, in ``DIR``:

* ``results.json``: a list of rows ``{"figure", "method", "condition", "metric", "value",
  "paper"}``; ``figure`` is one of ``fig2``, ``fig3``, ``fig4``, ``fig5``, ``supp3``, ``supp5``,
  ``table2``; ``method`` is ``ai``, ``rpie`` or ``ai+rpie`` (the AI image refined by the
  streaming, AI-seeded rPIE of :mod:`~edge_ptycho_bluesky.recon.streaming` for ``refine_seconds``,
  as the live refiner does after a scan; fig2, fig3 and fig4); ``metric`` is ``ssim`` against the true phase
  (and ``pearson`` where SSIM is dominated by noise on flat regions), or as named
  (``dose_photons_per_nm2``, ``us_per_frame``); ``paper`` is the paper's number where it gives
  one, else null;
* one picture per figure (``fig2.png`` ... ``table2.png``) and ``summary.json`` (settings,
  timings, machine).

The network is trained continually here, scan by scan (``fig5``), and that model serves every
other figure.  By default it is the CPU-sized variant ``ptychonn2-fast`` trained with the recipe
measured to learn within minutes on two cores (MSE on the beam footprint, random rotations and
reflections; see docs/results.md); ``--model ptychonn2`` trains the paper's network instead
(hours on a CPU).

Conditions (the paper's, on simulated data):

* fig2: the unseen test area (letters) at overlap 0.9: stitched AI vs rPIE vs truth, line profile;
* fig3: SSIM vs overlap ratio (0.9 ... 0) for rPIE and for the stitched AI phase, and the dose;
* fig4: a test scan at 1/10 of the training exposure, inferred after scaling its counts up 10x
  (and, for reference, rPIE of that scan);
* supp3: models retrained (warm start) on training data with 1/10 ... 1/10,000 of the counts
  (Poisson-thinned), each tested on a test scan at the same dose;
* fig5: SSIM on a familiar area (etched features, not trained on) and on the unseen area as the
  corpus grows scan by scan;
* supp5: test scans at 4x, 16x, 40x the training count rate, inferred without retraining;
* table2: inference time per frame per engine and batch on this machine.

``--quick`` (about 10 minutes on 2 CPU cores) uses fewer scans, overlaps and epochs; the full
run's time is in docs/results.md.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from .metrics import compare, scanned_mask
from .model import OnnxRuntimeEngine, export_onnx, ptychonn2_from_onnx
from .model.contract import InputContract
from .model.quantize import quantize_int8
from .recon.labels import labels_from_reconstruction
from .recon.rpie import rpie
from .recon.streaming import RefineOptions, refine_scan
from .sim import dose_photons_per_nm2, fermat_spiral, make_sample, step_for_overlap
from .stitching import stitch
from .training.config import TrainConfig
from .training.continual import ContinualTrainer
from .training.evaluate import predict_phases

logger = logging.getLogger(__name__)

#: Figures of the paper reproduced here (the ``figure`` field of results.json).
FIGURES = ("fig2", "fig3", "fig4", "fig5", "supp3", "supp5", "table2")
#: Fields of each row of results.json.
ROW_FIELDS = ("figure", "method", "condition", "metric", "value", "paper")
#: The paper's beam diameter (um) and training exposure of the simulated scans (s).
BEAM_UM = 0.8
EXPOSURE_S = 0.01
#: The paper's Table 2: PtychoNN 2.0 inference time per frame (us) by batch on an RTX A6000.
PAPER_TABLE2_US = {1: 370.0, 8: 90.0, 16: 70.0}


def shared_data_dir() -> Path:
    """``../shared/data`` beside the repository checkout (the paper's network, real frames)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class ReproduceConfig:
    """Sizes of the reproduction; ``quick`` picks the small set."""

    out: Path
    quick: bool = False
    model: str = "ptychonn2-fast"
    train_scans: int = 50
    frames_per_scan: int = 200
    test_frames: int = 200
    increments: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    epochs: int = 12
    overlaps: tuple[float, ...] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0)
    downscales: tuple[int, ...] = (10, 100, 1000, 10000)
    downscale_epochs: int = 6
    countrates: tuple[int, ...] = (4, 16, 40)
    rpie_iterations: int = 50
    refine_seconds: float = 10.0
    batches: tuple[int, ...] = (1, 8, 16, 64)
    seed: int = 0
    threads: int | None = None
    progress: bool = False
    train_options: dict[str, Any] = field(default_factory=lambda: {
        "loss": "mse", "loss_window": 0.3, "augment": True, "lr_min": 2e-4, "lr_max": 2e-3, "batch_size": 16,
        "half_cycle_epochs": 4})

    @classmethod
    def quick_config(cls, out: Path, **changes: Any) -> ReproduceConfig:
        """The ``--quick`` sizes (about 10 minutes on 2 CPU cores)."""
        base: dict[str, Any] = dict(quick=True, train_scans=20, increments=(1, 5, 10, 20), epochs=10,
                                    overlaps=(0.9, 0.6, 0.3, 0.0), downscales=(100, 10000), downscale_epochs=4,
                                    batches=(1, 8, 16))
        base.update(changes)
        return cls(out=out, **base)

    def __post_init__(self) -> None:
        if sorted(self.increments) != list(self.increments) or self.increments[-1] != self.train_scans:
            raise ValueError(f"increments must grow to train_scans={self.train_scans}, got {self.increments}")
        if min(self.overlaps) < 0 or max(self.overlaps) >= 1 or 0.9 not in self.overlaps:
            raise ValueError(f"overlaps must lie in [0, 1) and include 0.9 (fig2), got {self.overlaps}")


# ---------------------------------------------------------------------------------------------
# simulated scans


@dataclass
class Scan:
    """A simulated scan: its sample (with the truth), frames, probe windows and beam positions."""

    sample: Any
    frames: NDArray[np.float32]
    positions: NDArray[np.float64]
    xy_um: NDArray[np.float64]
    step_um: float
    exposure_s: float

    @property
    def truth(self) -> NDArray[np.float32]:
        return self.sample.phase

    def mask(self) -> NDArray[np.bool_]:
        return scanned_mask(self.positions, shape=self.truth.shape, method="hull")


def simulate_scan(kind: str, n: int, step_um: float, seed: int, exposure_s: float = EXPOSURE_S) -> Scan:
    """``n`` frames of a Fermat-spiral scan of a ``kind`` sample ("train": etched features,
    "test": letters) at ``step_um``, ``exposure_s`` per frame (Poisson noise, seeded)."""

    sample = make_sample(kind, extent_um=step_um * np.sqrt(n) + 0.05, seed=seed, beam_diameter_nm=BEAM_UM * 1e3)
    xy = fermat_spiral(n, step_um)
    frames = sample.measure(xy, exposure_s, rng=seed).astype(np.float32)
    return Scan(sample, frames, sample.window_positions(xy), xy, step_um, exposure_s)


def rpie_phase(scan: Scan, iterations: int) -> NDArray[np.float32]:
    """rPIE with the known probe on the sample's grid (the iterative reference)."""
    return rpie_result(scan, iterations).phase


def rpie_result(scan: Scan, iterations: int) -> Any:
    return rpie(scan.frames, scan.positions, probe=scan.sample.probe, object_shape=scan.sample.transmission.shape,
                iterations=iterations, pixel_size_nm=scan.sample.geometry.pixel_size_nm, update_probe=False, seed=0)


def thin(frames: NDArray[np.floating], factor: float, seed: int) -> NDArray[np.float32]:
    """Frames with ``1/factor`` of the counts: binomial thinning of each photon (a lower dose)."""
    rng = np.random.default_rng(seed)
    return rng.binomial(np.asarray(frames, np.int64), 1.0 / factor).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# the reproduction


class Reproduction:
    """Runs the figures in order and collects rows, pictures and timings."""

    def __init__(self, config: ReproduceConfig) -> None:
        self.config = config
        self.rows: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self.images: dict[str, Any] = {}
        self.out = Path(config.out)
        self.out.mkdir(parents=True, exist_ok=True)

    # -- helpers --------------------------------------------------------------------------
    def row(self, figure: str, method: str, condition: str, metric: str, value: float,
            paper: float | None = None) -> None:
        self.rows.append({"figure": figure, "method": method, "condition": condition, "metric": metric,
                          "value": None if value is None or not np.isfinite(value) else round(float(value), 4),
                          "paper": paper})
        logger.info("%s %s %s: %s = %.4f%s", figure, method, condition, metric, value,
                    "" if paper is None else f" (paper {paper})")

    def scores(self, figure: str, method: str, condition: str, truth: NDArray[np.floating],
               image: NDArray[np.floating], mask: NDArray[np.bool_], paper: float | None = None,
               with_pearson: bool = False) -> float:
        ok = mask & np.isfinite(image)
        c = compare(truth, image, ok)
        self.row(figure, method, condition, "ssim", c["ssim"], paper)
        if with_pearson:
            self.row(figure, method, condition, "pearson", c["pearson"])
        return float(c["ssim"])

    def patches(self, scan: Scan, *, input_scale: float = 1.0, model: Any = None,
                count_scale: float | None = None) -> NDArray[np.float32]:
        """The network's phase patch of every frame (counts scaled by ``input_scale`` first)."""
        model = self.trainer.model if model is None else model
        count_scale = self.trainer.count_scale if count_scale is None else count_scale
        return predict_phases(model, scan.frames * np.float32(input_scale), count_scale=count_scale, batch_size=64)

    def ai_image(self, scan: Scan, **kwargs: Any) -> NDArray[np.float32]:
        """Stitched AI phase of a scan on its object grid (patches weighted by the probe amplitude);
        keywords as :meth:`patches`."""
        image, _ = stitch(self.patches(scan, **kwargs), scan.positions, shape=scan.truth.shape,
                          weight=np.abs(scan.sample.probe))
        return image

    def refined_image(self, scan: Scan, **kwargs: Any) -> NDArray[np.float32]:
        """The AI patches refined by AI-seeded rPIE for ``refine_seconds`` (method ``ai+rpie``)."""
        options = RefineOptions(threads=torch.get_num_threads())
        return refine_scan(scan.frames, scan.positions, self.patches(scan, **kwargs), scan.truth.shape,
                           scan.sample.probe, seconds=self.config.refine_seconds, options=options,
                           beam_diameter_px=BEAM_UM * 1e3 / scan.sample.geometry.pixel_size_nm).phase

    def _timed(self, name: str, t0: float) -> None:
        self.timings[name] = round(time.perf_counter() - t0, 1)
        logger.info("%s done in %.0f s", name, self.timings[name])

    # -- stages ---------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:

        c = self.config
        t_all = time.perf_counter()
        previous_threads = torch.get_num_threads()
        if c.threads:
            torch.set_num_threads(c.threads)
        try:
            self.step_09 = step_for_overlap(0.9, BEAM_UM)
            self.prepare_data()
            self.fig5()
            self.fig2_fig3()
            self.fig4()
            self.supp5()
            self.supp3()
            self.table2()
        finally:
            torch.set_num_threads(previous_threads)
        self.timings["total"] = round(time.perf_counter() - t_all, 1)
        self.write()
        return self.rows

    def prepare_data(self) -> None:
        """Training scans (etched features, overlap 0.9) with rPIE labels; the test scans."""
        c, t0 = self.config, time.perf_counter()
        self.train_scans = []
        for k in range(c.train_scans):
            scan = simulate_scan("train", c.frames_per_scan, self.step_09, seed=1000 + c.seed + k)
            labels = labels_from_reconstruction(rpie_result(scan, c.rpie_iterations), scan.frames,
                                                scan_uid=f"reproduce-train-{k}")
            self.train_scans.append((scan, labels))
            logger.info("training scan %d/%d labelled by rPIE", k + 1, c.train_scans)
        self.test = simulate_scan("test", c.test_frames, self.step_09, seed=7 + c.seed)
        self.familiar = simulate_scan("train", c.test_frames, self.step_09, seed=900 + c.seed)
        self._timed("data_and_labels", t0)

    def fig5(self) -> None:
        """Continual learning: SSIM on a familiar and an unseen area as the corpus grows."""

        c, t0 = self.config, time.perf_counter()
        config = TrainConfig(epochs=c.epochs, seed=c.seed, device="auto", num_threads=c.threads,
                             progress=c.progress, **c.train_options)
        self.trainer = ContinualTrainer(c.model, config, self.out / "training")
        curve: list[tuple[int, int, float, float]] = []
        added = 0
        for target in c.increments:
            while added < target:
                self.trainer.add_scan(self.train_scans[added][1])
                added += 1
            self.trainer.train()
            familiar = self.scores("fig5", "ai", f"scans={target}, area=familiar", self.familiar.truth,
                                   self.ai_image(self.familiar), self.familiar.mask())
            unseen = self.scores("fig5", "ai", f"scans={target}, area=unseen", self.test.truth,
                                 self.ai_image(self.test), self.test.mask())
            curve.append((target, self.trainer.corpus.n_frames, familiar, unseen))
        self.images["fig5"] = curve
        self._plot_fig5(curve)
        self._timed("fig5_training", t0)

    def fig2_fig3(self) -> None:
        """AI vs rPIE vs truth at overlap 0.9 (fig2) and SSIM vs overlap with the dose (fig3)."""

        c, t0 = self.config, time.perf_counter()
        sweep = []
        for overlap in c.overlaps:
            scan = self.test if overlap == 0.9 else simulate_scan(
                "test", c.test_frames, step_for_overlap(overlap, BEAM_UM), seed=7 + c.seed)
            mask = scan.mask()
            rpie_img = rpie_phase(scan, c.rpie_iterations)
            ai_img = self.ai_image(scan)
            refined = self.refined_image(scan)
            cond = f"overlap={overlap:g}"
            s_rpie = self.scores("fig3", "rpie", cond, scan.truth, rpie_img, mask,
                                 paper=(None if overlap != 0.6 else 0.8))
            s_ai = self.scores("fig3", "ai", cond, scan.truth, ai_img, mask,
                               paper=(None if overlap != 0.0 else 0.9))
            s_ref = self.scores("fig3", "ai+rpie", cond, scan.truth, refined, mask)
            photons = float(np.sum(np.abs(scan.sample.probe) ** 2)) * scan.exposure_s
            dose = dose_photons_per_nm2(photons, scan.step_um * 1e3)
            for method in ("rpie", "ai", "ai+rpie"):
                self.row("fig3", method, cond, "dose_photons_per_nm2", dose)
            sweep.append((overlap, s_rpie, s_ai, dose, s_ref))
            if overlap == 0.9:
                self.scores("fig2", "rpie", cond, scan.truth, rpie_img, mask, with_pearson=True)
                self.scores("fig2", "ai", cond, scan.truth, ai_img, mask, with_pearson=True)
                self.scores("fig2", "ai+rpie", cond, scan.truth, refined, mask, with_pearson=True)
                self.scores("fig2", "ai", f"{cond}, reference=rpie", rpie_img, ai_img, mask, with_pearson=True)
                self._plot_fig2(scan, rpie_img, ai_img, mask, refined)
        self._plot_fig3(sweep)
        self._timed("fig2_fig3", t0)

    def fig4(self) -> None:
        """Low dose: 1/10 of the training exposure, counts scaled up 10x before inference."""
        c, t0 = self.config, time.perf_counter()
        low = simulate_scan("test", c.test_frames, self.step_09, seed=7 + c.seed, exposure_s=EXPOSURE_S / 10)
        mask = low.mask()
        scaled = self.ai_image(low, input_scale=10.0)
        raw = self.ai_image(low)
        rpie_img = rpie_phase(low, c.rpie_iterations)
        refined = self.refined_image(low, input_scale=10.0)
        self.scores("fig4", "ai", "upscale=10", low.truth, scaled, mask, paper=0.86, with_pearson=True)
        self.scores("fig4", "ai+rpie", "upscale=10", low.truth, refined, mask, with_pearson=True)
        self.scores("fig4", "ai", "upscale=1", low.truth, raw, mask, with_pearson=True)
        self.scores("fig4", "rpie", "exposure=1/10", low.truth, rpie_img, mask, with_pearson=True)
        self._plot_images("fig4.png", low, [("truth", low.truth), ("rPIE, 1/10 dose", rpie_img),
                                            ("AI, counts x10", scaled), ("AI x10 + rPIE", refined),
                                            ("AI, counts as measured", raw)], mask,
                          "Fig. 4 analogue: a test scan at 1/10 of the training exposure")
        self._timed("fig4", t0)

    def supp5(self) -> None:
        """Count-rate changes (x4, x16, x40) without retraining."""
        c, t0 = self.config, time.perf_counter()
        panels = []
        for rate in c.countrates:
            scan = simulate_scan("test", c.test_frames, self.step_09, seed=7 + c.seed, exposure_s=EXPOSURE_S * rate)
            image = self.ai_image(scan)
            self.scores("supp5", "ai", f"countrate=x{rate}", scan.truth, image, scan.mask(), with_pearson=True)
            panels.append((f"AI, count rate x{rate}", image))
        self._plot_images("supp5.png", self.test, [("truth", self.test.truth), *panels], self.test.mask(),
                          "Supp. Fig. 5 analogue: count rates the model was not trained on, no retraining")
        self._timed("supp5", t0)

    def supp3(self) -> None:
        """Models retrained on training data with 1/k of the counts, tested at the same dose."""

        c, t0 = self.config, time.perf_counter()
        panels = []
        for k in c.downscales:
            trainer = ContinualTrainer(c.model, self.trainer.config.with_updates(
                epochs=c.downscale_epochs, count_scale=self.trainer.count_scale * k), self.out / f"training_x{k}")
            for i, (scan, labels) in enumerate(self.train_scans):
                trainer.add_scan(replace(labels, frames=thin(labels.frames, k, seed=k + i),
                                         scan_uid=f"{labels.scan_uid}-x{k}"))
            trainer.train(initial_state=self.trainer.state_dict)  # warm start from the full-dose model
            test = simulate_scan("test", c.test_frames, self.step_09, seed=7 + c.seed, exposure_s=EXPOSURE_S / k)
            image = self.ai_image(test, model=trainer.model, count_scale=trainer.count_scale)
            self.scores("supp3", "ai", f"downscale={k}", test.truth, image, test.mask(),
                        paper=0.8 if k == 10000 else None, with_pearson=True)
            panels.append((f"AI retrained at 1/{k} dose", image))
        self._plot_images("supp3.png", self.test, [("truth", self.test.truth), *panels], self.test.mask(),
                          "Supp. Fig. 3 analogue: training and test data with fewer counts")
        self._timed("supp3", t0)

    def table2(self) -> None:
        """Inference time per frame per engine and batch (ONNX Runtime float32/int8 on this CPU)."""

        c, t0 = self.config, time.perf_counter()
        path = export_onnx(self.trainer.model.eval(), self.out / "training" / f"{c.model}.onnx")
        calibration = InputContract(scale=self.trainer.count_scale).prepare(self.test.frames[:32])
        int8 = quantize_int8(path, self.out / "training" / f"{c.model}_int8.onnx", calibration)
        models = [(f"{c.model} float32", path, None), (f"{c.model} int8", int8, None)]
        paper_onnx = shared_data_dir() / "ptychoNN_8.onnx"
        if paper_onnx.is_file():  # the paper's network, dynamic batch, beside its Table 2 (RTX A6000)
            paper = export_onnx(ptychonn2_from_onnx(paper_onnx), self.out / "training" / "ptychonn2_paper.onnx")
            models.append(("PtychoNN 2.0 (paper's weights) float32", paper, PAPER_TABLE2_US))
        table = []
        for name, model, paper_us in models:
            engine = OnnxRuntimeEngine(model, intra_op_threads=c.threads)
            for batch in c.batches:
                x = np.repeat(calibration[:1], batch, axis=0)
                engine.infer(x)
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < (0.5 if c.quick else 2.0):
                    engine.infer(x)
                    n += batch
                us = (time.perf_counter() - start) / n * 1e6
                self.row("table2", "ai", f"engine=onnxruntime-cpu, model={name}, batch={batch}", "us_per_frame", us,
                         paper=(paper_us or {}).get(batch))
                table.append((name, batch, us))
        self._plot_table2(table)
        self._timed("table2", t0)

    # -- output ---------------------------------------------------------------------------
    def write(self) -> None:
        c = self.config
        (self.out / "results.json").write_text(json.dumps(self.rows, indent=1))
        summary = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(c).items()},
                   "timings_s": self.timings, "train_frames": self.trainer.corpus.n_frames,
                   "count_scale": self.trainer.count_scale,
                   "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
                              f"{torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'no GPU'}",
                   "argv": sys.argv[1:]}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))

    def _figure(self, width: float, height: float) -> Any:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(width, height), dpi=90, layout="constrained")
        FigureCanvasAgg(fig)
        return fig

    def _views(self, images: list[NDArray[np.floating]], mask: NDArray[np.bool_]) -> list[NDArray[np.floating]]:
        rows, cols = np.nonzero(mask)
        sl = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        return [np.where(mask, img - np.nanmean(np.where(mask, img, np.nan)), np.nan)[sl] for img in images]

    def _plot_images(self, name: str, scan: Scan, panels: list[tuple[str, NDArray[np.floating]]],
                     mask: NDArray[np.bool_], title: str) -> None:
        views = self._views([img for _, img in panels], mask)
        lim = float(np.nanmax(np.abs(views[0])))
        fig = self._figure(3.2 * len(panels), 3.6)
        for i, ((label, _), view) in enumerate(zip(panels, views)):
            ax = fig.add_subplot(1, len(panels), i + 1)
            ax.imshow(view, cmap="gray", vmin=-lim, vmax=lim)
            ax.set_title(label, fontsize="small")
            ax.set_axis_off()
        fig.suptitle(title, fontsize="small")
        fig.savefig(self.out / name)

    def _plot_fig2(self, scan: Scan, rpie_img: NDArray[np.floating], ai_img: NDArray[np.floating],
                   mask: NDArray[np.bool_], refined: NDArray[np.floating]) -> None:
        views = self._views([scan.truth, rpie_img, ai_img, refined], mask)
        lim = float(np.nanmax(np.abs(views[0])))
        fig = self._figure(16, 3.8)
        axes = fig.subplots(1, 5)
        # the line profile goes through the row of the truth with the most contrast (the letters)
        spread = [float(np.nanstd(row)) if np.isfinite(row).sum() > len(row) // 2 else -1.0 for row in views[0]]
        line = int(np.argmax(spread))
        for ax, view, label in zip(axes[:4], views, ("truth", "rPIE", "AI (stitched)", "AI + rPIE (refined)")):
            ax.imshow(view, cmap="gray", vmin=-lim, vmax=lim)
            ax.axhline(line, color="tab:red", lw=0.8)
            ax.set_title(label, fontsize="small")
            ax.set_axis_off()
        for view, label in zip(views, ("truth", "rPIE", "AI", "AI + rPIE")):
            axes[4].plot(view[line], label=label, lw=1)
        axes[4].set_xlabel("pixel along the red line")
        axes[4].set_ylabel("phase (rad)")
        axes[4].legend(fontsize="small")
        fig.suptitle("Fig. 2 analogue: unseen features (letters), overlap 0.9", fontsize="small")
        fig.savefig(self.out / "fig2.png")

    def _plot_fig3(self, sweep: list[tuple[float, float, float, float, float]]) -> None:
        fig = self._figure(6.5, 4)
        ax = fig.add_subplot()
        overlaps = [s[0] for s in sweep]
        ax.plot(overlaps, [s[1] for s in sweep], "o-", label="rPIE")
        ax.plot(overlaps, [s[2] for s in sweep], "s-", label="AI (stitched)")
        ax.plot(overlaps, [s[4] for s in sweep], "^-", label=f"AI + rPIE ({self.config.refine_seconds:g} s)")
        ax.set_xlabel("overlap ratio")
        ax.set_ylabel("SSIM vs truth")
        ax.invert_xaxis()
        ax.set_ylim(0, 1)
        ax.legend(loc="lower left")
        dose = ax.twinx()
        dose.semilogy(overlaps, [s[3] for s in sweep], ":", color="grey")
        dose.set_ylabel("dose per point (photons/nm$^2$)", color="grey")
        ax.set_title("Fig. 3 analogue: SSIM vs overlap (dotted: dose)", fontsize="small")
        fig.savefig(self.out / "fig3.png")

    def _plot_fig5(self, curve: list[tuple[int, int, float, float]]) -> None:
        fig = self._figure(6, 4)
        ax = fig.add_subplot()
        frames = [c[1] for c in curve]
        ax.plot(frames, [c[2] for c in curve], "o-", label="familiar area (etched features)")
        ax.plot(frames, [c[3] for c in curve], "s-", label="unseen area (letters)")
        ax.set_xlabel("training frames (corpus grows scan by scan)")
        ax.set_ylabel("SSIM vs truth")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title("Fig. 5 analogue: continual learning", fontsize="small")
        fig.savefig(self.out / "fig5.png")

    def _plot_table2(self, table: list[tuple[str, int, float]]) -> None:
        fig = self._figure(6, 4)
        ax = fig.add_subplot()
        for name in dict.fromkeys(t[0] for t in table):
            rows = [t for t in table if t[0] == name]
            ax.plot([t[1] for t in rows], [t[2] for t in rows], "o-", label=f"ONNX Runtime (CPU), {name}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel("us per frame")
        ax.legend(fontsize="small")
        ax.set_title("Table 2 analogue: inference time on this machine", fontsize="small")
        fig.savefig(self.out / "table2.png")


def run_reproduce(config: ReproduceConfig) -> list[dict[str, Any]]:
    """Run every figure; write ``results.json``, the pictures and ``summary.json`` to ``config.out``."""
    import matplotlib

    matplotlib.use("Agg")
    return Reproduction(config).run()

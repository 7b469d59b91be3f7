"""``edge-ptycho demo``: the workflow end to end on the simulated beamline and embedded Tiled.

Stages (each adds its figures to ``OUT/summary.json``, a flat JSON object):

1. a training scan (random etched features, overlap ~0.9) on the simulated beamline, stored in
   the embedded Tiled catalog and replayed from it through a callback;
2. rPIE of the training scan (the "HPC" side), its training labels stored in Tiled beside the
   raw run, and ``ssim_rpie_vs_truth``; picture ``OUT/rpie_vs_truth.png``;
3. the first model in ``OUT/loop/registry``: the model shipped with the package (``edge-ptycho
   registry init``), or with ``--full`` the retraining job (in a process pool) trains PtychoNN 2.0
   on the labels of stage 2 and publishes it;
4. a test scan (letters: features the network never saw) with live inference: every frame goes
   over pvAccess (loopback) to an ``edge-ptycho worker`` process, the phase patches come back
   and are stitched live, the live refiner (AI-seeded rPIE in its own process) refines the image
   during the scan and for ``REFINE_SECONDS`` after it, and both images are stored in Tiled beside
   the raw run (``refine_seconds_after_scan``: from the scan's end until the derived run is stored);
5. rPIE of the test scan as reference: ``ssim_ai_vs_rpie``, ``ssim_ai_vs_truth``,
   ``ssim_refined_vs_truth`` (the live refined image against the truth);
6. the model learns from the scans: by default it adapts to the test scan's own frames without
   labels (``edge-ptycho adapt``: the physics loss, a time budget, deployed when better on held-out
   frames); with ``--full`` a second labelled training scan is run with the retraining callback
   subscribed to the RunEngine (validation of the deployed model, retraining per the policy).
   The worker hot-swaps the new version and the test scan is replayed through it
   (``model_versions``, ``retrain_decisions``, ``ssim_first_model``, ``ssim_second_model``).
   Pictures: ``OUT/ai_vs_rpie.png`` (truth, rPIE, first and second model, the live refined image,
   one colour scale) and
   ``OUT/scan_positions.png`` (the scans and one pattern).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from bluesky import RunEngine

from edge_ptycho_bluesky.callbacks import ScanProgress
from edge_ptycho_bluesky.callbacks.retrain import RetrainCallback
from edge_ptycho_bluesky.callbacks.session import EdgeSession
from edge_ptycho_bluesky.devices import make_simulated_beamline
from edge_ptycho_bluesky.edge.process import WorkerChannels
from edge_ptycho_bluesky.edge.session import EdgeSessionConfig
from edge_ptycho_bluesky.edge.transport import loopback_env
from edge_ptycho_bluesky.metrics import compare
from edge_ptycho_bluesky.plans import spiral_ptycho_scan
from edge_ptycho_bluesky.recon.labels import labels_from_reconstruction, store_labels
from edge_ptycho_bluesky.recon.reconstruct import reconstruct_scan
from edge_ptycho_bluesky.runs import EdgePtychoMeta, read_scan
from edge_ptycho_bluesky.training.adapt import adapt_scan
from edge_ptycho_bluesky.training.shipped import init_registry
from edge_ptycho_bluesky.stitching import stitch
from edge_ptycho_bluesky.storage import (
    StorageConfig,
    connect,
    get_run,
    make_tiled_writer,
    replay,
)
from edge_ptycho_bluesky.training.config import TrainConfig
from edge_ptycho_bluesky.training.jobs import JobConfig
from edge_ptycho_bluesky.training.policy import RetrainPolicyConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick`` shrinks every stage for tests."""

    out: Path
    data_dir: Path | None = None
    quick: bool = False
    full: bool = False
    adapt_seconds: float = 60.0
    step_um: float = 0.05
    train_points: int = 400
    test_points: int = 200
    exposure_s: float = 0.01
    rpie_iterations: int = 100
    epochs: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quick:
            object.__setattr__(self, "train_points", min(self.train_points, 60))
            object.__setattr__(self, "test_points", min(self.test_points, 40))
            object.__setattr__(self, "rpie_iterations", min(self.rpie_iterations, 60))
            object.__setattr__(self, "epochs", min(self.epochs, 2))
            object.__setattr__(self, "adapt_seconds", min(self.adapt_seconds, 15.0))

    @property
    def storage_dir(self) -> Path:
        return self.data_dir or self.out / "tiled"


def _scan(RE, beamline, config: DemoConfig, num_points: int, purpose: str) -> str:
    """A spiral scan; only training scans are marked ``labelled`` (they feed the retraining loop)."""

    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=config.step_um,
                                   num_points=num_points, exposure=config.exposure_s,
                                   labelled=purpose == "train", md={"purpose": purpose}))
    return uid


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; return the summary written to ``OUT/summary.json``."""
    import matplotlib

    matplotlib.use("Agg")

    config.out.mkdir(parents=True, exist_ok=True)
    loopback_env()
    summary: dict[str, Any] = {}
    t0 = time.perf_counter()
    storage = StorageConfig(data_dir=config.storage_dir)
    client = connect(storage)
    writer = make_tiled_writer(client, storage)
    RE = RunEngine({})
    RE.subscribe(writer)
    RE.subscribe(ScanProgress())

    extent = config.step_um * np.sqrt(max(config.train_points, config.test_points)) + 0.1
    train_line = make_simulated_beamline(storage.frames_dir, sample="train", extent_um=extent, seed=config.seed)
    test_line = make_simulated_beamline(storage.frames_dir, sample="test", extent_um=extent, seed=config.seed + 1)

    logger.info("stage 1: training scan (%d points), stored in Tiled and replayed", config.train_points)
    train_uid = _scan(RE, train_line, config, config.train_points, "train")
    counts: dict[str, int] = {}
    replay(get_run(client, train_uid), lambda name, doc: counts.__setitem__(name, counts.get(name, 0) + 1))
    summary["replayed_documents"] = sum(counts.values())
    summary["overlap_ratio"] = EdgePtychoMeta.from_start(get_run(client, train_uid).metadata["start"]).overlap_ratio
    _mark(summary, "stage1_scan", t0)

    logger.info("stage 2: rPIE of the training scan and its labels")
    train_rec = _reconstruct(get_run(client, train_uid), train_line.sample, config)
    truth = train_line.sample.phase
    scores = compare(truth, train_rec.result.phase, train_rec.mask)
    summary["ssim_rpie_vs_truth"] = round(scores["ssim"], 4)
    summary["pearson_rpie_vs_truth"] = round(scores["pearson"], 4)
    summary["rpie_frame_updates_per_s"] = round(train_rec.result.frame_updates_per_s)
    labels = labels_from_reconstruction(train_rec.result, train_rec.frames, scan_uid=train_uid)
    summary["labels_run_uid"] = store_labels(writer, labels, storage.frames_dir)
    _plot_images(config.out / "rpie_vs_truth.png", [truth, train_rec.result.phase], train_rec.mask,
                 ["true phase (training sample)", f"rPIE, SSIM {scores['ssim']:.3f}"])
    _mark(summary, "stage2_rpie", t0)

    loop = JobConfig.under(config.out / "loop", storage, rpie_iterations=config.rpie_iterations,
                           train=TrainConfig(epochs=config.epochs, seed=config.seed, progress=False),
                           policy=RetrainPolicyConfig(min_ssim=MIN_SSIM))
    retrain = RetrainCallback(loop, "process", recorder=writer)
    try:
        if config.full:
            logger.info("stage 3: the retraining job trains the first model on the stored labels")
            retrain.submit(train_uid)
            _wait(retrain)
            first = retrain.outcomes[-1]
            if first.published_version is None:
                raise RuntimeError(f"the first training job did not publish a model: {first.status} "
                                   f"({first.reason}; errors: {list(first.errors)})")
            summary["model_version"] = first.published_version
        else:
            logger.info("stage 3: the model shipped with the package is the first model")
            summary["model_version"] = init_registry(loop.registry_root).version
        _mark(summary, "stage3_train", t0)

        logger.info("stage 4: test scan (%d points) with live inference over pvAccess", config.test_points)
        channels = WorkerChannels.unique("edge_ptycho_demo")
        edge = EdgeSession(RE, client, storage, EdgeSessionConfig(
            registry=loop.registry_root, input_pv=channels.input, output_pv=channels.output,
            status_pv=channels.status, image_pv=channels.input.rsplit(":", 1)[0] + ":image", engine="onnxruntime",
            refine_seconds=REFINE_SECONDS), plot=False)
        try:
            test_uid = _scan(RE, test_line, config, config.test_points, "test")
            t_stop = time.perf_counter()
            live = edge.wait_stored(test_uid)
            summary["refine_seconds_after_scan"] = round(time.perf_counter() - t_stop, 2) if live.refined is not None else None
            summary["refine_missing"] = live.refine_reason or None
            summary["frames_sent"] = edge.forwarder.sent
            _mark(summary, "stage4_live", t0)

            logger.info("stage 5: rPIE of the test scan as the reference for the AI image")
            test_rec = _reconstruct(get_run(client, test_uid), test_line.sample, config)
            test_truth = test_line.sample.phase
            ai_image = _stitch_on_object_grid(live, test_rec)
            ai_vs_rpie = compare(test_rec.result.phase, ai_image, test_rec.mask)
            summary["ssim_ai_vs_rpie"] = round(ai_vs_rpie["ssim"], 4)
            summary["pearson_ai_vs_rpie"] = round(ai_vs_rpie["pearson"], 4)
            summary["ssim_ai_vs_truth"] = round(compare(test_truth, ai_image, test_rec.mask)["ssim"], 4)
            summary["ssim_rpie_vs_truth_test"] = round(
                compare(test_truth, test_rec.result.phase, test_rec.mask)["ssim"], 4)
            refined_image = None
            if live.refined is not None:
                refined_image = _live_image_on_object_grid(live.refined, live, test_rec)
                summary["ssim_refined_vs_truth"] = round(compare(test_truth, refined_image, test_rec.mask)["ssim"], 4)
                summary["refine_sweeps"] = live.refine_stats.get("sweeps")
            else:
                summary["ssim_refined_vs_truth"] = None
            _mark(summary, "stage5_reference", t0)

            if config.full:
                logger.info("stage 6: a second labelled scan drives validation and retraining (RE only)")
                RE.subscribe(retrain)
                second_line = make_simulated_beamline(storage.frames_dir, sample="train", extent_um=extent,
                                                      seed=config.seed + 2)
                second_uid = _scan(RE, second_line, config, config.train_points, "train")
                _wait(retrain)
                versions = [o.published_version for o in retrain.outcomes if o.published_version]
                decisions = [f"{o.scan_uid[:8]}: {o.status} ({o.reason})" for o in retrain.outcomes]
            else:
                logger.info("stage 6: the model adapts to the test scan's own frames (no labels, %.0f s)",
                            config.adapt_seconds)
                second_uid = None
                adapted = adapt_scan(read_scan(get_run(client, test_uid)), loop.registry_root,
                                     seconds=config.adapt_seconds)
                versions = [summary["model_version"]] + ([adapted.version] if adapted.deployed else [])
                decisions = [f"{test_uid[:8]}: {'adapted' if adapted.deployed else 'not adapted'} (held-out "
                             f"physics loss {adapted.loss_before:.4g} -> {adapted.loss_after:.4g})"]
            summary["model_versions"] = versions
            summary["retrain_decisions"] = decisions
            served = _wait_for_model(edge, versions[-1])
            logger.info("replaying the test scan through the edge worker (model %s)", served)
            again = edge.replay(test_uid)
            second_image = _stitch_on_object_grid(again, test_rec)
            second_vs_rpie = compare(test_rec.result.phase, second_image, test_rec.mask)
            _mark(summary, "stage6_retrain_replay", t0)
        finally:
            edge.close()
    finally:
        retrain.close()
    stats, forwarder = edge.worker_stats, edge.forwarder
    summary.update({
        "frames_inferred": len(live.frame_indices),
        # Frames of the live test scan that got no patch (dropped by the worker or the forwarder).
        "frames_dropped": len(live.missing),
        "worker_drop_reasons": ", ".join(f"{k}={v}" for k, v in sorted(stats.get("dropped", {}).items())) or "none",
        "forwarder_failures": forwarder.dropped + forwarder.failed,
        "latency_p50_ms": round(float(stats.get("e2e_p50_ms", float("nan"))), 2),
        "latency_p99_ms": round(float(stats.get("e2e_p99_ms", float("nan"))), 2),
        "transport": "pvAccess (loopback)",
        "engine": stats.get("engine"),
        "inference_run_uid": live.derived_run_uid,
        "replay_inference_run_uid": again.derived_run_uid,
        "replay_model_versions": sorted(set(again.model_versions)),
        "ssim_first_model": summary["ssim_ai_vs_rpie"],
        "ssim_second_model": round(second_vs_rpie["ssim"], 4),
        "pearson_second_model": round(second_vs_rpie["pearson"], 4),
    })
    panels = [test_truth, test_rec.result.phase, ai_image, second_image]
    titles = ["true phase (test sample)", "rPIE", f"first model {versions[0]} live, SSIM {summary['ssim_first_model']:.3f}",
              f"{'after retraining' if config.full else 'adapted'} {versions[-1]}, SSIM {summary['ssim_second_model']:.3f}"]
    if refined_image is not None:
        panels.append(refined_image)
        titles.append(f"live refined (AI-seeded rPIE), SSIM vs truth {summary['ssim_refined_vs_truth']:.3f}")
    _plot_images(config.out / "ai_vs_rpie.png", panels, test_rec.mask, titles)

    summary["train_scan_uid"], summary["test_scan_uid"], summary["second_train_scan_uid"] = (
        train_uid, test_uid, second_uid)
    uids = [uid for uid in (train_uid, test_uid, second_uid) if uid is not None]
    summary["scans"] = uids
    images = {uid: get_run(client, uid)["primary"]["ptycho_det_image"] for uid in uids}
    summary["frames_stored"] = int(sum(image.shape[0] for image in images.values()))
    _plot_scans(config.out / "scan_positions.png", client, uids, images[test_uid][0])
    summary["time_s"] = round(time.perf_counter() - t0, 2)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo written to %s", config.out)
    return summary


#: The live refiner's budget after the test scan's last frame (s).
REFINE_SECONDS = 10.0

#: Retrain whenever the deployed model's SSIM against the labels is below this, however close it
#: is to its own (possibly poor) expected level: the paper's accuracy (SSIM ~0.85 against rPIE).
MIN_SSIM = 0.85


def _mark(summary: dict[str, Any], stage: str, t0: float) -> None:
    summary[f"time_{stage}_s"] = round(time.perf_counter() - t0, 2)


def _wait(retrain, timeout: float = 3600.0) -> None:
    if not retrain.wait_idle(timeout):
        raise RuntimeError(f"the retraining job did not finish within {timeout:.0f} s: {retrain.status()}")


def _wait_for_model(edge, version: str, timeout: float = 60.0) -> str | None:
    """Wait until the edge worker reports ``version`` (its hot swap); return what it serves."""
    deadline = time.monotonic() + timeout
    served = None
    while time.monotonic() < deadline:
        try:
            served = edge.status().get("model_version")
        except Exception as exc:  # the status channel is momentarily unreadable
            logger.debug("worker status: %s", exc)
        if served == version:
            return served
        time.sleep(0.5)
    logger.warning("the edge worker still serves %s, not %s, after %.0f s", served, version, timeout)
    return served


@dataclass
class _Reconstruction:
    result: Any  # RPIEResult
    frames: np.ndarray
    mask: np.ndarray  # the well-lit (scanned) region of the object grid


def _reconstruct(run, sample, config: DemoConfig) -> _Reconstruction:
    """rPIE of a stored run, on the simulated sample's object grid (so the truth lines up).

    Nothing of the simulation's truth goes in: the starting probe is modelled from the recorded
    optics (beam diameter) and the data, and refined.
    """
    scan = read_scan(run)
    result = reconstruct_scan(scan, object_shape=sample.transmission.shape, iterations=config.rpie_iterations,
                              progress=True)
    return _Reconstruction(result, scan.frames, result.scanned_mask(0.3))


def _stitch_on_object_grid(live, rec: _Reconstruction) -> np.ndarray:
    """The live patches stitched on the rPIE object grid (for a pixel-to-pixel comparison)."""

    positions = rec.result.positions[live.frame_indices]
    image, _ = stitch(live.patches, positions, shape=rec.result.object.shape)
    return image


def _live_image_on_object_grid(image: np.ndarray, live, rec: _Reconstruction) -> np.ndarray:
    """An image on the live stitch's grid moved onto the rPIE object grid (the shift of the patches'
    window corners between the two, sub-pixel part interpolated), NaN where the live grid does not reach."""
    from scipy.ndimage import shift as shift_image

    offset = np.median(rec.result.positions[live.frame_indices] - live.corners, axis=0)
    padded = np.full(rec.result.object.shape, np.nan, dtype=np.float32)
    h, w = min(image.shape[0], padded.shape[0]), min(image.shape[1], padded.shape[1])
    padded[:h, :w] = image[:h, :w]
    valid = np.isfinite(padded)
    moved = shift_image(np.nan_to_num(padded), offset, order=1, cval=0.0)
    inside = shift_image(valid.astype(np.float32), offset, order=1, cval=0.0) > 0.999
    return np.where(inside, moved, np.nan).astype(np.float32)


def _plot_images(path: Path, images: list[np.ndarray], mask: np.ndarray, titles: list[str]) -> None:
    import matplotlib.pyplot as plt

    rows, cols = np.nonzero(mask)
    box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
    shown = [np.where(mask, image - np.nanmedian(image[mask]), np.nan)[box] for image in images]
    # one colour scale for every panel (the reference's range): a flat image looks flat
    low, high = np.nanpercentile(shown[0], [0.5, 99.5])
    fig, axes = plt.subplots(1, len(images), figsize=(4.5 * len(images), 4.2), layout="constrained")
    for ax, view, title in zip(np.atleast_1d(axes), shown, titles):
        im = ax.imshow(view, cmap="gray", vmin=low, vmax=high)
        ax.set(title=title, xticks=[], yticks=[])
    fig.colorbar(im, ax=list(np.atleast_1d(axes)), label="phase (rad)", shrink=0.8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_scans(path: Path, client, uids: list[str], frame: np.ndarray) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(uids) + 1, figsize=(5 * (len(uids) + 1), 4.5))
    for ax, uid in zip(axes, uids):
        run = get_run(client, uid)
        x, y = run["primary"]["stage_x"].read(), run["primary"]["stage_y"].read()
        ax.scatter(x, y, c=np.arange(len(x)), s=6, cmap="viridis")
        ax.set(title=f"{run.metadata['start'].get('purpose', '')} scan {uid[:8]}", xlabel="x (um)",
               ylabel="y (um)", aspect="equal")
    image = axes[-1].imshow(np.log10(1 + frame.astype(np.float64)), cmap="magma")
    axes[-1].set(title="diffraction pattern (log10 counts)")
    fig.colorbar(image, ax=axes[-1])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""``edge-ptycho demo``: the workflow end to end on the simulated beamline and embedded Tiled.

Stages (each adds its figures to ``OUT/summary.json``, a flat JSON object):

1. a training scan (random etched features, overlap ~0.9) and a test scan (letters, unseen
   features) on the simulated beamline, stored in the embedded Tiled catalog;
2. the test scan replayed from Tiled through a callback, with its frames read back;
3. pictures: ``OUT/scan_positions.png`` (both scans' positions and one diffraction pattern).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; ``quick`` shrinks every stage for tests."""

    out: Path
    data_dir: Path | None = None
    quick: bool = False
    step_um: float = 0.05
    train_points: int = 400
    test_points: int = 200
    exposure_s: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.quick:
            object.__setattr__(self, "train_points", min(self.train_points, 60))
            object.__setattr__(self, "test_points", min(self.test_points, 40))

    @property
    def storage_dir(self) -> Path:
        return self.data_dir or self.out / "tiled"


def _scan(RE, beamline, config: DemoConfig, num_points: int, purpose: str) -> str:
    from edge_ptycho_bluesky.plans import spiral_ptycho_scan

    (uid,) = RE(spiral_ptycho_scan([beamline.det], beamline.stage.x, beamline.stage.y, step=config.step_um,
                                   num_points=num_points, exposure=config.exposure_s, md={"purpose": purpose}))
    return uid


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo; return the summary written to ``OUT/summary.json``."""
    import matplotlib

    matplotlib.use("Agg")
    from bluesky import RunEngine

    from edge_ptycho_bluesky.callbacks import ScanProgress
    from edge_ptycho_bluesky.devices import make_simulated_beamline
    from edge_ptycho_bluesky.storage import StorageConfig, connect, get_run, make_tiled_writer, replay

    config.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}
    t0 = time.perf_counter()
    storage = StorageConfig(data_dir=config.storage_dir)
    client = connect(storage)
    RE = RunEngine({})
    RE.subscribe(make_tiled_writer(client, storage))
    RE.subscribe(ScanProgress())

    extent = config.step_um * np.sqrt(max(config.train_points, config.test_points)) + 0.1
    train_line = make_simulated_beamline(storage.frames_dir, sample="train", extent_um=extent, seed=config.seed)
    test_line = make_simulated_beamline(storage.frames_dir, sample="test", extent_um=extent, seed=config.seed + 1)
    logger.info("stage 1: training scan (%d points) and test scan (%d points)", config.train_points,
                config.test_points)
    train_uid = _scan(RE, train_line, config, config.train_points, "train")
    test_uid = _scan(RE, test_line, config, config.test_points, "test")
    summary["scans"] = [train_uid, test_uid]
    summary["train_scan_uid"], summary["test_scan_uid"] = train_uid, test_uid

    logger.info("stage 2: replay of the test scan from Tiled")
    counts: dict[str, int] = {}
    replay(get_run(client, test_uid), lambda name, doc: counts.__setitem__(name, counts.get(name, 0) + 1))
    summary["replayed_documents"] = sum(counts.values())
    frames = {uid: get_run(client, uid)["primary"]["ptycho_det_image"].read() for uid in (train_uid, test_uid)}
    summary["frames_stored"] = int(sum(len(f) for f in frames.values()))
    summary["overlap_ratio"] = get_run(client, train_uid).metadata["start"]["edge_ptycho"]["overlap_ratio"]

    _plot_scans(config.out / "scan_positions.png", client, [train_uid, test_uid], frames[test_uid][0])
    summary["time_s"] = round(time.perf_counter() - t0, 2)
    (config.out / "summary.json").write_text(json.dumps(summary, indent=2))
    logger.info("demo written to %s", config.out)
    return summary


def _plot_scans(path: Path, client, uids: list[str], frame: np.ndarray) -> None:
    import matplotlib.pyplot as plt

    from edge_ptycho_bluesky.storage import get_run

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


def add_subcommand(subparsers) -> None:
    """Register ``edge-ptycho demo --out DIR [--quick] [--data-dir DIR]``."""
    parser = subparsers.add_parser("demo", help="run the whole workflow on the simulated beamline")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory (default: demo_out)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="embedded Tiled catalog directory (default: OUT/tiled)")
    parser.add_argument("--quick", action="store_true", help="small scans (for tests)")
    parser.set_defaults(func=lambda args: _main(args))


def _main(args) -> int:
    summary = run_demo(DemoConfig(out=args.out, data_dir=args.data_dir, quick=args.quick))
    print(json.dumps(summary, indent=2))
    return 0

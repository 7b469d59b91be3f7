"""Loss curves of a training run: a PNG picture and the data (JSON, CSV)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from .config import TrainResult

__all__ = ["CURVES_STEM", "save_curves"]

#: File stem of the loss curves written next to a training run (``curves.png/.json/.csv``).
CURVES_STEM = "curves"


def save_curves(
    result: TrainResult, directory: str | os.PathLike[str], stem: str = CURVES_STEM
) -> dict[str, Path]:
    """Write the loss curves as a PNG picture (matplotlib, Agg) and as data (JSON and CSV).

    Parameters
    ----------
    result : TrainResult
    directory : path-like
        Created if needed.
    stem : str
        File name stem.

    Returns
    -------
    dict
        ``{"png": Path, "json": Path, "csv": Path}``. The CSV has the columns ``epoch,
        train_loss, val_loss, lr, time_s``; the JSON holds :meth:`TrainResult.to_json_dict`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {ext: directory / f"{stem}.{ext}" for ext in ("png", "json", "csv")}
    paths["json"].write_text(json.dumps(result.to_json_dict(), indent=1), encoding="utf-8")
    with paths["csv"].open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["epoch", "train_loss", "val_loss", "lr", "time_s"])
        for r in result.history:
            writer.writerow([r.epoch, f"{r.train_loss:.8g}", f"{r.val_loss:.8g}", f"{r.lr:.8g}",
                             f"{r.time_s:.4g}"])

    epochs = [r.epoch for r in result.history]
    fig = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(epochs, [r.train_loss for r in result.history], "o-", ms=3, label="training")
    ax.plot(epochs, [r.val_loss for r in result.history], "s-", ms=3, label="validation")
    if result.best_epoch:
        ax.plot([result.best_epoch], [result.best_val_loss], "k*", ms=12,
                label=f"best (epoch {result.best_epoch})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean absolute error (rad)")
    if all(r.train_loss > 0 and r.val_loss > 0 for r in result.history):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    lr_ax = ax.twinx()
    if len(result.lrs):
        steps = np.arange(1, len(result.lrs) + 1) / max(result.steps_per_epoch, 1)
        lr_ax.plot(steps, result.lrs, color="0.6", lw=1, label="learning rate")
    lr_ax.set_ylabel("learning rate", color="0.4")
    handles, names = ax.get_legend_handles_labels()
    h2, n2 = lr_ax.get_legend_handles_labels()
    ax.legend(handles + h2, names + n2, loc="upper right", fontsize="small")
    ax.set_title(
        f"{result.n_train} training + {result.n_val} validation samples, "
        f"{result.samples_per_s:.0f} samples/s on {result.device} x{result.world_size}",
        fontsize="small",
    )
    fig.savefig(paths["png"])
    return paths

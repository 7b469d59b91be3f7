"""The live picture of a scan: :class:`LivePhasePlot`, the AI mosaic and the refined image side by side."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .edge import IsolatedCallback, LiveStitchCallback

__all__ = ["LivePhasePlot"]

#: Returns the newest refined image as (run uid, phase, stats), or None.
RefinedSource = Callable[[], "tuple[str, NDArray[np.float32], dict[str, Any]] | None"]


class LivePhasePlot(IsolatedCallback):
    """The stitched AI phase of the current run and, with a live refiner, the refined image beside
    it, on one colour scale, with axes in micrometres.

    The figure is made at the first start document. It redraws on a timer every ``interval``
    seconds (the backend's timer, so a fly scan, which emits no event until its end, is drawn as
    its patches arrive), and on events and at stop for backends without timers.

    Parameters
    ----------
    stitch : LiveStitchCallback
        Source of the AI mosaic (:attr:`LiveStitchCallback.current`) and of the final images.
    refined : callable, optional
        Returns the newest refined image (e.g. ``lambda: refiner.latest``); None: one panel.
    interval : float
        Seconds between redraws.
    cmap : str
    """

    def __init__(self, stitch: LiveStitchCallback, *, refined: RefinedSource | None = None, interval: float = 0.5,
                 cmap: str = "twilight_shifted") -> None:
        super().__init__()
        self.stitch = stitch
        self.refined = refined
        self.interval = interval
        self.cmap = cmap
        self.figure: Any = None
        self._image: Any = None          # the AI panel
        self._refined_image: Any = None  # the refined panel
        self._timer: Any = None
        self._uid: str | None = None
        self._extent: tuple[float, float, float, float] | None = None
        self._last = 0.0
        self.redraws = 0

    def start(self, doc: dict[str, Any]) -> None:
        import matplotlib.pyplot as plt

        if self.figure is None or not plt.fignum_exists(self.figure.number):
            panels = 2 if self.refined is not None else 1
            self.figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), squeeze=False)
            self._image = axes[0, 0].imshow(np.zeros((2, 2)), cmap=self.cmap)
            if panels == 2:
                self._refined_image = axes[0, 1].imshow(np.zeros((2, 2)), cmap=self.cmap)
                axes[0, 1].set_title("refined (AI-seeded rPIE): waiting")
            for ax in axes[0]:
                ax.set_xlabel("x (um)")
                ax.set_ylabel("y (um)")
            self.figure.colorbar(self._image, ax=list(axes[0]), label="phase (rad)")
            try:
                self._timer = self.figure.canvas.new_timer(interval=max(int(self.interval * 1000), 50))
                self._timer.add_callback(self.redraw)
                self._timer.start()
            except Exception:  # a backend without timers: events and stop still redraw
                self._timer = None
        self._uid = doc.get("uid")
        self._extent = None
        self._image.axes.set_title(f"scan {doc.get('scan_id', '')}: waiting for patches")
        self._last = 0.0

    def event(self, doc: dict[str, Any]) -> None:
        if time.monotonic() - self._last >= self.interval:
            self.redraw()

    def stop(self, doc: dict[str, Any]) -> None:
        result = self.stitch.results.get(doc["run_start"])
        if result is not None:
            self._show(result.image, len(result.frame_indices), final=True)

    def redraw(self) -> None:
        """Draw the newest AI mosaic and refined image (any thread that may draw)."""
        current = self.stitch.current
        if current is not None and current[2]:
            self._extent = self.stitch.current_extent_um
            self._show(current[0], current[2])

    def _show(self, image: NDArray[np.float32], count: int, final: bool = False) -> None:
        if self._image is None:
            return
        extent = self._extent or (0, image.shape[1], image.shape[0], 0)
        shown = [image]
        self._image.set_data(image)
        self._image.set_extent(extent)
        self._image.axes.set_title(f"AI phase, {count} patches" + (" (final)" if final else ""))
        latest = self.refined() if self.refined is not None else None
        if self._refined_image is not None and latest is not None and latest[0] == self._uid \
                and latest[1].shape == image.shape:
            _, refined, stats = latest
            self._refined_image.set_data(refined)
            self._refined_image.set_extent(extent)
            self._refined_image.axes.set_title(
                f"refined: {stats.get('frames_used', 0)} frames, {stats.get('sweeps', 0)} sweeps")
            shown.append(refined)
        finite = np.concatenate([a[np.isfinite(a)].ravel() for a in shown])
        if finite.size:
            low, high = float(finite.min()), float(finite.max())
            for artist in (self._image, self._refined_image):
                if artist is not None:
                    artist.set_clim(low, high)
        self.figure.canvas.draw_idle()
        self._last = time.monotonic()
        self.redraws += 1

"""A tqdm progress bar over the points of a scan."""

from __future__ import annotations

from typing import Any

from event_model import DocumentRouter
from tqdm.auto import tqdm


class ScanProgress(DocumentRouter):
    """Progress bar of a scan's primary events; the total comes from ``start["num_points"]``.

    Parameters
    ----------
    disable
        Hide the bar (e.g. when output is not a terminal).
    """

    def __init__(self, disable: bool | None = None) -> None:
        super().__init__()
        self._disable = disable
        self._bar: tqdm | None = None

    def start(self, doc: dict[str, Any]) -> None:
        self._bar = tqdm(total=doc.get("num_points"), desc=f"scan {doc.get('scan_id', '')} {doc.get('plan_name', '')}",
                         unit="pt", disable=self._disable, leave=False)

    def event(self, doc: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def event_page(self, doc: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(len(doc["seq_num"]))

    def stop(self, doc: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

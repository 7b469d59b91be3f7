"""Checks shared by the settings dataclasses (training, policy, rPIE, processor arguments)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = ["UnknownOptionError", "check_known_keys", "is_real"]


class UnknownOptionError(ValueError):
    """Settings named an option that does not exist; the message names it and lists the valid ones."""


def check_known_keys(what: str, given: Mapping[str, Any] | Iterable[str], known: Iterable[str]) -> None:
    """Raise :class:`UnknownOptionError` when ``given`` holds names outside ``known``.

    ``what`` names the settings in the message: ``unknown <what> keys [...]; valid keys are [...]``.
    """
    known = set(known)
    unknown = sorted(set(given) - known)
    if unknown:
        raise UnknownOptionError(f"unknown {what} keys {unknown}; valid keys are {sorted(known)}")


def is_real(value: object) -> bool:
    """A finite real number (Python or numpy), not a bool."""
    return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            and math.isfinite(float(value)))  # type: ignore[arg-type]

"""When to reconstruct, validate and retrain: the retraining policy of the paper's Discussion.

Babu, Zhou et al. (Nat. Commun. 2023) validate the deployed network on each new labelled scan
(iterative rPIE phase as ground truth). If the network's structural similarity (SSIM) falls more
than a tolerance (10 %) below the expected level, a retraining is queued; otherwise the costly
iterative reconstruction and retraining are suspended and the data are checked again only at a
prolonged interval (once an hour), resuming as soon as a mismatch reappears.

This module is pure logic with an injected clock, so it can be unit-tested without waiting::

    policy = RetrainPolicy(RetrainPolicyConfig(tolerance=0.10, check_interval_s=3600.0))
    if not policy.should_validate():
        policy.record_skip(scan_uid)                  # suspended: no rPIE, no retraining
    elif registry.current() is None:
        decision = policy.record_no_model(scan_uid)   # action "train": first model
    else:
        ssim = ...                                    # deployed model vs rPIE phase
        decision = policy.record_validation(ssim, expected=model.validation_ssim,
                                            scan_uid=scan_uid)
    # decision.action in {"train", "retrain"} -> queue training (coalesce repeated requests)

Modes: ``"untrained"`` (no model yet: every labelled scan is reconstructed and a first model is
trained), ``"active"`` (every labelled scan is validated), ``"suspended"`` (scans are skipped until
``next_check_at``). The state serialises to JSON (:meth:`RetrainPolicy.to_json`,
:meth:`RetrainPolicy.save`) so a restarted service keeps its schedule; with the default wall
clock (``time.time``) ``next_check_at`` stays meaningful across restarts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal

from ..files import atomic_write
from ..options import check_known_keys, is_real

logger = logging.getLogger(__name__)

__all__ = [
    "ACTIONS",
    "MODES",
    "Decision",
    "RetrainPolicy",
    "RetrainPolicyConfig",
]

Action = Literal["train", "retrain", "suspend", "skip"]
Mode = Literal["untrained", "active", "suspended"]
#: Every value of :attr:`Decision.action`.
ACTIONS: tuple[str, ...] = ("train", "retrain", "suspend", "skip")
#: Every value of :attr:`RetrainPolicy.mode`.
MODES: tuple[str, ...] = ("untrained", "active", "suspended")
_STATE_SCHEMA = 1


@dataclass(frozen=True)
class RetrainPolicyConfig:
    """Settings of :class:`RetrainPolicy`.

    Parameters
    ----------
    tolerance : float
        Relative SSIM drop that is still accepted: retrain when
        ``(expected - ssim) / expected > tolerance``. 0.10 (10 %) as in the paper; ``0 <= x < 1``.
    check_interval_s : float
        How long reconstruction and retraining stay suspended after a good validation, in
        seconds (3600, once an hour, as in the paper); ``> 0``.
    backoff : float
        Factor applied to the interval after each further good periodic check (2.0 doubles it);
        1.0 (default) keeps the paper's fixed interval; ``>= 1``.
    max_check_interval_s : float or None
        Upper bound of the grown interval; None means no bound. Must be ``>= check_interval_s``.
    baseline_ssim : float or None
        Expected SSIM used when the deployed model has no recorded validation SSIM (e.g. an
        imported model); ``0 < x <= 1``.
    min_ssim : float or None
        Absolute floor: retrain whenever the SSIM is below it, whatever the expected level;
        ``-1 <= x <= 1``.
    """

    tolerance: float = 0.10
    check_interval_s: float = 3600.0
    backoff: float = 1.0
    max_check_interval_s: float | None = None
    baseline_ssim: float | None = None
    min_ssim: float | None = None

    def __post_init__(self) -> None:
        if not is_real(self.tolerance) or not 0.0 <= self.tolerance < 1.0:
            raise ValueError(
                f"tolerance must be a relative SSIM drop in [0, 1), e.g. 0.10 for 10 %, "
                f"got {self.tolerance!r}"
            )
        if not is_real(self.check_interval_s) or self.check_interval_s <= 0:
            raise ValueError(
                f"check_interval_s must be a positive number of seconds (e.g. 3600.0 for once an "
                f"hour), got {self.check_interval_s!r}"
            )
        if not is_real(self.backoff) or self.backoff < 1.0:
            raise ValueError(
                f"backoff must be >= 1 (1.0 keeps the interval fixed, 2.0 doubles it), "
                f"got {self.backoff!r}"
            )
        if self.max_check_interval_s is not None and (
            not is_real(self.max_check_interval_s)
            or self.max_check_interval_s < self.check_interval_s
        ):
            raise ValueError(
                f"max_check_interval_s must be None or a number >= check_interval_s "
                f"({self.check_interval_s!r}), got {self.max_check_interval_s!r}"
            )
        if self.baseline_ssim is not None and (
            not is_real(self.baseline_ssim) or not 0.0 < self.baseline_ssim <= 1.0
        ):
            raise ValueError(
                f"baseline_ssim must be None or an SSIM in (0, 1], got {self.baseline_ssim!r}"
            )
        if self.min_ssim is not None and (
            not is_real(self.min_ssim) or not -1.0 <= self.min_ssim <= 1.0
        ):
            raise ValueError(f"min_ssim must be None or an SSIM in [-1, 1], got {self.min_ssim!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RetrainPolicyConfig:
        """Build from a mapping; unknown keys are refused.

        Raises
        ------
        ValueError
            For unknown keys or bad values.
        """
        check_known_keys("RetrainPolicyConfig", data, (f.name for f in fields(cls)))
        return cls(**data)


@dataclass(frozen=True)
class Decision:
    """Outcome of one labelled scan, as decided by :class:`RetrainPolicy`.

    Attributes
    ----------
    action : {"train", "retrain", "suspend", "skip"}
        ``train``: no model yet, train the first one. ``retrain``: the deployed model drifted,
        queue a retraining. ``suspend``: the model is good, stop reconstructing and retraining
        until ``next_check_at``. ``skip``: the scan arrived while suspended and was not validated.
    reason : str
        Human-readable explanation (for logs and documents).
    at : float
        Clock time of the decision (seconds; ``time.time`` by default).
    ssim : float or None
        Measured SSIM of the deployed model against the iterative phase.
    expected : float or None
        Expected SSIM level the measurement was compared with.
    threshold : float or None
        SSIM below which a retraining is triggered.
    next_check_at : float or None
        When the next labelled scan should be validated; None means every labelled scan.
    scan_uid : str or None
        The scan this decision is about.
    """

    action: Action
    reason: str
    at: float
    ssim: float | None = None
    expected: float | None = None
    threshold: float | None = None
    next_check_at: float | None = None
    scan_uid: str | None = None

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {self.action!r}")

    @property
    def needs_training(self) -> bool:
        """True for ``train`` and ``retrain``: a training job should be queued."""
        return self.action in ("train", "retrain")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        check_known_keys("Decision", data, (f.name for f in fields(cls)))
        return cls(**data)


class RetrainPolicy:
    """Decides, scan by scan, whether to validate, retrain or suspend.

    Parameters
    ----------
    config : RetrainPolicyConfig, optional
        Settings; the paper's defaults when omitted.
    clock : callable returning float, optional
        Current time in seconds; ``time.time`` by default. Inject a fake clock in tests.
        Persisted state (``next_check_at``) is in this clock's units, so persist only with a
        wall clock.
    """

    def __init__(
        self,
        config: RetrainPolicyConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if config is None:
            config = RetrainPolicyConfig()
        if not isinstance(config, RetrainPolicyConfig):
            raise TypeError(
                f"config must be a RetrainPolicyConfig, got {type(config).__name__}; build one "
                f"with RetrainPolicyConfig(...) or RetrainPolicyConfig.from_dict(...)"
            )
        if not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        self.config = config
        self._clock = clock
        self._mode: Mode = "untrained"
        self._interval_s = config.check_interval_s
        self._next_check_at: float | None = None
        self._n_validated = 0
        self._n_skipped = 0
        self._n_trainings = 0
        self._last: Decision | None = None

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self._mode!r}, next_check_at={self._next_check_at!r}, "
            f"interval_s={self._interval_s!r})"
        )

    # -- state ---------------------------------------------------------------------------------

    @property
    def mode(self) -> Mode:
        """``"untrained"``, ``"active"`` or ``"suspended"``."""
        return self._mode

    @property
    def next_check_at(self) -> float | None:
        """When suspended, the time from which scans are validated again; otherwise None."""
        return self._next_check_at

    @property
    def interval_s(self) -> float:
        """Length of the current (or next) suspension, in seconds."""
        return self._interval_s

    @property
    def last_decision(self) -> Decision | None:
        """The most recent decision, or None."""
        return self._last

    @property
    def counts(self) -> dict[str, int]:
        """Scans validated, scans skipped and training requests so far."""
        return {
            "validated": self._n_validated,
            "skipped": self._n_skipped,
            "trainings": self._n_trainings,
        }

    def _now(self, now: float | None) -> float:
        t = self._clock() if now is None else now
        if not is_real(t):
            raise ValueError(f"the clock must give a finite number of seconds, got {t!r}")
        return float(t)

    # -- decisions -----------------------------------------------------------------------------

    def should_validate(self, now: float | None = None) -> bool:
        """Whether a newly arrived labelled scan should be reconstructed and validated now.

        False only while suspended and before :attr:`next_check_at`; the caller then skips the
        iterative reconstruction and reports the scan with :meth:`record_skip`.
        """
        if self._mode != "suspended":
            return True
        assert self._next_check_at is not None
        return self._now(now) >= self._next_check_at

    def seconds_until_check(self, now: float | None = None) -> float:
        """Seconds until scans are validated again (0.0 when they are validated now)."""
        if self._mode != "suspended":
            return 0.0
        assert self._next_check_at is not None
        return max(0.0, self._next_check_at - self._now(now))

    def record_no_model(self, scan_uid: str | None = None, *, now: float | None = None) -> Decision:
        """A labelled scan arrived and no model is deployed: train the first one.

        Returns
        -------
        Decision
            ``action="train"``.
        """
        t = self._now(now)
        self._mode = "untrained"
        self._interval_s = self.config.check_interval_s
        self._next_check_at = None
        self._n_trainings += 1
        return self._decide(
            Decision(
                action="train",
                reason="no model is deployed yet: train the first model on the labelled scans",
                at=t,
                scan_uid=scan_uid,
            )
        )

    def record_validation(
        self,
        ssim: float,
        expected: float | None = None,
        *,
        scan_uid: str | None = None,
        now: float | None = None,
    ) -> Decision:
        """Record the deployed model's SSIM against the iterative phase of a labelled scan.

        Parameters
        ----------
        ssim : float
            SSIM of the model's (stitched) phase against the rPIE phase, in [-1, 1].
        expected : float, optional
            Expected SSIM level: the model's validation SSIM recorded at training. Falls back to
            ``config.baseline_ssim``.
        scan_uid : str, optional
            The scan, for the record.
        now : float, optional
            Time of the validation; the clock's time by default.

        Returns
        -------
        Decision
            ``retrain`` when ``ssim`` is more than ``tolerance`` (relative) below the expected
            level, or below ``min_ssim``, or when no expected level is known at all (a retrained
            model records one); ``suspend`` otherwise. A ssim exactly at the tolerance suspends.

        Raises
        ------
        ValueError
            When ``ssim`` is not in [-1, 1] or ``expected`` is not in (0, 1].
        """
        if isinstance(ssim, bool) or not hasattr(ssim, "__float__"):
            raise ValueError(f"ssim must be a finite float in [-1, 1], got {ssim!r}")
        ssim = float(ssim)
        if not math.isfinite(ssim) or not -1.0 <= ssim <= 1.0:
            raise ValueError(f"ssim must be a finite float in [-1, 1], got {ssim!r}")
        if expected is not None:
            if isinstance(expected, bool) or not hasattr(expected, "__float__"):
                raise ValueError(f"expected must be an SSIM in (0, 1] or None, got {expected!r}")
            expected = float(expected)
            if not math.isfinite(expected) or not 0.0 < expected <= 1.0:
                raise ValueError(
                    f"expected must be an SSIM in (0, 1] (the model's validation SSIM), got "
                    f"{expected!r}; pass None to use config.baseline_ssim"
                )
        t = self._now(now)
        cfg = self.config
        level = expected if expected is not None else cfg.baseline_ssim
        floor = cfg.min_ssim
        self._n_validated += 1

        threshold: float | None = None
        if level is not None:
            threshold = level * (1.0 - cfg.tolerance)
        if floor is not None:
            threshold = floor if threshold is None else max(threshold, floor)

        if level is None and floor is None:
            return self._retrain(
                t,
                scan_uid,
                ssim,
                None,
                None,
                f"SSIM {ssim:.3f} cannot be judged: the deployed model has no validation SSIM and "
                f"no baseline_ssim is configured; retraining records one",
            )
        if floor is not None and ssim < floor:
            return self._retrain(
                t,
                scan_uid,
                ssim,
                level,
                threshold,
                f"SSIM {ssim:.3f} is below min_ssim {floor:.3f}",
            )
        if level is not None:
            drop = (level - ssim) / level
            drifted = drop > cfg.tolerance and not math.isclose(
                drop, cfg.tolerance, rel_tol=1e-9, abs_tol=1e-12
            )
            if drifted:
                return self._retrain(
                    t,
                    scan_uid,
                    ssim,
                    level,
                    threshold,
                    f"SSIM {ssim:.3f} is {100 * drop:.1f} % below the expected {level:.3f} "
                    f"(tolerance {100 * cfg.tolerance:.1f} %)",
                )

        # Good: suspend. A further good periodic check grows the interval (backoff).
        if self._mode == "suspended":
            grown = self._interval_s * cfg.backoff
            if cfg.max_check_interval_s is not None:
                grown = min(grown, cfg.max_check_interval_s)
            self._interval_s = grown
        else:
            self._interval_s = cfg.check_interval_s
        self._mode = "suspended"
        self._next_check_at = t + self._interval_s
        within = (
            f"within {100 * cfg.tolerance:.1f} % of the expected {level:.3f}"
            if level is not None
            else f"above min_ssim {floor:.3f}"
        )
        return self._decide(
            Decision(
                action="suspend",
                reason=(
                    f"SSIM {ssim:.3f} is {within}: reconstruction and retraining suspended for "
                    f"{self._interval_s:.0f} s"
                ),
                at=t,
                ssim=ssim,
                expected=level,
                threshold=threshold,
                next_check_at=self._next_check_at,
                scan_uid=scan_uid,
            )
        )

    def _retrain(
        self,
        t: float,
        scan_uid: str | None,
        ssim: float,
        level: float | None,
        threshold: float | None,
        why: str,
    ) -> Decision:
        resumed = self._mode == "suspended"
        self._mode = "active"
        self._interval_s = self.config.check_interval_s
        self._next_check_at = None
        self._n_trainings += 1
        suffix = "; resuming validation of every labelled scan" if resumed else ""
        return self._decide(
            Decision(
                action="retrain",
                reason=f"{why}: retrain{suffix}",
                at=t,
                ssim=ssim,
                expected=level,
                threshold=threshold,
                next_check_at=None,
                scan_uid=scan_uid,
            )
        )

    def record_skip(self, scan_uid: str | None = None, *, now: float | None = None) -> Decision:
        """Record a labelled scan that was not reconstructed or validated (suspended).

        Returns
        -------
        Decision
            ``action="skip"``; the state does not change.
        """
        t = self._now(now)
        self._n_skipped += 1
        if self._mode == "suspended":
            assert self._next_check_at is not None
            reason = (
                f"suspended: next validation in {max(0.0, self._next_check_at - t):.0f} s"
            )
        else:
            reason = f"skipped by the caller while {self._mode} (not required by the policy)"
        return self._decide(
            Decision(
                action="skip",
                reason=reason,
                at=t,
                next_check_at=self._next_check_at,
                scan_uid=scan_uid,
            )
        )

    def resume(self, reason: str = "resumed by request") -> None:
        """Leave suspension and validate every labelled scan again.

        Use it when something outside the policy changed: a model deployed or rolled back by
        hand, a new sample, probe or detector configuration.
        """
        if self._mode == "suspended":
            self._mode = "active"
            logger.info("retraining policy: %s; validating every labelled scan", reason)
        self._interval_s = self.config.check_interval_s
        self._next_check_at = None

    def _decide(self, decision: Decision) -> Decision:
        self._last = decision
        level = logging.DEBUG if decision.action == "skip" else logging.INFO
        logger.log(level, "retraining policy: %s (%s)", decision.action, decision.reason)
        return decision

    # -- persistence ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The mutable state as a JSON-ready dict (the config is not included)."""
        return {
            "schema": _STATE_SCHEMA,
            "mode": self._mode,
            "interval_s": self._interval_s,
            "next_check_at": self._next_check_at,
            "counts": self.counts,
            "last_decision": None if self._last is None else self._last.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`.

        The interval is clamped to the current config's bounds, so a changed config applies.

        Raises
        ------
        ValueError
            When the state is malformed; the policy is then unchanged.
        """
        if not isinstance(state, Mapping) or state.get("schema") != _STATE_SCHEMA:
            raise ValueError(
                f"not a RetrainPolicy state of schema {_STATE_SCHEMA} (got {state!r:.200})"
            )
        mode = state.get("mode")
        if mode not in MODES:
            raise ValueError(f"state has mode {mode!r}; expected one of {MODES}")
        interval = state.get("interval_s")
        if not is_real(interval) or interval <= 0:
            raise ValueError(f"state has a bad interval_s {interval!r}")
        next_check = state.get("next_check_at")
        if mode == "suspended":
            if not is_real(next_check):
                raise ValueError(
                    f"suspended state needs a numeric next_check_at, got {next_check!r}"
                )
        elif next_check is not None:
            raise ValueError(
                f"state in mode {mode!r} must have next_check_at null, got {next_check!r}"
            )
        counts = state.get("counts", {})
        if not isinstance(counts, Mapping) or not all(
            isinstance(counts.get(k, 0), int) and counts.get(k, 0) >= 0
            for k in ("validated", "skipped", "trainings")
        ):
            raise ValueError(f"state has bad counts {counts!r}")
        last = state.get("last_decision")
        last_decision = None if last is None else Decision.from_dict(last)

        cfg = self.config
        if cfg.backoff == 1.0:
            interval = cfg.check_interval_s
        else:
            interval = max(float(interval), cfg.check_interval_s)
            if cfg.max_check_interval_s is not None:
                interval = min(interval, cfg.max_check_interval_s)
        self._mode = mode
        self._interval_s = interval
        self._next_check_at = None if next_check is None else float(next_check)
        self._n_validated = int(counts.get("validated", 0))
        self._n_skipped = int(counts.get("skipped", 0))
        self._n_trainings = int(counts.get("trainings", 0))
        self._last = last_decision

    def to_json(self) -> str:
        """The state as JSON text."""
        return json.dumps(self.state_dict(), indent=2, allow_nan=False)

    @classmethod
    def from_json(
        cls,
        text: str,
        config: RetrainPolicyConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> RetrainPolicy:
        """A policy with ``config`` and the state from :meth:`to_json`."""
        policy = cls(config, clock)
        try:
            state = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"RetrainPolicy state is not valid JSON: {exc}") from exc
        policy.load_state_dict(state)
        return policy

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the state to ``path`` atomically (temp file, fsync, ``os.replace``)."""
        atomic_write(path, (self.to_json() + "\n").encode("utf-8"))

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        config: RetrainPolicyConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> RetrainPolicy:
        """A policy restored from :meth:`save`'s file, or a fresh one when the file is absent."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(config, clock)
        try:
            return cls.from_json(text, config, clock)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}; delete the file to start the policy afresh") from exc

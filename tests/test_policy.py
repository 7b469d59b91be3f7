"""Tests of the retraining policy (edge_ptycho_bluesky.training.policy) with a fake clock."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_ptycho_bluesky.training.policy import (
    ACTIONS,
    Decision,
    RetrainPolicy,
    RetrainPolicyConfig,
)

HOUR = 3600.0


class FakeClock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@pytest.fixture()
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture()
def policy(clock: FakeClock) -> RetrainPolicy:
    return RetrainPolicy(RetrainPolicyConfig(), clock)


def suspend(policy: RetrainPolicy, expected: float = 0.9) -> Decision:
    decision = policy.record_validation(expected, expected=expected)
    assert decision.action == "suspend"
    return decision


def test_defaults_follow_the_paper() -> None:
    cfg = RetrainPolicyConfig()
    assert cfg.tolerance == 0.10 and cfg.check_interval_s == HOUR and cfg.backoff == 1.0


def test_first_scan_trains(policy: RetrainPolicy, clock: FakeClock) -> None:
    assert policy.mode == "untrained"
    assert policy.should_validate()
    decision = policy.record_no_model("scan-1")
    assert decision.action == "train" and decision.needs_training
    assert decision.scan_uid == "scan-1" and decision.at == clock.t
    assert "no model" in decision.reason
    assert policy.mode == "untrained" and policy.should_validate()
    assert policy.counts == {"validated": 0, "skipped": 0, "trainings": 1}


def test_good_model_suspends_for_the_check_interval(
    policy: RetrainPolicy, clock: FakeClock
) -> None:
    policy.record_no_model()
    decision = policy.record_validation(0.85, expected=0.9, scan_uid="scan-2")
    assert decision.action == "suspend" and not decision.needs_training
    assert decision.ssim == pytest.approx(0.85)
    assert decision.expected == pytest.approx(0.9)
    assert decision.threshold == pytest.approx(0.81)
    assert decision.next_check_at == clock.t + HOUR
    assert policy.mode == "suspended" and policy.next_check_at == clock.t + HOUR
    assert "suspended" in decision.reason


def test_suspended_scans_are_skipped_until_the_interval_elapses(
    policy: RetrainPolicy, clock: FakeClock
) -> None:
    suspend(policy)
    start = clock.t
    for _ in range(5):
        clock.advance(HOUR / 6)
        assert not policy.should_validate()
        skip = policy.record_skip("late-scan")
        assert skip.action == "skip" and skip.next_check_at == start + HOUR
        assert policy.mode == "suspended"
    assert policy.seconds_until_check() == pytest.approx(HOUR / 6)
    clock.advance(HOUR / 6 - 1e-3)
    assert not policy.should_validate()
    clock.advance(1e-3)
    assert policy.should_validate()
    assert policy.seconds_until_check() == 0.0
    assert policy.should_validate(now=start + 10.0) is False  # an explicit time wins over the clock
    assert policy.counts["skipped"] == 5


def test_drift_triggers_retrain(policy: RetrainPolicy) -> None:
    decision = policy.record_validation(0.70, expected=0.90, scan_uid="scan-3")
    assert decision.action == "retrain" and decision.needs_training
    assert decision.next_check_at is None
    assert "22.2 % below" in decision.reason
    assert policy.mode == "active" and policy.should_validate()
    # still drifting on the next scan (model not replaced yet): asks again; callers coalesce
    assert policy.record_validation(0.71, expected=0.90).action == "retrain"
    assert policy.counts == {"validated": 2, "skipped": 0, "trainings": 2}


def test_mismatch_while_suspended_resumes_checking_every_scan(
    policy: RetrainPolicy, clock: FakeClock
) -> None:
    suspend(policy)
    clock.advance(HOUR)
    assert policy.should_validate()
    decision = policy.record_validation(0.5, expected=0.9)
    assert decision.action == "retrain"
    assert "resuming" in decision.reason
    assert policy.mode == "active" and policy.next_check_at is None
    clock.advance(1.0)
    assert policy.should_validate()  # every labelled scan again
    # the retrained model is good: suspend for the base interval again
    decision = policy.record_validation(0.92, expected=0.93)
    assert decision.action == "suspend" and decision.next_check_at == clock.t + HOUR


@pytest.mark.parametrize(
    ("tolerance", "expected", "ssim", "action"),
    [
        (0.10, 1.0, 0.9, "suspend"),  # exactly 10 % below: still within tolerance
        (0.10, 1.0, 0.8999, "retrain"),
        (0.10, 0.8, 0.72, "suspend"),  # 0.8 * 0.9 is 0.7200000000000001 in floating point
        (0.10, 0.8, 0.7199, "retrain"),
        (0.10, 0.8, 0.95, "suspend"),  # better than expected
        (0.0, 0.8, 0.8, "suspend"),
        (0.0, 0.8, 0.7999, "retrain"),
        (0.5, 0.6, 0.3, "suspend"),
        (0.5, 0.6, 0.2999, "retrain"),
        (0.10, 0.9, -0.2, "retrain"),
    ],
)
def test_tolerance_boundaries(
    clock: FakeClock, tolerance: float, expected: float, ssim: float, action: str
) -> None:
    policy = RetrainPolicy(RetrainPolicyConfig(tolerance=tolerance), clock)
    decision = policy.record_validation(ssim, expected=expected)
    assert decision.action == action
    assert decision.threshold == pytest.approx(expected * (1 - tolerance))


def test_numpy_scalars_are_accepted(policy: RetrainPolicy) -> None:
    decision = policy.record_validation(np.float32(0.88), expected=np.float64(0.9))
    assert decision.action == "suspend" and isinstance(decision.ssim, float)
    json.dumps(decision.to_dict())


def test_backoff_grows_interval_up_to_maximum_and_resets(clock: FakeClock) -> None:
    cfg = RetrainPolicyConfig(backoff=2.0, max_check_interval_s=4 * HOUR)
    policy = RetrainPolicy(cfg, clock)
    intervals = []
    for _ in range(4):
        d = suspend(policy)
        intervals.append(d.next_check_at - clock.t)  # type: ignore[operator]
        clock.t = d.next_check_at  # type: ignore[assignment]
        assert policy.should_validate()
    assert intervals == [HOUR, 2 * HOUR, 4 * HOUR, 4 * HOUR]
    assert policy.record_validation(0.1, expected=0.9).action == "retrain"
    assert suspend(policy).next_check_at == clock.t + HOUR


def test_fixed_interval_by_default(policy: RetrainPolicy, clock: FakeClock) -> None:
    for _ in range(3):
        d = suspend(policy)
        assert d.next_check_at == clock.t + HOUR
        clock.t = d.next_check_at  # type: ignore[assignment]


def test_expected_level_sources(clock: FakeClock) -> None:
    with_baseline = RetrainPolicy(RetrainPolicyConfig(baseline_ssim=0.8), clock)
    d = with_baseline.record_validation(0.75)
    assert d.action == "suspend" and d.expected == pytest.approx(0.8)
    assert with_baseline.record_validation(0.70).action == "retrain"
    # the model's own validation SSIM wins over the configured baseline
    assert with_baseline.record_validation(0.75, expected=0.95).action == "retrain"

    no_level = RetrainPolicy(RetrainPolicyConfig(), clock)
    d = no_level.record_validation(0.99)
    assert d.action == "retrain" and "no validation SSIM" in d.reason

    floor_only = RetrainPolicy(RetrainPolicyConfig(min_ssim=0.6), clock)
    assert floor_only.record_validation(0.65).action == "suspend"
    assert floor_only.record_validation(0.55).action == "retrain"


def test_min_ssim_floor_applies_even_within_tolerance(clock: FakeClock) -> None:
    policy = RetrainPolicy(RetrainPolicyConfig(min_ssim=0.7), clock)
    d = policy.record_validation(0.68, expected=0.72)  # 5.6 % below expected, below the floor
    assert d.action == "retrain" and "min_ssim" in d.reason
    assert d.threshold == pytest.approx(0.7)


def test_resume_leaves_suspension(policy: RetrainPolicy, clock: FakeClock) -> None:
    suspend(policy)
    assert not policy.should_validate()
    policy.resume("model rolled back by hand")
    assert policy.mode == "active" and policy.should_validate() and policy.next_check_at is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"tolerance": -0.1},
        {"tolerance": 1.0},
        {"tolerance": math.nan},
        {"tolerance": True},
        {"tolerance": "0.1"},
        {"check_interval_s": 0.0},
        {"check_interval_s": -5.0},
        {"check_interval_s": math.inf},
        {"backoff": 0.5},
        {"backoff": math.nan},
        {"check_interval_s": 600.0, "max_check_interval_s": 300.0},
        {"baseline_ssim": 0.0},
        {"baseline_ssim": 1.5},
        {"min_ssim": 2.0},
    ],
)
def test_bad_config_values_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        RetrainPolicyConfig(**kwargs)


def test_config_from_dict_rejects_unknown_keys() -> None:
    assert RetrainPolicyConfig.from_dict({"tolerance": 0.2}).tolerance == 0.2
    with pytest.raises(ValueError, match="unknown RetrainPolicyConfig keys \\['tolerence'\\]"):
        RetrainPolicyConfig.from_dict({"tolerence": 0.2})


@pytest.mark.parametrize(
    ("ssim", "expected"),
    [
        (1.5, 0.9),
        (math.nan, 0.9),
        ("0.9", 0.9),
        (True, 0.9),
        (0.8, 0.0),
        (0.8, 1.2),
        (0.8, math.inf),
    ],
)
def test_bad_measurements_raise(policy: RetrainPolicy, ssim: object, expected: object) -> None:
    with pytest.raises(ValueError, match="ssim|expected"):
        policy.record_validation(ssim, expected=expected)  # type: ignore[arg-type]
    assert policy.mode == "untrained" and policy.counts["validated"] == 0


def test_bad_constructor_arguments() -> None:
    with pytest.raises(TypeError, match="RetrainPolicyConfig"):
        RetrainPolicy({"tolerance": 0.1})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clock"):
        RetrainPolicy(RetrainPolicyConfig(), clock=123.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="action"):
        Decision(action="explode", reason="", at=0.0)  # type: ignore[arg-type]
    assert set(ACTIONS) == {"train", "retrain", "suspend", "skip"}


def test_state_survives_a_restart(tmp_path: Path, clock: FakeClock) -> None:
    cfg = RetrainPolicyConfig(backoff=2.0, max_check_interval_s=8 * HOUR)
    policy = RetrainPolicy(cfg, clock)
    policy.record_no_model("s1")
    suspend(policy)
    clock.advance(HOUR)
    suspend(policy)  # interval grew to 2 h
    policy.record_skip("s4")
    path = tmp_path / "policy_state.json"
    policy.save(path)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp left

    restarted = RetrainPolicy.load(path, cfg, clock)
    assert restarted.mode == "suspended"
    assert restarted.next_check_at == policy.next_check_at == clock.t + 2 * HOUR
    assert restarted.interval_s == 2 * HOUR
    assert restarted.counts == policy.counts == {"validated": 2, "skipped": 1, "trainings": 1}
    assert restarted.last_decision == policy.last_decision
    assert not restarted.should_validate()
    clock.advance(2 * HOUR)
    assert restarted.should_validate()
    assert restarted.state_dict()["mode"] == "suspended"
    assert json.loads(restarted.to_json()) == json.loads(policy.to_json())

    fresh = RetrainPolicy.load(tmp_path / "absent.json", cfg, clock)
    assert fresh.mode == "untrained"


def test_restart_with_a_changed_config_clamps_the_interval(clock: FakeClock) -> None:
    policy = RetrainPolicy(RetrainPolicyConfig(backoff=2.0), clock)
    suspend(policy)
    clock.advance(HOUR)
    suspend(policy)
    clock.advance(2 * HOUR)
    suspend(policy)
    assert policy.interval_s == 4 * HOUR
    narrower = RetrainPolicyConfig(backoff=2.0, max_check_interval_s=2 * HOUR)
    restored = RetrainPolicy.from_json(policy.to_json(), narrower, clock)
    assert restored.interval_s == 2 * HOUR
    fixed = RetrainPolicy.from_json(policy.to_json(), RetrainPolicyConfig(), clock)
    assert fixed.interval_s == HOUR


@pytest.mark.parametrize(
    "state",
    [
        "not json",
        json.dumps({"schema": 99}),
        json.dumps({"schema": 1, "mode": "sleeping", "interval_s": 3600.0, "next_check_at": None}),
        json.dumps({"schema": 1, "mode": "suspended", "interval_s": 3600.0, "next_check_at": None}),
        json.dumps({"schema": 1, "mode": "active", "interval_s": -1.0, "next_check_at": None}),
    ],
)
def test_corrupt_state_is_refused(tmp_path: Path, clock: FakeClock, state: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(state)
    with pytest.raises(ValueError, match="state.json"):
        RetrainPolicy.load(path, RetrainPolicyConfig(), clock)

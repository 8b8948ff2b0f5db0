"""Renewal timing, the renewal state machine (pure core) and its state file (issue 6 groundwork)."""

from __future__ import annotations

import itertools
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gatewayd.core.errors import RenewalRefused, RenewalStateError
from gatewayd.core.renewal import (
    RESUME,
    TRANSITIONS,
    Event,
    RenewBefore,
    Resume,
    Step,
    age_due,
    due_time,
    next_step,
    parse_duration,
    renewal_due,
    retry_delay,
)
from gatewayd.stores.renewal import Outcome, RenewalState, RenewalStore

DAY = 86400.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("45s", 45), ("90m", 5400), ("12h", 43200), ("30d", 30 * DAY), ("1d12h", 1.5 * DAY), ("0.5h", 1800)],
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "30", "d", "30x", "-1d", "0s", "1d 2h", "h1", "1.d"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_renew_before() -> None:
    assert RenewBefore.parse("33%") == RenewBefore(share=0.33)
    assert RenewBefore.parse("30d") == RenewBefore(seconds=30 * DAY)
    for bad in ("0%", "100%", "x%", "150%"):
        with pytest.raises(ValueError, match="between 0% and 100%"):
            RenewBefore.parse(bad)
    assert RenewBefore(seconds=400 * DAY).window(365 * DAY) == 365 * DAY  # never more than the lifetime


def test_due_time_examples() -> None:
    year = 365 * DAY
    # 33% of a year before expiry, no jitter
    assert due_time(0, year, RenewBefore(share=0.33), 0.0) == pytest.approx(year * 0.67)
    # 5 days before expiry; the largest jitter moves it half a day earlier (10% of the window) ...
    assert due_time(0, year, RenewBefore(seconds=5 * DAY), 0.0) == year - 5 * DAY
    assert due_time(0, year, RenewBefore(seconds=5 * DAY), 0.999999) == pytest.approx(year - 5.5 * DAY, abs=1)
    # ... but never more than a day
    assert due_time(0, year, RenewBefore(seconds=30 * DAY), 0.999999) == pytest.approx(year - 31 * DAY, abs=1)
    # a 10-minute certificate (the demo's): due after 6.7 minutes at 33%
    assert due_time(1000, 1600, RenewBefore(share=0.33), 0.0) == pytest.approx(1000 + 402)
    with pytest.raises(ValueError, match="jitter"):
        due_time(0, year, RenewBefore(share=0.33), 1.0)


@given(
    start=st.floats(0, 2e9),
    lifetime=st.floats(1, 20 * 365 * DAY),
    share=st.floats(0.01, 0.99),
    jitter=st.floats(0, 0.999999),
)
def test_due_time_lies_inside_the_validity(
    start: float, lifetime: float, share: float, jitter: float
) -> None:
    due = due_time(start, start + lifetime, RenewBefore(share=share), jitter)
    assert start <= due <= start + lifetime
    no_jitter = due_time(start, start + lifetime, RenewBefore(share=share), 0.0)
    assert no_jitter - min(share * lifetime * 0.1, DAY) - 1e-6 <= due <= no_jitter


def test_age_trigger_rotates_certificates_that_expire_in_2049() -> None:
    """Issue 18, point 5: AWS IoT's certificates run to 2049-12-31, so 33% of the lifetime before expiry is
    ~2042; with max_age 365 days the key rotates yearly (Device Defender's default audit age)."""
    issued = 1_767_225_600.0  # 2026-01-01
    aws_expiry = 2_524_607_999.0  # 2049-12-31T23:59:59Z
    policy = RenewBefore.parse("33%")
    by_expiry, why = renewal_due(issued, aws_expiry, policy, None, 0.0)
    assert why == "expiry" and by_expiry > issued + 15 * 365 * DAY
    when, why = renewal_due(issued, aws_expiry, policy, 365 * DAY, 0.0)
    assert why == "age" and when == issued + 365 * DAY
    jittered = age_due(issued, 365 * DAY, 0.999)
    assert issued + 364 * DAY < jittered < issued + 365 * DAY  # at most a day earlier
    short = renewal_due(issued, issued + 30 * DAY, policy, 365 * DAY, 0.0)  # a 30-day certificate: expiry
    assert short == (due_time(issued, issued + 30 * DAY, policy, 0.0), "expiry")
    with pytest.raises(ValueError, match="jitter"):
        age_due(issued, DAY, 1.0)


@given(attempt=st.integers(1, 100), rand=st.floats(0, 0.999999))
def test_retry_delay_is_capped_and_never_zero(attempt: int, rand: float) -> None:
    delay = retry_delay(attempt, 60, 3600, rand)
    ceiling = min(3600, 60 * 2 ** min(attempt - 1, 32))
    assert ceiling / 2 <= delay < ceiling + 1e-9


def test_retry_delay_grows_then_caps() -> None:
    assert [retry_delay(n, 60, 600, 0.0) for n in range(1, 7)] == [30, 60, 120, 240, 300, 300]
    with pytest.raises(ValueError):
        retry_delay(0, 60, 600, 0.0)


def test_every_transition_is_in_the_table_or_refused_unchanged() -> None:
    for step, event in itertools.product(Step, Event):
        if (step, event) in TRANSITIONS:
            assert next_step(step, event) is TRANSITIONS[(step, event)]
        else:
            with pytest.raises(RenewalRefused, match=f"{event.value} is not possible in step {step.value}"):
                next_step(step, event)


def test_the_happy_path_and_every_failure_before_promotion() -> None:
    step = Step.IDLE
    for event in (Event.START, Event.KEY_CREATED, Event.REQUESTED, Event.ISSUED, Event.TRIAL_STARTED,
                  Event.TRIAL_PASSED, Event.CONFIRMED):  # fmt: skip
        step = next_step(step, event)
    assert step is Step.IDLE
    for before in (Step.KEYED, Step.REQUESTED, Step.STAGED, Step.TRIAL):
        assert next_step(before, Event.FAILED) is Step.IDLE
    assert next_step(Step.PROMOTED, Event.ROLLED_BACK) is Step.IDLE
    with pytest.raises(RenewalRefused):  # once promoted, only confirmation or rollback ends it
        next_step(Step.PROMOTED, Event.FAILED)


def test_every_step_has_a_resume_decision() -> None:
    assert set(RESUME) == set(Step)
    assert RESUME[Step.IDLE] is Resume.NOTHING
    assert RESUME[Step.PROMOTED] is Resume.CONFIRM
    assert {RESUME[s] for s in (Step.KEYED, Step.REQUESTED)} == {Resume.DISCARD}
    assert {RESUME[s] for s in (Step.STAGED, Step.TRIAL)} == {Resume.TRIAL}


def test_state_file_is_atomic_private_and_follows_the_table(tmp_path: Path) -> None:
    store = RenewalStore(tmp_path)
    state = store.load()
    assert state == RenewalState() and not store.path.exists()
    state = store.advance(state, Event.START, started_at=100.0)
    state = store.advance(state, Event.KEY_CREATED, key_number=4, key_created=True)
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert store.load() == state and state.step is Step.KEYED and state.key_number == 4
    before = store.path.read_bytes()
    with pytest.raises(RenewalRefused):
        store.advance(state, Event.TRIAL_PASSED)
    assert store.path.read_bytes() == before  # refused: nothing written
    state = store.advance(state, Event.FAILED, attempt=1, last=Outcome(200.0, "failed", "issuer said no"))
    assert state.step is Step.IDLE and state.key_number is None and not state.key_created
    assert store.load().last == Outcome(200.0, "failed", "issuer said no") and store.load().attempt == 1
    assert [p.name for p in tmp_path.iterdir()] == ["renewal.json"]  # no temp file left


def test_unreadable_state_file_is_an_error_not_a_silent_reset(tmp_path: Path) -> None:
    store = RenewalStore(tmp_path)
    store.path.write_text("{not json")
    with pytest.raises(RenewalStateError, match="is not a renewal state file"):
        store.load()
    store.path.write_text('{"format": 99, "step": "IDLE"}')
    with pytest.raises(RenewalStateError, match="unknown format"):
        store.load()

"""The tests' one polling helper: what it returns, how long it waits, what a timeout says."""

from __future__ import annotations

import itertools
import time

import pytest

from tests.waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    values = iter([None, 0, "", "found", "later"])
    assert wait_until(lambda: next(values), timeout=5, interval=0) == "found"


def test_accept_decides_and_the_accepted_value_is_returned() -> None:
    counter = itertools.count()
    assert wait_until(lambda: next(counter), timeout=5, interval=0, accept=lambda n: n >= 3) == 3
    assert wait_until(lambda: [], timeout=5, accept=lambda found: found == []) == []


def test_a_timeout_names_what_was_awaited_and_the_last_value_seen() -> None:
    counter = itertools.count()
    started = time.monotonic()
    with pytest.raises(TimeoutError) as raised:
        wait_until(
            lambda: next(counter),
            timeout=0.2,
            interval=0.01,
            message="the counter to reach a million",
            accept=lambda n: n >= 1_000_000,
        )
    assert 0.2 <= time.monotonic() - started < 5
    text = str(raised.value)
    assert text.startswith("waited 0.2s for the counter to reach a million; last seen: ")
    assert int(text.rsplit(" ", 1)[1]) >= 1


def test_a_callable_message_describes_the_state_at_the_timeout() -> None:
    state = {"calls": 0}

    def probe() -> bool:
        state["calls"] += 1
        return False

    with pytest.raises(TimeoutError, match=r"for calls: [1-9]\d*; last seen: False$"):
        wait_until(probe, timeout=0.1, message=lambda: f"calls: {state['calls']}")


def test_a_long_last_value_is_shortened() -> None:
    with pytest.raises(TimeoutError) as raised:
        wait_until(lambda: "x" * 10_000, timeout=0, accept=lambda _: False)
    assert len(str(raised.value)) < 2100
    assert str(raised.value).endswith("…")


def test_exceptions_of_the_probe_propagate_at_once() -> None:
    def probe() -> bool:
        raise ValueError("broken probe")

    started = time.monotonic()
    with pytest.raises(ValueError, match="broken probe"):
        wait_until(probe, timeout=30)
    assert time.monotonic() - started < 5

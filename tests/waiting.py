"""Waiting in tests: one bounded polling helper, :func:`wait_until`.

Every test that waits for something to happen (a repair, a packet, a status,
a message) polls with it instead of sleeping blindly or writing its own
deadline loop, so that every wait is bounded and every timeout says what was
awaited and the last value seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")

#: How much of the last value seen a timeout message shows at most.
SHOWN_CHARACTERS = 2000


@overload
def wait_until(
    probe: Callable[[], T | None],
    timeout: float = ...,
    interval: float = ...,
    message: str | Callable[[], str] = ...,
) -> T: ...


@overload
def wait_until(
    probe: Callable[[], T],
    timeout: float = ...,
    interval: float = ...,
    message: str | Callable[[], str] = ...,
    *,
    accept: Callable[[T], object],
) -> T: ...


def wait_until(
    probe: Callable[[], Any],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str | Callable[[], str] = "condition",
    *,
    accept: Callable[[Any], object] = bool,
) -> Any:
    """Call ``probe`` until ``accept`` holds for its value, then return that value.

    Without ``accept``, until ``probe`` returns a truthy value. ``interval`` is the
    pause between calls (0 for a probe that blocks by itself, like one that waits
    for the next message). After ``timeout`` seconds, raise ``TimeoutError`` naming
    what was awaited (``message``, or its result when callable: evaluated only then,
    so it may describe the state at the time) and the last value ``probe`` returned.
    Exceptions of ``probe`` propagate at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if accept(value):
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            seen = repr(value)
            if len(seen) > SHOWN_CHARACTERS:
                seen = seen[:SHOWN_CHARACTERS] + "…"
            raise TimeoutError(f"waited {timeout}s for {text}; last seen: {seen}")
        if interval > 0:
            time.sleep(interval)

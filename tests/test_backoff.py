"""Backoff (the one retry clock) and StartGate (first starts of many sessions share it)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import pytest

from bot.backoff import Backoff
from bot.errors import StreamClosed, SttAuthError
from bot.stt.session import StartGate


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_delays_double_up_to_the_cap_with_equal_jitter() -> None:
    b = Backoff(0.5, 4.0, rng=random.Random(1))
    delays = [b.next() for _ in range(8)]
    for d, ceiling in zip(delays, [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0], strict=True):
        assert ceiling / 2 <= d <= ceiling
    assert b.failures == 8 and b.failing


def test_the_jitter_comes_from_the_injected_rng() -> None:
    one = [Backoff(1.0, 30.0, rng=random.Random(5)).next() for _ in range(3)]
    two = [Backoff(1.0, 30.0, rng=random.Random(5)).next() for _ in range(3)]
    assert one == two


def test_only_a_healthy_stretch_resets_the_backoff() -> None:
    clock = Clock()
    b = Backoff(1.0, 30.0, rng=random.Random(2), healthy_after=10.0, clock=clock)
    for _ in range(3):
        b.next()
    b.succeeded()
    clock.now = 3.0  # died after 3 s: keeps backing off
    assert b.next() >= 4.0
    b.succeeded()
    clock.now = 20.0  # worked for 17 s: a fresh start
    assert b.next() <= 1.0 and b.failures == 1


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


async def test_a_gate_retries_first_starts_one_at_a_time_while_in_trouble() -> None:
    gate = StartGate(Backoff(0.01, 0.02, rng=random.Random(3)))
    attempts: list[str] = []
    fail_until = 5
    active = 0
    overlaps: list[int] = []

    def starter(name: str) -> Callable[[], Awaitable[None]]:
        async def attempt() -> None:
            nonlocal active
            attempts.append(name)
            active += 1
            overlaps.append(active)
            await asyncio.sleep(0.001)
            active -= 1
            if len(attempts) <= fail_until:
                raise SttAuthError("rejected")
        return attempt

    async with asyncio.timeout(5):
        await asyncio.gather(*(gate.keep_starting(starter(n), lambda: True, n)
                               for n in ("a", "b", "c")))
    # The first round tries everyone at once; while failing, one attempt at a time; once one
    # start works, each of the three has started exactly once more than it failed.
    assert attempts[:3] == ["a", "b", "c"] and max(overlaps[:3]) == 3
    assert overlaps[3:fail_until] == [1] * (fail_until - 3)
    assert len(attempts) == fail_until + 3
    assert not gate.backoff.failing


async def test_a_gate_stops_when_the_stream_is_closed_or_not_startable() -> None:
    gate = StartGate(Backoff(0.01, 0.02))
    calls = 0

    async def closed() -> None:
        nonlocal calls
        calls += 1
        raise StreamClosed("gone")

    async with asyncio.timeout(5):
        await gate.keep_starting(closed, lambda: True, "x")
        await gate.keep_starting(closed, lambda: False, "y")
    assert calls == 1


def test_thousands_of_failures_stay_at_the_cap_without_overflow() -> None:
    b = Backoff(0.001, 2.0, rng=random.Random(4))
    b.failures = 5000
    assert 1.0 <= b.next() <= 2.0


async def test_a_cancel_swallowed_by_the_attempt_still_ends_the_gate() -> None:
    # Python 3.11's wait_for may answer a cancel with the inner error (a refused connection):
    # the retry loop must still end rather than retry for ever.
    gate = StartGate(Backoff(0.001, 0.002))
    calls = 0

    async def refused_even_when_cancelled() -> None:
        nonlocal calls
        calls += 1
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            raise SttAuthError("refused") from None
        raise SttAuthError("refused")

    give_up = False
    task = asyncio.create_task(
        gate.keep_starting(refused_even_when_cancelled, lambda: not give_up, "x"))
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait({task}, timeout=1.0)
    give_up = True  # without the fix the loop is still running: let it end, then fail
    await asyncio.wait({task}, timeout=1.0)
    assert task.cancelled(), "the cancel was lost: the gate went on retrying"
    assert calls >= 1

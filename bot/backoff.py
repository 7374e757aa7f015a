"""Capped, jittered exponential backoff: the one retry clock of the Discord outbox, the STT
session's reconnects and its first starts.

Pure: time comes from an injected ``clock`` and randomness from an injected ``random.Random``,
so a test can fix both. Delays use "equal jitter": half of the capped exponential is fixed and
half random, so many retrying clients spread out but none retries at once.

"Healthy after": a connection that works for ``healthy_after`` seconds earns a fresh start (the
next failure waits ``initial`` again); one that dies at once keeps backing off (cf. pipecat's
QuickFailureTracker). With ``healthy_after=0`` any success resets the backoff.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """Failures in a row and the delay before the next attempt; see the module docstring."""

    def __init__(
        self,
        initial: float,
        cap: float,
        *,
        rng: random.Random | None = None,
        healthy_after: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if initial <= 0 or cap < initial:
            raise ValueError(f"need 0 < initial <= cap, got initial={initial}, cap={cap}")
        self.initial = initial
        self.cap = cap
        self.healthy_after = healthy_after
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        #: Failures in a row since the last healthy stretch.
        self.failures = 0
        self._up_since: float | None = None

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` failures in a row (0 = the first)."""
        # The exponent is bounded: past the cap it no longer matters, and 2.0 ** 1024 overflows
        # (a server refusing at once can fail a thousand times within one stop timeout).
        ceiling = min(self.cap, self.initial * 2.0 ** min(max(0, failures), 64))
        return ceiling / 2 + self._rng.random() * ceiling / 2

    def next(self) -> float:
        """One more failure: how long to wait before the next attempt."""
        self._heal()
        self._up_since = None
        wait = self.delay(self.failures)
        self.failures += 1
        return wait

    def succeeded(self) -> None:
        """An attempt worked; the backoff resets once it has kept working ``healthy_after``."""
        self._up_since = self._clock()
        self._heal()

    def reset(self) -> None:
        self.failures = 0
        self._up_since = None

    @property
    def failing(self) -> bool:
        """Failures were counted and no healthy stretch has reset them yet."""
        self._heal()
        return self.failures > 0

    def _heal(self) -> None:
        up = self._up_since
        if up is not None and self._clock() - up >= self.healthy_after:
            self.failures = 0

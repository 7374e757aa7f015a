"""A bug hit on every packet or clock tick: counted by the caller, its traceback logged now and
then (at most once per interval), so the log shows it without being flooded by it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class ThrottledTraceback:
    """Call from inside an ``except`` block with the running count of such errors."""

    def __init__(self, logger: logging.Logger, message: str, interval: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        #: ``%d`` takes the count.
        self._message = message
        self._interval = interval
        self._clock = clock
        self._logged_at: float | None = None

    def __call__(self, count: int) -> None:
        now = self._clock()
        if self._logged_at is None or now - self._logged_at > self._interval:
            self._logged_at = now
            self._logger.exception(self._message, count)

"""The one owner of every task a meeting starts.

Like an ``asyncio.TaskGroup`` whose scope is the meeting's life rather than one ``async with``:
every task is named and held here; a failure is logged and does not end its siblings (one
speaker's bug must not end the meeting); :meth:`TaskOwner.cancel_all` at the end of the stop
cancels and awaits whatever is left, never the task that calls it (an automatic stop runs in
one of these tasks).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)


class TaskOwner:
    """Named tasks of one meeting; see the module docstring."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task %s failed", task.get_name(), exc_info=task.exception())

    def named(self, prefix: str) -> list[asyncio.Task[Any]]:
        return [t for t in self._tasks if t.get_name().startswith(prefix)]

    async def wait_for(self, prefix: str) -> None:
        """Await (not cancel) every running task whose name starts with ``prefix``."""
        pending = self.named(prefix)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    async def cancel_all(self) -> None:
        others = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        if others:
            await asyncio.gather(*others, return_exceptions=True)

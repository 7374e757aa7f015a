"""An ordered delivery queue for one Discord destination (a channel or a thread).

Job: take items (text lines, notices, caption edits, the minutes) in the order they are made and
hand them to a ``send`` coroutine one at a time, in that order, without losing any to a
transient failure and without letting one bad item wedge the destination.

Boundary: the decisions are pure functions of values — :func:`merge_head` / :func:`merge_pending`
(coalescing a burst of lines into fewer messages), :func:`classify_failure` (what an exception
from discord.py means) and :func:`backoff_delay`. :class:`Outbox` adds the one worker task that
owns the queue; it reaches the network only through the injected ``send``, and time only through
the injected ``clock`` and ``sleep``, so tests drive it without a Discord or a wall clock.

Delivery rules:

* FIFO, strictly: an item that fails transiently (HTTP 429, 5xx, a dropped connection) is retried
  before anything behind it is sent. 429 waits the server's ``retry_after``; the rest use capped,
  jittered exponential backoff. Transient failures are retried without limit: a Discord outage
  delays the transcript, it does not lose it (``aclose`` bounds the wait at shutdown).
* Permanent failures (any other 4xx: 403 missing access, 404 unknown channel, 400/50035 invalid
  form) and unexpected exceptions are logged with their reason, counted and the item is dropped,
  so the queue keeps moving. The lines themselves are already in storage and in the minutes.
* Bursts: consecutive waiting items with the same ``merge_key`` are sent as one message of at most
  ``merge_limit`` characters, counted as Discord may count them (UTF-16 units, see
  :func:`bot.transcript.format.message_length`), so a burst costs fewer requests. Once an
  item has been tried its batch is fixed, so a retry resends exactly the same message.
* Bound: past ``max_pending`` waiting items (a flood from upstream, or a long outage), a new
  mergeable line is merged into the last waiting message instead of being queued, so the queue
  grows by one message per ``merge_limit`` characters, not per line; this is logged once and
  ``on_backlog`` is called once (the sink says so in the channel). Memory is bounded: past
  ``max_entries`` waiting messages (each at most ``merge_limit`` characters) a line is not queued
  for Discord at all (it is in storage and the minutes), counted and logged once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
import discord

from bot.backoff import Backoff
from bot.errors import LocalError
from bot.transcript.format import message_length

log = logging.getLogger(__name__)

#: Discord's documented limit on message content (characters); merged messages stay within it.
DISCORD_MESSAGE_LIMIT = 2000
#: Waiting items per destination before new lines are merged into the last one. An hour of
#: a busy meeting is well under a thousand lines: this trips in a flood or a long outage.
DEFAULT_MAX_PENDING = 1000
#: Waiting messages per destination past which lines are no longer queued for Discord (about
#: 2 MB of text at 2000 characters a message; only a runaway upstream gets here).
DEFAULT_MAX_ENTRIES = 2000
#: Separator between merged lines: each line stays on its own row in Discord.
MERGE_SEPARATOR = "\n"
#: Backoff for 5xx / connection errors: first retry after ~1 s, doubling, capped at 30 s
#: (discord.py's own ``ExponentialBackoff`` uses base 1 and a similar cap).
BACKOFF_BASE_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0
#: Wait used when a 429 carries no usable ``retry_after`` (Discord always sends one; a proxy
#: might not).
DEFAULT_RETRY_AFTER_SECONDS = 1.0


class OutboxClosedError(LocalError):
    """An item was put into an outbox after ``aclose`` (our bug: the sink outlived its meeting)."""

    permanent = True


@dataclass(frozen=True, slots=True)
class Item:
    """One thing to deliver to a destination.

    ``text`` is the message content (may be empty for e.g. attachment-only messages).
    ``merge_key`` says which items may be joined into one message: items merge only with
    neighbours having an equal, non-``None`` key (e.g. "bot message" or "webhook as alice").
    ``payload`` is opaque to the outbox and passed through to ``send``; a merged item keeps
    the payload of its first item. ``label`` names the item in log lines. ``length`` is the
    text's length as Discord counts it (:func:`~bot.transcript.format.message_length`),
    measured once when the item is made and added up when items merge, never measured again.
    """

    text: str = ""
    merge_key: Hashable | None = None
    payload: Any = None
    label: str = "message"
    length: int = -1

    def __post_init__(self) -> None:
        if self.length < 0:
            object.__setattr__(self, "length", message_length(self.text))


def _fits(a: Item, b: Item, limit: int) -> bool:
    return (
        a.merge_key is not None
        and a.merge_key == b.merge_key
        and a.length + len(MERGE_SEPARATOR) + b.length <= limit
    )


def _join(a: Item, b: Item) -> Item:
    return replace(a, text=a.text + MERGE_SEPARATOR + b.text,
                   length=a.length + len(MERGE_SEPARATOR) + b.length)


def merge_head(items: Sequence[Item], limit: int = DISCORD_MESSAGE_LIMIT) -> tuple[Item, int]:
    """Merge the longest run at the front of ``items`` that fits in ``limit`` characters.

    Returns the merged item and how many items it consumed (at least 1; an item already over
    ``limit`` is returned alone and unchanged — splitting is the caller's job).
    """
    if not items:
        raise ValueError("merge_head needs at least one item")
    merged = items[0]
    used = 1
    while used < len(items) and _fits(merged, items[used], limit):
        merged = _join(merged, items[used])
        used += 1
    return merged, used


def merge_pending(items: Sequence[Item], limit: int = DISCORD_MESSAGE_LIMIT) -> list[Item]:
    """Coalesce consecutive mergeable items into as few messages of <= ``limit`` chars as
    greedy packing gives, keeping order. Non-mergeable items and key changes break runs."""
    out: list[Item] = []
    i = 0
    while i < len(items):
        merged, used = merge_head(items[i:], limit)
        out.append(merged)
        i += used
    return out


class FailureKind(enum.Enum):
    RATE_LIMITED = "rate limited"  # 429: wait retry_after, then retry
    TRANSIENT = "transient"  # 5xx, connection trouble: back off, then retry
    PERMANENT = "permanent"  # other 4xx, our bugs: log, count, drop


@dataclass(frozen=True, slots=True)
class Failure:
    kind: FailureKind
    reason: str
    retry_after: float | None = None


def _retry_after_from(exc: discord.HTTPException) -> float:
    """Seconds to wait from a 429 response: ``Retry-After`` or ``X-RateLimit-Reset-After``."""
    headers = getattr(exc.response, "headers", None) or {}
    for name in ("Retry-After", "X-RateLimit-Reset-After"):
        raw = headers.get(name)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            continue
        if value >= 0:
            return value
    return DEFAULT_RETRY_AFTER_SECONDS


def classify_failure(exc: BaseException) -> Failure:
    """What an exception raised while sending means for the item (pure; no I/O).

    discord.py already retries a 429 carrying ``Via`` and some 5xx itself; what reaches us is
    ``RateLimited`` (the wait exceeded ``max_ratelimit_timeout``), a 429 without ``Via``,
    ``DiscordServerError`` after its own retries, other ``HTTPException``s, or transport errors.
    """
    if isinstance(exc, discord.RateLimited):
        return Failure(FailureKind.RATE_LIMITED, str(exc), max(0.0, exc.retry_after))
    if isinstance(exc, discord.HTTPException):
        status = exc.status
        reason = f"HTTP {status} (Discord code {exc.code}): {exc.text or 'no message'}"
        if status == 429:
            return Failure(FailureKind.RATE_LIMITED, reason, _retry_after_from(exc))
        if isinstance(exc, discord.DiscordServerError) or status >= 500:
            return Failure(FailureKind.TRANSIENT, reason)
        return Failure(FailureKind.PERMANENT, reason)
    if isinstance(exc, aiohttp.ClientError | asyncio.TimeoutError | ConnectionError | OSError):
        return Failure(FailureKind.TRANSIENT, f"{type(exc).__name__}: {exc}")
    return Failure(FailureKind.PERMANENT, f"unexpected {type(exc).__name__}: {exc}")


def backoff_delay(attempt: int, rng: random.Random) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, jittered.

    "Equal jitter": half the capped exponential is fixed, half random, so retries from many
    destinations spread out but never retry immediately.
    """
    return Backoff(BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, rng=rng).delay(attempt - 1)


@dataclass(frozen=True, slots=True)
class OutboxStats:
    sent: int  # successful send calls (messages/requests)
    items_sent: int  # items delivered (>= sent when bursts were merged)
    retried: int  # attempts repeated after a transient failure (429 included)
    rate_limited: int  # 429s / RateLimited seen by the outbox
    dropped_permanent: int  # items dropped for a permanent failure
    pending: int  # items waiting or in flight
    dropped_backlog: int = 0  # lines not queued past max_entries (they are in storage)
    peak_entries: int = 0  # most messages ever waiting at once (the memory bound at work)


@dataclass
class _Entry:
    item: Item
    enqueued_at: float
    count: int = 1  # original items this entry stands for (after overflow merging)
    waiters: list[asyncio.Future[bool]] = field(default_factory=list)


class Outbox:
    """One destination's FIFO with a single worker task (see the module docstring)."""

    def __init__(
        self,
        send: Callable[[Item], Awaitable[None]],
        *,
        name: str,
        max_pending: int = DEFAULT_MAX_PENDING,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        on_backlog: Callable[[], None] | None = None,
        merge_limit: int = DISCORD_MESSAGE_LIMIT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.name = name
        self._send = send
        self._max_pending = max_pending
        self._max_entries = max(max_entries, max_pending + 1)
        self._on_backlog = on_backlog
        self._waiting = 0  # original items in self._pending (kept, not summed per put)
        self._dropped_backlog = 0
        self._peak_entries = 0
        self._merge_limit = merge_limit
        self._clock = clock
        self._sleep = sleep
        self._rng = rng if rng is not None else random.Random()
        self._pending: deque[_Entry] = deque()
        self._inflight: list[_Entry] = []
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._closed_event = asyncio.Event()
        self._overflow_logged = False
        self._sent = 0
        self._items_sent = 0
        self._retried = 0
        self._rate_limited = 0
        self._dropped = 0

    # -- public API ---------------------------------------------------------------------------

    @property
    def stats(self) -> OutboxStats:
        return OutboxStats(
            sent=self._sent, items_sent=self._items_sent, retried=self._retried,
            rate_limited=self._rate_limited, dropped_permanent=self._dropped, pending=self.pending,
            dropped_backlog=self._dropped_backlog, peak_entries=self._peak_entries)

    @property
    def pending(self) -> int:
        """Original items not yet delivered or dropped (waiting plus in flight)."""
        return self._waiting + sum(e.count for e in self._inflight)

    def start(self) -> None:
        """Start the worker task (idempotent)."""
        if self._closed:
            raise OutboxClosedError(f"outbox {self.name} is closed")
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"outbox:{self.name}"
            )

    def put(self, item: Item) -> None:
        """Queue ``item`` behind everything already queued; never blocks."""
        self._enqueue(item, None)

    async def put_and_wait(self, item: Item) -> bool:
        """Queue ``item`` and wait until it is delivered (True) or dropped/abandoned (False).

        Since delivery is FIFO, returning means everything queued before it was handled too.
        """
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._enqueue(item, fut)
        return await fut

    async def flush(self) -> None:
        """Wait until nothing is waiting or in flight (requires a started worker)."""
        await self._idle.wait()

    async def aclose(self, flush_timeout: float = 10.0) -> None:
        """Deliver what can be delivered within ``flush_timeout`` seconds, then stop.

        Idempotent. Items still waiting are abandoned (their waiters get False) and their
        number is logged; they remain in storage.
        """
        if self._closed:
            await self._closed_event.wait()
            return
        self._closed = True
        try:
            await self._close(flush_timeout)
        finally:
            self._closed_event.set()

    async def _close(self, flush_timeout: float) -> None:
        task = self._task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._idle.wait()), flush_timeout)
            except TimeoutError:
                pass
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        left = self.pending
        for entry in [*self._inflight, *self._pending]:
            _resolve(entry, False)
        self._inflight.clear()
        self._pending.clear()
        self._waiting = 0
        self._idle.set()
        if left:
            log.warning("outbox %s closed with %d item(s) undelivered after %.1f s (they are "
                        "kept in storage and the minutes)", self.name, left, flush_timeout)
        else:
            log.debug("outbox %s closed; everything delivered", self.name)

    # -- internals ----------------------------------------------------------------------------

    def _enqueue(self, item: Item, waiter: asyncio.Future[bool] | None) -> None:
        if self._closed:
            raise OutboxClosedError(f"outbox {self.name} is closed; {item.label} not queued")
        waiting = self._waiting
        if waiting >= self._max_pending and self._pending and item.merge_key is not None:
            first_time = not self._overflow_logged
            if first_time:
                self._overflow_logged = True
                log.warning("outbox %s has %d items waiting (a flood, or Discord slow or rate "
                            "limiting); merging new lines into the last waiting message",
                            self.name, waiting)
            try:
                if self._merge_into_last(item, waiter):
                    return
                # It does not fit: a new message, so growth is one entry per merge_limit
                # characters; past max_entries not even that (memory stays bounded).
                if len(self._pending) >= self._max_entries:
                    self._drop_for_backlog(item, waiter)
                    return
            finally:
                if first_time and self._on_backlog is not None:
                    self._on_backlog()
        entry = _Entry(item, self._clock())
        if waiter is not None:
            entry.waiters.append(waiter)
        self._pending.append(entry)
        self._waiting += 1
        self._peak_entries = max(self._peak_entries, len(self._pending))
        self._idle.clear()
        self._wakeup.set()

    def _merge_into_last(self, item: Item, waiter: asyncio.Future[bool] | None) -> bool:
        last = self._pending[-1]
        if not _fits(last.item, item, self._merge_limit):
            return False
        last.item = _join(last.item, item)
        last.count += 1
        self._waiting += 1
        if waiter is not None:
            last.waiters.append(waiter)
        return True

    def _drop_for_backlog(self, item: Item, waiter: asyncio.Future[bool] | None) -> None:
        self._dropped_backlog += 1
        if self._dropped_backlog == 1:
            log.error("outbox %s has %d messages waiting; further lines are not queued for "
                      "Discord (they are kept in storage and the minutes)",
                      self.name, len(self._pending))
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def _take_batch(self) -> tuple[Item, list[_Entry]]:
        items = [e.item for e in self._pending]
        merged, used = merge_head(items, self._merge_limit)
        batch = [self._pending.popleft() for _ in range(used)]
        self._waiting -= sum(e.count for e in batch)
        return merged, batch

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            item, batch = self._take_batch()
            self._inflight = batch
            delivered = await self._deliver(item, batch)
            self._inflight = []
            for entry in batch:
                _resolve(entry, delivered)

    async def _deliver(self, item: Item, batch: list[_Entry]) -> bool:
        """Send ``item`` until it succeeds or fails permanently; True if delivered."""
        backoff = Backoff(BACKOFF_BASE_SECONDS, BACKOFF_CAP_SECONDS, rng=self._rng)
        count = sum(e.count for e in batch)
        while True:
            try:
                await self._send(item)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = classify_failure(exc)
                if failure.kind is FailureKind.PERMANENT:
                    self._dropped += count
                    log.error("outbox %s dropped %s (%d line(s)) after a permanent failure: %s; "
                              "the lines are kept in storage and the minutes", self.name,
                              item.label, count, failure.reason,
                              exc_info=not isinstance(exc, discord.HTTPException))
                    return False
                self._retried += 1
                if failure.kind is FailureKind.RATE_LIMITED:
                    self._rate_limited += 1
                    backoff.failures += 1  # counts towards the backoff; the wait is Discord's
                    delay = (failure.retry_after if failure.retry_after is not None
                             else DEFAULT_RETRY_AFTER_SECONDS)
                else:
                    delay = backoff.next()
                log.warning("outbox %s: %s failed (%s, %s); retry %d in %.2f s, %d item(s) "
                            "waiting", self.name, item.label, failure.kind.value, failure.reason,
                            backoff.failures, delay, len(self._pending))
                await self._sleep(delay)
                continue
            self._sent += 1
            self._items_sent += count
            waited = self._clock() - batch[0].enqueued_at
            log.debug("outbox %s sent %s (%d item(s), waited %.2f s)", self.name, item.label,
                      count, waited)
            return True


def _resolve(entry: _Entry, delivered: bool) -> None:
    for fut in entry.waiters:
        if not fut.done():
            fut.set_result(delivered)
    entry.waiters.clear()

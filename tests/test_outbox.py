"""Spec for bot/sinks/outbox.py: strict order, retries that lose nothing, drops that do not wedge.

The outbox is driven with an injected clock and sleep (no wall-clock waits). The discord.py
exceptions it classifies are real ones, built from real aiohttp responses served on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import logging
import random

import aiohttp
import discord
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from bot.sinks.outbox import (
    BACKOFF_CAP_SECONDS,
    FailureKind,
    Item,
    Outbox,
    OutboxClosedError,
    backoff_delay,
    classify_failure,
    merge_head,
    merge_pending,
)
from bot.transcript.format import message_length

# -- helpers ---------------------------------------------------------------------------------


class FakeTime:
    """A clock that only moves when the outbox sleeps; records every sleep."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class Recorder:
    """A ``send`` that records texts and raises scripted exceptions for given texts."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.attempts: list[str] = []
        self.failures: dict[str, list[BaseException]] = {}
        self.gate: asyncio.Event | None = None  # when set, sends wait for it

    def fail(self, text: str, *excs: BaseException) -> None:
        self.failures.setdefault(text, []).extend(excs)

    async def __call__(self, item: Item) -> None:
        self.attempts.append(item.text)
        if self.gate is not None:
            await self.gate.wait()
        queue = self.failures.get(item.text)
        if queue:
            raise queue.pop(0)
        self.sent.append(item.text)


@pytest.fixture
async def http_error():
    """Build real discord.py HTTP exceptions from real responses of a loopback server."""

    async def handler(request: web.Request) -> web.Response:
        status = int(request.match_info["status"])
        headers = dict(request.query)
        code = int(headers.pop("code", "0"))
        return web.json_response(
            {"message": f"status {status}", "code": code, "retry_after": 0.25, "global": False},
            status=status,
            headers=headers,
        )

    app = web.Application()
    app.router.add_get("/{status}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    session = aiohttp.ClientSession()

    async def make(status: int, *, code: int = 0, **headers: str) -> discord.HTTPException:
        params = {"code": str(code), **{k.replace("_", "-"): v for k, v in headers.items()}}
        async with session.get(f"http://127.0.0.1:{port}/{status}", params=params) as resp:
            data = await resp.json()
            if status == 403:
                return discord.Forbidden(resp, data)
            if status == 404:
                return discord.NotFound(resp, data)
            if status >= 500:
                return discord.DiscordServerError(resp, data)
            return discord.HTTPException(resp, data)

    yield make
    await session.close()
    await runner.cleanup()


def lines(n: int, prefix: str = "line") -> list[str]:
    return [f"{prefix} {i}" for i in range(n)]


async def run_outbox(box: Outbox, texts: list[str], key: object = None) -> None:
    box.start()
    for t in texts:
        box.put(Item(t, merge_key=key))
    await box.flush()


# -- merging (pure) --------------------------------------------------------------------------


def test_consecutive_items_with_the_same_key_merge_into_one_message() -> None:
    items = [Item("a", "k"), Item("b", "k"), Item("c", "k")]
    assert [i.text for i in merge_pending(items, 2000)] == ["a\nb\nc"]


def test_items_with_different_keys_or_no_key_are_never_merged() -> None:
    items = [Item("a", "k"), Item("b", "j"), Item("c"), Item("d"), Item("e", "k")]
    assert [i.text for i in merge_pending(items, 2000)] == ["a", "b", "c", "d", "e"]


def test_merging_stops_at_the_limit_and_keeps_order() -> None:
    items = [Item("x" * 10, "k"), Item("y" * 10, "k"), Item("z" * 10, "k")]
    # 10 + 1 + 10 = 21 fits in 21; adding the third would need 32.
    assert [i.text for i in merge_pending(items, 21)] == ["x" * 10 + "\n" + "y" * 10, "z" * 10]


def test_an_item_already_over_the_limit_is_returned_alone_unchanged() -> None:
    big = Item("b" * 50, "k")
    merged, used = merge_head([big, Item("c", "k")], 20)
    assert (merged, used) == (big, 1)


def test_a_merged_item_keeps_the_payload_and_label_of_its_first_item() -> None:
    merged, used = merge_head([Item("a", "k", payload=1, label="first"), Item("b", "k", 2)])
    assert (merged.payload, merged.label, used) == (1, "first", 2)


def test_merge_head_refuses_an_empty_list() -> None:
    with pytest.raises(ValueError):
        merge_head([])


@given(
    st.lists(
        st.tuples(
            st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=30),
            st.sampled_from(["k", "j", None]),
        ),
        max_size=40,
    ),
    st.integers(min_value=30, max_value=120),
)
def test_merging_preserves_every_line_in_order_and_respects_the_limit(
    spec: list[tuple[str, str | None]], limit: int
) -> None:
    items = [Item(t, k) for t, k in spec]
    merged = merge_pending(items, limit)
    assert all(len(m.text) <= limit for m in merged)
    # Splitting each message back into lines gives the original lines, keys and order.
    rebuilt = [(part, m.merge_key) for m in merged for part in m.text.split("\n")]
    assert rebuilt == spec


# -- failure classification (pure) -----------------------------------------------------------


async def test_a_429_without_via_waits_the_retry_after_header(http_error) -> None:
    exc = await http_error(429, Retry_After="3.5")
    failure = classify_failure(exc)
    assert (failure.kind, failure.retry_after) == (FailureKind.RATE_LIMITED, 3.5)


async def test_a_429_without_any_header_falls_back_to_reset_after_then_a_default(
    http_error,
) -> None:
    assert classify_failure(await http_error(429, X_RateLimit_Reset_After="2")).retry_after == 2
    assert classify_failure(await http_error(429)).retry_after == 1.0


def test_rate_limited_from_discord_py_carries_its_retry_after() -> None:
    failure = classify_failure(discord.RateLimited(12.5))
    assert (failure.kind, failure.retry_after) == (FailureKind.RATE_LIMITED, 12.5)


async def test_server_errors_and_connection_errors_are_transient(http_error) -> None:
    assert classify_failure(await http_error(500)).kind is FailureKind.TRANSIENT
    assert classify_failure(await http_error(503)).kind is FailureKind.TRANSIENT
    assert classify_failure(aiohttp.ClientConnectionError("reset")).kind is FailureKind.TRANSIENT
    assert classify_failure(ConnectionResetError()).kind is FailureKind.TRANSIENT
    assert classify_failure(TimeoutError()).kind is FailureKind.TRANSIENT


async def test_other_client_errors_are_permanent_and_say_why(http_error) -> None:
    for status, code in ((403, 50001), (404, 10003), (400, 50035)):
        failure = classify_failure(await http_error(status, code=code))
        assert failure.kind is FailureKind.PERMANENT
        assert str(status) in failure.reason and str(code) in failure.reason


def test_an_unexpected_exception_is_permanent_so_the_queue_moves_on() -> None:
    failure = classify_failure(TypeError("bug"))
    assert failure.kind is FailureKind.PERMANENT and "TypeError" in failure.reason


def test_backoff_grows_then_stays_under_the_cap_and_never_reaches_zero() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(n, rng) for n in range(1, 12)]
    assert 0.5 <= delays[0] <= 1.0
    assert 1.0 <= delays[1] <= 2.0
    assert all(BACKOFF_CAP_SECONDS / 2 <= d <= BACKOFF_CAP_SECONDS for d in delays[6:])


# -- delivery --------------------------------------------------------------------------------


async def test_items_are_delivered_in_the_order_they_were_put() -> None:
    t, rec = FakeTime(), Recorder()
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    await run_outbox(box, lines(50))
    assert rec.sent == lines(50)
    assert box.stats.sent == 50 and box.stats.pending == 0
    await box.aclose()


async def test_a_rate_limited_item_is_retried_after_retry_after_before_anything_behind_it() -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("line 10", discord.RateLimited(4.0))
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    await run_outbox(box, lines(20))
    assert rec.sent == lines(20)
    assert rec.attempts[10:12] == ["line 10", "line 10"]
    assert t.sleeps == [4.0]
    stats = box.stats
    assert (stats.rate_limited, stats.retried, stats.dropped_permanent) == (1, 1, 0)
    await box.aclose()


async def test_a_429_response_waits_the_header_delay(http_error) -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("line 1", await http_error(429, Retry_After="0.75"))
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    await run_outbox(box, lines(3))
    assert rec.sent == lines(3) and t.sleeps == [0.75]
    await box.aclose()


async def test_server_errors_are_retried_with_growing_backoff_until_delivered(http_error) -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("line 0", *[await http_error(502) for _ in range(4)])
    rec.fail("line 1", aiohttp.ServerDisconnectedError())
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep, rng=random.Random(1))
    await run_outbox(box, lines(3))
    assert rec.sent == lines(3)
    first_four = t.sleeps[:4]
    assert first_four == sorted(first_four) and first_four[0] <= 1.0 < first_four[3]
    assert box.stats.retried == 5 and box.stats.rate_limited == 0
    await box.aclose()


async def test_a_permanent_failure_drops_only_that_item_and_logs_the_reason(
    http_error, caplog: pytest.LogCaptureFixture
) -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("line 1", await http_error(403, code=50001))
    box = Outbox(rec, name="chan", clock=t.clock, sleep=t.sleep)
    with caplog.at_level(logging.ERROR, logger="bot.sinks.outbox"):
        await run_outbox(box, lines(3))
    assert rec.sent == ["line 0", "line 2"]
    assert box.stats.dropped_permanent == 1 and t.sleeps == []
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "50001" in record.getMessage() and "storage" in record.getMessage()
    await box.aclose()


async def test_a_bug_in_send_drops_the_item_with_a_traceback_and_the_queue_continues(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("line 0", KeyError("oops"))
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    with caplog.at_level(logging.ERROR, logger="bot.sinks.outbox"):
        await run_outbox(box, lines(2))
    assert rec.sent == ["line 1"]
    assert any(r.exc_info for r in caplog.records)
    await box.aclose()


async def test_lines_waiting_behind_a_slow_send_go_out_merged() -> None:
    t, rec = FakeTime(), Recorder()
    rec.gate = asyncio.Event()
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    box.start()
    box.put(Item("first", "k"))
    await asyncio.sleep(0)  # the worker takes "first" and blocks in send
    for text in lines(5):
        box.put(Item(text, "k"))
    assert box.pending == 6
    rec.gate.set()
    await box.flush()
    assert rec.sent == ["first", "\n".join(lines(5))]
    assert (box.stats.sent, box.stats.items_sent) == (2, 6)
    await box.aclose()


async def test_a_retry_resends_exactly_the_same_batch_even_if_more_lines_arrived() -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("a\nb", discord.RateLimited(1.0))
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    box.put(Item("a", "k"))
    box.put(Item("b", "k"))
    box.start()
    await asyncio.sleep(0)
    box.put(Item("c", "k"))  # arrives while "a\nb" is being rate limited
    await box.flush()
    assert rec.attempts == ["a\nb", "a\nb", "c"]
    await box.aclose()


async def test_past_max_pending_new_lines_merge_into_the_last_one_and_nothing_is_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t, rec = FakeTime(), Recorder()
    rec.gate = asyncio.Event()
    box = Outbox(rec, name="t", max_pending=3, merge_limit=40, clock=t.clock, sleep=t.sleep)
    box.start()
    box.put(Item("head"))
    await asyncio.sleep(0)
    texts = lines(12)  # "line 0" .. "line 11": 6-7 chars each
    with caplog.at_level(logging.WARNING, logger="bot.sinks.outbox"):
        for text in texts:
            box.put(Item(text, "k"))
    assert len(box._pending) < len(texts)
    assert box.pending == 13  # every original line is still accounted for
    assert sum("merging new lines" in r.getMessage() for r in caplog.records) == 1
    rec.gate.set()
    await box.flush()
    assert rec.sent[0] == "head"
    assert "\n".join(rec.sent[1:]).split("\n") == texts
    assert all(len(s) <= 40 for s in rec.sent)
    await box.aclose()


async def test_put_and_wait_reports_delivery_and_drops() -> None:
    t, rec = FakeTime(), Recorder()
    rec.fail("bad", ValueError("nope"))
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    box.start()
    box.put(Item("before"))
    assert await box.put_and_wait(Item("good")) is True
    assert rec.sent == ["before", "good"]
    assert await box.put_and_wait(Item("bad")) is False
    await box.aclose()


async def test_aclose_gives_up_after_the_timeout_logs_what_is_left_and_is_idempotent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    rec = Recorder()
    rec.gate = asyncio.Event()  # never set: Discord never answers
    box = Outbox(rec, name="stuck")
    box.start()
    for text in lines(3):
        box.put(Item(text))
    waiter = asyncio.ensure_future(box.put_and_wait(Item("last")))
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="bot.sinks.outbox"):
        await box.aclose(flush_timeout=0.01)
        await box.aclose(flush_timeout=0.01)
    assert await waiter is False
    (record,) = [r for r in caplog.records if "undelivered" in r.getMessage()]
    assert "4 item(s)" in record.getMessage()
    with pytest.raises(OutboxClosedError):
        box.put(Item("late"))


async def test_aclose_delivers_everything_that_can_be_delivered_first() -> None:
    t, rec = FakeTime(), Recorder()
    box = Outbox(rec, name="t", clock=t.clock, sleep=t.sleep)
    box.start()
    for text in lines(10):
        box.put(Item(text))
    await box.aclose(flush_timeout=5)
    assert rec.sent == lines(10) and box.pending == 0


def test_merging_counts_astral_characters_twice_as_discord_may() -> None:
    ext_b = "\U00020d71" * 6  # 𠵱: 6 characters, 12 UTF-16 units
    items = [Item(ext_b, "k"), Item(ext_b, "k")]
    assert len(merge_pending(items, 20)) == 2  # 12 + 1 + 12 = 25 units > 20
    assert len(merge_pending(items, 25)) == 1


def test_an_item_is_measured_once_and_merged_lengths_add_up() -> None:
    a, b = Item("𠵱" * 3, "k"), Item("ab", "k")  # astral characters count twice
    assert (a.length, b.length) == (6, 2)
    (merged,) = merge_pending([a, b], limit=9)
    assert merged.length == 9 == message_length(merged.text)
    assert len(merge_pending([a, b], limit=8)) == 2

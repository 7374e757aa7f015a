"""Row 2: N real :class:`bot.stt.session.SttSession` emitting 100 ms chunks to a loopback server.

The server (:mod:`bench.chunk_server`) is another process, so this process's CPU
(``time.process_time``) is the client side only: the sessions' send loops, python-socketio's
packet encoding, base64, aiohttp's websocket writes and the event loop, plus a driver that plays
the receiver's part (one chunk per session every 100 ms, the sessions' phases spread evenly).

Send lag: for each chunk, the server's arrival time minus the moment ``send_audio`` was called
with it (both ``time.monotonic``, one system-wide clock). This is what the receive path adds on
top of filling the chunk; the target is "audio reaches the STT socket <= one chunk + 5 ms after
its packet arrives", i.e. lag + the receive path's per-packet time <= 5 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

import aiohttp
import numpy as np

from bench.chunk_server import SendLog, raise_fd_limit
from bot.stt.session import SttEvent, SttSession

log = logging.getLogger(__name__)

STT_RATE: Final = 16000
CHUNK_MS: Final = 100
CHUNK_BYTES: Final = STT_RATE * CHUNK_MS // 1000 * 2
#: Sessions started concurrently at once (a guild's speakers do not all start in one tick).
START_BATCH: Final = 50
#: The driver's wake-up period: the receiver hands chunks over at packet times (20 ms), so
#: waking every 5 ms hands each chunk over at most 5 ms late, and that delay is not counted.
DRIVER_TICK_S: Final = 0.005
WARMUP_S: Final = 1.0
SERVER_START_TIMEOUT: Final = 20.0
_HEAD = struct.Struct("<II")


@dataclass(frozen=True)
class UpstreamResult:
    sessions: int
    seconds: float
    cpu_percent: float  # of one core, the whole client process
    server_cpu_percent: float
    us_per_session_second: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    chunks_sent: int
    chunks_arrived: int
    fd_limit: int
    variant: str = "product"
    #: Per round: this variant's client CPU over the first variant's in the same round.
    cpu_ratios: tuple[float, ...] = ()
    lag_p99_per_round: tuple[float, ...] = ()
    #: Server and client were pinned to different CPUs.
    pinned: bool = False


@dataclass(frozen=True)
class ChunkServer:
    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User + system CPU of the server process so far (/proc/PID/stat, clock ticks)."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def chunk_server(commit_every: int = 30) -> AsyncIterator[ChunkServer]:
    """Start :mod:`bench.chunk_server` in a subprocess."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.chunk_server", "--commit-every", str(commit_every),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(SERVER_START_TIMEOUT):
            line = (await proc.stdout.readline()).decode()
        if not line.startswith("PORT "):
            raise RuntimeError(f"chunk server did not start: {line!r}")
        yield ChunkServer(f"http://127.0.0.1:{int(line.split()[1])}", proc.pid)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(5):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def start_sessions(clients: list[SttSession]) -> None:
    """Start every session, START_BATCH at a time."""
    for i in range(0, len(clients), START_BATCH):
        await asyncio.gather(*(c.start() for c in clients[i : i + START_BATCH]))


def _chunk(session: int, index: int, audio: bytes) -> bytes:
    return _HEAD.pack(session, index) + audio[_HEAD.size:]


#: The send paths row 2 can compare; today only the product's (``SttSession.send_audio``): the
#: batched prototype it was measured against is what the product now does per chunk (a direct
#: websocket write), so it was removed.
VARIANTS: Final = ("product",)
#: Pause between interleaved phases, not measured: chunks of the last phase land meanwhile.
SETTLE_S: Final = 0.2


@dataclass(frozen=True)
class _Phase:
    variant: str
    cpu: float
    server_cpu: float
    wall: float
    wall0: float


def pin(pid: int, cpu: int) -> bool:
    """Pin ``pid`` (0: the calling thread) to one CPU; False where that is not possible.

    Not checked against the caller's own affinity: once :func:`pinned_server` has pinned this
    thread to the first CPU, that would refuse every other CPU (it did, and row 2u's UDP sender,
    started from this thread, stayed on the measured CPU). The kernel refuses a CPU outside the
    process's cpuset (EINVAL)."""
    if not hasattr(os, "sched_setaffinity"):
        return False
    try:
        os.sched_setaffinity(pid, {cpu})
    except OSError:
        return False
    return True


def cpus() -> list[int]:
    """The CPUs this process may run on (sorted)."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


async def run_upstream(server: ChunkServer, sessions: int, seconds: float,
                       audio: bytes | None = None, *, variants: tuple[str, ...] = ("product",),
                       repeats: int = 1) -> UpstreamResult:
    """``sessions`` SttSessions streaming for ``seconds`` (after a warm-up) to ``server``.

    With several ``variants`` the send paths take turns on the same sessions and connections
    (``repeats`` rounds of A B / B A, each ``seconds / repeats`` long) and the result carries
    one :class:`UpstreamResult` per variant in ``by_variant`` (the first variant's is returned,
    its ``cpu_ratios`` the per-round CPU of each variant over the first's)."""
    results = await run_variants(server, sessions, seconds, audio, variants=variants,
                                 repeats=repeats)
    return results[variants[0]]


async def run_variants(server: ChunkServer, sessions: int, seconds: float,
                       audio: bytes | None = None, *, variants: tuple[str, ...] = VARIANTS,
                       repeats: int = 3) -> dict[str, UpstreamResult]:
    """The send ``variants`` interleaved on the same sessions; see :func:`run_upstream`."""
    url = server.url
    fd_limit = raise_fd_limit()
    if fd_limit < 2 * sessions + 64:
        raise RuntimeError(f"open-files limit {fd_limit} is too low for {sessions} sessions")
    if audio is None:
        rng = np.random.default_rng(7)
        audio = (rng.standard_normal(CHUNK_BYTES // 2) * 2000).astype("<i2").tobytes()
    events = 0

    def on_event(_e: SttEvent) -> None:
        nonlocal events
        events += 1

    clients = [SttSession(url=url, api_key="bench", sample_rate=STT_RATE, speaker=f"s{i}",
                          on_event=on_event) for i in range(sessions)]
    sends = SendLog(sessions)
    phases: list[_Phase] = []
    index = [0] * sessions
    #: Session s's chunks are due at t0 + (s / sessions + k) x 100 ms: one chunk of the
    #: round-robin every ``step``, so the driver's work is per chunk, not per session and tick
    #: (its CPU counts as the client's).
    step = CHUNK_MS / 1000 / sessions

    async def play(variant: str, seconds: float, warmup: float) -> None:
        """Hand every session one chunk per 100 ms for ``warmup + seconds``; measure the last
        ``seconds``."""
        if variant == "product":
            def send(s: int, chunk: bytes) -> None:
                clients[s].send_audio(chunk)
        else:
            raise ValueError(f"unknown send variant {variant!r}")
        gc.collect()
        loop = asyncio.get_running_loop()
        t0 = loop.time() + 0.01
        measure_from = t0 + warmup
        end = measure_from + seconds
        cpu0 = wall0 = server_cpu0 = 0.0
        measuring = False
        number = len(phases)
        j = 0  # chunks handed over in this phase, round-robin over the sessions
        while True:
            now = time.monotonic()
            if not measuring and now >= measure_from:
                measuring, cpu0, wall0 = True, time.process_time(), now
                server_cpu0 = server.cpu_seconds()
            if now >= end:
                break
            tag = number if measuring else -1
            while t0 + j * step <= now:
                s = j % sessions
                k = index[s]
                chunk = _chunk(s, k, audio)
                sends.record(s, k, time.monotonic(), tag)
                send(s, chunk)
                index[s] = k + 1
                j += 1
            await asyncio.sleep(DRIVER_TICK_S)
        cpu = time.process_time() - cpu0
        server_cpu = server.cpu_seconds() - server_cpu0
        phases.append(_Phase(variant, cpu, server_cpu, time.monotonic() - wall0, wall0))
        await asyncio.sleep(SETTLE_S)

    try:
        await start_sessions(clients)
        async with aiohttp.ClientSession() as http:
            await play(variants[0], 0.0, WARMUP_S)  # connections and caches warm, not counted
            phases.clear()
            for r in range(repeats):
                for variant in (variants if r % 2 == 0 else variants[::-1]):
                    await play(variant, seconds / repeats, 0.0)
            await asyncio.sleep(0.5)  # let the last chunks land
            async with http.get(f"{url}/results") as resp:
                arrivals = (await resp.json())["arrivals"]
            await (await http.get(f"{url}/reset")).release()
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    lags = sends.lags_ms(arrivals, len(phases))
    sent = sends.sent(len(phases))
    out: dict[str, UpstreamResult] = {}
    # CPU per session-second of audio actually handed over (a driver that fell behind sent
    # fewer chunks than sessions x wall time).
    def cost(i: int) -> float:
        return phases[i].cpu / max(1, sent[i]) * (1000 / CHUNK_MS)

    base_cpu = [cost(i) for i, ph in enumerate(phases) if ph.variant == variants[0]]
    for variant in variants:
        mine = [i for i, ph in enumerate(phases) if ph.variant == variant]
        pooled = sorted(x for i in mine for x in lags[i])
        if not pooled:
            raise RuntimeError(f"no chunk of the {variant} phases arrived at the server")
        wall = sum(phases[i].wall for i in mine)
        costs = [cost(i) for i in mine]
        cpu_rate = statistics.median(phases[i].cpu / phases[i].wall for i in mine)
        server_rate = statistics.median(phases[i].server_cpu / phases[i].wall for i in mine)
        p99s = [_p99(sorted(lags[i])) for i in mine if lags[i]]
        out[variant] = UpstreamResult(
            sessions=sessions,
            seconds=wall,
            cpu_percent=cpu_rate * 100,
            server_cpu_percent=server_rate * 100,
            us_per_session_second=statistics.median(costs) * 1e6,
            lag_p50_ms=statistics.median(pooled),
            lag_p99_ms=_p99(pooled),
            lag_max_ms=pooled[-1],
            chunks_sent=sum(sent[i] for i in mine),
            chunks_arrived=len(pooled),
            fd_limit=fd_limit,
            variant=variant,
            cpu_ratios=tuple(a / b for a, b in zip(costs, base_cpu, strict=True)),
            lag_p99_per_round=tuple(p99s),
        )
    return out


def _p99(sorted_lags: list[float]) -> float:
    return sorted_lags[min(len(sorted_lags) - 1, int(0.99 * len(sorted_lags)))]


@dataclass(frozen=True)
class PinnedServer:
    """The chunk server of a row, and where :func:`pinned_server` put it."""

    server: ChunkServer
    #: The CPU the server runs on while this thread runs on another (None: not pinned).
    server_cpu: int | None


@contextlib.asynccontextmanager
async def pinned_server(*, pin_self: bool = True) -> AsyncIterator[PinnedServer]:
    """:func:`chunk_server`, pinned to the last CPU and this thread to the first (when the
    machine has two), so the server's CPU does not show up as the client's latency; this
    thread's affinity is restored afterwards."""
    allowed = cpus()
    before = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else set()
    try:
        async with chunk_server() as server:
            cpu = None
            if len(allowed) >= 2 and pin(server.pid, allowed[-1]):
                cpu = allowed[-1]
                if pin_self and not pin(0, allowed[0]):
                    cpu = None
            yield PinnedServer(server, cpu)
    finally:
        if before:
            os.sched_setaffinity(0, before)


async def row2(counts: tuple[int, ...], seconds: float, *, repeats: int = 3,
               variants: tuple[str, ...] = VARIANTS) -> list[UpstreamResult]:
    """Row 2 with the loopback server pinned to one CPU and this process to another (when the
    machine has two), so the server's CPU does not show up as the client's latency; every
    session count runs the send ``variants`` interleaved. Affinity is restored afterwards."""
    out = []
    async with pinned_server() as pinned:
        for n in counts:
            by = await run_variants(pinned.server, n, seconds, variants=variants,
                                    repeats=repeats)
            for r in by.values():
                out.append(dataclasses.replace(r, pinned=pinned.server_cpu is not None))
            log.info("upstream %d sessions: %s", n, by)
    return out


if __name__ == "__main__":
    counts = tuple(int(a) for a in sys.argv[1:]) or (50,)
    for r in asyncio.run(row2(counts, 6.0)):
        print(json.dumps(r.__dict__))

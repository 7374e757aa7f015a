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

from bench.chunk_server import raise_fd_limit
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


def _chunk(session: int, index: int, audio: bytes) -> bytes:
    return _HEAD.pack(session, index) + audio[_HEAD.size:]


async def run_upstream(server: ChunkServer, sessions: int, seconds: float,
                       audio: bytes | None = None) -> UpstreamResult:
    """``sessions`` SttSessions streaming for ``seconds`` (after a warm-up) to ``server``."""
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
    try:
        for i in range(0, sessions, START_BATCH):
            await asyncio.gather(*(c.start() for c in clients[i : i + START_BATCH]))
        async with aiohttp.ClientSession() as http:
            sent_at: dict[tuple[int, int], float] = {}
            period = CHUNK_MS / 1000
            loop = asyncio.get_running_loop()
            t0 = loop.time() + 0.05
            phase = [period * i / sessions for i in range(sessions)]
            index = [0] * sessions
            measure_from = t0 + WARMUP_S
            end = measure_from + seconds
            cpu0 = wall0 = server_cpu0 = 0.0
            measuring = False
            while True:
                now = time.monotonic()
                if not measuring and now >= measure_from:
                    measuring, cpu0, wall0 = True, time.process_time(), now
                    server_cpu0 = server.cpu_seconds()
                if now >= end:
                    break
                for s in range(sessions):
                    due = t0 + phase[s] + index[s] * period
                    while due <= now:
                        chunk = _chunk(s, index[s], audio)
                        sent_at[(s, index[s])] = time.monotonic()
                        clients[s].send_audio(chunk)
                        index[s] += 1
                        due += period
                await asyncio.sleep(DRIVER_TICK_S)
            cpu = time.process_time() - cpu0
            server_cpu = server.cpu_seconds() - server_cpu0
            wall = time.monotonic() - wall0
            await asyncio.sleep(0.5)  # let the last chunks land
            async with http.get(f"{url}/results") as resp:
                arrivals = (await resp.json())["arrivals"]
            await (await http.get(f"{url}/reset")).release()
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    lags = []
    for s, k, at in arrivals:
        t = sent_at.get((s, k))
        if t is not None and wall0 <= t <= wall0 + wall:
            lags.append((at - t) * 1000)
    sent_in_window = sum(1 for t in sent_at.values() if wall0 <= t <= wall0 + wall)
    lags.sort()
    if not lags:
        raise RuntimeError("no chunk arrived at the server")
    return UpstreamResult(
        sessions=sessions,
        seconds=wall,
        cpu_percent=cpu / wall * 100,
        server_cpu_percent=server_cpu / wall * 100,
        us_per_session_second=cpu / (sessions * wall) * 1e6,
        lag_p50_ms=statistics.median(lags),
        lag_p99_ms=lags[min(len(lags) - 1, int(0.99 * len(lags)))],
        lag_max_ms=lags[-1],
        chunks_sent=sent_in_window,
        chunks_arrived=len(lags),
        fd_limit=fd_limit,
    )


async def row2(counts: tuple[int, ...], seconds: float) -> list[UpstreamResult]:
    out = []
    async with chunk_server() as server:
        for n in counts:
            out.append(await run_upstream(server, n, seconds))
            log.info("upstream %d sessions: %s", n, out[-1])
    return out


if __name__ == "__main__":
    counts = tuple(int(a) for a in sys.argv[1:]) or (50,)
    for r in asyncio.run(row2(counts, 5.0)):
        print(json.dumps(r.__dict__))

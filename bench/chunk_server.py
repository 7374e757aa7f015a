"""A minimal cantonese.ai stand-in for the upstream benchmark, run as its own process.

``python -m bench.chunk_server [--commit-every N]`` serves the documented Socket.IO path on
127.0.0.1 (a free port, printed as ``PORT <n>`` on stdout), starts every session at once and
only *counts* ``audio-chunk`` events: each chunk's first 8 bytes of PCM are the bench's
(session, chunk) numbers, and the arrival time (``time.monotonic``, the same clock as the bench's
on Linux: CLOCK_MONOTONIC is system-wide) is recorded. Every ``N`` chunks of a session it sends a
plain committed transcript, so the client's unconfirmed buffer is trimmed as with the real
service. ``GET /results`` returns the arrivals as JSON; ``GET /reset`` forgets them.

It runs in a separate process so that its CPU is not charged to the client, and it does no work
a real server would not (no tone decoding, unlike :mod:`bot.sim.stt_server`).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import resource
import struct
import sys
import time
from array import array
from collections.abc import Callable
from typing import Any

import socketio
from aiohttp import web

from bot.stt import protocol as p

_HEAD = struct.Struct("<II")


def raise_fd_limit() -> int:
    """Soft open-files limit up to the hard one (500 sessions need ~1000 sockets); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class SendLog:
    """When each (session, chunk) was handed over, and in which measured phase (-1: not
    measured); matched with the server's arrivals into per-phase lags.

    Flat arrays per session, no Python object per chunk: a dict of tuples grew by 2,500 tracked
    objects a second at 250 sessions and set off the collector's full passes (~50 ms each
    here), which showed up as the product's send lag.
    """

    def __init__(self, sessions: int) -> None:
        self._at = [array("d") for _ in range(sessions)]
        self._phase = [array("i") for _ in range(sessions)]

    def record(self, session: int, chunk: int, at: float, phase: int) -> None:
        """Chunk numbers of a session count up from 0 with no gap."""
        self._at[session].append(at)
        self._phase[session].append(phase)

    def retime(self, when: Callable[[float], float]) -> None:
        """Replace every recorded hand-over value ``v`` with ``when(v)`` (e.g. a datagram
        number recorded on the hot path, made its send time once the sender's log is in)."""
        for at in self._at:
            for k, v in enumerate(at):
                at[k] = when(v)

    def lags_ms(self, arrivals: list[list[float]], phases: int) -> dict[int, list[float]]:
        """Arrival minus hand-over, in ms, per measured phase."""
        lags: dict[int, list[float]] = {i: [] for i in range(phases)}
        for s, k, arrived in arrivals:
            s, k = int(s), int(k)
            if k < len(self._phase[s]) and self._phase[s][k] >= 0:
                lags[self._phase[s][k]].append((arrived - self._at[s][k]) * 1000)
        return lags

    def sent(self, phases: int) -> dict[int, int]:
        """Chunks handed over per measured phase."""
        out = {i: 0 for i in range(phases)}
        for tags in self._phase:
            for phase in tags:
                if phase >= 0:
                    out[phase] += 1
        return out


def build_app(commit_every: int) -> web.Application:
    sio = socketio.AsyncServer(async_mode="aiohttp", max_http_buffer_size=2_000_000)
    app = web.Application()
    sio.attach(app, socketio_path=p.SOCKETIO_PATH.strip("/"))
    # Flat arrays, not a list of tuples: 2,500 tracked objects a second would set off the
    # collector's full passes here, and a server paused in one records late arrivals.
    sessions, chunks, times = array("i"), array("i"), array("d")
    counts: dict[str, int] = {}

    async def on_start(sid: str, payload: Any = None) -> None:
        # Sessions commit in turn, not all at once: the bench starts its sessions together and
        # sends each a chunk every 100 ms, so equal counts would commit every session within
        # one 100 ms (a storm no meeting has, where sentences end when each speaker pauses).
        counts[sid] = len(counts) % commit_every if commit_every else 0
        await sio.emit(p.TRANSCRIPT_MESSAGE,
                       {"message_type": "session_started", "session_id": sid}, to=sid)
        await sio.emit(p.SESSION_STARTED, to=sid)

    async def on_audio(sid: str, payload: Any = None) -> None:
        now = time.monotonic()
        head = base64.b64decode(payload["audio_base_64"][:12])
        session, chunk = _HEAD.unpack_from(head)
        sessions.append(session)
        chunks.append(chunk)
        times.append(now)
        counts[sid] = n = counts.get(sid, 0) + 1
        if commit_every and n % commit_every == 0:
            await sio.emit(p.TRANSCRIPT_MESSAGE, {"message_type": "committed_transcript",
                                                  "text": f"line {n // commit_every}"}, to=sid)

    async def on_stop(sid: str, *args: Any) -> None:
        await sio.emit(p.SESSION_CLOSED, {"code": p.CLOSE_NORMAL, "reason": "stopped"}, to=sid)

    # Registered by call, not as decorators: python-socketio is untyped, and an untyped
    # decorator would erase the handlers' types.
    sio.on(p.START_SESSION, on_start)
    sio.on(p.AUDIO_CHUNK, on_audio)
    sio.on(p.STOP_SESSION, on_stop)

    async def results(request: web.Request) -> web.Response:
        return web.json_response({"arrivals": list(zip(sessions, chunks, times, strict=True))})

    async def reset(request: web.Request) -> web.Response:
        for column in (sessions, chunks, times):
            del column[:]
        return web.json_response({"ok": True})

    app.router.add_get("/results", results)
    app.router.add_get("/reset", reset)
    return app


async def serve(commit_every: int) -> None:
    # No cyclic collector in the stand-in: its full passes (~55 ms here, with a few hundred
    # connections) held every chunk arriving meanwhile, and the bench counted that as the
    # client's send lag. Reference counting still frees nearly all it makes; a bench run
    # leaves a few MB of cycles behind.
    gc.disable()
    raise_fd_limit()
    runner = web.AppRunner(build_app(commit_every), handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]
    print(f"PORT {port}", flush=True)
    # Run until stdin closes (the bench process ended or closed the pipe).
    loop = asyncio.get_running_loop()
    with contextlib.suppress(Exception):
        await loop.run_in_executor(None, sys.stdin.read)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit-every", type=int, default=30,
                        help="chunks between committed transcripts per session (0: never)")
    args = parser.parse_args()
    asyncio.run(serve(args.commit_every))


if __name__ == "__main__":
    main()

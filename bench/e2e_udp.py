"""Row 2u: row 2e's product path with the packets arriving over real UDP.

Row 2e hands datagrams to the receiver from a list, so it leaves out what a bot pays to get
them: a ``recv`` per datagram, the loop's wake-ups, and, through discord.py's socket-reader
thread, a ``select`` per datagram and the GIL handed between that thread and the loop. Here
:mod:`bench.udp_sender`, another process pinned with the STT stand-in to the other CPU, sends N
speakers' packets in real time to a loopback UDP socket (non-blocking, as discord.py makes it),
read as the product reads it: :meth:`bot.voice.inbox.DatagramInbox.read_from` on the event loop
(``loop``, the product), or discord.py's own :class:`discord.voice_state.SocketReader` into
``inbox.put`` (``thread``: the fallback where the loop cannot watch sockets, and what the
product did before). A clock task drains the inbox and ticks the receiver every 50 ms as
:class:`bot.voice.client.VoiceListener` does. From the receiver on it is row 2e's product
variant: VoiceReceiver -> Chunker -> SttSession -> :mod:`bench.chunk_server`.

Measured over a window after a warm-up: this process's CPU (all its threads) per second of
audio the receiver handled, and the lag from the moment the sender sent each chunk's last
datagram (the sender logs when each burst went out) to the chunk's arrival at the server: time a
datagram waits in the socket's receive buffer for a busy loop counts (a stamp taken when it is
read would hide it), the sender's own lateness does not.
"""

from __future__ import annotations

import asyncio
import bisect
import gc
import logging
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from types import SimpleNamespace
from typing import Final

import aiohttp
import numpy as np
from discord.voice_state import SocketReader

from bench.chunk_server import SendLog
from bench.e2e import _HEAD, CHUNK_MS, STT_RATE, WARMUP_S, E2EResult
from bench.lean import LeanReceiver
from bench.media import FIRST_MEMBER_ID, FIRST_SSRC, PACKETS_PER_SECOND, datagram_number
from bench.udp_sender import read_send_log
from bench.upstream import ChunkServer, _p99, start_sessions
from bot.audio.convert import Chunker
from bot.stt.session import SttEvent, SttSession
from bot.voice.client import TICK_SECONDS
from bot.voice.crypto import MODE_AES256_GCM
from bot.voice.inbox import DatagramInbox
from bot.voice.receiver import VoiceReceiver

log = logging.getLogger(__name__)

SENDER_READY_TIMEOUT_S: Final = 120.0
#: loop: the product (the listener reads the socket on the event loop); thread: discord.py's
#: socket-reader thread into the inbox, the fallback where the loop cannot watch sockets (and
#: what the product did before).
#: lean: bench.lean.LeanReceiver (no receiver bookkeeping) in the product's place, the socket
#: read on the loop: not shipped, it shows what the least Python on this path costs.
VARIANTS: Final = {"loop": "product, real UDP", "thread": "reader thread (fallback), real UDP",
                   "lean": "lean (prototype), real UDP"}


async def run_e2e_udp(server: ChunkServer, speakers: int, seconds: float,
                      sender_cpu: int | None = None, reader: str = "thread") -> E2EResult:
    """``speakers`` speakers over loopback UDP for a warm-up and ``seconds`` measured.

    ``reader``: ``loop``, the product (:meth:`DatagramInbox.read_from`: the socket read on the
    event loop); ``thread``, discord.py's socket-reader thread into the inbox (the fallback);
    ``lean``, read as ``loop`` but into :class:`bench.lean.LeanReceiver`."""
    if reader not in VARIANTS:
        raise ValueError(f"unknown reader {reader!r}")
    reader_kind = reader
    key = os.urandom(32)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # as discord.py makes it
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    total_s = WARMUP_S + seconds + 0.5
    send_log = os.path.join(tempfile.mkdtemp(prefix="cantobot-2u-"), "sends")
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.udp_sender", "127.0.0.1", str(sock.getsockname()[1]),
        key.hex(), str(speakers), str(total_s), send_log,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert sender.stdin is not None and sender.stdout is not None
    clients = [SttSession(url=server.url, api_key="bench", sample_rate=STT_RATE,
                          speaker=f"s{i}", on_event=_ignore) for i in range(speakers)]
    thread: SocketReader | None = None
    lean: LeanReceiver | None = None
    decode_us: float | None = None
    inbox: DatagramInbox | None = None
    tick_task: asyncio.Task[None] | None = None
    try:
        if sender_cpu is not None:
            from bench.upstream import pin
            if not pin(sender.pid, sender_cpu):  # it would compete with what is measured
                raise RuntimeError(f"could not pin the UDP sender to CPU {sender_cpu}")
        async with asyncio.timeout(SENDER_READY_TIMEOUT_S):
            ready = (await sender.stdout.readline()).decode()
        if not ready.startswith("READY"):
            raise RuntimeError(f"UDP sender did not start: {ready!r}")
        await start_sessions(clients)

        chunkers = [Chunker(STT_RATE, CHUNK_MS) for _ in range(speakers)]
        counters = [0] * speakers
        sends = SendLog(speakers)
        last: bytes = b""  # the datagram handled last: the one that completed a chunk
        phase = -1

        def on_chunk(user_id: int, chunk: bytes) -> None:
            s = user_id - FIRST_MEMBER_ID
            k = counters[s]
            counters[s] = k + 1
            # The sender's datagram number (the sequence number is the speaker's frame, from
            # 0): made a send time at the end.
            sends.record(s, k, datagram_number(s, int.from_bytes(last[2:4], "big"), speakers,
                                               meeting=True), phase)
            clients[s].send_audio(_HEAD.pack(s, k) + chunk[_HEAD.size:])

        def on_audio(user_id: int, pcm: np.ndarray) -> None:
            for chunk in chunkers[user_id - FIRST_MEMBER_ID].push(pcm):
                on_chunk(user_id, chunk)

        handled = 0
        if reader_kind == "lean":
            lean = LeanReceiver(mode=MODE_AES256_GCM, secret_key=key, on_chunk=on_chunk,
                                users={FIRST_SSRC + i: FIRST_MEMBER_ID + i
                                       for i in range(speakers)},
                                rate=STT_RATE, chunk_ms=CHUNK_MS, clock=time.perf_counter)
            handle_packet, tick = lean.handle_packet, lean.tick
        else:
            receiver = VoiceReceiver(sample_rate=STT_RATE, on_audio=on_audio,
                                     batch_ms=CHUNK_MS, on_idle=lambda _u: None,
                                     is_ignored=lambda _u: False)
            receiver.set_transport(MODE_AES256_GCM, key)
            for i in range(speakers):
                receiver.on_speaking(FIRST_MEMBER_ID + i, FIRST_SSRC + i, 0.0)
            handle_packet, tick = receiver.handle_packet, receiver.tick

        def handle(data: bytes, at: float) -> None:
            nonlocal last, handled
            last = data
            handled += 1
            handle_packet(data, at)

        loop = asyncio.get_running_loop()
        inbox = DatagramInbox(handle, time.monotonic)
        inbox.bind(loop)
        if reader_kind == "thread":
            stand_in = SimpleNamespace(socket=sock)  # all the reader reads of the connection
            thread = SocketReader(stand_in, start_paused=False)  # type: ignore[arg-type]
            thread.register(inbox.put)
            thread.start()
        elif not inbox.read_from(sock):  # as VoiceListener.attach_socket does
            raise RuntimeError("this event loop cannot watch sockets")

        async def clock() -> None:  # VoiceListener._tick_loop, without its watchdog
            while True:
                await asyncio.sleep(TICK_SECONDS)
                inbox.drain_all()
                tick(time.monotonic())

        tick_task = asyncio.create_task(clock())
        gc.collect()
        t0 = time.monotonic() + 0.2
        sender.stdin.write(f"{t0!r}\n".encode())
        await sender.stdin.drain()
        await asyncio.sleep(t0 + WARMUP_S - time.monotonic())
        handled0, cpu0, wall0 = handled, time.process_time(), time.monotonic()
        decode0 = (lean.decode_s, lean.decoded) if lean is not None else (0.0, 0)
        phase = 0
        await asyncio.sleep(seconds)
        phase = -1
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        in_window = handled - handled0
        if lean is not None:
            decode_us = (lean.decode_s - decode0[0]) / max(1, lean.decoded - decode0[1]) * 1e6
        async with asyncio.timeout(total_s + 30):
            done = (await sender.stdout.readline()).decode().split()
        sent_total = int(done[1]) if len(done) > 1 and done[0] == "DONE" else 0
        log.info("row 2u sender: %s (worst lateness on its schedule, s)", " ".join(done))
        firsts, times = read_send_log(send_log)
        sends.retime(lambda pos: times[bisect.bisect_right(firsts, int(pos)) - 1])
        await asyncio.sleep(0.3)
        inbox.drain_all()
        lost = sent_total - handled - inbox.dropped
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/results") as resp:
                arrivals = (await resp.json())["arrivals"]
            await (await http.get(f"{server.url}/reset")).release()
    finally:
        if tick_task is not None:
            tick_task.cancel()
        if thread is not None:
            thread.stop()
        if inbox is not None:
            inbox.stop_reading()
        if lean is not None:
            lean.close()
        sock.close()
        shutil.rmtree(os.path.dirname(send_log), ignore_errors=True)
        if sender.returncode is None:
            sender.kill()
        await sender.wait()
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    lags = sorted(sends.lags_ms(arrivals, 1)[0])
    if not lags:
        raise RuntimeError("no chunk of the measured window arrived")
    if lost or inbox.dropped:
        log.warning("row 2u: %d datagrams lost in the kernel, %d dropped by the inbox",
                    lost, inbox.dropped)
    us = cpu / max(1, in_window) * PACKETS_PER_SECOND * 1e6
    return E2EResult(
        speakers=speakers, variant=VARIANTS[reader_kind], seconds=wall,
        cpu_percent=cpu / wall * 100,
        us_per_speaker_second=us, lag_p50_ms=statistics.median(lags), lag_p99_ms=_p99(lags),
        lag_max_ms=lags[-1], chunks_sent=sends.sent(1)[0], chunks_arrived=len(lags),
        # Audio the window should have carried but the receiver did not handle in it.
        behind_s=max(0.0, wall - in_window / speakers / PACKETS_PER_SECOND)
        + (lost + inbox.dropped) / speakers / PACKETS_PER_SECOND,
        decode_us_per_packet=decode_us,
    )


def _ignore(_event: SttEvent) -> None:
    pass


async def row2u(counts: tuple[int, ...], seconds: float,
                readers: tuple[str, ...] = ("loop",), pin_self: bool = True) -> list[E2EResult]:
    """:func:`run_e2e_udp` per speaker count and reader; server and sender on one CPU, this
    process (all its threads) on the other when there are two, as in row 2."""
    from bench.upstream import pinned_server

    out = []
    async with pinned_server(pin_self=pin_self) as pinned:
        for n in counts:
            for kind in readers:
                out.append(await run_e2e_udp(pinned.server, n, seconds,
                                             sender_cpu=pinned.server_cpu, reader=kind))
    return out


if __name__ == "__main__":
    import json

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    kinds = tuple(sys.argv[3].split(",")) if len(sys.argv) > 3 else ("loop", "thread")
    for r in asyncio.run(row2u((n,), secs, kinds)):
        print(json.dumps({**r.__dict__, "speakers_per_core": round(r.speakers_per_core)}))

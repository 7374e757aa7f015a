"""Row 2e: receive + convert + upstream for N speakers in ONE process, end to end.

Row 1 times the receive path alone and row 2 the upstream alone; a bot does both on one event
loop, and the receive work (~75 % of it) delays the sends. Here N speakers' datagrams are handed
to one :class:`bot.voice.receiver.VoiceReceiver` at the times they would arrive (each speaker
one packet per 20 ms, the speakers' phases spread over the 20 ms; the driver wakes every
millisecond). They talk as a meeting does (:mod:`bench.media`, ``meeting=True``): each says
something else and starts at its own moment, so chunks end at different moments. The decoded 16
kHz audio goes through a :class:`bot.audio.convert.Chunker` per speaker into that speaker's real
:class:`bot.stt.session.SttSession`, which streams it to :mod:`bench.chunk_server` in another
process (pinned to another CPU when there are two).

Measured per variant (``product``: :class:`~bot.voice.receiver.VoiceReceiver` as the meeting
intake sets it up; ``lean``: the receive prototype :class:`bench.lean.LeanReceiver`), both into
``SttSession.send_audio``, interleaved on the same sessions: this process's CPU per speaker-second
(everything: receive, convert, upstream, driver) -> speakers per core without any adding up,
and the lag from the moment the packet completing a chunk was due (its arrival time) to the
chunk's arrival at the server: what "audio at the STT socket <= one chunk + 5 ms after its
packet" asks for. Not included: the UDP socket reads (``recvfrom`` and asyncio's
``datagram_received`` per packet), so real CPU is somewhat higher. DAVE is off here (a 250-member
MLS group takes minutes to form); row 1 shows what DAVE adds per packet.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import struct
import time
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from bench.chunk_server import SendLog
from bench.lean import LeanReceiver
from bench.media import PACKETS_PER_SECOND, Recording, make_packets
from bench.upstream import ChunkServer, _p99, start_sessions
from bot.audio.convert import Chunker
from bot.stt.session import SttEvent, SttSession
from bot.voice.client import TICK_SECONDS
from bot.voice.crypto import MODE_AES256_GCM
from bot.voice.inbox import INBOX_BATCH
from bot.voice.receiver import VoiceReceiver

log = logging.getLogger(__name__)

STT_RATE: Final = 16000
CHUNK_MS: Final = 100
DRIVER_SLEEP_S: Final = 0.001
WARMUP_S: Final = 1.0
_HEAD = struct.Struct("<II")
#: product: VoiceReceiver -> Chunker -> SttSession.send_audio; lean: bench.lean.LeanReceiver
#: (chunks straight out of libopus) into the same sessions. Each phase gets a fresh receiver
#: and chunkers (a receiver that sat out a phase would see the other phases' packets as lost
#: and conceal them).
VARIANTS: Final = ("product", "lean")


@dataclass(frozen=True)
class E2EResult:
    speakers: int
    variant: str
    seconds: float
    cpu_percent: float  # of one core: the whole process
    us_per_speaker_second: float
    lag_p50_ms: float
    lag_p99_ms: float
    lag_max_ms: float
    chunks_sent: int
    chunks_arrived: int
    #: Most the driver was behind schedule at the end of one of this variant's phases (s): more
    #: than a few ms means the process could not keep up.
    behind_s: float
    cpu_ratios: tuple[float, ...] = ()
    lag_p99_per_round: tuple[float, ...] = field(default_factory=tuple)
    #: Row 2u's lean variant: wall µs per packet inside ``opus_decode`` in the real-time loop.
    decode_us_per_packet: float | None = None

    @property
    def speakers_per_core(self) -> float:
        return 1e6 / self.us_per_speaker_second


async def run_e2e(server: ChunkServer, rec: Recording, speakers: int, seconds: float, *,
                  variants: tuple[str, ...] = VARIANTS, repeats: int = 2,
                  mode: str = MODE_AES256_GCM) -> dict[str, E2EResult]:
    """``speakers`` speakers end to end, ``seconds`` measured per variant (split into
    ``repeats`` rounds of the ``variants`` in alternating order) after a warm-up; see the
    module docstring. The recording must cover warm-up + seconds x variants."""
    frames_needed = int((WARMUP_S + seconds * len(variants) + 0.5) * PACKETS_PER_SECOND)
    if len(rec.opus) < frames_needed:
        raise ValueError(f"recording too short: {len(rec.opus)} frames, need {frames_needed}")
    packets = make_packets(rec.opus[:frames_needed], rec.levels[:frames_needed], mode=mode,
                           dave=False, speakers=speakers, meeting=True)
    datagrams = [d for _k, d in packets.datagrams]
    dues = packets.due
    index_of = {s.user_id: i for i, s in enumerate(packets.speakers)}
    events = 0

    def on_event(_e: SttEvent) -> None:
        nonlocal events
        events += 1

    clients = [SttSession(url=server.url, api_key="bench", sample_rate=STT_RATE,
                          speaker=f"s{i}", on_event=on_event) for i in range(speakers)]
    chunkers = [Chunker(STT_RATE, CHUNK_MS) for _ in range(speakers)]
    counters = [0] * speakers
    sends = SendLog(speakers)
    phase_no = -1
    current_due = 0.0

    def on_chunk(user_id: int, chunk: bytes) -> None:
        s = index_of[user_id]
        k = counters[s]
        counters[s] = k + 1
        sends.record(s, k, current_due, phase_no)
        clients[s].send_audio(_HEAD.pack(s, k) + chunk[_HEAD.size:])

    def on_audio(user_id: int, pcm: np.ndarray) -> None:
        for chunk in chunkers[index_of[user_id]].push(pcm):
            on_chunk(user_id, chunk)

    def new_receiver(v: str) -> VoiceReceiver | LeanReceiver:
        nonlocal chunkers
        chunkers = [Chunker(STT_RATE, CHUNK_MS) for _ in range(speakers)]
        if v == "lean":
            return LeanReceiver(mode=packets.mode, secret_key=packets.secret_key,
                                users={sp.ssrc: sp.user_id for sp in packets.speakers},
                                on_chunk=on_chunk, rate=STT_RATE, chunk_ms=CHUNK_MS)
        r = VoiceReceiver(sample_rate=STT_RATE, on_audio=on_audio, batch_ms=CHUNK_MS,
                          on_idle=lambda _u: None, is_ignored=lambda _u: False)
        r.set_transport(packets.mode, packets.secret_key)
        for sp in packets.speakers:
            r.on_speaking(sp.user_id, sp.ssrc, 0.0)
        return r

    problems: dict[str, int] = {}

    phases: list[tuple[str, float, float, int]] = []  # (variant, cpu, wall, packets handled)
    try:
        await start_sessions(clients)
        plan = [(variants[0], WARMUP_S, False)]
        for r in range(repeats):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                plan.append((v, seconds / repeats, True))
        gc.collect()
        t0 = time.monotonic() + 0.01
        pos = 0
        next_tick = t0 + TICK_SECONDS
        behind: dict[int, float] = {}
        receiver: VoiceReceiver | LeanReceiver | None = None
        for v, length, measured in plan:
            _close(receiver, problems)
            receiver = new_receiver(v)
            handle, tick = receiver.handle_packet, receiver.tick
            phase_no = len(phases) if measured else -1
            # Each phase gets its own wall time; a backlog left by the previous phase is
            # re-timed (not dropped) so that it is not charged to this one.
            start = time.monotonic()
            phase_end = start + length
            if pos < len(datagrams) and t0 + dues[pos] < start:
                t0 = start - dues[pos]
            cpu0, wall0, pos0 = time.process_time(), time.monotonic(), pos
            while True:
                now = time.monotonic()
                if now >= phase_end:
                    break
                # As the voice adapter drains its inbox: at most INBOX_BATCH datagrams per
                # loop callback, the rest after whatever became ready meanwhile.
                budget = INBOX_BATCH
                while pos < len(datagrams) and budget:
                    due = t0 + dues[pos]
                    if due > now:
                        break
                    current_due = due
                    handle(datagrams[pos], now)
                    pos += 1
                    budget -= 1
                if now >= next_tick:
                    current_due = now
                    tick(now)
                    next_tick += TICK_SECONDS
                await asyncio.sleep(DRIVER_SLEEP_S if budget else 0)
            late = max(0.0, time.monotonic() - (t0 + dues[min(pos, len(dues) - 1)]))
            log.info("phase %s: pos %d of %d, behind %.3f", v, pos, len(datagrams), late)
            if measured:
                behind[len(phases)] = late
                phases.append((v, time.process_time() - cpu0, time.monotonic() - wall0,
                               pos - pos0))
        _close(receiver, problems)
        await asyncio.sleep(0.5)
        import aiohttp

        async with aiohttp.ClientSession() as http:
            async with http.get(f"{server.url}/results") as resp:
                arrivals = (await resp.json())["arrivals"]
            await (await http.get(f"{server.url}/reset")).release()
    finally:
        await asyncio.gather(*(c.aclose() for c in clients), return_exceptions=True)
    lags = sends.lags_ms(arrivals, len(phases))
    sent = sends.sent(len(phases))
    # CPU per second of audio handled (not per wall second): a process that falls behind has
    # handled less audio than the wall time, and its cost per speaker-second must say so.
    def cost(ph: tuple[str, float, float, int]) -> float:
        return ph[1] / max(1, ph[3]) * PACKETS_PER_SECOND

    base = [cost(ph) for ph in phases if ph[0] == variants[0]]
    out = {}
    for v in variants:
        mine = [i for i, ph in enumerate(phases) if ph[0] == v]
        pooled = sorted(x for i in mine for x in lags[i])
        if not pooled:
            raise RuntimeError(f"no chunk of the {v} phases arrived")
        costs = [cost(phases[i]) for i in mine]
        rate = statistics.median(phases[i][1] / phases[i][2] for i in mine)
        out[v] = E2EResult(
            speakers=speakers, variant=v, seconds=sum(phases[i][2] for i in mine),
            cpu_percent=rate * 100, us_per_speaker_second=statistics.median(costs) * 1e6,
            lag_p50_ms=statistics.median(pooled), lag_p99_ms=_p99(pooled),
            lag_max_ms=pooled[-1], chunks_sent=sum(sent[i] for i in mine),
            chunks_arrived=len(pooled), behind_s=max(behind[i] for i in mine),
            cpu_ratios=tuple(a / b for a, b in zip(costs, base, strict=True)),
            lag_p99_per_round=tuple(_p99(sorted(lags[i])) for i in mine if lags[i]),
        )
    if problems:
        log.warning("receivers counted problems: %s", problems)
    return out


def _close(receiver: VoiceReceiver | LeanReceiver | None, problems: dict[str, int]) -> None:
    """End a phase's receiver, adding up what it counted as wrong (nothing, on these packets)."""
    if isinstance(receiver, VoiceReceiver):
        for k, n in receiver.counters().as_dict().items():
            if k not in ("received", "decoded", "waiting") and n:
                problems[k] = problems.get(k, 0) + n
    elif receiver is not None:
        if receiver.out_of_order:
            problems["out_of_order"] = problems.get("out_of_order", 0) + receiver.out_of_order
        receiver.close()


async def row2e(rec: Recording, counts: tuple[int, ...], seconds: float, *,
                repeats: int = 2) -> list[E2EResult]:
    """:func:`run_e2e` per speaker count, server and this process pinned as in row 2."""
    from bench.upstream import pinned_server

    out: list[E2EResult] = []
    async with pinned_server() as pinned:
        for n in counts:
            by = await run_e2e(pinned.server, rec, n, seconds, repeats=repeats)
            out.extend(by.values())
    return out


if __name__ == "__main__":
    import json
    import sys

    from bench.media import record

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    secs = float(sys.argv[2]) if len(sys.argv) > 2 else 4.0
    for r in asyncio.run(row2e(record(WARMUP_S + len(VARIANTS) * secs + 1), (n,), secs)):
        print(json.dumps({**r.__dict__, "speakers_per_core": round(r.speakers_per_core)}))

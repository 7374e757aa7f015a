"""Each SSRC's jitter buffer and Opus decoder, and what the closed ones counted.

An SSRC is one sender's RTP stream within a voice connection; a member may have several over a
meeting (reconnects, moves). Closing one counts what its jitter buffer still held as ``closed``
and keeps its duplicate/late/stray counts, so :class:`~bot.voice.counters.ReceiveCounters`
accounts for every datagram however many streams came and went.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.voice.counters import ReceiveCounters
from bot.voice.jitter import JitterBuffer, JitterStats
from bot.voice.opus import OpusDecoder
from bot.voice.timeline import FRAME_SAMPLES_48K, RTP_CLOCK_RATE


@dataclass
class SsrcState:
    ssrc: int
    user_id: int
    jitter: JitterBuffer
    decoder: OpusDecoder
    last_packet: float


class SsrcStreams:
    """The live SSRC streams of one voice connection (``by_ssrc``), and the closed ones' totals."""

    def __init__(self, *, output_rate: int, jitter_packets: int, counters: ReceiveCounters) -> None:
        self._output_rate = output_rate
        self._jitter_packets = jitter_packets
        self._c = counters
        self.by_ssrc: dict[int, SsrcState] = {}
        #: Jitter counters of streams already closed (live streams are summed on demand).
        self._closed = JitterStats()

    def open(self, ssrc: int, user_id: int, now: float) -> SsrcState:
        state = SsrcState(
            ssrc=ssrc,
            user_id=user_id,
            jitter=JitterBuffer(window_packets=self._jitter_packets,
                                samples_per_frame=FRAME_SAMPLES_48K, clock_rate=RTP_CLOCK_RATE),
            decoder=OpusDecoder(self._output_rate, 1),
            last_packet=now,
        )
        self.by_ssrc[ssrc] = state
        return state

    def close(self, ssrc: int) -> SsrcState | None:
        """Forget the stream; what its jitter buffer still held is counted ``closed``."""
        state = self.by_ssrc.pop(ssrc, None)
        if state is not None:
            self._c.closed += state.jitter.waiting
            done = state.jitter.stats
            self._closed.duplicates += done.duplicates
            self._closed.late += done.late
            self._closed.stray += done.stray
        return state

    def count_into(self, c: ReceiveCounters) -> None:
        """Duplicates, late and stray packets of every stream so far into ``c``; the frames the
        live jitter buffers hold are added to ``c.waiting``."""
        jitter = [s.jitter for s in self.by_ssrc.values()]
        stats = [self._closed, *(j.stats for j in jitter)]
        c.duplicate = sum(st.duplicates for st in stats)
        c.late = sum(st.late for st in stats)
        c.stray = sum(st.stray for st in stats)
        c.waiting += sum(j.waiting for j in jitter)

"""Per-SSRC jitter buffer: reorder RTP packets and turn gaps into a continuous timeline.

Pure and sans-IO: ``push`` packets in, timeline events out; no clock, no timers (the receiver
calls :meth:`JitterBuffer.drain` when nothing arrived for a while). Outputs, in order:

* :class:`Frame`: an Opus (or DAVE-decrypted Opus) payload to decode, one frame long.
* :class:`Lost`: packets missing from the sequence; the decoder conceals them (PLC), and the
  last one can be recovered from the next packet's in-band FEC (``fec_payload``).
* :class:`Silence`: the sequence is contiguous but the RTP timestamp jumped: Discord stops
  sending during silence (no comfort noise), so the gap is inserted as silence to keep every
  speaker's timeline aligned with the wall clock.

The timeline is accounted in RTP timestamp units (48 kHz for Opus): after a frame at timestamp
``t``, the next frame is expected at ``t + samples_per_frame``; any positive difference is filled
with :class:`Lost` (as many frames as sequence numbers are missing) and :class:`Silence` (the
rest). So, unless a gap is clamped, the samples of all outputs add up to
``last_timestamp - first_timestamp + samples_per_frame`` of the released frames. A gap longer
than ``max_gap_seconds`` is clamped to it and counted in :attr:`JitterStats.clamped_gaps`
(a speaker who was silent for an hour does not produce an hour of zeros). Timestamps alone can
still claim more time than passed; the receiver (:mod:`bot.voice.receiver`) bounds each
member's output by the wall clock.

Reordering: a missing packet is waited for until ``window_packets`` later packets are buffered,
then declared lost; a packet arriving after its slot was released is dropped and counted
(``late``), as are exact duplicates. Sequence numbers (16-bit) and timestamps (32-bit) wrap.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import TypeAlias

#: Opus at 48 kHz in 20 ms frames, as Discord sends it (discord.opus.Encoder.SAMPLES_PER_FRAME).
DEFAULT_SAMPLES_PER_FRAME = 960
DEFAULT_CLOCK_RATE = 48000
#: Three 20 ms packets of reordering tolerance: 60 ms of added latency at most.
DEFAULT_WINDOW_PACKETS = 3
#: Longest gap inserted as Lost/Silence; longer pauses are clamped (and counted).
DEFAULT_MAX_GAP_SECONDS = 10.0
#: RFC 3550 appendix A.1: a forward jump of up to MAX_DROPOUT sequence numbers is loss, a
#: backward one of up to MAX_MISORDER is a late packet; anything further is a restarted sender,
#: accepted after two consecutive packets confirm it.
MAX_DROPOUT = 3000
MAX_MISORDER = 100

_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32
_LOST_MEMORY = 64  # how many lost sequence numbers we remember to tell "late" from "duplicate"


@dataclass(frozen=True, slots=True)
class Frame:
    """One received payload to decode, in order; ``timestamp`` is its RTP timestamp."""

    payload: bytes
    timestamp: int


@dataclass(frozen=True, slots=True)
class Lost:
    """``samples`` of missing packets to conceal; ``fec_payload`` (the next packet) carries
    in-band FEC for the last of them when it is known."""

    samples: int
    fec_payload: bytes | None


@dataclass(frozen=True, slots=True)
class Silence:
    """``samples`` of silence: the sender paused (talk-spurt gap), nothing was lost."""

    samples: int


JitterOutput: TypeAlias = Frame | Lost | Silence


@dataclass(slots=True)
class JitterStats:
    """Counters for one stream (packets unless named otherwise)."""

    received: int = 0
    released: int = 0
    lost: int = 0
    duplicates: int = 0
    late: int = 0
    clamped_gaps: int = 0
    #: Packets far outside the expected sequence, dropped unless the next one confirms a restart.
    stray: int = 0
    resyncs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def _signed(delta: int, modulus: int) -> int:
    """``delta`` folded into ``[-modulus/2, modulus/2)``: the wrap-aware difference."""
    half = modulus >> 1
    return (delta + half) % modulus - half


class JitterBuffer:
    """Reorders one SSRC's packets and fills gaps; one instance per received stream."""

    __slots__ = (
        "window",
        "samples_per_frame",
        "clock_rate",
        "max_gap_samples",
        "stats",
        "_pending",
        "_next",
        "_highest",
        "_cursor",
        "_lost_recent",
        "_probation",
    )

    def __init__(
        self,
        *,
        window_packets: int = DEFAULT_WINDOW_PACKETS,
        samples_per_frame: int = DEFAULT_SAMPLES_PER_FRAME,
        clock_rate: int = DEFAULT_CLOCK_RATE,
        max_gap_seconds: float = DEFAULT_MAX_GAP_SECONDS,
    ) -> None:
        if window_packets < 1 or samples_per_frame < 1 or clock_rate < 1:
            raise ValueError("window_packets, samples_per_frame and clock_rate must be positive")
        self.window = window_packets
        self.samples_per_frame = samples_per_frame
        self.clock_rate = clock_rate
        self.max_gap_samples = max(0, int(max_gap_seconds * clock_rate))
        self.stats = JitterStats()
        #: extended sequence number -> (RTP timestamp, payload)
        self._pending: dict[int, tuple[int, bytes]] = {}
        self._next: int | None = None  # extended sequence expected next; None before start
        self._highest: int | None = None  # highest extended sequence seen
        self._cursor: int | None = None  # RTP timestamp where the next sample is due
        self._lost_recent: deque[int] = deque(maxlen=_LOST_MEMORY)
        self._probation: int | None = None  # 16-bit seq that would confirm a restart

    @property
    def waiting(self) -> int:
        """Packets held back, waiting for a hole before them to fill."""
        return len(self._pending)

    def push(self, sequence: int, timestamp: int, payload: bytes) -> list[JitterOutput]:
        """Accept one packet; return whatever can now be released, in timeline order."""
        self.stats.received += 1
        sequence &= 0xFFFF
        timestamp &= 0xFFFFFFFF
        out: list[JitterOutput] = []
        if self._highest is None:
            ext = sequence
        else:
            ext = self._highest + _signed(sequence - self._highest, _SEQ_MOD)
            reference = self._next if self._next is not None else self._highest
            jump = ext - reference
            if jump > MAX_DROPOUT or jump < -MAX_MISORDER:
                if self._probation != sequence:  # wait for a second packet to confirm it
                    self._probation = (sequence + 1) & 0xFFFF
                    self.stats.stray += 1
                    return out
                self._resync(out)
                ext = sequence
        self._probation = None
        if self._next is not None and ext < self._next:
            if ext in self._lost_recent:
                self.stats.late += 1
            else:
                self.stats.duplicates += 1
            return out
        if ext in self._pending:
            self.stats.duplicates += 1
            return out
        self._pending[ext] = (timestamp, payload)
        if self._highest is None or ext > self._highest:
            self._highest = ext
        self._release(out, flush=False)
        return out

    def push_in_order(self, sequence: int, timestamp: int) -> bool:
        """The common packet in one step: True when this packet is exactly the one due next
        (nothing waiting, no gap before it). It is then accounted as released, exactly as if
        :meth:`push` had returned ``[Frame(payload, timestamp)]``, and the caller decodes its
        payload at once; no output objects are made. False: nothing changed, use :meth:`push`.
        """
        nxt = self._next
        cursor = self._cursor
        if nxt is None or cursor is None or self._pending or sequence != nxt & 0xFFFF:
            return False
        # push() inserts nothing before a frame whose timestamp is at or before the cursor
        # (overlap); anything later is a gap (Lost/Silence) and takes the general path.
        ahead = (timestamp - cursor) & 0xFFFFFFFF
        if 0 < ahead < 0x80000000:
            return False
        stats = self.stats
        stats.received += 1
        stats.released += 1
        # With nothing pending, _highest == _next - 1: push() would set both the same way.
        self._highest = nxt
        self._next = nxt + 1
        self._cursor = (timestamp + self.samples_per_frame) % _TS_MOD
        self._probation = None
        return True

    def drain(self, force: bool = False) -> list[JitterOutput]:
        """Release everything waiting, declaring holes lost (nothing arrived for a while).

        The stream position is kept, so a later packet continues the timeline (a talk-spurt
        gap becomes :class:`Silence`). With ``force`` the position is forgotten as well: the
        stream ended (speaker left, SSRC replaced) and the next packet starts a new timeline.
        """
        out: list[JitterOutput] = []
        self._release(out, flush=True)
        if force:
            self._next = self._highest = self._cursor = self._probation = None
            self._lost_recent.clear()
        return out

    def _resync(self, out: list[JitterOutput]) -> None:
        """The sender restarted its sequence: flush, then follow the new numbering."""
        self.stats.resyncs += 1
        self._release(out, flush=True)
        self._next = self._highest = None
        self._lost_recent.clear()

    def _release(self, out: list[JitterOutput], *, flush: bool) -> None:
        pending = self._pending
        nxt = self._next
        if nxt is None:
            if not pending or (len(pending) < self.window and not flush):
                return
            nxt = min(pending)
        spf = self.samples_per_frame
        while pending:
            ext = nxt
            entry = pending.pop(ext, None)
            missing = 0
            if entry is None:
                if len(pending) < self.window and not flush:
                    break
                ext = min(pending)
                entry = pending.pop(ext)
                missing = ext - nxt
                self.stats.lost += missing
                self._lost_recent.extend(range(max(nxt, ext - _LOST_MEMORY), ext))
            timestamp, payload = entry
            if self._cursor is not None:
                self._fill_gap(out, timestamp, missing, payload)
            out.append(Frame(payload, timestamp))
            self.stats.released += 1
            self._cursor = (timestamp + spf) % _TS_MOD
            nxt = ext + 1
        self._next = nxt

    def _fill_gap(self, out: list[JitterOutput], timestamp: int, missing: int, nxt: bytes) -> None:
        """Lost and/or Silence between the cursor and ``timestamp`` (clamped, never negative)."""
        gap = _signed(timestamp - (self._cursor or 0), _TS_MOD)
        if gap <= 0:
            return  # overlap or timestamps reset: nothing to insert
        if gap > self.max_gap_samples:
            gap = self.max_gap_samples
            self.stats.clamped_gaps += 1
        lost = min(gap, missing * self.samples_per_frame)
        if lost:
            out.append(Lost(lost, nxt))
        if gap > lost:
            out.append(Silence(gap - lost))

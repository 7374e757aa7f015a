"""Each member's output timeline: jitter-buffer outputs in, mono PCM out (``on_audio``).

The second half of the receive path (:mod:`bot.voice.receiver` routes and decrypts packets):
frames are decoded, losses concealed (PLC, in-band FEC), talk-spurt gaps and real-time pauses
turned into silence; and a member's audio never runs ahead of the wall clock by more than
``max_ahead``: invented samples past that bound are trimmed and frames past it dropped
(``too_fast``), whatever packet timestamps claim. Counts go into the receiver's
:class:`~bot.voice.counters.ReceiveCounters`. With ``batch_samples`` (the STT chunk) the PCM
is collected per member, frames decoded straight into that buffer, and handed on in whole
batches: the consumer's chunker would hold anything less anyway, so nothing arrives later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bot.voice.counters import ReceiveCounters
from bot.voice.jitter import Frame, JitterOutput, Lost
from bot.voice.opus import OPUS_SILENCE_FRAME, OpusDecoder, OpusError

#: Discord's RTP clock and frame: 48 kHz, 20 ms (960 samples) per Opus packet.
RTP_CLOCK_RATE = 48000
FRAME_SAMPLES_48K = 960
#: libopus conceals (PLC/FEC) only whole 2.5 ms units: 120 samples at 48 kHz.
PLC_UNIT_48K = RTP_CLOCK_RATE // 400


@dataclass
class MemberTimeline:
    """One member's stream as emitted so far."""

    user_id: int
    #: Wall-clock time up to which this member's timeline has been emitted.
    emitted_until: float
    #: Arrival time of the packet that started this member's stream: the budget's origin.
    started: float
    #: Output samples emitted so far (audio, concealment and silence).
    emitted: int = 0
    #: Output samples of real-time silence emitted since the last audio frame.
    silence_filled: int = 0
    #: The member's last frame was Discord's end-of-spurt silence frame.
    paused: bool = False
    last_packet: float = 0.0
    ssrcs: set[int] = field(default_factory=set)
    #: With batching (:attr:`Emitter.batch_samples`): output not yet handed on, ``pending[:fill]``.
    pending: np.ndarray | None = None
    fill: int = 0


class Emitter:
    """Turns one connection's jitter outputs into each member's PCM; see the module docstring."""

    def __init__(self, *, output_rate: int, max_ahead: float, counters: ReceiveCounters,
                 on_audio: Callable[[int, np.ndarray], None], batch_samples: int = 0) -> None:
        if batch_samples < 0:
            raise ValueError("batch_samples must be 0 (no batching) or positive")
        self.output_rate = output_rate
        #: 0: ``on_audio`` gets each piece as it is made (a 20 ms frame, a gap). Otherwise it
        #: gets whole multiples of this many samples (the STT chunk), frames decoded straight
        #: into the member's buffer; :meth:`flush` hands on the rest when the stream ends.
        self.batch_samples = batch_samples
        self.max_ahead = max_ahead
        self._c = counters
        self._on_audio = on_audio
        #: Frames decoded per member (user id), for the whole connection.
        self.decoded_by_member: Counter[int] = Counter()
        self._plc_out = self._out_samples(PLC_UNIT_48K)
        #: Output samples of one 20 ms frame.
        self._frame_out = self._out_samples(FRAME_SAMPLES_48K)
        #: A batch buffer holds a batch less one sample plus the longest Opus packet (120 ms).
        self._capacity = batch_samples + self._out_samples(6 * FRAME_SAMPLES_48K)

    def _out_samples(self, samples_48k: int) -> int:
        return samples_48k * self.output_rate // RTP_CLOCK_RATE

    def room(self, member: MemberTimeline, now: float) -> int:
        """Output samples the member may still emit at ``now`` without running ahead."""
        wall = max(0.0, now - member.started) + self.max_ahead
        return int(wall * self.output_rate) - member.emitted

    def _trim(self, samples: int) -> None:
        self._c.trimmed_ms += samples * 1000 // self.output_rate

    def emit_all(self, decoder: OpusDecoder, member: MemberTimeline,
                 outs: list[JitterOutput], now: float) -> None:
        """What one SSRC's jitter buffer released, decoded into the member's timeline."""
        # Invented audio (silence, concealment) leaves room for the real frames released after
        # it, so what the wall-clock bound cuts is what was made up, not what was said.
        frames_after = sum(isinstance(out, Frame) for out in outs)
        frame_out = self._out_samples(FRAME_SAMPLES_48K)
        for out in outs:
            if isinstance(out, Frame):
                frames_after -= 1
                self._emit(decoder, member, out, now, 0)
            else:
                self._emit(decoder, member, out, now, frames_after * frame_out)

    def emit_frame(self, decoder: OpusDecoder, member: MemberTimeline, payload: bytes,
                   now: float) -> None:
        """One frame released in order with nothing before it: what :meth:`emit_all` does for
        ``[Frame(payload, ...)]``, without the list (the receiver's fast path)."""
        elapsed = now - member.started  # room(), inlined: this runs for every packet
        if elapsed < 0.0:
            elapsed = 0.0
        room = int((elapsed + self.max_ahead) * self.output_rate) - member.emitted
        self._frame(decoder, member, payload, now, room)

    def _frame(self, decoder: OpusDecoder, member: MemberTimeline, payload: bytes, now: float,
               room: int) -> None:
        if room < self._frame_out:
            self._c.too_fast += 1
            return
        member.paused = payload == OPUS_SILENCE_FRAME
        if self.batch_samples:
            buf = member.pending
            if buf is None:
                buf = member.pending = np.empty(self._capacity, dtype=np.int16)
            fill = member.fill
            try:
                n = decoder.decode_into(payload, buf, fill)
            except (OpusError, ValueError):  # ValueError: an empty payload (no Opus packet)
                pass  # concealed below, as without batching
            else:
                self._c.decoded += 1
                self.decoded_by_member[member.user_id] += 1
                if n > room:  # e.g. a 120 ms packet where 20 ms were due
                    self._trim(n - room)
                    n = room
                member.silence_filled = 0
                member.emitted_until = now
                member.emitted += n
                member.fill = fill + n
                if member.fill >= self.batch_samples:
                    self._hand_on_batches(member)
                return
            self._c.undecodable += 1
            pcm = decoder.conceal(self._frame_out)
        else:
            try:
                pcm = decoder.decode(payload)
            except (OpusError, ValueError):  # ValueError: an empty payload (no Opus packet)
                self._c.undecodable += 1
                pcm = decoder.conceal(self._frame_out)
            else:
                self._c.decoded += 1
                self.decoded_by_member[member.user_id] += 1
        if len(pcm) > room:  # e.g. a 120 ms packet where 20 ms were due
            self._trim(len(pcm) - room)
            pcm = pcm[:room]
        member.silence_filled = 0
        member.emitted_until = now
        if len(pcm):
            member.emitted += len(pcm)
            self._hand_on(member, pcm)

    def _hand_on(self, member: MemberTimeline, pcm: np.ndarray) -> None:
        """``pcm`` to ``on_audio`` now, or (batching) into the member's buffer, handing on
        each whole batch."""
        batch = self.batch_samples
        if not batch:
            self._on_audio(member.user_id, pcm)
            return
        buf = member.pending
        if buf is None:
            buf = member.pending = np.empty(self._capacity, dtype=np.int16)
        done, total = 0, len(pcm)
        while done < total:
            take = min(total - done, len(buf) - member.fill)
            buf[member.fill:member.fill + take] = pcm[done:done + take]
            member.fill += take
            done += take
            if member.fill >= batch:
                self._hand_on_batches(member)

    def _hand_on_batches(self, member: MemberTimeline) -> None:
        """Every whole batch in the member's buffer to ``on_audio``; the rest moves to the front."""
        buf, fill = member.pending, member.fill
        assert buf is not None
        size = fill - fill % self.batch_samples
        out = buf[:size].copy()
        rest = fill - size
        if rest:
            buf[:rest] = buf[size:fill]
        member.fill = rest
        self._on_audio(member.user_id, out)

    def flush(self, member: MemberTimeline) -> None:
        """The member's stream ends: whatever is still batched goes to ``on_audio`` now."""
        if member.fill and member.pending is not None:
            out = member.pending[:member.fill].copy()
            member.fill = 0
            self._on_audio(member.user_id, out)

    def _emit(self, decoder: OpusDecoder, member: MemberTimeline,
              out: JitterOutput, now: float, reserve: int) -> None:
        room = self.room(member, now) - reserve
        if isinstance(out, Frame):
            self._frame(decoder, member, out.payload, now, room)
            return
        if isinstance(out, Lost):
            self._c.concealed_frames += max(1, round(out.samples / FRAME_SAMPLES_48K))
            pcm = self._conceal(decoder, out, room)
            member.silence_filled = 0
        else:
            # A talk-spurt gap: only the part not already filled in real time.
            n = self._out_samples(out.samples) - member.silence_filled
            member.silence_filled = 0
            if n > room:
                self._trim(n - max(room, 0))
                n = room
            if n <= 0:
                return
            pcm = np.zeros(n, dtype=np.int16)
        member.emitted_until = now
        if len(pcm):
            member.emitted += len(pcm)
            self._hand_on(member, pcm)

    def _conceal(self, decoder: OpusDecoder, out: Lost, room: int) -> np.ndarray:
        """PCM for a gap of lost packets, at most ``room`` samples: PLC for the older part,
        in-band FEC for the last frame, and zeros for any part that is not whole 2.5 ms units
        (a timestamp gap that no 20 ms packet grid explains)."""
        lost_48k = out.samples - out.samples % PLC_UNIT_48K
        if lost_48k != out.samples:
            self._c.repaired_gaps += 1
        n = self._out_samples(lost_48k)
        rest = self._out_samples(out.samples - lost_48k)
        if n + rest > room:
            keep = max(room, 0)
            self._trim(n + rest - keep)
            rest = min(rest, keep)
            n = (keep - rest) // self._plc_out * self._plc_out
        parts: list[np.ndarray] = []
        if n > 0:
            one = self._out_samples(FRAME_SAMPLES_48K)
            fec = out.fec_payload
            try:
                if fec and n > one:
                    parts.append(decoder.conceal(n - one))
                    parts.append(decoder.decode_fec(fec, one))
                elif fec and n == one:
                    parts.append(decoder.decode_fec(fec, n))
                else:
                    parts.append(decoder.conceal(n))
            except (OpusError, ValueError):  # FEC data libopus refuses: plain PLC
                done = sum(len(p) for p in parts)
                parts.append(decoder.conceal(n - done))
        if rest > 0:
            parts.append(np.zeros(rest, dtype=np.int16))
        if not parts:
            return np.zeros(0, dtype=np.int16)
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def fill_silence(self, member: MemberTimeline, now: float) -> None:
        """The member sends nothing: silence in real time up to ``now`` (within the bound),
        so the STT service hears the pause and commits the sentence."""
        if now <= member.emitted_until:
            return
        n = int(round((now - member.emitted_until) * self.output_rate))
        n = min(n, self.room(member, now))
        if n > 0:
            member.emitted_until = now
            member.silence_filled += n
            member.emitted += n
            self._hand_on(member, np.zeros(n, dtype=np.int16))

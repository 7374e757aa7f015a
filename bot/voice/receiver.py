"""Voice receive core: raw UDP datagrams in, per-member mono PCM out.

    datagram -> RTCP? skip -> parse RTP -> SSRC -> member (or wait briefly in a bounded buffer)
             -> opted out / bot? drop (before any decryption) -> transport AEAD decrypt
             -> DAVE decrypt (per member) -> jitter buffer (reorder, loss, talk-spurt gaps)
             -> Opus decode straight to mono at the STT rate (FEC/PLC on loss) -> on_audio

No sockets and no timers: the discord.py adapter (``bot.voice.client``) hands datagrams in with
:meth:`VoiceReceiver.handle_packet` and calls :meth:`VoiceReceiver.tick` a few times a second,
both on the event loop, with the time injected. No packet, whatever its bytes, raises out of
here: each datagram ends in exactly one bucket of :class:`ReceiveCounters` (decoded, or dropped
by reason), or is still waiting (for its op 5, or in a jitter buffer); see
:meth:`VoiceReceiver.counters`.

A member's emitted audio never runs ahead of the wall clock by more than the receiver's jitter
window (``max_ahead``: the reorder window plus the time a stalled stream is waited for before
silence is invented): whatever packet timestamps claim, invented samples (silence, concealment)
past that bound are trimmed and frames past it dropped (``too_fast``). This also bounds what the
STT service is sent (and paid for).

Discord stops sending packets while a member is silent (after five silence frames), but the STT
service only commits a sentence once it *hears* silence; so while a member who was talking sends
nothing, :meth:`tick` emits silence in real time, and the talk-spurt gap reported later by the
jitter buffer is shortened by what was already filled, keeping each member's timeline continuous
and of the right length. After ``idle_timeout`` without packets the member's stream ends
(``on_idle``) and a new one starts with their next packet.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from bot.voice.crypto import DecryptError, TransportCipher
from bot.voice.dave import DaveReceiver
from bot.voice.jitter import Frame, JitterBuffer, JitterOutput, JitterStats, Lost
from bot.voice.opus import OPUS_SAMPLE_RATES, OPUS_SILENCE_FRAME, OpusDecoder, OpusError
from bot.voice.rtp import MalformedPacket, is_rtcp, parse_rtp
from bot.voice.speakers import PendingPackets, SpeakerMap

log = logging.getLogger(__name__)

#: Discord's RTP clock and frame: 48 kHz, 20 ms (960 samples) per Opus packet.
RTP_CLOCK_RATE = 48000
FRAME_SAMPLES_48K = 960
#: libopus conceals (PLC/FEC) only whole 2.5 ms units: 120 samples at 48 kHz.
PLC_UNIT_48K = RTP_CLOCK_RATE // 400
#: Discord's audio payload type (0x78 = 120).
OPUS_PAYLOAD_TYPE = 0x78
#: At most one log line per this many seconds for an unexpected error (a bug) per packet.
ERROR_LOG_INTERVAL = 30.0

AudioCallback = Callable[[int, np.ndarray], None]
IdleCallback = Callable[[int], None]


@dataclass(slots=True)
class ReceiveCounters:
    """Where every received datagram went, for logs and ``/transcribe status``.

    Each datagram the receiver was handed (``received``) is in exactly one bucket: ``decoded``
    or one of :data:`DROP_REASONS`, or still ``waiting`` (for its member's op 5, or in a
    jitter buffer for a hole before it): ``received == decoded + dropped + waiting``. The last
    three fields are not datagram buckets.
    """

    received: int = 0
    decoded: int = 0
    # -- dropped, by reason --
    #: RTCP sharing the voice socket (reports, not audio).
    rtcp: int = 0
    #: Not an RTP packet, or its header (CSRC list, extension header) runs past its end.
    malformed: int = 0
    #: Authenticated, but its padding or extension length does not fit the payload.
    bad_payload: int = 0
    other_payload_type: int = 0
    #: From a member who opted out (or the bot): dropped before any decryption.
    ignored: int = 0
    #: Arrived before the transport key (SESSION_DESCRIPTION).
    no_key: int = 0
    #: Failed transport authentication (wrong key, tampering, corruption, too short).
    bad_tag: int = 0
    #: DAVE could not decrypt it (reasons in ``DaveReceiver.stats``).
    dave_failed: int = 0
    #: Its SSRC was never named by an op 5 in time (held, then expired or crowded out).
    unknown_ssrc: int = 0
    duplicate: int = 0
    #: Arrived after its place in the timeline was concealed.
    late: int = 0
    #: Far outside its stream's sequence and not confirmed as a restart.
    stray: int = 0
    #: libopus refused it (or it was empty): concealed instead.
    undecodable: int = 0
    #: Would have put the member's audio ahead of the wall clock by more than the jitter window.
    too_fast: int = 0
    #: Still in a jitter buffer when its stream closed (reconnect, member left or opted out).
    closed: int = 0
    #: An unexpected error handling it (a bug; logged).
    internal_error: int = 0
    # -- not yet settled --
    waiting: int = 0
    # -- not datagrams --
    #: Missing 20 ms frames concealed (PLC, or recovered from in-band FEC).
    concealed_frames: int = 0
    #: Invented audio (silence, concealment) or excess decoded audio cut to keep members within
    #: the wall clock, in milliseconds.
    trimmed_ms: int = 0
    #: Losses whose length was not whole 2.5 ms units (timestamps off Opus' grid): concealed to
    #: the grid, the rest filled with silence.
    repaired_gaps: int = 0
    #: Datagrams dropped by the voice client before the receiver saw them (inbox full).
    inbox_dropped: int = 0

    def drops(self) -> dict[str, int]:
        """Dropped datagrams by reason, only the reasons that happened."""
        return {name: getattr(self, name) for name in DROP_REASONS if getattr(self, name)}

    @property
    def dropped(self) -> int:
        return sum(getattr(self, name) for name in DROP_REASONS)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        """One line for ``/transcribe status``: decoded, drops by reason, trimmed audio."""
        parts = [f"{self.decoded:,} decoded"]
        drops = self.drops()
        if drops:
            reasons = ", ".join(f"{name.replace('_', ' ')} {n:,}" for name, n in drops.items())
            parts.append(f"{self.dropped:,} dropped ({reasons})")
        else:
            parts.append("none dropped")
        if self.inbox_dropped:
            parts.append(f"{self.inbox_dropped:,} lost to a full inbox")
        if self.concealed_frames:
            parts.append(f"{self.concealed_frames:,} lost frames concealed")
        if self.repaired_gaps:
            parts.append(f"{self.repaired_gaps:,} off-grid gaps repaired")
        if self.trimmed_ms:
            parts.append(f"{self.trimmed_ms / 1000:.1f} s of audio trimmed to real time")
        return "voice packets: " + "; ".join(parts)


#: The drop buckets of :class:`ReceiveCounters`, in field order.
DROP_REASONS: tuple[str, ...] = tuple(
    f.name for f in fields(ReceiveCounters)
    if f.name not in ("received", "decoded", "waiting", "concealed_frames", "trimmed_ms",
                      "repaired_gaps", "inbox_dropped")
)


@dataclass
class _SsrcState:
    ssrc: int
    user_id: int
    jitter: JitterBuffer
    decoder: OpusDecoder
    last_packet: float


@dataclass
class _MemberState:
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


class VoiceReceiver:
    """Routes one voice connection's packets to per-member PCM streams."""

    def __init__(
        self,
        *,
        sample_rate: int,
        on_audio: AudioCallback,
        on_idle: IdleCallback,
        is_ignored: Callable[[int], bool],
        dave: DaveReceiver | None = None,
        jitter_packets: int = 3,
        idle_timeout: float = 10.0,
        fill_after: float = 0.12,
        stall_fill_after: float = 1.0,
        max_ahead: float | None = None,
    ) -> None:
        #: libopus decodes straight to 8/12/16/24/48 kHz; other STT rates get 48 kHz here and
        #: the pipeline's resampler converts.
        self.output_rate = sample_rate if sample_rate in OPUS_SAMPLE_RATES else RTP_CLOCK_RATE
        self._on_audio = on_audio
        self._on_idle = on_idle
        self._is_ignored = is_ignored
        self.dave = dave
        self._jitter_packets = jitter_packets
        self._idle_timeout = idle_timeout
        self._fill_after = fill_after
        self._stall_fill_after = stall_fill_after
        #: The jitter window: how far ahead of the wall clock a member's audio may run (the
        #: reorder window plus how long a stalled stream is waited for before silence is filled).
        self.max_ahead = (stall_fill_after + jitter_packets * FRAME_SAMPLES_48K / RTP_CLOCK_RATE
                          if max_ahead is None else max_ahead)
        self._cipher: TransportCipher | None = None
        self._cipher_id: tuple[str, bytes] | None = None
        self.speakers = SpeakerMap()
        #: Datagrams (with their arrival time) of SSRCs whose member op 5 has not named yet.
        self._pending: PendingPackets[tuple[bytes, float]] = PendingPackets()
        self._ssrcs: dict[int, _SsrcState] = {}
        self._members: dict[int, _MemberState] = {}
        self._c = ReceiveCounters()
        #: Jitter counters of streams already closed (live streams are summed on demand).
        self._closed_jitter = JitterStats()
        #: Datagrams held for op 5 and dropped with a replaced PendingPackets (reconnects).
        self._unknown_before = 0
        #: Frames decoded per member (user id), for the whole connection.
        self.decoded_by_member: Counter[int] = Counter()
        self.last_packet_at: float | None = None
        self._error_logged_at: float | None = None
        self._plc_out = self._out_samples(PLC_UNIT_48K)

    # -- counters -------------------------------------------------------------------------------

    def counters(self) -> ReceiveCounters:
        """A snapshot of where every datagram went (see :class:`ReceiveCounters`)."""
        c = ReceiveCounters(**asdict(self._c))
        jitter = [s.jitter for s in self._ssrcs.values()]
        stats = [self._closed_jitter, *(j.stats for j in jitter)]
        c.duplicate = sum(st.duplicates for st in stats)
        c.late = sum(st.late for st in stats)
        c.stray = sum(st.stray for st in stats)
        c.unknown_ssrc = self._unknown_before + self._pending.dropped
        c.waiting = len(self._pending) + sum(j.waiting for j in jitter)
        return c

    @property
    def stats(self) -> Counter[str]:
        """The non-zero counters by name (for logs; :meth:`counters` is the typed value)."""
        return Counter({k: v for k, v in asdict(self.counters()).items() if v})

    # -- connection events ---------------------------------------------------------------------

    def set_transport(self, mode: str, secret_key: bytes) -> None:
        """A (new) SESSION_DESCRIPTION: packets from now on use this mode and key."""
        if self._cipher_id == (mode, secret_key):
            return
        self._cipher = TransportCipher(mode, secret_key)
        self._cipher_id = (mode, secret_key)
        log.info("voice transport: %s", mode)

    def reset_connection(self) -> None:
        """A new voice session (reconnect, move): SSRCs are reassigned, members keep streams."""
        for ssrc in list(self._ssrcs):
            self._drop_ssrc(ssrc)
        self.speakers = SpeakerMap()
        self._unknown_before += self._pending.dropped + len(self._pending)
        self._pending = PendingPackets()
        self._cipher = None
        self._cipher_id = None

    def on_speaking(self, user_id: int, ssrc: int, now: float) -> None:
        previous = self.speakers.on_speaking(user_id, ssrc)
        if previous is not None:  # Discord gave this SSRC to someone else: a new stream
            self._drop_ssrc(ssrc)
        for data, arrived in self._pending.release(ssrc):
            self._route_safely(data, arrived)

    def on_client_disconnect(self, user_id: int) -> None:
        for ssrc in list(self.speakers.ssrcs_for(user_id)):
            self._drop_ssrc(ssrc)
        self.speakers.on_client_disconnect(user_id)

    def forget_member(self, user_id: int) -> None:
        """Drop a member's state now (e.g. they opted out mid-meeting)."""
        for ssrc in list(self.speakers.ssrcs_for(user_id)):
            self._drop_ssrc(ssrc)
        self._members.pop(user_id, None)

    # -- data path ------------------------------------------------------------------------------

    def handle_packet(self, data: bytes, now: float) -> None:
        """One UDP datagram from the voice socket. Never raises."""
        self._c.received += 1
        self.last_packet_at = now
        if is_rtcp(data):
            self._c.rtcp += 1
            return
        self._route_safely(data, now)

    def _route_safely(self, data: bytes, now: float) -> None:
        try:
            self._route(data, now)
        except Exception:  # a bug, not the packet's fault: count it, log it now and then
            self._c.internal_error += 1
            wall = time.monotonic()
            if self._error_logged_at is None or wall - self._error_logged_at > ERROR_LOG_INTERVAL:
                self._error_logged_at = wall
                log.exception("voice receive: unexpected error on a packet (%d so far)",
                              self._c.internal_error)

    def _route(self, data: bytes, now: float) -> None:
        c = self._c
        try:
            packet = parse_rtp(data)
        except MalformedPacket:
            c.malformed += 1
            return
        if packet.payload_type != OPUS_PAYLOAD_TYPE:
            c.other_payload_type += 1
            return
        user_id = self.speakers.user_for(packet.ssrc)
        if user_id is None:
            # SPEAKING (op 5) often arrives after the first packets: wait briefly, bounded.
            self._pending.add(packet.ssrc, (data, now), now)
            return
        if self._is_ignored(user_id):
            c.ignored += 1
            return
        cipher = self._cipher
        if cipher is None:
            c.no_key += 1
            return
        try:
            frame = cipher.decrypt(packet)
        except DecryptError:
            c.bad_tag += 1
            return
        except MalformedPacket:  # bad padding count or extension length inside the AEAD
            c.bad_payload += 1
            return
        if self.dave is not None:
            decrypted = self.dave.decrypt(user_id, frame)
            if decrypted is None:
                c.dave_failed += 1
                return
            frame = decrypted
        state = self._ssrcs.get(packet.ssrc)
        if state is None or state.user_id != user_id:
            if state is not None:
                self._drop_ssrc(packet.ssrc)
            state = self._new_ssrc(packet.ssrc, user_id, now)
        state.last_packet = now
        member = self._member(user_id, now)
        member.last_packet = now
        self._emit_all(state, member, state.jitter.push(packet.sequence, packet.timestamp, frame),
                       now)

    def _new_ssrc(self, ssrc: int, user_id: int, now: float) -> _SsrcState:
        state = _SsrcState(
            ssrc=ssrc,
            user_id=user_id,
            jitter=JitterBuffer(window_packets=self._jitter_packets,
                                samples_per_frame=FRAME_SAMPLES_48K, clock_rate=RTP_CLOCK_RATE),
            decoder=OpusDecoder(self.output_rate, 1),
            last_packet=now,
        )
        self._ssrcs[ssrc] = state
        self._member(user_id, now).ssrcs.add(ssrc)
        log.debug("ssrc %d -> user %d", ssrc, user_id)
        return state

    def _member(self, user_id: int, now: float) -> _MemberState:
        member = self._members.get(user_id)
        if member is None:
            member = _MemberState(user_id=user_id, emitted_until=now, started=now,
                                  last_packet=now)
            self._members[user_id] = member
        return member

    def _out_samples(self, samples_48k: int) -> int:
        return samples_48k * self.output_rate // RTP_CLOCK_RATE

    def _room(self, member: _MemberState, now: float) -> int:
        """Output samples the member may still emit at ``now`` without running ahead."""
        wall = max(0.0, now - member.started) + self.max_ahead
        return int(wall * self.output_rate) - member.emitted

    def _trim(self, samples: int) -> None:
        self._c.trimmed_ms += samples * 1000 // self.output_rate

    def _emit_all(self, state: _SsrcState, member: _MemberState,
                  outs: list[JitterOutput], now: float) -> None:
        # Invented audio (silence, concealment) leaves room for the real frames released after
        # it, so what the wall-clock bound cuts is what was made up, not what was said.
        frames_after = sum(isinstance(out, Frame) for out in outs)
        frame_out = self._out_samples(FRAME_SAMPLES_48K)
        for out in outs:
            if isinstance(out, Frame):
                frames_after -= 1
                self._emit(state, member, out, now, 0)
            else:
                self._emit(state, member, out, now, frames_after * frame_out)

    def _emit(self, state: _SsrcState, member: _MemberState,
              out: JitterOutput, now: float, reserve: int) -> None:
        room = self._room(member, now) - reserve
        if isinstance(out, Frame):
            if room < self._out_samples(FRAME_SAMPLES_48K):
                self._c.too_fast += 1
                return
            member.paused = out.payload == OPUS_SILENCE_FRAME
            try:
                pcm = state.decoder.decode(out.payload)
            except (OpusError, ValueError):  # ValueError: an empty payload (no Opus packet)
                self._c.undecodable += 1
                pcm = state.decoder.conceal(self._out_samples(FRAME_SAMPLES_48K))
            else:
                self._c.decoded += 1
                self.decoded_by_member[member.user_id] += 1
            if len(pcm) > room:  # e.g. a 120 ms packet where 20 ms were due
                self._trim(len(pcm) - room)
                pcm = pcm[:room]
            member.silence_filled = 0
        elif isinstance(out, Lost):
            self._c.concealed_frames += max(1, round(out.samples / FRAME_SAMPLES_48K))
            pcm = self._conceal(state, out, room)
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
            self._on_audio(member.user_id, pcm)

    def _conceal(self, state: _SsrcState, out: Lost, room: int) -> np.ndarray:
        """PCM for a gap of lost packets, at most ``room`` samples: PLC for the older part,
        in-band FEC for the last frame, and zeros for any part that is not whole 2.5 ms units
        (a timestamp gap that no 20 ms packet grid explains)."""
        decoder = state.decoder
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

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Release stalled jitter buffers, fill silence in real time, end idle members."""
        self._pending.expire(now)
        for state in list(self._ssrcs.values()):
            if now - state.last_packet > self._fill_after:
                member = self._members.get(state.user_id)
                outs = state.jitter.drain()
                if member is not None:
                    self._emit_all(state, member, outs, now)
                else:
                    self._c.closed += sum(isinstance(out, Frame) for out in outs)
        for member in list(self._members.values()):
            silent_for = now - member.last_packet
            if silent_for >= self._idle_timeout:
                del self._members[member.user_id]
                for ssrc in list(member.ssrcs):
                    self._drop_ssrc(ssrc)
                self._on_idle(member.user_id)
                continue
            # After Discord's end-of-spurt silence frames the pause is real: fill at once so the
            # STT hears it. Packets that merely stopped (network stall, lost end frames) may
            # resume mid-word, so wait much longer before inventing silence.
            threshold = self._fill_after if member.paused else self._stall_fill_after
            if silent_for > threshold and now > member.emitted_until:
                n = int(round((now - member.emitted_until) * self.output_rate))
                n = min(n, self._room(member, now))
                if n > 0:
                    member.emitted_until = now
                    member.silence_filled += n
                    member.emitted += n
                    self._on_audio(member.user_id, np.zeros(n, dtype=np.int16))

    def _drop_ssrc(self, ssrc: int) -> None:
        state = self._ssrcs.pop(ssrc, None)
        if state is not None:
            self._c.closed += state.jitter.waiting
            done = state.jitter.stats
            self._closed_jitter.duplicates += done.duplicates
            self._closed_jitter.late += done.late
            self._closed_jitter.stray += done.stray
            member = self._members.get(state.user_id)
            if member is not None:
                member.ssrcs.discard(ssrc)

    def active_members(self) -> list[int]:
        return list(self._members)

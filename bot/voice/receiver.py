"""Voice receive core: raw UDP datagrams in, per-member mono PCM out.

    datagram -> RTCP? skip -> parse RTP -> SSRC -> member (or wait briefly in a bounded buffer)
             -> opted out / bot? drop (before any decryption) -> transport AEAD decrypt
             -> DAVE decrypt (per member) -> jitter buffer (reorder, loss, talk-spurt gaps)
             -> Opus decode straight to mono at the STT rate (FEC/PLC on loss) -> on_audio

No sockets and no timers: the discord.py adapter (``bot.voice.client``) hands datagrams in with
:meth:`VoiceReceiver.handle_packet` and calls :meth:`VoiceReceiver.tick` a few times a second,
both on the event loop, with the time injected. Nothing here raises for bad input: every bad
packet is counted in :attr:`VoiceReceiver.stats` and dropped.

Discord stops sending packets while a member is silent (after five silence frames), but the STT
service only commits a sentence once it *hears* silence; so while a member who was talking sends
nothing, :meth:`tick` emits silence in real time, and the talk-spurt gap reported later by the
jitter buffer is shortened by what was already filled, keeping each member's timeline continuous
and of the right length. After ``idle_timeout`` without packets the member's stream ends
(``on_idle``) and a new one starts with their next packet.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bot.voice.crypto import DecryptError, TransportCipher
from bot.voice.dave import DaveReceiver
from bot.voice.jitter import Frame, JitterBuffer, Lost, Silence
from bot.voice.opus import OPUS_SAMPLE_RATES, OPUS_SILENCE_FRAME, OpusDecoder, OpusError
from bot.voice.rtp import MalformedPacket, is_rtcp, parse_rtp
from bot.voice.speakers import PendingPackets, SpeakerMap

log = logging.getLogger(__name__)

#: Discord's RTP clock and frame: 48 kHz, 20 ms (960 samples) per Opus packet.
RTP_CLOCK_RATE = 48000
FRAME_SAMPLES_48K = 960
#: Discord's audio payload type (0x78 = 120).
OPUS_PAYLOAD_TYPE = 0x78

AudioCallback = Callable[[int, np.ndarray], None]
IdleCallback = Callable[[int], None]


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
        self._cipher: TransportCipher | None = None
        self._cipher_id: tuple[str, bytes] | None = None
        self.speakers = SpeakerMap()
        self._pending: PendingPackets[bytes] = PendingPackets()
        self._ssrcs: dict[int, _SsrcState] = {}
        self._members: dict[int, _MemberState] = {}
        self.stats: Counter[str] = Counter()
        self.last_packet_at: float | None = None

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
        self._pending = PendingPackets()
        self._cipher = None
        self._cipher_id = None

    def on_speaking(self, user_id: int, ssrc: int, now: float) -> None:
        self.speakers.on_speaking(user_id, ssrc)
        for data in self._pending.release(ssrc):
            self._route(data, now)

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
        """One UDP datagram from the voice socket."""
        self.stats["received"] += 1
        self.last_packet_at = now
        if is_rtcp(data):
            self.stats["rtcp"] += 1
            return
        self._route(data, now)

    def _route(self, data: bytes, now: float) -> None:
        try:
            packet = parse_rtp(data)
        except MalformedPacket:
            self.stats["malformed"] += 1
            return
        if packet.payload_type != OPUS_PAYLOAD_TYPE:
            self.stats["other_payload_type"] += 1
            return
        user_id = self.speakers.user_for(packet.ssrc)
        if user_id is None:
            # SPEAKING (op 5) often arrives after the first packets: wait briefly, bounded.
            self.stats["pending"] += 1
            self._pending.add(packet.ssrc, data, now)
            return
        if self._is_ignored(user_id):
            self.stats["ignored"] += 1
            return
        cipher = self._cipher
        if cipher is None:
            self.stats["no_key"] += 1
            return
        try:
            frame = cipher.decrypt(packet)
        except DecryptError:
            self.stats["bad_tag"] += 1
            return
        if self.dave is not None:
            decrypted = self.dave.decrypt(user_id, frame)
            if decrypted is None:
                self.stats["dave_failed"] += 1
                return
            frame = decrypted
        state = self._ssrcs.get(packet.ssrc)
        if state is None:
            state = self._new_ssrc(packet.ssrc, user_id, now)
        state.last_packet = now
        member = self._member(user_id, now)
        member.last_packet = now
        for out in state.jitter.push(packet.sequence, packet.timestamp, frame):
            self._emit(state, member, out, now)

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
            member = _MemberState(user_id=user_id, emitted_until=now, last_packet=now)
            self._members[user_id] = member
        return member

    def _out_samples(self, samples_48k: int) -> int:
        return samples_48k * self.output_rate // RTP_CLOCK_RATE

    def _emit(self, state: _SsrcState, member: _MemberState,
              out: Frame | Lost | Silence, now: float) -> None:
        if isinstance(out, Frame):
            member.paused = out.payload == OPUS_SILENCE_FRAME
            try:
                pcm = state.decoder.decode(out.payload)
            except (OpusError, ValueError):  # ValueError: an empty payload (no Opus packet)
                self.stats["opus_errors"] += 1
                pcm = state.decoder.conceal(self._out_samples(FRAME_SAMPLES_48K))
            member.silence_filled = 0
        elif isinstance(out, Lost):
            self.stats["lost"] += out.samples // FRAME_SAMPLES_48K
            n = self._out_samples(out.samples)
            parts = []
            if out.fec_payload is not None and out.samples > FRAME_SAMPLES_48K:
                parts.append(state.decoder.conceal(n - self._out_samples(FRAME_SAMPLES_48K)))
                n = self._out_samples(FRAME_SAMPLES_48K)
            if out.fec_payload is not None:
                try:
                    parts.append(state.decoder.decode_fec(out.fec_payload, n))
                except OpusError:
                    parts.append(state.decoder.conceal(n))
            else:
                parts.append(state.decoder.conceal(n))
            pcm = np.concatenate(parts) if len(parts) > 1 else parts[0]
            member.silence_filled = 0
        else:
            # A talk-spurt gap: only the part not already filled in real time.
            n = self._out_samples(out.samples) - member.silence_filled
            member.silence_filled = 0
            if n <= 0:
                return
            pcm = np.zeros(n, dtype=np.int16)
        member.emitted_until = now
        if len(pcm):
            self._on_audio(member.user_id, pcm)

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Release stalled jitter buffers, fill silence in real time, end idle members."""
        self.stats["pending_expired"] += self._pending.expire(now)
        for state in list(self._ssrcs.values()):
            if now - state.last_packet > self._fill_after:
                member = self._members.get(state.user_id)
                for out in state.jitter.drain():
                    if member is not None:
                        self._emit(state, member, out, now)
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
                if n > 0:
                    member.emitted_until = now
                    member.silence_filled += n
                    self._on_audio(member.user_id, np.zeros(n, dtype=np.int16))

    def _drop_ssrc(self, ssrc: int) -> None:
        state = self._ssrcs.pop(ssrc, None)
        if state is not None:
            member = self._members.get(state.user_id)
            if member is not None:
                member.ssrcs.discard(ssrc)

    def active_members(self) -> list[int]:
        return list(self._members)

"""Voice receive core: raw UDP datagrams in, per-member mono PCM out.

    datagram -> RTCP? skip -> parse RTP -> SSRC -> member (or wait briefly in a bounded buffer)
             -> opted out / bot? drop (before any decryption) -> transport AEAD decrypt
             -> DAVE decrypt (per member) -> jitter buffer (reorder, loss, talk-spurt gaps)
             -> Opus decode straight to mono at the STT rate (FEC/PLC on loss) -> on_audio

The decoding half (jitter outputs -> each member's PCM, bounded by the wall clock) is
:mod:`bot.voice.timeline`; the time half (silence fill, stalled streams, idle ends) is
:mod:`bot.voice.members`; the counters are :mod:`bot.voice.counters`. No sockets and no
timers: the discord.py adapter (``bot.voice.client``) hands datagrams in with
:meth:`VoiceReceiver.handle_packet` and calls :meth:`VoiceReceiver.tick` a few times a second,
both on the event loop, with the time injected; :meth:`VoiceReceiver.drain` ends it all. No
packet, whatever its bytes, raises out of here: each datagram ends in exactly one bucket of
:class:`ReceiveCounters` (decoded, or dropped by reason), or is still waiting (for its op 5,
or in a jitter buffer); see :meth:`VoiceReceiver.counters`.

The common datagram (version 2, Opus, no padding, no CSRCs, from a member already named) is
read with one ``struct`` unpack instead of an ``RtpPacket``, and the frame due next (in order,
nothing buffered, no gap) is decoded at once without jitter-buffer outputs
(:meth:`~bot.voice.jitter.JitterBuffer.push_in_order`); everything else takes the general
path. The two give byte-identical audio and counters (``fast_path=False`` turns the shortcut
off; tests/test_receive_paths.py compares them). With ``batch_ms`` (the meeting sets the STT
chunk length) each member's audio is decoded into one buffer and handed on in whole chunks.

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
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict

import numpy as np

from bot.voice.buglog import ThrottledTraceback
from bot.voice.counters import DROP_REASONS, ReceiveCounters
from bot.voice.crypto import DecryptError, TransportCipher
from bot.voice.dave import DaveReceiver
from bot.voice.members import MemberClock
from bot.voice.opus import decode_rate
from bot.voice.rtp import (
    DISCORD_OPUS_PAYLOAD_TYPE,
    MalformedPacket,
    common_opus_header,
    is_rtcp,
    parse_rtp,
)
from bot.voice.speakers import PendingPackets, SpeakerMap
from bot.voice.ssrcs import SsrcState, SsrcStreams
from bot.voice.timeline import FRAME_SAMPLES_48K, PLC_UNIT_48K, RTP_CLOCK_RATE, Emitter

#: Re-exported: callers know them from here.
__all__ = ["DROP_REASONS", "FRAME_SAMPLES_48K", "PLC_UNIT_48K", "RTP_CLOCK_RATE",
           "ReceiveCounters", "VoiceReceiver"]

log = logging.getLogger(__name__)

#: At most one log line per this many seconds for an unexpected error (a bug) per packet.
ERROR_LOG_INTERVAL = 30.0

AudioCallback = Callable[[int, np.ndarray], None]
IdleCallback = Callable[[int], None]


def _decrypt(cipher: TransportCipher | None, dave: DaveReceiver | None, user_id: int,
             data: bytes, header_size: int, extension_words: int, padding: bool,
             c: ReceiveCounters) -> bytes | None:
    """The datagram's Opus frame: transport AEAD, then DAVE (per member); None when either
    fails, counted by reason."""
    if cipher is None:
        c.no_key += 1
        return None
    try:
        frame = cipher.decrypt_datagram(data, header_size, extension_words, padding)
    except DecryptError:
        c.bad_tag += 1
        return None
    except MalformedPacket:  # bad padding count or extension length inside the AEAD
        c.bad_payload += 1
        return None
    if dave is not None:
        decrypted = dave.decrypt(user_id, frame)
        if decrypted is None:
            c.dave_failed += 1
        return decrypted
    return frame


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
        fast_path: bool = True,
        batch_ms: int = 0,
    ) -> None:
        #: libopus decodes straight to 8/12/16/24/48 kHz; other STT rates get 48 kHz here and
        #: the pipeline's resampler converts.
        self.output_rate = decode_rate(sample_rate)
        self._is_ignored = is_ignored
        self.dave = dave
        #: False: every packet takes the general path (parse_rtp, jitter outputs); the tests
        #: run both and compare (same PCM, same counters).
        self._fast_path = fast_path
        #: The jitter window: how far ahead of the wall clock a member's audio may run (the
        #: reorder window plus how long a stalled stream is waited for before silence is filled).
        self.max_ahead = (stall_fill_after + jitter_packets * FRAME_SAMPLES_48K / RTP_CLOCK_RATE
                          if max_ahead is None else max_ahead)
        self._cipher: TransportCipher | None = None
        self._cipher_id: tuple[str, bytes] | None = None
        self.speakers = SpeakerMap()
        #: Datagrams (with their arrival time) of SSRCs whose member op 5 has not named yet.
        self._pending: PendingPackets[tuple[bytes, float]] = PendingPackets()
        self._c = ReceiveCounters()
        self._streams = SsrcStreams(output_rate=self.output_rate, jitter_packets=jitter_packets,
                                    counters=self._c)
        #: The live streams by SSRC (the same dict: looked up for every packet).
        self._ssrcs = self._streams.by_ssrc
        #: batch_ms > 0 (the STT chunk length): ``on_audio`` gets each member's audio in whole
        #: multiples of it (the rest when the member's stream ends), decoded straight into one
        #: buffer per member instead of an array per packet; a member who opts out loses what
        #: was batched, unsent. 0: every frame and gap as it is made.
        self._emitter = Emitter(output_rate=self.output_rate, max_ahead=self.max_ahead,
                                counters=self._c, on_audio=on_audio,
                                batch_samples=self.output_rate * batch_ms // 1000)
        #: Frames decoded per member (user id), for the whole connection.
        self.decoded_by_member: Counter[int] = self._emitter.decoded_by_member
        self._clock = MemberClock(emitter=self._emitter, streams=self._streams, counters=self._c,
                                  on_idle=on_idle, idle_timeout=idle_timeout,
                                  fill_after=fill_after, stall_fill_after=stall_fill_after)
        #: The members' timelines by user id (the clock's dict: looked up for every packet).
        self._members = self._clock.by_user
        self.last_packet_at: float | None = None
        self._log_bug = ThrottledTraceback(
            log, "voice receive: unexpected error on a packet (%d so far)", ERROR_LOG_INTERVAL)

    # -- counters -------------------------------------------------------------------------------

    def counters(self) -> ReceiveCounters:
        """A snapshot of where every datagram went (see :class:`ReceiveCounters`)."""
        c = ReceiveCounters(**asdict(self._c))
        c.unknown_ssrc = self._pending.dropped
        c.waiting = len(self._pending)
        self._streams.count_into(c)
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
            self._clock.drop_ssrc(ssrc)
        self.speakers = SpeakerMap()
        self._pending.discard_all()
        self._cipher = None
        self._cipher_id = None

    def on_speaking(self, user_id: int, ssrc: int, now: float) -> None:
        previous = self.speakers.on_speaking(user_id, ssrc)
        if previous is not None:  # Discord gave this SSRC to someone else: a new stream
            self._clock.drop_ssrc(ssrc)
        for data, arrived in self._pending.release(ssrc):
            self._route_safely(data, arrived)

    def on_client_disconnect(self, user_id: int) -> None:
        for ssrc in list(self.speakers.ssrcs_for(user_id)):
            self._clock.drop_ssrc(ssrc)
        self.speakers.on_client_disconnect(user_id)

    def forget_member(self, user_id: int) -> None:
        """Drop a member's state now (e.g. they opted out mid-meeting); audio still batched for
        them is discarded, never handed on."""
        self._clock.forget(user_id, self.speakers.ssrcs_for(user_id))

    # -- data path ------------------------------------------------------------------------------

    def handle_packet(self, data: bytes, now: float) -> None:
        """One UDP datagram from the voice socket. Never raises."""
        c = self._c
        c.received += 1
        self.last_packet_at = now
        try:
            if self._fast_path and self._route_fast(data, now):
                return
            if is_rtcp(data):
                c.rtcp += 1
                return
            self._route(data, now)
        except Exception:  # a bug, not the packet's fault: count it, log it now and then
            self._internal_error()

    def _route_safely(self, data: bytes, now: float) -> None:
        try:
            self._route(data, now)
        except Exception:
            self._internal_error()

    def _internal_error(self) -> None:
        self._c.internal_error += 1
        self._log_bug(self._c.internal_error)

    def _route_fast(self, data: bytes, now: float) -> bool:
        """The common datagram without an :class:`RtpPacket`: version 2, Opus, no padding, no
        CSRCs, no marker, at most the extension header, from a member op 5 already named.
        False (nothing done, nothing counted) for anything else: :meth:`_route` takes it."""
        header = common_opus_header(data)
        if header is None:
            return False
        sequence, timestamp, ssrc, header_size, words = header
        user_id = self.speakers.user_for(ssrc)
        if user_id is None:
            return False  # held for its op 5 by the general path
        if self._is_ignored(user_id):
            self._c.ignored += 1
            return True
        frame = _decrypt(self._cipher, self.dave, user_id, data, header_size, words, False,
                         self._c)
        if frame is not None:
            self._deliver(ssrc, user_id, sequence, timestamp, frame, now)
        return True

    def _route(self, data: bytes, now: float) -> None:
        c = self._c
        if type(data) is not bytes:  # bytearray/memoryview: one copy so slices are bytes
            data = bytes(data)
        try:
            packet = parse_rtp(data)
        except MalformedPacket:
            c.malformed += 1
            return
        if packet.payload_type != DISCORD_OPUS_PAYLOAD_TYPE:
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
        frame = _decrypt(self._cipher, self.dave, user_id, data, len(packet.header),
                         packet.extension_words, packet.padding, c)
        if frame is not None:
            self._deliver(packet.ssrc, user_id, packet.sequence, packet.timestamp, frame, now)

    def _deliver(self, ssrc: int, user_id: int, sequence: int, timestamp: int, frame: bytes,
                 now: float) -> None:
        """A decrypted frame into its SSRC's jitter buffer and on to the member's timeline."""
        state = self._ssrcs.get(ssrc)
        if state is None or state.user_id != user_id:
            if state is not None:
                self._clock.drop_ssrc(ssrc)
            state = self._new_ssrc(ssrc, user_id, now)
        state.last_packet = now
        member = self._members.get(user_id)
        if member is None:
            member = self._clock.member(user_id, now)
        member.last_packet = now
        if self._fast_path and state.jitter.push_in_order(sequence, timestamp):
            # Exactly the frame due next: decoded at once, no jitter outputs made.
            self._emitter.emit_frame(state.decoder, member, frame, now)
            return
        outs = state.jitter.push(sequence, timestamp, frame)
        self._emitter.emit_all(state.decoder, member, outs, now)

    def _new_ssrc(self, ssrc: int, user_id: int, now: float) -> SsrcState:
        state = self._clock.open_ssrc(ssrc, user_id, now)
        log.debug("ssrc %d -> user %d", ssrc, user_id)
        return state

    # -- time ------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Expire datagrams that waited too long for their op 5; release stalled jitter buffers,
        fill silence in real time, end idle members (:class:`~bot.voice.members.MemberClock`)."""
        self._pending.expire(now)
        self._clock.tick(now)

    def drain(self, now: float) -> None:
        """No more packets will come (the meeting stops): hand on what every jitter buffer
        holds, then end every member (``on_idle`` for each). Datagrams still held for an op 5
        that never came can never be routed: dropped, counted as ``unknown_ssrc``."""
        self._pending.discard_all()
        self._clock.drain(now)

    def active_members(self) -> list[int]:
        return list(self._members)

"""The receiver's fast path is an optimisation, never a behaviour: spec of its equivalence.

:class:`~bot.voice.receiver.VoiceReceiver` takes the common datagram (version 2, Opus, no
padding, no CSRCs, SSRC already named) without building an ``RtpPacket``, and a frame that is
exactly the one due next without jitter-buffer outputs. Here two receivers, one with the fast
path and one without (``fast_path=False``: every packet through ``parse_rtp`` and
``JitterBuffer.push``), are fed the same datagrams at the same times, made as Discord makes
them (real libopus, RTP with the audio-level extension, real AES-GCM / XChaCha20-Poly1305), and
must hand on byte-identical PCM per member and identical counters, for in-order streams,
reordered / lost / duplicated ones, talk-spurt pauses, and padded or CSRC-carrying packets.
Spies count the real calls, so a test also proves the fast path was taken (or not).
"""

from __future__ import annotations

import os
import random
import struct
from collections import defaultdict
from collections.abc import Iterator

import numpy as np
import pytest

import bot.voice.receiver as receiver_mod
from bot.sim.sender import OpusEncoder, audio_level_extension, build_rtp_header
from bot.voice.crypto import MODE_AES256_GCM, MODE_XCHACHA20, TransportCipher
from bot.voice.jitter import JitterBuffer, JitterOutput
from bot.voice.opus import OPUS_SILENCE_FRAME
from bot.voice.receiver import FRAME_SAMPLES_48K, VoiceReceiver
from bot.voice.rtp import RtpPacket, parse_rtp

MODES = (MODE_AES256_GCM, MODE_XCHACHA20)
RATE = 16000
#: VoiceReceiver's default jitter window (packets).
WINDOW = 3
#: The STT chunk: with batching, on_audio gets whole multiples of it.
BATCH_MS = 100


def speech(seconds: float, freq: float) -> np.ndarray:
    """48 kHz stereo int16: a tone with a syllable-rate envelope (Opus works on it)."""
    t = np.arange(int(seconds * 48000)) / 48000
    mono = (0.4 * 32767 * np.sin(2 * np.pi * freq * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)))
    m = mono.astype(np.int16)
    return np.stack([m, m], axis=1)


class Sender:
    """One Discord client: SSRC, sequence, RTP clock and nonce counter; real Opus and AEAD."""

    def __init__(self, ssrc: int, cipher: TransportCipher, seed: int) -> None:
        rng = random.Random(seed)
        self.ssrc = ssrc
        self.cipher = cipher
        self.encoder = OpusEncoder(48000, 2)
        self.seq = rng.randrange(65536)
        self.ts = rng.randrange(2**32)
        self.nonce = 0

    def packet(self, payload: bytes, *, csrcs: tuple[int, ...] = (), pad: int = 0) -> bytes:
        """The next datagram; ``pad`` > 0 sets the RTP padding bit and appends that many bytes
        (the last one the count), inside the encryption as ``_rtpsize`` modes carry them."""
        header, ext = build_rtp_header(self.seq, self.ts, self.ssrc, csrcs=csrcs,
                                       extension=audio_level_extension(30))
        plaintext = payload
        if pad:
            header = bytes([header[0] | 0x20]) + header[1:]
            plaintext = payload + bytes(pad - 1) + bytes([pad])
        data = self.cipher.encrypt(header, ext, plaintext, self.nonce)
        self.seq = (self.seq + 1) % 65536
        self.ts = (self.ts + FRAME_SAMPLES_48K) % 2**32
        self.nonce += 1
        return data

    def frames(self, pcm: np.ndarray) -> Iterator[bytes]:
        for i in range(0, len(pcm) - 959, 960):
            yield self.encoder.encode(pcm[i:i + 960])

    def talk(self, seconds: float, freq: float) -> list[bytes]:
        return [self.packet(f) for f in self.frames(speech(seconds, freq))]

    def pause(self, seconds: float) -> list[bytes]:
        """Discord's five silence frames, then nothing while the RTP clock runs on."""
        out = [self.packet(OPUS_SILENCE_FRAME) for _ in range(5)]
        self.ts = (self.ts + int(seconds * 48000)) % 2**32
        return out


class Calls:
    """Counts real calls of the general path's pieces (the wrapped functions still run)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.parse = 0
        self.push = 0
        self.in_order = 0
        real_parse = parse_rtp
        real_push = JitterBuffer.push
        real_in_order = JitterBuffer.push_in_order

        def parse(data: bytes) -> RtpPacket:
            self.parse += 1
            return real_parse(data)

        def push(jb: JitterBuffer, sequence: int, timestamp: int,
                 payload: bytes) -> list[JitterOutput]:
            self.push += 1
            return real_push(jb, sequence, timestamp, payload)

        def in_order(jb: JitterBuffer, sequence: int, timestamp: int) -> bool:
            taken = real_in_order(jb, sequence, timestamp)
            self.in_order += taken
            return taken

        monkeypatch.setattr(receiver_mod, "parse_rtp", parse)
        monkeypatch.setattr(JitterBuffer, "push", push)
        monkeypatch.setattr(JitterBuffer, "push_in_order", in_order)

    def reset(self) -> None:
        self.parse = self.push = self.in_order = 0


def run(datagrams: list[tuple[float, bytes]], mode: str, key: bytes, speakers: dict[int, int],
        *, fast_path: bool, calls: Calls, batch_ms: int = 0,
        pieces: list[tuple[int, int]] | None = None,
        ) -> tuple[dict[int, bytes], dict[str, int], list[int], tuple[int, int, int]]:
    """PCM per member, counters, idle order and (parse, push, in-order) calls of one receiver
    fed ``(arrival, datagram)`` in order, ticked every 20 ms as the voice client does, drained.
    ``pieces`` collects (user, samples) of every ``on_audio`` call and (user, -1) for on_idle."""
    audio: dict[int, list[bytes]] = defaultdict(list)
    idle: list[int] = []
    log = pieces if pieces is not None else []

    def on_audio(user: int, pcm: np.ndarray) -> None:
        audio[user].append(pcm.tobytes())
        log.append((user, len(pcm)))

    def on_idle(user: int) -> None:
        idle.append(user)
        log.append((user, -1))

    receiver = VoiceReceiver(sample_rate=RATE, on_audio=on_audio, on_idle=on_idle,
                             is_ignored=lambda u: u == 3, fast_path=fast_path, batch_ms=batch_ms)
    receiver.set_transport(mode, key)
    for user, ssrc in speakers.items():
        receiver.on_speaking(user, ssrc, 0.0)
    calls.reset()
    next_tick = 0.02
    for now, data in datagrams:
        while next_tick <= now:
            receiver.tick(next_tick)
            next_tick += 0.02
        receiver.handle_packet(data, now)
    end = datagrams[-1][0] + 0.5
    while next_tick <= end:
        receiver.tick(next_tick)
        next_tick += 0.02
    receiver.drain(end)
    c = receiver.counters()
    assert c.received == len(datagrams) and c.internal_error == 0
    assert c.received == c.decoded + c.dropped + c.waiting
    assert all(u in idle for u in audio)  # every stream ended (and was flushed)
    return ({u: b"".join(parts) for u, parts in audio.items()}, c.as_dict(), idle,
            (calls.parse, calls.push, calls.in_order))


def both(datagrams: list[tuple[float, bytes]], mode: str, key: bytes, speakers: dict[int, int],
         calls: Calls) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Runs both paths, asserts identical output; returns their (parse, push, in-order) calls."""
    general = run(datagrams, mode, key, speakers, fast_path=False, calls=calls)
    pieces: list[tuple[int, int]] = []
    batched = run(datagrams, mode, key, speakers, fast_path=True, calls=calls, batch_ms=BATCH_MS,
                  pieces=pieces)
    fast = run(datagrams, mode, key, speakers, fast_path=True, calls=calls)
    for other in (fast, batched):
        assert other[0].keys() == general[0].keys()
        for user in general[0]:
            assert other[0][user] == general[0][user], f"member {user}: PCM differs"
        assert other[1] == general[1]
        assert other[2] == general[2]
    # Batched: whole chunks only, but for the last piece before each stream's end (on_idle).
    batch = RATE * BATCH_MS // 1000
    for i, (user, samples) in enumerate(pieces):
        last = next((s < 0 for u, s in pieces[i + 1:] if u == user), True)
        assert samples == -1 or samples % batch == 0 or last
    # The general path parses every datagram but RTCP and never asks push_in_order.
    assert general[3][2] == 0 and general[3][0] + general[1]["rtcp"] == len(datagrams)
    assert sum(len(pcm) for pcm in general[0].values()) > 0
    return fast[3], general[3]


def timed(packets: list[bytes], start: float = 0.0, step: float = 0.02) -> list[tuple[float,
                                                                                      bytes]]:
    return [(start + i * step, p) for i, p in enumerate(packets)]


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    return Calls(monkeypatch)


@pytest.mark.parametrize("mode", MODES)
def test_an_in_order_stream_gives_identical_pcm_and_counters_without_parsing(
        mode: str, calls: Calls) -> None:
    key = os.urandom(32)
    cipher = TransportCipher(mode, key)
    alice, bob = Sender(111, cipher, 1), Sender(222, cipher, 2)
    a, b = alice.talk(1.0, 440), bob.talk(1.0, 700)
    packets = [p for pair in zip(a, b, strict=True) for p in pair]
    fast, _ = both(timed(packets, step=0.01), mode, key, {1: 111, 2: 222}, calls)
    parsed, pushed, in_order = fast
    # Nothing parsed; only each stream's first three packets (the jitter window, before the
    # stream's position is known) went through JitterBuffer.push.
    assert parsed == 0 and pushed == 2 * WINDOW and in_order == len(packets) - 2 * WINDOW


@pytest.mark.parametrize("mode", MODES)
def test_reorder_loss_duplicates_and_pauses_give_identical_pcm_and_counters(
        mode: str, calls: Calls) -> None:
    key = os.urandom(32)
    cipher = TransportCipher(mode, key)
    alice = Sender(111, cipher, 3)
    first = alice.talk(1.0, 440) + alice.pause(0.7)
    second = alice.talk(1.0, 330)
    # Arrival times follow the RTP clock: the pause is 0.7 s of wall time with no packets.
    packets = timed(first) + timed(second, start=len(first) * 0.02 + 0.7)
    rng = random.Random(11)
    stream = [p for i, p in enumerate(packets) if i < 3 or rng.random() > 0.07]  # loss
    for i in range(3, len(stream) - 3, 9):  # reorder within the jitter window
        (t1, p1), (t2, p2) = stream[i], stream[i + 2]
        stream[i], stream[i + 2] = (t1, p2), (t2, p1)
    for i in range(5, len(stream), 13):  # duplicates, some late
        j = i + rng.randrange(3)
        stream.insert(j, (stream[j - 1][0], stream[i][1]))
    fast, general = both(stream, mode, key, {1: 111}, calls)
    parsed, pushed, in_order = fast
    assert parsed == 0 and in_order > len(packets) // 2 and pushed > 0
    assert pushed + in_order == general[1]  # every datagram reached the jitter buffer once


def test_fast_then_reordered_then_fast_again_is_the_general_path_exactly(calls: Calls) -> None:
    # The jitter buffer's notion of the next sequence and timestamp stays right across
    # the switch: after a reordered patch, in-order packets take the fast path again.
    key = os.urandom(32)
    cipher = TransportCipher(MODE_AES256_GCM, key)
    alice = Sender(111, cipher, 4)
    packets = alice.talk(1.5, 500)
    mixed = packets[:20] + [packets[21], packets[20], packets[23], packets[22], packets[24],
                            packets[26], packets[25]] + packets[27:]
    fast, _ = both(timed(mixed), MODE_AES256_GCM, key, {1: 111}, calls)
    parsed, pushed, in_order = fast
    assert parsed == 0 and in_order >= len(packets) - 10 and 1 < pushed <= 10


@pytest.mark.parametrize("mode", MODES)
def test_padded_and_csrc_packets_give_identical_pcm_and_counters(
        mode: str, calls: Calls) -> None:
    key = os.urandom(32)
    cipher = TransportCipher(mode, key)
    alice = Sender(111, cipher, 5)
    packets = []
    for i, frame in enumerate(alice.frames(speech(1.0, 440))):
        kind = i % 4
        packets.append(alice.packet(frame, csrcs=(7, 8) if kind == 1 else (),
                                    pad=4 if kind == 2 else 0))
    fast, _ = both(timed(packets), mode, key, {1: 111}, calls)
    parsed, _pushed, in_order = fast
    # Half the packets (CSRCs, padding) are parsed in full; all in order skip jitter outputs.
    assert parsed == len(packets) // 2 and in_order == len(packets) - WINDOW


def test_ignored_unknown_and_hostile_datagrams_are_counted_the_same(calls: Calls) -> None:
    key = os.urandom(32)
    cipher = TransportCipher(MODE_AES256_GCM, key)
    alice, muted, stranger = Sender(111, cipher, 6), Sender(333, cipher, 7), Sender(999, cipher, 8)
    good = alice.talk(0.6, 440)
    tampered = bytearray(good[10])
    tampered[-6] ^= 0xFF
    wrong_key = Sender(111, TransportCipher(MODE_AES256_GCM, os.urandom(32)), 9).talk(0.04, 440)
    rtcp = bytes([0x80, 200]) + bytes(26)
    short = struct.pack(">BBHII", 0x90, 0x78, 1, 2, 111) + b"\xbe\xde\x00\x01"
    stream = (good[:10] + [bytes(tampered), rtcp, short, b"", b"\x90", *wrong_key]
              + muted.talk(0.1, 300) + stranger.talk(0.1, 300) + good[11:])
    fast, _ = both(timed(stream), MODE_AES256_GCM, key, {1: 111, 3: 333}, calls)
    assert fast[2] > 0


@pytest.mark.parametrize("wall_pause", [0.0, 0.7])
def test_a_talk_spurt_gap_after_in_order_packets_is_the_general_path_exactly(
        wall_pause: float, calls: Calls) -> None:
    # In sequence but with the RTP clock jumped (Discord's pause): the gap becomes silence,
    # whether the wall clock paused too (filled in real time by tick) or not (the jitter
    # buffer's Silence output).
    key = os.urandom(32)
    cipher = TransportCipher(MODE_XCHACHA20, key)
    alice = Sender(111, cipher, 12)
    first = alice.talk(0.5, 440) + alice.pause(0.7)
    second = alice.talk(0.5, 330)
    stream = timed(first) + timed(second, start=len(first) * 0.02 + wall_pause)
    fast, general = both(stream, MODE_XCHACHA20, key, {1: 111}, calls)
    assert fast[0] == 0 and fast[1] == WINDOW + 1  # the first packet after the gap: push()


def test_batched_audio_of_a_member_who_opts_out_is_discarded_unsent() -> None:
    key = os.urandom(32)
    cipher = TransportCipher(MODE_AES256_GCM, key)
    alice, bob = Sender(111, cipher, 13), Sender(222, cipher, 14)
    audio: dict[int, list[int]] = defaultdict(list)
    idle: list[int] = []
    receiver = VoiceReceiver(sample_rate=RATE, on_audio=lambda u, pcm: audio[u].append(len(pcm)),
                             on_idle=idle.append, is_ignored=lambda u: False, batch_ms=BATCH_MS)
    receiver.set_transport(MODE_AES256_GCM, key)
    receiver.on_speaking(1, 111, 0.0)
    receiver.on_speaking(2, 222, 0.0)
    a, b = alice.talk(0.36, 440), bob.talk(0.36, 300)  # 18 frames: 3 batches and 60 ms
    for i, (pa, pb) in enumerate(zip(a, b, strict=True)):
        receiver.handle_packet(pa, i * 0.02)
        receiver.handle_packet(pb, i * 0.02 + 0.01)
    batch = RATE * BATCH_MS // 1000
    decoded = len(a) * RATE // 50  # in order: every frame decoded as it comes
    assert decoded % batch and audio[1] == audio[2] == [batch] * (decoded // batch)
    receiver.forget_member(1)  # opted out: the 20..80 ms batched for alice go nowhere
    receiver.drain(1.0)
    assert audio[1] == [batch] * (decoded // batch) and 1 not in idle
    assert sum(audio[2]) == len(b) * RATE // 50 and idle == [2]  # bob's rest: flushed, then idle

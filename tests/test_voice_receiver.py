"""The voice receive core: encrypted RTP from several members in, one PCM timeline per member out.

Packets are made as Discord sends them: real libopus at 48 kHz stereo, RTP with the audio-level
header extension, transport AEAD with a random key (both modes). The receiver runs with an
injected clock; nothing here sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections import defaultdict

import numpy as np
import pytest

from bot.sim.sender import OpusEncoder, audio_level_extension, build_rtp_header
from bot.voice.client import VoiceListener, supervise
from bot.voice.crypto import TransportCipher
from bot.voice.dave import DaveReceiver
from bot.voice.inbox import INBOX_BATCH, INBOX_LIMIT
from bot.voice.opus import OPUS_SILENCE_FRAME, OpusDecoder
from bot.voice.receiver import FRAME_SAMPLES_48K, ReceiveCounters, VoiceReceiver

MODES = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")
RATE = 16000
FRAME_OUT = RATE // 50


def tone(freq: float, seconds: float, rate: int = 48000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.4 * 32767 * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return np.stack([mono, mono], axis=1)


class Member:
    """A simulated Discord client: its own SSRC, sequence, timestamp and nonce counter."""

    def __init__(self, ssrc: int, cipher: TransportCipher) -> None:
        self.ssrc = ssrc
        self.cipher = cipher
        self.encoder = OpusEncoder(48000, 2)
        self.seq = random.randrange(65536)
        self.ts = random.randrange(2**32)
        self.nonce = 0

    def packet(self, payload: bytes) -> bytes:
        header, ext = build_rtp_header(self.seq, self.ts, self.ssrc,
                                       extension=audio_level_extension(30))
        pkt = self.cipher.encrypt(header, ext, payload, self.nonce)
        self.seq = (self.seq + 1) % 65536
        self.ts = (self.ts + FRAME_SAMPLES_48K) % 2**32
        self.nonce += 1
        return pkt

    def speak(self, pcm: np.ndarray) -> list[bytes]:
        return [self.packet(self.encoder.encode(pcm[i:i + 960]))
                for i in range(0, len(pcm) - 959, 960)]

    def pause(self, seconds: float) -> None:
        """Discord sends nothing while a member is silent; the RTP clock runs on."""
        self.ts = (self.ts + int(seconds * 48000)) % 2**32


class Harness:
    #: The receiver's fast path on or off; the ``paths`` fixture runs every test both ways.
    fast_path = True

    def __init__(self, mode: str = MODES[0], *, ignored: set[int] | None = None,
                 idle_timeout: float = 5.0) -> None:
        self.key = os.urandom(32)
        self.cipher = TransportCipher(mode, self.key)
        self.audio: dict[int, list[np.ndarray]] = defaultdict(list)
        self.idle: list[int] = []
        self.receiver = VoiceReceiver(
            sample_rate=RATE,
            on_audio=lambda uid, pcm: self.audio[uid].append(pcm.copy()),
            on_idle=self.idle.append,
            is_ignored=lambda uid: uid in (ignored or set()),
            idle_timeout=idle_timeout,
            fast_path=self.fast_path,
        )
        self.receiver.set_transport(mode, self.key)
        self.now = 1000.0

    def deliver(self, packets: list[bytes], step: float = 0.02) -> None:
        for p in packets:
            self.receiver.handle_packet(p, self.now)
            self.now += step
            self.receiver.tick(self.now)

    def pcm(self, user_id: int) -> np.ndarray:
        parts = self.audio.get(user_id, [])
        return np.concatenate(parts) if parts else np.zeros(0, np.int16)


@pytest.fixture(autouse=True, params=[True, False], ids=["fast", "general"])
def paths(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every behaviour here holds with the receiver's fast path and without it (the general
    path alone: parse_rtp and jitter outputs for every packet)."""
    monkeypatch.setattr(Harness, "fast_path", request.param)


def dominant(pcm: np.ndarray, rate: int = RATE) -> float:
    spectrum = np.abs(np.fft.rfft(pcm.astype(np.float64) * np.hanning(len(pcm))))
    return float(np.fft.rfftfreq(len(pcm), 1 / rate)[np.argmax(spectrum)])


@pytest.mark.parametrize("mode", MODES)
def test_two_interleaved_members_come_out_as_two_clean_streams(mode: str) -> None:
    h = Harness(mode)
    alice, bob = Member(111, h.cipher), Member(222, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    h.receiver.on_speaking(2, bob.ssrc, h.now)
    a = alice.speak(tone(440, 1.0))
    b = bob.speak(tone(1000, 1.0))
    h.deliver([p for pair in zip(a, b, strict=True) for p in pair], step=0.01)
    h.receiver.tick(h.now + 0.05)
    for uid, freq in ((1, 440), (2, 1000)):
        pcm = h.pcm(uid)
        assert abs(dominant(pcm[FRAME_OUT * 5:FRAME_OUT * 45]) - freq) < 10
    assert h.receiver.stats["bad_tag"] == 0


def test_packets_before_speaking_wait_and_are_not_lost() -> None:
    h = Harness()
    alice = Member(111, h.cipher)
    packets = alice.speak(tone(440, 0.4))
    h.deliver(packets[:5])
    assert h.pcm(1).size == 0
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    h.deliver(packets[5:])
    h.receiver.tick(h.now + 0.05)
    assert len(h.pcm(1)) >= len(packets) * FRAME_OUT


def test_shuffled_and_dropped_packets_give_a_continuous_timeline_of_the_right_length() -> None:
    h = Harness()
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    packets = alice.speak(tone(440, 2.0))
    rng = random.Random(7)
    kept = [p for i, p in enumerate(packets) if i in (0, len(packets) - 1) or rng.random() > 0.05]
    # Swap neighbours now and then (within the jitter window).
    for i in range(1, len(kept) - 2, 7):
        kept[i], kept[i + 1] = kept[i + 1], kept[i]
    h.deliver(kept)
    h.receiver.tick(h.now + 0.05)
    pcm = h.pcm(1)
    # Every one of the 100 frames is there: decoded, recovered by FEC or concealed.
    assert abs(len(pcm) - len(packets) * FRAME_OUT) <= FRAME_OUT
    assert abs(dominant(pcm) - 440) < 10


def test_silence_is_filled_in_real_time_and_the_spurt_gap_is_not_doubled() -> None:
    h = Harness()
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    h.deliver(alice.speak(tone(440, 0.5)))
    h.deliver([alice.packet(OPUS_SILENCE_FRAME) for _ in range(5)])
    # Discord now sends nothing for 1.5 s; the receiver's clock keeps running.
    for _ in range(75):
        h.now += 0.02
        h.receiver.tick(h.now)
    alice.pause(1.5)
    h.deliver(alice.speak(tone(440, 0.5)))
    h.receiver.tick(h.now + 0.05)
    expected = (0.5 + 0.1 + 1.5 + 0.5) * RATE
    assert abs(len(h.pcm(1)) - expected) <= 3 * FRAME_OUT


def test_a_member_goes_idle_after_the_timeout_and_a_new_ssrc_keeps_one_member() -> None:
    h = Harness(idle_timeout=1.0)
    first = Member(111, h.cipher)
    h.receiver.on_speaking(1, first.ssrc, h.now)
    h.deliver(first.speak(tone(440, 0.2)))
    for _ in range(60):
        h.now += 0.02
        h.receiver.tick(h.now)
    assert h.idle == [1]
    rejoined = Member(333, h.cipher)  # left and rejoined: new SSRC, same user
    h.receiver.on_client_disconnect(1)
    h.receiver.on_speaking(1, rejoined.ssrc, h.now)
    h.deliver(rejoined.speak(tone(660, 0.4)))
    h.receiver.tick(h.now + 0.05)
    assert h.receiver.active_members() == [1]
    assert abs(dominant(np.concatenate(h.audio[1][-15:])) - 660) < 15


def test_opted_out_members_are_never_decrypted_or_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    # Thin wrappers count the real calls: whose packets reach the transport cipher, DAVE and
    # libopus. An opted-out member's must reach none of them (not merely produce no audio).
    decrypted_ssrcs: list[int] = []
    dave_users: list[int] = []
    decoders: list[OpusDecoder] = []
    decodes: list[OpusDecoder] = []
    real_decrypt, real_dave = TransportCipher.decrypt_datagram, DaveReceiver.decrypt
    real_init, real_decode, real_conceal = (OpusDecoder.__init__, OpusDecoder.decode,
                                            OpusDecoder.conceal)

    def decrypt(self: TransportCipher, data: bytes, header_size: int, extension_words: int,
                padding: bool = False) -> bytes:
        decrypted_ssrcs.append(int.from_bytes(data[8:12], "big"))
        return real_decrypt(self, data, header_size, extension_words, padding)

    def dave_decrypt(self: DaveReceiver, user_id: int, frame: bytes) -> bytes | None:
        dave_users.append(user_id)
        return real_dave(self, user_id, frame)

    def init(self: OpusDecoder, *args: int) -> None:
        decoders.append(self)
        real_init(self, *args)

    def decode(self: OpusDecoder, packet: bytes, *, fec: bool = False) -> np.ndarray:
        decodes.append(self)
        return real_decode(self, packet, fec=fec)

    def conceal(self: OpusDecoder, samples: int) -> np.ndarray:
        decodes.append(self)
        return real_conceal(self, samples)

    monkeypatch.setattr(TransportCipher, "decrypt_datagram", decrypt)
    monkeypatch.setattr(DaveReceiver, "decrypt", dave_decrypt)
    monkeypatch.setattr(OpusDecoder, "__init__", init)
    monkeypatch.setattr(OpusDecoder, "decode", decode)
    monkeypatch.setattr(OpusDecoder, "conceal", conceal)
    h = Harness(ignored={2})
    h.receiver.dave = DaveReceiver(lambda: None, lambda: 0)  # DAVE off: frames pass through
    alice, bob = Member(111, h.cipher), Member(222, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    bob_early = bob.speak(tone(440, 0.1))  # before bob's op 5: held, then released
    h.deliver(bob_early)
    h.receiver.on_speaking(2, bob.ssrc, h.now)
    a, b = alice.speak(tone(440, 0.2)), bob.speak(tone(440, 0.2))
    h.deliver([p for pair in zip(a, b, strict=True) for p in pair], step=0.01)
    h.receiver.tick(h.now + 0.5)
    assert 2 not in h.audio and len(h.pcm(1)) > 0
    assert bob.ssrc not in decrypted_ssrcs and decrypted_ssrcs.count(alice.ssrc) == len(a)
    assert set(dave_users) == {1}
    assert len(decoders) == 1  # alice's stream only; bob never got a decoder
    assert len(decodes) == len(a) and set(map(id, decodes)) == {id(decoders[0])}
    assert h.receiver.counters().ignored == len(bob_early) + len(b)


def test_bad_input_is_counted_never_raised() -> None:
    h = Harness()
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    good = alice.speak(tone(440, 0.1))
    tampered = bytearray(good[0])
    tampered[-6] ^= 0xFF
    rtcp = bytes([0x80, 200]) + bytes(26)
    wrong_key = Member(111, TransportCipher(MODES[0], os.urandom(32))).speak(tone(440, 0.02))
    h.deliver([bytes(tampered), b"", b"\x00" * 3, rtcp, b"\x80\x78" + bytes(6), *wrong_key,
               *good[1:]])
    stats = h.receiver.stats
    assert stats["bad_tag"] == 2
    assert stats["rtcp"] == 1
    assert stats["malformed"] >= 2
    assert len(h.pcm(1)) > 0


# -- hostile packets: repaired or dropped, counted, never raised (issue 12, items 1, 2, 11) ------


def crafted(cipher: TransportCipher, seq: int, ts: int, ssrc: int, payload: bytes, *,
            pad: bytes | None = None, ext_words: int | None = None, ext_body: bytes = b"",
            nonce: int = 0) -> bytes:
    """A correctly encrypted packet whose *content* may be inconsistent: ``pad`` (the RTP
    padding bit set, these bytes appended, the last one read as the count) and an extension
    header claiming ``ext_words`` words whatever ``ext_body`` really holds."""
    b0 = 0x80
    plaintext = ext_body + payload
    if pad is not None:
        b0 |= 0x20
        plaintext += pad
    ext = b""
    if ext_words is not None:
        b0 |= 0x10
        ext = struct.pack(">HH", 0xBEDE, ext_words)
    header = struct.pack(">BBHII", b0, 0x78, seq & 0xFFFF, ts & 0xFFFFFFFF, ssrc) + ext
    return cipher.encrypt(header, b"", plaintext, nonce)


def settled(c: ReceiveCounters) -> int:
    return c.decoded + c.dropped + c.waiting


def test_bad_padding_and_extension_lengths_inside_the_encryption_are_counted_not_raised() -> None:
    h = Harness()
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    h.receiver.on_speaking(2, 222, h.now)
    opus = alice.encoder.encode(tone(440, 0.02))
    hostile = [
        crafted(h.cipher, 1, 960, 222, opus, pad=b"\x00\x00\x00"),  # padding count 0
        crafted(h.cipher, 2, 1920, 222, opus, pad=b"\x00\xc8"),  # 200 bytes of padding claimed
        crafted(h.cipher, 3, 2880, 222, opus, ext_words=400, ext_body=bytes(4)),  # 1600 bytes
    ]
    good = alice.speak(tone(440, 0.3))
    h.deliver(good[:5] + hostile + good[5:])  # raised MalformedPacket before
    h.receiver.tick(h.now + 0.05)
    c = h.receiver.counters()
    assert c.bad_payload == 3 and c.internal_error == 0
    assert c.decoded == len(good) == h.receiver.decoded_by_member[1]
    assert len(h.pcm(1)) == len(good) * FRAME_OUT
    # Valid padding and an extension the header describes truly are taken off, not refused.
    h.deliver([crafted(h.cipher, 10 + i, 9600 + i * 960, 222, opus, pad=b"\x00\x00\x03",
                       ext_words=1, ext_body=b"\x10\x9e\x00\x00") for i in range(4)])
    h.receiver.tick(h.now + 0.5)
    assert h.receiver.decoded_by_member[2] == 4 and h.receiver.counters().bad_payload == 3


def test_a_timestamp_gap_off_the_2_5_ms_grid_is_repaired_not_raised() -> None:
    # Issue 12's example: seq 0 at ts 0, then seq 2 at ts 1460 (500 samples for one lost packet:
    # not whole 2.5 ms units, which libopus' concealment refuses with ValueError).
    h = Harness()
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    opus = alice.encoder.encode(tone(440, 0.02))
    stamps = [(0, 0), (2, 1460)] + [(2 + i, 1460 + i * 960) for i in range(1, 6)]
    h.deliver([crafted(h.cipher, seq, ts, alice.ssrc, opus, nonce=seq) for seq, ts in stamps])
    h.receiver.tick(h.now + 0.05)
    c = h.receiver.counters()
    assert c.internal_error == 0 and c.decoded == len(stamps) and c.concealed_frames == 1
    assert c.repaired_gaps == 1 and "1 off-grid gaps repaired" in c.summary()
    # The timeline is as long as the timestamps say (to the sample, rounded down at 16 kHz).
    assert len(h.pcm(1)) == (stamps[-1][1] + FRAME_SAMPLES_48K) // 3


def test_timestamps_cannot_run_a_member_ahead_of_the_wall_clock() -> None:
    # 250 packets 20 ms apart whose timestamps jump 10 s each: 2,490 s of audio before.
    h = Harness()
    mallory = Member(111, h.cipher)
    h.receiver.on_speaking(1, mallory.ssrc, h.now)
    started = h.now
    limit = h.receiver.max_ahead
    assert limit <= 1.1  # the reorder window plus the stall wait, not a loophole
    opus = mallory.encoder.encode(tone(440, 0.02))
    for i in range(250):
        h.deliver([crafted(h.cipher, i, i * 480_000, mallory.ssrc, opus, nonce=i)])
        assert len(h.pcm(1)) <= (h.now - started + limit) * RATE
    c = h.receiver.counters()
    assert c.decoded == 250  # every real frame kept: what was cut is invented silence
    assert c.trimmed_ms > 2000 * 1000
    assert len(h.pcm(1)) >= 250 * FRAME_OUT


def test_a_burst_of_frames_beyond_the_jitter_window_is_dropped_and_counted() -> None:
    h = Harness()
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    packets = alice.speak(tone(440, 4.0))  # 4 s of audio, all arriving at one instant
    for p in packets:
        h.receiver.handle_packet(p, h.now)
    c = h.receiver.counters()
    allowed = int(h.receiver.max_ahead * RATE) // FRAME_OUT
    assert c.decoded in (allowed - 1, allowed)
    assert c.too_fast == len(packets) - c.decoded - c.waiting
    assert len(h.pcm(1)) <= h.receiver.max_ahead * RATE
    # Once real time catches up, the stream goes on.
    h.now += 5.0
    h.deliver(alice.speak(tone(440, 0.2)))
    assert h.receiver.counters().decoded == c.decoded + c.waiting + 10


def test_every_datagram_lands_in_exactly_one_bucket() -> None:
    h = Harness(ignored={3})
    alice, bob, ignored = Member(111, h.cipher), Member(222, h.cipher), Member(333, h.cipher)
    wrong_key = Member(111, TransportCipher(MODES[0], os.urandom(32)))
    r = h.receiver
    r.reset_connection()  # packets before the key: no_key
    r.on_speaking(1, alice.ssrc, h.now)
    r.on_speaking(3, ignored.ssrc, h.now)
    sent = 0

    def deliver(packets: list[bytes], step: float = 0.02) -> None:
        nonlocal sent
        sent += len(packets)
        h.deliver(packets, step)
        c = r.counters()
        assert c.received == sent == settled(c), c

    deliver(alice.speak(tone(440, 0.06)))  # no_key
    r.set_transport(MODES[0], h.key)
    good = alice.speak(tone(440, 0.4))
    dup, late = good[3], good[8]
    deliver(good[:8] + good[9:] + [dup, late])  # a duplicate, and one after its slot was lost
    deliver([bytes([0x80, 200]) + bytes(26), b"\x00" * 3, b"\x80\x0a" + bytes(30)])
    deliver(wrong_key.speak(tone(440, 0.04)) + ignored.speak(tone(440, 0.04)))
    deliver(bob.speak(tone(440, 0.1)))  # never named by op 5: held, then expired
    opus = alice.encoder.encode(tone(440, 0.02))
    deliver([crafted(h.cipher, alice.seq, alice.ts, alice.ssrc, opus, pad=b"\x00", nonce=999),
             alice.packet(b"\x0b\xff"),  # libopus refuses it
             crafted(h.cipher, alice.seq + 30000, 0, alice.ssrc, opus, nonce=997)])
    for p in alice.speak(tone(440, 2.0)):  # a burst: too fast
        sent += 1
        r.handle_packet(p, h.now)
    h.now += 10.0
    r.tick(h.now)
    c = r.counters()
    assert c.received == sent == settled(c), c
    assert c.waiting == 0
    expected_drops = {"rtcp": 1, "malformed": 1, "other_payload_type": 1, "no_key": 3,
                      "bad_tag": 2, "ignored": 2, "unknown_ssrc": 5, "duplicate": 1, "late": 1,
                      "bad_payload": 1, "stray": 1}
    drops = c.drops()
    for name, n in expected_drops.items():
        assert drops.pop(name) == n, name
    assert set(drops) == {"too_fast", "undecodable"} and drops["undecodable"] == 1
    assert c.decoded == len(good) - 1 + (100 - drops["too_fast"])
    assert c.decoded == r.decoded_by_member[1]
    line = c.summary()
    assert line.startswith(f"voice packets: {c.decoded:,} decoded; {c.dropped:,} dropped (")
    assert "bad tag 2" in line and "trimmed" not in line


def test_a_reconnect_counts_what_was_still_waiting() -> None:
    h = Harness()
    alice, bob = Member(111, h.cipher), Member(222, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    packets = alice.speak(tone(440, 0.1))
    h.deliver([packets[0], *packets[2:4]])  # a hole: two packets wait for it
    h.deliver(bob.speak(tone(440, 0.04)))  # no op 5 yet: held
    h.receiver.reset_connection()
    c = h.receiver.counters()
    assert c.waiting == 0 and c.closed == 2 and c.unknown_ssrc == 2
    assert c.received == settled(c) == 5


def test_drain_hands_on_every_buffered_frame_and_ends_every_member_at_once() -> None:
    h = Harness()
    alice, bob, carol = Member(111, h.cipher), Member(222, h.cipher), Member(333, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    h.receiver.on_speaking(2, bob.ssrc, h.now)
    a = alice.speak(tone(440, 0.2))  # 10 frames
    # All within one clock tick: a hole at alice's 4 holds 5 and 6 back; carol has no op 5.
    for p in a[:4] + a[5:7] + bob.speak(tone(660, 0.1)) + carol.speak(tone(880, 0.06)):
        h.receiver.handle_packet(p, h.now)
    h.receiver.tick(h.now)
    before = h.receiver.counters()
    assert before.waiting == 2 + 3 and h.idle == []
    h.receiver.drain(h.now)  # no time passes: only drain() can release and end
    c = h.receiver.counters()
    assert sorted(h.idle) == [1, 2] and h.receiver.active_members() == []
    assert c.waiting == 0 and c.unknown_ssrc == 3 and c.closed == 0
    assert c.received == settled(c) == 6 + 5 + 3
    # Alice: 6 frames decoded plus the hole concealed; nothing invented after her last frame.
    assert h.receiver.decoded_by_member[1] == 6 and c.concealed_frames == 1
    assert len(h.pcm(1)) == 7 * FRAME_OUT
    assert len(h.pcm(2)) == 5 * FRAME_OUT
    h.receiver.drain(h.now)  # twice is harmless
    assert sorted(h.idle) == [1, 2] and h.receiver.counters() == c


# -- the clock task (bot.voice.client) -------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_packet_that_used_to_kill_the_clock_task_is_counted_and_the_clock_runs_on() -> None:
    # Before: the clock task drained the inbox outside its try, so one such packet ended it
    # for the rest of the meeting (no silence fill, no idle detection, no watchdog).
    h = Harness()
    clock = FakeClock()
    listener = VoiceListener(h.receiver, clock=clock)
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, clock.now)
    opus = alice.encoder.encode(tone(440, 0.02))
    bad = [crafted(h.cipher, 0, 0, alice.ssrc, opus),
           crafted(h.cipher, 2, 1460, alice.ssrc, opus, nonce=1),
           *(crafted(h.cipher, 2 + i, 1460 + i * 960, alice.ssrc, opus, nonce=1 + i)
             for i in range(1, 4)),
           crafted(h.cipher, 9, 9 * 960, alice.ssrc, opus, pad=b"\x00", nonce=9)]
    for data in bad:
        listener.inbox.put(data)  # no loop bound yet: they wait in the inbox
    task = asyncio.create_task(listener._tick_loop())
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        assert h.receiver.counters().received == len(bad)
        # The clock still fills silence in real time.
        before = len(h.pcm(1))
        clock.now += 3.0
        await asyncio.sleep(0.2)
        assert len(h.pcm(1)) > before + 2 * RATE
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_failing_stall_callback_does_not_stop_the_clock() -> None:
    h = Harness()
    clock = FakeClock()
    calls: list[str] = []

    def on_stalled(message: str) -> None:
        calls.append(message)
        raise RuntimeError("the meeting's handler failed")

    listener = VoiceListener(h.receiver, clock=clock, on_stalled=on_stalled,
                             watchdog_seconds=1.0, tick_seconds=0.005)
    listener.start(asyncio.get_running_loop())
    try:
        await listener.on_voice_ws_message({"op": 5, "d": {"user_id": "1", "ssrc": 5}})
        clock.now += 2.0
        await asyncio.sleep(0.1)
        ticks = listener.ticks
        assert calls and listener.clock_alive
        await asyncio.sleep(0.1)
        assert listener.ticks > ticks and listener.restarts == 0
    finally:
        await listener.aclose()
    assert not listener.clock_alive


async def test_a_supervised_loop_that_ends_or_raises_is_logged_and_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runs: list[int] = []
    forever = asyncio.Event()

    async def body() -> None:
        runs.append(len(runs))
        if len(runs) == 1:
            raise ValueError("a bug")
        if len(runs) == 2:
            return
        await forever.wait()

    restarted: list[str] = []
    task = asyncio.create_task(supervise("test loop", body, restart_delay=0.01,
                                         on_restart=restarted.append))
    try:
        for _ in range(100):
            if len(runs) == 3:
                break
            await asyncio.sleep(0.01)
        assert len(runs) == 3 and not task.done() and restarted == ["test loop"] * 2
        messages = [r.getMessage() for r in caplog.records]
        assert any("test loop failed; restarting" in m for m in messages)
        assert any("test loop ended by itself; restarting" in m for m in messages)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_datagrams_the_full_inbox_dropped_are_counted_with_the_rest() -> None:
    h = Harness()
    listener = VoiceListener(h.receiver, clock=FakeClock())
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, 0.0)
    opus = alice.encoder.encode(tone(440, 0.02))
    total = INBOX_LIMIT + 25
    for i in range(total):  # no loop yet: nothing drains, the oldest are dropped past the limit
        listener.inbox.put(crafted(h.cipher, i, i * FRAME_SAMPLES_48K, alice.ssrc, opus,
                                      nonce=i))
    listener.inbox.drain_all()
    c = listener.counters()
    assert c.inbox_dropped == 25 and c.received == INBOX_LIMIT
    assert c.received + c.inbox_dropped == total and c.received == settled(c)
    assert "25 lost to a full inbox" in c.summary()


async def test_a_burst_of_datagrams_is_worked_off_in_steps_so_ready_work_runs_between() -> None:
    # An STT chunk completed early in a burst is sent between steps, not after the whole burst.
    h = Harness()
    listener = VoiceListener(h.receiver, clock=FakeClock())
    loop = asyncio.get_running_loop()
    listener.inbox.bind(loop)  # as start() binds it, without the clock and keepalive tasks
    alice = Member(111, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, 0.0)
    opus = alice.encoder.encode(tone(440, 0.02))
    total = 3 * INBOX_BATCH
    for i in range(total):
        listener.inbox.put(crafted(h.cipher, i, i * FRAME_SAMPLES_48K, alice.ssrc, opus,
                                      nonce=i))
    seen: list[int] = []
    loop.call_soon(lambda: seen.append(listener.counters().received))  # ready after step 1
    await asyncio.sleep(0.05)
    assert seen == [INBOX_BATCH]
    c = listener.counters()
    assert c.received == total == settled(c) and c.inbox_dropped == 0

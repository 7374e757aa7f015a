"""The voice receive core: encrypted RTP from several members in, one PCM timeline per member out.

Packets are made as Discord sends them: real libopus at 48 kHz stereo, RTP with the audio-level
header extension, transport AEAD with a random key (both modes). The receiver runs with an
injected clock; nothing here sleeps.
"""

from __future__ import annotations

import os
import random
from collections import defaultdict

import numpy as np
import pytest

from bot.sim.sender import OpusEncoder, audio_level_extension, build_rtp_header
from bot.voice.crypto import TransportCipher
from bot.voice.opus import OPUS_SILENCE_FRAME
from bot.voice.receiver import FRAME_SAMPLES_48K, VoiceReceiver

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


def test_opted_out_members_are_dropped_before_decryption() -> None:
    h = Harness(ignored={2})
    alice, bob = Member(111, h.cipher), Member(222, h.cipher)
    h.receiver.on_speaking(1, alice.ssrc, h.now)
    h.receiver.on_speaking(2, bob.ssrc, h.now)
    h.deliver(alice.speak(tone(440, 0.2)) + bob.speak(tone(440, 0.2)))
    assert 2 not in h.audio
    assert h.receiver.stats["ignored"] == 10
    assert len(h.pcm(1)) > 0


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

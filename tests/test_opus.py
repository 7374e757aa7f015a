"""Spec for bot.voice.opus: our libopus binding, exercised against the real libopus."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from bot.errors import VoiceError
from bot.sim.sender import OpusEncoder
from bot.voice import opus
from bot.voice.opus import (
    DISCORD_CHANNELS,
    DISCORD_SAMPLE_RATE,
    FRAME_MS,
    OPUS_SAMPLE_RATES,
    OPUS_SILENCE_FRAME,
    OpusDecoder,
    OpusError,
    OpusNotAvailable,
)

FRAME_48K = DISCORD_SAMPLE_RATE * FRAME_MS // 1000  # 960


def tone(freq: float, seconds: float, rate: int = DISCORD_SAMPLE_RATE, amp: float = 10000.0
         ) -> npt.NDArray[np.int16]:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * freq * t) * amp).astype(np.int16)


def voice_like(seconds: float, rate: int = DISCORD_SAMPLE_RATE) -> npt.NDArray[np.int16]:
    """A 150 Hz buzz with harmonics and a slow tremolo: libopus codes it as speech (SILK)."""
    t = np.arange(int(seconds * rate)) / rate
    x = sum(np.sin(2 * np.pi * 150 * k * t) / k for k in range(1, 12))
    x = x * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
    return (x / np.abs(x).max() * 12000).astype(np.int16)


def encode_stereo(
    mono: npt.NDArray[np.int16], *, bitrate: int = 64000, fec: bool = True,
    packet_loss_percent: int = 5,
) -> list[bytes]:
    """Encode as a Discord client would: 48 kHz stereo, 20 ms frames."""
    enc = OpusEncoder(DISCORD_SAMPLE_RATE, DISCORD_CHANNELS, bitrate=bitrate, fec=fec,
                      packet_loss_percent=packet_loss_percent)
    stereo = np.repeat(mono[:, None], 2, axis=1)
    n = len(mono) // FRAME_48K
    return [enc.encode(stereo[i * FRAME_48K:(i + 1) * FRAME_48K]) for i in range(n)]


def peak_hz(x: npt.NDArray[np.int16], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def rms(x: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2)))


@pytest.fixture(scope="module")
def tone_packets() -> list[bytes]:
    return encode_stereo(tone(440, 1.0))


def test_a_48k_stereo_tone_decodes_to_16k_mono_keeping_its_frequency_and_length(
    tone_packets: list[bytes],
) -> None:
    dec = OpusDecoder(16000, 1)
    out = np.concatenate([dec.decode(p) for p in tone_packets])
    assert out.dtype == np.int16
    assert len(out) == len(tone_packets) * 320
    assert abs(peak_hz(out[320:], 16000) - 440) <= 2
    assert rms(out[1600:]) > 0.5 * 10000 / np.sqrt(2)


@pytest.mark.parametrize("rate", OPUS_SAMPLE_RATES)
def test_every_opus_rate_decodes_natively_with_one_frame_of_samples_per_packet(
    tone_packets: list[bytes], rate: int
) -> None:
    dec = OpusDecoder(rate, 1)
    per_frame = rate * FRAME_MS // 1000
    chunks = [dec.decode(p) for p in tone_packets]
    assert all(len(c) == per_frame for c in chunks)
    assert dec.samples_per_frame(tone_packets[0]) == per_frame
    assert abs(peak_hz(np.concatenate(chunks)[per_frame:], rate) - 440) <= 2


def test_stereo_decoding_is_interleaved_left_right() -> None:
    enc = OpusEncoder(48000, 2)
    source = np.stack([tone(440, 0.5), tone(1000, 0.5)], axis=1)  # L = 440 Hz, R = 1 kHz
    packets = [enc.encode(source[i * FRAME_48K:(i + 1) * FRAME_48K]) for i in range(25)]
    dec = OpusDecoder(48000, 2)
    out = np.concatenate([dec.decode(p) for p in packets])
    assert len(out) == 25 * FRAME_48K * 2
    assert abs(peak_hz(out[0::2], 48000) - 440) <= 2
    assert abs(peak_hz(out[1::2], 48000) - 1000) <= 2


def test_decode_into_writes_the_callers_buffer_and_matches_decode(
    tone_packets: list[bytes],
) -> None:
    a, b = OpusDecoder(16000, 1), OpusDecoder(16000, 1)
    buf = np.zeros(a.max_frame_samples, dtype=np.int16)
    for packet in tone_packets[:10]:
        n = a.decode_into(packet, buf)
        assert n == 320
        assert np.array_equal(buf[:n], b.decode(packet))


def test_decode_into_at_an_offset_fills_one_buffer_frame_after_frame(
    tone_packets: list[bytes],
) -> None:
    # The receiver's batching: consecutive frames decoded end to end into one buffer, stereo
    # offsets counted in sample frames; what is before the offset is left alone.
    for channels in (1, 2):
        a, b = OpusDecoder(16000, channels), OpusDecoder(16000, channels)
        buf = np.full((1600 + a.max_frame_samples) * channels, 7, dtype=np.int16)
        fill = 0
        for packet in tone_packets[:5]:
            fill += a.decode_into(packet, buf, fill)
        expected = np.concatenate([b.decode(p) for p in tone_packets[:5]])
        assert fill == 1600 and np.array_equal(buf[:fill * channels], expected)
        assert (buf[fill * channels:] == 7).all()
        with pytest.raises(ValueError):  # less than 2.5 ms of room left, or before the start
            a.decode_into(tone_packets[5], buf, len(buf) // channels - 10)
        with pytest.raises(ValueError):
            a.decode_into(tone_packets[5], buf, -1)


def test_decode_into_refuses_buffers_it_cannot_write() -> None:
    dec = OpusDecoder(16000, 1)
    with pytest.raises(TypeError):
        floats = np.zeros(320, dtype=np.float32)
        dec.decode_into(OPUS_SILENCE_FRAME, floats)  # type: ignore[arg-type]
    read_only = np.zeros(320, dtype=np.int16)
    read_only.flags.writeable = False
    with pytest.raises(ValueError):
        dec.decode_into(OPUS_SILENCE_FRAME, read_only)
    with pytest.raises(ValueError):
        dec.decode_into(b"", np.zeros(320, dtype=np.int16))


def test_a_corrupt_packet_raises_opus_error_with_the_libopus_code() -> None:
    dec = OpusDecoder(16000, 1)
    with pytest.raises(OpusError) as info:
        dec.decode(b"\xff\xff\xff\xff\xff")  # code 3 packet declaring 63 frames: invalid
    assert info.value.code == opus.OPUS_INVALID_PACKET
    assert "corrupted stream" in str(info.value)
    assert isinstance(info.value, VoiceError)
    with pytest.raises(OpusError):
        dec.decode_into(b"\xff\xff\xff\xff\xff", np.zeros(5760, dtype=np.int16))


def test_concealment_returns_exactly_the_requested_length(tone_packets: list[bytes]) -> None:
    dec = OpusDecoder(16000, 1)
    for packet in tone_packets[:10]:
        dec.decode(packet)
    assert len(dec.conceal(320)) == 320
    # 300 ms is longer than one libopus call allows (120 ms): it is done in pieces.
    assert len(dec.conceal(4800)) == 4800
    assert len(OpusDecoder(48000, 2).conceal(960)) == 1920


def test_concealment_refuses_lengths_libopus_cannot_produce() -> None:
    dec = OpusDecoder(16000, 1)
    with pytest.raises(ValueError, match="2.5 ms"):
        dec.conceal(321)
    with pytest.raises(ValueError):
        dec.conceal(0)


def test_fec_recovers_a_lost_frame_close_to_the_original() -> None:
    packets = encode_stereo(voice_like(0.6), bitrate=32000, packet_loss_percent=20)
    lost = 15
    reference = OpusDecoder(16000, 1)
    original = [reference.decode(p) for p in packets][lost]

    dec = OpusDecoder(16000, 1)
    for packet in packets[:lost]:
        dec.decode(packet)
    recovered = dec.decode_fec(packets[lost + 1], 320)
    after = dec.decode(packets[lost + 1])
    assert len(recovered) == 320 and len(after) == 320

    plc = OpusDecoder(16000, 1)
    for packet in packets[:lost]:
        plc.decode(packet)
    concealed = plc.conceal(320)

    def error(x: npt.NDArray[np.int16]) -> float:
        return rms((x.astype(np.int32) - original).astype(np.int16)) / rms(original)

    assert 0.8 < rms(recovered) / rms(original) < 1.25
    assert error(recovered) < 0.2
    assert error(recovered) < error(concealed) / 2  # FEC really carried the frame


def test_without_encoder_fec_decode_fec_falls_back_to_concealment() -> None:
    packets = encode_stereo(voice_like(0.6), bitrate=32000, fec=False)
    dec = OpusDecoder(16000, 1)
    for packet in packets[:15]:
        dec.decode(packet)
    assert len(dec.decode_fec(packets[16], 320)) == 320
    # A gap longer than one packet can hold is concealed first, then FEC: still exact.
    assert len(dec.decode_fec(packets[18], 2240)) == 2240


def test_the_discord_silence_frame_decodes_to_twenty_ms_of_silence() -> None:
    for rate in OPUS_SAMPLE_RATES:
        dec = OpusDecoder(rate, 1)
        out = dec.decode(OPUS_SILENCE_FRAME)
        assert len(out) == rate * FRAME_MS // 1000
        assert not out.any()


def test_reset_makes_the_decoder_behave_like_a_fresh_one(tone_packets: list[bytes]) -> None:
    dec = OpusDecoder(16000, 1)
    for packet in tone_packets[:20]:
        dec.decode(packet)
    dec.reset()
    fresh = OpusDecoder(16000, 1)
    for packet in tone_packets[20:25]:
        assert np.array_equal(dec.decode(packet), fresh.decode(packet))


def test_a_closed_decoder_refuses_work_instead_of_crashing(tone_packets: list[bytes]) -> None:
    dec = OpusDecoder(16000, 1)
    dec.close()
    dec.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        dec.decode(tone_packets[0])
    with pytest.raises(ValueError, match="closed"):
        dec.decode_into(tone_packets[0], np.zeros(320, dtype=np.int16))
    with pytest.raises(ValueError, match="closed"):
        dec.conceal(320)


def test_invalid_rates_channels_and_settings_are_rejected() -> None:
    with pytest.raises(ValueError):
        OpusDecoder(44100, 1)
    with pytest.raises(ValueError):
        OpusDecoder(48000, 3)
    with pytest.raises(ValueError):
        OpusEncoder(48000, 2, application="music")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        OpusEncoder(48000, 2, bitrate=1000)
    with pytest.raises(ValueError):
        OpusEncoder(48000, 2, packet_loss_percent=101)


def test_the_encoder_takes_exactly_one_frame_of_int16() -> None:
    enc = OpusEncoder(48000, 2)
    with pytest.raises(ValueError, match="one Opus frame"):
        enc.encode(np.zeros((900, 2), dtype=np.int16))
    with pytest.raises(TypeError):
        enc.encode(np.zeros((960, 2), dtype=np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channels"):
        enc.encode(np.zeros((960, 1), dtype=np.int16))
    # Interleaved 1-D input and 2-D input are the same frame.
    frame = np.repeat(tone(440, 0.02)[:, None], 2, axis=1)
    assert OpusEncoder(48000, 2).encode(frame) == OpusEncoder(48000, 2).encode(frame.ravel())


def test_a_missing_libopus_names_the_package_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(opus, "_lib", None)
    monkeypatch.setattr(opus.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(opus, "_FALLBACK_NAMES", ("libopus-does-not-exist.so.0",))
    with pytest.raises(OpusNotAvailable, match="libopus0") as info:
        OpusDecoder(16000, 1)
    assert info.value.permanent

"""Spec for bot.audio.convert: tones in, FFT out, real soxr."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
import soxr
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.audio.convert import Chunker, StreamConverter, downmix, to_int16

IN_RATES = (8000, 11025, 16000, 22050, 44100, 48000)
OUT_RATES = (8000, 11025, 16000, 22050, 24000, 44100, 48000)


def tone(freq: float, seconds: float, rate: int, amp: float = 16000.0) -> npt.NDArray[np.int16]:
    t = np.arange(int(round(seconds * rate))) / rate
    return np.rint(np.sin(2 * np.pi * freq * t) * amp).astype(np.int16)


def peak_hz(x: npt.NDArray[np.int16], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def rms(x: npt.NDArray[np.generic]) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def convert_all(conv: StreamConverter, x: npt.NDArray[np.generic]) -> npt.NDArray[np.int16]:
    return np.concatenate([conv.process(x), conv.flush()])


def stream_in_chunks(
    conv: StreamConverter, x: npt.NDArray[np.generic], rng: np.random.Generator, hi: int
) -> npt.NDArray[np.int16]:
    out, pos = [], 0
    while pos < len(x):
        k = int(rng.integers(1, hi))
        out.append(conv.process(x[pos:pos + k]))
        pos += k
    out.append(conv.flush())
    return np.concatenate(out)


@pytest.mark.parametrize("out_rate", OUT_RATES)
@pytest.mark.parametrize("in_rate", IN_RATES)
def test_a_1khz_tone_keeps_its_frequency_and_level_at_every_rate(in_rate: int, out_rate: int
                                                                 ) -> None:
    x = tone(1000, 1.0, in_rate)
    y = convert_all(StreamConverter(in_rate, 1, out_rate), x)
    assert y.dtype == np.int16
    assert len(y) == out_rate
    assert abs(peak_hz(y, out_rate) - 1000) <= 1
    assert rms(y[100:-100]) == pytest.approx(rms(x), rel=0.02)


def test_a_12khz_tone_is_filtered_out_not_aliased_when_going_from_48k_to_16k() -> None:
    x = tone(12000, 1.0, 48000)
    y = convert_all(StreamConverter(48000, 1, 16000), x)
    attenuation_db = 20 * np.log10((rms(y) + 1e-9) / rms(x))
    assert attenuation_db <= -50
    # What the test guards against: plain decimation folds 12 kHz onto 4 kHz at full level.
    naive = x[::3]
    assert abs(peak_hz(naive, 16000) - 4000) <= 1 and rms(naive) > rms(x) / 2


@pytest.mark.parametrize(("in_rate", "out_rate"), [(48000, 16000), (44100, 16000),
                                                   (22050, 48000), (48000, 11025)])
def test_an_hour_of_random_sized_chunks_comes_out_exactly_the_right_length(
    in_rate: int, out_rate: int
) -> None:
    rng = np.random.default_rng(in_rate + out_rate)
    conv = StreamConverter(in_rate, 1, out_rate)
    silence = np.zeros(2 * in_rate, dtype=np.int16)
    total_in = total_out = 0
    hour = 3600 * in_rate
    while total_in < hour:
        k = min(int(rng.integers(1, len(silence))), hour - total_in)
        total_in += k
        total_out += len(conv.process(silence[:k]))
    total_out += len(conv.flush())
    assert abs(total_out - total_in * out_rate / in_rate) <= 1


def test_streaming_in_odd_sized_chunks_equals_converting_in_one_go() -> None:
    rng = np.random.default_rng(7)
    x = (tone(300, 2.0, 48000, 8000) + tone(2500, 2.0, 48000, 4000)).astype(np.int16)
    whole = convert_all(StreamConverter(48000, 1, 16000), x)
    streamed = stream_in_chunks(StreamConverter(48000, 1, 16000), x, rng, hi=701)
    assert len(streamed) == len(whole) == 32000
    assert np.abs(streamed.astype(np.int32) - whole).max() <= 1


def test_a_low_tone_streamed_in_small_chunks_has_no_clicks() -> None:
    rng = np.random.default_rng(3)
    amp, freq, rate = 16000.0, 100.0, 16000
    y = stream_in_chunks(StreamConverter(48000, 1, rate), tone(freq, 1.0, 48000, amp), rng, 700)
    # A sine's steepest step between samples is 2*pi*f/rate*amp (628 here); allow ripple.
    max_step = 2 * np.pi * freq / rate * amp
    assert np.abs(np.diff(y.astype(np.int32))).max() < 1.1 * max_step
    # Resampling each chunk on its own (the bug this class exists to avoid) clicks loudly.
    rng = np.random.default_rng(3)
    x, pieces, pos = tone(freq, 1.0, 48000, amp).astype(np.float32), [], 0
    while pos < len(x):
        k = int(rng.integers(1, 700))
        pieces.append(soxr.resample(x[pos:pos + k], 48000, rate))
        pos += k
    assert np.abs(np.diff(np.concatenate(pieces))).max() > 3 * max_step


def test_opposite_stereo_channels_cancel_to_silence() -> None:
    left = tone(440, 0.5, 48000)
    stereo = np.stack([left, -left], axis=1)
    y = convert_all(StreamConverter(48000, 2, 16000), stereo)
    assert len(y) == 8000
    assert not y.any()


def test_identical_stereo_channels_give_the_same_tone_as_mono() -> None:
    mono = tone(440, 0.5, 48000)
    stereo = np.stack([mono, mono], axis=1)
    from_stereo = convert_all(StreamConverter(48000, 2, 16000), stereo)
    from_mono = convert_all(StreamConverter(48000, 1, 16000), mono)
    assert np.array_equal(from_stereo, from_mono)
    assert abs(peak_hz(from_stereo, 16000) - 440) <= 2


def test_interleaved_arrays_bytes_and_floats_are_the_same_audio() -> None:
    stereo = np.stack([tone(440, 0.2, 48000), tone(700, 0.2, 48000)], axis=1)
    reference = convert_all(StreamConverter(48000, 2, 16000), stereo)
    interleaved = convert_all(StreamConverter(48000, 2, 16000), stereo.ravel())
    as_bytes = convert_all(StreamConverter(48000, 2, 16000), stereo.astype("<i2").tobytes())
    as_float = convert_all(StreamConverter(48000, 2, 16000), stereo / 32768.0)
    assert np.array_equal(interleaved, reference)
    assert np.array_equal(as_bytes, reference)
    assert np.abs(as_float.astype(np.int32) - reference).max() <= 1


def test_equal_rates_pass_mono_int16_through_unchanged_as_a_copy() -> None:
    conv = StreamConverter(16000, 1, 16000)
    x = tone(440, 0.1, 16000)
    y = conv.process(x)
    assert np.array_equal(y, x)
    x[:] = 0  # the caller may reuse its buffer (a decoder's, say)
    assert y.any()
    assert len(conv.flush()) == 0


def test_flush_readies_the_converter_for_a_fresh_stream() -> None:
    conv = StreamConverter(44100, 1, 16000)
    convert_all(conv, tone(300, 0.3, 44100))
    second = tone(900, 0.3, 44100)
    assert np.array_equal(convert_all(conv, second),
                          convert_all(StreamConverter(44100, 1, 16000), second))


def test_bad_rates_shapes_and_byte_counts_are_rejected() -> None:
    with pytest.raises(ValueError, match="output rate"):
        StreamConverter(48000, 1, 96000)
    with pytest.raises(ValueError, match="output rate"):
        StreamConverter(48000, 1, 4000)
    with pytest.raises(ValueError, match="input rate"):
        StreamConverter(0, 1, 16000)
    conv = StreamConverter(48000, 2, 16000)
    with pytest.raises(ValueError, match="channel"):
        conv.process(np.zeros((10, 3), dtype=np.int16))
    with pytest.raises(ValueError, match="bytes"):
        conv.process(b"\x00\x01\x02")
    with pytest.raises(ValueError):
        conv.process(np.zeros(7, dtype=np.int16))  # not whole stereo frames
    with pytest.raises(TypeError):
        conv.process(np.zeros((10, 2), dtype=np.int32))


def test_downmix_averages_channels_into_float_full_scale() -> None:
    frames = np.array([[32767, -32768], [16384, 16384], [-32768, -32768]], dtype=np.int16)
    assert np.allclose(downmix(frames), [-0.5 / 32768, 0.5, -1.0])
    assert downmix(frames).dtype == np.float32
    assert np.allclose(downmix(np.array([0.25, -0.5])), [0.25, -0.5])


def test_to_int16_rounds_and_clips_at_full_scale() -> None:
    y = to_int16(np.array([0.0, 0.5, -0.5, 1.0, 1.5, -1.0, -2.0, 1e-5], dtype=np.float32))
    assert y.tolist() == [0, 16384, -16384, 32767, 32767, -32768, -32768, 0]
    x = np.arange(-32768, 32768, 97, dtype=np.int16)
    assert np.array_equal(to_int16(downmix(x)), x)  # int16 -> float -> int16 is lossless


def test_chunker_emits_whole_chunks_and_keeps_the_remainder() -> None:
    chunker = Chunker(16000, 100)
    assert chunker.samples_per_chunk == 1600
    assert chunker.push(np.arange(1000, dtype=np.int16)) == []
    assert chunker.pending_samples == 1000
    chunks = chunker.push(np.arange(1000, 3500, dtype=np.int16))
    assert [len(c) for c in chunks] == [3200, 3200]
    assert np.array_equal(np.frombuffer(chunks[1], dtype="<i2"), np.arange(1600, 3200))
    assert chunker.pending_samples == 300
    rest = chunker.flush()
    assert np.array_equal(np.frombuffer(rest, dtype="<i2"), np.arange(3200, 3500))
    assert chunker.flush() == b"" and chunker.pending_samples == 0


def test_chunker_rounds_chunk_sizes_down_at_rates_that_do_not_divide_evenly() -> None:
    assert Chunker(11025, 100).samples_per_chunk == 1102
    assert Chunker(44100, 20).samples_per_chunk == 882
    with pytest.raises(ValueError):
        Chunker(8000, 0)
    with pytest.raises(ValueError):
        Chunker(16000, 100).push(np.zeros((4, 2), dtype=np.int16))


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(0, 5000), max_size=20), chunk_ms=st.sampled_from([10, 20, 100]))
def test_chunker_output_reassembles_to_exactly_the_input(sizes: list[int], chunk_ms: int) -> None:
    chunker = Chunker(16000, chunk_ms)
    data = np.arange(sum(sizes), dtype=np.int64).astype(np.int16)
    out, pos = [], 0
    for n in sizes:
        chunks = chunker.push(data[pos:pos + n])
        assert all(len(c) == chunker.samples_per_chunk * 2 for c in chunks)
        out += chunks
        pos += n
    assert chunker.pending_samples < chunker.samples_per_chunk
    assert b"".join(out) + chunker.flush() == data.astype("<i2").tobytes()


def test_chunker_gives_the_same_little_endian_bytes_for_any_int16_layout() -> None:
    # The receiver's native 1-D int16 frames take a short path; a strided view must come out
    # as the same little-endian chunks, and what is not 1-D int16 is still refused.
    x = (np.arange(4000, dtype=np.int64) * 37 % 65536 - 32768).astype(np.int16)
    expected = x.astype("<i2").tobytes()
    for layout in (x, np.repeat(x, 2)[::2]):
        chunker = Chunker(16000, 100)
        out = b"".join(chunker.push(layout[:1000]) + chunker.push(layout[1000:]))
        assert out + chunker.flush() == expected
    with pytest.raises(ValueError):
        Chunker(16000, 100).push(x.reshape(2, -1))
    with pytest.raises(ValueError):
        Chunker(16000, 100).push(x.astype(np.float32))
    with pytest.raises(ValueError):
        Chunker(16000, 100).push(x.astype(">i2"))

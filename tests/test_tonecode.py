"""Tone-coded speech: text survives resampling, Opus and packet loss, and decodes in order."""

from __future__ import annotations

import itertools
import random
import time

import numpy as np
import numpy.typing as npt
import pytest
import soxr
from discord import opus

from bot.sim.tonecode import (
    COMMIT_SILENCE_S,
    Partial,
    ToneDecoder,
    Utterance,
    crc8,
    encode_utterance,
    speech_track,
    utterance_duration,
)

MEETING = "今日開會討論預算"
GREETING = "大家好，我係阿明"


def to_int16(audio: npt.NDArray[np.floating]) -> npt.NDArray[np.int16]:
    return np.clip(np.round(audio * 32767), -32768, 32767).astype(np.int16)


def decode_all(pcm: npt.NDArray[np.int16], rate: int, chunk_ms: int = 20) -> list[object]:
    """Feed in chunks like a live stream, then flush."""
    decoder = ToneDecoder(rate)
    step = max(1, rate * chunk_ms // 1000)
    events: list[object] = []
    for i in range(0, len(pcm), step):
        events += decoder.feed(pcm[i : i + step])
    return events + decoder.flush()


def utterances(events: list[object]) -> list[Utterance]:
    return [e for e in events if isinstance(e, Utterance)]


def through_opus(audio: npt.NDArray[np.float32], loss: float, seed: int) -> npt.NDArray[np.float32]:
    """48 kHz mono -> Discord-style stereo Opus 20 ms packets, lose some, decode with PLC."""
    opus._load_default()
    encoder, decoder = opus.Encoder(), opus.Decoder()
    rng = random.Random(seed)
    frame = 960  # 20 ms at 48 kHz, Discord's packet size
    pcm = to_int16(audio)
    pcm = np.concatenate((pcm, np.zeros(-len(pcm) % frame, dtype=np.int16)))
    out = []
    for i in range(0, len(pcm), frame):
        packet: bytes | None = encoder.encode(np.repeat(pcm[i : i + frame], 2).tobytes(), frame)
        if rng.random() < loss:
            packet = None  # lost: the decoder conceals it
        stereo = np.frombuffer(decoder.decode(packet), dtype=np.int16).reshape(-1, 2)
        out.append(stereo.mean(axis=1))
    return (np.concatenate(out) / 32768).astype(np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 24000, 44100, 48000])
@pytest.mark.parametrize("text", [MEETING, GREETING, "OK"])
def test_text_round_trips_at_every_supported_sample_rate(rate: int, text: str) -> None:
    track = speech_track([(0.25, text)], rate)
    (utt,) = utterances(decode_all(to_int16(track), rate))
    assert utt.text == text
    assert utt.checksum_ok
    assert utt.start == pytest.approx(0.25, abs=0.03)
    assert utt.end == pytest.approx(0.25 + utterance_duration(text), abs=0.03)


def test_words_are_one_per_character_in_order_and_inside_the_utterance() -> None:
    (utt,) = utterances(decode_all(to_int16(speech_track([(1.0, GREETING)], 16000)), 16000))
    assert "".join(w.text for w in utt.words) == GREETING
    assert all(utt.start <= w.start < w.end <= utt.end for w in utt.words)
    assert all(a.end == pytest.approx(b.start) for a, b in itertools.pairwise(utt.words))


def test_two_utterances_in_one_track_give_two_events_in_order_with_their_times() -> None:
    rate = 16000
    second = 1.0 + utterance_duration(MEETING) + 0.8
    track = speech_track([(1.0, MEETING), (second, GREETING)], rate)
    first_utt, second_utt = utterances(decode_all(to_int16(track), rate))
    assert (first_utt.text, second_utt.text) == (MEETING, GREETING)
    assert first_utt.start == pytest.approx(1.0, abs=0.03)
    assert second_utt.start == pytest.approx(second, abs=0.03)
    assert first_utt.end < second_utt.start


def test_partials_grow_before_the_commit_and_the_commit_comes_last() -> None:
    events = decode_all(to_int16(speech_track([(0.2, MEETING)], 16000)), 16000)
    partials = [e.text for e in events if isinstance(e, Partial)]
    assert partials, "expected partial transcripts while the utterance is heard"
    assert all(MEETING.startswith(p) for p in partials)
    assert [len(p) for p in partials] == sorted(len(p) for p in partials)
    assert isinstance(events[-1], Utterance)


def test_commit_waits_for_the_pause_after_the_end_marker() -> None:
    rate = 16000
    audio = to_int16(encode_utterance("OK", rate))
    decoder = ToneDecoder(rate)
    assert utterances(decoder.feed(audio)) == []
    almost = np.zeros(int((COMMIT_SILENCE_S - 0.05) * rate), dtype=np.int16)
    assert utterances(decoder.feed(almost)) == []
    assert [u.text for u in utterances(decoder.feed(np.zeros(rate // 10, np.int16)))] == ["OK"]


def test_flush_commits_an_utterance_cut_off_before_its_end_marker() -> None:
    rate = 16000
    audio = to_int16(encode_utterance(MEETING, rate))
    decoder = ToneDecoder(rate)
    decoder.feed(audio[: len(audio) * 3 // 4])
    (utt,) = utterances(decoder.flush())
    assert MEETING.startswith(utt.text.rstrip("\ufffd")[:3])
    assert not utt.checksum_ok


def test_noise_only_input_gives_nothing() -> None:
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 3000, 16000 * 5).clip(-32768, 32767).astype(np.int16)
    assert decode_all(noise, 16000) == []
    assert decode_all(np.zeros(16000 * 2, dtype=np.int16), 16000) == []


def test_resampling_from_48k_preserves_the_text() -> None:
    track = speech_track([(0.3, MEETING)], 48000)
    for rate in (8000, 16000, 24000):
        resampled = soxr.resample(track, 48000, rate)
        assert [u.text for u in utterances(decode_all(to_int16(resampled), rate))] == [MEETING]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_text_survives_opus_and_five_percent_packet_loss(seed: int) -> None:
    lines = [(0.31, MEETING), (7.0, GREETING)]
    track = speech_track(lines, 48000)
    received = soxr.resample(through_opus(track, loss=0.05, seed=seed), 48000, 16000)
    got = utterances(decode_all(to_int16(received), 16000))
    assert [(u.text, u.checksum_ok) for u in got] == [(MEETING, True), (GREETING, True)]


def test_a_corrupted_symbol_fails_the_checksum_but_still_gives_best_effort_text() -> None:
    rate = 16000
    audio = encode_utterance("abcd", rate).copy()
    # Overwrite both copies of the first data nibble with another tone (0x6 -> 0x7).
    for copy in (0, 4):
        start = int((0.240 + copy * 0.060) * rate)
        t = np.arange(int(0.060 * rate)) / rate
        audio[start : start + len(t)] = 0.4 * np.sin(2 * np.pi * (500 + 200 * 7) * t)
    (utt,) = utterances(decode_all(to_int16(np.concatenate((audio, np.zeros(rate)))), rate))
    assert not utt.checksum_ok
    assert utt.text == "qbcd"


def test_crc8_detects_a_changed_byte() -> None:
    assert crc8(b"abc") != crc8(b"abd")
    assert crc8(b"") == 0


def test_speech_track_refuses_overlapping_utterances() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        speech_track([(0.0, MEETING), (1.0, GREETING)], 16000)


def test_decoding_runs_on_the_calling_thread_and_starts_no_blas_workers() -> None:
    # The fake cantonese.ai decodes on its event loop, beside the bot under test on the same
    # cores. Work handed to OpenBLAS's worker threads waits for a core whenever the machine is
    # busy (a CI run was lost to it: the fake fell 10 s behind a burst it was sent). Every
    # CPU second the decoder spends is spent on the thread that called it.
    rate = 16000
    rng = np.random.default_rng(5)
    noise = rng.normal(0, 300, rate // 2).astype(np.float32) / 32767
    speech = np.concatenate([np.concatenate((encode_utterance(MEETING, rate), noise))] * 12)
    pcm = to_int16(speech)
    this_thread, process = time.thread_time(), time.process_time()
    got = utterances(decode_all(pcm, rate))
    this_thread, process = time.thread_time() - this_thread, time.process_time() - process
    assert [u.text for u in got] == [MEETING] * 12
    elsewhere = process - this_thread
    assert elsewhere <= 0.1 * this_thread + 0.005, (
        f"{elsewhere:.3f} s of CPU on other threads, {this_thread:.3f} s on this one")

"""Spec for bot.audio.files: real files written with soundfile into tmp_path, read back."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import soundfile

from bot.audio.files import AudioClip, discover_tracks, read_audio, speaker_name_from_filename
from bot.errors import AudioInputError

HAS_OGG_VORBIS = "VORBIS" in soundfile.available_subtypes("OGG")
HAS_OGG_OPUS = "OPUS" in soundfile.available_subtypes("OGG")


def tone(freq: float, seconds: float, rate: int, channels: int = 1) -> npt.NDArray[np.int16]:
    t = np.arange(int(seconds * rate)) / rate
    mono = np.rint(np.sin(2 * np.pi * freq * t) * 12000).astype(np.int16)
    return np.repeat(mono[:, None], channels, axis=1)


def peak_hz(x: npt.NDArray[np.generic], rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(np.asarray(x, dtype=np.float64)))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[int(np.argmax(spectrum))])


def rms(x: npt.NDArray[np.generic]) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def write(path: Path, samples: npt.NDArray[np.generic], rate: int, **kwargs: str) -> Path:
    soundfile.write(str(path), samples, rate, **kwargs)
    return path


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 1), (44100, 2), (96000, 2)])
def test_a_16_bit_wav_reads_back_sample_for_sample(tmp_path: Path, rate: int, channels: int
                                                   ) -> None:
    samples = tone(440, 0.25, rate, channels)
    clip = read_audio(str(write(tmp_path / "a.wav", samples, rate, subtype="PCM_16")))
    assert clip.sample_rate == rate
    assert clip.samples.shape == (len(samples), channels)
    assert clip.samples.dtype == np.int16
    assert np.array_equal(clip.samples, samples)
    assert clip.duration == pytest.approx(0.25, abs=1 / rate)
    assert clip.channels == channels


def test_float_and_24_bit_wavs_are_converted_to_int16(tmp_path: Path) -> None:
    samples = tone(440, 0.1, 16000)
    as_float = write(tmp_path / "f.wav", samples / 32768.0, 16000, subtype="FLOAT")
    as_24 = write(tmp_path / "p.wav", samples, 16000, subtype="PCM_24")
    for path in (as_float, as_24):
        clip = read_audio(str(path))
        assert clip.samples.dtype == np.int16
        assert np.abs(clip.samples.astype(np.int32) - samples).max() <= 1


def test_flac_is_lossless(tmp_path: Path) -> None:
    samples = tone(300, 0.2, 48000, 2)
    clip = read_audio(str(write(tmp_path / "1-alice.flac", samples, 48000)))
    assert np.array_equal(clip.samples, samples)


@pytest.mark.skipif(not HAS_OGG_VORBIS, reason="libsndfile without Ogg Vorbis")
def test_ogg_vorbis_keeps_the_tone(tmp_path: Path) -> None:
    clip = read_audio(str(write(tmp_path / "v.ogg", tone(440, 0.5, 44100), 44100,
                                format="OGG", subtype="VORBIS")))
    assert clip.sample_rate == 44100
    assert abs(peak_hz(clip.samples[:, 0], 44100) - 440) <= 3
    assert rms(clip.samples[4800:, 0]) == pytest.approx(12000 / np.sqrt(2), rel=0.15)  # not zeros


@pytest.mark.skipif(not HAS_OGG_OPUS, reason="libsndfile without Ogg Opus")
def test_ogg_opus_keeps_the_tone(tmp_path: Path) -> None:
    clip = read_audio(str(write(tmp_path / "o.opus", tone(440, 0.5, 48000, 2), 48000,
                                format="OGG", subtype="OPUS")))
    assert clip.sample_rate == 48000 and clip.channels == 2
    assert abs(peak_hz(clip.samples[:, 0], 48000) - 440) <= 3
    assert rms(clip.samples[4800:, 0]) == pytest.approx(12000 / np.sqrt(2), rel=0.15)  # not zeros


def test_bytes_are_read_with_the_name_used_only_in_messages(tmp_path: Path) -> None:
    path = write(tmp_path / "x.flac", tone(440, 0.1, 16000), 16000)
    clip = read_audio("upload.flac", path.read_bytes())
    assert clip.frames == 1600
    with pytest.raises(AudioInputError, match=r"^upload\.wav: not a supported audio file: "):
        read_audio("upload.wav", b"RIFF but not really a wave file at all")


def test_a_missing_file_says_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.wav"
    with pytest.raises(AudioInputError, match="nope.wav: not found$"):
        read_audio(str(missing))


def test_a_text_file_is_not_a_supported_audio_file(tmp_path: Path) -> None:
    notes = tmp_path / "notes.wav"
    notes.write_text("these are meeting notes, not audio\n" * 10)
    with pytest.raises(AudioInputError) as info:
        read_audio(str(notes))
    message = str(info.value)
    assert message.startswith(f"{notes}: not a supported audio file: ")
    assert "\n" not in message and "Format not recognised" in message
    assert info.value.permanent


def test_six_channels_are_refused_with_the_count(tmp_path: Path) -> None:
    path = write(tmp_path / "surround.wav", np.zeros((100, 6), dtype=np.int16), 48000)
    with pytest.raises(AudioInputError, match="surround.wav: has 6 channels; 1 or 2 supported"):
        read_audio(str(path))


def test_empty_files_and_zero_length_audio_say_is_empty(tmp_path: Path) -> None:
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    no_frames = write(tmp_path / "none.wav", np.zeros((0, 1), dtype=np.int16), 16000)
    for path in (zero_bytes, no_frames):
        with pytest.raises(AudioInputError, match=f"{path.name}: is empty$"):
            read_audio(str(path))
    with pytest.raises(AudioInputError, match="^up.wav: is empty$"):
        read_audio("up.wav", b"")


@pytest.mark.parametrize(
    ("filename", "speaker"),
    [
        ("1-alice.flac", "alice"),
        ("2-bob_1234.ogg", "bob"),
        ("3-dan#4321.flac", "dan"),
        ("4-erin_0.flac", "erin"),  # Craig after Discord dropped discriminators
        ("carol.wav", "carol"),
        ("12-frank_ocean.flac", "frank_ocean"),  # an underscore in the name itself stays
        ("craig/5-gwen.flac", "gwen"),
        ("10-2024.flac", "2024"),  # a numeric user name is not a discriminator
        ("7-_1234.flac", "_1234"),  # nothing but a suffix: keep it rather than return ""
    ],
)
def test_speaker_names_come_from_craig_track_names(filename: str, speaker: str) -> None:
    assert speaker_name_from_filename(filename) == speaker


def make_craig_export(folder: Path) -> None:
    folder.mkdir()
    write(folder / "2-bob_1234.flac", tone(500, 0.2, 48000), 48000)
    write(folder / "1-alice.flac", tone(400, 0.1, 48000), 48000)
    write(folder / "10-carol.wav", tone(600, 0.3, 16000), 16000, subtype="PCM_16")
    (folder / "info.txt").write_text("Recording by Craig\n")
    (folder / "raw.dat").write_bytes(b"\x00\x01" * 50)


def check_craig_tracks(tracks: list[tuple[str, AudioClip]]) -> None:
    # Sorted by name with numbers as numbers: track 10 comes after track 2.
    assert [name for name, _ in tracks] == ["alice", "bob", "carol"]
    assert [round(clip.duration, 3) for _, clip in tracks] == [0.1, 0.2, 0.3]
    assert abs(peak_hz(tracks[2][1].samples[:, 0], 16000) - 600) <= 4


def test_a_folder_of_tracks_is_discovered_sorted_and_named(tmp_path: Path) -> None:
    make_craig_export(tmp_path / "export")
    check_craig_tracks(discover_tracks(str(tmp_path / "export")))


def test_a_zip_of_tracks_is_discovered_like_a_folder(tmp_path: Path) -> None:
    make_craig_export(tmp_path / "export")
    archive = tmp_path / "craig.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in sorted((tmp_path / "export").iterdir(), reverse=True):
            zf.write(f, f"craig-2026-11-26/{f.name}")
    check_craig_tracks(discover_tracks(str(archive)))


def test_a_single_audio_file_is_one_track(tmp_path: Path) -> None:
    path = write(tmp_path / "1-solo.flac", tone(440, 0.1, 16000), 16000)
    [(name, clip)] = discover_tracks(str(path))
    assert name == "solo" and clip.frames == 1600


def test_a_bad_track_inside_a_zip_is_named_with_the_archive(tmp_path: Path) -> None:
    archive = tmp_path / "craig.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("1-alice.flac", b"definitely not flac")
    with pytest.raises(AudioInputError, match=r"craig\.zip:1-alice\.flac: not a supported"):
        discover_tracks(str(archive))


def test_discovery_errors_are_one_line_each(tmp_path: Path) -> None:
    with pytest.raises(AudioInputError, match="gone: not found$"):
        discover_tracks(str(tmp_path / "gone"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "info.txt").write_text("no audio here")
    with pytest.raises(AudioInputError, match="no audio tracks found$"):
        discover_tracks(str(tmp_path / "empty"))
    fake_zip = tmp_path / "broken.zip"
    fake_zip.write_bytes(b"PK but broken")
    with pytest.raises(AudioInputError, match="broken.zip: not a valid zip file"):
        discover_tracks(str(fake_zip))
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(AudioInputError, match="not a folder, a .zip or an audio file$"):
        discover_tracks(str(notes))


def test_an_audio_clip_refuses_the_wrong_layout() -> None:
    with pytest.raises(ValueError):
        AudioClip(samples=np.zeros(10, dtype=np.int16), sample_rate=16000)
    with pytest.raises(ValueError):
        floats = np.zeros((10, 1), dtype=np.float32)
        AudioClip(samples=floats, sample_rate=16000)  # type: ignore[arg-type]

"""Audio files in: single tracks and Craig-style multi-track exports (a folder or a .zip).

Job: read a recording into memory as int16 frames for ``cantobot replay`` and tests, and name
each speaker's track from its file name. Reading goes through libsndfile (``soundfile``): WAV at
any rate and bit depth, FLAC, and Ogg Vorbis / Ogg Opus where the installed libsndfile has them.
Samples are converted to int16 by libsndfile on the way in.

Boundary: file system and zip reading only; no resampling (see :mod:`bot.audio.convert`).
Every failure is one :class:`~bot.errors.AudioInputError` line naming the file, e.g.
``meeting/3-dan.flac: has 6 channels; 1 or 2 supported``.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

import numpy as np
import numpy.typing as npt
import soundfile

from bot.audio.convert import to_int16
from bot.errors import AudioInputError

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioClip",
    "discover_tracks",
    "read_audio",
    "speaker_name_from_filename",
]

#: File endings we treat as audio tracks when scanning a folder or zip; everything else
#: (Craig's info.txt, raw.dat, notes) is skipped. Reading itself sniffs the real format.
AUDIO_EXTENSIONS: Final = frozenset(
    {".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".aif", ".aiff", ".mp3", ".w64"}
)
#: Channels we accept: a speaker track is mono, a room recording may be stereo.
MAX_CHANNELS: Final = 2

#: libsndfile subtypes holding integer samples besides PCM_*, read as int16 directly.
_INTEGER_SUBTYPES: Final = frozenset({"ULAW", "ALAW", "IMA_ADPCM", "MS_ADPCM", "GSM610",
                                      "G721_32", "G723_24", "G723_40", "DWVW_16", "DPCM_16"})

# Craig names tracks "<n>-<username>[_<discriminator>|#<discriminator>].<ext>"; since Discord
# dropped discriminators Craig writes "_0". A 4-digit or lone "0" suffix is a discriminator.
_TRACK_PREFIX = re.compile(r"^\d+-(?=.)")
_DISCRIMINATOR = re.compile(r"(?<=.)[_#](?:\d{4}|0)$")


@dataclass(frozen=True)
class AudioClip:
    """Decoded audio: ``samples`` shaped (frames, channels), int16, at ``sample_rate`` Hz."""

    samples: npt.NDArray[np.int16]
    sample_rate: int

    def __post_init__(self) -> None:
        if self.samples.dtype != np.int16 or self.samples.ndim != 2:
            raise ValueError("AudioClip.samples must be int16 shaped (frames, channels)")
        if self.sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {self.sample_rate}")

    @property
    def channels(self) -> int:
        return int(self.samples.shape[1])

    @property
    def frames(self) -> int:
        return int(self.samples.shape[0])

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.sample_rate


def read_audio(path_or_name: str, data: bytes | None = None) -> AudioClip:
    """Read a whole audio file as int16; with ``data`` the bytes are read and the name is
    only used in messages (a zip member, an upload)."""
    name = str(path_or_name)
    source: str | io.BytesIO
    if data is None:
        path = Path(name)
        if not path.exists():
            raise AudioInputError(f"{name}: not found")
        if path.is_dir():
            raise AudioInputError(f"{name}: not a supported audio file: it is a folder")
        source = name
    else:
        source = io.BytesIO(data)
    if data is not None and not data:
        raise AudioInputError(f"{name}: is empty")
    try:
        with soundfile.SoundFile(source) as f:
            channels, rate = f.channels, f.samplerate
            if channels > MAX_CHANNELS:
                raise AudioInputError(
                    f"{name}: has {channels} channels; 1 or {MAX_CHANNELS} supported"
                )
            samples = _read_int16(f)
    except AudioInputError:
        raise
    except soundfile.LibsndfileError as exc:
        reason = (exc.error_string or str(exc)).strip().rstrip(".")
        if data is None and Path(name).stat().st_size == 0:
            raise AudioInputError(f"{name}: is empty") from exc
        raise AudioInputError(f"{name}: not a supported audio file: {reason}") from exc
    except OSError as exc:
        raise AudioInputError(f"{name}: cannot read: {exc.strerror or exc}") from exc
    except (RuntimeError, ValueError, TypeError) as exc:
        # libsndfile can fail mid-stream on a truncated or damaged file.
        raise AudioInputError(f"{name}: not a supported audio file: {exc}") from exc
    if samples.shape[0] == 0:
        raise AudioInputError(f"{name}: is empty")
    return AudioClip(samples=np.ascontiguousarray(samples, dtype=np.int16), sample_rate=rate)


def _read_int16(f: soundfile.SoundFile) -> npt.NDArray[np.int16]:
    """All frames as int16 (frames, channels).

    Integer PCM (WAV/FLAC/AIFF at any bit depth) is scaled to 16 bits by libsndfile itself. Float
    data (float WAV, Vorbis, Opus, MP3) read as short comes back as zeros unless libsndfile's
    float scaling is switched on, so it is read as float32 and scaled here instead.
    """
    subtype = (f.subtype or "").upper()
    if subtype.startswith("PCM_") or subtype in _INTEGER_SUBTYPES:
        result: npt.NDArray[np.int16] = f.read(dtype="int16", always_2d=True)
        return result
    return to_int16(f.read(dtype="float32", always_2d=True))


def speaker_name_from_filename(name: str) -> str:
    """``1-alice.flac`` -> ``alice``; ``2-bob_1234.ogg`` / ``2-bob#1234.ogg`` -> ``bob``;
    ``carol.wav`` -> ``carol``. Folders in the name are ignored."""
    base = PurePosixPath(name.replace("\\", "/")).name
    stem = base.rsplit(".", 1)[0] if "." in base.lstrip(".") else base
    stem = _TRACK_PREFIX.sub("", stem)
    stem = _DISCRIMINATOR.sub("", stem)
    return stem.strip() or base


def _natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key putting ``2-bob`` before ``10-judy`` (Craig numbers tracks without padding)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    return tuple((0, int(part)) if part.isdecimal() else (1, part.lower())
                 for part in re.findall(r"\d+|\D+", base))


def _is_track(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.name.startswith(".") or "__MACOSX" in p.parts:
        return False
    return p.suffix.lower() in AUDIO_EXTENSIONS


def discover_tracks(path: str) -> list[tuple[str, AudioClip]]:
    """Every speaker's track in a folder or a .zip (or a single audio file), sorted by file
    name (numbers compared as numbers), as ``(speaker name, clip)``; non-audio files are
    skipped."""
    p = Path(path)
    if not p.exists():
        raise AudioInputError(f"{path}: not found")
    tracks: list[tuple[str, AudioClip]] = []
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.is_file() and _is_track(f.name)),
                       key=lambda f: (_natural_key(f.name), f.name))
        for f in files:
            tracks.append((speaker_name_from_filename(f.name), read_audio(str(f))))
    elif p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
        tracks = _tracks_from_zip(path)
    elif _is_track(p.name):
        return [(speaker_name_from_filename(p.name), read_audio(path))]
    else:
        raise AudioInputError(f"{path}: not a folder, a .zip or an audio file")
    if not tracks:
        raise AudioInputError(f"{path}: no audio tracks found")
    return tracks


def _tracks_from_zip(path: str) -> list[tuple[str, AudioClip]]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = sorted(
                (m for m in zf.infolist() if not m.is_dir() and _is_track(m.filename)),
                key=lambda m: (_natural_key(m.filename), m.filename),
            )
            tracks = []
            for m in members:
                label = f"{path}:{m.filename}"
                try:
                    data = zf.read(m)
                except (zipfile.BadZipFile, OSError, NotImplementedError) as exc:
                    raise AudioInputError(f"{label}: cannot extract: {exc}") from exc
                tracks.append((speaker_name_from_filename(m.filename), read_audio(label, data)))
            return tracks
    except zipfile.BadZipFile as exc:
        raise AudioInputError(f"{path}: not a valid zip file: {exc}") from exc

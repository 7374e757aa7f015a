"""Audio files in: single tracks and Craig-style multi-track exports (a folder or a .zip).

Job: find a recording's tracks, name each speaker's track from its file name, and hand out its
int16 frames: streamed block by block (:class:`TrackSource`, what ``cantobot replay`` uses, so
memory stays flat however long the export) or whole (:func:`read_audio`, for short clips).
A zip member is decompressed as it is read, never extracted whole; one whose uncompressed size
or compression ratio is implausible for audio is refused before anything is read. Reading goes
through libsndfile (``soundfile``): WAV at any rate and bit depth, FLAC, and Ogg Vorbis / Ogg
Opus where the installed libsndfile has them. Samples are converted to int16 on the way in.

Boundary: file system and zip reading only; no resampling (see :mod:`bot.audio.convert`).
Every failure is one :class:`~bot.errors.AudioInputError` line naming the file, e.g.
``meeting/3-dan.flac: has 6 channels; 1 or 2 supported``.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final

import numpy as np
import numpy.typing as npt
import soundfile

from bot.audio.convert import to_int16
from bot.errors import AudioInputError

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioClip",
    "TrackSource",
    "discover_tracks",
    "find_tracks",
    "open_track",
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

#: Refused as implausible for a speaker's track: longer than a day (a header claiming more is
#: damaged or crafted; replaying it would run for days).
MAX_TRACK_SECONDS: Final = 24 * 3600.0
#: A zip member larger than this uncompressed is refused: a day of 48 kHz stereo 16-bit WAV is
#: 16.6 GB, so anything bigger is not one speaker's track.
MAX_MEMBER_BYTES: Final = 16 * 1024**3
#: ... and so is one that expands more than this: deflate cannot pass ~1032:1 even on digital
#: silence, so only a crafted member (bzip2/LZMA bombs reach millions to one) goes beyond.
MAX_COMPRESSION_RATIO: Final = 1100
#: Below this uncompressed size a member is too small to hurt, whatever its ratio.
_RATIO_FLOOR_BYTES: Final = 1024 * 1024

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


Opener = Callable[[ExitStack], "str | IO[bytes]"]


@dataclass(frozen=True)
class TrackSource:
    """One speaker's track, probed (format checked, length known) but not decoded.

    :meth:`blocks` decodes it as it is consumed; each call opens its own file handle (and zip
    handle), so tracks of one archive stream independently.
    """

    name: str  # the speaker's name
    label: str  # the file (or ``archive:member``) for messages
    sample_rate: int
    channels: int
    frames: int
    _opener: Opener

    @property
    def duration(self) -> float:
        return self.frames / self.sample_rate

    def blocks(self, frames: int) -> Iterator[npt.NDArray[np.int16]]:
        """int16 blocks shaped (n <= frames, channels), in order; one file open at a time."""
        with ExitStack() as stack:
            f = _open_sound(self.label, self._opener(stack), stack)
            while True:
                try:
                    block = _read_int16(f, frames)
                except (soundfile.LibsndfileError, RuntimeError, ValueError, OSError,
                        zipfile.BadZipFile, EOFError) as exc:
                    raise AudioInputError(f"{self.label}: cannot decode: {exc}") from exc
                if not len(block):
                    return
                yield block

    def read(self) -> AudioClip:
        """The whole track decoded (short clips only: memory grows with its length)."""
        parts = list(self.blocks(1 << 16))
        if not parts:
            raise AudioInputError(f"{self.label}: is empty")
        return AudioClip(np.ascontiguousarray(np.concatenate(parts)), self.sample_rate)


def _open_sound(label: str, source: str | IO[bytes], stack: ExitStack) -> soundfile.SoundFile:
    """A libsndfile handle on ``source`` (closed with ``stack``); one-line errors."""
    try:
        f = soundfile.SoundFile(source)
    except soundfile.LibsndfileError as exc:
        reason = (exc.error_string or str(exc)).strip().rstrip(".")
        if isinstance(source, str) and Path(source).stat().st_size == 0:
            raise AudioInputError(f"{label}: is empty") from exc
        raise AudioInputError(f"{label}: not a supported audio file: {reason}") from exc
    except OSError as exc:
        raise AudioInputError(f"{label}: cannot read: {exc.strerror or exc}") from exc
    except (RuntimeError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise AudioInputError(f"{label}: not a supported audio file: {exc}") from exc
    stack.callback(f.close)
    return f


def _probe(name: str, label: str, opener: Opener) -> TrackSource:
    """Open the track once to check it (channels, length) without decoding its audio."""
    with ExitStack() as stack:
        f = _open_sound(label, opener(stack), stack)
        channels, rate, frames = f.channels, f.samplerate, f.frames
    if channels > MAX_CHANNELS:
        raise AudioInputError(f"{label}: has {channels} channels; 1 or {MAX_CHANNELS} supported")
    if frames <= 0:
        raise AudioInputError(f"{label}: is empty")
    if frames / rate > MAX_TRACK_SECONDS:
        raise AudioInputError(
            f"{label}: claims {frames / rate / 3600:.0f} hours of audio; implausible for a "
            f"track (limit {MAX_TRACK_SECONDS / 3600:.0f} h)"
        )
    return TrackSource(name, label, rate, channels, frames, opener)


def open_track(path: str, name: str | None = None) -> TrackSource:
    """A single audio file as a streamable track (speaker ``name``, else from the file name)."""
    p = Path(path)
    if not p.exists():
        raise AudioInputError(f"{path}: not found")
    if p.is_dir():
        raise AudioInputError(f"{path}: not a supported audio file: it is a folder")
    return _probe(name or speaker_name_from_filename(p.name), path, lambda _stack: path)


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


def _read_int16(f: soundfile.SoundFile, frames: int = -1) -> npt.NDArray[np.int16]:
    """The next ``frames`` frames (all with -1) as int16 (frames, channels).

    Integer PCM (WAV/FLAC/AIFF at any bit depth) is scaled to 16 bits by libsndfile itself. Float
    data (float WAV, Vorbis, Opus, MP3) read as short comes back as zeros unless libsndfile's
    float scaling is switched on, so it is read as float32 and scaled here instead.
    """
    subtype = (f.subtype or "").upper()
    if subtype.startswith("PCM_") or subtype in _INTEGER_SUBTYPES:
        result: npt.NDArray[np.int16] = f.read(frames, dtype="int16", always_2d=True)
        return result
    return to_int16(f.read(frames, dtype="float32", always_2d=True))


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
    """Every speaker's track in a folder or a .zip (or a single audio file), decoded whole, as
    ``(speaker name, clip)``; see :func:`find_tracks` for the order and what is skipped."""
    return [(t.name, t.read()) for t in find_tracks(path)]


def find_tracks(path: str) -> list[TrackSource]:
    """Every speaker's track in a folder or a .zip (or a single audio file), probed but not
    decoded, sorted by file name (numbers compared as numbers); non-audio files are skipped."""
    p = Path(path)
    if not p.exists():
        raise AudioInputError(f"{path}: not found")
    tracks: list[TrackSource]
    if p.is_dir():
        files = sorted((f for f in p.iterdir() if f.is_file() and _is_track(f.name)),
                       key=lambda f: (_natural_key(f.name), f.name))
        tracks = [open_track(str(f)) for f in files]
    elif p.suffix.lower() == ".zip" or zipfile.is_zipfile(p):
        tracks = _tracks_from_zip(path)
    elif _is_track(p.name):
        return [open_track(path)]
    else:
        raise AudioInputError(f"{path}: not a folder, a .zip or an audio file")
    if not tracks:
        raise AudioInputError(f"{path}: no audio tracks found")
    return tracks


def _check_member(label: str, m: zipfile.ZipInfo) -> None:
    """Refuse, before reading it, a member no speaker's track could be."""
    if m.file_size > MAX_MEMBER_BYTES:
        raise AudioInputError(
            f"{label}: refused: {m.file_size / 1024**3:.1f} GiB uncompressed is implausible "
            f"for an audio track (limit {MAX_MEMBER_BYTES // 1024**3} GiB)"
        )
    if m.file_size >= _RATIO_FLOOR_BYTES and m.file_size > MAX_COMPRESSION_RATIO * max(
        m.compress_size, 1
    ):
        raise AudioInputError(
            f"{label}: refused: compressed {m.file_size / max(m.compress_size, 1):.0f}:1, "
            f"implausible for audio (limit {MAX_COMPRESSION_RATIO}:1)"
        )


class _MemberReader(io.RawIOBase):
    """A zip member as a seekable stream that decompresses forward only.

    libsndfile seeks a lot (to the end for the length, back a little after reading ahead);
    ``ZipExtFile`` answers every backward seek by decompressing again from the start, which
    makes reading a long track quadratic. Here a seek only moves a position; reads go forward
    through the member, and the last :attr:`KEEP` bytes stay at hand for short steps back.
    Memory stays at that window whatever the member's size.
    """

    KEEP = 1 << 20

    def __init__(self, raw: IO[bytes], size: int) -> None:
        super().__init__()
        self._raw, self._size = raw, size
        self._pos = 0
        self._buf = bytearray()  # member bytes [_buf_start, _buf_start + len(_buf))
        self._buf_start = 0
        self.rewinds = 0  # backward steps past the window (each decompresses from the start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def _fill_to(self, end: int) -> None:
        """Decompress forward until the window reaches ``end`` (or the member ends)."""
        have = self._buf_start + len(self._buf)
        while have < end:
            piece = self._raw.read(max(end - have, 64 * 1024))
            if not piece:
                break
            self._buf += piece
            have += len(piece)
            if len(self._buf) > 2 * self.KEEP:
                drop = len(self._buf) - self.KEEP
                del self._buf[:drop]
                self._buf_start += drop

    def readinto(self, b: Any) -> int:
        want = len(b)
        if want == 0 or self._pos >= self._size:
            return 0
        if self._pos < self._buf_start:  # far back: start over (rare)
            self.rewinds += 1
            self._raw.seek(0)
            self._buf, self._buf_start = bytearray(), 0
        if self._pos > self._buf_start + len(self._buf) + self.KEEP:
            # Far ahead: skip forward without keeping what lies between.
            self._buf_start += len(self._buf)
            self._buf = bytearray()
            while self._buf_start < self._pos:
                skipped = self._raw.read(min(self._pos - self._buf_start, 1 << 20))
                if not skipped:
                    break
                self._buf_start += len(skipped)
        self._fill_to(self._pos + want)
        lo = self._pos - self._buf_start
        chunk = self._buf[lo:lo + want]
        b[:len(chunk)] = chunk
        self._pos += len(chunk)
        return len(chunk)


def _member_opener(path: str, label: str, member: zipfile.ZipInfo) -> Opener:
    def opener(stack: ExitStack) -> IO[bytes]:
        try:
            zf = stack.enter_context(zipfile.ZipFile(path))
            raw = stack.enter_context(zf.open(member))
            return io.BufferedReader(_MemberReader(raw, member.file_size), 64 * 1024)
        except (zipfile.BadZipFile, OSError, NotImplementedError, KeyError) as exc:
            raise AudioInputError(f"{label}: cannot extract: {exc}") from exc

    return opener


def _tracks_from_zip(path: str) -> list[TrackSource]:
    try:
        with zipfile.ZipFile(path) as zf:
            members = sorted(
                (m for m in zf.infolist() if not m.is_dir() and _is_track(m.filename)),
                key=lambda m: (_natural_key(m.filename), m.filename),
            )
    except zipfile.BadZipFile as exc:
        raise AudioInputError(f"{path}: not a valid zip file: {exc}") from exc
    tracks = []
    for m in members:
        label = f"{path}:{m.filename}"
        _check_member(label, m)
        if m.file_size == 0:
            raise AudioInputError(f"{label}: is empty")
        name = speaker_name_from_filename(m.filename)
        tracks.append(_probe(name, label, _member_opener(path, label, m)))
    return tracks

"""The transcript model: words, segments and a meeting's minutes, as frozen values.

Boundary: pure data. Everything downstream (minutes writers, Discord formatting, storage)
consumes these types; nothing here does I/O or reads a clock. Times inside a meeting are
float seconds from the meeting start; wall-clock times are aware ``datetime`` in UTC.
Values are validated on construction so a bad timestamp fails where it is made, not when
an SRT file is written an hour later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

from bot.errors import CantobotError


class TranscriptError(CantobotError, ValueError):
    """A transcript value is invalid (our bug or a bad STT payload, never the user's)."""

    permanent = True


def _check_span(kind: str, start: float, end: float) -> None:
    if not (math.isfinite(start) and math.isfinite(end)):
        raise TranscriptError(f"{kind} times must be finite, got start={start} end={end}")
    if start < 0:
        raise TranscriptError(f"{kind} start must be >= 0 seconds, got {start}")
    if end < start:
        raise TranscriptError(f"{kind} ends before it starts: start={start} end={end}")


@dataclass(frozen=True, slots=True)
class Word:
    """One recognised word (or character, for Cantonese) with its time span."""

    text: str
    start: float  # seconds from the meeting start
    end: float

    def __post_init__(self) -> None:
        _check_span("word", self.start, self.end)


@dataclass(frozen=True, slots=True)
class Segment:
    """One committed line of speech by one speaker."""

    speaker: str
    text: str
    start: float  # seconds from the meeting start
    end: float
    words: tuple[Word, ...] = ()
    speaker_id: int | None = None  # Discord user id when known

    def __post_init__(self) -> None:
        _check_span("segment", self.start, self.end)
        if not isinstance(self.words, tuple):
            # Lists would make the frozen value hashable-in-name-only; accept and freeze them.
            object.__setattr__(self, "words", tuple(self.words))
        for w in self.words:
            if not isinstance(w, Word):
                raise TranscriptError(f"segment words must be Word values, got {w!r}")

    @property
    def duration(self) -> float:
        return self.end - self.start


SpeakerKey = tuple[str, int | str]


def speaker_key(segment: Segment) -> SpeakerKey:
    """Who spoke a segment: the user id when known, else the name."""
    if segment.speaker_id is not None:
        return ("id", segment.speaker_id)
    return ("name", segment.speaker)


def speaker_labels(segments: Iterable[Segment]) -> dict[SpeakerKey, str]:
    """One distinct shown name per speaker (see :meth:`Minutes.labelled`)."""
    ordered = sorted(segments, key=lambda s: s.start)
    first_name: dict[SpeakerKey, str] = {}
    for s in ordered:
        first_name.setdefault(speaker_key(s), s.speaker)
    # Names kept as they are first (so a stored "alice (2)" never takes another's place).
    by_name: dict[str, list[SpeakerKey]] = {}
    for key, name in first_name.items():
        by_name.setdefault(name.casefold(), []).append(key)
    labels: dict[SpeakerKey, str] = {}
    taken: set[str] = set()
    for keys in by_name.values():
        labels[keys[0]] = first_name[keys[0]]
        taken.add(first_name[keys[0]].casefold())
    for keys in by_name.values():
        for key in keys[1:]:
            name, n = first_name[key], 2
            while f"{name} ({n})".casefold() in taken:
                n += 1
            labels[key] = f"{name} ({n})"
            taken.add(labels[key].casefold())
    return labels


def _utc(name: str, value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise TranscriptError(f"{name} must be an aware datetime (UTC), got naive {value!r}")
    return value.astimezone(UTC)


@dataclass(frozen=True)
class Minutes:
    """A meeting's transcript: title, wall-clock bounds and its committed segments.

    ``started_at``/``ended_at`` are normalised to UTC. ``ended_at`` is ``None`` while the
    meeting runs (or if it crashed before ending).
    """

    title: str
    started_at: datetime
    ended_at: datetime | None
    segments: tuple[Segment, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "started_at", _utc("started_at", self.started_at))
        if self.ended_at is not None:
            ended = _utc("ended_at", self.ended_at)
            if ended < self.started_at:
                raise TranscriptError(
                    f"meeting ends before it starts: {self.started_at} > {ended}"
                )
            object.__setattr__(self, "ended_at", ended)
        if not isinstance(self.segments, tuple):
            object.__setattr__(self, "segments", tuple(self.segments))
        for s in self.segments:
            if not isinstance(s, Segment):
                raise TranscriptError(f"minutes segments must be Segment values, got {s!r}")

    @property
    def duration(self) -> float:
        """Seconds: wall-clock length if ended, else up to the last spoken word.

        When the meeting has ended, the longer of the two is used, so a segment committed
        just after ``ended_at`` (STT latency) never makes the duration look too short.
        """
        spoken = max((s.end for s in self.segments), default=0.0)
        if self.ended_at is None:
            return spoken
        return max((self.ended_at - self.started_at).total_seconds(), spoken)

    def labelled(self) -> Minutes:
        """A copy in which every speaker, keyed by user id (by name when the id is unknown),
        has one name of their own: the first name they spoke under, and two people of the same
        name are told apart as ``alice``, ``alice (2)`` in order of first speech. Idempotent."""
        labels = speaker_labels(self.segments)
        return self.with_segments(
            replace(s, speaker=labels[speaker_key(s)]) for s in self.segments)

    @property
    def participants(self) -> tuple[str, ...]:
        """Speaker names (one per person, see :meth:`labelled`) in order of first speech."""
        seen: dict[str, None] = {}
        for s in self.labelled().sorted().segments:
            seen.setdefault(s.speaker, None)
        return tuple(seen)

    @property
    def lines_per_speaker(self) -> dict[str, int]:
        """Number of segments per speaker, in participant order."""
        counts = dict.fromkeys(self.participants, 0)
        for s in self.labelled().segments:
            counts[s.speaker] += 1
        return counts

    @property
    def talk_time_per_speaker(self) -> dict[str, float]:
        """Sum of segment durations per speaker in seconds (overlaps count for both)."""
        totals = dict.fromkeys(self.participants, 0.0)
        for s in self.labelled().segments:
            totals[s.speaker] += s.duration
        return totals

    def sorted(self) -> Minutes:
        """A copy with segments ordered by start time (stable: ties keep their order)."""
        return Minutes(
            self.title,
            self.started_at,
            self.ended_at,
            tuple(sorted(self.segments, key=lambda s: s.start)),
        )

    def with_segments(self, segments: Iterable[Segment]) -> Minutes:
        """A copy with ``segments`` replacing the current ones."""
        return Minutes(self.title, self.started_at, self.ended_at, tuple(segments))

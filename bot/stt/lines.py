"""Making transcript lines of one speaker's commits (pure): their meeting times and refs.

A commit with word timestamps is timed by its words (mapped from the upstream's clock to the
stream); one without is placed by voice detection over the unconfirmed audio
(:func:`~bot.stt.gate.voiced_span_in`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from bot.stt import protocol as p
from bot.stt.events import LineRef, SpeakerKey
from bot.stt.gate import Piece, voiced_span_in
from bot.stt.stats import SessionStats
from bot.transcript.model import Segment, Word


class LineMaker:
    """One speaker's segments and line refs, in meeting time (``stream_offset`` + stream)."""

    def __init__(self, *, speaker: str, key: SpeakerKey, speaker_id: int | None,
                 stream_offset: float, sample_rate: int, line_numbers: Iterator[int],
                 stats: SessionStats) -> None:
        self.speaker = speaker
        self.key = key
        self.speaker_id = speaker_id
        self.stream_offset = stream_offset
        self.sample_rate = sample_rate
        self._line_numbers = line_numbers
        self._stats = stats

    def seconds(self, sample: float) -> float:
        """Meeting time of a stream sample position."""
        return self.stream_offset + sample / self.sample_rate

    def new_ref(self) -> LineRef:
        """The ref of a new line (counted in ``stats.commits``)."""
        self._stats.commits += 1
        return LineRef(self.key, next(self._line_numbers))

    def estimated(self, text: str, pieces: Iterable[Piece], lo: int,
                  hi: int) -> tuple[Segment, int]:
        """Times of a commit without word timestamps: the voiced audio in stream [lo, hi).

        The unconfirmed buffer still holds that audio, so the first and last 20 ms frames above
        a speech threshold bound the sentence far better than "previous commit .. now" would
        (that would start every sentence at the end of the previous one, pauses included).
        Returns the segment and the boundary it confirms: the end of that speech (audio sent
        after it, when the sender runs ahead of the upstream, is not yet heard), else ``hi``.
        """
        boundary = hi
        span = voiced_span_in(pieces, lo, hi, self.sample_rate)
        if span is not None:
            lo, hi = span
            boundary = hi
        start = self.seconds(lo)
        return (Segment(self.speaker, text, start, max(start, self.seconds(hi)),
                        speaker_id=self.speaker_id), boundary)

    def timed(self, event: p.TimestampedTranscript,
              to_stream: Callable[[float], float]) -> tuple[Segment, int] | None:
        """A commit timed by its words (None if it has none), and the stream sample where its
        last word ends (the boundary it confirms)."""
        if not event.words:
            return None
        words = tuple(Word(w.text, self.seconds(to_stream(w.start)),
                           self.seconds(to_stream(w.end))) for w in event.words)
        segment = Segment(self.speaker, event.text, words[0].start,
                          max(w.end for w in words), words, self.speaker_id)
        return segment, round(to_stream(max(w.end for w in event.words)))

"""Speech, not silence (pure): which audio of one speaker is worth sending upstream.

:class:`SpeechGate` classifies 20 ms frames as speech or silence (RMS above :data:`VOICED_RMS`)
and keeps for sending only speech, the :data:`PRE_ROLL_S` before it and ``silence_tail_s`` after
it (what the upstream needs to hear of a pause before it commits); longer silence is skipped,
never sent nor re-sent. :func:`voiced_span` and :func:`voiced_span_in` place a commit without
word timestamps in time; :func:`first_voiced` finds where a re-send starts. Pieces are
``(stream sample, pcm)`` pairs of mono int16 LE audio, with gaps where silence was skipped.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import Final

import numpy as np

from bot.stt.stats import BYTES_PER_SAMPLE, SessionStats

#: RMS (int16 units, about -40 dBFS) above which a 20 ms frame counts as speech when a commit
#: without word timestamps has to be placed in time.
VOICED_RMS: Final = 330.0
#: A pause this long ends a sentence; voiced stretches shorter than MIN_VOICED_S are ignored.
SENTENCE_GAP_S: Final = 0.5
MIN_VOICED_S: Final = 0.25
#: Audio kept before the first speech frame: a word's onset is often below the RMS threshold
#: (a soft consonant), and a recogniser wants a little lead-in. 200 ms = ten 20 ms frames.
PRE_ROLL_S: Final = 0.2

Piece = tuple[int, bytes]


def loud_frames(audio: np.ndarray, frame: int) -> np.ndarray:
    """Per whole ``frame`` of mono int16 ``audio``: is its RMS above :data:`VOICED_RMS`?

    Compares the frame's energy (sum of squares, float32: its rounding is far below what
    could move a frame across the threshold) with the threshold's, which skips a mean and a
    square root per frame: this runs for every chunk sent and over seconds of audio per commit.
    """
    n = len(audio) // frame
    blocks = audio[: n * frame].reshape(n, frame).astype(np.float32)
    energy: np.ndarray = np.einsum("ij,ij->i", blocks, blocks)
    return energy > VOICED_RMS * VOICED_RMS * frame


def voiced_span(audio: np.ndarray, sample_rate: int) -> tuple[int, int] | None:
    """The first stretch of speech in mono int16 ``audio``, as sample offsets: voiced 20 ms
    frames joined across pauses shorter than SENTENCE_GAP_S, ignoring blips shorter than
    MIN_VOICED_S (a click, the tail of the previous sentence)."""
    frame = max(1, sample_rate // 50)
    voiced = np.flatnonzero(loud_frames(audio, frame))
    if not len(voiced):
        return None
    # Runs of voiced frames: a pause longer than the gap (in frames) starts a new run.
    breaks = np.flatnonzero(np.diff(voiced) > round(SENTENCE_GAP_S * 50))
    firsts = voiced[np.concatenate(([0], breaks + 1))]
    lasts = voiced[np.concatenate((breaks, [len(voiced) - 1]))]
    long_enough = np.flatnonzero(lasts - firsts + 1 >= max(1, round(MIN_VOICED_S * 50)))
    if not len(long_enough):
        return None
    k = long_enough[0]
    return int(firsts[k]) * frame, (int(lasts[k]) + 1) * frame


def voiced_span_in(pieces: Iterable[Piece], lo: int, hi: int,
                   sample_rate: int) -> tuple[int, int] | None:
    """:func:`voiced_span` of the pieces' audio in stream samples [lo, hi).

    Gaps (skipped silence) are read as a pause just long enough to end a sentence, and
    positions are mapped back to stream samples.
    """
    frame = max(1, sample_rate // 50)
    parts: list[bytes | memoryview] = []
    # Where the joined audio jumps in stream time: (offset in the joined audio, stream sample);
    # between jumps it runs on one sample per sample.
    runs: list[tuple[int, int]] = []
    joined = 0
    gap = round((SENTENCE_GAP_S + 0.04) * sample_rate)
    prev_end: int | None = None
    for start, pcm in pieces:
        end = start + len(pcm) // BYTES_PER_SAMPLE
        if end <= lo or start >= hi:
            continue
        a, b = max(lo, start), min(hi, end)
        if prev_end is None or a > prev_end:
            # Silence (at most a sentence gap) so that the joined audio keeps the stream's
            # 20 ms frame grid: a speech onset is found where it is, not up to 19 ms early.
            silence = 0 if prev_end is None else min(a - prev_end, gap)
            silence += (a - (joined + silence)) % frame
            parts.append(bytes(silence * BYTES_PER_SAMPLE))
            joined += silence
            runs.append((joined, a))
        parts.append(memoryview(pcm)[(a - start) * BYTES_PER_SAMPLE:(b - start) * BYTES_PER_SAMPLE])
        joined += b - a
        prev_end = b
    if not parts:
        return None
    span = voiced_span(np.frombuffer(b"".join(parts), dtype="<i2"), sample_rate)
    if span is None:
        return None

    def to_stream(i: int) -> int:
        offset, stream = runs[0]
        for o, s in runs:
            if o > i:
                break
            offset, stream = o, s
        return stream + (i - offset)

    return to_stream(span[0]), to_stream(span[1] - 1) + 1


def first_voiced(pieces: Iterable[Piece], lo: int, sample_rate: int) -> int | None:
    """Stream sample of the first speech frame at or after ``lo`` in the pieces."""
    frame = max(1, sample_rate // 50)
    for start, pcm in pieces:
        audio = np.frombuffer(pcm, dtype="<i2")
        skip = max(0, lo - start)
        audio = audio[skip:]
        loud = np.flatnonzero(loud_frames(audio, frame))
        if len(loud):
            return start + skip + int(loud[0]) * frame
    return None


class SpeechGate:
    """Keeps speech, its pre-roll and its silence tail; holds silence for a possible pre-roll.

    ``silence_tail_s=None`` keeps every sample. Counts speech and skipped silence in ``stats``.
    """

    def __init__(self, sample_rate: int, silence_tail_s: float | None,
                 stats: SessionStats) -> None:
        self.sample_rate = sample_rate
        self.tail_samples = (None if silence_tail_s is None
                             else max(0, round(silence_tail_s * sample_rate)))
        self.pre_roll_samples = round(PRE_ROLL_S * sample_rate)
        self.frame = max(1, sample_rate // 50)
        self.stats = stats
        self._pending: deque[Piece] = deque()  # silence held for a pre-roll
        self._pending_samples = 0
        self.tail_left = 0  # tail samples still to keep after the last speech
        self.last_voiced_end = 0  # stream sample after the last speech frame

    def feed(self, at: int, pcm: bytes) -> list[Piece]:
        """The pieces of ``pcm`` (starting at stream sample ``at``) to keep for sending.

        Each run kept of one feed is one piece (with its pre-roll), so the chunks sent are
        never larger than the chunks given.
        """
        tail = self.tail_samples
        if tail is None:
            return [(at, bytes(pcm))]
        audio = np.frombuffer(pcm, dtype="<i2")
        frame, n = self.frame, len(audio)
        whole = n // frame * frame
        loud = loud_frames(audio, frame).tolist()
        if whole < n:  # a ragged last piece (the end of a track) is classified on its own
            loud.extend(loud_frames(audio[whole:], n - whole).tolist())
        if not any(loud) and self.tail_left <= 0:  # silence, the common case: one step
            self._hold(at, bytes(pcm))
            return []
        out: list[Piece] = []
        run: int | None = None  # start (offset in pcm) of the run being kept
        lead: Piece = (0, b"")  # pre-roll of that run (held silence of earlier feeds)
        for i, voiced in enumerate(loud):
            s = i * frame
            e = min(n, s + frame)
            if voiced:
                self.stats.speech_seconds += (e - s) / self.sample_rate
                if run is None:
                    run = s
                    if self._pending:
                        lead = self._take_pending()
                self.tail_left = tail
                self.last_voiced_end = at + e
            elif self.tail_left > 0:
                if run is None:
                    run = s
                self.tail_left -= e - s
            else:
                if run is not None:
                    out.append(_run(at, run, s, pcm, lead))
                    run, lead = None, (0, b"")
                self._hold(at + s, bytes(pcm[s * 2: e * 2]))
        if run is not None:
            out.append(_run(at, run, n, pcm, lead))
        return out

    def commit_heard(self, send_pos: int) -> bool:
        """A commit came: True if the rest of the silence tail is to go unsent (all speech
        went out, so the upstream heard the pause it needed; ``silence_tail_s`` is only its
        maximum)."""
        if self.tail_samples is None or self.tail_left <= 0 or send_pos < self.last_voiced_end:
            return False
        self.tail_left = 0
        return True

    def resend_from(self, pieces: Sequence[Piece], buf_start: int) -> int:
        """Where a re-send of the unconfirmed ``pieces`` starts: the pre-roll before their first
        speech (not the silent tail of a sentence already committed)."""
        if self.tail_samples is None or not pieces:
            return buf_start
        span = first_voiced(pieces, pieces[0][0], self.sample_rate)
        if span is None:
            # Only the silent tail of committed speech is left: nothing worth re-sending.
            last_start, last = pieces[-1]
            return max(buf_start, last_start + len(last) // BYTES_PER_SAMPLE)
        return max(buf_start, span - self.pre_roll_samples)

    def speech_samples(self, pieces: Sequence[Piece], buf_start: int, appended: int) -> int:
        """Samples of ``pieces`` from their first speech (less the pre-roll) to their last:
        silence around it is no loss."""
        start = self.resend_from(pieces, buf_start)
        end = appended if self.tail_samples is None else self.last_voiced_end
        return sum(max(0, min(end, s + len(pcm) // BYTES_PER_SAMPLE) - max(start, s))
                   for s, pcm in pieces)

    def clear(self) -> None:
        """Forget held silence and the tail (an opt-out)."""
        self._pending.clear()
        self._pending_samples = 0
        self.tail_left = 0

    def _hold(self, start: int, pcm: bytes) -> None:
        """Keep the last PRE_ROLL_S of silence (a pre-roll if speech follows); older is
        skipped, never sent."""
        self._pending.append((start, pcm))
        self._pending_samples += len(pcm) // BYTES_PER_SAMPLE
        while self._pending and self._pending_samples > self.pre_roll_samples:
            excess = self._pending_samples - self.pre_roll_samples
            first_start, first = self._pending[0]
            n = len(first) // BYTES_PER_SAMPLE
            cut = min(n, excess)
            if cut == n:
                self._pending.popleft()
            else:
                self._pending[0] = (first_start + cut, first[cut * BYTES_PER_SAMPLE:])
            self._pending_samples -= cut
            self.stats.skipped_seconds += cut / self.sample_rate

    def _take_pending(self) -> Piece:
        """Speech starts: the held silence just before it becomes its pre-roll."""
        start = self._pending[0][0] if self._pending else 0
        pcm = b"".join(piece for _, piece in self._pending)
        self._pending.clear()
        self._pending_samples = 0
        return start, pcm


def _run(at: int, s: int, e: int, pcm: bytes, lead: Piece) -> Piece:
    """Samples [s, e) of ``pcm`` (at stream sample ``at``), after their pre-roll if any."""
    body = bytes(pcm[s * BYTES_PER_SAMPLE: e * BYTES_PER_SAMPLE])
    if lead[1]:
        return lead[0], lead[1] + body  # the pre-roll ends where the run starts
    return at + s, body

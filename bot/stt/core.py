"""The STT session's logic without its socket (pure, in the manner of h11's ``Connection``).

:class:`SttCore` holds one speaker's audio and transcript bookkeeping; the adapter
(:mod:`bot.stt.session`) feeds it bytes and server messages and acts on what it returns:

* audio in: :meth:`SttCore.append` (never blocks; bounded by ``max_buffer_seconds``, the oldest
  dropped first and counted in ``stats.dropped_seconds``);
* audio out: :meth:`SttCore.next_chunk` is the next piece to emit at the send cursor,
  :meth:`SttCore.sent` moves the cursor once it went out;
* a new upstream session: :meth:`SttCore.restart` puts the cursor back at the start of the
  unconfirmed audio, the *re-send origin*, so nothing said is lost or doubled;
* messages in, events out: :meth:`SttCore.receive` parses one ``transcript-message`` payload
  and returns the :mod:`bot.stt.events` to hand on.

Unconfirmed audio is the PCM since the last commit boundary (the committed segment's last word
end when word timestamps say so, else the send position when the commit arrived). Twins: the
server sends each sentence twice, plain and with word timestamps (either may come first, and
either may be missing). The first form makes the line and gets its :class:`LineRef`; the other,
paired with it by this session (the server gives the two forms nothing else in common), amends
that ref. Owners never pair anything themselves. A commit without word timestamps is placed in
time by voice detection over the unconfirmed audio (:func:`voiced_span`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import numpy as np

from bot.stt import protocol as p
from bot.stt.events import (
    LineRef,
    PartialText,
    SegmentCommitted,
    SegmentTimestamped,
    SpeakerKey,
    SttEvent,
)
from bot.transcript.model import Segment, Word

log = logging.getLogger(__name__)

#: Bytes per 16-bit mono sample (the reference: "16-bit PCM", mono recommended).
BYTES_PER_SAMPLE: Final = 2
#: Largest audio-chunk we emit: 64 KiB of PCM (2 s at 16 kHz) stays far below python-engineio's
#: default 1 MB message limit even after base64; re-sent audio is split to this size.
MAX_CHUNK_BYTES: Final = 64 * 1024
#: Commits awaiting their timestamped twin (or twins awaiting a plain form) kept per session; a
#: server that sends only one form would otherwise grow the lists forever.
MAX_UNMATCHED: Final = 64
#: RMS (int16 units, about -40 dBFS) above which a 20 ms frame counts as speech when a commit
#: without word timestamps has to be placed in time.
VOICED_RMS: Final = 330.0
#: A pause this long ends a sentence; voiced stretches shorter than MIN_VOICED_S are ignored.
SENTENCE_GAP_S: Final = 0.5
MIN_VOICED_S: Final = 0.25


@dataclass
class SessionStats:
    chunks_sent: int = 0
    bytes_sent: int = 0
    #: Seconds of audio dropped from the unconfirmed buffer by ``max_buffer_seconds``.
    dropped_seconds: float = 0.0
    reconnects: int = 0
    #: Malformed server messages ignored (see :mod:`bot.stt.protocol`).
    protocol_errors: int = 0
    #: Lines committed (twins are not counted twice).
    commits: int = 0


def voiced_span(audio: np.ndarray, sample_rate: int) -> tuple[int, int] | None:
    """The first stretch of speech in mono int16 ``audio``, as sample offsets: voiced 20 ms
    frames joined across pauses shorter than SENTENCE_GAP_S, ignoring blips shorter than
    MIN_VOICED_S (a click, the tail of the previous sentence)."""
    frame = max(1, sample_rate // 50)
    n = len(audio) // frame
    if n == 0:
        return None
    frames = audio[: n * frame].astype(np.float32).reshape(n, frame)
    voiced = np.sqrt(np.mean(frames * frames, axis=1)) > VOICED_RMS
    gap = round(SENTENCE_GAP_S * 50)
    shortest = max(1, round(MIN_VOICED_S * 50))
    i = 0
    while i < n:
        if not voiced[i]:
            i += 1
            continue
        begin = end = i
        j = i
        while j < n and j - end <= gap:
            if voiced[j]:
                end = j
            j += 1
        if end - begin + 1 >= shortest:
            return begin * frame, (end + 1) * frame
        i = end + 1
    return None


class SttCore:
    """One speaker's audio buffer, send cursor and twin pairing; see the module docstring.

    Positions are stream samples: sample 0 is the first sample given to :meth:`append`.
    """

    def __init__(
        self,
        *,
        sample_rate: int,
        speaker: str,
        key: SpeakerKey,
        speaker_id: int | None = None,
        stream_offset: float = 0.0,
        max_buffer_seconds: float = 120.0,
        line_numbers: Iterator[int] | None = None,
    ) -> None:
        if sample_rate <= 0:
            raise ValueError(f"sample_rate must be positive, got {sample_rate}")
        if stream_offset < 0:
            raise ValueError(f"stream_offset must be >= 0, got {stream_offset}")
        self.sample_rate = sample_rate
        self.speaker = speaker
        self.key = key
        self.speaker_id = speaker_id
        self.stream_offset = stream_offset
        self.max_buffer_samples = max(1, round(max_buffer_seconds * sample_rate))
        self.stats = SessionStats()
        self._buffer: deque[tuple[int, bytes]] = deque()  # (start sample, pcm), unconfirmed
        self.buf_start = 0  # first unconfirmed sample
        self.appended = 0  # samples given to append
        self.send_pos = 0  # next sample to send
        #: Stream sample where the current upstream session's audio (and its clock) starts.
        self.origin = 0
        self._last_commit_end = 0  # stream sample of the previous commit boundary
        self._dropped_logged = False
        #: Sequence numbers of new lines; an owner running several sessions of one speaker (a
        #: new stream after each pause) shares one counter so that refs never repeat.
        self._line_numbers = line_numbers if line_numbers is not None else itertools.count(1)
        self._unmatched: deque[tuple[str, LineRef]] = deque(maxlen=MAX_UNMATCHED)  # plain
        self._early_twins: deque[str] = deque(maxlen=MAX_UNMATCHED)  # timestamped came first
        # send position when a plain commit came; confirmed unless its timestamped twin follows
        self._deferred_boundary: int | None = None

    # -- audio -----------------------------------------------------------------------------------

    @property
    def unconfirmed_samples(self) -> int:
        return self.appended - self.buf_start

    @property
    def unsent_samples(self) -> int:
        return self.appended - self.send_pos

    def append(self, pcm: bytes) -> None:
        """Queue mono int16 LE PCM (an even byte count; the adapter checks)."""
        if not pcm:
            return
        self._buffer.append((self.appended, bytes(pcm)))
        self.appended += len(pcm) // BYTES_PER_SAMPLE
        self._enforce_bound()

    def next_chunk(self) -> tuple[int, bytes] | None:
        """The next unsent piece of audio at the send cursor, at most MAX_CHUNK_BYTES."""
        # Scan from the newest piece: the unsent tail is short while the unconfirmed head can
        # hold minutes of audio (a scan from the left cost O(buffer) per chunk sent).
        found: tuple[int, bytes] | None = None
        for start, pcm in reversed(self._buffer):
            if start + len(pcm) // BYTES_PER_SAMPLE <= self.send_pos:
                break
            found = (start, pcm)
        if found is None:
            return None
        start, pcm = found
        offset = (self.send_pos - start) * BYTES_PER_SAMPLE
        return self.send_pos, pcm[offset : offset + MAX_CHUNK_BYTES]

    def sent(self, start: int, nbytes: int) -> bool:
        """The chunk at ``start`` went out; False if the cursor moved meanwhile (a restart)."""
        if self.send_pos != start:
            return False
        self.send_pos = start + nbytes // BYTES_PER_SAMPLE
        self.stats.chunks_sent += 1
        self.stats.bytes_sent += nbytes
        return True

    def restart(self) -> None:
        """A new upstream session: re-send the unconfirmed audio; its clock starts there."""
        self.origin = self.send_pos = self.buf_start
        self._unmatched.clear()
        self._early_twins.clear()

    def connection_lost(self) -> None:
        """No twin can come any more on this connection: confirm a waiting plain commit."""
        self._settle_deferred()

    def _enforce_bound(self) -> None:
        excess = (self.appended - self.buf_start) - self.max_buffer_samples
        if excess <= 0:
            return
        self._trim_to(self.buf_start + excess)
        self.stats.dropped_seconds += excess / self.sample_rate
        skipped = self.buf_start - self.send_pos
        if skipped > 0:
            # Never-sent audio was dropped: the upstream hears a gap-free stream, so its clock
            # runs behind ours by the skipped samples from now on.
            self.send_pos = self.buf_start
            self.origin += skipped
        if not self._dropped_logged:
            self._dropped_logged = True
            log.warning(
                "stt[%s] unconfirmed audio exceeds %.0f s: dropping the oldest (logged once)",
                self.speaker,
                self.max_buffer_samples / self.sample_rate,
            )

    def _trim_to(self, sample: int) -> None:
        """Forget audio before stream ``sample`` (it is confirmed, or dropped)."""
        while self._buffer:
            start, pcm = self._buffer[0]
            end = start + len(pcm) // BYTES_PER_SAMPLE
            if end <= sample:
                self._buffer.popleft()
            elif start < sample:
                self._buffer[0] = (sample, pcm[(sample - start) * BYTES_PER_SAMPLE :])
                break
            else:
                break
        self.buf_start = max(self.buf_start, min(sample, self.appended))

    # -- transcripts -----------------------------------------------------------------------------

    def receive(self, payload: object) -> tuple[list[SttEvent], str | None]:
        """One ``transcript-message`` payload: (events to hand on, a new upstream session id).

        A malformed message is counted, logged and ignored.
        """
        try:
            event = p.parse_transcript_message(payload)
        except p.ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("stt[%s] ignored a malformed transcript message: %s", self.speaker, exc)
            return [], None
        if not isinstance(event, p.TimestampedTranscript):
            self._settle_deferred()  # the message after a plain commit was not its twin
        if isinstance(event, p.SessionStarted):
            return [], event.session_id
        if isinstance(event, p.PartialTranscript):
            return [PartialText(self.speaker, event.text, self.key)], None
        if isinstance(event, p.CommittedTranscript):
            return self._on_plain_commit(event.text), None
        if isinstance(event, p.TimestampedTranscript):
            return [self._on_timestamped_commit(event)], None
        return [], None

    def _seconds(self, sample: float) -> float:
        """Meeting time of a stream sample position."""
        return self.stream_offset + sample / self.sample_rate

    def _new_ref(self) -> LineRef:
        self.stats.commits += 1
        return LineRef(self.key, next(self._line_numbers))

    def _estimated_segment(self, text: str) -> Segment:
        """Times of a commit without word timestamps: the voiced audio since the last commit.

        The unconfirmed buffer still holds that audio, so the first and last 20 ms frames above
        a speech threshold bound the sentence far better than "previous commit .. now" would
        (that would start every sentence at the end of the previous one, pauses included).
        """
        lo, hi = self._last_commit_end, self.send_pos
        span = self._voiced_span(lo, hi)
        if span is not None:
            lo, hi = span
        start = self._seconds(lo)
        return Segment(self.speaker, text, start, max(start, self._seconds(hi)),
                       speaker_id=self.speaker_id)

    def _voiced_span(self, lo: int, hi: int) -> tuple[int, int] | None:
        """:func:`voiced_span` of the buffered audio in stream samples [lo, hi)."""
        pieces = [
            (start, pcm) for start, pcm in self._buffer
            if start < hi and start + len(pcm) // BYTES_PER_SAMPLE > lo
        ]
        if not pieces:
            return None
        first = max(lo, pieces[0][0])
        audio = np.frombuffer(b"".join(pcm for _, pcm in pieces), dtype="<i2")
        span = voiced_span(audio[first - pieces[0][0]: hi - pieces[0][0]], self.sample_rate)
        if span is None:
            return None
        return first + span[0], first + span[1]

    def _settle_deferred(self) -> None:
        if self._deferred_boundary is not None:
            self._confirm(self._deferred_boundary)
            self._deferred_boundary = None

    def _confirm(self, boundary: int) -> None:
        boundary = min(boundary, self.send_pos)
        self._last_commit_end = max(self._last_commit_end, boundary)
        self._trim_to(boundary)

    def _on_plain_commit(self, text: str) -> list[SttEvent]:
        if text in self._early_twins:
            self._early_twins.remove(text)  # the timestamped twin already made this line
            return []
        segment = self._estimated_segment(text)
        ref = self._new_ref()
        self._unmatched.append((text, ref))
        # A timestamped twin, if one comes, is the next message and gives a precise boundary.
        self._deferred_boundary = self.send_pos
        return [SegmentCommitted(segment, ref)]

    def _twin_of(self, text: str) -> LineRef | None:
        """The oldest plain commit of this sentence still waiting for its timestamped twin."""
        for i, (waiting, ref) in enumerate(self._unmatched):
            if waiting == text:
                del self._unmatched[i]
                return ref
        return None

    def _on_timestamped_commit(self, event: p.TimestampedTranscript) -> SttEvent:
        base = self.stream_offset + self.origin / self.sample_rate
        words = tuple(Word(w.text, base + w.start, base + w.end) for w in event.words)
        if words:
            segment = Segment(self.speaker, event.text, words[0].start,
                              max(w.end for w in words), words, self.speaker_id)
            boundary = self.origin + round(max(w.end for w in event.words) * self.sample_rate)
        else:
            segment = self._estimated_segment(event.text)
            boundary = self.send_pos
        ref = self._twin_of(event.text)
        if ref is not None:
            self._deferred_boundary = None
            self._confirm(boundary)
            return SegmentTimestamped(segment, ref)
        self._settle_deferred()  # a twin of some other sentence: that plain commit had none
        self._early_twins.append(event.text)
        self._confirm(boundary)
        return SegmentCommitted(segment, self._new_ref())

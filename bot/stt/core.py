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
that ref (:class:`~bot.stt.twins.Twins`). Owners never pair anything themselves. A commit
without word timestamps is placed in time by voice detection over the unconfirmed audio
(:func:`~bot.stt.gate.voiced_span`).

Speech, not silence (``silence_tail_s``; ``None`` sends everything): :meth:`SttCore.append`
classifies 20 ms frames as speech or silence and keeps for sending only speech, the
:data:`PRE_ROLL_S` before it and ``silence_tail_s`` after it (what the upstream needs to hear of
a pause before it commits); longer silence never enters the buffer, so it is neither sent nor
re-sent (:class:`~bot.stt.gate.SpeechGate`). The buffer (:class:`~bot.stt.buffer.PcmBuffer`)
therefore has gaps; the upstream hears the kept pieces back to back, and
:meth:`SttCore.upstream_to_stream` maps its clock (seconds of audio sent in this upstream session)
back to stream samples through the list of pieces sent (:class:`~bot.stt.clock.UpstreamClock`),
so every line keeps its meeting time.
A new upstream session re-sends the unconfirmed audio from its first speech (less the pre-roll):
the tail of an already committed sentence is not re-sent.

Upstream errors (``{"message_type": "error", "error": CODE}``) are returned as
:class:`UpstreamError`; the adapter decides what each code means (see :data:`PERMANENT_ERRORS`).
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Iterator
from typing import Final

from bot.stt import protocol as p
from bot.stt.buffer import PcmBuffer
from bot.stt.clock import UpstreamClock
from bot.stt.events import (
    PartialText,
    SegmentCommitted,
    SegmentTimestamped,
    SpeakerKey,
    SttEvent,
)
from bot.stt.gate import (
    MIN_VOICED_S,
    PRE_ROLL_S,
    SENTENCE_GAP_S,
    VOICED_RMS,
    SpeechGate,
    voiced_span,
)
from bot.stt.lines import LineMaker
from bot.stt.stats import BYTES_PER_SAMPLE, SessionStats
from bot.stt.twins import MAX_UNMATCHED, Twins
from bot.stt.upstream import (
    CHUNK_ERRORS,
    INACTIVITY,
    PERMANENT_ERRORS,
    SESSION_LIMIT,
    UpstreamError,
    parse_error,
)
from bot.transcript.model import Segment

__all__ = [
    "BYTES_PER_SAMPLE", "CHUNK_ERRORS", "INACTIVITY", "MAX_CHUNK_BYTES", "MAX_UNMATCHED",
    "MIN_VOICED_S", "PERMANENT_ERRORS", "PRE_ROLL_S", "SENTENCE_GAP_S", "SESSION_LIMIT",
    "VOICED_RMS", "SessionStats", "SttCore", "UpstreamError", "voiced_span",
]

log = logging.getLogger(__name__)

#: Largest audio-chunk we emit: 64 KiB of PCM (2 s at 16 kHz) stays far below python-engineio's
#: default 1 MB message limit even after base64; re-sent audio is split to this size.
MAX_CHUNK_BYTES: Final = 64 * 1024

class SttCore:
    """One speaker's audio buffer, send cursor and commits; see the module docstring.

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
        silence_tail_s: float | None = None,
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
        self.stats = SessionStats(_rate=sample_rate)
        self._buf = PcmBuffer()  # unconfirmed audio, with gaps where silence was skipped
        #: Speech gating (see the module docstring); silence_tail_s None: every sample is sent.
        self.gate = SpeechGate(sample_rate, silence_tail_s, self.stats)
        self.clock = UpstreamClock(sample_rate)
        #: The last chunks sent (stream start, bytes): named in the log when the upstream
        #: rejects a chunk (chunk_size_exceeded, input_error).
        self.recent_chunks: deque[tuple[int, int]] = deque(maxlen=4)
        self.buf_start = 0  # first unconfirmed sample
        self.appended = 0  # samples given to append
        self.send_pos = 0  # next sample to send
        self._last_commit_end = 0  # stream sample of the previous commit boundary
        self._dropped_logged = False
        #: Line refs are numbered by ``line_numbers``: an owner running several sessions of one
        #: speaker (a new stream after each pause) shares one counter so that refs never repeat.
        self.lines = LineMaker(
            speaker=speaker, key=key, speaker_id=speaker_id, stream_offset=stream_offset,
            sample_rate=sample_rate, stats=self.stats,
            line_numbers=line_numbers if line_numbers is not None else itertools.count(1))
        self._twins = Twins()
        # send position when a plain commit came; confirmed unless its timestamped twin follows
        self._deferred_boundary: int | None = None
        self.upstream_error: UpstreamError | None = None

    @property
    def origin(self) -> int:
        """Stream sample where the current upstream session's audio (and its clock) starts."""
        return self.clock.origin

    # -- audio -----------------------------------------------------------------------------------

    @property
    def unconfirmed_samples(self) -> int:
        """Audio kept until a commit confirms it (skipped silence is not counted)."""
        return self._buf.samples

    @property
    def unsent_samples(self) -> int:
        """Buffered audio the cursor has not sent yet."""
        return self._buf.unsent(self.send_pos)

    def append(self, pcm: bytes) -> None:
        """Queue mono int16 LE PCM (an even byte count; the adapter checks)."""
        if not pcm:
            return
        n = len(pcm) // BYTES_PER_SAMPLE
        at = self.appended
        self.appended += n
        self.stats.seconds_in += n / self.sample_rate
        for start, piece in self.gate.feed(at, pcm):
            self._buf.push(start, piece)
        self._enforce_bound()

    def next_chunk(self) -> tuple[int, bytes] | None:
        """The next unsent piece of audio at the send cursor, at most MAX_CHUNK_BYTES.

        A cursor in a gap (skipped silence) moves on to the next piece kept.
        """
        found = self._buf.piece_at(self.send_pos)
        if found is None:
            return None
        start, pcm = found
        if start > self.send_pos:
            self.send_pos = start  # skip the gap: that silence is never sent
        offset = (self.send_pos - start) * BYTES_PER_SAMPLE
        return self.send_pos, pcm[offset : offset + MAX_CHUNK_BYTES]

    def sent(self, start: int, nbytes: int) -> bool:
        """The chunk at ``start`` went out; False if the cursor moved meanwhile (a restart)."""
        if self.send_pos != start:
            return False
        n = nbytes // BYTES_PER_SAMPLE
        self.clock.sent(start, n)
        self.send_pos = start + n
        self.stats.chunks_sent += 1
        self.stats.bytes_sent += nbytes
        self.recent_chunks.append((start, nbytes))
        return True

    def upstream_to_stream(self, seconds: float) -> float:
        """Stream sample (fractional) of a time on this upstream session's clock."""
        return self.clock.to_stream(seconds)

    def upstream_seconds(self) -> float:
        """Audio sent in this upstream session (its clock's extent)."""
        return self.clock.seconds()

    def discard(self) -> None:
        """Forget every queued sample (an opt-out): none of it is sent, now or on a re-send."""
        self._trim_to(self.appended)
        self.send_pos = self.appended
        self.gate.clear()  # the silence held for a pre-roll too

    def restart(self) -> None:
        """A new upstream session: re-send the unconfirmed audio from its first speech."""
        self.send_pos = self.gate.resend_from(self._buf.pieces, self.buf_start)
        self.clock.reset(self.send_pos)
        self._twins.clear()

    def unconfirmed_speech_seconds(self) -> float:
        """Unconfirmed audio from its first speech (less the pre-roll) to its last: silence
        around it is no loss."""
        return (self.gate.speech_samples(self._buf.pieces, self.buf_start, self.appended)
                / self.sample_rate)

    def connection_lost(self) -> None:
        """No twin can come any more on this connection: confirm a waiting plain commit."""
        self._settle_deferred()

    def _enforce_bound(self) -> None:
        excess = self._buf.samples - self.max_buffer_samples
        if excess <= 0:
            return
        for start, cut in self._buf.drop_oldest(excess):
            self.buf_start = start + cut
            self.stats.dropped_seconds += cut / self.sample_rate
        if self.send_pos < self.buf_start:
            # Never-sent audio was dropped: the upstream hears a gap-free stream, so its clock
            # runs behind ours by the skipped samples from now on.
            skipped = self.buf_start - self.send_pos
            self.send_pos = self.buf_start
            if not self.clock.started:
                self.clock.origin += skipped
        if not self._dropped_logged:
            self._dropped_logged = True
            log.warning(
                "stt[%s] unconfirmed audio exceeds %.0f s: dropping the oldest (logged once)",
                self.speaker,
                self.max_buffer_samples / self.sample_rate,
            )

    def _trim_to(self, sample: int) -> None:
        """Forget audio before stream ``sample`` (it is confirmed, or dropped)."""
        self._buf.trim_to(sample)
        self.buf_start = max(self.buf_start, min(sample, self.appended))

    def _commit_heard(self) -> None:
        """A commit after all speech went out: the rest of the silence tail is not sent."""
        if self.gate.commit_heard(self.send_pos):
            for n in self._buf.cut_after(self.send_pos):
                self.stats.skipped_seconds += n / self.sample_rate

    # -- transcripts -----------------------------------------------------------------------------

    def receive(self, payload: object) -> tuple[list[SttEvent], str | None]:
        """One ``transcript-message`` payload: (events to hand on, a new upstream session id).

        A malformed message is counted, logged and ignored.
        """
        try:
            # Word times are bounded by the audio this upstream session was actually sent
            # (skipped silence is not on its clock), plus the protocol's margin.
            event = p.parse_transcript_message(payload, audio_seconds=self.upstream_seconds())
        except p.ProtocolError as exc:
            self.stats.protocol_errors += 1
            log.warning("stt[%s] ignored a malformed transcript message: %s", self.speaker, exc)
            return [], None
        if event is None and isinstance(payload, dict) and payload.get("message_type") == "error":
            self._settle_deferred()
            self._on_upstream_error(payload)
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

    def _on_upstream_error(self, payload: dict[object, object]) -> None:
        error = self.upstream_error = parse_error(payload)
        self.stats.upstream_errors[error.code] = self.stats.upstream_errors.get(error.code, 0) + 1

    def take_error(self) -> UpstreamError | None:
        """The upstream error message received last, once (the adapter acts on it)."""
        error, self.upstream_error = self.upstream_error, None
        return error

    def _estimated(self, text: str) -> tuple[Segment, int]:
        """A commit without word timestamps: the speech since the last commit boundary."""
        return self.lines.estimated(text, self._buf.pieces, self._last_commit_end, self.send_pos)

    def _settle_deferred(self) -> None:
        if self._deferred_boundary is not None:
            self._confirm(self._deferred_boundary)
            self._deferred_boundary = None

    def _confirm(self, boundary: int) -> None:
        boundary = min(boundary, self.send_pos)
        self._last_commit_end = max(self._last_commit_end, boundary)
        self._trim_to(boundary)

    def _on_plain_commit(self, text: str) -> list[SttEvent]:
        if self._twins.plain_is_twin(text):
            return []  # the timestamped twin already made this line
        segment, boundary = self._estimated(text)
        self._commit_heard()
        ref = self.lines.new_ref()
        self._twins.plain_made(text, ref)
        # A timestamped twin, if one comes, is the next message and gives a precise boundary.
        self._deferred_boundary = boundary
        return [SegmentCommitted(segment, ref)]

    def _on_timestamped_commit(self, event: p.TimestampedTranscript) -> SttEvent:
        timed = self.lines.timed(event, self.upstream_to_stream)
        segment, boundary = timed if timed is not None else self._estimated(event.text)
        self._commit_heard()
        ref = self._twins.plain_of(event.text)
        if ref is not None:
            self._deferred_boundary = None
            self._confirm(boundary)
            return SegmentTimestamped(segment, ref)
        self._settle_deferred()  # a twin of some other sentence: that plain commit had none
        self._twins.timestamped_made(event.text)
        self._confirm(boundary)
        return SegmentCommitted(segment, self.lines.new_ref())

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

Speech, not silence (``silence_tail_s``; ``None`` sends everything): :meth:`SttCore.append`
classifies 20 ms frames as speech or silence and keeps for sending only speech, the
:data:`PRE_ROLL_S` before it and ``silence_tail_s`` after it (what the upstream needs to hear of
a pause before it commits); longer silence never enters the buffer, so it is neither sent nor
re-sent. The buffer therefore has gaps; the upstream hears the kept pieces back to back, and
:meth:`SttCore.upstream_to_stream` maps its clock (seconds of audio sent in this upstream session)
back to stream samples through the list of pieces sent, so every line keeps its meeting time.
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
from dataclasses import dataclass, field
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
#: Audio kept before the first speech frame: a word's onset is often below the RMS threshold
#: (a soft consonant), and a recogniser wants a little lead-in. 200 ms = ten 20 ms frames.
PRE_ROLL_S: Final = 0.2
#: Upstream error codes (ElevenLabs realtime, relayed by cantonese.ai) that no retry can fix:
#: the user must act (key, quota, terms). Each maps to what to do.
PERMANENT_ERRORS: Final[dict[str, str]] = {
    "auth_error": "cantonese.ai rejected the API key (auth_error): check stt.api_key, then "
                  "restart the bot",
    "quota_exceeded": "the cantonese.ai account has no quota left (quota_exceeded): add credit "
                      "or raise the plan at cantonese.ai, then /transcribe start again",
    "unaccepted_terms": "cantonese.ai's terms have not been accepted for this API key "
                        "(unaccepted_terms): accept them in the cantonese.ai dashboard, then "
                        "/transcribe start again",
}
#: The upstream ended the session after its maximum length: start a new one at once.
SESSION_LIMIT: Final = "session_time_limit_exceeded"
#: The upstream closed a session that heard too little: stay closed until speech resumes.
INACTIVITY: Final = "insufficient_audio_activity"
#: Codes that a bad chunk of ours causes: the chunk is logged.
CHUNK_ERRORS: Final = frozenset({"chunk_size_exceeded", "input_error"})


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
    #: Seconds of audio given to append, and of it classified as speech (20 ms frames).
    seconds_in: float = 0.0
    speech_seconds: float = 0.0
    #: Seconds of silence never sent (outside pre-roll and tail).
    skipped_seconds: float = 0.0
    #: Seconds of speech a stop gave up on (never silent: see SttSession.stop).
    lost_seconds: float = 0.0
    #: Upstream ``error`` messages by code.
    upstream_errors: dict[str, int] = field(default_factory=dict)

    @property
    def seconds_sent(self) -> float:
        """Audio sent upstream, re-sends included (what the upstream hears and may bill)."""
        return self.bytes_sent / BYTES_PER_SAMPLE / self._rate if self._rate else 0.0

    _rate: int = 0


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The upstream's ``{"message_type": "error", "error": CODE}``."""

    code: str
    message: str


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
        self._buffer: deque[tuple[int, bytes]] = deque()  # (start sample, pcm), unconfirmed
        self._buffered = 0  # samples in _buffer (it has gaps where silence was skipped)
        #: Speech gating (see the module docstring); None: every sample is sent.
        self.tail_samples = (None if silence_tail_s is None
                             else max(0, round(silence_tail_s * sample_rate)))
        self.pre_roll_samples = round(PRE_ROLL_S * sample_rate)
        self._frame = max(1, sample_rate // 50)
        self._pending: deque[tuple[int, bytes]] = deque()  # silence held for a pre-roll
        self._pending_samples = 0
        self._tail_left = 0
        self._last_voiced_end = 0  # stream sample after the last speech frame
        #: This upstream session's clock: (upstream sample, stream sample) where each run of
        #: contiguous audio sent starts, and the upstream samples sent so far.
        self._upmap: list[tuple[int, int]] = []
        self._up_sent = 0
        self._sent_end: int | None = None  # stream sample just after the last chunk sent
        #: The last chunks sent (stream start, bytes): named in the log when the upstream
        #: rejects a chunk (chunk_size_exceeded, input_error).
        self.recent_chunks: deque[tuple[int, int]] = deque(maxlen=4)
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
        self.upstream_error: UpstreamError | None = None

    # -- audio -----------------------------------------------------------------------------------

    @property
    def unconfirmed_samples(self) -> int:
        """Audio kept until a commit confirms it (skipped silence is not counted)."""
        return self._buffered

    @property
    def unsent_samples(self) -> int:
        """Buffered audio the cursor has not sent yet."""
        total = 0
        for start, pcm in reversed(self._buffer):
            end = start + len(pcm) // BYTES_PER_SAMPLE
            if end <= self.send_pos:
                break
            total += end - max(start, self.send_pos)
        return total

    def append(self, pcm: bytes) -> None:
        """Queue mono int16 LE PCM (an even byte count; the adapter checks)."""
        if not pcm:
            return
        n = len(pcm) // BYTES_PER_SAMPLE
        at = self.appended
        self.appended += n
        self.stats.seconds_in += n / self.sample_rate
        if self.tail_samples is None:
            self._push(at, bytes(pcm))
        else:
            self._gate(at, pcm)
        self._enforce_bound()

    def _gate(self, at: int, pcm: bytes) -> None:
        """Keep speech, its pre-roll and its tail; hold silence for a possible pre-roll.

        Each run kept of one append goes into the buffer as one piece (with its pre-roll), so
        the chunks sent are never larger than the chunks given.
        """
        audio = np.frombuffer(pcm, dtype="<i2")
        frame, n = self._frame, len(audio)
        tail = self.tail_samples or 0
        whole = n // frame * frame
        blocks = audio[:whole].astype(np.float32).reshape(-1, frame)
        loud = list(np.sqrt(np.mean(blocks * blocks, axis=1)) > VOICED_RMS)
        if whole < n:  # a ragged last piece (the end of a track) is classified on its own
            rest = audio[whole:].astype(np.float32)
            loud.append(bool(np.sqrt(np.mean(rest * rest)) > VOICED_RMS))
        if not any(loud) and self._tail_left <= 0:  # silence, the common case: one step
            self._hold(at, bytes(pcm))
            return
        run: int | None = None  # start (offset in pcm) of the run being kept
        lead = (0, b"")  # pre-roll of that run (held silence of earlier appends)
        for i, voiced in enumerate(loud):
            s = i * frame
            e = min(n, s + frame)
            if voiced:
                self.stats.speech_seconds += (e - s) / self.sample_rate
                if run is None:
                    run = s
                    if self._pending:
                        lead = self._take_pending()
                self._tail_left = tail
                self._last_voiced_end = at + e
            elif self._tail_left > 0:
                if run is None:
                    run = s
                self._tail_left -= e - s
            else:
                if run is not None:
                    self._push_run(at, run, s, pcm, lead)
                    run, lead = None, (0, b"")
                self._hold(at + s, bytes(pcm[s * 2: e * 2]))
        if run is not None:
            self._push_run(at, run, n, pcm, lead)

    def _push_run(self, at: int, s: int, e: int, pcm: bytes, lead: tuple[int, bytes]) -> None:
        body = bytes(pcm[s * BYTES_PER_SAMPLE: e * BYTES_PER_SAMPLE])
        if lead[1]:
            self._push(lead[0], lead[1] + body)  # the pre-roll ends where the run starts
        else:
            self._push(at + s, body)

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

    def _take_pending(self) -> tuple[int, bytes]:
        """Speech starts: the held silence just before it becomes its pre-roll."""
        start = self._pending[0][0] if self._pending else 0
        pcm = b"".join(piece for _, piece in self._pending)
        self._pending.clear()
        self._pending_samples = 0
        return start, pcm

    def _commit_heard(self) -> None:
        """A commit after all speech went out: the upstream heard the pause it needed, so
        the rest of the silence tail is not sent (``silence_tail_s`` is only its maximum)."""
        if self.tail_samples is None or self._tail_left <= 0:
            return
        if self.send_pos < self._last_voiced_end:
            return  # speech after the committed part is still on its way
        self._tail_left = 0
        while self._buffer:
            start, pcm = self._buffer[-1]
            n = len(pcm) // BYTES_PER_SAMPLE
            if start >= self.send_pos:
                self._buffer.pop()
                self._buffered -= n
                self.stats.skipped_seconds += n / self.sample_rate
            elif start + n > self.send_pos:
                keep = self.send_pos - start
                self._buffer[-1] = (start, pcm[: keep * BYTES_PER_SAMPLE])
                self._buffered -= n - keep
                self.stats.skipped_seconds += (n - keep) / self.sample_rate
                break
            else:
                break

    def _push(self, start: int, pcm: bytes) -> None:
        if pcm:
            self._buffer.append((start, pcm))
            self._buffered += len(pcm) // BYTES_PER_SAMPLE

    def next_chunk(self) -> tuple[int, bytes] | None:
        """The next unsent piece of audio at the send cursor, at most MAX_CHUNK_BYTES.

        A cursor in a gap (skipped silence) moves on to the next piece kept.
        """
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
        if start > self.send_pos:
            self.send_pos = start  # skip the gap: that silence is never sent
        offset = (self.send_pos - start) * BYTES_PER_SAMPLE
        return self.send_pos, pcm[offset : offset + MAX_CHUNK_BYTES]

    def sent(self, start: int, nbytes: int) -> bool:
        """The chunk at ``start`` went out; False if the cursor moved meanwhile (a restart)."""
        if self.send_pos != start:
            return False
        n = nbytes // BYTES_PER_SAMPLE
        if self._sent_end != start:
            self._upmap.append((self._up_sent, start))  # a new run on the upstream's clock
        self._up_sent += n
        self._sent_end = self.send_pos = start + n
        self.stats.chunks_sent += 1
        self.stats.bytes_sent += nbytes
        self.recent_chunks.append((start, nbytes))
        return True

    def upstream_to_stream(self, seconds: float) -> float:
        """Stream sample (fractional) of a time on this upstream session's clock."""
        t = seconds * self.sample_rate
        base_up, base_stream = 0, self.origin
        for up, stream in self._upmap:
            if up > t:
                break
            base_up, base_stream = up, stream
        return base_stream + (t - base_up)

    def upstream_seconds(self) -> float:
        """Audio sent in this upstream session (its clock's extent)."""
        return self._up_sent / self.sample_rate

    def discard(self) -> None:
        """Forget every queued sample (an opt-out): none of it is sent, now or on a re-send."""
        self._trim_to(self.appended)
        self.send_pos = self.appended
        self._pending.clear()  # the silence held for a pre-roll too
        self._pending_samples = 0
        self._tail_left = 0

    def restart(self) -> None:
        """A new upstream session: re-send the unconfirmed audio from its first speech."""
        self.origin = self.send_pos = self._resend_from()
        self._upmap = []
        self._up_sent = 0
        self._sent_end = None
        self._unmatched.clear()
        self._early_twins.clear()

    def _resend_from(self) -> int:
        """Where a re-send starts: the pre-roll before the first speech still unconfirmed."""
        if self.tail_samples is None or not self._buffer:
            return self.buf_start
        first = self._buffer[0][0]
        span = self._first_voiced(first)
        if span is None:
            # Only the silent tail of committed speech is left: nothing worth re-sending.
            end = self._buffer[-1][0] + len(self._buffer[-1][1]) // BYTES_PER_SAMPLE
            return max(self.buf_start, end)
        return max(self.buf_start, span - self.pre_roll_samples)

    def _first_voiced(self, lo: int) -> int | None:
        frame = self._frame
        for start, pcm in self._buffer:
            audio = np.frombuffer(pcm, dtype="<i2")
            skip = max(0, lo - start)
            audio = audio[skip:]
            k = len(audio) // frame
            if k:
                blocks = audio[: k * frame].astype(np.float32).reshape(k, frame)
                loud = np.flatnonzero(np.sqrt(np.mean(blocks * blocks, axis=1)) > VOICED_RMS)
                if len(loud):
                    return start + skip + int(loud[0]) * frame
        return None

    def unconfirmed_speech_seconds(self) -> float:
        """Unconfirmed audio from its first speech (less the pre-roll) to its last: silence
        around it is no loss."""
        if not self._buffer:
            return 0.0
        start = self._resend_from()
        end = self.appended if self.tail_samples is None else self._last_voiced_end
        kept = sum(max(0, min(end, s + len(pcm) // BYTES_PER_SAMPLE) - max(start, s))
                   for s, pcm in self._buffer)
        return kept / self.sample_rate

    def connection_lost(self) -> None:
        """No twin can come any more on this connection: confirm a waiting plain commit."""
        self._settle_deferred()

    def _enforce_bound(self) -> None:
        excess = self._buffered - self.max_buffer_samples
        if excess <= 0:
            return
        dropped_unsent = 0
        while excess > 0 and self._buffer:
            start, pcm = self._buffer[0]
            n = len(pcm) // BYTES_PER_SAMPLE
            cut = min(n, excess)
            unsent_from = max(start, self.send_pos)
            dropped_unsent += max(0, min(start + cut, start + n) - unsent_from)
            if cut == n:
                self._buffer.popleft()
            else:
                self._buffer[0] = (start + cut, pcm[cut * BYTES_PER_SAMPLE:])
            self._buffered -= cut
            excess -= cut
            self.buf_start = start + cut
            self.stats.dropped_seconds += cut / self.sample_rate
        if self.send_pos < self.buf_start:
            # Never-sent audio was dropped: the upstream hears a gap-free stream, so its clock
            # runs behind ours by the skipped samples from now on.
            skipped = self.buf_start - self.send_pos
            self.send_pos = self.buf_start
            if not self._upmap:
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
                self._buffered -= end - start
            elif start < sample:
                self._buffer[0] = (sample, pcm[(sample - start) * BYTES_PER_SAMPLE :])
                self._buffered -= sample - start
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
        code, message = payload.get("error"), payload.get("message")
        code = code[:64] if isinstance(code, str) and code else "unknown"
        message = message[: p.MAX_REASON_CHARS] if isinstance(message, str) else ""
        self.stats.upstream_errors[code] = self.stats.upstream_errors.get(code, 0) + 1
        self.upstream_error = UpstreamError(code, message)

    def take_error(self) -> UpstreamError | None:
        """The upstream error message received last, once (the adapter acts on it)."""
        error, self.upstream_error = self.upstream_error, None
        return error

    def _seconds(self, sample: float) -> float:
        """Meeting time of a stream sample position."""
        return self.stream_offset + sample / self.sample_rate

    def _new_ref(self) -> LineRef:
        self.stats.commits += 1
        return LineRef(self.key, next(self._line_numbers))

    def _estimated_segment(self, text: str) -> tuple[Segment, int]:
        """Times of a commit without word timestamps: the voiced audio since the last commit.

        The unconfirmed buffer still holds that audio, so the first and last 20 ms frames above
        a speech threshold bound the sentence far better than "previous commit .. now" would
        (that would start every sentence at the end of the previous one, pauses included).
        Returns the segment and the boundary it confirms: the end of that speech (audio sent
        after it, when the sender runs ahead of the upstream, is not yet heard), else the send
        position.
        """
        lo, hi = self._last_commit_end, self.send_pos
        boundary = hi
        span = self._voiced_span(lo, hi)
        if span is not None:
            lo, hi = span
            boundary = hi
        start = self._seconds(lo)
        return (Segment(self.speaker, text, start, max(start, self._seconds(hi)),
                        speaker_id=self.speaker_id), boundary)

    def _voiced_span(self, lo: int, hi: int) -> tuple[int, int] | None:
        """:func:`voiced_span` of the buffered audio in stream samples [lo, hi).

        Gaps (skipped silence) are read as a pause just long enough to end a sentence, and
        positions are mapped back to stream samples.
        """
        parts: list[np.ndarray] = []
        runs: list[tuple[int, int]] = []  # (offset in the joined audio, stream sample)
        joined = 0
        gap = round((SENTENCE_GAP_S + 0.04) * self.sample_rate)
        prev_end: int | None = None
        for start, pcm in self._buffer:
            end = start + len(pcm) // BYTES_PER_SAMPLE
            if end <= lo or start >= hi:
                continue
            a, b = max(lo, start), min(hi, end)
            if prev_end is None or a > prev_end:
                # Silence (at most a sentence gap) so that the joined audio keeps the stream's
                # 20 ms frame grid: a speech onset is found where it is, not up to 19 ms early.
                silence = 0 if prev_end is None else min(a - prev_end, gap)
                silence += (a - (joined + silence)) % self._frame
                parts.append(np.zeros(silence, dtype="<i2"))
                joined += silence
            runs.append((joined, a))
            piece = np.frombuffer(pcm, dtype="<i2")[a - start: b - start]
            parts.append(piece)
            joined += len(piece)
            prev_end = b
        if not parts:
            return None
        span = voiced_span(np.concatenate(parts), self.sample_rate)
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
        segment, boundary = self._estimated_segment(text)
        self._commit_heard()
        ref = self._new_ref()
        self._unmatched.append((text, ref))
        # A timestamped twin, if one comes, is the next message and gives a precise boundary.
        self._deferred_boundary = boundary
        return [SegmentCommitted(segment, ref)]

    def _twin_of(self, text: str) -> LineRef | None:
        """The oldest plain commit of this sentence still waiting for its timestamped twin."""
        for i, (waiting, ref) in enumerate(self._unmatched):
            if waiting == text:
                del self._unmatched[i]
                return ref
        return None

    def _on_timestamped_commit(self, event: p.TimestampedTranscript) -> SttEvent:
        at = self.upstream_to_stream
        words = tuple(Word(w.text, self._seconds(at(w.start)), self._seconds(at(w.end)))
                      for w in event.words)
        if words:
            segment = Segment(self.speaker, event.text, words[0].start,
                              max(w.end for w in words), words, self.speaker_id)
            boundary = round(at(max(w.end for w in event.words)))
        else:
            segment, boundary = self._estimated_segment(event.text)
        self._commit_heard()
        ref = self._twin_of(event.text)
        if ref is not None:
            self._deferred_boundary = None
            self._confirm(boundary)
            return SegmentTimestamped(segment, ref)
        self._settle_deferred()  # a twin of some other sentence: that plain commit had none
        self._early_twins.append(event.text)
        self._confirm(boundary)
        return SegmentCommitted(segment, self._new_ref())

"""The cantonese.ai real-time STT wire protocol: payload shapes, builders and parsers.

Contract: /work/shared/seed/cantonese-ai-realtime-stt.md (the public API reference). One
Socket.IO connection at :data:`SOCKETIO_PATH`, authenticated by the :data:`API_KEY_HEADER`
header; the client emits ``start-session``, ``audio-chunk`` and ``stop-session``; the server
emits ``session-started``, ``transcript-message``, ``session-error`` and ``session-closed``.
``committed_transcript_with_timestamps`` relays the upstream (ElevenLabs realtime) shape: a
``words`` list of ``{text, start, end, type}`` with times in seconds from the session start and
``type`` ``"word"`` or ``"spacing"``.

Pure: values in, values out; no sockets. The session adapter (:mod:`bot.stt.session`) does I/O.

Error policy for what the server sends (it is outside our control):

* an unknown ``message_type`` -> ``None``: the upstream may add types; ignoring them is correct;
* a known type with missing/mistyped fields, non-finite or negative times, or text longer than
  :data:`MAX_TEXT_CHARS` -> :class:`ProtocolError`, which the session counts and logs (one bad
  message must not end a meeting's transcript, but it must not go unnoticed either);
* finite word times past the audio actually sent cannot be true: a word that starts after the
  bound (``audio_seconds`` + :data:`WORD_TIME_MARGIN_S`, or :data:`MAX_WORD_TIME_S` when the
  caller does not know) is dropped, and an end past it is clamped to it, so no absurd time
  (``1e306``) reaches storage, SRT/WebVTT rendering or a sample-position computation;
* ``session-closed`` / ``session-error`` payloads never raise: they already announce a failure,
  so a mangled one still yields a usable code / message.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, TypedDict

from bot.errors import SttError

__all__ = [
    "API_KEY_HEADER",
    "AUDIO_CHUNK",
    "CLOSE_NORMAL",
    "MAX_TEXT_CHARS",
    "MAX_WORD_TIME_S",
    "SESSION_CLOSED",
    "SESSION_ERROR",
    "SESSION_STARTED",
    "SOCKETIO_PATH",
    "START_SESSION",
    "STOP_SESSION",
    "TRANSCRIPT_MESSAGE",
    "AudioChunkPayload",
    "CommittedTranscript",
    "PartialTranscript",
    "ProtocolError",
    "SessionClosedPayload",
    "SessionErrorPayload",
    "SessionStarted",
    "StartSessionPayload",
    "TimestampedTranscript",
    "TranscriptEvent",
    "TranscriptMessagePayload",
    "WORD_TIME_MARGIN_S",
    "WordPayload",
    "WordTiming",
    "audio_chunk",
    "audio_chunk_event_json",
    "decode_audio_chunk",
    "parse_session_closed",
    "parse_session_error",
    "parse_transcript_message",
    "start_session",
    "word_time_bound",
]

#: Socket.IO path and auth header, from the API reference's "Connection" table.
SOCKETIO_PATH: Final = "/api/stt-realtime-socket"
API_KEY_HEADER: Final = "x-api-key"

# Event names (API reference, "Client Events" / "Server Events").
START_SESSION: Final = "start-session"
AUDIO_CHUNK: Final = "audio-chunk"
STOP_SESSION: Final = "stop-session"
SESSION_STARTED: Final = "session-started"
TRANSCRIPT_MESSAGE: Final = "transcript-message"
SESSION_ERROR: Final = "session-error"
SESSION_CLOSED: Final = "session-closed"

#: ``session-closed`` code for a normal closure (the reference; WebSocket close code 1000).
CLOSE_NORMAL: Final = 1000
#: Code reported when ``session-closed`` carries no usable code (RFC 6455 "no status received").
CLOSE_NO_STATUS: Final = 1005
#: A committed transcript is one sentence; 10 000 characters is far beyond any utterance and
#: bounds what one message can make us store and post (Discord messages hold 2 000).
MAX_TEXT_CHARS: Final = 10_000
#: Bound on word entries in one timestamped message (a word per character is already generous).
MAX_WORDS: Final = 10_000
#: Error / close-reason strings are cut to this for logs and user messages.
MAX_REASON_CHARS: Final = 500
#: Word times may run this far past the audio the session sent (upstream rounding, a word
#: that ends in the last chunk) before they are clamped.
WORD_TIME_MARGIN_S: Final = 2.0
#: No STT session runs a day; a word time beyond this is dropped even when the caller cannot
#: say how much audio it sent.
MAX_WORD_TIME_S: Final = 86_400.0

MessageType = Literal[
    "session_started",
    "partial_transcript",
    "committed_transcript",
    "committed_transcript_with_timestamps",
]


class ProtocolError(SttError):
    """The server sent a malformed message (their fault, not ours; transient)."""


# -- wire payloads (TypedDict: exactly what crosses the socket) --------------------------------


class StartSessionPayload(TypedDict):
    sampleRate: int


class AudioChunkPayload(TypedDict):
    audio_base_64: str
    sample_rate: int


class SessionErrorPayload(TypedDict):
    error: str


class SessionClosedPayload(TypedDict):
    code: int
    reason: str


class WordPayload(TypedDict, total=False):
    text: str
    start: float
    end: float
    type: Literal["word", "spacing"]


class TranscriptMessagePayload(TypedDict, total=False):
    message_type: MessageType
    session_id: str
    text: str
    words: list[WordPayload]


# -- parsed events -----------------------------------------------------------------------------


class WordTiming(NamedTuple):
    """A word and its span in seconds from the upstream session's start."""

    text: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class SessionStarted:
    session_id: str


@dataclass(frozen=True, slots=True)
class PartialTranscript:
    text: str


@dataclass(frozen=True, slots=True)
class CommittedTranscript:
    text: str


@dataclass(frozen=True, slots=True)
class TimestampedTranscript:
    """The same committed sentence with word times (``spacing`` entries left out)."""

    text: str
    words: tuple[WordTiming, ...]


TranscriptEvent = SessionStarted | PartialTranscript | CommittedTranscript | TimestampedTranscript


# -- builders ----------------------------------------------------------------------------------


def _check_rate(rate: int) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ValueError(f"sample rate must be a positive integer, got {rate!r}")


def start_session(rate: int) -> StartSessionPayload:
    """The ``start-session`` payload for 16-bit mono PCM at ``rate`` Hz."""
    _check_rate(rate)
    return {"sampleRate": rate}


def audio_chunk(pcm: bytes, rate: int) -> AudioChunkPayload:
    """The ``audio-chunk`` payload: ``pcm`` is mono int16 little-endian at ``rate`` Hz."""
    _check_rate(rate)
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even byte count, got {len(pcm)}")
    return {"audio_base_64": base64.b64encode(pcm).decode("ascii"), "sample_rate": rate}


def audio_chunk_event_json(pcm: bytes, rate: int) -> str:
    """``json.dumps([AUDIO_CHUNK, audio_chunk(pcm, rate)])`` without the JSON encoder.

    The Socket.IO event as JSON text (prefix ``"42"`` for an Engine.IO message of the default
    namespace): a send path writing frames itself skips python-socketio's ``json.dumps`` of a
    ~4 KB string per chunk. Plain concatenation is exact because base64's alphabet and the
    event name need no JSON escaping.
    """
    _check_rate(rate)
    if len(pcm) % 2:
        raise ValueError(f"16-bit PCM must have an even byte count, got {len(pcm)}")
    return ('["' + AUDIO_CHUNK + '",{"audio_base_64":"' + base64.b64encode(pcm).decode("ascii")
            + '","sample_rate":' + str(rate) + "}]")


def decode_audio_chunk(payload: object) -> tuple[bytes, int]:
    """Server side of :func:`audio_chunk`: (pcm, rate); :class:`ProtocolError` if malformed."""
    if not isinstance(payload, dict):
        raise ProtocolError(f"audio-chunk payload is not an object: {type(payload).__name__}")
    data, rate = payload.get("audio_base_64"), payload.get("sample_rate")
    if not isinstance(data, str):
        raise ProtocolError("audio-chunk without a base64 string 'audio_base_64'")
    if isinstance(rate, bool) or not isinstance(rate, int) or rate <= 0:
        raise ProtocolError(f"audio-chunk with a bad sample_rate: {rate!r}")
    try:
        pcm = base64.b64decode(data, validate=True)
    except ValueError as exc:
        raise ProtocolError("audio-chunk 'audio_base_64' is not valid base64") from exc
    if len(pcm) % 2:
        raise ProtocolError("audio-chunk holds an odd number of bytes (not 16-bit PCM)")
    return pcm, rate


# -- parsers -----------------------------------------------------------------------------------


def _text(payload: dict[object, object], kind: str) -> str:
    text = payload.get("text")
    if not isinstance(text, str):
        raise ProtocolError(f"{kind} without a string 'text'")
    if len(text) > MAX_TEXT_CHARS:
        raise ProtocolError(f"{kind} text is {len(text)} characters (limit {MAX_TEXT_CHARS})")
    return text


def _time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"word {what} is not a number: {value!r}")
    t = float(value)
    if not math.isfinite(t) or t < 0:
        raise ProtocolError(f"word {what} is not a finite time >= 0: {value!r}")
    return t


def word_time_bound(audio_seconds: float | None) -> float:
    """Latest plausible word time in a session that has been sent ``audio_seconds`` of audio."""
    if audio_seconds is None or not math.isfinite(audio_seconds):
        return MAX_WORD_TIME_S
    return min(MAX_WORD_TIME_S, max(0.0, audio_seconds) + WORD_TIME_MARGIN_S)


def _words(raw: object, bound: float) -> tuple[WordTiming, ...]:
    if not isinstance(raw, list):
        raise ProtocolError("timestamped transcript without a 'words' list")
    if len(raw) > MAX_WORDS:
        raise ProtocolError(f"timestamped transcript with {len(raw)} words (limit {MAX_WORDS})")
    words: list[WordTiming] = []
    for item in raw:
        if not isinstance(item, dict):
            raise ProtocolError("a word entry is not an object")
        kind = item.get("type", "word")
        if kind == "spacing":
            continue  # upstream's gaps between words carry no text we need
        if kind != "word":
            continue  # unknown entry types (e.g. audio events) are skipped, like unknown messages
        text = _text(item, "word")
        start, end = _time(item.get("start"), "start"), _time(item.get("end"), "end")
        if end < start:
            raise ProtocolError(f"word {text!r} ends ({end}) before it starts ({start})")
        if start > bound:
            continue  # said after the audio we sent: not a time of ours, drop the word
        words.append(WordTiming(text, start, min(end, bound)))
    return tuple(words)


def parse_transcript_message(
    payload: object, *, audio_seconds: float | None = None
) -> TranscriptEvent | None:
    """A ``transcript-message`` payload as an event; ``None`` for an unknown message type.

    ``audio_seconds``: how much audio this STT session has been sent; word times are bounded
    by it (see module doc). Raises :class:`ProtocolError` for a malformed message of a known
    type (see module doc).
    """
    if not isinstance(payload, dict):
        raise ProtocolError(f"transcript-message is not an object: {type(payload).__name__}")
    kind = payload.get("message_type")
    if kind == "session_started":
        session_id = payload.get("session_id", "")
        if not isinstance(session_id, str) or len(session_id) > MAX_REASON_CHARS:
            raise ProtocolError("session_started with a bad 'session_id'")
        return SessionStarted(session_id)
    if kind == "partial_transcript":
        return PartialTranscript(_text(payload, "partial_transcript"))
    if kind == "committed_transcript":
        return CommittedTranscript(_text(payload, "committed_transcript"))
    if kind == "committed_transcript_with_timestamps":
        text = _text(payload, "committed_transcript_with_timestamps")
        words = _words(payload.get("words"), word_time_bound(audio_seconds))
        return TimestampedTranscript(text, words)
    if not isinstance(kind, str):
        raise ProtocolError("transcript-message without a string 'message_type'")
    return None


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def parse_session_closed(payload: object) -> tuple[int, str]:
    """(code, reason) of ``session-closed``; never raises (a missing code -> 1005)."""
    if not isinstance(payload, dict):
        return CLOSE_NO_STATUS, ""
    code, reason = payload.get("code"), payload.get("reason")
    if isinstance(code, bool) or not isinstance(code, int | float) or not math.isfinite(code):
        code = CLOSE_NO_STATUS
    return int(code), _short(reason) if isinstance(reason, str) else ""


def parse_session_error(payload: object) -> str:
    """The message of ``session-error``; never raises (a bare string is accepted too)."""
    if isinstance(payload, dict):
        payload = payload.get("error")
    if isinstance(payload, str) and payload:
        return _short(payload)
    return "unspecified session error"

"""What an STT session tells its owner: states and events, as plain values (pure).

Identity, not text: every new committed line carries a :class:`LineRef` (the speaker's key and
a sequence number of that session's lines). When the timestamped form of the same sentence
comes it arrives as :class:`SegmentTimestamped` with the *same* ref: an amend of that line. An
owner keys its rows by ref (the meeting's storage writes, a replay's list of lines) and never
has to find a line again by its text or by a display name. Partial captions carry the
speaker's key too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from bot.errors import CantobotError, SttSessionError
from bot.transcript.model import Segment

#: What identifies a speaker to the owner: the Discord user id, else the speaker's name.
SpeakerKey = int | str


class SttState(enum.Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    STARTING = "starting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    STOPPING = "stopping"
    CLOSED = "closed"
    FAILED = "failed"


_S = SttState
#: Legal transitions (anything else is a bug in the session). FAILED is also where a session
#: ends whose stop gave up with speech not transcribed (a loss is never reported as CLOSED), and
#: where an upstream error no retry can fix (quota, terms, key) puts a streaming session.
TRANSITIONS: Final[dict[SttState, frozenset[SttState]]] = {
    _S.IDLE: frozenset({_S.CONNECTING, _S.FAILED, _S.CLOSED}),
    _S.CONNECTING: frozenset({_S.STARTING, _S.FAILED, _S.CLOSED}),
    _S.STARTING: frozenset({_S.STREAMING, _S.FAILED, _S.CLOSED}),
    _S.STREAMING: frozenset({_S.RECONNECTING, _S.STOPPING, _S.FAILED, _S.CLOSED}),
    _S.RECONNECTING: frozenset({_S.STREAMING, _S.FAILED, _S.CLOSED}),
    # A drop while stopping reconnects (within stop_timeout) so the last sentences are not lost.
    _S.STOPPING: frozenset({_S.RECONNECTING, _S.FAILED, _S.CLOSED}),
    _S.FAILED: frozenset({_S.CONNECTING, _S.CLOSED}),
    _S.CLOSED: frozenset(),
}


@dataclass(frozen=True, slots=True)
class LineRef:
    """One committed line: whose (``speaker``, a :data:`SpeakerKey`) and which (``seq``, from
    a counter the owner may share between sessions so that refs never repeat)."""

    speaker: SpeakerKey
    seq: int


@dataclass(frozen=True)
class SegmentCommitted:
    """A new committed line."""

    segment: Segment
    ref: LineRef


@dataclass(frozen=True)
class SegmentTimestamped:
    """The line ``ref``, now with words and better times (an amend, not a new line)."""

    segment: Segment
    ref: LineRef


@dataclass(frozen=True)
class PartialText:
    """The words heard so far of a sentence not yet committed (a live caption)."""

    speaker: str
    text: str
    key: SpeakerKey


@dataclass(frozen=True)
class StateChanged:
    speaker: str
    state: SttState
    error: CantobotError | None = None


class SttSessionRenewed(SttSessionError):
    """The upstream ended a session in the ordinary course (its time limit, inactivity): a new
    one follows without telling anyone (no notice, no backoff)."""


class SttAudioLost(SttSessionError):
    """A stop gave up with speech not transcribed: said for whom and how many seconds."""

    permanent = True

    def __init__(self, speaker: str, seconds: float, why: str) -> None:
        super().__init__(f"{seconds:.1f} s of {speaker}'s speech could not be transcribed "
                         f"({why})", permanent=True)
        self.speaker = speaker
        self.seconds = seconds
        #: Notices of losses are per speaker (one speaker's loss must not hide another's).
        self.notice_key = f"loss-{speaker}"


SttEvent = SegmentCommitted | SegmentTimestamped | PartialText | StateChanged

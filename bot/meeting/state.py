"""A meeting's life cycle as a transition table, and the values its status reports.

Pure: no Discord, no sockets. :class:`StateMachine` refuses a change the table does not list (a
bug) and logs every change once, as :class:`~bot.stt.session.SttState` does for a session.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from bot.errors import RemoteError
from bot.lifecycle import change

log = logging.getLogger(__name__)


class MeetingState(enum.Enum):
    STARTING = "starting"
    LIVE = "live"
    STOPPING = "stopping"
    ENDED = "ended"


_M = MeetingState
#: Legal transitions: STARTING -> LIVE on joining voice, -> ENDED when the join fails; a stop
#: (command, empty channel, shutdown) goes through STOPPING to ENDED.
TRANSITIONS: Final[dict[MeetingState, frozenset[MeetingState]]] = {
    _M.STARTING: frozenset({_M.LIVE, _M.STOPPING, _M.ENDED}),
    _M.LIVE: frozenset({_M.STOPPING}),
    _M.STOPPING: frozenset({_M.ENDED}),
    _M.ENDED: frozenset(),
}


class StateMachine:
    """The current :class:`MeetingState` of one meeting; every change is checked and logged."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.state = MeetingState.STARTING

    def to(self, new: MeetingState, why: str = "") -> None:
        if change(TRANSITIONS, self.state, new, label=self.label, log=log, why=why):
            self.state = new

    @property
    def accepting_speakers(self) -> bool:
        """New speakers are opened only before the stop begins."""
        return self.state in (MeetingState.STARTING, MeetingState.LIVE)


class MeetingError(RemoteError):
    """A meeting could not start (Discord refused the voice join, or the guild already has
    one); the message is shown to the user."""

    permanent = True


@dataclass(frozen=True)
class SpeakerStatus:
    name: str
    user_id: int | None
    seconds: float
    upstream: str


@dataclass(frozen=True)
class MeetingStatus:
    meeting_id: int
    voice_channel: str
    text_channel: str
    started_at: datetime
    duration: float
    speakers: tuple[SpeakerStatus, ...]
    lines_posted: int
    upstream: str
    e2ee: bool
    privacy_code: str | None
    state: MeetingState
    #: One line: voice packets decoded, dropped by reason, repaired (``ReceiveCounters.summary``).
    voice: str = ""

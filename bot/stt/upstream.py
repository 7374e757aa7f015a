"""What an upstream ``error`` message means and what to do about it (pure).

The upstream (ElevenLabs realtime, relayed by cantonese.ai) sends
``{"message_type": "error", "error": CODE, "message": ...}``; :func:`parse_error` reads it and
:class:`ErrorPolicy` decides by its code: no retry can fix it (:data:`PERMANENT_ERRORS`: the
session fails and says what to do), the session ran out (renew at once), it heard too little
(stay closed until speech resumes), or anything else (reconnect with backoff). The adapter
(:mod:`bot.stt.session`) applies the decision.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from bot.stt import protocol as p

#: Upstream error codes that no retry can fix: the user must act (key, quota, terms). Each maps
#: to what to do.
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


@dataclass(frozen=True, slots=True)
class UpstreamError:
    """The upstream's ``{"message_type": "error", "error": CODE}``."""

    code: str
    message: str

    @property
    def detail(self) -> str:
        """The code, and the upstream's message if it sent one."""
        return f"{self.code}: {self.message}" if self.message else self.code


def parse_error(payload: dict[object, object]) -> UpstreamError:
    """An ``error`` message's code (``unknown`` if none) and message, both bounded."""
    code, message = payload.get("error"), payload.get("message")
    code = code[:64] if isinstance(code, str) and code else "unknown"
    message = message[: p.MAX_REASON_CHARS] if isinstance(message, str) else ""
    return UpstreamError(code, message)


class Action(enum.Enum):
    """What the session does about an upstream error."""

    FAIL = "fail"  # no retry can fix it: FAILED, say what to do, no reconnect
    RENEW = "renew"  # a new upstream session at once, quietly
    RENEW_ON_SPEECH = "renew on speech"  # a new one quietly, once speech resumes
    RECONNECT = "reconnect"  # trouble: reconnect with backoff, and say so


class ErrorPolicy:
    """Decides per upstream error code; remembers only what the session limit needs."""

    def __init__(self) -> None:
        #: Commits counted when the upstream last ended a session at its time limit: a second
        #: limit without a commit in between backs off (a re-send that alone reaches the limit
        #: must not loop at full speed).
        self._commits_at_limit: int | None = None

    def decide(self, code: str, commits: int) -> Action:
        """The action for ``code``, given the lines committed so far."""
        if code in PERMANENT_ERRORS:
            return Action.FAIL
        if code == SESSION_LIMIT and self._commits_at_limit != commits:
            self._commits_at_limit = commits
            return Action.RENEW
        if code == INACTIVITY:
            return Action.RENEW_ON_SPEECH
        return Action.RECONNECT

    @staticmethod
    def names_chunks(code: str) -> bool:
        """True if a chunk of ours caused it: the recent chunks are worth logging."""
        return code in CHUNK_ERRORS

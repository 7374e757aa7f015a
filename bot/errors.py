"""The cantobot error tree: every :class:`CantobotError` subclass, where it lives, whose fault.

    CantobotError                   .user_message: one line a user can act on; .permanent; .fault
    ├── RemoteError                 the other side's fault: Discord, the STT server, a bad file
    │   ├── AudioInputError         an audio file we were given cannot be read
    │   ├── SttError                the speech-to-text service
    │   │   ├── SttAuthError        401: the API key was rejected (permanent: never retried)
    │   │   ├── SttUnavailable      could not connect / dropped (transient: retried with backoff)
    │   │   ├── SttSessionError     session-error or session-closed with a non-1000 code
    │   │   │   ├── SttSessionRenewed  (bot.stt.events) an ordinary end: a new session, quietly
    │   │   │   └── SttAudioLost    (bot.stt.events) a stop gave up: whose speech, how long
    │   │   └── ProtocolError       (bot.stt.protocol) a malformed server message
    │   ├── VoiceError              Discord voice: malformed packets, decryption failures
    │   │   ├── MalformedPacket     (bot.voice.rtp) not an RTP packet we can read
    │   │   ├── DecryptError        (bot.voice.crypto) a packet that does not decrypt
    │   │   ├── UnsupportedMode     (bot.voice.crypto) an encryption mode we do not speak
    │   │   ├── OpusNotAvailable    (bot.voice.opus) libopus is missing on this machine
    │   │   └── OpusError           (bot.voice.opus) libopus refused a frame
    │   ├── MeetingError            (bot.meeting.state) cannot start: no voice join, one per guild
    │   └── Unreachable             (bot.reach) Discord or cantonese.ai not reached at start-up
    │       └── Rejected            (bot.reach) reached, but our token or key was refused (401)
    ├── LocalError                  ours: our configuration, or a bug
    │   ├── ConfigError             our configuration is wrong (file, key, fix)
    │   ├── ReadabilityError        (bot.transcript.script) an unknown script or Jyutping choice
    │   ├── OutboxClosedError       (bot.sinks.outbox) put after close (a sink outlived it)
    │   ├── SinkStateError          (bot.sinks.discord_sink) used before start()
    │   └── TranscriptError         (bot.transcript.model) an impossible segment or word (a bug)
    └── StorageError                (bot.storage.common) the database failed: remote
        ├── StorageMisuse           (bot.storage.common) asked the impossible (config, bug): local
        ├── StorageClosed           (bot.storage.common) used after close (a bug): local
        ├── MeetingNotFound         (bot.storage.common) no such meeting: remote
        ├── MeetingForgotten        (bot.storage.common) its lines were deleted by a forget: remote
        └── LineNotFound            (bot.storage.common) deleted meanwhile: remote

:class:`StorageError` is one family for callers to catch (as ``sqlite3.Error`` is), so it sits
beside the two branches and sets ``fault`` per class, as marked. Nothing reports
:attr:`Fault.UNKNOWN`. Not in the tree: :class:`StreamClosed`, an expected end (a stream closed
before it could start), never shown to anyone.
``tests/test_errors_tree.py`` keeps this tree complete.

Outside errors are translated at the boundary with ``raise ... from exc`` so callers catch one
family, as python-socketio and discord.py do; as h11's ``RemoteProtocolError`` and
``LocalProtocolError``, ``fault`` says whether to look at the other side or at us.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class Fault(enum.Enum):
    REMOTE = "remote"  # Discord, the STT server, a file or a request we were given
    LOCAL = "local"  # our configuration or our code
    UNKNOWN = "unknown"  # not told apart yet


class CantobotError(Exception):
    """Base class; ``str(err)`` is the one line shown to users."""

    permanent: bool = False
    fault: ClassVar[Fault] = Fault.UNKNOWN

    def __init__(self, message: str, *, permanent: bool | None = None) -> None:
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent

    @property
    def user_message(self) -> str:
        return str(self)


class RemoteError(CantobotError):
    """The other side's fault: what Discord, the STT server or an input file did."""

    fault = Fault.REMOTE


class LocalError(CantobotError):
    """Our fault: our configuration, or a bug in cantobot."""

    fault = Fault.LOCAL


class ConfigError(LocalError):
    permanent = True

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"config error in {where}: {problem}")


class AudioInputError(RemoteError):
    permanent = True


class SttError(RemoteError):
    pass


class SttAuthError(SttError):
    permanent = True


class SttUnavailable(SttError):
    permanent = False


class SttSessionError(SttError):
    def __init__(self, message: str, *, code: int | None = None, permanent: bool = False) -> None:
        super().__init__(message, permanent=permanent)
        self.code = code


class VoiceError(RemoteError):
    pass


class StreamClosed(RuntimeError):
    """A speaker's stream or STT session was closed before it could start (a stop or an
    opt-out came first): expected, not trouble to report. Not a :class:`CantobotError`: no user
    is ever shown it."""

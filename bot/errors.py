"""The cantobot error tree.

    CantobotError                 .user_message: one line a user can act on; .permanent
    ├── ConfigError               our configuration is wrong (file, key, fix)
    ├── AudioInputError           an audio file we were given cannot be read
    ├── SttError                  the speech-to-text service
    │   ├── SttAuthError          401: the API key was rejected (permanent: never retried)
    │   ├── SttUnavailable        could not connect / dropped (transient: retried with backoff)
    │   └── SttSessionError       session-error or session-closed with a non-1000 code
    └── VoiceError                Discord voice: malformed packets, decryption failures

Outside errors are translated at the boundary with ``raise ... from exc`` so callers catch one
family, as python-socketio and discord.py do.
"""

from __future__ import annotations


class CantobotError(Exception):
    """Base class; ``str(err)`` is the one line shown to users."""

    permanent: bool = False

    def __init__(self, message: str, *, permanent: bool | None = None) -> None:
        super().__init__(message)
        if permanent is not None:
            self.permanent = permanent

    @property
    def user_message(self) -> str:
        return str(self)


class ConfigError(CantobotError):
    permanent = True

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}" if key else file
        super().__init__(f"config error in {where}: {problem}")


class AudioInputError(CantobotError):
    permanent = True


class SttError(CantobotError):
    pass


class SttAuthError(SttError):
    permanent = True


class SttUnavailable(SttError):
    permanent = False


class SttSessionError(SttError):
    def __init__(self, message: str, *, code: int | None = None, permanent: bool = False) -> None:
        super().__init__(message, permanent=permanent)
        self.code = code


class VoiceError(CantobotError):
    pass


class StreamClosed(RuntimeError):
    """A speaker's stream or STT session was closed before it could start (a stop or an
    opt-out came first): expected, not trouble to report. Not a :class:`CantobotError`: no user
    is ever shown it."""

"""DAVE end-to-end decryption on the receive side: one call per received Opus frame.

After the transport layer (``bot/voice/crypto.py``) has removed the RTP encryption, a frame is
either DAVE-encrypted Opus (it ends in the ``FA FA`` magic marker) or, while DAVE is off or a
transition allows it, plain Opus. This module turns it into plain Opus for one speaker, or None.

Boundary: discord.py owns the ``davey.DaveSession`` (``voice_client._connection.dave_session``,
replaced on reconnect) and the negotiated protocol version
(``voice_client._connection.dave_protocol_version``); both change under us, so they are read
through getters on every call and never cached. This module never raises for a bad packet:
every failure is counted by reason in :attr:`DaveReceiver.stats` and logged at most once per
reason per interval, because a receiver must not die on one stray packet.

Decision per frame (mirroring discord.py's send side, whose ``can_encrypt`` is
``protocol_version != 0 and session is not None and session.ready``):

- protocol version 0, or no session: the frame is plain Opus; returned as is;
- the plain Opus silence frame ``F8 FF FE`` (davey senders leave it so; libdave, which Discord's
  clients run, encrypts it like any frame, and that one is decrypted below): returned as is;
- session not ready (no group yet): counted as ``NotReady``, dropped;
- otherwise ``session.decrypt``: davey itself passes plaintext through while passthrough is on
  (set by discord.py around transitions: op 21 to version 0, upgrades, resets) and raises
  ``UnencryptedWhenPassthroughDisabled`` otherwise.
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from collections.abc import Callable

import davey

_log = logging.getLogger(__name__)

#: The 3-byte Opus frame senders emit for silence; davey's ``encrypt_opus`` passes it unchanged,
#: libdave (Discord's clients) encrypts it (tests/test_simulate.py runs libdave members).
OPUS_SILENCE_FRAME = b"\xf8\xff\xfe"
#: Every DAVE-encrypted frame ends with this 2-byte magic marker (daveprotocol.com, frame format).
DAVE_MAGIC_MARKER = b"\xfa\xfa"
#: At most one log line per failure reason per this many seconds (one lost speaker at 50
#: packets/s would otherwise flood the log).
LOG_INTERVAL_SECONDS = 30.0

#: Reason names used for failures detected here rather than by davey.
REASON_NOT_READY = "NotReady"

# davey errors read "Failed to decrypt: NoDecryptorForUser" or
# "Failed to decrypt: DecryptionFailed(UnencryptedWhenPassthroughDisabled)" or
# "... DecryptionFailed(NoValidCryptorFound { media_type: AUDIO, ... })".
_REASON_RE = re.compile(r"(\w+)(?:\((\w+))?")


def failure_reason(exc: BaseException) -> str:
    """A short stable name for a davey failure, e.g. ``NoDecryptorForUser``."""
    if isinstance(exc, ValueError):
        text = str(exc)
        tail = text.split(": ", 1)[1] if ": " in text else text
        m = _REASON_RE.match(tail.strip())
        if m:
            return m.group(2) or m.group(1)
    return type(exc).__name__


class DaveReceiver:
    """Decrypts DAVE frames per user with whatever session discord.py holds right now."""

    def __init__(
        self,
        session_getter: Callable[[], davey.DaveSession | None],
        protocol_version_getter: Callable[[], int],
        *,
        clock: Callable[[], float] = time.monotonic,
        log_interval: float = LOG_INTERVAL_SECONDS,
    ) -> None:
        self._session_getter = session_getter
        self._version_getter = protocol_version_getter
        self._clock = clock
        self._log_interval = log_interval
        self._last_logged: dict[str, float] = {}
        #: Dropped frames by failure reason (``NoDecryptorForUser``, ``NotReady``, ...).
        self.stats: Counter[str] = Counter()

    def decrypt(self, user_id: int, frame: bytes) -> bytes | None:
        """Plain Opus for ``frame`` from ``user_id``, or None (counted in :attr:`stats`)."""
        try:
            session = self._session_getter()
            if self._version_getter() == 0 or session is None:
                return frame
            if frame == OPUS_SILENCE_FRAME:
                return frame
            if not session.ready:
                self._fail(REASON_NOT_READY, user_id, None)
                return None
            return session.decrypt(user_id, davey.MediaType.audio, frame)
        except Exception as exc:  # per packet: count it, never raise
            self._fail(failure_reason(exc), user_id, exc)
            return None

    def _fail(self, reason: str, user_id: int, exc: BaseException | None) -> None:
        self.stats[reason] += 1
        now = self._clock()
        last = self._last_logged.get(reason)
        if last is not None and now - last < self._log_interval:
            return
        self._last_logged[reason] = now
        _log.warning(
            "DAVE: dropped a frame from user %d: %s (%d so far)%s",
            user_id,
            reason,
            self.stats[reason],
            f" [{exc}]" if exc is not None and not isinstance(exc, ValueError) else "",
        )

    def is_e2ee(self) -> bool:
        """True when the call is end-to-end encrypted and our session can decrypt it."""
        session = self._session_getter()
        return self._version_getter() != 0 and session is not None and session.ready

    def privacy_code(self) -> str | None:
        """The call's voice privacy code (what Discord clients show), for /transcribe status."""
        session = self._session_getter()
        if session is None or self._version_getter() == 0:
            return None
        return session.voice_privacy_code

    @property
    def epoch(self) -> int | None:
        """The MLS epoch of our session, or None without one."""
        session = self._session_getter()
        return None if session is None else session.epoch

"""What one STT session counts (pure): audio in, sent, skipped, dropped and lost; commits,
reconnects and upstream errors. Shared by :mod:`~bot.stt.core` and :mod:`~bot.stt.gate`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

#: Bytes per 16-bit mono sample (the reference: "16-bit PCM", mono recommended).
BYTES_PER_SAMPLE: Final = 2


@dataclass
class SessionStats:
    chunks_sent: int = 0
    #: Of those, written straight to the websocket (the rest went through python-socketio's
    #: emit and python-engineio's write task; see ``_Link.send_audio``).
    chunks_direct: int = 0
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

"""A transcribed meeting: voice receive -> per-speaker STT -> storage and Discord sinks.

One :class:`Meeting` per guild, owned by the :class:`MeetingManager`. Life cycle (the table is in
:mod:`bot.meeting.state`; every change is logged)::

    STARTING --(voice joined)--> LIVE --(/transcribe stop, empty channel, shutdown)--> STOPPING
        --(drained, every speaker flushed, minutes posted)--> ENDED

The package, one concern per module:

* :mod:`~bot.meeting.intake`: voice intake (receiver, listener, rejoin on a stall, following a
  move, :meth:`~bot.meeting.intake.VoiceIntake.drain`).
* :mod:`~bot.meeting.speakers`: who is heard and their STT streams (opt-outs, the capacity gate,
  names, :class:`StreamClosed`).
* :mod:`~bot.meeting.ledger`: storage rows, the Discord sink, notices and
  :class:`MinutesPost`, the one way minutes are posted.
* :mod:`~bot.meeting.core`: :class:`Meeting`, which only wires the three.
* :mod:`~bot.meeting.manager`: :class:`MeetingManager`, one meeting per guild, opt-outs, the
  voice-state listener, crash recovery.
* :mod:`~bot.meeting.state` (pure) and :mod:`~bot.meeting.tasks` (the task owner).

May import: the adapters (``bot.voice.client``, ``bot.stt.session``, ``bot.sinks``,
``bot.storage``), ``bot.pipeline``, the pure cores, discord.py. Never ``cogs`` or ``bot.sim``.
"""

from bot.errors import StreamClosed
from bot.meeting.core import Meeting
from bot.meeting.ledger import NOTICE_COOLDOWN, SINK_FLUSH_TIMEOUT, MinutesPost
from bot.meeting.manager import OPT_OUT_REFRESH, MeetingManager
from bot.meeting.state import MeetingError, MeetingState, MeetingStatus, SpeakerStatus
from bot.transcript.minutes import minutes_files

__all__ = [
    "NOTICE_COOLDOWN",
    "OPT_OUT_REFRESH",
    "SINK_FLUSH_TIMEOUT",
    "Meeting",
    "MeetingError",
    "MeetingManager",
    "MeetingState",
    "MeetingStatus",
    "MinutesPost",
    "SpeakerStatus",
    "StreamClosed",
    "minutes_files",
]

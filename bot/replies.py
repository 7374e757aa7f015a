"""What ``/transcribe start`` and ``/transcribe status`` say back: texts built from values.

Names written by others (channels, members, upstream errors) are escaped here with
:func:`~bot.transcript.escape.outside`, so the cog only sends what it is given.
"""

from __future__ import annotations

from bot.meeting.state import MeetingStatus
from bot.transcript.escape import ERROR_BUDGET, outside
from bot.transcript.format import format_timestamp
from bot.transcript.script import Readability


def start_reply(*, voice_name: str, target_mention: str, target_name: str, number: int | None,
                readability: Readability, lacks_webhooks: bool) -> str:
    """The answer to a started meeting: where it goes, how it is shown, what is degraded."""
    shown_number = f" (meeting #{number})" if number is not None else ""
    reply = (f"Transcribing **{outside(voice_name)}** into "
             f"{target_mention}{shown_number}.")
    reply += f"\nShown as: {readability.describe()}."
    if lacks_webhooks:
        reply += ("\nI am missing **Manage Webhooks** in #" + outside(target_name)
                  + ", so lines are posted by me with the speaker's name in bold; grant it "
                  "to show each line as its speaker.")
    return reply


def status_text(st: MeetingStatus, *, number: int | None, shown: Readability) -> str:
    """``/transcribe status``: the meeting, how it is shown, upstream, encryption, speakers."""
    speakers = "\n".join(
        f"• {outside(s.name)}: {format_timestamp(s.seconds)} of audio, "
        f"upstream {s.upstream}" for s in st.speakers) or "• nobody has spoken yet"
    e2ee = (f"yes (DAVE), voice privacy code `{st.privacy_code}`" if st.e2ee and st.privacy_code
            else "yes (DAVE)" if st.e2ee else "no")
    return (f"**Meeting #{number if number is not None else '?'}**: "
            f"{outside(st.voice_channel)} → #{outside(st.text_channel)}, "
            f"running {format_timestamp(st.duration)}\n"
            f"Shown as: {shown.describe()}\n"
            f"Lines posted: {st.lines_posted}\n"
            f"Speech-to-text: {outside(st.upstream, ERROR_BUDGET)}\n"
            f"End-to-end encrypted: {e2ee}\n"
            f"{st.voice or 'voice packets: none yet'}\nSpeakers:\n{speakers}")

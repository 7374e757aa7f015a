"""What /transcribe start and status say, built from values (names by others escaped)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from bot.meeting.state import MeetingState, MeetingStatus, SpeakerStatus
from bot.replies import start_reply, status_text
from bot.transcript.script import PLAIN, JyutpingMode, Readability, Script


def test_start_reply_says_where_how_and_what_is_degraded() -> None:
    reply = start_reply(voice_name="Stand*up*", target_mention="<#5>", target_name="mi_nutes",
                        number=4, readability=PLAIN, lacks_webhooks=False)
    assert reply == ("Transcribing **Stand\\*up\\*** into <#5> (meeting #4).\n"
                     f"Shown as: {PLAIN.describe()}.")
    reply = start_reply(voice_name="Standup", target_mention="<#5>", target_name="mi_nutes",
                        number=None, readability=PLAIN, lacks_webhooks=True)
    assert reply.startswith("Transcribing **Standup** into <#5>.\n")
    assert reply.endswith("\nI am missing **Manage Webhooks** in #mi\\_nutes, so lines are "
                          "posted by me with the speaker's name in bold; grant it to show each "
                          "line as its speaker.")


BASE = MeetingStatus(
    meeting_id=9, voice_channel="Standup", text_channel="minutes", started_at=datetime.now(UTC),
    duration=75.0, speakers=(), lines_posted=3, upstream="connected", e2ee=False,
    privacy_code=None, state=MeetingState.LIVE)


def status(**kw: Any) -> MeetingStatus:
    return replace(BASE, **kw)


def test_status_of_a_meeting_nobody_spoke_in_yet() -> None:
    text = status_text(status(), number=None, shown=PLAIN)
    assert text.splitlines() == [
        "**Meeting #?**: Standup → #minutes, running 01:15",
        f"Shown as: {PLAIN.describe()}",
        "Lines posted: 3",
        "Speech-to-text: connected",
        "End-to-end encrypted: no",
        "voice packets: none yet",
        "Speakers:",
        "• nobody has spoken yet",
    ]


def test_status_names_speakers_escaped_and_the_privacy_code() -> None:
    shown = Readability(Script.SIMPLIFIED, JyutpingMode.LINE)
    st = status(speakers=(SpeakerStatus("**bob**", 7, 12.0, "connected"),), e2ee=True,
                privacy_code="1234 5678", voice="voice packets: 10 decoded; none dropped")
    lines = status_text(st, number=2, shown=shown).splitlines()
    assert lines[0].startswith("**Meeting #2**: ")
    assert lines[1] == f"Shown as: {shown.describe()}"
    assert lines[4] == "End-to-end encrypted: yes (DAVE), voice privacy code `1234 5678`"
    assert lines[5] == "voice packets: 10 decoded; none dropped"
    assert lines[-1] == "• \\*\\*bob\\*\\*: 00:12 of audio, upstream connected"
    assert status_text(status(e2ee=True), number=2, shown=shown).splitlines()[4] == (
        "End-to-end encrypted: yes (DAVE)")

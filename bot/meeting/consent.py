"""The consent notice: what a voice room is told before any of its audio goes anywhere.

Pure: no Discord, no sockets. A meeting posts :func:`consent_notices` in the transcript channel
and in the voice channel's own chat (text-in-voice) when it starts and after every move, and
opens its audio gate only once Discord has accepted both (see :mod:`bot.meeting.core`). The
notice names where audio goes (the speech service), whether the call is end-to-end encrypted
(DAVE) and, if so, its voice privacy code as Discord clients show it, and how to opt out.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from bot.transcript.escape import outside

#: Who transcribes: the speech service audio is sent to.
PROVIDER = "cantonese.ai"
#: A voice privacy code as Discord clients show it: six groups of five digits.
CODE_GROUPS = 6
CODE_GROUP_LEN = 5


def format_privacy_code(code: str | None) -> str | None:
    """``123456789012345678901234567890`` -> ``12345 67890 12345 67890 12345 67890``.

    Discord clients show the code in groups so people can read it aloud and compare; a value
    of another shape (a future protocol) is shown as it came.
    """
    if code is None:
        return None
    digits = "".join(ch for ch in code if ch.isdigit())
    if len(digits) != CODE_GROUPS * CODE_GROUP_LEN or len(digits) != len(code.replace(" ", "")):
        return code.strip() or None
    return " ".join(digits[i : i + CODE_GROUP_LEN]
                    for i in range(0, len(digits), CODE_GROUP_LEN))


@dataclass(frozen=True)
class Encryption:
    """What is known of a call's end-to-end encryption when the notice is written.

    ``dave``: True when DAVE is on and our session is in the group, False when the call runs
    without it (protocol version 0), None while it is being set up.
    """

    dave: bool | None
    privacy_code: str | None = None

    def describe(self) -> str:
        if self.dave is False:
            return ("This call is **not** end-to-end encrypted (DAVE is off): Discord's voice "
                    "servers can hear it.")
        if self.dave is None:
            return ("End-to-end encryption (DAVE) was still being set up; `/transcribe status` "
                    "shows its voice privacy code.")
        code = format_privacy_code(self.privacy_code)
        return ("This call is end-to-end encrypted (DAVE)"
                + (f"; voice privacy code `{code}`." if code else "."))


def stt_host(url: str) -> str:
    """The host audio is sent to, as named in the notice."""
    return urlsplit(url).hostname or url


@dataclass(frozen=True)
class ConsentNotices:
    """The two texts: one for the transcript channel, one for the voice channel's chat."""

    transcript_channel: str
    voice_chat: str


def consent_notices(*, voice_name: str, text_channel_name: str, number: int, threads: bool,
                    stt_url: str, encryption: Encryption, moved: bool) -> ConsentNotices:
    """The consent notice for a room (names escaped here: they are written by others)."""
    voice = outside(voice_name)
    text = outside(text_channel_name)
    tail = (f" What is said is **transcribed by {PROVIDER}** (audio is sent to "
            f"`{stt_host(stt_url)}`) and the text is stored by this bot. "
            f"{encryption.describe()} Don't want to be transcribed? Use `/transcribe optout`: "
            "your voice is then never decoded or sent anywhere.")
    if moved:
        lead = (f"\N{RIGHTWARDS ARROW} Moved to **{voice}**; still transcribing "
                f"(meeting #{number}).")
    else:
        lead = (f"\N{STUDIO MICROPHONE} **{voice}** is now being transcribed "
                f"(meeting #{number}). Lines are posted here"
                + (" and in one caption thread per speaker" if threads else "") + ".")
    room = (f"\N{STUDIO MICROPHONE} This voice channel is now being transcribed into "
            f"#{text} (meeting #{number}).")
    return ConsentNotices(transcript_channel=lead + tail, voice_chat=room + tail)

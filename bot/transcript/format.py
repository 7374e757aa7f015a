"""Discord text formatting: caption lines, safe escaping, message splitting, names.

Boundary: pure string functions. The sinks call these before posting; nothing here talks to
Discord. Every user-controlled string (transcribed speech, display names) goes through
:func:`escape` so that speech can neither render as markdown nor ping anyone. The poster also
sends ``allowed_mentions=none``; escaping is defence in depth.

Limits come from Discord's API documentation:
message content 2000 characters, thread (channel) names 100, webhook names 80,
guild nicknames 32.
"""

from __future__ import annotations

import math
import re
import unicodedata

from bot.transcript.model import Segment, TranscriptError
from bot.transcript.script import PLAIN, Readability, read_line

#: Discord's documented maximum length of a message's ``content``.
MAX_MESSAGE_CHARS = 2000
#: Channel (and thread) names are 1-100 characters (Discord "Channel Object" docs).
MAX_THREAD_NAME_CHARS = 100
#: Webhook names are 1-80 characters (Discord "Webhook Resource" docs).
MAX_WEBHOOK_NAME_CHARS = 80
#: Guild nicknames are 1-32 characters (Discord "Guild Member Object" docs).
MAX_NICKNAME_CHARS = 32

#: Used when a display name is empty or made only of whitespace.
FALLBACK_SPEAKER = "speaker"
#: Suffix telling members that the bot is transcribing (shown in its nickname).
TRANSCRIBING_NOTICE = " [transcribing]"

ZWSP = "\u200b"
ELLIPSIS = "\u2026"

# Markdown and mention syntax Discord interprets. Discord's parser treats a backslash before
# any ASCII punctuation as a literal, so over-escaping is invisible while under-escaping renders.
_MARKDOWN_CHARS = "\\*_~`|>#-[]()<:"
_MARKDOWN_RE = re.compile("([" + re.escape(_MARKDOWN_CHARS) + "])")

# Characters at which a hard split would tear a user-perceived character apart: combining
# marks are checked separately via unicodedata; these cover emoji joiners and modifiers.
_JOINERS = {"\u200d"}  # ZERO WIDTH JOINER: the next code point belongs to the same glyph
_EXTENDERS = re.compile(
    "[\u200d\ufe00-\ufe0f\U0001f3fb-\U0001f3ff\U000e0020-\U000e007f\U000e0100-\U000e01ef]"
)
# Sentence ends, Cantonese/Chinese first: a hard split after one keeps sentences whole.
_SENTENCE_END = set("。！？!?．.；;，,、…")


def escape(text: str) -> str:
    """Escape Discord markdown and neutralise every mention form.

    A zero-width space after each ``@`` breaks ``@everyone``, ``@here`` and ``<@id>`` /
    ``<@&id>``; backslashes before ``<`` and ``#`` break ``<#id>`` and other ``<...>`` forms.
    """
    escaped = _MARKDOWN_RE.sub(r"\\\1", text)
    return escaped.replace("@", "@" + ZWSP)


def format_timestamp(seconds: float) -> str:
    """``mm:ss`` under an hour, ``h:mm:ss`` from an hour on (seconds are floored)."""
    if not math.isfinite(seconds) or seconds < 0:
        raise TranscriptError(f"timestamp must be a finite number >= 0, got {seconds}")
    total = int(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{minutes:02d}:{secs:02d}"


def format_line(segment: Segment, *, with_speaker: bool) -> str:
    """One caption line.

    ``with_speaker=False`` is webhook mode (the webhook already shows the speaker's name and
    avatar); ``True`` is the fallback when the bot posts under its own name.
    """
    return f"{_line_head(segment, with_speaker=with_speaker)} {escape(_one_line(segment.text))}"


def _line_head(segment: Segment, *, with_speaker: bool) -> str:
    stamp = f"`[{format_timestamp(segment.start)}]`"
    if with_speaker:
        name = escape(_one_line(segment.speaker) or FALLBACK_SPEAKER)
        return f"**{name}** {stamp}"
    return stamp


#: Discord's small-text ("subtext") prefix: the Jyutping line reads as a gloss under the line.
JYUTPING_PREFIX = "-# "


def line_messages(
    segment: Segment,
    *,
    with_speaker: bool,
    readability: Readability = PLAIN,
    limit: int = MAX_MESSAGE_CHARS,
) -> list[str]:
    """The messages that post one committed line, each within ``limit`` (UTF-16 units).

    With :data:`~bot.transcript.script.PLAIN` this is ``split_message(format_line(...))``.
    Otherwise the text is shown in the chosen script and, with Jyutping on, each message
    carries a ``-# ...`` line with the Jyutping of exactly the text in that message: a long
    line is split first (at spaces or sentence ends) and each part is read on its own, so
    every part keeps its own Jyutping. Only the first message has the timestamp (and name).
    """
    if readability.plain:
        return split_message(format_line(segment, with_speaker=with_speaker), limit)
    head = _line_head(segment, with_speaker=with_speaker)

    def compose(chunk: str, first: bool) -> str:
        reading = read_line(chunk, readability)
        body = escape(reading.text)
        msg = f"{head} {body}" if first else body
        if reading.jyutping:
            msg += "\n" + JYUTPING_PREFIX + escape(reading.jyutping)
        return msg

    def place(text: str, budget: int, first: bool) -> list[str]:
        out: list[str] = []
        for i, chunk in enumerate(split_message(text, budget)):
            lead = first and i == 0
            msg = compose(chunk, lead)
            size = message_length(msg)
            if size <= limit:
                out.append(msg)
                continue
            units = message_length(chunk)
            if units <= 2:  # cannot happen with real names; never post over the limit
                out.extend(split_message(msg, limit))
                continue
            # Jyutping is several letters per character: shrink the part in proportion.
            smaller = max(2, min(units - 1, units * limit * 9 // (size * 10)))
            out.extend(place(chunk, smaller, lead))
        return out

    return place(_one_line(segment.text), max(2, limit - message_length(head) - 1), True)


def message_length(text: str) -> int:
    """Length as Discord may count it: UTF-16 code units, never less than ``len(text)``.

    Astral characters (emoji, CJK Extension B characters used in Cantonese such as 𠵱)
    count twice, so a message within this length fits whichever way Discord counts.
    """
    return len(text) + sum(1 for ch in text if ord(ch) > 0xFFFF)


def cut_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """``text`` as one message within ``limit`` (:func:`message_length`, UTF-16 units).

    The one way a single message is shortened: what does not fit is replaced by an ellipsis.
    The cut never falls inside an astral character (a surrogate pair once encoded) nor, where
    it can be seen, inside an emoji sequence or before a combining mark.
    """
    if limit < 2:
        raise TranscriptError(f"cut limit must be at least 2, got {limit}")
    if message_length(text) <= limit:
        return text
    at = _fit(text, limit - len(ELLIPSIS))
    if at > 0:
        at = _grapheme_safe(text, at)
    return text[:at] + ELLIPSIS


def split_message(text: str, limit: int = MAX_MESSAGE_CHARS) -> list[str]:
    """Split ``text`` into non-empty parts each within ``limit`` (see :func:`message_length`).

    Parts are consecutive slices of ``text``; only whitespace at split points (and at the
    ends, which Discord trims anyway) is dropped.
    Preference: a line break, then other whitespace, then after sentence punctuation
    (Cantonese has no spaces), then a hard split that avoids cutting an emoji sequence or a
    base letter from its combining marks. Whitespace-only text gives no parts.
    """
    if limit < 2:
        raise TranscriptError(f"split limit must be at least 2, got {limit}")
    parts: list[str] = []
    rest = text.strip()  # Discord trims message content anyway
    while rest:
        if message_length(rest) <= limit:
            parts.append(rest)
            break
        head, rest = _choose_split(rest, _fit(rest, limit))
        parts.append(head)
    return parts


def _fit(text: str, limit: int) -> int:
    """Largest n such that ``text[:n]`` is within ``limit`` UTF-16 code units."""
    units = 0
    for i, ch in enumerate(text):
        units += 2 if ord(ch) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


def _choose_split(text: str, cut: int) -> tuple[str, str]:
    """Split ``text`` (longer than ``cut``) into a non-empty head of at most ``cut`` chars."""
    window = text[: cut + 1]  # a whitespace right after the cut is a perfect split point
    floor = max(1, cut // 2)  # below this a "nice" split wastes too much of the message
    for finder in (_last_newline, _last_space, _last_sentence_end):
        at = finder(window, cut)
        if at >= floor:
            head = text[:at].rstrip()
            if head:
                return head, text[at:].lstrip()
    at = _last_space(window, cut)
    if at > 0 and text[:at].rstrip():
        return text[:at].rstrip(), text[at:].lstrip()
    at = _grapheme_safe(text, cut)
    return text[:at], text[at:]


def _last_newline(window: str, cut: int) -> int:
    return window.rfind("\n", 0, cut + 1)


def _last_space(window: str, cut: int) -> int:
    for i in range(min(cut, len(window) - 1), 0, -1):
        if window[i].isspace():
            return i
    return -1


def _last_sentence_end(window: str, cut: int) -> int:
    for i in range(min(cut, len(window)) - 1, 0, -1):
        if window[i] in _SENTENCE_END:
            return i + 1  # keep the punctuation with its sentence
    return -1


def _grapheme_safe(text: str, cut: int) -> int:
    """Move ``cut`` back so it does not fall inside an easily recognised grapheme."""
    at = cut
    while at > 0 and _inside_grapheme(text, at):
        at -= 1
    return at if at > 0 else cut  # one giant grapheme: a hard split is all that is left


def _inside_grapheme(text: str, at: int) -> bool:
    nxt, prev = text[at], text[at - 1]
    if _EXTENDERS.match(nxt) or unicodedata.combining(nxt):
        return True
    if prev in _JOINERS:
        return True
    # A regional-indicator pair is one flag; do not split between its two halves.
    return _is_regional(prev) and _is_regional(nxt) and _regional_run(text, at) % 2 == 1


def _is_regional(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"


def _regional_run(text: str, at: int) -> int:
    n = 0
    while at - n - 1 >= 0 and _is_regional(text[at - n - 1]):
        n += 1
    return n


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + ELLIPSIS


def thread_name(display_name: str) -> str:
    """``Captions · alice``, shortened with an ellipsis to fit the 100-character limit."""
    prefix = "Captions \u00b7 "
    name = _one_line(display_name) or FALLBACK_SPEAKER
    return prefix + _truncate(name, MAX_THREAD_NAME_CHARS - len(prefix))


# Discord's naming rules (Usernames and Nicknames docs; webhook stipulations): names may not
# contain "discord", "clyde", "@", "#", ":" or "```", nor be "everyone"/"here".
_FORBIDDEN_WORDS = re.compile("(disc)(ord)|(cl)(yde)", re.IGNORECASE)
_FORBIDDEN_CHARS = str.maketrans({"@": "\uff20", "#": "\uff03", ":": "\uff1a", "`": "\u02cb"})


def webhook_username(display_name: str) -> str:
    """A webhook name Discord accepts that still reads as the speaker's name.

    Forbidden words get a hyphen (``Discord Dan`` -> ``Disc-ord Dan``); forbidden symbols
    become their full-width look-alikes; 1-80 characters; empty -> ``speaker``.
    """
    name = _one_line(display_name)
    name = _FORBIDDEN_WORDS.sub(
        lambda m: f"{m[1]}-{m[2]}" if m[1] else f"{m[3]}-{m[4]}", name
    )
    name = name.translate(_FORBIDDEN_CHARS)
    if name.lower() in ("everyone", "here"):
        name = f"{name} ({FALLBACK_SPEAKER})"
    name = _truncate(name, MAX_WEBHOOK_NAME_CHARS)
    return name or FALLBACK_SPEAKER


def nickname_with_notice(name: str) -> str:
    """``cantobot [transcribing]``: the bot's nickname while it listens, within 32 chars."""
    base = _one_line(name) or "cantobot"
    room = MAX_NICKNAME_CHARS - len(TRANSCRIBING_NOTICE)
    return _truncate(base, room) + TRANSCRIBING_NOTICE

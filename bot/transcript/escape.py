"""Text from outside made inert before it reaches Discord.

Why: the bot posts as itself, so whatever it echoes carries its authority. A speech service's
error text, a member's display name or a channel's name are written by others (a hostile or
compromised STT server, any member); echoed raw they could post a masked phishing link as the
bot, ping @everyone, or restyle a notice. Two tools, both pure:

* :func:`outside`: for one such value inside a message we compose: one line, control and
  bidi-override characters dropped, cut to its budget (before escaping, so an escape is never
  torn), links defanged, markdown and every mention form escaped.
* :func:`inert`: for a whole notice that may embed such values: mentions, masked links, bare
  and invite links are broken while our own ``**bold**`` and backticks stay. The sink applies
  it to every notice as a second line of defence.
"""

from __future__ import annotations

import re
import unicodedata

from bot.transcript.format import ELLIPSIS, ZWSP, escape

#: Budget for a name (display name, channel or thread name) inside a message; Discord allows
#: 100 for channel names, 32 for nicknames.
NAME_BUDGET = 100
#: Budget for an error text from the speech service inside a notice.
ERROR_BUDGET = 300

# Bidi overrides and isolates can make text read in another order than it is stored.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u200e\u200f")
_URL_SCHEME = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*):/(?!\u200b)/")
_INVITE = re.compile(r"(?i)\b(discord(?:app)?\.(?:gg|com|io|me|li)|dsc\.gg)(?!\u200b)/")
_MENTION_AT = re.compile(f"@(?!{ZWSP})")
_ANGLE = re.compile("<(?=[#@&/!])")
_MASKED_LINK = re.compile(r"\](?=\s*\()")


def _visible(text: str) -> str:
    """One line, without control, format or bidi characters (the zero-width joiner of emoji
    sequences stays)."""
    kept = "".join(
        ch for ch in text
        if ch == "\u200d" or (ch not in _BIDI and unicodedata.category(ch) not in ("Cc", "Cf"))
    )
    return " ".join(kept.split())


def _cut(text: str, budget: int) -> str:
    if len(text) <= budget:
        return text
    cut = max(budget - 1, 0)
    while 0 < cut < len(text) and unicodedata.combining(text[cut]):
        cut -= 1  # never strand a combining mark
    return text[:cut].rstrip() + ELLIPSIS


def defang(text: str) -> str:
    """Links that no client will make clickable: ``https:/<ZWSP>/...``, ``discord.gg<ZWSP>/``."""
    text = _URL_SCHEME.sub(lambda m: f"{m[1]}:/{ZWSP}/", text)
    return _INVITE.sub(lambda m: f"{m[1]}{ZWSP}/", text)


def outside(text: str, budget: int = NAME_BUDGET) -> str:
    """``text`` written by someone else, safe to place inside a bot message: one line, at most
    ``budget`` visible characters (an ellipsis marks a cut), links defanged, markdown and
    mentions escaped."""
    return escape(defang(_cut(_visible(text), budget)))


def inert(text: str) -> str:
    """A whole notice with every mention, masked link and link made inert, bidi overrides
    dropped; idempotent.

    Our own formatting (``**bold**``, backticks, emoji) is left alone: this does not escape
    markdown, :func:`outside` does that for each embedded value.
    """
    text = "".join(ch for ch in text if ch not in _BIDI)
    text = _MENTION_AT.sub("@" + ZWSP, text)
    text = _ANGLE.sub("<" + ZWSP, text)
    text = _MASKED_LINK.sub("]" + ZWSP, text)
    return defang(text)

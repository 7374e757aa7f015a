"""The Discord permissions ``/transcribe`` needs, and the invite link that grants exactly them.

One list serves three places, so they cannot disagree: the invite URL ``cantobot run`` logs at
start, the README's link, and ``cantobot doctor``'s per-guild check. Bit values are Discord's
(https://discord.com/developers/docs/topics/permissions); pure, no I/O.
"""

from __future__ import annotations

from urllib.parse import urlencode

#: (name as Discord's UI shows it, bit): everything ``/transcribe`` does in a guild.
REQUIRED_PERMISSIONS: tuple[tuple[str, int], ...] = (
    ("View Channel", 1 << 10),  # see the text and voice channels
    ("Connect", 1 << 20),  # join the voice channel
    ("Send Messages", 1 << 11),  # notices, fallback captions
    ("Create Public Threads", 1 << 35),  # per-speaker caption threads
    ("Send Messages in Threads", 1 << 38),
    ("Manage Webhooks", 1 << 29),  # post each line as the speaker
    ("Attach Files", 1 << 15),  # minutes (md, srt, vtt, json)
    ("Change Nickname", 1 << 26),  # the "[transcribing]" nickname
)
#: Administrator implies every permission.
ADMINISTRATOR = 1 << 3
#: OAuth2 scopes the bot is invited with: the bot user and its slash commands.
SCOPES = ("bot", "applications.commands")
AUTHORIZE_URL = "https://discord.com/oauth2/authorize"


def permission_integer() -> int:
    """The permissions integer of :data:`REQUIRED_PERMISSIONS` (what the invite asks for)."""
    value = 0
    for _, bit in REQUIRED_PERMISSIONS:
        value |= bit
    return value


def missing_permissions(granted: int) -> list[str]:
    """The names of the required permissions ``granted`` lacks, in the list's order."""
    if granted & ADMINISTRATOR:
        return []
    return [name for name, bit in REQUIRED_PERMISSIONS if not granted & bit]


def invite_url(client_id: int) -> str:
    """The OAuth2 link that adds the bot with exactly the permissions it needs."""
    query = urlencode(
        {"client_id": client_id, "scope": " ".join(SCOPES), "permissions": permission_integer()}
    )
    return f"{AUTHORIZE_URL}?{query}"

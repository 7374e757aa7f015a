"""Who may use which ``/transcribe`` command, and what the bot lacks to do it.

The decisions only, from the members, channels and permissions discord.py already holds (no
request is made here); the cog (``cogs/transcribe.py``) asks and replies. A refusal is the text
the member is shown: what is missing and what to do.
"""

from __future__ import annotations

import discord

from bot.storage.common import MeetingInfo
from bot.transcript.escape import outside

#: What the bot needs in the text channel / voice channel, with the names users see.
TEXT_PERMISSIONS = (("view_channel", "View Channel"), ("send_messages", "Send Messages"))
#: ... and in the text channel when caption threads are on.
THREAD_PERMISSIONS = (
    ("create_public_threads", "Create Public Threads"),
    ("send_messages_in_threads", "Send Messages in Threads"),
)
VOICE_PERMISSIONS = (("view_channel", "View Channel"), ("connect", "Connect"))
#: Wanted, not needed: without it lines are posted by the bot with the speaker's name in bold.
WEBHOOK_PERMISSIONS = (("manage_webhooks", "Manage Webhooks"),)
#: What the invoker needs in the transcript channel: the words go where they can read them.
INVOKER_TEXT_PERMISSIONS = (("view_channel", "View Channel"), ("send_messages", "Send Messages"))
#: What a member needs in a meeting's text channel to get its minutes (else: manager rights).
MINUTES_READ_PERMISSIONS = (("view_channel", "View Channel"),
                            ("read_message_history", "Read Message History"))

#: What managers may do, as the refusal to others names it.
START_OR_STOP = "start or stop transcription"


def missing_permissions(perms: discord.Permissions,
                        wanted: tuple[tuple[str, str], ...]) -> list[str]:
    """The labels of the ``wanted`` permissions ``perms`` lacks, in order."""
    return [label for attr, label in wanted if not getattr(perms, attr)]


def may_manage(member: discord.Member, manager_role: str | None) -> bool:
    """Members with Manage Channels, or the configured role, may start and stop."""
    if member.guild_permissions.manage_channels:
        return True
    return manager_role is not None and any(r.name == manager_role for r in member.roles)


def may_read_minutes(member: discord.Member, info: MeetingInfo, manager_role: str | None) -> bool:
    """A meeting's minutes are for those who could read its text channel, and for managers.

    A channel that no longer exists (or the bot cannot see) is readable by managers only.
    """
    if may_manage(member, manager_role):
        return True
    channel = member.guild.get_channel(info.text_channel_id)
    if channel is None:
        return False
    return not missing_permissions(channel.permissions_for(member), MINUTES_READ_PERMISSIONS)


def manager_refusal(user: discord.Member | discord.User, manager_role: str | None,
                    action: str = START_OR_STOP) -> str | None:
    """Why ``user`` may not ``action`` (a manager's command), or None when they may."""
    if isinstance(user, discord.User):  # a DM: no member, no roles
        return "This command works in a server."
    if not may_manage(user, manager_role):
        who = "the Manage Channels permission" + (
            f" or the **{manager_role}** role" if manager_role else "")
        return f"Only members with {who} can {action}."
    return None


def start_refusal(*, voice: discord.VoiceChannel | discord.StageChannel | None,
                  target: discord.TextChannel | None, member: discord.Member,
                  me: discord.Member, threads: bool) -> str | None:
    """Why a meeting cannot start in ``voice`` into ``target`` (None: it can).

    The invoker must be in a voice channel and able to post in the transcript channel (the
    words of the voice room go only where whoever starts it can read them); the bot needs
    what it posts and joins with (threads too when caption threads are on).
    """
    if voice is None:
        return "Join a voice channel first, then use `/transcribe start`."
    if target is None:
        return "Pick a text channel for the transcript (the `channel` option)."
    if missing_permissions(target.permissions_for(member), INVOKER_TEXT_PERMISSIONS):
        return (f"You cannot view and send messages in {target.mention}, so I will not post "
                "the transcript there. Pick a channel you can post in.")
    wanted = TEXT_PERMISSIONS + (THREAD_PERMISSIONS if threads else ())
    missing = missing_permissions(target.permissions_for(me), wanted)
    missing += [p for p in missing_permissions(voice.permissions_for(me), VOICE_PERMISSIONS)
                if p not in missing]
    if missing:
        return ("I am missing permissions: " + ", ".join(f"**{p}**" for p in missing)
                + f" (in #{outside(target.name)} / {outside(voice.name)}). Grant them to my "
                "role, then try again.")
    return None


def lacks_webhooks(target: discord.TextChannel, me: discord.Member) -> bool:
    """The bot cannot post lines as their speakers in ``target`` (it still posts them)."""
    return bool(missing_permissions(target.permissions_for(me), WEBHOOK_PERMISSIONS))

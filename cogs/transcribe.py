"""`/transcribe start|stop|status|minutes|settings|forget|forget-me|optout|optin`: parse,
call bot/, reply.

Refusals and errors are ephemeral and say what to do. Long steps (joining voice, flushing every
speaker) are deferred first: Discord wants an acknowledgement within 3 seconds.
"""

from __future__ import annotations

import functools
import logging
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from bot.errors import CantobotError
from bot.meeting import MeetingManager, MinutesPost
from bot.storage.common import MeetingInfo, MeetingNotFound
from bot.transcript.escape import ERROR_BUDGET, outside
from bot.transcript.format import format_timestamp
from bot.transcript.script import (
    Readability,
    ReadabilityChoice,
    parse_jyutping,
    parse_script,
    resolve_readability,
)

if TYPE_CHECKING:
    from bot.app import CantoBot

log = logging.getLogger(__name__)

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


def missing_permissions(perms: discord.Permissions,
                        wanted: tuple[tuple[str, str], ...]) -> list[str]:
    return [label for attr, label in wanted if not getattr(perms, attr)]


#: What the invoker needs in the transcript channel: the words go where they can read them.
INVOKER_TEXT_PERMISSIONS = (("view_channel", "View Channel"), ("send_messages", "Send Messages"))
#: What a member needs in a meeting's text channel to get its minutes (else: manager rights).
MINUTES_READ_PERMISSIONS = (("view_channel", "View Channel"),
                            ("read_message_history", "Read Message History"))


#: The choices of the script and jyutping options (bot/transcript/script.py: Script, JyutpingMode).
ScriptOption = Literal["hk", "simplified", "as-is"]
JyutpingOption = Literal["off", "line"]


def choice_of(script: str | None, jyutping: str | None) -> ReadabilityChoice:
    """Command options as a partial choice (an option not given stays ``None``)."""
    return ReadabilityChoice(parse_script(script) if script is not None else None,
                             parse_jyutping(jyutping) if jyutping is not None else None)


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


class Transcribe(commands.Cog):
    """The /transcribe command group."""

    group = app_commands.Group(name="transcribe", description="Live Cantonese captions and minutes",
                               guild_only=True)

    def __init__(self, bot: CantoBot) -> None:
        self.bot = bot

    @property
    def meetings(self) -> MeetingManager:
        assert self.bot.meetings is not None
        return self.bot.meetings

    async def _refuse(self, interaction: discord.Interaction, text: str) -> None:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    async def guild_readability(self, guild_id: int,
                                meeting: ReadabilityChoice | None = None) -> Readability:
        """The effective choice: the meeting's options, the guild's settings, the config."""
        stored = await self.bot.storage.guild_settings(guild_id)
        return resolve_readability(meeting, stored, self.bot.config.transcribe.readability)

    def _check_manager(self, interaction: discord.Interaction) -> str | None:
        member = interaction.user
        if not isinstance(member, discord.Member):
            return "This command works in a server."
        role = self.bot.config.discord.manager_role
        if not may_manage(member, role):
            who = "the Manage Channels permission" + (f" or the **{role}** role" if role else "")
            return f"Only members with {who} can start or stop transcription."
        return None

    @group.command(name="start", description="Transcribe your voice channel into a text channel")
    @app_commands.describe(
        channel="Where transcripts go (default: this channel)",
        threads="One caption thread per speaker",
        captions="Live partial captions in the speaker threads",
        script="Characters for this meeting: hk, simplified or as-is (default: server setting)",
        jyutping="A Jyutping line under each sentence for this meeting: off or line",
        title="The minutes' title (default: the voice channel and the date)",
    )
    async def start(
        self,
        interaction: discord.Interaction,
        channel: discord.TextChannel | None = None,
        threads: bool | None = None,
        captions: bool | None = None,
        script: ScriptOption | None = None,
        jyutping: JyutpingOption | None = None,
        title: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        refusal = self._check_manager(interaction)
        if refusal:
            await self._refuse(interaction, refusal)
            return
        guild = interaction.guild
        member = interaction.user
        assert guild is not None and isinstance(member, discord.Member)
        voice = member.voice.channel if member.voice is not None else None
        if voice is None:
            await self._refuse(interaction, "Join a voice channel first, then use "
                                            "`/transcribe start`.")
            return
        target = channel or interaction.channel
        if not isinstance(target, discord.TextChannel):
            await self._refuse(interaction, "Pick a text channel for the transcript "
                                            "(the `channel` option).")
            return
        if missing_permissions(target.permissions_for(member), INVOKER_TEXT_PERMISSIONS):
            # The words of the voice room go only where whoever starts it can read them.
            await self._refuse(interaction, f"You cannot view and send messages in "
                                            f"{target.mention}, so I will not post the transcript "
                                            "there. Pick a channel you can post in.")
            return
        defaults = self.bot.config.transcribe
        threads = defaults.threads if threads is None else threads
        captions = defaults.captions if captions is None else captions
        me = guild.me
        text_perms = target.permissions_for(me)
        wanted = TEXT_PERMISSIONS + (THREAD_PERMISSIONS if threads or captions else ())
        missing = missing_permissions(text_perms, wanted)
        missing += [p for p in missing_permissions(voice.permissions_for(me), VOICE_PERMISSIONS)
                    if p not in missing]
        if missing:
            await self._refuse(interaction, "I am missing permissions: "
                               + ", ".join(f"**{p}**" for p in missing)
                               + f" (in #{outside(target.name)} / {outside(voice.name)}). Grant "
                               "them to my role, "
                               "then try again.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        readability = await self.guild_readability(guild.id, choice_of(script, jyutping))
        try:
            meeting = await self.meetings.start(
                guild=guild, voice_channel=voice, text_channel=target,
                threads=threads, captions=captions, readability=readability, title=title,
            )
        except CantobotError as exc:
            await interaction.followup.send(
                f"Could not start: {outside(exc.user_message, ERROR_BUDGET)}", ephemeral=True)
            return
        info = await self.bot.storage.meeting_info(meeting.meeting_id)
        number = f" (meeting #{info.number})" if info is not None else ""
        reply = (f"Transcribing **{outside(voice.name)}** into "
                 f"{target.mention}{number}.")
        reply += f"\nShown as: {readability.describe()}."
        if missing_permissions(text_perms, WEBHOOK_PERMISSIONS):
            reply += ("\nI am missing **Manage Webhooks** in #" + outside(target.name)
                      + ", so lines are posted by me with the speaker's name in bold; grant it "
                      "to show each line as its speaker.")
        await interaction.followup.send(reply, ephemeral=True)

    @group.command(name="stop", description="Stop transcribing and post the minutes")
    async def stop(self, interaction: discord.Interaction) -> None:
        refusal = self._check_manager(interaction)
        if refusal:
            await self._refuse(interaction, refusal)
            return
        assert interaction.guild is not None
        if self.meetings.get(interaction.guild.id) is None:
            await self._refuse(interaction, "Nothing is being transcribed in this server.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        minutes = await self.meetings.stop(interaction.guild.id, "stopped by "
                                           f"{outside(interaction.user.display_name)}")
        lines = len(minutes.segments) if minutes is not None else 0
        await interaction.followup.send(f"Stopped. {lines} line(s); the minutes are posted.",
                                        ephemeral=True)

    @group.command(name="status", description="Who is being transcribed and how it is going")
    async def status(self, interaction: discord.Interaction) -> None:
        assert interaction.guild is not None
        meeting = self.meetings.get(interaction.guild.id)
        if meeting is None:
            await interaction.response.send_message("Nothing is being transcribed here.",
                                                    ephemeral=True)
            return
        st = meeting.status()
        speakers = "\n".join(
            f"• {outside(s.name)}: {format_timestamp(s.seconds)} of audio, "
            f"upstream {s.upstream}" for s in st.speakers) or "• nobody has spoken yet"
        e2ee = (f"yes (DAVE), voice privacy code `{st.privacy_code}`" if st.e2ee and st.privacy_code
                else "yes (DAVE)" if st.e2ee else "no")
        shown = meeting.readability
        info = await self.bot.storage.meeting_info(st.meeting_id)
        number = info.number if info is not None else "?"
        text = (f"**Meeting #{number}**: {outside(st.voice_channel)} → "
                f"#{outside(st.text_channel)}, "
                f"running {format_timestamp(st.duration)}\n"
                f"Shown as: {shown.describe()}\n"
                f"Lines posted: {st.lines_posted}\n"
                f"Speech-to-text: {outside(st.upstream, ERROR_BUDGET)}\n"
                f"End-to-end encrypted: {e2ee}\n"
                f"{st.voice or 'voice packets: none yet'}\nSpeakers:\n{speakers}")
        await interaction.response.send_message(text, ephemeral=True)

    @group.command(name="minutes", description="Post the minutes of this or an earlier meeting")
    @app_commands.describe(session="Meeting number (default: the latest you can read)")
    async def minutes(self, interaction: discord.Interaction, session: int | None = None) -> None:
        guild, member = interaction.guild, interaction.user
        assert guild is not None
        if not isinstance(member, discord.Member):
            await self._refuse(interaction, "This command works in a server.")
            return
        storage = self.bot.storage
        role = self.bot.config.discord.manager_role
        info: MeetingInfo | None
        if session is None:
            readable = [m for m in await storage.meetings(guild.id, limit=1000)
                        if may_read_minutes(member, m, role)]
            info = readable[0] if readable else None
            if info is None:
                await self._refuse(interaction, "No meetings you can read are recorded in this "
                                                "server.")
                return
        else:
            info = await storage.meeting_by_number(guild.id, session)
            # One answer for "no such meeting" and "not yours to read": no probing private ones.
            if info is None or not may_read_minutes(member, info, role):
                await self._refuse(interaction, f"No meeting #{session} in this server that you "
                                                "can read.")
                return
        if info.forgotten_at is not None:
            await self._refuse(interaction, f"Meeting #{info.number} was forgotten: its lines are "
                                            "deleted, so there are no minutes to post.")
            return
        # Public only where the meeting's own lines were posted; anywhere else, just for you.
        ephemeral = interaction.channel_id != info.text_channel_id
        await interaction.response.defer(ephemeral=ephemeral, thinking=True)
        minutes = await storage.minutes(info.id)
        readability = await self.guild_readability(guild.id)
        post = MinutesPost.of(minutes, readability=readability)
        await post.send(functools.partial(interaction.followup.send, ephemeral=ephemeral))

    @group.command(name="forget", description="Delete a meeting's stored lines now (managers)")
    @app_commands.describe(meeting="Meeting number, as in /transcribe minutes")
    async def forget(self, interaction: discord.Interaction, meeting: int) -> None:
        refusal = self._check_manager(interaction)
        if refusal:
            await self._refuse(interaction, refusal.replace("start or stop transcription",
                                                            "forget a meeting"))
            return
        guild = interaction.guild
        assert guild is not None
        info = await self.bot.storage.meeting_by_number(guild.id, meeting)
        if info is None:
            await self._refuse(interaction, f"No meeting #{meeting} in this server.")
            return
        live = self.meetings.get(guild.id)
        if live is not None and live.meeting_id == info.id:
            await self._refuse(interaction, f"Meeting #{meeting} is still running: use "
                                            "`/transcribe stop` first, then forget it.")
            return
        await interaction.response.defer(ephemeral=True, thinking=True)
        try:
            deleted = await self.bot.storage.forget_meeting(info.id)
        except MeetingNotFound:  # retention deleted it meanwhile: nothing is left either way
            deleted = 0
        log.info("guild %s: meeting #%d (id %d) forgotten by user %s: %d line(s) deleted",
                 guild.id, info.number, info.id, interaction.user.id, deleted)
        await interaction.followup.send(
            f"Forgot meeting #{meeting}: {deleted} stored line(s) deleted; its minutes can no "
            "longer be posted. Messages already posted in Discord stay until deleted there.",
            ephemeral=True)

    @group.command(name="forget-me", description="Delete every stored line of mine in this server")
    async def forget_me(self, interaction: discord.Interaction) -> None:
        guild = interaction.guild
        assert guild is not None
        await interaction.response.defer(ephemeral=True, thinking=True)
        deleted = await self.bot.storage.forget_speaker(guild.id, interaction.user.id)
        log.info("guild %s: user %s had their stored lines forgotten: %d line(s) deleted",
                 guild.id, interaction.user.id, deleted)
        await interaction.followup.send(
            f"Deleted {deleted} stored line(s) of yours in this server. Messages already posted "
            "in Discord stay until deleted there; to stop being transcribed, use "
            "`/transcribe optout`.", ephemeral=True)

    @group.command(name="settings",
                   description="This server's default script and Jyutping for posts and minutes")
    @app_commands.describe(
        script="hk (Hong Kong Traditional), simplified, or as-is (as transcribed)",
        jyutping="line: a Jyutping line under each sentence; off: none",
    )
    async def settings(
        self,
        interaction: discord.Interaction,
        script: ScriptOption | None = None,
        jyutping: JyutpingOption | None = None,
    ) -> None:
        assert interaction.guild is not None
        guild_id = interaction.guild.id
        if script is not None or jyutping is not None:
            refusal = self._check_manager(interaction)
            if refusal:
                await self._refuse(interaction, refusal.replace("start or stop transcription",
                                                                "change these settings"))
                return
            await self.bot.storage.set_guild_settings(guild_id, choice_of(script, jyutping))
        shown = await self.guild_readability(guild_id)
        await interaction.response.send_message(
            f"This server's posts and minutes: **{shown.describe()}**. A meeting can choose "
            "otherwise with the `script` and `jyutping` options of `/transcribe start`; "
            "what was said is always stored as transcribed.", ephemeral=True)

    @group.command(name="optout", description="Never transcribe my voice")
    async def optout(self, interaction: discord.Interaction) -> None:
        await self.meetings.set_opt_out(interaction.user.id, True)
        await interaction.response.send_message(
            "You are opted out: your voice is never decoded or sent for transcription, in any "
            "meeting, until you use `/transcribe optin`.", ephemeral=True)

    @group.command(name="optin", description="Allow my voice to be transcribed again")
    async def optin(self, interaction: discord.Interaction) -> None:
        await self.meetings.set_opt_out(interaction.user.id, False)
        await interaction.response.send_message(
            "You are opted in: your voice is transcribed in meetings again.", ephemeral=True)

    async def cog_app_command_error(self, interaction: discord.Interaction,
                                    error: app_commands.AppCommandError) -> None:
        """Whatever failed, the member hears it (ephemeral) rather than "did not respond"."""
        original = getattr(error, "original", error)
        command = interaction.command.qualified_name if interaction.command else "?"
        log.error("/%s failed: %s", command, original, exc_info=original)
        reason = (original.user_message if isinstance(original, CantobotError)
                  else "an unexpected error (details are in the bot's log)")
        text = f"Sorry, `/{command}` failed: {reason}. Please try again."
        try:
            await self._refuse(interaction, text[:2000])
        except discord.HTTPException as exc:
            log.warning("could not tell %s that /%s failed: %s", interaction.user, command, exc)


async def setup(bot: CantoBot) -> None:
    await bot.add_cog(Transcribe(bot))

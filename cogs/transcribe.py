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

from bot.access import (
    START_OR_STOP,
    lacks_webhooks,
    manager_refusal,
    may_read_minutes,
    start_refusal,
)
from bot.errors import CantobotError
from bot.meeting import MeetingManager, MinutesPost
from bot.replies import start_reply, status_text
from bot.storage.common import MeetingInfo, MeetingNotFound
from bot.transcript.escape import ERROR_BUDGET, outside
from bot.transcript.format import cut_message
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

#: The choices of the script and jyutping options (bot/transcript/script.py: Script, JyutpingMode).
ScriptOption = Literal["hk", "simplified", "as-is"]
JyutpingOption = Literal["off", "line"]


def choice_of(script: str | None, jyutping: str | None) -> ReadabilityChoice:
    """Command options as a partial choice (an option not given stays ``None``)."""
    return ReadabilityChoice(parse_script(script) if script is not None else None,
                             parse_jyutping(jyutping) if jyutping is not None else None)


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
        text = cut_message(text)  # Discord counts UTF-16 units; names can be long
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)

    async def guild_readability(self, guild_id: int,
                                meeting: ReadabilityChoice | None = None) -> Readability:
        """The effective choice: the meeting's options, the guild's settings, the config."""
        stored = await self.bot.storage.guild_settings(guild_id)
        return resolve_readability(meeting, stored, self.bot.config.transcribe.readability)

    def _check_manager(self, interaction: discord.Interaction,
                       action: str = START_OR_STOP) -> str | None:
        return manager_refusal(interaction.user, self.bot.config.discord.manager_role, action)

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
        target = channel or interaction.channel
        text = target if isinstance(target, discord.TextChannel) else None
        defaults = self.bot.config.transcribe
        threads = defaults.threads if threads is None else threads
        captions = defaults.captions if captions is None else captions
        refusal = start_refusal(voice=voice, target=text, member=member, me=guild.me,
                                threads=threads or captions)
        if refusal is not None:
            await self._refuse(interaction, refusal)
            return
        assert voice is not None and text is not None  # else start_refusal said why not
        await interaction.response.defer(ephemeral=True, thinking=True)
        readability = await self.guild_readability(guild.id, choice_of(script, jyutping))
        try:
            meeting = await self.meetings.start(
                guild=guild, voice_channel=voice, text_channel=text,
                threads=threads, captions=captions, readability=readability, title=title,
            )
        except CantobotError as exc:
            await interaction.followup.send(
                f"Could not start: {outside(exc.user_message, ERROR_BUDGET)}", ephemeral=True)
            return
        info = await self.bot.storage.meeting_info(meeting.meeting_id)
        reply = start_reply(voice_name=voice.name, target_mention=text.mention,
                            target_name=text.name, number=info.number if info else None,
                            readability=readability, lacks_webhooks=lacks_webhooks(text, guild.me))
        await interaction.followup.send(cut_message(reply), ephemeral=True)

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
        info = await self.bot.storage.meeting_info(st.meeting_id)
        text = status_text(st, number=info.number if info is not None else None,
                           shown=meeting.readability)
        await interaction.response.send_message(cut_message(text), ephemeral=True)

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
        refusal = self._check_manager(interaction, "forget a meeting")
        if refusal:
            await self._refuse(interaction, refusal)
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
            refusal = self._check_manager(interaction, "change these settings")
            if refusal:
                await self._refuse(interaction, refusal)
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
            await self._refuse(interaction, text)
        except discord.HTTPException as exc:
            log.warning("could not tell %s that /%s failed: %s", interaction.user, command, exc)


async def setup(bot: CantoBot) -> None:
    await bot.add_cog(Transcribe(bot))

"""Who may use /transcribe, and what the bot lacks, decided without Discord: small fakes of
members and channels holding real ``discord.Permissions`` (the end-to-end refusals are in
tests/test_transcribe.py and tests/test_access.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import discord

from bot.access import (
    lacks_webhooks,
    manager_refusal,
    may_manage,
    may_read_minutes,
    missing_permissions,
    start_refusal,
)
from bot.storage.common import MeetingInfo

EVERYTHING = discord.Permissions.all()
NOTHING = discord.Permissions.none()
POSTER = discord.Permissions(view_channel=True, send_messages=True)


@dataclass
class FakeRole:
    name: str


@dataclass
class FakeGuild:
    channels: dict[int, Any] = field(default_factory=dict)

    def get_channel(self, channel_id: int) -> Any:
        return self.channels.get(channel_id)


@dataclass
class FakeMember:
    id: int
    guild_permissions: discord.Permissions = NOTHING
    roles: list[FakeRole] = field(default_factory=list)
    guild: FakeGuild = field(default_factory=FakeGuild)


@dataclass
class FakeChannel:
    name: str
    perms: dict[int, discord.Permissions]
    id: int = 5

    @property
    def mention(self) -> str:
        return f"<#{self.id}>"

    def permissions_for(self, member: FakeMember) -> discord.Permissions:
        return self.perms.get(member.id, NOTHING)


def member(**kw: Any) -> discord.Member:
    return cast(discord.Member, FakeMember(**kw))


def info(text_channel_id: int) -> MeetingInfo:
    return MeetingInfo(id=1, guild_id=1, text_channel_id=text_channel_id, voice_channel_id=3,
                       title="Standup", started_at=datetime.now(UTC), ended_at=None,
                       line_count=0, number=1)


ALICE, BOT = 1, 99


def test_missing_permissions_names_what_is_lacking_in_order() -> None:
    wanted = (("view_channel", "View Channel"), ("connect", "Connect"))
    assert missing_permissions(discord.Permissions(connect=True), wanted) == ["View Channel"]
    assert missing_permissions(EVERYTHING, wanted) == []


def test_managers_have_manage_channels_or_the_configured_role() -> None:
    assert may_manage(member(id=ALICE, guild_permissions=discord.Permissions(
        manage_channels=True)), None)
    assert may_manage(member(id=ALICE, roles=[FakeRole("Scribe")]), "Scribe")
    assert not may_manage(member(id=ALICE, roles=[FakeRole("Scribe")]), None)
    assert not may_manage(member(id=ALICE, roles=[FakeRole("Other")]), "Scribe")


def test_manager_refusal_says_who_may_and_what_for() -> None:
    plain = member(id=ALICE)
    assert manager_refusal(plain, "Scribe") == (
        "Only members with the Manage Channels permission or the **Scribe** role can "
        "start or stop transcription.")
    assert manager_refusal(plain, None, "forget a meeting") == (
        "Only members with the Manage Channels permission can forget a meeting.")
    assert manager_refusal(member(id=ALICE, roles=[FakeRole("Scribe")]), "Scribe") is None
    dm_user = discord.User(state=cast(Any, None), data=cast(Any, {
        "id": "1", "username": "alice", "discriminator": "0", "avatar": None}))
    assert manager_refusal(dm_user, None) == "This command works in a server."


def test_minutes_are_for_who_could_read_the_channel_and_for_managers() -> None:
    guild = FakeGuild({5: FakeChannel("minutes", {ALICE: discord.Permissions(
        view_channel=True, read_message_history=True)})})
    assert may_read_minutes(member(id=ALICE, guild=guild), info(5), None)
    assert not may_read_minutes(member(id=2, guild=guild), info(5), None)
    # A channel gone (or hidden from the bot): managers only.
    assert not may_read_minutes(member(id=ALICE, guild=guild), info(6), None)
    assert may_read_minutes(member(id=2, guild=guild, roles=[FakeRole("Scribe")]), info(6),
                            "Scribe")


def refusal(*, voice: FakeChannel | None, target: FakeChannel | None, threads: bool = False
            ) -> str | None:
    return start_refusal(voice=cast(discord.VoiceChannel | None, voice),
                         target=cast(discord.TextChannel | None, target),
                         member=member(id=ALICE), me=member(id=BOT), threads=threads)


def test_start_refusals_come_in_order_and_say_what_to_do() -> None:
    voice = FakeChannel("Standup", {BOT: EVERYTHING}, id=3)
    text = FakeChannel("minutes", {ALICE: POSTER, BOT: EVERYTHING})
    assert refusal(voice=voice, target=text, threads=True) is None
    assert refusal(voice=None, target=text) == (
        "Join a voice channel first, then use `/transcribe start`.")
    assert refusal(voice=voice, target=None) == (
        "Pick a text channel for the transcript (the `channel` option).")
    hidden = FakeChannel("secret", {BOT: EVERYTHING}, id=8)
    assert refusal(voice=voice, target=hidden) == (
        "You cannot view and send messages in <#8>, so I will not post the transcript there. "
        "Pick a channel you can post in.")


def test_start_names_every_permission_the_bot_lacks_once() -> None:
    voice = FakeChannel("Stand*up*", {BOT: discord.Permissions(view_channel=True)}, id=3)
    text = FakeChannel("minutes", {ALICE: POSTER, BOT: discord.Permissions(send_messages=True)})
    assert refusal(voice=voice, target=text) == (
        "I am missing permissions: **View Channel**, **Connect** (in #minutes / Stand\\*up\\*). "
        "Grant them to my role, then try again.")
    text.perms[BOT] = POSTER
    voice.perms[BOT] = EVERYTHING
    assert refusal(voice=voice, target=text) is None
    assert refusal(voice=voice, target=text, threads=True) == (
        "I am missing permissions: **Create Public Threads**, **Send Messages in Threads** "
        "(in #minutes / Stand\\*up\\*). Grant them to my role, then try again.")


def test_lacking_webhooks_is_told_not_refused() -> None:
    text = FakeChannel("minutes", {BOT: POSTER})
    me = member(id=BOT)
    assert lacks_webhooks(cast(discord.TextChannel, text), me)
    text.perms[BOT] = EVERYTHING
    assert not lacks_webhooks(cast(discord.TextChannel, text), me)

"""Spec for `/transcribe` (cogs/transcribe.py) as members see it: the real CantoBot, logged into
the loopback Discord (LocalDiscord, unmodified discord.py over TLS), streaming to the loopback
cantonese.ai fake (FakeSttServer), with members speaking tone-coded Cantonese in real time.

Each test runs one LocalDiscord and as few bot start-ups as its story needs (a start-up costs
discord.py's 2 s guild-ready wait); utterances are short (~0.72 s per Cantonese character).
What users see is ``LocalDiscord.messages`` (posts and edits) and the interaction records.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.app import CantoBot
from bot.config import Config, load_config, with_overrides
from bot.meeting import MeetingState
from bot.sim.discord import state as s
from bot.sim.discord.rest import InteractionRecord
from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.state import PostedMessage, RecordedRequest
from bot.sim.simulate import bot_config, running_bot
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track
from bot.storage.db import Storage
from bot.transcript.format import TRANSCRIBING_NOTICE, thread_name
from bot.transcript.model import Segment
from tests.test_minutes import validate_srt, validate_vtt

KEY = "test-key"
#: Bound on any one wait in these tests (s); real waits are a few seconds at most.
STEP_TIMEOUT = 30.0
#: Bound on a whole test, bot shutdown included.
TEST_TIMEOUT = 60.0
#: After the last utterance, let the decoder hear the pause that ends it.
TRAILING_SILENCE = 0.6
MINUTES_FILES = ("minutes.md", "minutes.srt", "minutes.vtt", "minutes.json")
#: Everything a bot could need, so a test can take away exactly one permission.
ALL_BOT_PERMISSIONS = s.BOT_ROLE_PERMISSIONS | s.PERM_CONNECT | s.PERM_CREATE_PUBLIC_THREADS


def say(*lines: tuple[float, str]) -> npt.NDArray[np.int16]:
    """Tone-coded lines at their start seconds -> 48 kHz stereo int16, as a client captures."""
    mono = speech_track(list(lines), 48000)
    pcm = np.clip(mono * 32767 * 0.5, -32768, 32767).astype(np.int16)
    return np.repeat(pcm[:, None], 2, axis=1)


@dataclass
class Harness:
    """One LocalDiscord + FakeSttServer, and the bot currently logged in (if any)."""

    discord: LocalDiscord
    stt: FakeSttServer
    tmp: Path
    bot: CantoBot | None = None
    records: list[InteractionRecord] = field(default_factory=list)

    @property
    def ids(self) -> dict[str, int]:
        return self.discord.member_ids

    def config(self, *, key: str = KEY, guilds: bool = True,
               **sections: dict[str, Any]) -> Config:
        stt = {"url": self.stt.url, "api_key": key, "reconnect_initial_delay": 0.1,
               "reconnect_max_delay": 0.5, **sections.pop("stt", {})}
        config = with_overrides(load_config(None, environ={}), stt=stt, **sections)
        config = bot_config(config, self.discord, str(self.tmp / "bot.sqlite3"))
        if not guilds:
            config = with_overrides(config, discord={"guilds": ""})
        return config

    @contextlib.asynccontextmanager
    async def running(self, config: Config) -> AsyncIterator[CantoBot]:
        async with running_bot(config) as bot:
            self.bot = bot
            try:
                yield bot
            finally:
                self.bot = None

    async def invoke(self, command: str, options: dict[str, Any] | None = None, *,
                     by: str = "alice") -> InteractionRecord:
        """``/command`` typed by ``by``; returns once the bot answered (reply or follow-up)."""
        record = await self.discord.invoke(command, options or {}, user_id=self.ids[by])
        self.records.append(record)
        async with asyncio.timeout(STEP_TIMEOUT):
            await record.wait_until(
                lambda r: bool(r.followup_message_ids) or bool(r.response_content))
        return record

    def answer(self, record: InteractionRecord) -> str:
        return (record.response_content + "\n" + "\n".join(record.followup_contents)).strip()

    @property
    def meeting(self) -> Any:
        assert self.bot is not None and self.bot.meetings is not None
        return self.bot.meetings.get(self.discord.guild_id)

    async def start(self, options: dict[str, Any] | None = None, *, by: str = "alice",
                    dave: bool = False) -> InteractionRecord:
        record = await self.invoke("transcribe start", options, by=by)
        assert "Transcribing" in self.answer(record), self.answer(record)
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:
                meeting = self.meeting
                if (meeting is not None and meeting.state is MeetingState.LIVE
                        and (not dave or meeting.status().e2ee)):
                    break
                await asyncio.sleep(0.02)
        return record

    async def speak(self, lines: dict[str, list[tuple[float, str]]]) -> None:
        """Members say their lines concurrently, in real time, then a short pause."""
        await asyncio.gather(*(self.discord.speak(self.ids[name], say(*said))
                               for name, said in lines.items()))
        await asyncio.sleep(TRAILING_SILENCE)

    def posted(self) -> list[PostedMessage]:
        """What members see in the channel and threads (interaction answers left out)."""
        answers = {mid for r in self.records for mid in r.followup_message_ids}
        return [m for m in self.discord.messages if m.message_id not in answers]

    def requests(self, method: str, pattern: str) -> list[RecordedRequest]:
        return [r for r in self.discord.requests
                if r.method == method and re.search(pattern, r.path)]

    async def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                while not predicate():  # noqa: ASYNC110 - bot, fakes and storage together
                    await asyncio.sleep(0.02)
        except TimeoutError:
            raise AssertionError(f"timed out waiting for {what}") from None


@contextlib.asynccontextmanager
async def harness(tmp_path: Path, *, dave: bool = False, humans: tuple[str, ...] = ("alice", "bob"),
                  stt_key: str = KEY) -> AsyncIterator[Harness]:
    async with asyncio.timeout(TEST_TIMEOUT), FakeSttServer(api_key=stt_key) as stt, \
            LocalDiscord(human_names=humans, moderators=("alice",), dave=dave) as discord:
        yield Harness(discord, stt, tmp_path)


def lines_in(messages: list[PostedMessage], *, thread: str | None = None) -> list[str]:
    return [line for m in messages if m.thread == thread and not m.edit
            for line in m.content.split("\n")]


def minutes_uploads(h: Harness) -> list[RecordedRequest]:
    """Posts with files: minutes at stop (channel) or re-posted (interaction follow-up)."""
    return [r for r in h.discord.requests if r.method == "POST" and r.files]


def check_minutes_files(request: RecordedRequest, speakers: set[str]) -> dict[str, str]:
    """The four attachments are there and parse; returns them by name."""
    assert set(request.files) == set(MINUTES_FILES), request.files
    files = {name: body.decode("utf-8") for name, body in
             zip(request.files, request.file_contents, strict=True)}
    srt = validate_srt(files["minutes.srt"])
    vtt = validate_vtt(files["minutes.vtt"])
    assert len(srt) == len(vtt) > 0
    assert {voice for _, _, voice, _ in vtt} == speakers
    data = json.loads(files["minutes.json"])
    assert data  # the JSON parses; its shape is specified in tests/test_minutes.py
    for name in speakers:
        assert name in files["minutes.md"]
    return files


async def set_role_permissions(discord: LocalDiscord, role: s.Role, permissions: int) -> None:
    """Change any role's permissions and tell the bot (GUILD_ROLE_UPDATE), as Discord does."""
    role.permissions = permissions
    await discord.gateway.dispatch("GUILD_ROLE_UPDATE", {
        "guild_id": str(discord.guild_id), "role": discord.world.role_payload(role)})


async def bot_has(h: Harness, permissions: int) -> None:
    """Give the bot exactly ``permissions`` (@everyone too) and wait until it knows."""
    await set_role_permissions(h.discord, h.discord.world.everyone_role,
                               permissions & s.EVERYONE_PERMISSIONS)
    await h.discord.set_bot_permissions(permissions)
    assert h.bot is not None
    guild = h.bot.get_guild(h.discord.guild_id)
    assert guild is not None
    await h.wait_for(lambda: guild.me.guild_permissions.value == permissions,
                     "the bot to see its new permissions")


# -- a meeting as members see it ------------------------------------------------------------------


async def test_a_two_speaker_meeting_with_threads_and_captions_from_start_to_minutes(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, dave=True) as h:
        config = h.config(transcribe={"caption_edit_interval": 1.0})
        async with h.running(config):
            for name in ("alice", "bob"):
                await h.discord.member_join_voice(h.ids[name])
            start = await h.start({"threads": True, "captions": True}, dave=True)
            assert start.ephemeral and "Transcribing" in h.answer(start)

            # Consent: a notice in the channel saying how to opt out, and the nickname.
            notice = h.posted()[0]
            assert notice.thread is None and "being transcribed" in notice.content
            assert "/transcribe optout" in notice.content
            nick = h.requests("PATCH", r"/members/@me$")
            assert nick and nick[-1].json["nick"].endswith(TRANSCRIBING_NOTICE)

            await h.speak({"alice": [(0.2, "大家好"), (3.4, "開會")],
                           "bob": [(1.0, "預算")]})
            await h.wait_for(lambda: len(h.meeting.status().speakers) == 2
                             and h.meeting.status().lines_posted == 3, "three committed lines")

            status = await h.invoke("transcribe status", by="bob")
            text = h.answer(status)
            assert status.ephemeral
            assert "alice" in text and "bob" in text
            assert "Lines posted: 3" in text
            assert re.search(r"running \d\d:\d\d", text)
            assert "Speech-to-text: streaming" in text or "Speech-to-text: idle" in text, text
            code = h.meeting.status().privacy_code
            assert code and f"yes (DAVE), voice privacy code `{code}`" in text
            # The receiver's counters: every datagram decoded or dropped by reason.
            # (RTCP reports are counted apart from media; nothing else is dropped here.)
            assert re.search(r"voice packets: [\d,]+ decoded; "
                             r"(none dropped|[\d,]+ dropped \(rtcp [\d,]+\))", text), text

            stop = await h.invoke("transcribe stop")
            assert stop.ephemeral and "Stopped. 3 line(s)" in h.answer(stop)
            assert h.meeting is None
            assert h.discord.world.bot.voice_channel_id is None, "the bot left the voice channel"

        posted = h.posted()
        # Each line in the channel as the speaker (webhook persona), with the time of speech.
        channel = [m for m in posted if m.thread is None and not m.edit]
        by_alice = [m.content for m in channel if m.author == "alice"]
        by_bob = [m.content for m in channel if m.author == "bob"]
        assert re.fullmatch(r"`\[00:0\d\]` 大家好\n?(`\[00:0\d\]` 開會)?", by_alice[0]), by_alice
        assert "\n".join(by_alice).endswith("開會") and by_bob == [by_bob[0]]
        assert re.fullmatch(r"`\[00:0\d\]` 預算", by_bob[0])
        assert all(m.allowed_mentions == {"parse": []} for m in posted)

        # One caption thread per speaker, created once even though alice spoke twice.
        created = [r.json["name"] for r in h.requests("POST", r"^/channels/\d+/threads$")]
        assert sorted(created) == [thread_name("alice"), thread_name("bob")]
        for name, said in (("alice", ["大家好", "開會"]), ("bob", ["預算"])):
            thread = thread_name(name)
            final: dict[int, str] = {}
            edits: dict[int, list[PostedMessage]] = {}
            for m in posted:
                if m.thread == thread:
                    final[m.message_id] = m.content
                    edits.setdefault(m.message_id, []).append(m)
            # The same lines as in the channel: each caption ends as the committed text.
            assert [re.sub(r"^`\[\d\d:\d\d\]` ", "", t) for t in final.values()] == said
            for versions in edits.values():
                partial = [v for v in versions if v.content.endswith("\u2026")]
                assert partial, f"no live caption in {thread}"
                gaps = [b.at - a.at for a, b in zip(partial, partial[1:], strict=False)]
                assert all(gap >= 0.9 for gap in gaps), f"caption edits too fast: {gaps}"

        # Stop: the minutes, after every line, with four parseable attachments.
        (upload,) = minutes_uploads(h)
        (summary,) = [m for m in posted if m.attachments]
        assert summary == [m for m in posted if m.thread is None][-1], "minutes come last"
        assert "2 participants" in summary.content and "3 lines" in summary.content
        files = check_minutes_files(upload, {"alice", "bob"})
        assert "預算" in files["minutes.md"]
        # Each line's timestamped twin amended the stored line (words), adding no line.
        segments = json.loads(files["minutes.json"])["segments"]
        assert len(segments) == 3 and all(seg["words"] for seg in segments), segments
        assert not h.requests("PATCH", r"/members/@me$")[-1].json["nick"], "nickname restored"


# -- who may start, and what the bot needs --------------------------------------------------------


async def test_permissions_are_checked_with_clear_ephemeral_answers_and_webhooks_fall_back(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        # The configured manager role is "Moderator", here without Manage Channels: alice has
        # the role and nothing else; bob has neither.
        h.discord.world.moderator_role.permissions = s.EVERYONE_PERMISSIONS
        async with h.running(h.config(discord={"manager_role": "Moderator"})):
            await h.discord.member_join_voice(h.ids["bob"])
            for command in ("transcribe start", "transcribe stop"):
                refused = await h.invoke(command, by="bob")
                assert refused.ephemeral
                assert h.answer(refused) == ("Only members with the Manage Channels permission "
                                             "or the **Moderator** role can start or stop "
                                             "transcription.")
            assert h.meeting is None

            # alice may (the role), but she is in no voice channel.
            nowhere = await h.invoke("transcribe start")
            assert nowhere.ephemeral and "Join a voice channel first" in h.answer(nowhere)
            await h.discord.member_join_voice(h.ids["alice"])

            for missing, label in ((s.PERM_CONNECT, "Connect"),
                                   (s.PERM_SEND_MESSAGES, "Send Messages"),
                                   (s.PERM_CREATE_PUBLIC_THREADS, "Create Public Threads")):
                await bot_has(h, ALL_BOT_PERMISSIONS & ~missing)
                refused = await h.invoke("transcribe start", {"threads": True})
                assert refused.ephemeral
                assert f"missing permissions: **{label}**" in h.answer(refused), h.answer(refused)
                assert h.meeting is None and h.discord.world.bot.voice_channel_id is None

            # Without Manage Webhooks it starts, says so, and posts lines itself, name in bold.
            await bot_has(h, ALL_BOT_PERMISSIONS & ~s.PERM_MANAGE_WEBHOOKS)
            start = await h.start()
            assert start.ephemeral and "**Manage Webhooks**" in h.answer(start), h.answer(start)
            await h.speak({"bob": [(0.2, "你好")]})
            await h.wait_for(lambda: h.meeting.status().lines_posted == 1, "bob's line")

            status = await h.invoke("transcribe status")
            assert "End-to-end encrypted: no" in h.answer(status)
            stop = await h.invoke("transcribe stop")
            assert "Stopped. 1 line(s)" in h.answer(stop)

        lines = [m for m in h.posted() if m.content.startswith("**bob**")]
        assert len(lines) == 1 and re.fullmatch(r"\*\*bob\*\* `\[00:0\d\]` 你好", lines[0].content)
        assert lines[0].author.startswith("Cantobot")
        app = h.discord.application_id  # interaction follow-ups use /webhooks/{app id}/...
        assert not [r for r in h.requests("POST", r"^/webhooks/")
                    if not r.path.startswith(f"/webhooks/{app}/")], "no line went by webhook"
        check_minutes_files(minutes_uploads(h)[-1], {"bob"})


# -- a member's own choice ------------------------------------------------------------------------


async def test_an_opted_out_member_never_reaches_the_stt_server_even_after_a_restart(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        async with h.running(h.config()):
            optout = await h.invoke("transcribe optout", by="bob")
            assert optout.ephemeral and "/transcribe optin" in h.answer(optout)
        # Commands went to the configured guild.
        assert h.requests("PUT", rf"^/applications/\d+/guilds/{h.discord.guild_id}/commands$")
        assert not h.requests("PUT", r"^/applications/\d+/commands$")

        # The same SQLite file, a new bot process; no guilds configured: global sync.
        async with h.running(h.config(guilds=False)):
            assert h.requests("PUT", r"^/applications/\d+/commands$")
            for name in ("alice", "bob"):
                await h.discord.member_join_voice(h.ids[name])
            await h.start()
            await h.speak({"alice": [(0.2, "早晨")], "bob": [(0.2, "秘密")]})
            await h.wait_for(lambda: h.meeting.status().lines_posted >= 1, "alice's line")
            # Never decoded (nor decrypted): the meeting has the receiver drop his packets by
            # SSRC before anything else; dropping his audio later would give the same lines.
            receiver = h.meeting.intake.receiver
            assert receiver.counters().ignored > 0
            assert receiver.decoded_by_member[h.ids["bob"]] == 0
            assert receiver.decoded_by_member[h.ids["alice"]] > 0
            await h.invoke("transcribe stop")

            # One STT session, alice's; not one byte of bob's audio, not one session for him.
            sessions = [r for r in h.stt.records.values() if r.session_starts]
            assert len(sessions) == 1 and sessions[0].committed == ["早晨"]
            assert "秘密" not in h.stt.committed_texts
            assert not any("秘密" in m.content for m in h.discord.messages)

            optin = await h.invoke("transcribe optin", by="bob")
            assert optin.ephemeral and "opted in" in h.answer(optin)
            assert h.bot is not None and h.bot.meetings is not None
            assert not h.bot.meetings.is_opted_out(h.ids["bob"])
            assert not await h.bot.storage.is_opted_out(h.ids["bob"])

            # If the choice cannot be stored, the member is told so, not left guessing.
            await h.bot.storage.close()
            failed = await h.invoke("transcribe optout", by="bob")
            assert failed.ephemeral
            assert h.answer(failed).startswith("Sorry, `/transcribe optout` failed: "), \
                h.answer(failed)
            assert not h.bot.meetings.is_opted_out(h.ids["bob"])


# -- minutes, retention, and a meeting that ends by itself ----------------------------------------


async def seed_meeting(storage: Storage, guild_id: int, days_ago: float, text: str,
                       text_channel_id: int = 1) -> int:
    """A finished meeting of ``days_ago`` with one line of alice's."""
    started = datetime.now(UTC) - timedelta(days=days_ago)
    meeting_id = await storage.start_meeting(guild_id=guild_id, text_channel_id=text_channel_id,
                                             voice_channel_id=2, title="Earlier meeting",
                                             started_at=started)
    await storage.add_line(meeting_id, Segment(speaker="alice", text=text, start=1.0, end=2.0,
                                               speaker_id=7))
    await storage.end_meeting(meeting_id, started + timedelta(minutes=5))
    return meeting_id


async def test_old_meetings_are_purged_earlier_minutes_reposted_and_an_empty_call_ends_itself(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        config = h.config(storage={"retention_days": 30},
                          transcribe={"empty_channel_timeout": 1.0})
        storage = await Storage.open(config.storage.path)
        try:
            general = h.discord.text_channel_id
            old = await seed_meeting(storage, h.discord.guild_id, 40, "舊嘢", general)
            recent = await seed_meeting(storage, h.discord.guild_id, 2, "上次", general)
        finally:
            await storage.close()

        async with h.running(config) as bot:
            # The purge runs at start, concurrently with login: wait for it (bounded), as
            # "h.bot is set" was true from the first moment and synchronised nothing.
            await h.wait_for(bot.is_ready, "the bot to log in")
            kept: list[int] = []
            try:
                async with asyncio.timeout(STEP_TIMEOUT):
                    # noqa below: storage offers no event for "the purge ran"
                    while (kept := [m.id for m in await bot.storage.meetings(  # noqa: ASYNC110
                            h.discord.guild_id)]) != [recent]:
                        await asyncio.sleep(0.02)
            except TimeoutError:
                raise AssertionError(f"the 40-day-old meeting is kept at start: {kept}") from None

            gone = await h.invoke("transcribe minutes", {"session": old})
            assert h.answer(gone) == f"No meeting #{old} in this server that you can read."
            earlier = await h.invoke("transcribe minutes", {"session": recent})
            assert h.answer(earlier).startswith("**Minutes: Earlier meeting**")
            assert not earlier.ephemeral, "minutes are for everyone in the channel"
            (upload,) = minutes_uploads(h)
            assert "上次" in check_minutes_files(upload, {"alice"})["minutes.md"]

            # alice starts, says one line and leaves: the meeting ends by itself.
            await h.discord.member_join_voice(h.ids["alice"])
            await h.start()
            live = h.meeting
            await h.speak({"alice": [(0.2, "拜拜")]})
            await h.wait_for(lambda: live.lines >= 1, "alice's line")
            await h.discord.leave_voice(h.ids["alice"])
            await h.wait_for(lambda: live.state is MeetingState.ENDED, "the meeting to end")
            assert h.meeting is None and h.discord.world.bot.voice_channel_id is None
            await h.wait_for(lambda: len(minutes_uploads(h)) == 2, "the minutes")
            assert "拜拜" in check_minutes_files(minutes_uploads(h)[-1], {"alice"})["minutes.md"]

            # /transcribe minutes with no session: the latest one, the meeting just ended.
            latest = await h.invoke("transcribe minutes", by="bob")
            assert not latest.ephemeral
            await h.wait_for(lambda: len(minutes_uploads(h)) == 3, "the re-posted minutes")
            assert "拜拜" in check_minutes_files(minutes_uploads(h)[-1], {"alice"})["minutes.md"]


# -- trouble upstream is said once, where the users are -------------------------------------------


def notices(h: Harness, marker: str) -> list[str]:
    return [m.content for m in h.posted() if not m.edit and marker in m.content]


async def test_a_rejected_key_and_an_outage_are_each_said_once_in_the_channel(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path, stt_key="the-real-key") as h:  # the bot's key is wrong
        async with h.running(h.config()):
            for name in ("alice", "bob"):
                await h.discord.member_join_voice(h.ids[name])
            await h.start()
            await h.speak({"alice": [(0.2, "你好")], "bob": [(0.4, "收到")]})
            await h.wait_for(lambda: bool(notices(h, "rejected the API key")), "the notice")
            status = await h.invoke("transcribe status")
            assert "rejected the API key" in h.answer(status)
            await h.invoke("transcribe stop")

            # The key is fixed upstream; a new meeting, then the service goes away and returns.
            h.stt.api_key = KEY
            await h.start()
            await h.speak({"alice": [(0.2, "早晨")]})
            await h.wait_for(lambda: h.meeting.lines == 1, "alice's line")
            await h.stt.stop()
            await h.speak({"alice": [(0.2, "斷咗")], "bob": [(0.3, "冇聲")]})
            await h.stt.start()
            await h.wait_for(lambda: h.meeting.lines == 3, "the lines said during the outage")
            await h.speak({"bob": [(0.2, "返嚟")]})
            await h.wait_for(lambda: h.meeting.lines == 4, "bob's line after the outage")
            await h.invoke("transcribe stop")

        # Two speakers, two troubles: one message for each trouble and one for the recovery.
        # What the rejected key kept from being transcribed is said too, per speaker (issue 12
        # item 16: a loss is never silent); nothing is lost in the outage.
        losses = notices(h, "could not be transcribed")
        assert losses and all("of alice's speech" in x or "of bob's speech" in x
                              for x in losses), losses
        warnings = [w for w in notices(h, "\N{WARNING SIGN}") if w not in losses]
        assert len(warnings) == 2 and "rejected the API key" in warnings[0], warnings
        assert "retrying" in warnings[1]
        assert len(notices(h, "Speech-to-text is back")) == 1
        said = [re.sub(r"^`\[\d\d:\d\d\]` ", "", m.content) for m in h.posted()
                if m.author in ("alice", "bob") and not m.edit]
        assert sorted(said) == sorted(["早晨", "斷咗", "冇聲", "返嚟"]), said


# -- the command line -----------------------------------------------------------------------------


def test_cantobot_run_without_a_token_says_in_one_line_how_to_get_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if k not in ("DISCORD_TOKEN", "CANTONESE_AI_API_KEY")}
    done = subprocess.run([sys.executable, "-m", "bot", "run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert "DISCORD_TOKEN" in line and "discord.com/developers" in line
    assert "cantobot simulate" in line


# -- readability: the server's script and Jyutping (issue 14) ------------------------------------


async def test_server_settings_are_for_managers_survive_a_restart_and_shape_reposted_minutes(
    tmp_path: Path,
) -> None:
    async with harness(tmp_path) as h:
        config = h.config()
        storage = await Storage.open(config.storage.path)
        try:
            earlier = await seed_meeting(storage, h.discord.guild_id, 1, "我哋今日開會")
        finally:
            await storage.close()
        async with h.running(config):
            await h.wait_for(lambda: bool(h.bot), "the bot")
            refused = await h.invoke("transcribe settings", {"script": "simplified"}, by="bob")
            assert refused.ephemeral and "can change these settings" in h.answer(refused)
            changed = await h.invoke("transcribe settings",
                                     {"script": "simplified", "jyutping": "line"})
            assert changed.ephemeral and "**Simplified, with Jyutping**" in h.answer(changed)

        async with h.running(config):  # a restart: the choice comes back from storage
            await h.wait_for(lambda: bool(h.bot), "the bot")
            shown = await h.invoke("transcribe settings", by="bob")  # anyone may look
            assert "**Simplified, with Jyutping**" in h.answer(shown)
            await h.invoke("transcribe minutes", {"session": earlier})
            await h.wait_for(lambda: len(minutes_uploads(h)) == 1, "the re-posted minutes")
            files = check_minutes_files(minutes_uploads(h)[-1], {"alice"})
            assert "我哋今日开会\\\n*ngo5dei6 gam1jat6 hoi1wui2*" in files["minutes.md"]
            (segment,) = json.loads(files["minutes.json"])["segments"]
            assert segment["text"] == "我哋今日開會"  # stored as said
            assert segment["shown_text"] == "我哋今日开会"
            assert segment["jyutping"][0] == {"word": "我哋", "jyutping": "ngo5 dei6"}

            # A meeting's own options are accepted next to the server's; status says the choice.
            await h.discord.member_join_voice(h.ids["alice"])
            await h.start({"script": "hk", "jyutping": "off", "title": "Budget review"})
            status = h.answer(await h.invoke("transcribe status"))
            assert re.search(r"^Shown as: .+, (with|no) Jyutping$", status, re.M), status
            await h.invoke("transcribe stop")

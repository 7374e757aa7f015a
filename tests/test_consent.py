"""Consent in every room and identity by user id (issue 11, items 2, 4-7), on loopback.

The real bot (discord.py, voice receiver, Socket.IO sessions, SQLite) against LocalDiscord and
the cantonese.ai fake, driven as in tests/test_reliability.py: members speak tone-coded
sentences the fake decodes back to text, so each test knows what may and may not appear.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from pathlib import Path

from bot.meeting import MeetingState
from bot.meeting.consent import Encryption, format_privacy_code
from bot.sim.discord.state import PostedMessage
from bot.sim.stt_server import SidRecord
from bot.transcript.format import thread_name
from tests.test_reliability import (
    HOST,
    Rig,
    lines_of,
    notices,
    rig,
    track,
    until,
    voice_session_renewed,
)

PROVIDER_NAMED = "transcribed by cantonese.ai"
GROUPED_CODE = re.compile(r"`(\d{5} ){5}\d{5}`")


def in_channel(r: Rig, channel_id: int) -> list[PostedMessage]:
    name = r.discord.world.channel(channel_id).name
    return [m for m in r.discord.messages if m.channel == name and m.thread is None
            and not m.edit]


def consent_in(r: Rig, channel_id: int) -> list[PostedMessage]:
    return [m for m in in_channel(r, channel_id) if "/transcribe optout" in m.content]


def records_with_audio(r: Rig) -> list[SidRecord]:
    return [rec for rec in r.stt.records.values() if rec.chunks]


# -- 4. opting out mid-sentence --------------------------------------------------------------------


async def test_opting_out_mid_sentence_sends_posts_and_stores_nothing_more(tmp_path: Path) -> None:
    sentence = ["開會討論預算"]
    # Captions are edited at most every 5 s: a newer partial waits in the queue meanwhile.
    async with rig(tmp_path, transcribe={"captions": True, "caption_edit_interval": 5.0}) as r:
        r.stt.hold_commits = True  # the recogniser is slow: the sentence is not committed yet
        speaking = asyncio.create_task(r.speak("bob", track(*sentence)))
        # Mid-sentence: more than a second of bob's audio has reached the service.
        await until(lambda: any(rec.audio_bytes > 2 * 16000 * 1.5
                                for rec in records_with_audio(r)))
        # ... and his live caption shows the sentence so far, with a newer partial queued.
        await until(lambda: any(m.thread is not None and "bob" in m.thread
                                for m in r.discord.messages))
        (bob,) = records_with_audio(r)
        shown = len(bob.partials)
        await until(lambda: len(bob.partials) > shown)
        await asyncio.sleep(0.2)  # that partial reached the bot
        assert not speaking.done()
        optout = await r.discord.invoke("transcribe optout", {}, user_id=r.ids["bob"])
        async with asyncio.timeout(30):
            await optout.wait_until(lambda rec: rec.acknowledged)
        opted_out_at = time.monotonic()  # the bot has handled the command by now
        opted_out_wall = time.time()
        await speaking  # bob goes on talking to the end of his sentence
        await asyncio.sleep(1.0)
        assert await r.stt.release_commits() == 0, "bob's session is still open upstream"
        await asyncio.sleep(1.0)
        late = [t for t in bob.chunk_times if t > opted_out_at]
        assert not late, f"{len(late)} chunk(s) of bob's reached the service after his opt-out"
        assert bob.session_stops == 0, "his session was flushed (stop-session) not dropped"
        assert r.lines("bob") == []
        captions_after = [m for m in r.discord.messages
                          if m.thread is not None and "bob" in m.thread and m.at > opted_out_wall]
        assert captions_after == [], "bob's live caption was still edited after his opt-out"
        await r.stop_meeting()
        stored = r.bot.storage
        assert stored is not None
        meeting_id = max(m.id for m in await stored.meetings(r.discord.guild_id))
        minutes = await stored.minutes(meeting_id)
        assert all(s.speaker_id != r.ids["bob"] for s in minutes.segments), minutes.segments
        assert r.lines("bob") == []


# -- 5. moved to another voice channel -------------------------------------------------------------


async def test_a_move_is_told_in_the_new_room_and_here_before_its_audio_goes_anywhere(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        breakout = r.discord.second_voice_channel_id
        await r.discord.member_join_voice(r.ids["bob"], breakout)
        conn = r.discord.voice.connection
        await r.discord.move_bot(breakout)
        await voice_session_renewed(r, conn)
        await until(lambda: bool(consent_in(r, breakout))
                    and bool(notices(r.discord.messages, "Moved to **Breakout Room**")))
        (told,) = consent_in(r, breakout)
        assert PROVIDER_NAMED in told.content and "#general" in told.content
        moved = [m for m in in_channel(r, r.discord.text_channel_id)
                 if "Moved to **Breakout Room**" in m.content]
        assert len(moved) == 1 and PROVIDER_NAMED in moved[0].content
        assert "/transcribe optout" in moved[0].content
        await r.speak("bob", track("搬咗"))
        await r.wait_lines({"bob": ["搬咗"]})
        # Both notices were asked for (and, the bot awaiting Discord's answer, accepted) before
        # the first audio of the new room reached the speech service.
        posts = [q.at for q in r.discord.requests if q.method == "POST" and re.fullmatch(
            rf"/channels/({breakout}|{r.discord.text_channel_id})/messages", q.path)]
        first_audio = min(t for rec in records_with_audio(r) for t in rec.chunk_times)
        assert len(posts) >= 2 and first_audio > max(posts)


async def test_until_the_new_room_is_told_its_audio_is_dropped_and_the_meeting_ends(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        breakout = r.discord.second_voice_channel_id
        await r.discord.member_join_voice(r.ids["bob"], breakout)
        # Discord refuses the notice in the new room's chat (Send Messages denied there).
        r.discord.rest.refuse_posts_in.add(breakout)
        conn = r.discord.voice.connection
        await r.discord.move_bot(breakout)
        await voice_session_renewed(r, conn)
        speaking = asyncio.create_task(r.speak("bob", track("唔好聽")))
        await until(lambda: bool(notices(r.discord.messages, "Could not post the consent")))
        await until(lambda: any("minutes.md" in q.files for q in r.discord.requests))
        with contextlib.suppress(ValueError):  # the meeting ended and the bot left mid-way
            await speaking
        assert records_with_audio(r) == [], "audio of a room never told was sent"
        assert r.lines("bob") == []


async def test_follow_moves_off_ends_the_meeting_on_a_move(tmp_path: Path) -> None:
    async with rig(tmp_path, transcribe={"follow_moves": False}) as r:
        await r.speak("alice", track("之前"))
        await r.wait_lines({"alice": ["之前"]})
        meeting = r.meeting
        breakout = r.discord.second_voice_channel_id
        await r.discord.member_join_voice(r.ids["bob"], breakout)
        await r.discord.move_bot(breakout)
        await until(lambda: meeting.state is MeetingState.ENDED)
        assert notices(r.discord.messages, "`transcribe.follow_moves` is off")
        assert consent_in(r, breakout) == []
        assert any("minutes.md" in q.files for q in r.discord.requests)
        assert [rec for rec in records_with_audio(r) if rec.committed != ["之前"]] == []


# -- 2./6. the consent notice: where audio goes, encryption, both chats ---------------------------


async def test_the_consent_notice_is_in_both_chats_names_the_service_and_says_dave_is_off(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        text, voice = r.discord.text_channel_id, r.discord.voice_channel_id
        (here,) = consent_in(r, text)
        (room,) = consent_in(r, voice)
        for notice in (here, room):
            assert PROVIDER_NAMED in notice.content
            assert "**not** end-to-end encrypted (DAVE is off)" in notice.content
        assert "#general" in room.content
        status = await r.discord.invoke("transcribe status", {}, user_id=r.ids[HOST])
        async with asyncio.timeout(30):
            await status.wait_until(lambda rec: bool(rec.followup_contents or rec.response_content))
        assert "End-to-end encrypted: no" in status.response_content + "".join(
            status.followup_contents)


async def test_with_dave_the_notice_and_status_show_the_privacy_code_in_groups(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, dave=True, start=False) as r:
        await r.start_meeting()
        await until(lambda: r.meeting.status().e2ee)
        code = r.meeting.status().privacy_code
        assert code is not None and re.fullmatch(r"(\d{5} ){5}\d{5}", code), code
        for channel in (r.discord.text_channel_id, r.discord.voice_channel_id):
            (notice,) = consent_in(r, channel)
            assert "end-to-end encrypted (DAVE); voice privacy code" in notice.content
            assert GROUPED_CODE.search(notice.content), notice.content
        status = await r.discord.invoke("transcribe status", {}, user_id=r.ids[HOST])
        async with asyncio.timeout(30):
            await status.wait_until(lambda rec: bool(rec.followup_contents or rec.response_content))
        answer = status.response_content + "".join(status.followup_contents)
        assert f"voice privacy code `{code}`" in answer, answer


def test_privacy_code_groups_and_encryption_wording() -> None:
    assert format_privacy_code("123456789012345678901234567890") == (
        "12345 67890 12345 67890 12345 67890")
    assert format_privacy_code("12345 67890 12345 67890 12345 67890") == (
        "12345 67890 12345 67890 12345 67890")
    assert format_privacy_code("abc") == "abc" and format_privacy_code(None) is None
    assert "not** end-to-end" in Encryption(dave=False).describe()
    assert "being set up" in Encryption(dave=None).describe()
    assert "`12345 67890 12345 67890 12345 67890`" in Encryption(
        dave=True, privacy_code="123456789012345678901234567890").describe()


# -- 7. identity by user id -----------------------------------------------------------------------


async def test_two_members_named_alike_are_told_apart_and_nobody_posts_as_the_bot(
    tmp_path: Path,
) -> None:
    names = ("alice", "alicia", "mallory")
    async with rig(tmp_path, names=names, start=False,
                   transcribe={"threads": True, "captions": True}) as r:
        await r.discord.set_nick(r.ids["alicia"], "alice")
        await r.discord.set_nick(r.ids["mallory"], "Cantobot [transcribing]")
        await r.start_meeting()
        await r.speak("alice", track("早晨"))
        await r.wait_lines({"alice": ["早晨"]})
        await r.speak("alicia", track("你好"))
        await r.wait_lines({"alice": ["早晨"], "alice (2)": ["你好"]})
        await r.speak("mallory", track("我係機械人"))
        bot_names = {"Cantobot", "Cantobot [transcribing]"}
        await until(lambda: any("我係機械人" in m.content for m in r.discord.messages
                                if not m.edit and m.thread is None))
        (impostor,) = [m for m in r.discord.messages
                       if "我係機械人" in m.content and not m.edit and m.thread is None]
        assert impostor.author not in bot_names, impostor.author
        assert impostor.author.casefold() not in {n.casefold() for n in bot_names}
        await r.stop_meeting()
        created = [q.json["name"] for q in r.discord.requests
                   if q.method == "POST" and re.search(r"^/channels/\d+/threads$", q.path)]
        assert thread_name("alice") in created and thread_name("alice (2)") in created
        upload = next(q for q in r.discord.requests if "minutes.md" in q.files)
        markdown = upload.file_contents[upload.files.index("minutes.md")].decode()
        assert "alice (2)" in markdown and "早晨" in markdown and "你好" in markdown
        assert lines_of(r.discord.messages, "alice") == ["早晨"]


def test_minutes_tell_apart_two_speakers_of_one_name_by_user_id() -> None:
    from datetime import UTC, datetime

    from bot.transcript import minutes as fmt
    from bot.transcript.model import Minutes, Segment

    minutes = Minutes("m", datetime(2026, 1, 1, tzinfo=UTC), None, (
        Segment("alice", "one", 0.0, 1.0, speaker_id=1),
        Segment("alice", "two", 1.0, 2.0, speaker_id=2),
        Segment("alice", "three", 2.0, 3.0, speaker_id=1),
    ))
    assert minutes.participants == ("alice", "alice (2)")
    assert minutes.lines_per_speaker == {"alice": 2, "alice (2)": 1}
    assert "alice (2):** two" in fmt.to_markdown(minutes).replace("\\", "")
    assert minutes.labelled().labelled() == minutes.labelled()


async def test_a_session_discarded_sends_nothing_more_and_drops_a_commit_that_still_arrives(
) -> None:
    from bot.sim.stt_server import FakeSttServer
    from bot.stt.session import PartialText, SegmentCommitted, SegmentTimestamped
    from tests.test_stt_session import KEY, Recorder, chunks, make_session, pcm_of, timeline

    async with FakeSttServer(KEY) as server:
        server.hold_commits = True
        rec = Recorder()
        session = make_session(server.url, rec)
        await session.start()
        pcm = pcm_of(timeline("早晨"))
        for chunk in chunks(pcm):
            session.send_audio(chunk)
        await until(lambda: server.total_audio_bytes == len(pcm))
        await asyncio.sleep(0.3)  # the fake decoded the sentence and holds its commit
        (record,) = server.records.values()
        session.discard()  # the member opted out: from here on nothing of theirs goes on
        session.send_audio(pcm[:3200])
        await asyncio.sleep(0.2)
        assert record.audio_bytes == len(pcm), "audio given after the discard was sent"
        assert await server.release_commits() == 1  # still connected: the commit does arrive
        await asyncio.sleep(0.3)
        assert record.committed == ["早晨"]
        assert rec.of(SegmentCommitted) == rec.of(SegmentTimestamped) == []
        partials_before = len(rec.of(PartialText))
        await session.aclose()
        assert len(rec.of(PartialText)) == partials_before
        assert record.session_stops == 0

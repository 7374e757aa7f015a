"""The meeting's room against small fakes: consent before audio, moves, the empty-room stop."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import cast

import discord

from bot.meeting.consent import ConsentNotices, Encryption
from bot.meeting.room import Room, VoiceChannel
from bot.meeting.tasks import TaskOwner


@dataclass
class FakeChannel:
    id: int
    name: str


def vc(channel_id: int, name: str) -> VoiceChannel:
    return cast(discord.VoiceChannel, FakeChannel(channel_id, name))


@dataclass
class FakeIntake:
    channel: VoiceChannel
    moved_to: VoiceChannel | None = None
    humans: int = 1
    admitted: list[int] = field(default_factory=list)
    settled: list[bool] = field(default_factory=list)

    def follow_move(self) -> VoiceChannel | None:
        moved, self.moved_to = self.moved_to, None
        if moved is not None:
            self.channel = moved
        return moved

    async def settle(self, *, moved: bool) -> Encryption:
        self.settled.append(moved)
        return Encryption(dave=True, privacy_code="123456")

    def admit(self, channel_id: int) -> None:
        self.admitted.append(channel_id)

    def humans_in_channel(self) -> int:
        return self.humans


@dataclass
class FakeLedger:
    number: int = 7
    failure: str | None = None
    said: list[str] = field(default_factory=list)
    posted: list[tuple[int, ConsentNotices]] = field(default_factory=list)

    def say(self, text: str) -> None:
        self.said.append(text)

    async def post_consent(self, voice_channel: VoiceChannel,
                           notices: ConsentNotices) -> str | None:
        self.posted.append((voice_channel.id, notices))
        return self.failure


@dataclass
class Rig:
    intake: FakeIntake
    ledger: FakeLedger
    tasks: TaskOwner
    room: Room
    stops: list[str]
    live: list[bool]


def rig(*, follow_moves: bool = True, empty_timeout: float = 60.0) -> Rig:
    intake, ledger, tasks = FakeIntake(vc(10, "Standup")), FakeLedger(), TaskOwner()
    stops: list[str] = []
    live = [True]

    async def stop(reason: str) -> None:
        stops.append(reason)
        live[0] = False

    room = Room(guild_id=1, intake=intake, notices=ledger, tasks=tasks,
                text_channel_name="minutes", threads=False, stt_url="wss://stt.example/ws",
                follow_moves=follow_moves, empty_timeout=empty_timeout,
                is_live=lambda: live[0], stop=stop)
    return Rig(intake, ledger, tasks, room, stops, live)


async def settle(tasks: TaskOwner) -> None:
    for _ in range(5):
        await asyncio.sleep(0)
    await tasks.cancel_all()


async def test_a_room_is_admitted_only_once_its_notice_was_accepted() -> None:
    r = rig()
    assert await r.room.tell(vc(10, "Standup"), moved=False) is None
    assert r.intake.admitted == [10]
    assert r.intake.settled == [False]
    channel_id, notices = r.ledger.posted[0]
    assert channel_id == 10 and "meeting #7" in notices.transcript_channel
    assert "stt.example" in notices.voice_chat

    r.ledger.failure = "Missing permission to post in the voice chat."
    assert await r.room.tell(vc(10, "Standup"), moved=False) == r.ledger.failure
    assert r.intake.admitted == [10]  # no second admit


async def test_a_notice_accepted_for_a_room_already_left_admits_nothing() -> None:
    r = rig()
    assert await r.room.tell(vc(11, "Elsewhere"), moved=True) is None
    assert r.intake.admitted == []


async def test_a_move_tells_the_new_room_first_then_admits_it() -> None:
    r = rig()
    r.intake.moved_to = vc(11, "Design")
    r.room.follow_move()
    await settle(r.tasks)
    assert r.intake.settled == [True]
    assert r.ledger.posted[0][0] == 11
    assert "Moved to **Design**" in r.ledger.posted[0][1].transcript_channel
    assert r.intake.admitted == [11] and r.stops == []


async def test_a_move_whose_notice_fails_ends_the_meeting_unheard() -> None:
    r = rig()
    r.ledger.failure = "Discord refused the message."
    r.intake.moved_to = vc(11, "Design")
    r.room.follow_move()
    await settle(r.tasks)
    assert r.intake.admitted == []
    assert r.stops == ["consent notice not posted after a move"]
    assert "Nothing of that room was sent" in r.ledger.said[0]


async def test_follow_moves_off_stops_without_telling_the_new_room() -> None:
    r = rig(follow_moves=False)
    r.intake.moved_to = vc(11, "Design")
    r.room.follow_move()
    await settle(r.tasks)
    assert r.ledger.posted == [] and r.intake.admitted == []
    assert r.stops == ["moved to another voice channel"]
    assert "`transcribe.follow_moves` is off" in r.ledger.said[0]


async def test_a_move_after_the_meeting_stopped_is_not_followed() -> None:
    r = rig()
    r.live[0] = False
    r.intake.moved_to = vc(11, "Design")
    r.room.follow_move()
    await settle(r.tasks)
    assert r.ledger.posted == [] and r.stops == []


async def test_an_empty_room_ends_the_meeting_after_the_timeout() -> None:
    r = rig(empty_timeout=0.05)
    r.intake.humans = 0
    r.room.check()
    r.room.check()  # a second voice state change does not restart the timer
    await asyncio.sleep(0.3)
    await settle(r.tasks)
    assert r.stops == ["voice channel empty"]


async def test_someone_coming_back_cancels_the_empty_room_stop() -> None:
    r = rig(empty_timeout=0.05)
    r.intake.humans = 0
    r.room.check()
    r.intake.humans = 1
    r.room.check()
    await asyncio.sleep(0.3)
    await settle(r.tasks)
    assert r.stops == []


async def test_a_stopping_meeting_cancels_the_empty_room_stop() -> None:
    r = rig(empty_timeout=0.05)
    r.intake.humans = 0
    r.room.check()
    r.room.cancel_timer()
    await asyncio.sleep(0.3)
    await settle(r.tasks)
    assert r.stops == []

"""`cantobot simulate` and `cantobot demo`: the real bot against a local Discord.

The bot that runs here is the one `cantobot run` runs (:class:`bot.app.CantoBot`), configured
through the public keys ``discord.api_base``, ``discord.gateway_url`` and ``discord.ca_file``;
only the other side of the sockets is simulated. A member invokes ``/transcribe start``, the
simulated members speak their files concurrently in real time (Opus, RTP, transport encryption
and DAVE as Discord sends them), then ``/transcribe stop`` posts the minutes and we exit.

The steps are reusable: :class:`Simulation` is an async context manager (local Discord + bot)
with one method per step (members join, ``/transcribe start``, members speak, leave, rejoin,
``/transcribe stop``); :func:`simulate` runs the usual sequence of them, and the end-to-end
tests drive them one by one (a member leaving mid-meeting, a damaged DAVE commit, ...).

``demo`` adds the loopback speech-to-text fake and generated, tone-coded Cantonese speech, so it
needs neither a Discord token nor a cantonese.ai key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import discord
import numpy as np
import numpy.typing as npt

from bot.app import CantoBot, redirect_discord
from bot.audio.convert import StreamConverter
from bot.audio.files import AudioClip, read_audio
from bot.config import Config, load_config, with_overrides
from bot.errors import CantobotError
from bot.meeting import Meeting, MeetingState
from bot.sim.dave_group import LIBDAVE_MISSING, MEMBER_DAVE_KINDS, libdave_available
from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.state import PostedMessage
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track

log = logging.getLogger(__name__)

#: Bounded waits of the simulation (seconds).
READY_TIMEOUT = 30.0
JOIN_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
#: How long a member's join or leave may take to settle the call's MLS group (seconds).
SETTLE_TIMEOUT = 20.0
#: After the last member stops talking, wait this long so the last sentence is heard as ended.
TRAILING_SILENCE = 1.5
#: How often the simulation looks at the bot's and the call's state while it waits (seconds).
POLL_INTERVAL = 0.02
#: Voice journal lines a :meth:`Simulation.report` shows (the most recent ones).
REPORT_JOURNAL_LINES = 200
#: The simulated member who runs the commands (not a speaker).
DEFAULT_HOST = "host"
#: The simulated client's capture format: 48 kHz stereo (as Discord clients send Opus).
SAMPLE_RATE = 48000
#: Tone-coded speech is played at this share of full scale (as a normal speaking level).
SPEECH_LEVEL = 0.5
#: Seconds of silence the demo adds after the last line of its script.
DEMO_TAIL = 6.0

DEMO_SCRIPT: dict[str, list[tuple[float, str]]] = {
    "alice": [(0.5, "大家好，今日開會"), (9.0, "預算批咗")],
    "bob": [(3.5, "我哋討論預算"), (12.0, "好，下次見")],
}


class SimulationError(CantobotError):
    """The simulation could not run or a step did not finish in time."""

    permanent = True


@dataclass(frozen=True)
class SimSpeaker:
    name: str
    pcm: npt.NDArray[np.int16]  # 48 kHz stereo int16, as a Discord client captures it


def to_discord_pcm(clip: AudioClip) -> npt.NDArray[np.int16]:
    """Any clip -> 48 kHz stereo int16 (the simulated client's capture)."""
    mono = StreamConverter(clip.sample_rate, clip.samples.shape[1], SAMPLE_RATE)
    out = np.concatenate([mono.process(clip.samples), mono.flush()])
    return np.repeat(out[:, None], 2, axis=1).astype(np.int16)


def tone_pcm(
    lines: Sequence[tuple[float, str]], duration: float | None = None
) -> npt.NDArray[np.int16]:
    """Tone-coded Cantonese (``(start second, text)`` lines) as a simulated member's capture:
    48 kHz stereo int16 that the loopback STT fake decodes back to the text."""
    mono = speech_track(lines, SAMPLE_RATE, duration=duration)
    pcm = np.clip(mono * 32767 * SPEECH_LEVEL, -32768, 32767).astype(np.int16)
    return np.repeat(pcm[:, None], 2, axis=1)


def json_line(message: PostedMessage) -> str:
    record = {
        "channel": message.channel,
        "thread": message.thread,
        "author": message.author,
        "content": message.content,
        "edit": message.edit,
        "attachments": list(message.attachments),
    }
    return json.dumps(record, ensure_ascii=False)


def human_line(message: PostedMessage) -> str:
    where = f"#{message.channel}" + (f" > {message.thread}" if message.thread else "")
    files = f" [{', '.join(message.attachments)}]" if message.attachments else ""
    verb = "edited" if message.edit else "posted"
    return f"{where} {message.author} {verb}: {message.content}{files}"


@contextlib.asynccontextmanager
async def running_bot(config: Config) -> AsyncIterator[CantoBot]:
    """The real bot, logged in; closed (meetings flushed) on exit.

    discord.py's base URLs are process-wide: they are pointed at ``config`` for the bot's life
    and put back afterwards, so one process can run simulations one after another.
    """
    saved = (discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY)
    redirect_discord(config)
    bot = CantoBot(config)
    task = asyncio.create_task(bot.start(config.discord.token.reveal()), name="bot")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while not bot.is_ready():
                if task.done():
                    task.result()  # raises what failed
                    raise SimulationError("the bot stopped before it was ready")
                await asyncio.sleep(POLL_INTERVAL)
        yield bot
    finally:
        await bot.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        discord.http.Route.BASE, discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = saved


def bot_config(base: Config, discord: LocalDiscord, storage_path: str) -> Config:
    return with_overrides(
        base,
        discord={
            "token": discord.token,
            "api_base": discord.api_base,
            "gateway_url": discord.gateway_url,
            "ca_file": discord.ca_file,
            "guilds": str(discord.guild_id),
        },
        storage={"path": storage_path},
    )


@dataclass(frozen=True)
class Spoken:
    """One :meth:`Simulation.speak`: who, when it began (UTC) and how many packets went out."""

    name: str
    started_at: datetime
    seconds: float
    packets: int


class Simulation:
    """The real bot against a local Discord, driven one step at a time.

    ``async with Simulation(config, members=("alice", "bob")) as sim:`` starts the local Discord
    (a guild whose humans are the members plus a host, who invokes the commands) and the bot.
    Then, in any order a meeting allows: :meth:`join` / :meth:`leave` the voice channel,
    :meth:`start` (``/transcribe start``), :meth:`speak` / :meth:`speak_together`,
    :meth:`stop` (``/transcribe stop``; the minutes are posted). Each step returns once its
    effect is in place: a join or leave with DAVE on returns after the call's MLS group has
    settled (commit applied and transition executed), so what is said next can be decrypted.

    Everything the bot posted is in :attr:`messages`; :meth:`report` renders the messages, the
    voice server's journal and the members' packet timeline for a failure message.

    ``loss`` is a percentage of media packets dropped; with ``seed`` set, which packets are
    dropped (and every SSRC) is the same on every run.
    """

    def __init__(
        self,
        config: Config,
        *,
        members: Sequence[str],
        host: str = DEFAULT_HOST,
        modes: tuple[str, ...] | None = None,
        dave: bool = True,
        loss: float = 0.0,
        seed: int | None = None,
        speaking_late: bool = False,
        on_message: Callable[[PostedMessage], None] | None = None,
        storage_path: str | None = None,
        member_dave: str = "libdave",
    ) -> None:
        names = tuple(members)
        if len(set(names)) != len(names):
            raise SimulationError("speaker names must be unique")
        if not 0.0 <= loss < 100.0:
            raise SimulationError("--loss must be a percentage from 0 up to (not including) 100")
        if member_dave not in MEMBER_DAVE_KINDS:
            raise SimulationError(f"--member-dave must be one of {', '.join(MEMBER_DAVE_KINDS)}")
        if dave and member_dave == "libdave" and not libdave_available():
            raise SimulationError(LIBDAVE_MISSING)
        if host in names:
            host = f"{host}-1"
        self.config = config
        self.names = names
        self.host = host
        self.modes = modes
        self.dave = dave
        self.loss = loss
        self.seed = seed
        self.speaking_late = speaking_late
        self.on_message = on_message
        self.storage_path = storage_path
        #: The DAVE library the simulated members run ("libdave": Discord's own).
        self.member_dave = member_dave
        #: Every ``speak`` so far, in the order they began.
        self.spoken: list[Spoken] = []
        #: When the current (or last) meeting started, as the bot recorded it.
        self.meeting_started_at: datetime | None = None
        self._speeches: dict[str, int] = {}
        self._stack = contextlib.AsyncExitStack()
        self._discord: LocalDiscord | None = None
        self._bot: CantoBot | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> Simulation:
        if self._discord is not None:
            raise SimulationError("a Simulation can be entered only once")
        try:
            tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="cantobot-sim-"))
            kwargs: dict[str, Any] = {}
            if self.modes:
                kwargs["modes"] = self.modes
            rng = random.Random(self.seed) if self.seed is not None else None
            self._discord = await self._stack.enter_async_context(
                LocalDiscord(
                    human_names=(self.host, *self.names),
                    moderators=(self.host,),
                    dave=self.dave,
                    speaking_late=self.speaking_late,
                    on_message=self._record,
                    rng=rng,
                    member_dave=self.member_dave,
                    **kwargs,
                )
            )
            storage = self.storage_path or str(Path(tmp) / "sim.sqlite3")
            cfg = bot_config(self.config, self._discord, storage)
            self._bot = await self._stack.enter_async_context(running_bot(cfg))
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _record(self, message: PostedMessage) -> None:
        if self.on_message is not None:
            self.on_message(message)

    # -- views -----------------------------------------------------------------------------------
    @property
    def discord(self) -> LocalDiscord:
        if self._discord is None:
            raise SimulationError("the simulation is not running")
        return self._discord

    @property
    def bot(self) -> CantoBot:
        if self._bot is None:
            raise SimulationError("the simulation is not running")
        return self._bot

    @property
    def meeting(self) -> Meeting | None:
        """The bot's meeting in the simulated guild, if one is running."""
        meetings = self.bot.meetings
        return meetings.get(self.discord.guild_id) if meetings is not None else None

    @property
    def messages(self) -> list[PostedMessage]:
        """Every message the bot posted or edited, in order."""
        return list(self.discord.messages)

    def member_id(self, name: str) -> int:
        return self.discord.member_ids[name]

    def ssrc_of(self, name: str) -> int | None:
        """The SSRC ``name`` currently sends from (None before they first speak or join)."""
        mv = self.discord.voice.members.get(self.member_id(name))
        return mv.ssrc if mv is not None else None

    def report(self, journal_lines: int = REPORT_JOURNAL_LINES) -> str:
        """What happened, for a failing test or a failed run: posts, voice journal, timeline."""
        d = self._discord
        if d is None:
            return "(the simulation never started)"
        names = {uid: name for name, uid in d.member_ids.items()}
        out = ["messages posted or edited by the bot:"]
        out += [f"  {human_line(m)}" for m in d.messages] or ["  (none)"]
        journal = list(d.voice.journal)
        skipped = max(0, len(journal) - journal_lines)
        out.append(f"voice journal ({len(journal)} lines, first {skipped} left out):")
        out += [f"  {line}" for line in journal[skipped:]]
        out.append("member packet timeline (kind x count):")
        out += [f"  {line}" for line in timeline_runs(d.voice.timeline, names)] or ["  (none)"]
        group = d.voice.group
        out.append(
            f"DAVE: protocol {group.protocol_version}, epoch {group.epoch}, members "
            f"{[names.get(u, 'bot') for u in group.members]}, pending transitions "
            f"{group.pending_transitions}, awaiting commit {group.awaiting_commit}"
        )
        with contextlib.suppress(Exception):  # a report must not fail on a half-closed bot
            meeting = self.meeting if self._bot is not None else None
            if meeting is not None:
                out.append(f"meeting: {meeting.status()}")
        return "\n".join(out)

    # -- steps -----------------------------------------------------------------------------------
    async def join(self, *names: str) -> None:
        """Members enter the voice channel (op 11 and, with DAVE, an MLS Add each)."""
        for name in names:
            await self.discord.member_join_voice(self.member_id(name))
        await self.settled()

    async def leave(self, *names: str) -> None:
        """Members leave the voice channel (op 13 and, with DAVE, an MLS Remove each)."""
        for name in names:
            await self.discord.leave_voice(self.member_id(name))
        await self.settled()

    async def settled(self) -> None:
        """Wait until the call's MLS group is at rest: no proposals awaiting a commit, no
        transition awaiting the bot, and the bot (if in the call) in the group and encrypting."""
        if not self.dave:
            return
        voice = self.discord.voice
        async with self._deadline(SETTLE_TIMEOUT, "the DAVE group to settle"):
            while True:
                group = voice.group
                conn = voice.connection
                meeting = self.meeting
                bot_in_call = conn is not None and conn.cipher is not None
                at_rest = not group.awaiting_commit and not group.pending_transitions
                if at_rest and (
                    not bot_in_call
                    or (
                        self.discord.bot_user_id in group.members
                        and meeting is not None
                        and meeting.status().e2ee
                    )
                ):
                    return
                await asyncio.sleep(POLL_INTERVAL)

    async def start(self, *, threads: bool = False, captions: bool = False) -> None:
        """The host (joining the voice channel if needed) runs ``/transcribe start``; returns
        once the bot is live in the call (and, with DAVE, in the call's MLS group)."""
        d = self.discord
        host = self.member_id(self.host)
        if d.world.member(host).voice_channel_id is None:
            await self.join(self.host)
        options: dict[str, object] = {"threads": threads}
        if captions:
            options["captions"] = True
        started = await d.invoke("transcribe start", options, user_id=host)
        async with self._deadline(JOIN_TIMEOUT, "the bot to join the call"):
            await started.wait_followups(1)
            while True:
                meeting = self.meeting
                if meeting is not None and meeting.state is MeetingState.LIVE:
                    self.meeting_started_at = meeting.started_at
                    break
                await asyncio.sleep(POLL_INTERVAL)
        # With DAVE on, members start talking once the group is formed (frames before that
        # cannot be decrypted by anyone).
        await self.settled()
        log.info("simulation: the bot joined the call")

    async def speak(self, name: str, pcm: npt.NDArray[np.int16]) -> int:
        """``name`` says ``pcm`` (48 kHz stereo int16) in real time; returns packets sent."""
        n = self._speeches.get(name, 0)
        self._speeches[name] = n + 1
        rng = random.Random(f"{self.seed}/{name}/{n}") if self.seed is not None else None
        started = datetime.now(UTC)
        packets = await self.discord.speak(
            self.member_id(name), pcm, loss=self.loss / 100.0, rng=rng
        )
        self.spoken.append(Spoken(name, started, len(pcm) / SAMPLE_RATE, packets))
        return packets

    async def speak_together(self, speech: Mapping[str, npt.NDArray[np.int16]]) -> None:
        """Several members speak at once (each starts now; their speech may overlap)."""
        await asyncio.gather(*(self.speak(name, pcm) for name, pcm in speech.items()))

    async def stop(self) -> None:
        """After a short silence the host runs ``/transcribe stop``; returns once the bot said
        it stopped (the minutes are posted before that)."""
        await asyncio.sleep(TRAILING_SILENCE)
        stopped = await self.discord.invoke(
            "transcribe stop", {}, user_id=self.member_id(self.host)
        )
        async with self._deadline(STOP_TIMEOUT, "the meeting to stop"):
            await stopped.wait_followups(1)
        log.info("simulation: stopped; %d message(s) posted", len(self.discord.messages))

    @contextlib.asynccontextmanager
    async def _deadline(self, seconds: float, what: str) -> AsyncIterator[None]:
        """Bound a wait; on timeout, fail with the report (which op never came)."""
        try:
            async with asyncio.timeout(seconds):
                yield
        except TimeoutError:
            log.error("simulation: no %s within %.0f s\n%s", what, seconds, self.report())
            raise SimulationError(
                f"timed out after {seconds:.0f} s waiting for {what} "
                "(the log has the voice journal)"
            ) from None


def timeline_runs(timeline: Iterable[tuple[str, int]], names: Mapping[int, str]) -> list[str]:
    """The voice timeline per member, as runs: ``alice: speaking x1, media x52, lost x1, ...``
    (members talking at once interleave in the timeline; each one's own story is kept)."""
    runs: dict[int, list[list[Any]]] = {}
    for kind, uid in timeline:
        mine = runs.setdefault(uid, [])
        if mine and mine[-1][0] == kind:
            mine[-1][1] += 1
        else:
            mine.append([kind, 1])
    return [
        f"{names.get(uid, uid)}: " + ", ".join(f"{kind} x{count}" for kind, count in mine)
        for uid, mine in runs.items()
    ]


async def simulate(
    speakers: list[SimSpeaker],
    config: Config,
    *,
    threads: bool = False,
    captions: bool = False,
    modes: tuple[str, ...] | None = None,
    dave: bool = True,
    loss: float = 0.0,
    seed: int | None = None,
    on_message: Callable[[PostedMessage], None] | None = None,
    storage_path: str | None = None,
    member_dave: str = "libdave",
    late: Mapping[str, float] | None = None,
) -> list[PostedMessage]:
    """Run one meeting end to end; returns every message the bot posted or edited.

    Every member is in the call before the bot joins (so with DAVE they already share a group
    and the bot is welcomed into it), except the ``late`` ones: each joins that many seconds
    after the others start speaking (with DAVE: an Add, a commit, a welcome and a new epoch
    while the others talk), then speaks. ``loss`` is a percentage.
    """
    if not speakers:
        raise SimulationError("nothing to simulate: give --speaker NAME=FILE")
    late = dict(late or {})
    unknown = set(late) - {s.name for s in speakers}
    if unknown:
        raise SimulationError(f"--join-late names no --speaker: {', '.join(sorted(unknown))}")
    async with Simulation(
        config,
        members=[s.name for s in speakers],
        modes=modes,
        dave=dave,
        loss=loss,
        seed=seed,
        on_message=on_message,
        storage_path=storage_path,
        member_dave=member_dave,
    ) as sim:
        await sim.join(sim.host, *(n for n in sim.names if n not in late))
        await sim.start(threads=threads, captions=captions)
        log.info("simulation: %d member(s) speaking", len(speakers) - len(late))

        async def turn(s: SimSpeaker) -> None:
            if s.name in late:
                await asyncio.sleep(late[s.name])
                epoch = sim.discord.voice.group.epoch
                await sim.join(s.name)
                log.info("simulation: %s joined late (DAVE epoch %s -> %s)", s.name, epoch,
                         sim.discord.voice.group.epoch)
            await sim.speak(s.name, s.pcm)

        await asyncio.gather(*(turn(s) for s in speakers))
        await sim.stop()
        return sim.messages


def load_speakers(pairs: list[tuple[str, str]]) -> list[SimSpeaker]:
    """``--speaker NAME=FILE`` pairs -> speakers (each file read and converted for Discord)."""
    return [SimSpeaker(name, to_discord_pcm(read_audio(path))) for name, path in pairs]


async def run_simulate(args: argparse.Namespace, config: Config) -> int:
    config.require_stt_key()
    speakers = load_speakers(args.speaker)
    printer = json_line if args.jsonl else human_line

    def show(message: PostedMessage) -> None:
        print(printer(message), flush=True)

    await simulate(
        speakers,
        config,
        threads=args.threads,
        captions=args.captions,
        modes=tuple(args.mode) if args.mode else None,
        dave=args.dave,
        loss=args.loss,
        on_message=show,
        member_dave=args.member_dave,
        late=dict(args.join_late),
    )
    return 0


def demo_speakers(script: dict[str, list[tuple[float, str]]] = DEMO_SCRIPT) -> list[SimSpeaker]:
    """Tone-coded Cantonese lines the loopback STT fake decodes back to text."""
    duration = max(start for lines in script.values() for start, _ in lines) + DEMO_TAIL
    return [SimSpeaker(name, tone_pcm(lines, duration)) for name, lines in script.items()]


async def run_demo(args: argparse.Namespace) -> int:
    async with FakeSttServer(api_key="demo-key") as stt:
        config = with_overrides(
            load_config(None, environ={}), stt={"url": stt.url, "api_key": "demo-key"},
            transcribe={"script": args.script, "jyutping": args.jyutping},
        )
        printer = json_line if args.jsonl else human_line

        def show(message: PostedMessage) -> None:
            print(printer(message), flush=True)

        if not args.jsonl:
            print(
                "cantobot demo: a local Discord and a local speech-to-text fake on 127.0.0.1; "
                "alice and bob speak tone-coded Cantonese.",
                file=sys.stderr,
            )
        await simulate(demo_speakers(), config, threads=args.threads, on_message=show)
    return 0

"""`cantobot simulate` and `cantobot demo`: the real bot against a local Discord.

The bot that runs here is the one `cantobot run` runs (:class:`bot.app.CantoBot`), configured
through the public keys ``discord.api_base``, ``discord.gateway_url`` and ``discord.ca_file``;
only the other side of the sockets is simulated. A member invokes ``/transcribe start``, the
simulated members speak their files concurrently in real time (Opus, RTP, transport encryption
and DAVE as Discord sends them), then ``/transcribe stop`` posts the minutes and we exit.

``demo`` adds the loopback speech-to-text fake and generated, tone-coded Cantonese speech, so it
needs neither a Discord token nor a cantonese.ai key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bot.app import CantoBot, redirect_discord
from bot.audio.convert import StreamConverter
from bot.audio.files import AudioClip, read_audio
from bot.config import Config, load_config, with_overrides
from bot.errors import CantobotError
from bot.meeting import MeetingState
from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.state import PostedMessage
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track

log = logging.getLogger(__name__)

#: Bounded waits of the simulation (seconds).
READY_TIMEOUT = 30.0
JOIN_TIMEOUT = 30.0
STOP_TIMEOUT = 60.0
#: After the last member stops talking, wait this long so the last sentence is heard as ended.
TRAILING_SILENCE = 1.5

DEMO_SCRIPT: dict[str, list[tuple[float, str]]] = {
    "alice": [(0.5, "大家好，今日開會"), (9.0, "預算批咗")],
    "bob": [(3.5, "我哋討論預算"), (12.0, "好，下次見")],
}


class SimulationError(CantobotError):
    permanent = True


@dataclass(frozen=True)
class SimSpeaker:
    name: str
    pcm: np.ndarray  # 48 kHz stereo int16, as a Discord client captures it


def to_discord_pcm(clip: AudioClip) -> np.ndarray:
    """Any clip -> 48 kHz stereo int16 (the simulated client's capture)."""
    mono = StreamConverter(clip.sample_rate, clip.samples.shape[1], 48000)
    out = np.concatenate([mono.process(clip.samples), mono.flush()])
    return np.repeat(out[:, None], 2, axis=1)


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
    """The real bot, logged in; closed (meetings flushed) on exit."""
    redirect_discord(config)
    bot = CantoBot(config)
    task = asyncio.create_task(bot.start(config.discord.token.reveal()), name="bot")
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            while not bot.is_ready():
                if task.done():
                    task.result()  # raises what failed
                    raise SimulationError("the bot stopped before it was ready")
                await asyncio.sleep(0.05)
        yield bot
    finally:
        await bot.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task


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


async def simulate(
    speakers: list[SimSpeaker],
    config: Config,
    *,
    threads: bool = False,
    captions: bool = False,
    modes: tuple[str, ...] | None = None,
    dave: bool = True,
    loss: float = 0.0,
    on_message: Callable[[PostedMessage], None] | None = None,
    storage_path: str | None = None,
) -> list[PostedMessage]:
    """Run one meeting end to end; returns every message the bot posted or edited."""
    if not speakers:
        raise SimulationError("nothing to simulate: give --speaker NAME=FILE")
    names = tuple(s.name for s in speakers)
    if len(set(names)) != len(names):
        raise SimulationError("speaker names must be unique")
    host = "host" if "host" not in names else "host-1"

    async def record(message: PostedMessage) -> None:
        if on_message is not None:
            on_message(message)

    kwargs: dict[str, object] = {}
    if modes:
        kwargs["modes"] = modes
    with tempfile.TemporaryDirectory(prefix="cantobot-sim-") as tmp:
        async with LocalDiscord(human_names=(host, *names), moderators=(host,), dave=dave,
                                on_message=record, **kwargs) as discord:  # type: ignore[arg-type]
            ids = discord.member_ids
            cfg = bot_config(config, discord, storage_path or str(Path(tmp) / "sim.sqlite3"))
            async with running_bot(cfg) as bot:
                for name in (host, *names):
                    await discord.member_join_voice(ids[name])
                options: dict[str, object] = {"threads": threads}
                if captions:
                    options["captions"] = True
                start = await discord.invoke("transcribe start", options, user_id=ids[host])
                async with asyncio.timeout(JOIN_TIMEOUT):
                    await start.wait_followups(1)
                    while True:
                        assert bot.meetings is not None
                        meeting = bot.meetings.get(discord.guild_id)
                        if (meeting is not None and meeting.state is MeetingState.LIVE
                                and (not dave or meeting.status().e2ee)):
                            # With DAVE on, members start talking once the group is formed
                            # (frames before that cannot be decrypted by anyone).
                            break
                        await asyncio.sleep(0.05)
                log.info("simulation: the bot joined; %d member(s) speaking", len(speakers))
                await asyncio.gather(*(
                    discord.speak(ids[s.name], s.pcm, loss=loss / 100.0) for s in speakers
                ))
                await asyncio.sleep(TRAILING_SILENCE)
                stop = await discord.invoke("transcribe stop", {}, user_id=ids[host])
                async with asyncio.timeout(STOP_TIMEOUT):
                    await stop.wait_followups(1)
                log.info("simulation: stopped; %d message(s) posted", len(discord.messages))
            return list(discord.messages)


def load_speakers(pairs: list[tuple[str, str]]) -> list[SimSpeaker]:
    return [SimSpeaker(name, to_discord_pcm(read_audio(path))) for name, path in pairs]


async def run_simulate(args: argparse.Namespace, config: Config) -> int:
    config.require_stt_key()
    speakers = load_speakers(args.speaker)
    printer = json_line if args.jsonl else human_line

    def show(message: PostedMessage) -> None:
        print(printer(message), flush=True)

    await simulate(
        speakers, config, threads=args.threads, captions=args.captions,
        modes=tuple(args.mode) if args.mode else None, dave=args.dave, loss=args.loss,
        on_message=show,
    )
    return 0


def demo_speakers(script: dict[str, list[tuple[float, str]]] = DEMO_SCRIPT) -> list[SimSpeaker]:
    """Tone-coded Cantonese lines the loopback STT fake decodes back to text."""
    out = []
    duration = max(start for lines in script.values() for start, _ in lines) + 6.0
    for name, lines in script.items():
        mono = speech_track(lines, 48000, duration=duration)
        pcm = np.clip(mono * 32767 * 0.5, -32768, 32767).astype(np.int16)
        out.append(SimSpeaker(name, np.repeat(pcm[:, None], 2, axis=1)))
    return out


async def run_demo(args: argparse.Namespace) -> int:
    async with FakeSttServer(api_key="demo-key") as stt:
        config = with_overrides(load_config(None, environ={}),
                                stt={"url": stt.url, "api_key": "demo-key"})
        printer = json_line if args.jsonl else human_line

        def show(message: PostedMessage) -> None:
            print(printer(message), flush=True)

        if not args.jsonl:
            print("cantobot demo: a local Discord and a local speech-to-text fake on 127.0.0.1; "
                  "alice and bob speak tone-coded Cantonese.", file=sys.stderr)
        await simulate(demo_speakers(), config, threads=args.threads, on_message=show)
    return 0


"""Scaling past one process: the loopback Discord shards like Discord, and two real bot
processes (``python -m bot run --shard-ids ... --shard-count 2``) share one PostgreSQL.

The two-process test is the issue's acceptance run: each process handles only the guild its shard
owns; an opt-out made through one process is honoured by the other; after one process is killed
(SIGKILL) and restarted, the minutes of its meeting hold every line it had posted.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import numpy as np
import pytest
import yarl

from bot.config import Config
from bot.meeting import MeetingManager
from bot.sim.discord import client_kwargs
from bot.sim.discord.cluster import LocalDiscordCluster, guild_id_on_shard
from bot.sim.discord.gateway import shard_of
from bot.sim.discord.state import PostedMessage
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track
from bot.storage.postgres import PostgresStorage
from tests.pg_support import fresh_database

REPO = Path(__file__).resolve().parents[1]
KEY = "shard-test-key"
#: Bound on each step that waits for the bots (seconds).
STEP_TIMEOUT = 60.0
#: Bound on a whole test (seconds).
TEST_TIMEOUT = 240.0
#: discord.py waits this long for GUILD_CREATEs after READY; our guilds come at once.
GUILD_READY_TIMEOUT = 0.2


def test_guild_ids_can_be_placed_on_any_shard_by_discords_formula() -> None:
    base = 1_575_442_000_902_094_851
    for count in (1, 2, 3, 16):
        for shard in range(count):
            gid = guild_id_on_shard(base, shard, count)
            assert shard_of(gid, count) == shard == ((gid >> 22) % count)
            assert 0 <= (gid >> 22) - (base >> 22) < count
            assert gid & 0x3FFFFF == base & 0x3FFFFF


# -- the loopback Discord, sharded, with discord.py in this process ----------------------------


@contextlib.asynccontextmanager
async def logged_in(cluster: LocalDiscordCluster, **kwargs: Any) -> AsyncIterator[discord.Client]:
    intents = discord.Intents.default()
    client = discord.AutoShardedClient(intents=intents, guild_ready_timeout=GUILD_READY_TIMEOUT,
                                       **client_kwargs(cluster.ca_file), **kwargs)
    await client.login(cluster.token)
    task = asyncio.create_task(client.connect(), name="discord-connect")
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            await client.wait_until_ready()
        yield client
    finally:
        await client.close()
        async with asyncio.timeout(STEP_TIMEOUT):
            await asyncio.gather(task, return_exceptions=True)


async def test_each_shard_gets_only_the_guild_that_discords_formula_gives_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), LocalDiscordCluster(shard_count=2) as cluster:
        monkeypatch.setattr(discord.http.Route, "BASE", cluster.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                            yarl.URL(cluster.gateway_url))
        g0, g1 = cluster.guild_ids
        assert (shard_of(g0, 2), shard_of(g1, 2)) == (0, 1)
        # One id space: REST routes by channel and webhook ids, so none may be in two guilds.
        worlds = [g.world for g in cluster.guilds]
        assert not set(worlds[0].channels) & set(worlds[1].channels)
        assert worlds[0].owner_id != worlds[1].owner_id
        async with (logged_in(cluster, shard_ids=[0], shard_count=2) as a,
                    logged_in(cluster, shard_ids=[1], shard_count=2) as b):
            assert [g.id for g in a.guilds] == [g0]
            assert [g.id for g in b.guilds] == [g1]
            # Both processes are one bot: the same user in both guilds.
            assert a.user is not None and b.user is not None and a.user.id == b.user.id
        assert [(c.shard_id, c.guild_id) for c in cluster.connections] == [(0, g0), (1, g1)]
        # With no shard settings, discord.py asks /gateway/bot and runs every shard itself.
        async with logged_in(cluster) as both:
            assert both.shard_count == 2
            assert sorted(g.id for g in both.guilds) == sorted([g0, g1])
        # Without sharding, one session would have to carry both guilds: Discord says 4011.
        plain = discord.Client(intents=discord.Intents.default(),
                               **client_kwargs(cluster.ca_file))
        await plain.login(cluster.token)
        try:
            with pytest.raises(discord.ConnectionClosed) as closed:
                async with asyncio.timeout(STEP_TIMEOUT):
                    await plain.connect(reconnect=True)
            assert closed.value.code == 4011
        finally:
            await plain.close()


async def test_a_shard_owning_no_guild_gets_a_ready_without_guilds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT), LocalDiscordCluster(shard_count=1) as cluster:
        monkeypatch.setattr(discord.http.Route, "BASE", cluster.api_base)
        monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                            yarl.URL(cluster.gateway_url))
        (guild,) = cluster.guild_ids
        # Three shards: the guild lands on exactly one of them.
        owner = shard_of(guild, 3)
        other = (owner + 1) % 3
        async with logged_in(cluster, shard_ids=[other], shard_count=3) as client:
            assert list(client.guilds) == []
        async with logged_in(cluster, shard_ids=[owner], shard_count=3) as client:
            assert [g.id for g in client.guilds] == [guild]
        assert [c.guild_id for c in cluster.connections] == [None, guild]


# -- opt-outs across processes, through the database ---------------------------------------------


async def test_an_opt_out_stored_by_another_process_reaches_the_cache_on_refresh() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), fresh_database() as url:
        mine, theirs = await PostgresStorage.open(url), await PostgresStorage.open(url)
        manager = MeetingManager(Config(), mine)
        try:
            await manager.load()
            assert not manager.is_opted_out(42)
            await theirs.set_opt_out(42, True)
            assert not manager.is_opted_out(42)  # the cache alone does not know yet
            await manager.refresh_opt_outs()
            assert manager.is_opted_out(42)
            await theirs.set_opt_out(42, False)
            assert await manager.confirm_opt_out(42) is False  # storage wins over the cache
            assert not manager.is_opted_out(42)
        finally:
            await manager.shutdown()
            await mine.close()
            await theirs.close()


# -- two bot processes -------------------------------------------------------------------------


def discord_pcm(text: str, at: float = 0.3) -> np.ndarray:
    """``text`` as tone-coded speech, 48 kHz stereo int16 as a Discord client sends it."""
    from bot.audio.convert import StreamConverter

    rate = 16000
    track = np.round(speech_track([(at, text)], rate) * 32767).astype(np.int16)
    up = StreamConverter(rate, 1, 48000)
    mono = np.concatenate([up.process(track), up.flush()])
    return np.repeat(mono[:, None], 2, axis=1)


@dataclass
class BotProcess:
    """``python -m bot run`` owning some shards; its log goes to a file (never a full pipe)."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("ab") as log:
            log.write(f"--- start {time.strftime('%X')} ---\n".encode())
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "bot", "run", *self.args,
                cwd=str(REPO), env=self.env, stdout=log, stderr=log,
            )

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert await self.proc.wait() == -signal.SIGKILL

    async def stop(self) -> int:
        """SIGTERM: flush meetings and exit; returns the exit code."""
        if self.proc is None or self.proc.returncode is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STEP_TIMEOUT):
                return await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            raise


async def wait_for(predicate: Any, what: str, procs: list[BotProcess]) -> None:
    """Poll ``predicate`` (cheap, in-memory) until true; on timeout show the bots' logs."""
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            while not predicate():
                for bot in procs:
                    if bot.proc is not None and bot.proc.returncode is not None:
                        raise AssertionError(f"{bot.name} exited ({bot.proc.returncode}) "
                                             f"while waiting for {what}:\n{bot.log()[-3000:]}")
                await asyncio.sleep(0.05)
    except TimeoutError:
        logs = "\n".join(f"== {b.name} ==\n{b.log()[-3000:]}" for b in procs)
        raise AssertionError(f"timed out waiting for {what}\n{logs}") from None


def lines_in(messages: list[PostedMessage]) -> list[str]:
    """Caption lines posted as the speakers (webhook posts carry the speaker's name)."""
    return [re.sub(r"^`\[[\d:]+\]` ", "", m.content)  # "`[00:03]` 大家好" -> "大家好"
            for m in messages if not m.edit and m.author in ("alice", "carol")]


@pytest.mark.xdist_group("cpu_heavy")  # one CPU-heavy test at a time in parallel runs (pyproject)
async def test_two_bot_processes_split_the_guilds_share_opt_outs_and_survive_a_kill(
    tmp_path: Path,
) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(asyncio.timeout(TEST_TIMEOUT))
        url = await stack.enter_async_context(fresh_database())
        stt = await stack.enter_async_context(FakeSttServer(KEY))
        cluster = await stack.enter_async_context(LocalDiscordCluster(
            shard_count=2, human_names=("host", "alice", "carol"), moderators=("host",)))
        g0, g1 = cluster.guilds
        ids = cluster.member_ids
        config = tmp_path / "config.yaml"
        config.write_text(
            f"discord:\n  guilds: [{g0.guild_id}, {g1.guild_id}]\n"
            "voice:\n  idle_timeout: 1.0\n"
            "storage:\n  retention_days: 0\n"
        )
        env = {
            **os.environ,
            "DISCORD_TOKEN": cluster.token,
            "DISCORD_API_BASE": cluster.api_base,
            "DISCORD_GATEWAY_URL": cluster.gateway_url,
            "DISCORD_CA_FILE": cluster.ca_file,
            "CANTONESE_AI_API_KEY": KEY,
            "CANTONESE_AI_URL": stt.url,
            "CANTOBOT_STORAGE_URL": url,
            "CANTOBOT_LOG_LEVEL": "INFO",
        }
        bots = [
            BotProcess(f"shard-{i}", ["--config", str(config), "--shard-ids", str(i),
                                      "--shard-count", "2"], env, tmp_path / f"shard-{i}.log")
            for i in range(2)
        ]

        async def stop_all() -> None:
            for bot in bots:
                with contextlib.suppress(Exception):
                    await bot.stop()

        stack.push_async_callback(stop_all)
        for bot in bots:
            await bot.start()
        for g in (g0, g1):
            async with asyncio.timeout(STEP_TIMEOUT):
                await g.wait_ready()
        assert sorted((c.shard_id, c.guild_id) for c in cluster.connections) == [
            (0, g0.guild_id), (1, g1.guild_id)]

        # Both guilds start a meeting; each is served by the process owning its shard.
        for g in (g0, g1):
            for name in ("host", "alice", "carol"):
                await g.member_join_voice(ids[name])
        starts = [await g.invoke("transcribe start", {}, user_id=ids["host"]) for g in (g0, g1)]
        for record in starts:
            async with asyncio.timeout(STEP_TIMEOUT):
                await record.wait_followups(1)
        assert all("Transcribing" in r.followup_contents[0] for r in starts), \
            [r.followup_contents for r in starts]
        for i, (bot, g, other) in enumerate(zip(bots, (g0, g1), (g1, g0), strict=True)):
            log = bot.log()
            assert f"guild {g.guild_id}: joined" in log, f"shard {i} did not take its guild"
            assert f"guild {other.guild_id}:" not in log, f"shard {i} touched the other guild"

        # carol opts out in guild 1 (process 1); then speaks in guild 0 (process 0), and alice too.
        optout = await g1.invoke("transcribe optout", {}, user_id=ids["carol"])
        async with asyncio.timeout(STEP_TIMEOUT):
            await optout.wait_acknowledged()
        assert "opted out" in optout.response_content
        await g0.speak(ids["carol"], discord_pcm("預算OK"))
        await g0.speak(ids["alice"], discord_pcm("大家好"))
        await g1.speak(ids["alice"], discord_pcm("今日開會"))
        await wait_for(lambda: lines_in(g0.messages) and lines_in(g1.messages),
                       "a line in each guild", bots)
        assert lines_in(g0.messages) == ["大家好"]
        assert lines_in(g1.messages) == ["今日開會"]
        assert "預算OK" not in stt.committed_texts  # nothing of carol reached the STT

        # A second line in guild 0, durable in the database, then process 0 dies mid-sentence.
        await g0.speak(ids["alice"], discord_pcm("預算批咗"))
        await wait_for(lambda: len(lines_in(g0.messages)) == 2, "the second line", bots)
        watcher = await PostgresStorage.open(url)
        stack.push_async_callback(watcher.close)
        meeting = await watcher.latest_meeting(g0.guild_id)
        assert meeting is not None
        async with asyncio.timeout(STEP_TIMEOUT):
            while True:  # stored (committed) before we kill, not merely posted
                if len((await watcher.minutes(meeting.id)).segments) == 2:
                    break
                await asyncio.sleep(0.05)
        talking = asyncio.create_task(g0.speak(ids["alice"], discord_pcm("好，下次見", at=0.1)),
                                      name="alice-mid-sentence")
        await asyncio.sleep(0.5)
        await bots[0].kill()
        await talking
        identified = g0.gateway.identify_count
        await bots[0].start()
        await wait_for(lambda: g0.gateway.identify_count > identified, "shard 0 back", bots)

        # The restarted process serves guild 0 again, from the shared database.
        minutes = await g0.invoke("transcribe minutes", {}, user_id=ids["host"])
        async with asyncio.timeout(STEP_TIMEOUT):
            await minutes.wait_followups(1)
        summary = minutes.followup_contents[0]
        assert re.search(r"\b2 lines\b", summary), summary
        stored = await watcher.minutes(meeting.id)
        assert [s.text for s in stored.segments] == ["大家好", "預算批咗"]
        assert all(s.speaker_id == ids["alice"] for s in stored.segments)

        # Process 1 was never disturbed: its meeting ends normally with its minutes.
        stop = await g1.invoke("transcribe stop", {}, user_id=ids["host"])
        async with asyncio.timeout(STEP_TIMEOUT):
            await stop.wait_followups(1)
        ended = await watcher.latest_meeting(g1.guild_id)
        assert ended is not None and ended.ended_at is not None and ended.line_count == 1
        for bot in bots:
            assert await bot.stop() == 0, bot.log()[-3000:]


# -- deployment ----------------------------------------------------------------------------------


def test_compose_runs_postgres_and_two_bots_owning_disjoint_shards_of_one_count() -> None:
    """Docker does not run here: check what compose would read, and that the CLI accepts it."""
    import yaml

    from bot.cli import build_parser
    from bot.config import ENV_OVERRIDES

    spec = yaml.safe_load((REPO / "compose.yaml").read_text(encoding="utf-8"))
    services = spec["services"]
    assert {"postgres", "migrate", "bot-a", "bot-b"} <= set(services)
    assert services["postgres"]["image"].startswith("postgres:")
    owned: list[int] = []
    counts = set()
    for name in ("bot-a", "bot-b"):
        bot = services[name]
        assert bot["build"] == "." and (REPO / "Dockerfile").is_file()
        assert set(bot["depends_on"]) <= set(services)
        assert bot["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert set(bot["environment"]) <= set(ENV_OVERRIDES)  # every variable means something
        assert bot["environment"]["CANTOBOT_STORAGE_URL"].startswith("postgresql://")
        assert "@postgres:5432/" in bot["environment"]["CANTOBOT_STORAGE_URL"]
        command = bot["command"]
        assert command[0] == "cantobot"
        args = build_parser().parse_args(command[1:])
        assert args.command == "run"
        owned += [int(s) for s in args.shard_ids.split(",")]
        counts.add(args.shard_count)
    (count,) = counts
    assert sorted(owned) == list(range(count))  # every shard owned, none twice
    migrate = services["migrate"]
    assert build_parser().parse_args(migrate["command"][1:]).command == "migrate"
    assert set(migrate["environment"]) <= set(ENV_OVERRIDES)

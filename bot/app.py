"""The Discord bot process: `cantobot run`.

:class:`CantoBot` is a discord.py ``AutoShardedBot``: ``setup_hook`` opens storage (applying
migrations), purges expired transcripts (then daily), loads the ``cogs.transcribe`` extension and
syncs the slash commands; ``close`` flushes every meeting first (stop-session, last commits,
minutes) and then releases what ``setup_hook`` opened, in reverse order.

Before logging in, ``run_bot`` reaches Discord (REST with the token, the gateway) and cantonese.ai
once (:func:`bot.reach.preflight`), so a failure at start-up is one line and exit 1; the invite
link with exactly the needed permissions is logged once in ``setup_hook``.

Discord's endpoints come from config (``discord.api_base``, ``discord.gateway_url``,
``discord.ca_file``) so that the bot can run behind a Discord-compatible proxy or against the
local Discord of ``cantobot simulate``: the same code either way.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
from datetime import UTC, datetime
from typing import TypedDict

import aiohttp
import discord
import yarl
from discord.ext import commands

from bot.config import DEFAULT_DISCORD_API_BASE, DEFAULT_DISCORD_GATEWAY, Config, with_overrides
from bot.errors import ConfigError
from bot.invite import REQUIRED_PERMISSIONS, invite_url
from bot.logsafe import add_secrets
from bot.meeting import MeetingManager
from bot.reach import Rejected, Unreachable, describe_failure, preflight, ssl_context
from bot.storage import StorageBackend, describe_target, open_storage, storage_target
from bot.transcript import script

log = logging.getLogger(__name__)

#: Extensions loaded at start-up (RoboDanny's explicit list: a failure is logged by name).
EXTENSIONS = ("cogs.transcribe",)
#: Retention runs at start and then this often.
RETENTION_INTERVAL = 24 * 3600.0

TOKEN_HELP = (
    "no Discord bot token: set DISCORD_TOKEN (or discord.token in the config). Create one at "
    "https://discord.com/developers/applications -> your app -> Bot -> Reset Token. "
    "To see the bot work without a token, run `cantobot simulate` or `cantobot demo`."
)


def redirect_discord(config: Config) -> None:
    """Point discord.py at the configured REST base and gateway (process-wide settings)."""
    discord.http.Route.BASE = config.discord.api_base.rstrip("/")
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(config.discord.gateway_url)


class _ClientOptions(TypedDict, total=False):
    """The optional discord.py client options that config may set (passed as ``**options``)."""

    connector: aiohttp.BaseConnector
    shard_count: int
    shard_ids: list[int]


class CantoBot(commands.AutoShardedBot):
    """cantobot's Discord client."""

    def __init__(self, config: Config, *, storage: StorageBackend | None = None) -> None:
        intents = discord.Intents.default()
        intents.voice_states = True
        intents.members = False
        ctx = ssl_context(config)
        kwargs: _ClientOptions = {}
        if ctx is not None:
            kwargs["connector"] = aiohttp.TCPConnector(ssl=ctx)
        if config.discord.shard_count is not None:
            kwargs["shard_count"] = config.discord.shard_count
        if config.discord.shard_ids is not None:
            kwargs["shard_ids"] = list(config.discord.shard_ids)
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=discord.AllowedMentions.none(),
            help_command=None,
            **kwargs,
        )
        self.config = config
        add_secrets(config.discord.token.reveal(), config.stt.api_key.reveal())  # kept out of logs
        self._storage = storage
        self.meetings: MeetingManager | None = None
        self._retention_task: asyncio.Task[None] | None = None
        self._closing = False
        self._recovered = False
        self._invite_logged = False

    @property
    def storage(self) -> StorageBackend:
        assert self._storage is not None, "storage is opened in setup_hook"
        return self._storage

    async def setup_hook(self) -> None:
        await script.warm_up()  # OpenCC and PyCantonese dictionaries, on a worker thread (~2 s)
        if self._storage is None:
            log.info("storage: %s", describe_target(storage_target(self.config.storage)))
            self._storage = await open_storage(self.config.storage)
        self.meetings = MeetingManager(self.config, self._storage)
        await self.meetings.load()
        # The meetings hear voice-state changes (empty channel, the bot moved) themselves.
        self.add_listener(self.meetings.on_voice_state_update, "on_voice_state_update")
        self.log_invite_url()
        self._retention_task = asyncio.create_task(self._retention_loop(), name="retention")
        for name in EXTENSIONS:
            try:
                await self.load_extension(name)
            except Exception:
                log.exception("failed to load extension %s", name)
                raise
        await self.sync_commands()

    def log_invite_url(self) -> None:
        """Once per process: the link that adds this bot with exactly the permissions it needs."""
        if self._invite_logged or self.application_id is None:
            return
        self._invite_logged = True
        log.info("invite link (%s): %s", ", ".join(n for n, _ in REQUIRED_PERMISSIONS),
                 invite_url(self.application_id))

    async def sync_commands(self) -> None:
        guilds = self.config.discord.guilds
        if guilds:
            for guild_id in guilds:
                guild = discord.Object(id=guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
                log.info("synced %d command(s) to guild %d", len(synced), guild_id)
        else:
            synced = await self.tree.sync()
            log.info("synced %d command(s) globally", len(synced))

    async def _retention_loop(self) -> None:
        days = self.config.storage.retention_days
        if days <= 0:
            return
        while True:
            try:
                deleted = await self.storage.purge_older_than(days, datetime.now(UTC))
                if deleted:
                    log.info("retention: deleted %d meeting(s) older than %d days", deleted, days)
            except Exception:
                log.exception("retention failed; will try again")
            await asyncio.sleep(RETENTION_INTERVAL)

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d guild(s)", self.user, getattr(self.user, "id", "?"),
                 len(self.guilds))
        if not self._recovered and self.meetings is not None:
            # on_ready fires again after reconnects; a crash is recovered from once.
            self._recovered = True
            try:
                await self.meetings.recover_unfinished(self.get_guild)
            except Exception:
                log.exception("recovering meetings left open by a previous run failed")

    async def close(self) -> None:
        """Flush every meeting, then close Discord and storage; safe to call twice."""
        if self._closing:
            return
        self._closing = True
        if self.meetings is not None:
            await self.meetings.shutdown()
        if self._retention_task is not None:
            self._retention_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retention_task
        await super().close()
        if self._storage is not None:
            await self._storage.close()


def _shard_overrides(args: argparse.Namespace, config: Config) -> Config:
    ids = getattr(args, "shard_ids", None)
    count = getattr(args, "shard_count", None)
    return with_overrides(config, discord={"shard_ids": ids, "shard_count": count})


def freeze_startup_heap() -> int:
    """Take everything alive now out of the cyclic collector's full passes; returns how many.

    A full pass rescans every tracked object and holds the event loop meanwhile: with 400
    speakers in one process (bench row 2e) it took ~100-125 ms, with the start-up heap frozen
    ~55 ms. Called once, when the first READY has filled discord.py's caches. What is frozen and
    later becomes cyclic garbage is never freed; start-up state lives as long as the process.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _freeze_at_first_ready(bot: CantoBot) -> None:
    """:func:`freeze_startup_heap` once, at the first READY (later READYs after reconnects do
    nothing). Only in `cantobot run`'s own process, not in whoever embeds CantoBot (the tests)."""

    async def on_ready() -> None:
        bot.remove_listener(on_ready, "on_ready")
        log.info("moved %d start-up objects out of the garbage collector's full passes",
                 freeze_startup_heap())

    bot.add_listener(on_ready, "on_ready")


async def run_bot(args: argparse.Namespace, config: Config) -> int:
    """Run until SIGTERM/SIGINT; then flush every meeting and exit 0."""
    config = _shard_overrides(args, config)
    if not config.discord.token:
        raise ConfigError(config.source, "discord.token", TOKEN_HELP)
    if config.discord.shard_ids is not None and config.discord.shard_count is None:
        raise ConfigError(config.source, "discord.shard_count",
                          "shard_ids needs shard_count (the total number of shards)")
    config.require_stt_key()
    if (config.discord.api_base, config.discord.gateway_url) != (
        DEFAULT_DISCORD_API_BASE, DEFAULT_DISCORD_GATEWAY
    ):
        log.info("using Discord endpoints %s and %s", config.discord.api_base,
                 config.discord.gateway_url)
    # Reach Discord (REST with the token, the gateway) and cantonese.ai (with the key) once
    # first: a wrong URL, DNS, a refused port, TLS or a 401 is then one line and exit 1, not a
    # traceback or discord.py retrying the gateway forever. Later drops reconnect as before.
    me = await preflight(config)
    log.info("Discord and cantonese.ai reachable; bot user %s (%s)", me.get("username"),
             me.get("id"))
    redirect_discord(config)
    bot = CantoBot(config)
    _freeze_at_first_ready(bot)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with bot:
        runner = asyncio.create_task(bot.start(config.discord.token.reveal()), name="discord")
        waiter = asyncio.create_task(stop.wait(), name="signal-wait")
        done, _ = await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            log.info("signal received: flushing meetings and exiting")
            await bot.close()
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await runner
        else:
            waiter.cancel()
            exc = runner.exception()
            if isinstance(exc, discord.LoginFailure):
                raise Rejected("Discord", config.discord.api_base,
                               "rejected the bot token (HTTP 401): check DISCORD_TOKEN") from exc
            if isinstance(exc, aiohttp.ClientError | OSError | TimeoutError):
                # Discord went away between the preflight and the login: still one line.
                url = config.discord.api_base
                raise Unreachable("Discord", url, describe_failure(exc, url)) from exc
            if exc is not None:
                raise exc
    return 0

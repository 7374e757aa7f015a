"""``LocalDiscordCluster``: one bot in several loopback guilds, spread over gateway shards.

Discord sends a guild's events to the shard ``(guild_id >> 22) % shard_count``; a bot run as
several processes (``cantobot run --shard-ids ... --shard-count N``) thus sees each guild in one
process only. This cluster reproduces that for tests: one :class:`LocalDiscord` per guild (each
with its REST, gateway, voice gateway and UDP), all sharing the bot's token and user id and the
same people (same user ids in every guild), behind one REST base and one gateway URL:

* REST requests are forwarded to the guild they name (a channel, guild, webhook or interaction
  token decides); ``/gateway/bot`` recommends ``shard_count`` shards; global command
  registration reaches every guild.
* A gateway connection says HELLO, waits for IDENTIFY and, by its ``shard`` field, is forwarded
  to the guild that shard owns (Discord's formula), whose gateway then sends READY with that
  guild and its GUILD_CREATE; a shard owning no guild gets a READY without guilds. RESUME goes
  straight to the guild's gateway (``resume_gateway_url``), as discord.py does.

Limit: a shard owning two of the cluster's guilds is refused with close code 4011 (merging two
guilds into one session is not modelled); :func:`guild_id_on_shard` makes guild ids that land
where a test wants them. Boundary: test tooling; the bot is unmodified discord.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from bot.sim.discord.gateway import (
    HEARTBEAT_INTERVAL_MS,
    OP_HEARTBEAT,
    OP_HEARTBEAT_ACK,
    OP_HELLO,
    OP_IDENTIFY,
    OP_INVALID_SESSION,
    parse_shard,
    shard_of,
)
from bot.sim.discord.rest import API_PREFIX, OnMessage, json_response
from bot.sim.discord.server import SHUTDOWN_TIMEOUT, LocalDiscord
from bot.sim.discord.state import SnowflakeFactory
from bot.sim.discord.tls import generate_certificates, server_ssl_context, ssl_context_trusting

_log = logging.getLogger(__name__)

#: Close code when a shard would own several of the cluster's guilds ("Sharding required").
CLOSE_SHARDING_REQUIRED = 4011
#: Close code for a malformed shard in IDENTIFY ("Invalid shard").
CLOSE_INVALID_SHARD = 4010
#: Response headers not copied from a guild's REST answer (hop-by-hop or recomputed here).
_DROPPED_RESPONSE_HEADERS = frozenset(
    {"content-length", "transfer-encoding", "content-encoding", "connection", "date", "server"}
)
#: Request headers forwarded to a guild's REST server.
_FORWARDED_REQUEST_HEADERS = ("Authorization", "Content-Type", "User-Agent", "X-Audit-Log-Reason")


def guild_id_on_shard(snowflake: int, shard_id: int, shard_count: int) -> int:
    """``snowflake`` moved by less than ``shard_count`` ms so that its guild is on ``shard_id``."""
    ms = snowflake >> 22
    ms += (shard_id - ms) % shard_count
    return (ms << 22) | (snowflake & 0x3FFFFF)


def _write_bundle(path: Path, ca_files: list[str | Path]) -> Path:
    """One PEM file trusting every CA in ``ca_files``."""
    path.write_text("".join(Path(p).read_text() for p in ca_files))
    return path


@dataclass(frozen=True)
class ShardConnection:
    """One IDENTIFY seen at the cluster's gateway and the guild it was given (None: no guild)."""

    shard_id: int
    shard_count: int
    guild_id: int | None


class LocalDiscordCluster:
    """Guild ``i`` lives on shard ``i`` of ``shard_count``; see the module docstring."""

    def __init__(
        self,
        *,
        shard_count: int,
        human_names: tuple[str, ...] = ("alice", "bob"),
        moderators: tuple[str, ...] = ("alice",),
        dave: bool = False,
        on_message: OnMessage | None = None,
        token: str | None = None,
    ) -> None:
        if shard_count < 1:
            raise ValueError(f"shard_count must be >= 1, got {shard_count}")
        self.shard_count = shard_count
        self.token = token or f"local.{secrets.token_urlsafe(24)}"
        ids = SnowflakeFactory()
        self.application_id = ids()
        user_ids = {name: ids() for name in human_names}
        self.guilds: list[LocalDiscord] = [
            LocalDiscord(
                token=self.token,
                human_names=human_names,
                moderators=moderators,
                dave=dave,
                on_message=on_message,
                application_id=self.application_id,
                guild_id=guild_id_on_shard(ids(), shard_id, shard_count),
                user_ids=user_ids,
                recommended_shards=shard_count,
                snowflakes=ids,  # one id space: no channel or webhook id in two guilds
            )
            for shard_id in range(shard_count)
        ]
        #: Every IDENTIFY the cluster's gateway routed, in order.
        self.connections: list[ShardConnection] = []
        self._stack = contextlib.AsyncExitStack()
        self._tmpdir: Path | None = None
        self._ca_bundle: Path | None = None
        self._client: aiohttp.ClientSession | None = None
        self._runners: list[web.AppRunner] = []
        self._rest_port = self._gateway_port = 0
        self._pumps: set[asyncio.Task[None]] = set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> LocalDiscordCluster:
        try:
            for guild in self.guilds:
                await self._stack.enter_async_context(guild)
            self._tmpdir = Path(tempfile.mkdtemp(prefix="local-discord-cluster-"))
            certs = generate_certificates(self._tmpdir)
            self._ca_bundle = _write_bundle(
                self._tmpdir / "ca-bundle.pem", [certs.ca_file, *(g.ca_file for g in self.guilds)]
            )
            self._client = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ssl_context_trusting(self._ca_bundle))
            )
            ssl_ctx = server_ssl_context(certs)
            rest = web.Application(client_max_size=32 * 1024 * 1024)
            rest.router.add_route("*", "/{tail:.*}", self._rest)
            gateway = web.Application()
            gateway.router.add_get("/", self._gateway)
            self._rest_port = await self._serve(rest, ssl_ctx)
            self._gateway_port = await self._serve(gateway, ssl_ctx)
        except BaseException:
            await self.aclose()
            raise
        _log.info("local Discord cluster up: %d guild(s) on %d shard(s), REST %s, gateway %s",
                  len(self.guilds), self.shard_count, self.api_base, self.gateway_url)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the front, then every guild; safe to call twice."""
        for task in list(self._pumps):
            task.cancel()
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
        if self._client is not None:
            await self._client.close()
            self._client = None
        await self._stack.aclose()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    async def _serve(self, app: web.Application, ssl_ctx: Any) -> int:
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx)
        await site.start()
        return int(runner.addresses[-1][1])

    # -- configuration for the bot ---------------------------------------------------------------
    @property
    def api_base(self) -> str:
        return f"https://127.0.0.1:{self._rest_port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"wss://127.0.0.1:{self._gateway_port}"

    @property
    def ca_file(self) -> str:
        """A PEM bundle trusting the front and every guild's servers."""
        if self._ca_bundle is None:
            raise RuntimeError("LocalDiscordCluster is not running")
        return str(self._ca_bundle)

    @property
    def guild_ids(self) -> list[int]:
        return [g.guild_id for g in self.guilds]

    @property
    def member_ids(self) -> dict[str, int]:
        """The same people in every guild, by name."""
        return self.guilds[0].member_ids

    def guild(self, guild_id: int) -> LocalDiscord:
        for g in self.guilds:
            if g.guild_id == guild_id:
                return g
        raise KeyError(f"no guild {guild_id} in the cluster")

    # -- REST ------------------------------------------------------------------------------------
    def _route(self, parts: list[str]) -> LocalDiscord | None:
        """The guild a REST path names, or None for one that concerns no guild."""

        def ident(i: int) -> int | None:
            return int(parts[i]) if len(parts) > i and parts[i].isdigit() else None

        head = parts[0] if parts else ""
        for g in self.guilds:
            world = g.world
            if head == "channels" and ident(1) in world.channels:
                return g
            if head == "guilds" and ident(1) == world.guild_id:
                return g
            if head == "applications" and len(parts) > 3 and parts[2] == "guilds":
                if ident(3) == world.guild_id:
                    return g
            if head in ("interactions", "webhooks") and len(parts) > 2:
                if parts[2] in g.rest.interactions or ident(1) in world.webhooks:
                    return g
        return None

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if not path.startswith(API_PREFIX):
            return web.json_response({"message": "404: Not Found", "code": 0}, status=404)
        parts = path[len(API_PREFIX):].strip("/").split("/")
        if parts == ["gateway", "bot"] or parts == ["gateway"]:
            status, raw, headers = await self._fetch(request, self.guilds[0], b"")
            if status != 200:
                return web.Response(status=status, body=raw, headers=headers)
            data = json.loads(raw)  # the guild's answer, pointed at us
            data["url"] = self.gateway_url
            if "shards" in data:
                data["shards"] = self.shard_count
            return json_response(data)
        body = await request.read()
        target = self._route(parts)
        if target is not None:
            return await self._forward(request, target, body)
        if parts[:1] == ["applications"] and request.method == "PUT":
            # Global commands: every guild's copy of Discord must know them.
            answers = [await self._forward(request, g, body) for g in self.guilds]
            return answers[0]
        return await self._forward(request, self.guilds[0], body)

    async def _forward(self, request: web.Request, to: LocalDiscord, body: bytes) -> web.Response:
        status, data, headers = await self._fetch(request, to, body)
        return web.Response(status=status, body=data, headers=headers)

    async def _fetch(
        self, request: web.Request, to: LocalDiscord, body: bytes
    ) -> tuple[int, bytes, dict[str, str]]:
        assert self._client is not None
        base = to.api_base[: -len(API_PREFIX)]
        headers = {h: v for h in _FORWARDED_REQUEST_HEADERS if (v := request.headers.get(h))}
        async with self._client.request(request.method, base + request.path_qs, data=body,
                                        headers=headers) as answer:
            data = await answer.read()
            out = {k: v for k, v in answer.headers.items()
                   if k.lower() not in _DROPPED_RESPONSE_HEADERS}
            return answer.status, data, out

    # -- gateway ---------------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": OP_HELLO,
                                      "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}}))
        identify: str | None = None
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            if payload.get("op") == OP_HEARTBEAT:
                await ws.send_str(json.dumps({"op": OP_HEARTBEAT_ACK, "d": None}))
            elif payload.get("op") == OP_IDENTIFY:
                identify = msg.data
                break
            else:  # a RESUME belongs at the guild's resume_gateway_url, not here
                await ws.send_str(json.dumps({"op": OP_INVALID_SESSION, "d": False}))
        if identify is None:
            return ws
        shard = parse_shard(json.loads(identify).get("d", {}).get("shard"))
        if shard is None:
            await ws.close(code=CLOSE_INVALID_SHARD, message=b"Invalid shard.")
            return ws
        owned = [g for g in self.guilds if shard_of(g.guild_id, shard[1]) == shard[0]]
        if len(owned) > 1:
            await ws.close(code=CLOSE_SHARDING_REQUIRED, message=b"Sharding required.")
            return ws
        self.connections.append(
            ShardConnection(shard[0], shard[1], owned[0].guild_id if owned else None)
        )
        target = owned[0] if owned else self.guilds[0]  # its gateway sends a READY without guilds
        _log.info("cluster gateway: shard %s -> guild %s", list(shard),
                  owned[0].guild_id if owned else "none")
        await self._proxy(ws, target, request.query_string, identify)
        return ws

    async def _proxy(self, ws: web.WebSocketResponse, to: LocalDiscord, query: str,
                     identify: str) -> None:
        assert self._client is not None
        async with self._client.ws_connect(f"{to.gateway_url}/?{query}", max_msg_size=0) as up:
            await up.receive()  # the guild gateway's HELLO: the bot already had ours
            await up.send_str(identify)

            async def bot_to_guild() -> None:
                async for msg in ws:
                    if msg.type is WSMsgType.TEXT:
                        await up.send_str(msg.data)
                await up.close()

            async def guild_to_bot() -> None:
                async for msg in up:
                    if msg.type is WSMsgType.TEXT:
                        await ws.send_str(msg.data)
                    elif msg.type is WSMsgType.BINARY:
                        await ws.send_bytes(msg.data)
                await ws.close(code=up.close_code or 1000)

            pumps = [asyncio.create_task(bot_to_guild(), name="cluster-bot-to-guild"),
                     asyncio.create_task(guild_to_bot(), name="cluster-guild-to-bot")]
            self._pumps.update(pumps)
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in pumps:
                    task.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                self._pumps.difference_update(pumps)

"""``LocalDiscord``: REST + gateway + voice gateway + UDP on 127.0.0.1, for unmodified discord.py.

An async context manager that generates a throw-away TLS CA, starts the three HTTPS/WSS servers
and the UDP socket on ports the OS picks, and exposes what a bot needs to be pointed at it
(``api_base``, ``gateway_url``, ``ca_file``, ``token``, ids) plus the controls a test or
``cantobot simulate`` needs: :meth:`LocalDiscord.invoke` a slash command, members joining,
leaving and speaking, :meth:`LocalDiscord.fail_next` for REST faults,
:meth:`LocalDiscord.force_reconnect` for the gateway and :meth:`LocalDiscord.move_bot` to drag
the bot into the other voice channel. What the bot did is in ``requests`` and
``messages``. Redirecting discord.py is the bot's business (``Route.BASE``,
``DiscordWebSocket.DEFAULT_GATEWAY``, a connector trusting ``ca_file``).
"""

from __future__ import annotations

import logging
import random
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web

from bot.sim.discord.gateway import Gateway
from bot.sim.discord.rest import API_PREFIX, InteractionRecord, OnMessage, RestApi
from bot.sim.discord.state import (
    CHANNEL_GUILD_TEXT,
    CHANNEL_GUILD_VOICE,
    PERM_VIEW_CHANNEL,
    Channel,
    PostedMessage,
    RecordedRequest,
    SnowflakeFactory,
    World,
)
from bot.sim.discord.tls import CertificatePaths, generate_certificates, server_ssl_context
from bot.sim.discord.voice import DEFAULT_MODES, VoiceServer

_log = logging.getLogger(__name__)

#: How long aiohttp waits for open connections when a server stops (s); tests want it short.
SHUTDOWN_TIMEOUT = 0.5


class LocalDiscord:
    """A loopback Discord with one guild (#general, two voice channels, the bot, alice, bob)."""

    def __init__(
        self,
        *,
        token: str | None = None,
        human_names: tuple[str, ...] = ("alice", "bob"),
        moderators: tuple[str, ...] = ("alice",),
        modes: tuple[str, ...] = DEFAULT_MODES,
        dave: bool = False,
        speaking_late: bool = False,
        on_message: OnMessage | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        bot_permissions: int | None = None,
        application_id: int | None = None,
        guild_id: int | None = None,
        user_ids: dict[str, int] | None = None,
        recommended_shards: int = 1,
        snowflakes: SnowflakeFactory | None = None,
        member_dave: str = "libdave",
    ) -> None:
        self.token = token or f"local.{secrets.token_urlsafe(24)}"
        self.world = World(
            token=self.token, human_names=human_names, moderators=moderators, clock=clock,
            application_id=application_id, guild_id=guild_id, user_ids=user_ids,
            snowflakes=snowflakes,
        )
        if bot_permissions is not None:
            self.world.bot_role.permissions = bot_permissions
        self.rest = RestApi(
            self.world,
            gateway_url=lambda: self.gateway_url,
            dispatch=self._dispatch,
            on_message=on_message,
        )
        self.rest.recommended_shards = recommended_shards
        self.voice = VoiceServer(
            self.world, modes=modes, dave=dave, speaking_late=speaking_late, rng=rng,
            member_dave=member_dave,
        )
        self.gateway = Gateway(
            self.world,
            resume_url=lambda: self.gateway_url,
            voice_endpoint=lambda: f"127.0.0.1:{self._voice_port}",
            on_bot_voice=self.voice.on_bot_voice,
            register_interaction=self.rest.register_interaction,
        )
        self._runners: list[web.AppRunner] = []
        self._tmpdir: Path | None = None
        self._certs: CertificatePaths | None = None
        self._rest_port = self._gateway_port = self._voice_port = 0
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------
    async def __aenter__(self) -> LocalDiscord:
        if self._started:
            raise RuntimeError("a LocalDiscord can be started only once")
        self._started = True
        try:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="local-discord-"))
            self._certs = generate_certificates(self._tmpdir)
            ssl_ctx = server_ssl_context(self._certs)
            self._rest_port = await self._serve(self.rest.app(), ssl_ctx)
            self._gateway_port = await self._serve(self.gateway.app(), ssl_ctx)
            self._voice_port = await self._serve(self.voice.app(), ssl_ctx)
            await self.voice.start_udp()
        except BaseException:
            await self.aclose()
            raise
        _log.info(
            "local Discord up: REST %s, gateway %s, voice 127.0.0.1:%d (UDP %d)",
            self.api_base,
            self.gateway_url,
            self._voice_port,
            self.voice.udp_port,
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop everything, in reverse order of start; safe to call twice."""
        await self.gateway.close()
        await self.voice.close()
        runners, self._runners = self._runners, []
        for runner in reversed(runners):
            await runner.cleanup()
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

    async def _dispatch(self, event: str, data: dict[str, Any]) -> None:
        await self.gateway.dispatch(event, data)

    # -- configuration for the bot ---------------------------------------------------------------
    @property
    def api_base(self) -> str:
        return f"https://127.0.0.1:{self._rest_port}{API_PREFIX}"

    @property
    def gateway_url(self) -> str:
        return f"wss://127.0.0.1:{self._gateway_port}"

    @property
    def voice_endpoint(self) -> str:
        return f"127.0.0.1:{self._voice_port}"

    @property
    def ca_file(self) -> str:
        if self._certs is None:
            raise RuntimeError("LocalDiscord is not running")
        return str(self._certs.ca_file)

    @property
    def application_id(self) -> int:
        return self.world.application_id

    @property
    def bot_user_id(self) -> int:
        return self.world.bot.user_id

    @property
    def guild_id(self) -> int:
        return self.world.guild_id

    @property
    def text_channel_id(self) -> int:
        return self.world.text_channel.id

    @property
    def voice_channel_id(self) -> int:
        return self.world.voice_channel.id

    @property
    def second_voice_channel_id(self) -> int:
        return self.world.second_voice_channel.id

    @property
    def member_ids(self) -> dict[str, int]:
        """Simulated humans by name (e.g. ``{"alice": ..., "bob": ...}``)."""
        return {name: m.user_id for name, m in self.world.humans.items()}

    # -- what the bot did ------------------------------------------------------------------------
    @property
    def requests(self) -> list[RecordedRequest]:
        return self.rest.requests

    @property
    def messages(self) -> list[PostedMessage]:
        return self.rest.messages

    @property
    def on_message(self) -> OnMessage | None:
        return self.rest.on_message

    @on_message.setter
    def on_message(self, callback: OnMessage | None) -> None:
        self.rest.on_message = callback

    async def wait_for_messages(self, count: int) -> list[PostedMessage]:
        """Wait until ``count`` posts/edits were recorded; bound it with ``asyncio.timeout``."""
        return await self.rest.wait_for_messages(count)

    # -- controls --------------------------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 429,
        path_prefix: str = "",
        retry_after: float = 0.05,
        is_global: bool = False,
    ) -> None:
        """Fail the next ``n`` REST requests under ``path_prefix`` (e.g. ``/channels/``)."""
        self.rest.fail_next(
            n, status=status, path_prefix=path_prefix, retry_after=retry_after, is_global=is_global
        )

    async def set_bot_permissions(self, permissions: int) -> None:
        """Give the bot's role exactly ``permissions`` (bits from ``state.PERM_*``) and tell the
        bot (GUILD_ROLE_UPDATE). @everyone's permissions still apply on top, as on Discord."""
        role = self.world.bot_role
        role.permissions = permissions
        _log.info("bot role permissions set to %d", permissions)
        await self.gateway.dispatch(
            "GUILD_ROLE_UPDATE",
            {"guild_id": str(self.world.guild_id), "role": self.world.role_payload(role)},
        )

    async def wait_ready(self) -> None:
        """Wait until the bot's gateway session got READY + GUILD_CREATE."""
        await self.gateway.wait_ready()

    async def force_reconnect(self) -> None:
        """Gateway op 7: the bot reconnects and RESUMEs (missed dispatches are replayed)."""
        await self.gateway.force_reconnect()

    async def invalidate_session(self) -> None:
        """Gateway op 9 (not resumable): the bot reconnects and IDENTIFYs afresh."""
        await self.gateway.invalidate_session()

    async def invoke(
        self, command: str, options: dict[str, Any] | None = None, user_id: int | None = None,
        *, channel_id: int | None = None,
    ) -> InteractionRecord:
        """Type ``/command`` (e.g. ``"transcribe start"``) as ``user_id`` (default: first human)
        in ``channel_id`` (default: #general)."""
        uid = user_id if user_id is not None else next(iter(self.world.humans.values())).user_id
        return await self.gateway.invoke(command, options or {}, uid, channel_id=channel_id)

    async def add_private_text_channel(self, name: str, members: tuple[str, ...]) -> int:
        """A text channel only ``members`` (by human name), the bot and moderators' Manage
        Channels can reach: @everyone is denied View Channel, the members and the bot allowed it
        (member overwrites, as Discord sends them). Told to the bot with CHANNEL_CREATE."""
        view = str(PERM_VIEW_CHANNEL)
        overwrites = [{"id": str(self.world.guild_id), "type": 0, "allow": "0", "deny": view}]
        for uid in [self.world.humans[n].user_id for n in members] + [self.world.bot.user_id]:
            overwrites.append({"id": str(uid), "type": 1, "allow": view, "deny": "0"})
        channel = Channel(self.world.snowflake(), name, CHANNEL_GUILD_TEXT,
                            position=len(self.world.channels), overwrites=overwrites)
        self.world.channels[channel.id] = channel
        _log.info("private text channel #%s for %s", name, ", ".join(members))
        await self.gateway.dispatch("CHANNEL_CREATE", self.world.channel_payload(channel))
        return channel.id

    async def member_join_voice(self, user_id: int, channel_id: int | None = None) -> None:
        """The member joins (or moves to) ``channel_id`` (default: the first voice channel)."""
        member = self.world.member(user_id)
        member.voice_channel_id = channel_id if channel_id is not None else self.voice_channel_id
        _log.info("%s joins voice channel %s", member.name, member.voice_channel_id)
        await self.gateway.voice_state_changed(user_id)
        await self.voice.member_joined(user_id)

    async def move_bot(self, channel_id: int) -> None:
        """Discord moves the bot to another voice channel (a moderator dragged it): the bot gets
        VOICE_STATE_UPDATE with the new channel and VOICE_SERVER_UPDATE with a new token, and its
        voice websocket is closed with 4014; discord.py then opens a new voice session."""
        if self.world.channel(channel_id).type != CHANNEL_GUILD_VOICE:
            raise ValueError(f"channel {channel_id} is not a voice channel")
        bot = self.world.bot
        if bot.voice_channel_id is None:
            raise RuntimeError("the bot is not in a voice channel")
        bot.voice_channel_id = channel_id
        token = secrets.token_hex(8)
        _log.info("the bot is moved to voice channel %s", channel_id)
        await self.gateway.dispatch("VOICE_STATE_UPDATE", self.world.voice_state_payload(bot))
        await self.voice.move_bot(channel_id, bot.voice_session_id, token)
        await self.gateway.dispatch(
            "VOICE_SERVER_UPDATE",
            {"token": token, "guild_id": str(self.guild_id), "endpoint": self.voice_endpoint},
        )

    async def set_nick(self, user_id: int, nick: str | None) -> None:
        """A member's server nickname changes (their display name); told to the bot with
        GUILD_MEMBER_UPDATE, as Discord does."""
        member = self.world.member(user_id)
        self.world.check_nickname(nick)
        member.nick = nick
        _log.info("%s is now shown as %r", member.name, nick)
        await self.gateway.dispatch(
            "GUILD_MEMBER_UPDATE",
            {**self.world.member_payload(member), "guild_id": str(self.world.guild_id)})

    async def leave_voice(self, user_id: int) -> None:
        member = self.world.member(user_id)
        member.voice_channel_id = None
        _log.info("%s leaves the voice channel", member.name)
        await self.gateway.voice_state_changed(user_id)
        await self.voice.member_left(user_id)

    def corrupt_next_commit(self, count: int = 1) -> None:
        """Damage the next ``count`` DAVE commits (op 29) sent to the bot; it must answer op 31
        and is then removed from and re-added to the call's MLS group."""
        self.voice.corrupt_next_commit(count)

    @property
    def journal(self) -> list[str]:
        """The voice server's story so far (ops to and from the bot, joins, leaves, commits)."""
        return list(self.voice.journal)

    async def downgrade_dave(self) -> None:
        """Switch the call's end-to-end encryption off (DAVE protocol version 0)."""
        await self.voice.downgrade_dave()

    async def upgrade_dave(self) -> None:
        """Switch the call's end-to-end encryption back on (DAVE protocol version 1)."""
        await self.voice.upgrade_dave()

    async def speak(
        self,
        user_id: int,
        pcm_48k_stereo_int16: npt.NDArray[np.int16],
        *,
        loss: float = 0.0,
        rng: random.Random | None = None,
        realtime: bool = True,
        speaking_late: bool | None = None,
    ) -> int:
        """A member says ``pcm`` (48 kHz stereo int16); returns media packets sent."""
        return await self.voice.speak(
            user_id,
            pcm_48k_stereo_int16,
            loss=loss,
            rng=rng,
            realtime=realtime,
            speaking_late=speaking_late,
        )

"""The loopback Discord's main gateway (wss, API v10, JSON text frames).

What discord.py 2.7.1 needs from Discord's gateway, in Discord's order: HELLO, IDENTIFY → READY
(``session_id``, ``resume_gateway_url`` pointing back here, ``application``) and one GUILD_CREATE
carrying every member (so discord.py never needs to chunk), heartbeat ACKs, RESUME → replay of
missed dispatches + RESUMED, and op 7 RECONNECT on demand (:meth:`Gateway.force_reconnect`) for
reliability tests. The bot's op 4 voice state update is answered with VOICE_STATE_UPDATE and
VOICE_SERVER_UPDATE pointing at the voice server. :meth:`Gateway.invoke` sends an
INTERACTION_CREATE for an application command the way Discord builds it. Shards: IDENTIFY's
``shard`` [id, count] is honoured; only the session whose shard owns the guild by Discord's
formula (:func:`shard_of`) gets it in READY, its GUILD_CREATE and its dispatches; other shards get
a READY without guilds (see ``bot.sim.discord.cluster`` for several guilds across shards).

Boundary: websocket frames in and out, :class:`~bot.sim.discord.state.World` read and changed; the
voice server and the REST interaction registry are reached through injected callbacks. We never
compress (discord.py only inflates binary frames), which real Discord also allows.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from bot.sim.discord.rest import InteractionRecord
from bot.sim.discord.state import World, user_payload

_log = logging.getLogger(__name__)

# Gateway opcodes (https://discord.com/developers/docs/topics/opcodes-and-status-codes#gateway).
OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_PRESENCE_UPDATE = 3
OP_VOICE_STATE_UPDATE = 4
OP_RESUME = 6
OP_RECONNECT = 7
OP_REQUEST_GUILD_MEMBERS = 8
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11

#: Discord's usual heartbeat interval (ms) in HELLO.
HEARTBEAT_INTERVAL_MS = 41250
#: Close code for a bad token ("Authentication failed").
CLOSE_AUTHENTICATION_FAILED = 4004
#: Close code for a payload that is not JSON ("Decode error").
CLOSE_DECODE_ERROR = 4002
#: Dispatches kept per session for RESUME; an older ``seq`` gets op 9 (re-IDENTIFY), as on Discord.
RESUME_BUFFER = 1000

#: Application command option types (https://discord.com/developers/docs/interactions/application-commands).
OPTION_SUB_COMMAND = 1
OPTION_SUB_COMMAND_GROUP = 2
OPTION_STRING = 3
OPTION_INTEGER = 4
OPTION_BOOLEAN = 5
OPTION_CHANNEL = 7
OPTION_NUMBER = 10
#: Interaction type for slash commands.
INTERACTION_APPLICATION_COMMAND = 2
#: Close code for an IDENTIFY whose ``shard`` is malformed ("Invalid shard").
CLOSE_INVALID_SHARD = 4010

#: Called when the bot asks to join (channel id) or leave (None) voice: (channel, session, token).
BotVoiceCallback = Callable[[int | None, str, str], Awaitable[None]]


@dataclass
class GatewaySession:
    """One IDENTIFYed session: its sequence and every dispatch sent, kept for RESUME replay."""

    session_id: str
    intents: int
    #: IDENTIFY's ``shard``: (shard id, shard count); (0, 1) when the bot did not shard.
    shard: tuple[int, int] = (0, 1)
    seq: int = 0
    sent: collections.deque[dict[str, Any]] = field(
        default_factory=lambda: collections.deque(maxlen=RESUME_BUFFER)
    )
    ws: web.WebSocketResponse | None = None


def shard_of(guild_id: int, shard_count: int) -> int:
    """The shard that receives a guild's events: Discord's ``(guild_id >> 22) % num_shards``."""
    return (guild_id >> 22) % shard_count


def parse_shard(raw: Any) -> tuple[int, int] | None:
    """IDENTIFY's ``shard`` ([id, count]) or (0, 1) when absent; None when malformed."""
    if raw is None:
        return (0, 1)
    if (isinstance(raw, list) and len(raw) == 2 and all(type(v) is int for v in raw)
            and raw[1] >= 1 and 0 <= raw[0] < raw[1]):
        return (raw[0], raw[1])
    return None


def _infer_option_type(value: Any) -> int:
    if isinstance(value, bool):
        return OPTION_BOOLEAN
    if isinstance(value, int):
        return OPTION_INTEGER
    if isinstance(value, float):
        return OPTION_NUMBER
    return OPTION_STRING


class Gateway:
    """Serves the main gateway websocket; see the module docstring for the flow."""

    def __init__(
        self,
        world: World,
        *,
        resume_url: Callable[[], str],
        voice_endpoint: Callable[[], str],
        on_bot_voice: BotVoiceCallback,
        register_interaction: Callable[[InteractionRecord], None],
    ) -> None:
        self.world = world
        self._resume_url = resume_url
        self._voice_endpoint = voice_endpoint
        self._on_bot_voice = on_bot_voice
        self._register_interaction = register_interaction
        self.sessions: dict[str, GatewaySession] = {}
        #: The session of the shard that owns the guild: where its dispatches go.
        self.current: GatewaySession | None = None
        #: Count of IDENTIFYs and RESUMEs seen, for reliability tests.
        self.identify_count = 0
        self.resume_count = 0
        self._ready = asyncio.Event()
        self._sockets: set[web.WebSocketResponse] = set()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.handle)
        return app

    async def wait_ready(self) -> None:
        """Wait until a session has been sent READY + GUILD_CREATE (bound it with a timeout)."""
        await self._ready.wait()

    async def close(self) -> None:
        for ws in list(self._sockets):
            await ws.close(code=1001)

    # -- sending ---------------------------------------------------------------------------------
    @staticmethod
    async def _send(ws: web.WebSocketResponse, payload: dict[str, Any]) -> None:
        _log.debug("gateway out op=%s t=%s s=%s", payload["op"], payload.get("t"), payload.get("s"))
        await ws.send_str(json.dumps(payload))

    async def _send_dispatch(
        self, session: GatewaySession, event: str, data: dict[str, Any]
    ) -> None:
        session.seq += 1
        payload = {"op": OP_DISPATCH, "t": event, "s": session.seq, "d": data}
        session.sent.append(payload)
        if session.ws is not None and not session.ws.closed:
            try:
                await self._send(session.ws, payload)
            except ConnectionResetError:
                _log.info("gateway: %s not delivered (socket closing); kept for RESUME", event)

    async def dispatch(self, event: str, data: dict[str, Any]) -> None:
        """Send a dispatch to the current session (kept for replay if it is disconnected)."""
        if self.current is None:
            _log.debug("gateway: no session, dropping %s", event)
            return
        await self._send_dispatch(self.current, event, data)

    async def force_reconnect(self) -> None:
        """Send op 7 RECONNECT, as Discord does before moving a session; the bot must RESUME."""
        session = self.current
        if session is None or session.ws is None:
            raise RuntimeError("no connected gateway session to reconnect")
        _log.info("gateway: asking session %s to reconnect (op 7)", session.session_id)
        await self._send(session.ws, {"op": OP_RECONNECT, "d": None})

    async def invalidate_session(self) -> None:
        """Send op 9 (not resumable), as Discord does for a lost session: the bot must IDENTIFY."""
        session = self.current
        if session is None or session.ws is None:
            raise RuntimeError("no connected gateway session to invalidate")
        _log.info("gateway: invalidating session %s (op 9)", session.session_id)
        self.sessions.pop(session.session_id, None)
        await self._send(session.ws, {"op": OP_INVALID_SESSION, "d": False})

    # -- connection ------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        _log.info("gateway: connection opened (%s)", request.query_string)
        session: GatewaySession | None = None
        # The code in the client's close frame. discord.py's sharded client cancels the shard's
        # read before it closes with 1000, so aiohttp drops the TCP connection without awaiting
        # our reply, and ``ws.close_code`` reads 1006 (abnormal) for what was a clean close.
        client_code: int | None = None
        try:
            await self._send(
                ws, {"op": OP_HELLO, "d": {"heartbeat_interval": HEARTBEAT_INTERVAL_MS}}
            )
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.CLOSE:
                    client_code = msg.data
                    break
                if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type is not WSMsgType.TEXT:
                    continue
                try:
                    payload = json.loads(msg.data)
                except ValueError:
                    await ws.close(code=CLOSE_DECODE_ERROR)
                    break
                session = await self._on_payload(ws, session, payload)
        finally:
            self._sockets.discard(ws)
            if session is not None and session.ws is ws:
                session.ws = None
            if client_code is not None:
                _log.info("gateway: connection closed by the client (code %s)", client_code)
            else:
                _log.info("gateway: connection closed (code %s)", ws.close_code)
        return ws

    async def _on_payload(
        self, ws: web.WebSocketResponse, session: GatewaySession | None, payload: dict[str, Any]
    ) -> GatewaySession | None:
        op, data = payload.get("op"), payload.get("d")
        _log.debug("gateway in  op=%s", op)
        if op == OP_HEARTBEAT:
            await self._send(ws, {"op": OP_HEARTBEAT_ACK, "d": None})
        elif op == OP_IDENTIFY:
            return await self._identify(ws, data or {})
        elif op == OP_RESUME:
            return await self._resume(ws, data or {})
        elif op == OP_VOICE_STATE_UPDATE and session is not None:
            await self._bot_voice_state(session, data or {})
        elif op == OP_REQUEST_GUILD_MEMBERS and session is not None:
            await self._send_dispatch(
                session,
                "GUILD_MEMBERS_CHUNK",
                {
                    "guild_id": str(self.world.guild_id),
                    "members": [self.world.member_payload(m) for m in self.world.members.values()],
                    "chunk_index": 0,
                    "chunk_count": 1,
                    "not_found": [],
                    "nonce": (data or {}).get("nonce"),
                },
            )
        elif op == OP_PRESENCE_UPDATE:
            pass
        else:
            _log.warning("gateway: unexpected op %s", op)
        return session

    async def _identify(
        self, ws: web.WebSocketResponse, data: dict[str, Any]
    ) -> GatewaySession | None:
        if data.get("token") != self.world.token:
            _log.info("gateway: IDENTIFY with a wrong token, closing 4004")
            await ws.close(code=CLOSE_AUTHENTICATION_FAILED, message=b"Authentication failed.")
            return None
        shard = parse_shard(data.get("shard"))
        if shard is None:
            _log.info("gateway: IDENTIFY with an invalid shard %r, closing 4010", data.get("shard"))
            await ws.close(code=CLOSE_INVALID_SHARD, message=b"Invalid shard.")
            return None
        self.identify_count += 1
        session = GatewaySession(
            session_id=secrets.token_hex(16), intents=int(data.get("intents", 0)), shard=shard
        )
        session.ws = ws
        self.sessions[session.session_id] = session
        owns_guild = self.owns_guild(session)
        if owns_guild:
            self.current = session
        me = user_payload(self.world.bot)
        me.update(verified=True, mfa_enabled=False)
        ready: dict[str, Any] = {
            "v": 10,
            "user": me,
            "guilds": [{"id": str(self.world.guild_id), "unavailable": True}] if owns_guild else [],
            "session_id": session.session_id,
            "session_type": "normal",
            "resume_gateway_url": self._resume_url(),
            "application": {"id": str(self.world.application_id), "flags": 0},
            "private_channels": [],
            "relationships": [],
            "presences": [],
            "geo_ordered_rtc_regions": ["local"],
            "user_settings": {},
        }
        if "shard" in data:
            ready["shard"] = data["shard"]
        await self._send_dispatch(session, "READY", ready)
        if not owns_guild:
            _log.info("gateway: session %s ready as shard %s, without the guild (shard %d owns it)",
                      session.session_id, list(shard), shard_of(self.world.guild_id, shard[1]))
            return session
        await self._send_dispatch(session, "GUILD_CREATE", self.world.guild_payload())
        _log.info("gateway: session %s ready (intents %s, shard %s)", session.session_id,
                  session.intents, list(shard))
        self._ready.set()
        return session

    def owns_guild(self, session: GatewaySession) -> bool:
        """Whether the guild's events go to ``session`` (its shard by Discord's formula)."""
        shard_id, shard_count = session.shard
        return shard_of(self.world.guild_id, shard_count) == shard_id

    async def _resume(
        self, ws: web.WebSocketResponse, data: dict[str, Any]
    ) -> GatewaySession | None:
        session = self.sessions.get(str(data.get("session_id")))
        seq = int(data.get("seq") or 0)
        oldest = session.sent[0]["s"] if session is not None and session.sent else 1
        if session is None or data.get("token") != self.world.token or seq < oldest - 1:
            _log.info("gateway: RESUME of an unknown or too old session, sending op 9")
            await self._send(ws, {"op": OP_INVALID_SESSION, "d": False})
            return None
        self.resume_count += 1
        session.ws = ws
        if self.owns_guild(session):
            self.current = session
        missed = [p for p in session.sent if p["s"] > seq]
        _log.info(
            "gateway: session %s resumed, replaying %d events", session.session_id, len(missed)
        )
        for payload in missed:
            await self._send(ws, payload)
        await self._send_dispatch(session, "RESUMED", {})
        return session

    async def _bot_voice_state(self, session: GatewaySession, data: dict[str, Any]) -> None:
        bot = self.world.bot
        raw_channel = data.get("channel_id")
        channel_id = int(raw_channel) if raw_channel else None
        if channel_id is not None:
            self.world.channel(channel_id)
        bot.voice_channel_id = channel_id
        bot.self_mute = bool(data.get("self_mute"))
        bot.self_deaf = bool(data.get("self_deaf"))
        # Discord's voice session id is the gateway session's id.
        bot.voice_session_id = session.session_id
        _log.info("gateway: bot voice state -> channel %s", channel_id)
        token = secrets.token_hex(8)
        await self._on_bot_voice(channel_id, bot.voice_session_id, token)
        await self._send_dispatch(
            session, "VOICE_STATE_UPDATE", self.world.voice_state_payload(bot)
        )
        if channel_id is not None:
            await self._send_dispatch(
                session,
                "VOICE_SERVER_UPDATE",
                {
                    "token": token,
                    "guild_id": str(self.world.guild_id),
                    "endpoint": self._voice_endpoint(),
                },
            )

    # -- simulated people ------------------------------------------------------------------------
    async def voice_state_changed(self, user_id: int) -> None:
        """Tell the bot a member's voice state changed (join, leave, mute)."""
        member = self.world.member(user_id)
        await self.dispatch("VOICE_STATE_UPDATE", self.world.voice_state_payload(member))

    def _command_schema(self, name: str) -> dict[str, Any] | None:
        for scope in (self.world.guild_id, None):
            for cmd in self.world.commands.get(scope, []):
                if cmd["name"] == name:
                    return cmd
        return None

    def _options(self, schema: list[dict[str, Any]], given: dict[str, Any]) -> list[dict[str, Any]]:
        types = {o["name"]: o.get("type") for o in schema}
        out = []
        for name, value in given.items():
            kind = types.get(name) or _infer_option_type(value)
            if kind == OPTION_CHANNEL:
                value = str(value)
            out.append({"name": name, "type": kind, "value": value})
        return out

    def build_command_data(self, command: str, options: dict[str, Any]) -> dict[str, Any]:
        """``"transcribe start"`` + options -> ``data`` of an APPLICATION_COMMAND interaction."""
        parts = command.strip().lstrip("/").split()
        if not parts:
            raise ValueError("empty command")
        schema = self._command_schema(parts[0])
        level_schema: list[dict[str, Any]] = (schema or {}).get("options") or []
        # Walk sub-command groups / sub-commands from the innermost outwards.
        chain: list[tuple[str, int, list[dict[str, Any]]]] = []
        for depth, part in enumerate(parts[1:]):
            sub = next((o for o in level_schema if o.get("name") == part), None)
            kind = (sub or {}).get("type") or (
                OPTION_SUB_COMMAND if depth == len(parts) - 2 else OPTION_SUB_COMMAND_GROUP
            )
            level_schema = (sub or {}).get("options") or []
            chain.append((part, kind, level_schema))
        leaf_schema = chain[-1][2] if chain else level_schema
        leaf_options = self._options(leaf_schema, options)
        nested: list[dict[str, Any]] = leaf_options
        for part, kind, _ in reversed(chain):
            nested = [{"name": part, "type": kind, "options": nested}]
        resolved: dict[str, Any] = {}
        for opt in leaf_options:
            if opt["type"] == OPTION_CHANNEL:
                ch = self.world.channel(int(opt["value"]))
                resolved.setdefault("channels", {})[str(ch.id)] = {
                    **self.world.channel_payload(ch),
                    "permissions": str((1 << 53) - 1),
                }
        data: dict[str, Any] = {
            "id": (schema or {}).get("id", str(self.world.snowflake())),
            "name": parts[0],
            "type": 1,
            "options": nested,
            "guild_id": str(self.world.guild_id),
        }
        if resolved:
            data["resolved"] = resolved
        return data

    async def invoke(
        self, command: str, options: dict[str, Any], user_id: int, *, channel_id: int | None = None
    ) -> InteractionRecord:
        """Send INTERACTION_CREATE for ``/command`` as ``user_id`` typed it; returns its record."""
        member = self.world.member(user_id)
        channel = self.world.channel(channel_id or self.world.text_channel.id)
        record = InteractionRecord(
            id=self.world.snowflake(),
            token="aW50ZXJhY3Rpb24" + secrets.token_urlsafe(48),
            command=command,
            options=dict(options),
            user_id=user_id,
            channel_id=channel.id,
            created_at=self.world.clock(),
        )
        self._register_interaction(record)
        payload = {
            "id": str(record.id),
            "application_id": str(self.world.application_id),
            "type": INTERACTION_APPLICATION_COMMAND,
            "data": self.build_command_data(command, options),
            "guild_id": str(self.world.guild_id),
            "guild": {"id": str(self.world.guild_id), "locale": "en-US", "features": []},
            "channel_id": str(channel.id),
            "channel": self.world.channel_payload(channel),
            "member": self.world.member_payload(member, with_permissions=True),
            "token": record.token,
            "version": 1,
            "app_permissions": str(self.world.permissions_of(self.world.bot)),
            "locale": "en-US",
            "guild_locale": "en-US",
            "entitlements": [],
            "authorizing_integration_owners": {"0": str(self.world.guild_id)},
            "context": 0,
            "attachment_size_limit": 10 * 1024 * 1024,
        }
        _log.info("gateway: /%s invoked by %s", command, member.name)
        await self.dispatch("INTERACTION_CREATE", payload)
        return record

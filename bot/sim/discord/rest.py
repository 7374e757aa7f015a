"""The loopback Discord's REST API (aiohttp), answering as discord.py 2.7.1 expects.

Covers what cantobot calls: login (``/users/@me``, ``/oauth2/applications/@me``), gateway
discovery, command sync, interaction callbacks and follow-ups, channel messages (JSON and
multipart with attachments), threads, webhooks (create, list, execute with ``wait`` and
``thread_id``, edit), the bot's nickname and the guild/channel/member reads. Every request is
recorded in :attr:`RestApi.requests`; every message posted or edited in :attr:`RestApi.messages`.

Discord's rules are enforced as Discord does (content length 50035, respond-once 40060, the 3 s
acknowledgement deadline 10062, webhook names, nicknames), and :meth:`RestApi.fail_next` injects
429s with the real rate-limit headers (discord.py retries a 429 only when ``Via`` is present) or
5xx errors. Boundary: HTTP in, :class:`~bot.sim.discord.state.World` changes out; the gateway is
reached only through the injected ``dispatch`` callback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from bot.sim.discord.state import (
    INTERACTION_ACK_DEADLINE,
    INTERACTION_ALREADY_ACKNOWLEDGED,
    INTERACTION_TOKEN_LIFETIME,
    INVALID_FORM_BODY,
    MISSING_PERMISSIONS,
    PERM_CHANGE_NICKNAME,
    PERM_CREATE_PUBLIC_THREADS,
    PERM_MANAGE_WEBHOOKS,
    PERM_SEND_MESSAGES,
    PERM_SEND_MESSAGES_IN_THREADS,
    UNAUTHORIZED,
    UNKNOWN_INTERACTION,
    UNKNOWN_WEBHOOK,
    ApiError,
    PostedMessage,
    RecordedRequest,
    StoredMessage,
    Webhook,
    World,
    user_payload,
)

_log = logging.getLogger(__name__)

#: The API version prefix discord.py 2.7.1 uses (``Route.BASE``).
API_PREFIX = "/api/v10"
#: ``Via`` as Discord's edge sends it; discord.py treats a 429 without it as a Cloudflare ban.
VIA_HEADER = "1.1 google"
#: How long Discord remembers a nonce for ``enforce_nonce`` ("the past few minutes").
NONCE_WINDOW_S = 300.0
#: The interaction response types (https://discord.com/developers/docs/interactions/receiving-and-responding).
CALLBACK_PONG = 1
CALLBACK_CHANNEL_MESSAGE = 4
CALLBACK_DEFERRED_CHANNEL_MESSAGE = 5
CALLBACK_DEFERRED_UPDATE = 6
CALLBACK_UPDATE_MESSAGE = 7
#: Message flag for ephemeral responses.
FLAG_EPHEMERAL = 1 << 6

#: Per-request storage: the parsed JSON body and the names of uploaded files.
BODY_KEY: web.RequestKey[Any] = web.RequestKey("body", object)
FILES_KEY: web.RequestKey[list[str]] = web.RequestKey("files", list)


def _object_body(request: web.Request) -> dict[str, Any]:
    """The JSON object the request carried ({} for none or for a non-object)."""
    body = request[BODY_KEY]
    return body if isinstance(body, dict) else {}


Dispatch = Callable[[str, dict[str, Any]], Awaitable[None]]
OnMessage = Callable[[PostedMessage], Awaitable[None]]


@dataclass
class Fault:
    """An injected failure for the next ``remaining`` requests whose path starts with a prefix."""

    remaining: int
    status: int
    path_prefix: str
    retry_after: float
    is_global: bool = False


@dataclass
class InteractionRecord:
    """One invoked command as the fake sees it: the callback and every follow-up it received."""

    id: int
    token: str
    command: str
    options: dict[str, Any]
    user_id: int
    channel_id: int
    created_at: float
    callback_type: int | None = None
    callback_data: dict[str, Any] | None = None
    #: The callback's HTTP outcome (status and Discord error code when it was refused).
    callback_errors: list[int] = field(default_factory=list)
    original_message_id: int | None = None
    followup_message_ids: list[int] = field(default_factory=list)
    ephemeral: bool = False
    _changed: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def acknowledged(self) -> bool:
        return self.callback_type is not None

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[InteractionRecord], bool]) -> None:
        """Wait until ``predicate(self)`` holds, checked after each change (caller bounds time)."""
        while not predicate(self):
            await self._changed.wait()

    async def wait_acknowledged(self) -> None:
        await self.wait_until(lambda r: r.acknowledged)

    async def wait_followups(self, count: int) -> None:
        await self.wait_until(lambda r: len(r.followup_message_ids) >= count)

    async def wait_original_content(self) -> None:
        """Wait until the original response has content (a reply, or a deferral then edited)."""
        await self.wait_until(lambda r: bool(r._original_content))

    # Filled in by RestApi so records can describe their messages without holding the World.
    _original_content: str = ""
    _followup_contents: list[str] = field(default_factory=list)

    @property
    def response_content(self) -> str:
        """Content of the original response message as it stands now ('' while deferred)."""
        return self._original_content

    @property
    def followup_contents(self) -> list[str]:
        return list(self._followup_contents)


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """JSON with ``Content-Type: application/json`` exactly (discord.py rejects a charset)."""
    all_headers = {"Content-Type": "application/json"}
    all_headers.update(headers or {})
    return web.Response(body=json.dumps(data).encode(), status=status, headers=all_headers)


def _snowflake(value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, INVALID_FORM_BODY, f"Value {value!r} is not snowflake.") from None


class RestApi:
    """The REST side of the local Discord: build with a World, serve :meth:`app`."""

    def __init__(
        self,
        world: World,
        *,
        gateway_url: Callable[[], str],
        dispatch: Dispatch,
        on_message: OnMessage | None = None,
    ) -> None:
        self.world = world
        self._gateway_url = gateway_url
        self._dispatch = dispatch
        self.on_message = on_message
        self.requests: list[RecordedRequest] = []
        self.messages: list[PostedMessage] = []
        #: Channels where the bot's posts are refused 403 50013, as with Send Messages denied
        #: by a channel overwrite (e.g. a voice channel's chat).
        self.refuse_posts_in: set[int] = set()
        #: Seconds the answer to a channel post with attachments is held after the message was
        #: stored: Discord took the post, its answer is late (a slow or partitioned Discord).
        self.answer_uploads_late = 0.0
        #: (author, nonce) -> (message id, when) of posts made with ``enforce_nonce``.
        self._nonces: dict[tuple[int, str], tuple[int, float]] = {}
        self.interactions: dict[str, InteractionRecord] = {}
        #: The shard count /gateway/bot recommends (Discord's: about one per 1000 guilds).
        self.recommended_shards = 1
        self._faults: list[Fault] = []
        self._message_event = asyncio.Event()

    # -- test controls ---------------------------------------------------------------------------
    def fail_next(
        self,
        n: int = 1,
        *,
        status: int = 429,
        path_prefix: str = "",
        retry_after: float = 0.05,
        is_global: bool = False,
    ) -> None:
        """Answer the next ``n`` requests under ``path_prefix`` (after /api/v10) with ``status``."""
        if status != 429 and status < 500:
            raise ValueError("fail_next injects 429 or 5xx only")
        self._faults.append(Fault(n, status, path_prefix, retry_after, is_global))

    def clear_faults(self) -> None:
        """Forget the failures :meth:`fail_next` injected and not yet used."""
        self._faults.clear()

    def register_interaction(self, record: InteractionRecord) -> None:
        self.interactions[record.token] = record

    async def wait_for_messages(self, count: int) -> list[PostedMessage]:
        """Wait until at least ``count`` posts/edits were recorded (caller bounds the time)."""
        while len(self.messages) < count:
            self._message_event.clear()
            await self._message_event.wait()
        return list(self.messages)

    # -- aiohttp plumbing ------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=32 * 1024 * 1024)
        r = app.router
        p = API_PREFIX
        r.add_get(p + "/users/@me", self.get_me)
        r.add_get(p + "/users/@me/guilds", self.get_my_guilds)
        r.add_get(p + "/users/{user_id}", self.get_user)
        r.add_get(p + "/oauth2/applications/@me", self.get_application)
        r.add_get(p + "/applications/@me", self.get_application)
        r.add_get(p + "/gateway", self.get_gateway)
        r.add_get(p + "/gateway/bot", self.get_gateway_bot)
        r.add_get(p + "/applications/{app_id}/commands", self.get_commands)
        r.add_put(p + "/applications/{app_id}/commands", self.put_commands)
        r.add_get(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.get_commands)
        r.add_put(p + "/applications/{app_id}/guilds/{guild_id}/commands", self.put_commands)
        r.add_post(p + "/interactions/{interaction_id}/{token}/callback", self.post_callback)
        r.add_post(p + "/webhooks/{webhook_id}/{token}", self.execute_webhook)
        r.add_get(
            p + "/webhooks/{webhook_id}/{token}/messages/{message_id}", self.get_webhook_message
        )
        r.add_patch(
            p + "/webhooks/{webhook_id}/{token}/messages/{message_id}", self.edit_webhook_message
        )
        r.add_delete(
            p + "/webhooks/{webhook_id}/{token}/messages/{message_id}", self.delete_webhook_message
        )
        r.add_get(p + "/channels/{channel_id}", self.get_channel)
        r.add_get(p + "/channels/{channel_id}/messages", self.get_channel_messages)
        r.add_post(p + "/channels/{channel_id}/messages", self.post_channel_message)
        r.add_get(p + "/channels/{channel_id}/messages/{message_id}", self.get_channel_message)
        r.add_patch(p + "/channels/{channel_id}/messages/{message_id}", self.edit_channel_message)
        r.add_delete(
            p + "/channels/{channel_id}/messages/{message_id}", self.delete_channel_message
        )
        r.add_post(p + "/channels/{channel_id}/threads", self.post_thread)
        r.add_post(p + "/channels/{channel_id}/messages/{message_id}/threads", self.post_thread)
        r.add_post(p + "/channels/{channel_id}/webhooks", self.post_webhook)
        r.add_get(p + "/channels/{channel_id}/webhooks", self.get_channel_webhooks)
        r.add_get(p + "/guilds/{guild_id}/webhooks", self.get_guild_webhooks)
        r.add_get(p + "/guilds/{guild_id}", self.get_guild)
        r.add_get(p + "/guilds/{guild_id}/channels", self.get_guild_channels)
        r.add_get(p + "/guilds/{guild_id}/roles", self.get_guild_roles)
        r.add_get(p + "/guilds/{guild_id}/members/{user_id}", self.get_guild_member)
        r.add_patch(p + "/guilds/{guild_id}/members/@me", self.patch_me_member)
        return app

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            body, files, contents = await self._read_body(request)
        except web.HTTPBadRequest:
            return json_response({"message": "400: Bad Request", "code": 50109}, 400)
        request[BODY_KEY] = body
        request[FILES_KEY] = files
        path = (
            request.path[len(API_PREFIX) :] if request.path.startswith(API_PREFIX) else request.path
        )
        record = RecordedRequest(
            method=request.method,
            path=path,
            query=dict(request.query),
            json=body,
            files=tuple(files),
            at=self.world.clock(),
            file_contents=tuple(contents),
        )
        index = len(self.requests)
        self.requests.append(record)
        _log.debug("REST in  %s %s json=%s files=%s", request.method, path, body, files)
        response: web.StreamResponse | None = self._injected_fault(path)
        if response is None:
            if not self._authorised(request, path):
                response = json_response(
                    {"message": "401: Unauthorized", "code": UNAUTHORIZED}, 401
                )
            else:
                try:
                    response = await handler(request)
                except ApiError as exc:
                    _log.info("REST refused %s %s: %s", request.method, path, exc)
                    response = json_response(exc.body(), exc.status)
                except web.HTTPException as exc:
                    response = json_response(
                        {"message": f"{exc.status}: {exc.reason}", "code": 0}, exc.status
                    )
        self.requests[index] = dataclasses.replace(record, status=response.status)
        _log.debug("REST out %s %s -> %s", request.method, path, response.status)
        return response

    @staticmethod
    async def _read_body(request: web.Request) -> tuple[Any, list[str], list[bytes]]:
        if not request.can_read_body:
            return None, [], []
        ctype = request.content_type
        if ctype == "multipart/form-data":
            form = await request.post()
            files: list[str] = []
            contents: list[bytes] = []
            body: Any = None
            for key, value in form.items():
                if isinstance(value, web.FileField):
                    with value.file:  # read whole: closed now, not left to a finished request
                        if key == "payload_json":
                            body = json.loads(value.file.read())
                        else:
                            files.append(value.filename)
                            contents.append(value.file.read())
                elif key == "payload_json":
                    body = json.loads(value)
            return body, files, contents
        raw = await request.read()
        if not raw:
            return None, [], []
        try:
            return json.loads(raw), [], []
        except ValueError:
            raise web.HTTPBadRequest(reason="body is not JSON") from None

    def _authorised(self, request: web.Request, path: str) -> bool:
        # Webhook and interaction routes authenticate by the token in the path.
        if path.startswith("/webhooks/") or path.startswith("/interactions/"):
            return True
        return request.headers.get("Authorization") == f"Bot {self.world.token}"

    def _injected_fault(self, path: str) -> web.Response | None:
        for fault in self._faults:
            if fault.remaining > 0 and path.startswith(fault.path_prefix):
                fault.remaining -= 1
                _log.info("REST injected %s for %s", fault.status, path)
                if fault.status == 429:
                    return self._rate_limited(fault)
                return json_response(
                    {"message": "500: Internal Server Error", "code": 0}, fault.status
                )
        self._faults = [f for f in self._faults if f.remaining > 0]
        return None

    def _rate_limited(self, fault: Fault) -> web.Response:
        now = self.world.wall_clock()
        headers = {
            "Via": VIA_HEADER,
            "X-RateLimit-Limit": "5",
            "X-RateLimit-Remaining": "0",
            "X-RateLimit-Reset": f"{now + fault.retry_after:.3f}",
            "X-RateLimit-Reset-After": f"{fault.retry_after:.3f}",
            "X-RateLimit-Bucket": "a" * 32,
            "X-RateLimit-Scope": "global" if fault.is_global else "user",
            "Retry-After": str(math.ceil(fault.retry_after)),
        }
        if fault.is_global:
            headers["X-RateLimit-Global"] = "true"
        body = {
            "message": "You are being rate limited.",
            "retry_after": fault.retry_after,
            "global": fault.is_global,
        }
        return json_response(body, 429, headers)

    async def _record(self, msg: StoredMessage, *, edit: bool) -> None:
        posted = self.world.posted(msg, edit=edit)
        self.messages.append(posted)
        self._message_event.set()
        _log.info(
            "message %s in #%s%s by %s (%d chars)",
            "edited" if edit else "posted",
            posted.channel,
            f" / {posted.thread}" if posted.thread else "",
            posted.author,
            len(posted.content),
        )
        for record in self.interactions.values():
            if msg.id == record.original_message_id:
                record._original_content = msg.content
                record._notify()
            elif msg.id in record.followup_message_ids:
                i = record.followup_message_ids.index(msg.id)
                record._followup_contents[i] = msg.content
                record._notify()
        if self.on_message is not None:
            await self.on_message(posted)

    # -- identity and gateway --------------------------------------------------------------------
    async def get_me(self, request: web.Request) -> web.Response:
        data = user_payload(self.world.bot)
        data.update(verified=True, mfa_enabled=False, locale="en-US")
        return json_response(data)

    async def get_my_guilds(self, request: web.Request) -> web.Response:
        """The bot's guilds with its guild-level permissions, as Discord lists them."""
        w = self.world
        return json_response([{
            "id": str(w.guild_id), "name": w.guild_name, "icon": None, "features": [],
            "owner": w.bot.user_id == w.owner_id, "permissions": str(w.permissions_of(w.bot)),
        }])

    async def get_user(self, request: web.Request) -> web.Response:
        return json_response(
            user_payload(self.world.member(_snowflake(request.match_info["user_id"])))
        )

    async def get_application(self, request: web.Request) -> web.Response:
        return json_response(self.world.application_payload())

    async def get_gateway(self, request: web.Request) -> web.Response:
        return json_response({"url": self._gateway_url()})

    async def get_gateway_bot(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "url": self._gateway_url(),
                "shards": self.recommended_shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 86_400_000,
                    "max_concurrency": 1,
                },
            }
        )

    # -- application commands --------------------------------------------------------------------
    def _scope(self, request: web.Request) -> int | None:
        if _snowflake(request.match_info["app_id"]) != self.world.application_id:
            raise ApiError(403, 50001, "Missing Access")
        guild = request.match_info.get("guild_id")
        if guild is None:
            return None
        if _snowflake(guild) != self.world.guild_id:
            raise ApiError(403, 50001, "Missing Access")
        return self.world.guild_id

    async def get_commands(self, request: web.Request) -> web.Response:
        return json_response(self.world.commands.get(self._scope(request), []))

    async def put_commands(self, request: web.Request) -> web.Response:
        scope = self._scope(request)
        body = request[BODY_KEY]
        if not isinstance(body, list):
            raise ApiError(400, INVALID_FORM_BODY, "Invalid Form Body: expected an array")
        stored = []
        for cmd in body:
            data = {
                "id": str(self.world.snowflake()),
                "application_id": str(self.world.application_id),
                "version": str(self.world.snowflake()),
                "type": cmd.get("type", 1),
                "name": cmd["name"],
                "description": cmd.get("description", ""),
                "options": cmd.get("options", []),
                "default_member_permissions": cmd.get("default_member_permissions"),
                "dm_permission": cmd.get("dm_permission", True),
                "nsfw": cmd.get("nsfw", False),
                "contexts": cmd.get("contexts"),
                "integration_types": cmd.get("integration_types", [0]),
            }
            if scope is not None:
                data["guild_id"] = str(scope)
            stored.append(data)
        self.world.commands[scope] = stored
        _log.info("commands synced (%s): %s", scope or "global", [c["name"] for c in stored])
        return json_response(stored)

    # -- interactions ----------------------------------------------------------------------------
    def _interaction(self, token: str) -> InteractionRecord:
        record = self.interactions.get(token)
        if record is None:
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        return record

    async def post_callback(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        record = self._interaction(token)
        if str(record.id) != request.match_info["interaction_id"]:
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        if record.acknowledged:
            record.callback_errors.append(INTERACTION_ALREADY_ACKNOWLEDGED)
            record._notify()
            raise ApiError(
                400, INTERACTION_ALREADY_ACKNOWLEDGED, "Interaction has already been acknowledged."
            )
        if self.world.clock() - record.created_at > INTERACTION_ACK_DEADLINE:
            record.callback_errors.append(UNKNOWN_INTERACTION)
            record._notify()
            raise ApiError(404, UNKNOWN_INTERACTION, "Unknown interaction")
        body = _object_body(request)
        ctype = body.get("type")
        data = body.get("data") or {}
        if ctype not in (1, 4, 5, 6, 7, 8, 9, 10, 12):
            raise ApiError(400, INVALID_FORM_BODY, "Invalid Form Body: type")
        self.world.check_content(data.get("content"))
        record.callback_type = ctype
        record.callback_data = data
        record.ephemeral = bool(int(data.get("flags") or 0) & FLAG_EPHEMERAL)
        _log.info("interaction %s acknowledged with type %s", record.command, ctype)
        message: StoredMessage | None = None
        if ctype in (CALLBACK_CHANNEL_MESSAGE, CALLBACK_DEFERRED_CHANNEL_MESSAGE):
            message = self.world.store_message(
                channel_id=record.channel_id,
                author_id=self.world.bot.user_id,
                author_name=self.world.bot.name,
                content=(data.get("content") or "") if ctype == CALLBACK_CHANNEL_MESSAGE else "",
                webhook_id=self.world.application_id,
                attachments=request[FILES_KEY],
                embeds=data.get("embeds"),
                allowed_mentions=data.get("allowed_mentions"),
                interaction_token=token,
            )
            record.original_message_id = message.id
        record._notify()
        if message is not None and ctype == CALLBACK_CHANNEL_MESSAGE:
            await self._record(message, edit=False)
        if request.query.get("with_response") not in ("1", "true", "True"):
            return web.Response(status=204)
        callback: dict[str, Any] = {
            "interaction": {
                "id": str(record.id),
                "type": 2,
                "response_message_loading": ctype == CALLBACK_DEFERRED_CHANNEL_MESSAGE,
                "response_message_ephemeral": record.ephemeral,
            }
        }
        if message is not None:
            callback["interaction"]["response_message_id"] = str(message.id)
            callback["resource"] = {"type": ctype, "message": self.world.message_payload(message)}
        return json_response(callback)

    # -- webhooks (incl. interaction follow-ups) -------------------------------------------------
    def _resolve_webhook(
        self, request: web.Request
    ) -> tuple[Webhook | None, InteractionRecord | None]:
        webhook_id = _snowflake(request.match_info["webhook_id"])
        token = request.match_info["token"]
        if webhook_id == self.world.application_id and token in self.interactions:
            record = self.interactions[token]
            if not record.acknowledged or (
                self.world.clock() - record.created_at > INTERACTION_TOKEN_LIFETIME
            ):
                raise ApiError(404, UNKNOWN_WEBHOOK, "Unknown Webhook")
            return None, record
        hook = self.world.webhooks.get(webhook_id)
        if hook is None or not secrets.compare_digest(hook.token, token):
            raise ApiError(404, UNKNOWN_WEBHOOK, "Unknown Webhook")
        return hook, None

    def _target_channel(
        self, request: web.Request, hook: Webhook | None, record: InteractionRecord | None
    ) -> int:
        if hook is not None:
            base = hook.channel_id
        elif record is not None:
            base = record.channel_id
        else:  # _resolve_webhook returns one of the two
            raise ApiError(404, UNKNOWN_WEBHOOK, "Unknown Webhook")
        thread_id = request.query.get("thread_id")
        if thread_id is None:
            return base
        thread = self.world.channel(_snowflake(thread_id))
        if thread.parent_id != base:
            raise ApiError(400, 220001, "thread_id is not a thread of the webhook's channel")
        return thread.id

    async def execute_webhook(self, request: web.Request) -> web.Response:
        hook, record = self._resolve_webhook(request)
        body = _object_body(request)
        files = request[FILES_KEY]
        content = body.get("content") or ""
        if not content and not files and not body.get("embeds"):
            raise ApiError(400, 50006, "Cannot send an empty message")
        username = body.get("username")
        if username is not None:
            self.world.check_webhook_name(username)
        author = username or (hook.name if hook is not None else self.world.bot.name)
        msg = self.world.store_message(
            channel_id=self._target_channel(request, hook, record),
            author_id=hook.creator_id if hook is not None else self.world.bot.user_id,
            author_name=author,
            content=content,
            webhook_id=hook.id if hook is not None else self.world.application_id,
            attachments=files,
            embeds=body.get("embeds"),
            allowed_mentions=body.get("allowed_mentions"),
            interaction_token=record.token if record is not None else None,
        )
        if record is not None:
            record.followup_message_ids.append(msg.id)
            record._followup_contents.append(msg.content)
            record._notify()
        await self._record(msg, edit=False)
        wait = request.query.get("wait", "false").lower() in ("1", "true")
        if record is not None or wait:
            return json_response(self.world.message_payload(msg))
        return web.Response(status=204)

    def _webhook_message(self, request: web.Request) -> StoredMessage:
        hook, record = self._resolve_webhook(request)
        mid = request.match_info["message_id"]
        if mid == "@original":
            if record is None or record.original_message_id is None:
                raise ApiError(404, 10008, "Unknown Message")
            return self.world.message(None, record.original_message_id)
        msg = self.world.message(None, _snowflake(mid))
        expected = hook.id if hook is not None else self.world.application_id
        if msg.webhook_id != expected:
            raise ApiError(404, 10008, "Unknown Message")
        return msg

    async def get_webhook_message(self, request: web.Request) -> web.Response:
        return json_response(self.world.message_payload(self._webhook_message(request)))

    async def edit_webhook_message(self, request: web.Request) -> web.Response:
        msg = self._webhook_message(request)
        self.world.edit_message(msg, _object_body(request), request[FILES_KEY])
        await self._record(msg, edit=True)
        return json_response(self.world.message_payload(msg))

    async def delete_webhook_message(self, request: web.Request) -> web.Response:
        msg = self._webhook_message(request)
        del self.world.messages[msg.id]
        return web.Response(status=204)

    async def post_webhook(self, request: web.Request) -> web.Response:
        channel = self.world.channel(_snowflake(request.match_info["channel_id"]))
        self.world.require(self.world.bot, PERM_MANAGE_WEBHOOKS)
        body = _object_body(request)
        name = body.get("name", "")
        self.world.check_webhook_name(name)
        hook = Webhook(
            id=self.world.snowflake(),
            token=secrets.token_urlsafe(48),
            channel_id=channel.id,
            name=name,
            creator_id=self.world.bot.user_id,
        )
        self.world.webhooks[hook.id] = hook
        _log.info("webhook %r created in #%s", name, channel.name)
        return json_response(self.world.webhook_payload(hook))

    async def get_channel_webhooks(self, request: web.Request) -> web.Response:
        cid = self.world.channel(_snowflake(request.match_info["channel_id"])).id
        self.world.require(self.world.bot, PERM_MANAGE_WEBHOOKS)
        hooks = [h for h in self.world.webhooks.values() if h.channel_id == cid]
        return json_response([self.world.webhook_payload(h) for h in hooks])

    async def get_guild_webhooks(self, request: web.Request) -> web.Response:
        self._guild(request)
        self.world.require(self.world.bot, PERM_MANAGE_WEBHOOKS)
        return json_response([self.world.webhook_payload(h) for h in self.world.webhooks.values()])

    # -- channels and messages -------------------------------------------------------------------
    async def get_channel(self, request: web.Request) -> web.Response:
        channel = self.world.channel(_snowflake(request.match_info["channel_id"]))
        return json_response(self.world.channel_payload(channel))

    async def get_channel_messages(self, request: web.Request) -> web.Response:
        cid = self.world.channel(_snowflake(request.match_info["channel_id"])).id
        limit = int(request.query.get("limit", "50"))
        msgs = sorted(
            (m for m in self.world.messages.values() if m.channel_id == cid),
            key=lambda m: m.id,
            reverse=True,
        )[:limit]
        return json_response([self.world.message_payload(m) for m in msgs])

    async def get_channel_message(self, request: web.Request) -> web.Response:
        msg = self.world.message(
            _snowflake(request.match_info["channel_id"]),
            _snowflake(request.match_info["message_id"]),
        )
        return json_response(self.world.message_payload(msg))

    async def post_channel_message(self, request: web.Request) -> web.Response:
        channel = self.world.channel(_snowflake(request.match_info["channel_id"]))
        in_thread = channel.parent_id is not None
        self.world.require(
            self.world.bot, PERM_SEND_MESSAGES_IN_THREADS if in_thread else PERM_SEND_MESSAGES
        )
        if channel.id in self.refuse_posts_in:
            raise ApiError(403, MISSING_PERMISSIONS, "Missing Permissions")
        body = _object_body(request)
        files = request[FILES_KEY]
        content = body.get("content") or ""
        if not content and not files and not body.get("embeds"):
            raise ApiError(400, 50006, "Cannot send an empty message")
        nonce = body.get("nonce")
        key = (self.world.bot.user_id, str(nonce))
        if nonce is not None and body.get("enforce_nonce"):
            # Discord: with enforce_nonce, a nonce the same author used in the past few minutes
            # returns that message and creates none.
            seen = self._nonces.get(key)
            now = asyncio.get_running_loop().time()
            if seen is not None and now - seen[1] < NONCE_WINDOW_S and seen[0] in (
                    self.world.messages):
                return json_response(self.world.message_payload(self.world.messages[seen[0]]))
        msg = self.world.store_message(
            channel_id=channel.id,
            author_id=self.world.bot.user_id,
            author_name=self.world.bot.nick or self.world.bot.name,
            content=content,
            attachments=files,
            embeds=body.get("embeds"),
            allowed_mentions=body.get("allowed_mentions"),
        )
        if nonce is not None and body.get("enforce_nonce"):
            self._nonces[key] = (msg.id, asyncio.get_running_loop().time())
        await self._record(msg, edit=False)
        if files and self.answer_uploads_late:
            await asyncio.sleep(self.answer_uploads_late)
        return json_response(self.world.message_payload(msg))

    async def edit_channel_message(self, request: web.Request) -> web.Response:
        msg = self.world.message(
            _snowflake(request.match_info["channel_id"]),
            _snowflake(request.match_info["message_id"]),
        )
        if msg.author_id != self.world.bot.user_id or msg.webhook_id is not None:
            raise ApiError(403, 50005, "Cannot edit a message authored by another user")
        self.world.edit_message(msg, _object_body(request), request[FILES_KEY])
        await self._record(msg, edit=True)
        return json_response(self.world.message_payload(msg))

    async def delete_channel_message(self, request: web.Request) -> web.Response:
        msg = self.world.message(
            _snowflake(request.match_info["channel_id"]),
            _snowflake(request.match_info["message_id"]),
        )
        del self.world.messages[msg.id]
        return web.Response(status=204)

    async def post_thread(self, request: web.Request) -> web.Response:
        parent_id = _snowflake(request.match_info["channel_id"])
        self.world.require(self.world.bot, PERM_CREATE_PUBLIC_THREADS)
        body = _object_body(request)
        if "message_id" in request.match_info:
            self.world.message(parent_id, _snowflake(request.match_info["message_id"]))
        thread = self.world.create_thread(parent_id, body.get("name", ""), self.world.bot.user_id)
        _log.info("thread %r created under #%s", thread.name, self.world.channel(parent_id).name)
        payload = self.world.channel_payload(thread)
        await self._dispatch("THREAD_CREATE", {**payload, "newly_created": True})
        return json_response(payload, 201)

    # -- guild -----------------------------------------------------------------------------------
    def _guild(self, request: web.Request) -> None:
        if _snowflake(request.match_info["guild_id"]) != self.world.guild_id:
            raise ApiError(404, 10004, "Unknown Guild")

    async def get_guild(self, request: web.Request) -> web.Response:
        self._guild(request)
        data = self.world.guild_payload()
        for key in ("channels", "threads", "members", "voice_states", "presences"):
            data.pop(key, None)
        return json_response(data)

    async def get_guild_channels(self, request: web.Request) -> web.Response:
        self._guild(request)
        return json_response(
            [self.world.channel_payload(c) for c in self.world.channels.values() if c.type != 11]
        )

    async def get_guild_roles(self, request: web.Request) -> web.Response:
        self._guild(request)
        return json_response([self.world.role_payload(r) for r in self.world.roles])

    async def get_guild_member(self, request: web.Request) -> web.Response:
        self._guild(request)
        member = self.world.member(_snowflake(request.match_info["user_id"]))
        return json_response(self.world.member_payload(member))

    async def patch_me_member(self, request: web.Request) -> web.Response:
        self._guild(request)
        body = _object_body(request)
        if "nick" in body:
            self.world.require(self.world.bot, PERM_CHANGE_NICKNAME)
            nick = body["nick"] or None
            self.world.check_nickname(nick)
            self.world.bot.nick = nick
            _log.info("bot nickname set to %r", nick)
        payload = self.world.member_payload(self.world.bot)
        await self._dispatch(
            "GUILD_MEMBER_UPDATE", {**payload, "guild_id": str(self.world.guild_id)}
        )
        return json_response(payload)

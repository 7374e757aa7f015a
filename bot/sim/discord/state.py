"""The loopback Discord's world: one guild, its channels, members, messages and interactions.

Pure data and rules, no sockets: the REST app, the gateway and the voice server all read and
change one :class:`World`, and build wire payloads with the ``*_payload`` helpers here so every
endpoint describes an object the same way. Discord's documented limits live here as named
constants, and a broken rule raises :class:`ApiError` carrying Discord's JSON error code, which the
REST layer turns into the same status and body Discord would send.
"""

from __future__ import annotations

import datetime
import itertools
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bot.errors import CantobotError

# -- Discord limits (https://discord.com/developers/docs) ------------------------------------------
#: Message content limit ("Create Message": content up to 2000 characters).
MAX_CONTENT_LENGTH = 2000
#: Nickname limit ("Modify Current Member": nick 1-32 characters).
MAX_NICKNAME_LENGTH = 32
#: Webhook names may not contain these ("Create Webhook": name rules).
FORBIDDEN_WEBHOOK_NAME_PARTS = ("discord", "clyde")
#: Webhook name length 1-80 ("Create Webhook").
MAX_WEBHOOK_NAME_LENGTH = 80
#: An interaction must be acknowledged within 3 seconds ("Receiving and Responding").
INTERACTION_ACK_DEADLINE = 3.0
#: Interaction tokens stay valid for follow-ups for 15 minutes.
INTERACTION_TOKEN_LIFETIME = 15 * 60.0
#: Discord's epoch for snowflakes (2015-01-01T00:00:00Z), in milliseconds.
DISCORD_EPOCH_MS = 1420070400000

# -- JSON error codes (https://discord.com/developers/docs/topics/opcodes-and-status-codes) --------
UNKNOWN_CHANNEL = 10003
UNKNOWN_MESSAGE = 10008
UNKNOWN_WEBHOOK = 10015
UNKNOWN_INTERACTION = 10062
UNKNOWN_MEMBER = 10007
INTERACTION_ALREADY_ACKNOWLEDGED = 40060
INVALID_FORM_BODY = 50035
MISSING_PERMISSIONS = 50013
UNAUTHORIZED = 0

# -- Permission bits (https://discord.com/developers/docs/topics/permissions) ---------------------
PERM_ADMINISTRATOR = 1 << 3
PERM_MANAGE_CHANNELS = 1 << 4
PERM_VIEW_CHANNEL = 1 << 10
PERM_SEND_MESSAGES = 1 << 11
PERM_MANAGE_MESSAGES = 1 << 13
PERM_EMBED_LINKS = 1 << 14
PERM_ATTACH_FILES = 1 << 15
PERM_READ_MESSAGE_HISTORY = 1 << 16
PERM_CONNECT = 1 << 20
PERM_SPEAK = 1 << 21
PERM_USE_VAD = 1 << 25
PERM_CHANGE_NICKNAME = 1 << 26
PERM_MANAGE_WEBHOOKS = 1 << 29
PERM_USE_APPLICATION_COMMANDS = 1 << 31
PERM_CREATE_PUBLIC_THREADS = 1 << 35
PERM_SEND_MESSAGES_IN_THREADS = 1 << 38
#: What @everyone may do in the simulated guild: talk, listen, use commands; nothing managerial.
EVERYONE_PERMISSIONS = (
    PERM_VIEW_CHANNEL
    | PERM_SEND_MESSAGES
    | PERM_EMBED_LINKS
    | PERM_ATTACH_FILES
    | PERM_READ_MESSAGE_HISTORY
    | PERM_CONNECT
    | PERM_SPEAK
    | PERM_USE_VAD
    | PERM_CHANGE_NICKNAME
    | PERM_USE_APPLICATION_COMMANDS
    | PERM_CREATE_PUBLIC_THREADS
    | PERM_SEND_MESSAGES_IN_THREADS
)
#: The bot's role: what the bot needs to post captions through webhooks and threads.
BOT_ROLE_PERMISSIONS = EVERYONE_PERMISSIONS | PERM_MANAGE_WEBHOOKS | PERM_MANAGE_MESSAGES
#: A "Moderator" role: Manage Channels, which the transcribe command checks.
MODERATOR_ROLE_PERMISSIONS = EVERYONE_PERMISSIONS | PERM_MANAGE_CHANNELS

# Channel types (https://discord.com/developers/docs/resources/channel#channel-object-channel-types)
CHANNEL_GUILD_TEXT = 0
CHANNEL_GUILD_VOICE = 2
CHANNEL_PUBLIC_THREAD = 11


class ApiError(CantobotError):
    """A request broke one of Discord's rules; carries the HTTP status and JSON error code."""

    permanent = True

    def __init__(self, status: int, code: int, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, Any]:
        """The JSON body Discord answers with."""
        return {"message": self.message, "code": self.code}


def iso_timestamp(unix: float) -> str:
    """Discord's ISO 8601 timestamp with microseconds and +00:00."""
    return datetime.datetime.fromtimestamp(unix, datetime.UTC).isoformat()


class SnowflakeFactory:
    """Increasing snowflakes from a wall clock (injectable), unique even within one millisecond."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self._counter = itertools.count()

    def __call__(self) -> int:
        ms = int(self._wall_clock() * 1000) - DISCORD_EPOCH_MS
        return (ms << 22) | (next(self._counter) & 0x3FFFFF)


@dataclass
class Role:
    id: int
    name: str
    permissions: int
    position: int = 0


@dataclass
class Member:
    """A guild member: the bot itself or a simulated human."""

    user_id: int
    name: str
    bot: bool = False
    role_ids: list[int] = field(default_factory=list)
    nick: str | None = None
    #: Voice channel id the member is in, or None.
    voice_channel_id: int | None = None
    voice_session_id: str = field(default_factory=lambda: secrets.token_hex(16))
    self_mute: bool = False
    self_deaf: bool = False


@dataclass
class Channel:
    id: int
    name: str
    type: int
    position: int = 0
    parent_id: int | None = None
    #: For threads: the member who created it.
    owner_id: int | None = None
    message_count: int = 0
    #: Permission overwrites as Discord sends them: {"id", "type" (0 role, 1 member), "allow",
    #: "deny"} (a private channel denies View Channel to @everyone and allows it to some).
    overwrites: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Webhook:
    id: int
    token: str
    channel_id: int
    name: str
    creator_id: int


@dataclass
class StoredMessage:
    """A message as the fake stores it, addressable by id for edits and fetches."""

    id: int
    channel_id: int
    author_id: int
    author_name: str
    content: str
    created_at: float
    edited_at: float | None = None
    webhook_id: int | None = None
    attachments: list[str] = field(default_factory=list)
    embeds: list[dict[str, Any]] = field(default_factory=list)
    allowed_mentions: dict[str, Any] | None = None
    interaction_token: str | None = None


@dataclass(frozen=True)
class PostedMessage:
    """One post or edit as a user would see it: what ``LocalDiscord.messages`` records."""

    message_id: int
    channel: str
    thread: str | None
    author: str
    content: str
    edit: bool
    attachments: tuple[str, ...]
    allowed_mentions: dict[str, Any] | None
    at: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (``cantobot simulate --jsonl`` prints one per line)."""
        return {
            "message_id": str(self.message_id),
            "channel": self.channel,
            "thread": self.thread,
            "author": self.author,
            "content": self.content,
            "edit": self.edit,
            "attachments": list(self.attachments),
            "allowed_mentions": self.allowed_mentions,
            "at": self.at,
        }


@dataclass(frozen=True)
class RecordedRequest:
    """One REST request as received (before any fault injection decided its fate)."""

    method: str
    path: str
    query: dict[str, str]
    json: Any
    files: tuple[str, ...]
    at: float
    status: int = 0
    #: The uploaded files' bytes, in the order of ``files`` (so tests can parse attachments).
    file_contents: tuple[bytes, ...] = field(default=(), repr=False)


def user_payload(member: Member) -> dict[str, Any]:
    return {
        "id": str(member.user_id),
        "username": member.name,
        "global_name": None if member.bot else member.name,
        "discriminator": "0",
        "avatar": None,
        "bot": member.bot,
        "public_flags": 0,
        "flags": 0,
    }


class World:
    """The guild and everything in it; the single source of truth for all three servers."""

    def __init__(
        self,
        *,
        token: str,
        bot_name: str = "Cantobot",
        guild_name: str = "Local Guild",
        human_names: tuple[str, ...] = ("alice", "bob"),
        moderators: tuple[str, ...] = ("alice",),
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        application_id: int | None = None,
        guild_id: int | None = None,
        user_ids: Mapping[str, int] | None = None,
        snowflakes: SnowflakeFactory | None = None,
    ) -> None:
        """``application_id`` (the bot's user id), ``guild_id`` and ``user_ids`` (by human name)
        are generated unless given: several worlds given the same ones are one bot and the same
        people in several guilds (the sharded cluster), and such worlds share ``snowflakes`` so
        that no channel, message or webhook id is issued twice."""
        self.token = token
        self.clock = clock
        self.wall_clock = wall_clock
        self.snowflake = snowflakes or SnowflakeFactory(wall_clock)
        self.application_id = application_id if application_id is not None else self.snowflake()
        self.guild_id = guild_id if guild_id is not None else self.snowflake()
        self.guild_name = guild_name
        self.owner_id = self.snowflake()
        self.everyone_role = Role(self.guild_id, "@everyone", EVERYONE_PERMISSIONS)
        self.bot_role = Role(self.snowflake(), bot_name, BOT_ROLE_PERMISSIONS, position=2)
        self.moderator_role = Role(self.snowflake(), "Moderator", MODERATOR_ROLE_PERMISSIONS, 1)
        self.roles = [self.everyone_role, self.moderator_role, self.bot_role]
        self.bot = Member(self.application_id, bot_name, bot=True, role_ids=[self.bot_role.id])
        self.members: dict[int, Member] = {self.bot.user_id: self.bot}
        self.humans: dict[str, Member] = {}
        for name in human_names:
            roles = [self.moderator_role.id] if name in moderators else []
            uid = (user_ids or {}).get(name)
            member = Member(uid if uid is not None else self.snowflake(), name, role_ids=roles)
            self.members[member.user_id] = member
            self.humans[name] = member
        self.text_channel = Channel(self.snowflake(), "general", CHANNEL_GUILD_TEXT, position=0)
        self.voice_channel = Channel(self.snowflake(), "Meeting Room", CHANNEL_GUILD_VOICE, 1)
        #: A second voice channel, where members (and a moved bot) can go.
        self.second_voice_channel = Channel(
            self.snowflake(), "Breakout Room", CHANNEL_GUILD_VOICE, 2
        )
        self.channels: dict[int, Channel] = {
            self.text_channel.id: self.text_channel,
            self.voice_channel.id: self.voice_channel,
            self.second_voice_channel.id: self.second_voice_channel,
        }
        self.messages: dict[int, StoredMessage] = {}
        self.webhooks: dict[int, Webhook] = {}
        #: Application commands by scope: None for global, else the guild id.
        self.commands: dict[int | None, list[dict[str, Any]]] = {}

    # -- lookups ---------------------------------------------------------------------------------
    def member(self, user_id: int) -> Member:
        try:
            return self.members[user_id]
        except KeyError:
            raise ApiError(404, UNKNOWN_MEMBER, "Unknown Member") from None

    def channel(self, channel_id: int) -> Channel:
        try:
            return self.channels[channel_id]
        except KeyError:
            raise ApiError(404, UNKNOWN_CHANNEL, "Unknown Channel") from None

    def message(self, channel_id: int | None, message_id: int) -> StoredMessage:
        msg = self.messages.get(message_id)
        if msg is None or (channel_id is not None and msg.channel_id != channel_id):
            raise ApiError(404, UNKNOWN_MESSAGE, "Unknown Message")
        return msg

    def permissions_of(self, member: Member) -> int:
        """Guild-level permissions: @everyone plus the member's roles (Administrator means all)."""
        perms = self.everyone_role.permissions
        for role in self.roles:
            if role.id in member.role_ids:
                perms |= role.permissions
        if perms & PERM_ADMINISTRATOR or member.user_id == self.owner_id:
            return (1 << 53) - 1
        return perms

    def require(self, member: Member, permission: int) -> None:
        """Refuse (403 50013) unless ``member`` holds ``permission`` (no channel overwrites)."""
        if self.permissions_of(member) & permission != permission:
            raise ApiError(403, MISSING_PERMISSIONS, "Missing Permissions")

    def describe_channel(self, channel_id: int) -> tuple[str, str | None]:
        """(channel name, thread name or None) as a person reading Discord would say it."""
        ch = self.channel(channel_id)
        if ch.type == CHANNEL_PUBLIC_THREAD and ch.parent_id is not None:
            return self.channel(ch.parent_id).name, ch.name
        return ch.name, None

    # -- rules -----------------------------------------------------------------------------------
    @staticmethod
    def check_content(content: str | None) -> None:
        if content is not None and len(content) > MAX_CONTENT_LENGTH:
            raise ApiError(
                400,
                INVALID_FORM_BODY,
                f"Invalid Form Body: content: Must be {MAX_CONTENT_LENGTH} or fewer in length.",
            )

    @staticmethod
    def check_webhook_name(name: str) -> None:
        lowered = name.lower()
        if not 1 <= len(name) <= MAX_WEBHOOK_NAME_LENGTH:
            raise ApiError(400, INVALID_FORM_BODY, "Invalid Form Body: name: length 1-80.")
        for part in FORBIDDEN_WEBHOOK_NAME_PARTS:
            if part in lowered:
                raise ApiError(
                    400,
                    INVALID_FORM_BODY,
                    f'Invalid Form Body: name: Username cannot contain "{part}"',
                )

    @staticmethod
    def check_nickname(nick: str | None) -> None:
        if nick is not None and len(nick) > MAX_NICKNAME_LENGTH:
            raise ApiError(
                400,
                INVALID_FORM_BODY,
                f"Invalid Form Body: nick: Must be {MAX_NICKNAME_LENGTH} or fewer in length.",
            )

    # -- payloads --------------------------------------------------------------------------------
    def role_payload(self, role: Role) -> dict[str, Any]:
        return {
            "id": str(role.id),
            "name": role.name,
            "color": 0,
            "hoist": False,
            "position": role.position,
            "permissions": str(role.permissions),
            "managed": role is self.bot_role,
            "mentionable": False,
            "flags": 0,
        }

    def member_payload(self, member: Member, *, with_permissions: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "user": user_payload(member),
            "nick": member.nick,
            "roles": [str(r) for r in member.role_ids],
            "joined_at": iso_timestamp(self.wall_clock()),
            "deaf": False,
            "mute": False,
            "flags": 0,
            "pending": False,
        }
        if with_permissions:
            data["permissions"] = str(self.permissions_of(member))
        return data

    def channel_payload(self, channel: Channel) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(channel.id),
            "type": channel.type,
            "guild_id": str(self.guild_id),
            "name": channel.name,
            "position": channel.position,
            "permission_overwrites": [dict(o) for o in channel.overwrites],
            "nsfw": False,
            "parent_id": str(channel.parent_id) if channel.parent_id else None,
            "flags": 0,
        }
        if channel.type == CHANNEL_GUILD_TEXT:
            data.update(topic=None, rate_limit_per_user=0, last_message_id=None)
        elif channel.type == CHANNEL_GUILD_VOICE:
            data.update(bitrate=64000, user_limit=0, rtc_region=None, video_quality_mode=1)
        elif channel.type == CHANNEL_PUBLIC_THREAD:
            data.pop("position")
            data.pop("permission_overwrites")
            data.update(
                owner_id=str(channel.owner_id),
                message_count=channel.message_count,
                member_count=1,
                rate_limit_per_user=0,
                last_message_id=None,
                thread_metadata={
                    "archived": False,
                    "auto_archive_duration": 1440,
                    "archive_timestamp": iso_timestamp(self.wall_clock()),
                    "locked": False,
                    "create_timestamp": iso_timestamp(self.wall_clock()),
                },
                total_message_sent=channel.message_count,
            )
        return data

    def voice_state_payload(self, member: Member) -> dict[str, Any]:
        return {
            "guild_id": str(self.guild_id),
            "channel_id": str(member.voice_channel_id) if member.voice_channel_id else None,
            "user_id": str(member.user_id),
            "member": self.member_payload(member),
            "session_id": member.voice_session_id,
            "deaf": False,
            "mute": False,
            "self_deaf": member.self_deaf,
            "self_mute": member.self_mute,
            "self_video": False,
            "suppress": False,
            "request_to_speak_timestamp": None,
        }

    def guild_payload(self) -> dict[str, Any]:
        """GUILD_CREATE: channels, roles, every member (so no chunking), current voice states."""
        threads = [c for c in self.channels.values() if c.type == CHANNEL_PUBLIC_THREAD]
        return {
            "id": str(self.guild_id),
            "name": self.guild_name,
            "icon": None,
            "owner_id": str(self.owner_id),
            "afk_timeout": 300,
            "verification_level": 0,
            "default_message_notifications": 0,
            "explicit_content_filter": 0,
            "features": [],
            "mfa_level": 0,
            "system_channel_flags": 0,
            "premium_tier": 0,
            "preferred_locale": "en-US",
            "nsfw_level": 0,
            "large": False,
            "unavailable": False,
            "member_count": len(self.members),
            "roles": [self.role_payload(r) for r in self.roles],
            "emojis": [],
            "stickers": [],
            "channels": [
                self.channel_payload(c)
                for c in self.channels.values()
                if c.type != CHANNEL_PUBLIC_THREAD
            ],
            "threads": [self.channel_payload(c) for c in threads],
            "members": [self.member_payload(m) for m in self.members.values()],
            "voice_states": [
                self.voice_state_payload(m)
                for m in self.members.values()
                if m.voice_channel_id is not None
            ],
            "presences": [],
            "stage_instances": [],
            "guild_scheduled_events": [],
            "soundboard_sounds": [],
            "joined_at": iso_timestamp(self.wall_clock()),
        }

    def message_payload(self, msg: StoredMessage) -> dict[str, Any]:
        if msg.webhook_id is not None and msg.interaction_token is None:
            author: dict[str, Any] = {
                "id": str(msg.webhook_id),
                "username": msg.author_name,
                "discriminator": "0000",
                "avatar": None,
                "bot": True,
            }
        else:
            author = user_payload(self.member(msg.author_id))
        return {
            "id": str(msg.id),
            "channel_id": str(msg.channel_id),
            "guild_id": str(self.guild_id),
            "author": author,
            "content": msg.content,
            "timestamp": iso_timestamp(msg.created_at),
            "edited_timestamp": iso_timestamp(msg.edited_at) if msg.edited_at else None,
            "tts": False,
            "mention_everyone": False,
            "mentions": [],
            "mention_roles": [],
            "attachments": [
                {
                    "id": str(msg.id + i + 1),
                    "filename": name,
                    "size": 0,
                    "url": f"https://cdn.invalid/attachments/{msg.channel_id}/{msg.id}/{name}",
                    "proxy_url": f"https://media.invalid/attachments/{msg.id}/{name}",
                }
                for i, name in enumerate(msg.attachments)
            ],
            "embeds": msg.embeds,
            "pinned": False,
            "type": 0 if msg.interaction_token is None else 20,
            "flags": 0,
            "components": [],
            **({"webhook_id": str(msg.webhook_id)} if msg.webhook_id is not None else {}),
        }

    def webhook_payload(self, hook: Webhook) -> dict[str, Any]:
        return {
            "id": str(hook.id),
            "type": 1,
            "guild_id": str(self.guild_id),
            "channel_id": str(hook.channel_id),
            "name": hook.name,
            "avatar": None,
            "token": hook.token,
            "application_id": str(self.application_id),
            "user": user_payload(self.member(hook.creator_id)),
        }

    def application_payload(self) -> dict[str, Any]:
        return {
            "id": str(self.application_id),
            "name": self.bot.name,
            "icon": None,
            "description": "",
            "rpc_origins": [],
            "bot_public": True,
            "bot_require_code_grant": False,
            "verify_key": "0" * 64,
            "flags": 0,
            "team": None,
            "owner": user_payload(Member(self.owner_id, "owner")),
            "summary": "",
        }

    # -- mutations -------------------------------------------------------------------------------
    def store_message(
        self,
        *,
        channel_id: int,
        author_id: int,
        author_name: str,
        content: str,
        webhook_id: int | None = None,
        attachments: list[str] | None = None,
        embeds: list[dict[str, Any]] | None = None,
        allowed_mentions: dict[str, Any] | None = None,
        interaction_token: str | None = None,
    ) -> StoredMessage:
        self.check_content(content)
        self.channel(channel_id)
        msg = StoredMessage(
            id=self.snowflake(),
            channel_id=channel_id,
            author_id=author_id,
            author_name=author_name,
            content=content,
            created_at=self.wall_clock(),
            webhook_id=webhook_id,
            attachments=attachments or [],
            embeds=embeds or [],
            allowed_mentions=allowed_mentions,
            interaction_token=interaction_token,
        )
        self.messages[msg.id] = msg
        ch = self.channels[channel_id]
        ch.message_count += 1
        return msg

    def edit_message(self, msg: StoredMessage, body: dict[str, Any], files: list[str]) -> None:
        if "content" in body:
            self.check_content(body["content"])
            msg.content = body["content"] or ""
        if "embeds" in body:
            msg.embeds = body["embeds"] or []
        if "allowed_mentions" in body:
            msg.allowed_mentions = body["allowed_mentions"]
        if files or "attachments" in body:
            kept = {str(a.get("id")) for a in body.get("attachments") or [] if "id" in a}
            msg.attachments = [
                n for i, n in enumerate(msg.attachments) if str(msg.id + i + 1) in kept
            ] + files
        msg.edited_at = self.wall_clock()

    def posted(self, msg: StoredMessage, *, edit: bool) -> PostedMessage:
        channel, thread = self.describe_channel(msg.channel_id)
        return PostedMessage(
            message_id=msg.id,
            channel=channel,
            thread=thread,
            author=msg.author_name,
            content=msg.content,
            edit=edit,
            attachments=tuple(msg.attachments),
            allowed_mentions=msg.allowed_mentions,
            at=self.wall_clock(),
        )

    def create_thread(self, parent_id: int, name: str, owner_id: int) -> Channel:
        parent = self.channel(parent_id)
        if parent.type != CHANNEL_GUILD_TEXT:
            raise ApiError(400, INVALID_FORM_BODY, "Threads need a text channel as parent")
        if not 1 <= len(name) <= 100:
            raise ApiError(400, INVALID_FORM_BODY, "Invalid Form Body: name: length 1-100.")
        thread = Channel(
            self.snowflake(), name, CHANNEL_PUBLIC_THREAD, parent_id=parent_id, owner_id=owner_id
        )
        self.channels[thread.id] = thread
        return thread

"""The loopback Discord, spoken to by an unmodified discord.py 2.7.1 client over real TLS.

Every test runs the real servers on 127.0.0.1 (REST, gateway, voice gateway, UDP) and either the
stock ``discord.Client`` / ``VoiceClient`` or plain aiohttp requests for the rules discord.py
itself would never break. Media is real: libopus, AEAD transport encryption, davey DAVE.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import davey
import discord
import numpy as np
import pytest
import yarl
from discord import app_commands

from bot.sim.discord import LocalDiscord, client_kwargs
from bot.sim.discord.gateway import Gateway
from bot.sim.discord.state import (
    BOT_ROLE_PERMISSIONS,
    PERM_MANAGE_WEBHOOKS,
    SnowflakeFactory,
    World,
)
from bot.sim.discord.tls import ssl_context_trusting
from bot.sim.discord.voice import ip_discovery_response, rtcp_sender_report
from bot.voice.crypto import TransportCipher
from bot.voice.opus import OpusDecoder
from bot.voice.rtp import is_rtcp, parse_rtp

#: discord.py waits this long after the last GUILD_CREATE before on_ready (default 2 s).
GUILD_READY_TIMEOUT = 0.1
#: Upper bound for anything that should happen "at once" on loopback.
STEP_TIMEOUT = 10.0


class FakeClock:
    """A monotonic clock the test moves by hand (the 3 s interaction rule)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def local() -> AsyncIterator[LocalDiscord]:
    async with LocalDiscord() as d:
        yield d


@pytest.fixture
def redirect(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Point discord.py at a LocalDiscord the way the app does (class attributes only)."""

    def apply(d: LocalDiscord) -> None:
        monkeypatch.setattr(discord.http.Route, "BASE", d.api_base)
        monkeypatch.setattr(
            discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(d.gateway_url)
        )

    yield apply


def make_client(d: LocalDiscord, cls: type[discord.Client] = discord.Client,
                **kwargs: Any) -> discord.Client:
    intents = discord.Intents.default()
    intents.voice_states = True
    intents.guilds = True
    intents.members = True
    return cls(
        intents=intents,
        guild_ready_timeout=GUILD_READY_TIMEOUT,
        **client_kwargs(d.ca_file),
        **kwargs,
    )


class Running:
    """A logged-in client whose gateway loop runs in a task; closes cleanly."""

    def __init__(self, client: discord.Client) -> None:
        self.client = client
        self.task: asyncio.Task[None] | None = None

    async def start(self, token: str) -> None:
        await self.client.login(token)
        self.task = asyncio.create_task(self.client.connect(reconnect=True), name="discord-connect")
        async with asyncio.timeout(STEP_TIMEOUT):
            await self.client.wait_until_ready()

    async def close(self) -> None:
        await self.client.close()
        if self.task is not None:
            await asyncio.wait_for(self.task, STEP_TIMEOUT)


@pytest.fixture
async def running(local: LocalDiscord, redirect: Any) -> AsyncIterator[Running]:
    redirect(local)
    r = Running(make_client(local))
    await r.start(local.token)
    try:
        yield r
    finally:
        await r.close()


async def raw(
    d: LocalDiscord, method: str, path: str, *, json: Any = None, auth: bool = True
) -> tuple[int, Any]:
    """One plain HTTPS request to the local Discord (for rules discord.py would not break)."""
    headers = {"Authorization": f"Bot {d.token}"} if auth else {}
    connector = aiohttp.TCPConnector(ssl=ssl_context_trusting(d.ca_file))
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.request(method, d.api_base + path, json=json, headers=headers) as resp:
            assert resp.status == 204 or resp.headers["Content-Type"] == "application/json"
            return resp.status, (await resp.json() if resp.status != 204 else None)


def tone(seconds: float, *, freq: float = 440.0, amplitude: int = 8000) -> np.ndarray:
    n = int(48000 * seconds)
    t = np.arange(n) / 48000
    mono = (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.int16)
    return np.stack([mono, mono], axis=1)


# -- login and gateway ----------------------------------------------------------------------------


async def test_an_unmodified_client_logs_in_over_tls_and_receives_the_guild(
    local: LocalDiscord, running: Running
) -> None:
    client = running.client
    assert client.user is not None and client.user.id == local.bot_user_id
    guild = client.get_guild(local.guild_id)
    assert guild is not None and guild.chunked
    assert isinstance(guild.get_channel(local.text_channel_id), discord.TextChannel)
    assert isinstance(guild.get_channel(local.voice_channel_id), discord.VoiceChannel)
    alice = guild.get_member(local.member_ids["alice"])
    assert alice is not None and alice.guild_permissions.manage_channels
    bob = guild.get_member(local.member_ids["bob"])
    assert bob is not None and not bob.guild_permissions.manage_channels
    assert guild.me.guild_permissions.manage_webhooks
    assert client.application_id == local.application_id
    paths = [(r.method, r.path, r.status) for r in local.requests]
    assert ("GET", "/users/@me", 200) in paths
    fetched = await client.fetch_channel(local.text_channel_id)
    assert isinstance(fetched, discord.TextChannel) and fetched.name == "general"
    member = await guild.fetch_member(local.member_ids["bob"])
    assert member.name == "bob"


async def test_a_wrong_token_is_refused_at_login(local: LocalDiscord, redirect: Any) -> None:
    redirect(local)
    client = make_client(local)
    try:
        with pytest.raises(discord.LoginFailure):
            await client.login("not-the-token")
    finally:
        await client.close()


async def test_a_sharded_clients_clean_close_is_logged_with_the_code_it_sent(
    local: LocalDiscord, redirect: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The bot is an AutoShardedClient: discord.py cancels the shard's read and then closes
    with 1000, so aiohttp drops the connection without waiting for the reply. The fake logs the
    client's code, not aiohttp's 1006 (which read as an abnormal close at the end of every demo)."""
    redirect(local)
    closed: list[str] = []
    logged = asyncio.Event()

    class Closes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "connection closed" in record.getMessage():
                closed.append(record.getMessage())
                logged.set()

    running = Running(make_client(local, discord.AutoShardedClient))
    await running.start(local.token)
    gateway_log = logging.getLogger("bot.sim.discord.gateway")
    handler = Closes()
    gateway_log.addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="bot.sim.discord.gateway"):
            await running.close()
            async with asyncio.timeout(STEP_TIMEOUT):
                await logged.wait()
    finally:
        gateway_log.removeHandler(handler)
    assert closed == ["gateway: connection closed by the client (code 1000)"]


async def test_a_forced_reconnect_is_resumed_and_later_events_still_arrive(
    local: LocalDiscord, running: Running
) -> None:
    resumed = asyncio.Event()
    joined = asyncio.Event()

    @running.client.event
    async def on_resumed() -> None:
        resumed.set()

    @running.client.event
    async def on_voice_state_update(member: discord.Member, before: Any, after: Any) -> None:
        if member.id == local.member_ids["bob"] and after.channel is not None:
            joined.set()

    await local.force_reconnect()
    async with asyncio.timeout(STEP_TIMEOUT):
        await resumed.wait()
    assert local.gateway.resume_count == 1 and local.gateway.identify_count == 1
    await local.member_join_voice(local.member_ids["bob"])
    async with asyncio.timeout(STEP_TIMEOUT):
        await joined.wait()
    channel = running.client.get_channel(local.voice_channel_id)
    assert isinstance(channel, discord.VoiceChannel)
    assert [m.name for m in channel.members] == ["bob"]


async def test_an_invalidated_session_makes_the_client_identify_again(
    local: LocalDiscord, running: Running
) -> None:
    connected = asyncio.Event()

    @running.client.event
    async def on_connect() -> None:
        connected.set()

    async def identify_at_once(shard_id: int | None, *, initial: bool = False) -> None:
        """discord.py waits 5 s before a non-initial IDENTIFY (Discord's identify rate limit)."""

    running.client.before_identify_hook = identify_at_once  # type: ignore[method-assign]
    await local.invalidate_session()
    async with asyncio.timeout(STEP_TIMEOUT):
        await connected.wait()
    assert local.gateway.identify_count == 2 and local.gateway.resume_count == 0
    assert running.client.get_guild(local.guild_id) is not None


# -- commands and interactions --------------------------------------------------------------------


def transcribe_tree(
    client: discord.Client, guild_id: int
) -> tuple[app_commands.CommandTree[Any], list[str]]:
    tree: app_commands.CommandTree[Any] = app_commands.CommandTree(client)
    seen: list[str] = []
    group = app_commands.Group(name="transcribe", description="Live captions")

    @group.command(name="start", description="Start captions")
    async def start(interaction: discord.Interaction, language: str, minutes: bool = False) -> None:
        perms = interaction.permissions
        seen.append(f"{interaction.user.name}:{language}:{minutes}:{perms.manage_channels}")
        await interaction.response.send_message(f"Captions on ({language})")
        await interaction.followup.send("Follow-up: listening")

    @group.command(name="stop", description="Stop captions")
    async def stop(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True)
        await interaction.edit_original_response(content="Captions off; minutes posted")

    tree.add_command(group, guild=discord.Object(guild_id))
    return tree, seen


async def test_a_command_sync_is_recorded_and_an_invoked_command_reaches_the_tree(
    local: LocalDiscord, running: Running
) -> None:
    tree, seen = transcribe_tree(running.client, local.guild_id)
    synced = await tree.sync(guild=discord.Object(local.guild_id))
    assert [c.name for c in synced] == ["transcribe"]
    put = [r for r in local.requests if r.method == "PUT"]
    assert put[0].path == f"/applications/{local.application_id}/guilds/{local.guild_id}/commands"
    assert put[0].json[0]["options"][0]["name"] == "start"

    record = await local.invoke(
        "transcribe start", {"language": "yue", "minutes": True}, local.member_ids["alice"]
    )
    async with asyncio.timeout(STEP_TIMEOUT):
        await record.wait_followups(1)
    assert seen == ["alice:yue:True:True"]
    assert record.callback_type == 4 and record.response_content == "Captions on (yue)"
    assert record.followup_contents == ["Follow-up: listening"]
    assert [(m.channel, m.author, m.content) for m in local.messages] == [
        ("general", "Cantobot", "Captions on (yue)"),
        ("general", "Cantobot", "Follow-up: listening"),
    ]

    deferred = await local.invoke("transcribe stop", {}, local.member_ids["bob"])
    async with asyncio.timeout(STEP_TIMEOUT):
        await deferred.wait_original_content()
    assert deferred.callback_type == 5
    assert deferred.response_content == "Captions off; minutes posted"
    assert (local.messages[-1].content, local.messages[-1].edit) == (
        deferred.response_content,
        True,
    )


async def test_an_interaction_is_answered_once_and_within_three_seconds() -> None:
    clock = FakeClock()
    async with LocalDiscord(clock=clock) as d:
        first = await d.invoke("transcribe start", {"language": "yue"})
        path = f"/interactions/{first.id}/{first.token}/callback"
        status, _ = await raw(d, "POST", path, json={"type": 5}, auth=False)
        assert status == 204
        status, body = await raw(
            d, "POST", path, json={"type": 4, "data": {"content": "x"}}, auth=False
        )
        assert (status, body["code"]) == (400, 40060)

        late = await d.invoke("transcribe start", {"language": "yue"})
        clock.now += 3.5
        status, body = await raw(
            d,
            "POST",
            f"/interactions/{late.id}/{late.token}/callback",
            json={"type": 5},
            auth=False,
        )
        assert (status, body["code"]) == (404, 10062)
        assert not late.acknowledged


async def test_discords_content_webhook_name_and_nickname_rules_are_enforced(
    local: LocalDiscord,
) -> None:
    channel = f"/channels/{local.text_channel_id}"
    status, body = await raw(local, "POST", channel + "/messages", json={"content": "x" * 2001})
    assert (status, body["code"]) == (400, 50035)
    status, _ = await raw(local, "POST", channel + "/messages", json={"content": "x" * 2000})
    assert status == 200
    status, body = await raw(local, "POST", channel + "/webhooks", json={"name": "My Discord Bot"})
    assert (status, body["code"]) == (400, 50035)
    status, body = await raw(local, "POST", channel + "/webhooks", json={"name": "Clyde captions"})
    assert (status, body["code"]) == (400, 50035)
    nick = f"/guilds/{local.guild_id}/members/@me"
    status, body = await raw(local, "PATCH", nick, json={"nick": "n" * 33})
    assert (status, body["code"]) == (400, 50035)
    status, _ = await raw(local, "PATCH", nick, json={"nick": "字幕機械人"})
    assert status == 200 and local.world.bot.nick == "字幕機械人"
    status, _ = await raw(local, "GET", "/users/@me", auth=False)
    assert status == 401


# -- messages, threads, webhooks ------------------------------------------------------------------


async def test_injected_server_errors_hit_only_matching_paths_and_posts_reach_on_message() -> None:
    seen: list[str] = []

    async def on_message(posted: Any) -> None:
        seen.append(posted.content)

    async with LocalDiscord(on_message=on_message) as d:
        d.fail_next(1, status=500, path_prefix="/channels/")
        assert (await raw(d, "GET", "/users/@me"))[0] == 200
        path = f"/channels/{d.text_channel_id}/messages"
        assert (await raw(d, "POST", path, json={"content": "a"}))[0] == 500
        assert (await raw(d, "POST", path, json={"content": "b"}))[0] == 200
        assert seen == ["b"]
        assert [r.status for r in d.requests] == [200, 500, 200]


async def test_a_429_is_retried_by_discord_py_and_the_message_lands_once(
    local: LocalDiscord, running: Running
) -> None:
    channel = running.client.get_channel(local.text_channel_id)
    assert isinstance(channel, discord.TextChannel)
    path = f"/channels/{local.text_channel_id}/messages"
    local.fail_next(1, status=429, path_prefix=path, retry_after=0.05)
    sent = await channel.send("第一句")
    assert sent.content == "第一句"
    assert [r.status for r in local.requests if r.path == path] == [429, 200]
    assert [m.content for m in local.messages] == ["第一句"]


async def test_a_repeated_enforced_nonce_returns_the_first_message_and_posts_nothing(
    local: LocalDiscord, running: Running
) -> None:
    """Discord: with ``enforce_nonce``, a nonce the author used in the past few minutes returns
    that message instead of creating one (discord.py enforces every nonce it sends)."""
    channel = running.client.get_channel(local.text_channel_id)
    assert isinstance(channel, discord.TextChannel)
    first = await channel.send("會議紀錄", nonce="minutes-7")
    again = await channel.send("重啟後的會議紀錄", nonce="minutes-7")
    other = await channel.send("另一個會議", nonce="minutes-8")
    plain = await channel.send("沒有 nonce")
    assert again.id == first.id and again.content == "會議紀錄"
    assert len({first.id, other.id, plain.id}) == 3
    assert [m.content for m in local.messages] == ["會議紀錄", "另一個會議", "沒有 nonce"]


async def test_webhook_posts_into_a_thread_and_edits_are_recorded_with_names_and_files(
    local: LocalDiscord, running: Running
) -> None:
    channel = running.client.get_channel(local.text_channel_id)
    assert isinstance(channel, discord.TextChannel)
    thread = await channel.create_thread(name="Meeting 1", type=discord.ChannelType.public_thread)
    hook = await channel.create_webhook(name="Captions")
    assert [h.id for h in await channel.webhooks()] == [hook.id]
    msg = await hook.send(
        "alice: 你好",
        username="alice",
        thread=thread,
        wait=True,
        file=discord.File(__file__, filename="minutes.md"),
        allowed_mentions=discord.AllowedMentions.none(),
    )
    await hook.edit_message(msg.id, content="alice: 你好呀", thread=thread)
    first, edit = local.messages
    assert (first.channel, first.thread, first.author, first.edit) == (
        "general",
        "Meeting 1",
        "alice",
        False,
    )
    assert first.attachments == ("minutes.md",)
    assert first.allowed_mentions == {"parse": []}
    assert (edit.content, edit.edit, edit.thread) == ("alice: 你好呀", True, "Meeting 1")


async def test_a_bot_without_manage_webhooks_is_refused_like_on_discord(
    local: LocalDiscord, running: Running
) -> None:
    updated = asyncio.Event()

    @running.client.event
    async def on_guild_role_update(before: discord.Role, after: discord.Role) -> None:
        updated.set()

    await local.set_bot_permissions(BOT_ROLE_PERMISSIONS & ~PERM_MANAGE_WEBHOOKS)
    async with asyncio.timeout(STEP_TIMEOUT):
        await updated.wait()
    guild = running.client.get_guild(local.guild_id)
    assert guild is not None and not guild.me.guild_permissions.manage_webhooks
    channel = running.client.get_channel(local.text_channel_id)
    assert isinstance(channel, discord.TextChannel)
    with pytest.raises(discord.Forbidden) as refused:
        await channel.create_webhook(name="Captions")
    assert refused.value.code == 50013
    await channel.send("still allowed to post")  # Send Messages comes from @everyone
    assert [m.content for m in local.messages] == ["still allowed to post"]


# -- voice ----------------------------------------------------------------------------------------


class PacketTap:
    """A socket listener (runs on discord.py's reader thread) keeping every datagram."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.packets: list[bytes] = []
        self._lock = threading.Lock()
        self._loop = loop
        self._arrived = asyncio.Event()

    def __call__(self, data: bytes) -> None:
        with self._lock:
            self.packets.append(bytes(data))
        self._loop.call_soon_threadsafe(self._arrived.set)

    def rtp(self, ssrc: int) -> list[bytes]:
        with self._lock:
            return [
                p
                for p in self.packets
                if not is_rtcp(p) and len(p) > 12 and parse_rtp(p).ssrc == ssrc
            ]

    async def wait_rtp(self, ssrc: int, count: int) -> list[bytes]:
        """Wait until ``count`` RTP packets from ``ssrc`` arrived (caller bounds the time)."""
        while len(found := self.rtp(ssrc)) < count:
            self._arrived.clear()
            await self._arrived.wait()
        return found


async def connect_voice(running: Running, local: LocalDiscord) -> discord.VoiceClient:
    channel = running.client.get_channel(local.voice_channel_id)
    assert isinstance(channel, discord.VoiceChannel)
    vc = await channel.connect(timeout=STEP_TIMEOUT, reconnect=False)
    assert isinstance(vc, discord.VoiceClient) and vc.is_connected()
    return vc


async def test_the_stock_voice_client_connects_and_receives_a_members_encrypted_opus(
    local: LocalDiscord, running: Running
) -> None:
    alice = local.member_ids["alice"]
    await local.member_join_voice(alice)
    vc = await connect_voice(running, local)
    try:
        assert vc.mode == "aead_xchacha20_poly1305_rtpsize"  # first offered mode stock supports
        assert vc._connection.dave_protocol_version == 0
        tap = PacketTap(asyncio.get_running_loop())
        vc._connection.add_socket_listener(tap)
        speech = np.concatenate([tone(0.2), np.zeros((48000 // 5, 2), np.int16)])
        sent = await local.speak(alice, speech, realtime=False)
        assert sent == 10 + 5  # 10 voiced frames, then exactly five silence frames, then nothing
        ssrc = local.voice.members[alice].ssrc
        async with asyncio.timeout(STEP_TIMEOUT):
            packets = await tap.wait_rtp(ssrc, sent)
        cipher = TransportCipher(vc.mode, bytes(vc.secret_key))
        frames = [cipher.decrypt(parse_rtp(p)) for p in packets]
        assert frames[-5:] == [b"\xf8\xff\xfe"] * 5
        pcm = OpusDecoder(48000, 2).decode(frames[3])
        assert pcm.size == 960 * 2 and np.abs(pcm).max() > 1000
        assert any(is_rtcp(p) for p in tap.packets)
        assert alice in local.voice.connection.announced  # op 5 SPEAKING sent before the spurt
    finally:
        await vc.disconnect(force=True)


class AesGcmVoiceClient(discord.VoiceClient):
    """The stock client taught to accept AES-GCM for receiving (as the bot's own client is)."""

    supported_modes = ("aead_aes256_gcm_rtpsize", *discord.VoiceClient.supported_modes)


async def test_a_server_offering_only_aes_gcm_is_joined_by_a_client_that_supports_it(
    redirect: Any,
) -> None:
    async with LocalDiscord(modes=("aead_aes256_gcm_rtpsize",)) as d:
        redirect(d)
        r = Running(make_client(d))
        await r.start(d.token)
        try:
            alice = d.member_ids["alice"]
            await d.member_join_voice(alice)
            channel = r.client.get_channel(d.voice_channel_id)
            assert isinstance(channel, discord.VoiceChannel)
            vc = await channel.connect(timeout=STEP_TIMEOUT, reconnect=False, cls=AesGcmVoiceClient)
            assert vc.mode == "aead_aes256_gcm_rtpsize"
            tap = PacketTap(asyncio.get_running_loop())
            vc._connection.add_socket_listener(tap)
            sent = await d.speak(alice, tone(0.06))  # paced in real time: 3 frames, 60 ms
            async with asyncio.timeout(STEP_TIMEOUT):
                packets = await tap.wait_rtp(d.voice.members[alice].ssrc, sent)
            cipher = TransportCipher(vc.mode, bytes(vc.secret_key))
            pcm = OpusDecoder(48000, 2).decode(cipher.decrypt(parse_rtp(packets[0])))
            assert np.abs(pcm).max() > 1000
            await vc.disconnect(force=True)
        finally:
            await r.close()


async def test_late_speaking_and_random_loss_are_simulated_as_configured(
    local: LocalDiscord, running: Running
) -> None:
    bob = local.member_ids["bob"]
    await local.member_join_voice(bob)
    vc = await connect_voice(running, local)
    try:
        tap = PacketTap(asyncio.get_running_loop())
        vc._connection.add_socket_listener(tap)
        rng = random.Random(7)
        sent = await local.speak(
            bob, tone(0.4), loss=0.3, rng=rng, realtime=False, speaking_late=True
        )
        events = [kind for kind, uid in local.voice.timeline if uid == bob]
        assert events.index("speaking") == 3  # op 5 after the first three packets, as Discord may
        assert 0 < events.count("lost") < 20 and sent == events.count("media")
        ssrc = local.voice.members[bob].ssrc
        async with asyncio.timeout(STEP_TIMEOUT):
            packets = await tap.wait_rtp(ssrc, sent)
        sequences = [parse_rtp(p).sequence for p in packets]
        assert len(sequences) == sent < 20  # gaps in the sequence numbers are the losses
        assert (sequences[-1] - sequences[0]) % 65536 + 1 > sent
    finally:
        await vc.disconnect(force=True)


async def test_with_dave_on_the_bot_joins_the_mls_group_and_decrypts_a_members_frames(
    redirect: Any,
) -> None:
    async with LocalDiscord(dave=True) as d:
        redirect(d)
        r = Running(make_client(d))
        await r.start(d.token)
        try:
            alice, bob = d.member_ids["alice"], d.member_ids["bob"]
            await d.member_join_voice(alice)
            await d.member_join_voice(bob)  # alice and bob form a group before the bot arrives
            assert d.voice.group.epoch == 1
            vc = await connect_voice(r, d)
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23)  # DAVE transition ready: welcome processed
            session = vc._connection.dave_session
            assert session is not None and session.ready
            assert vc._connection.dave_protocol_version == 1
            assert d.voice.connection is not None
            assert 30 in [op for _, op, _ in d.voice.connection.binary_sent]  # welcomed (op 30)
            assert sorted(d.voice.group.members) == sorted([alice, bob, d.bot_user_id])
            tap = PacketTap(asyncio.get_running_loop())
            vc._connection.add_socket_listener(tap)
            await d.speak(alice, tone(0.1), realtime=False)
            ssrc = d.voice.members[alice].ssrc
            async with asyncio.timeout(STEP_TIMEOUT):
                packets = await tap.wait_rtp(ssrc, 5)
            cipher = TransportCipher(vc.mode, bytes(vc.secret_key))
            e2ee = cipher.decrypt(parse_rtp(packets[1]))
            assert e2ee.endswith(b"\xfa\xfa")  # DAVE footer magic
            opus = session.decrypt(alice, davey.MediaType.audio, e2ee)
            pcm = OpusDecoder(48000, 2).decode(opus)
            assert np.abs(pcm).max() > 1000
            await vc.disconnect(force=True)
        finally:
            await r.close()


async def test_with_dave_on_members_joining_and_leaving_mid_call_advance_the_bots_epoch(
    redirect: Any,
) -> None:
    async with LocalDiscord(dave=True) as d:
        redirect(d)
        r = Running(make_client(d))
        await r.start(d.token)
        try:
            vc = await connect_voice(r, d)  # the bot arrives first, alone
            alice, bob = d.member_ids["alice"], d.member_ids["bob"]
            await d.member_join_voice(alice)  # bot commits: group forms (epoch 1)
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23, count=1)
            await d.member_join_voice(bob)  # bot commits the Add (epoch 2)
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23, count=2)
            await d.leave_voice(alice)  # bot commits the Remove (epoch 3)
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23, count=3)
            session = vc._connection.dave_session
            assert session is not None and session.ready
            assert session.epoch == d.voice.group.epoch == 3
            assert sorted(d.voice.group.members) == sorted([d.bot_user_id, bob])
            await vc.disconnect(force=True)
        finally:
            await r.close()


# -- pure helpers ---------------------------------------------------------------------------------


def test_the_ip_discovery_answer_reads_back_as_discord_py_reads_it() -> None:
    answer = ip_discovery_response(1234, "127.0.0.1", 50123)
    assert len(answer) == 74 and answer[1] == 2
    assert answer[8 : answer.index(0, 8)].decode("ascii") == "127.0.0.1"
    assert struct.unpack_from(">H", answer, len(answer) - 2)[0] == 50123
    assert struct.unpack_from(">I", answer, 4)[0] == 1234


def test_an_rtcp_sender_report_is_recognised_as_rtcp_not_media() -> None:
    report = rtcp_sender_report(99, 960, 10, 1000, now=1_700_000_000.25)
    assert len(report) == 28 and is_rtcp(report)
    assert struct.unpack_from(">I", report, 4)[0] == 99


def test_a_subcommand_with_a_channel_option_is_built_from_the_synced_schema() -> None:
    world = World(token="t")
    gateway = Gateway(
        world,
        resume_url=lambda: "wss://127.0.0.1:1",
        voice_endpoint=lambda: "127.0.0.1:2",
        on_bot_voice=_ignore_voice,
        register_interaction=lambda record: None,
    )
    world.commands[world.guild_id] = [
        {
            "id": "42",
            "name": "transcribe",
            "options": [
                {
                    "type": 1,
                    "name": "start",
                    "options": [{"type": 7, "name": "output"}, {"type": 3, "name": "language"}],
                }
            ],
        }
    ]
    data = gateway.build_command_data(
        "/transcribe start", {"output": world.text_channel.id, "language": "yue"}
    )
    assert data["id"] == "42" and data["name"] == "transcribe"
    (sub,) = data["options"]
    assert (sub["type"], sub["name"]) == (1, "start")
    assert sub["options"] == [
        {"name": "output", "type": 7, "value": str(world.text_channel.id)},
        {"name": "language", "type": 3, "value": "yue"},
    ]
    assert str(world.text_channel.id) in data["resolved"]["channels"]


async def _ignore_voice(channel_id: int | None, session_id: str, token: str) -> None:
    return None


def test_snowflakes_increase_even_within_one_millisecond() -> None:
    make = SnowflakeFactory(wall_clock=lambda: 1_700_000_000.0)
    ids = [make() for _ in range(100)]
    assert ids == sorted(ids) and len(set(ids)) == 100


async def test_dave_can_be_switched_off_and_on_again_during_a_call(redirect: Any) -> None:
    async with LocalDiscord(dave=True) as d:
        redirect(d)
        r = Running(make_client(d))
        await r.start(d.token)
        try:
            alice = d.member_ids["alice"]
            await d.member_join_voice(alice)
            vc = await connect_voice(r, d)
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23, count=1)
            tap = PacketTap(asyncio.get_running_loop())
            vc._connection.add_socket_listener(tap)
            ssrc = d.voice.members[alice].ssrc
            cipher = TransportCipher(vc.mode, bytes(vc.secret_key))

            await d.downgrade_dave()  # op 21 {protocol_version 0}; op 22 after the bot's op 23
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23, count=2)
            assert d.voice.group.protocol_version == 0
            sent = await d.speak(alice, tone(0.06), realtime=False)
            async with asyncio.timeout(STEP_TIMEOUT):
                plain = cipher.decrypt(parse_rtp((await tap.wait_rtp(ssrc, sent))[0]))
            assert not plain.endswith(b"\xfa\xfa")  # plain Opus, no DAVE footer
            assert np.abs(OpusDecoder(48000, 2).decode(plain)).max() > 1000

            await d.upgrade_dave()  # op 24 + op 25: the bot re-inits, a new group forms
            async with asyncio.timeout(STEP_TIMEOUT):
                await d.voice.wait_for_bot_op(23, count=3)
            session = vc._connection.dave_session
            assert session is not None and session.ready and d.voice.group.protocol_version == 1
            more = await d.speak(alice, tone(0.06), realtime=False)
            async with asyncio.timeout(STEP_TIMEOUT):
                e2ee = cipher.decrypt(parse_rtp((await tap.wait_rtp(ssrc, sent + more))[sent + 1]))
            assert e2ee.endswith(b"\xfa\xfa")
            assert (
                np.abs(
                    OpusDecoder(48000, 2).decode(
                        session.decrypt(alice, davey.MediaType.audio, e2ee)
                    )
                ).max()
                > 1000
            )
            await vc.disconnect(force=True)
        finally:
            await r.close()


class RawVoiceBot:
    """A hand-driven voice client (aiohttp + davey) for DAVE paths discord.py never takes."""

    def __init__(self, d: LocalDiscord, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.d = d
        self.ws = ws
        self.session = davey.DaveSession(1, d.bot_user_id, d.voice_channel_id)

    async def next_binary(self) -> tuple[int, bytes]:
        """The next binary frame (op, payload), skipping JSON ops."""
        while True:
            msg = await self.ws.receive()
            if msg.type is aiohttp.WSMsgType.BINARY:
                return msg.data[2], msg.data[3:]
            assert msg.type is aiohttp.WSMsgType.TEXT, msg

    async def send_binary(self, op: int, payload: bytes) -> None:
        await self.ws.send_bytes(bytes([op]) + payload)


async def test_a_bot_that_never_commits_is_overtaken_by_a_members_commit() -> None:
    async with LocalDiscord(dave=True) as d:
        d.voice.dave_commit_timeout = 0.01
        alice, bob = d.member_ids["alice"], d.member_ids["bob"]
        d.world.bot.voice_channel_id = d.voice_channel_id
        await d.voice.on_bot_voice(d.voice_channel_id, "voice-session", "voice-token")
        await d.member_join_voice(alice)
        connector = aiohttp.TCPConnector(ssl=ssl_context_trusting(d.ca_file))
        async with aiohttp.ClientSession(connector=connector) as http:
            async with http.ws_connect(f"wss://{d.voice_endpoint}/?v=8") as ws:
                bot = RawVoiceBot(d, ws)
                identify = {
                    "server_id": str(d.guild_id),
                    "user_id": str(d.bot_user_id),
                    "session_id": "voice-session",
                    "token": "voice-token",
                    "max_dave_protocol_version": 1,
                }
                await ws.send_json({"op": 0, "d": identify})
                select = {
                    "address": "127.0.0.1",
                    "port": 9,
                    "mode": "aead_xchacha20_poly1305_rtpsize",
                }
                await ws.send_json({"op": 1, "d": {"protocol": "udp", "data": select}})
                op, payload = await bot.next_binary()
                assert op == 25
                bot.session.set_external_sender(payload)
                await bot.send_binary(26, bot.session.get_serialized_key_package())
                op, payload = await bot.next_binary()  # founding the group with alice: we commit
                assert (op, payload[0]) == (27, 0)
                result = bot.session.process_proposals(
                    davey.ProposalsOperationType.append, payload[1:]
                )
                assert result is not None and result.welcome is not None
                await bot.send_binary(28, result.commit + result.welcome)
                op, payload = await bot.next_binary()
                assert op == 29
                bot.session.process_commit(payload[2:])
                await ws.send_json(
                    {"op": 23, "d": {"transition_id": int.from_bytes(payload[:2], "big")}}
                )

                await d.member_join_voice(bob)  # proposals again: we process them, never send
                op, payload = await bot.next_binary()  # our commit (a slow client)
                assert op == 27
                bot.session.process_proposals(davey.ProposalsOperationType.append, payload[1:])
                op, payload = await bot.next_binary()  # alice's fallback commit reaches us
                assert op == 29
                bot.session.process_commit(payload[2:])
                assert bot.session.epoch == d.voice.group.epoch == 2
                assert d.voice.group.history[-1][0] == alice

"""The loopback Discord's voice server: voice gateway (wss, v8) + UDP media, members speaking.

Flow, as discord.py 2.7.1 drives it (``voice_state.py`` docstring) and Discord documents it:
HELLO (op 8) on connect; IDENTIFY (op 0) → READY (op 2: ssrc, 127.0.0.1, UDP port, modes in the
configured order); the 74-byte UDP IP discovery is answered; SELECT_PROTOCOL (op 1) →
SESSION_DESCRIPTION (op 4: mode, 32-byte key, ``dave_protocol_version``); then op 11 for the
members already in the channel and, with DAVE on, the MLS exchange run by
:class:`bot.sim.dave_group.DaveGroup` (binary ``>H seq + u8 op + payload`` to the client,
``u8 op + payload`` from it). Heartbeats (op 3 → op 6), RESUME (op 7 → op 9).

Simulated members speak with :meth:`VoiceServer.speak`: 20 ms Opus frames (libopus through
:class:`bot.voice.opus.OpusEncoder`), DAVE-encrypted by the member's own davey session when the
call is end-to-end encrypted, inside RTP with the one-byte audio-level header extension Discord
clients send, transport-encrypted (:class:`bot.voice.crypto.TransportCipher`) and sent from the
voice server's UDP socket (discord.py's socket is ``connect``-ed to it, so media must come from
there). Discord's silence behaviour is reproduced: five ``F8 FF FE`` frames after a talk spurt,
then nothing until the next one; op 5 SPEAKING precedes the first spurt (or, configurable, comes
late after a few packets, as on Discord); an RTCP sender report goes out now and then.

Boundary: sockets and timers live here; packet layouts come from ``bot.voice.rtp`` and
``bot.voice.crypto``, DAVE bookkeeping from ``bot.sim.dave_group``.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
import secrets
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from aiohttp import WSMsgType, web

from bot.sim.dave_group import DaveGroup, DaveGroupError, DaveMember, Delivery, make_member
from bot.sim.discord.state import World
from bot.sim.sender import OpusEncoder, audio_level_extension, build_rtp_header
from bot.voice.crypto import TransportCipher

_log = logging.getLogger(__name__)

# Voice gateway opcodes (https://discord.com/developers/docs/topics/opcodes-and-status-codes#voice).
OP_IDENTIFY = 0
OP_SELECT_PROTOCOL = 1
OP_READY = 2
OP_HEARTBEAT = 3
OP_SESSION_DESCRIPTION = 4
OP_SPEAKING = 5
OP_HEARTBEAT_ACK = 6
OP_RESUME = 7
OP_HELLO = 8
OP_RESUMED = 9
OP_CLIENTS_CONNECT = 11
OP_CLIENT_CONNECT = 12
OP_CLIENT_DISCONNECT = 13
OP_DAVE_TRANSITION_READY = 23
OP_MLS_KEY_PACKAGE = 26
OP_MLS_COMMIT_WELCOME = 28
OP_MLS_ANNOUNCE_COMMIT_TRANSITION = 29
OP_MLS_INVALID_COMMIT_WELCOME = 31

#: Voice close code "Authentication failed" and "Session no longer valid".
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_SESSION_INVALID = 4006
#: Disconnected: the bot was moved to another channel (or kicked from the call).
CLOSE_DISCONNECTED = 4014
#: Voice gateway version discord.py 2.7.1 asks for (``?v=8``) and Discord's heartbeat (ms).
VOICE_GATEWAY_VERSION = 8
VOICE_HEARTBEAT_INTERVAL_MS = 13750
#: Discord's default offer: AES-GCM preferred; stock discord.py only has XChaCha20.
DEFAULT_MODES: tuple[str, ...] = ("aead_aes256_gcm_rtpsize", "aead_xchacha20_poly1305_rtpsize")

#: IP discovery (Discord voice docs): 74 bytes, type 1 request / 2 response, 64-byte address.
IP_DISCOVERY_SIZE = 74
IP_DISCOVERY_REQUEST = 1
IP_DISCOVERY_RESPONSE = 2
IP_DISCOVERY_LENGTH = 70

#: Opus framing Discord uses: 48 kHz stereo, 20 ms (960 samples per channel).
SAMPLE_RATE = 48000
CHANNELS = 2
FRAME_SAMPLES = 960
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
#: After a talk spurt Discord clients send five Opus silence frames, then stop.
OPUS_SILENCE_FRAME = b"\xf8\xff\xfe"
SILENCE_FRAMES_AFTER_SPURT = 5
#: A frame whose RMS (int16 units) is below this counts as silence (about -66 dBFS).
SILENCE_RMS = 16.0
#: RTCP sender report every this many RTP packets (about 5 s of speech); type 200 = SR.
RTCP_EVERY_PACKETS = 250
RTCP_SENDER_REPORT = 200
#: With ``speaking_late``, op 5 follows this many media packets (Discord often sends it late).
LATE_SPEAKING_AFTER_PACKETS = 3
#: Pause between packets when not pacing in real time: lets the receiver thread keep up.
FAST_PACKET_GAP = 0.001
#: Seconds between 1900-01-01 (NTP epoch) and 1970-01-01 for RTCP timestamps (RFC 5905).
NTP_UNIX_OFFSET = 2208988800
#: Bounds on the test records kept by the voice server (a long simulation must not grow forever):
#: about 30 minutes of one speaker's packets, and a few minutes of the bot's datagrams.
TIMELINE_LIMIT = 100_000
#: How long the bot may take to answer op 27 with a commit before a simulated member's commit is
#: used instead (Discord takes whichever valid commit arrives first; the number is ours).
DAVE_COMMIT_TIMEOUT = 5.0
RECEIVED_FROM_BOT_LIMIT = 10_000
#: Lines kept in the voice server's journal (ops in and out, joins, leaves, injected faults).
JOURNAL_LIMIT = 5_000


def ip_discovery_response(ssrc: int, address: str, port: int) -> bytes:
    """The 74-byte IP discovery answer: type 2, length 70, ssrc, address (NUL-padded), port."""
    addr = address.encode("ascii")[:63]
    return struct.pack(">HHI64sH", IP_DISCOVERY_RESPONSE, IP_DISCOVERY_LENGTH, ssrc, addr, port)


def _brief(data: Any, limit: int = 120) -> str:
    """A journal-sized rendering of an op's ``d`` (secret keys are never written out)."""
    if isinstance(data, dict) and "secret_key" in data:
        data = {**data, "secret_key": "<32 bytes>"}
    text = json.dumps(data, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def frame_rms(frame: npt.NDArray[np.int16]) -> float:
    return float(np.sqrt(np.mean(frame.astype(np.float64) ** 2))) if frame.size else 0.0


def audio_level_dbov(rms: float) -> int:
    """RFC 6464 level: -dBov of the frame, 0 (loud) .. 127 (silent)."""
    if rms <= 0:
        return 127
    return int(min(127, max(0, round(-20 * np.log10(rms / 32768.0)))))


def rtcp_sender_report(
    ssrc: int, rtp_timestamp: int, packets: int, octets: int, now: float
) -> bytes:
    """A minimal RTCP SR (RFC 3550 section 6.4.1) with no report blocks: 28 bytes."""
    ntp = now + NTP_UNIX_OFFSET
    ntp_hi, ntp_lo = int(ntp), int((ntp % 1) * (1 << 32))
    return struct.pack(
        ">BBHIIIIII",
        0x80,
        RTCP_SENDER_REPORT,
        6,
        ssrc,
        ntp_hi & 0xFFFFFFFF,
        ntp_lo & 0xFFFFFFFF,
        rtp_timestamp & 0xFFFFFFFF,
        packets & 0xFFFFFFFF,
        octets & 0xFFFFFFFF,
    )


@dataclass
class BotVoiceExpectation:
    """What the gateway told the bot in VOICE_SERVER_UPDATE; IDENTIFY must match it."""

    channel_id: int
    session_id: str
    token: str


@dataclass
class VoiceConnection:
    """The bot's voice gateway connection and its negotiated media parameters."""

    ws: web.WebSocketResponse
    user_id: int
    ssrc: int
    seq: int = 0
    mode: str | None = None
    secret_key: bytes | None = None
    cipher: TransportCipher | None = None
    client_addr: tuple[str, int] | None = None
    #: Members whose SSRC (op 5) this connection has been told.
    announced: set[int] = field(default_factory=set)
    in_dave_group: bool = False
    ops_in: list[int] = field(default_factory=list)
    #: Binary frames sent: (sequence, opcode, payload length), for tests and logs.
    binary_sent: list[tuple[int, int, int]] = field(default_factory=list)
    session_ready: asyncio.Event = field(default_factory=asyncio.Event)
    #: Where each op sent is noted (the voice server's journal), if anywhere.
    journal: Callable[[str], None] | None = None

    async def send_json(self, op: int, data: Any) -> None:
        payload: dict[str, Any] = {"op": op, "d": data}
        if op not in (OP_HEARTBEAT_ACK, OP_HELLO):
            self.seq += 1
            payload["seq"] = self.seq
        _log.debug("voice out op=%s", op)
        if self.journal is not None and op != OP_HEARTBEAT_ACK:
            self.journal(f"-> bot op {op} {_brief(data)}")
        await self.ws.send_str(json.dumps(payload))

    async def send_binary(self, frame: bytes) -> None:
        self.seq += 1
        self.binary_sent.append((self.seq, frame[0], len(frame) - 1))
        _log.debug("voice out binary op=%s (%d bytes)", frame[0], len(frame) - 1)
        if self.journal is not None:
            self.journal(f"-> bot op {frame[0]} ({len(frame) - 1} bytes)")
        await self.ws.send_bytes(struct.pack(">H", self.seq & 0xFFFF) + frame)


@dataclass
class MemberVoice:
    """A simulated member's media state: SSRC, RTP counters, DAVE session."""

    user_id: int
    ssrc: int
    sequence: int
    timestamp: int
    dave: DaveMember | None = None
    nonce: int = 0
    packets_sent: int = 0
    octets_sent: int = 0
    spoke_before: bool = False


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: VoiceServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # a datagram endpoint's

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.server._on_datagram(data, addr)


class VoiceServer:
    """Voice gateway + UDP for the guild's voice channel; see the module docstring."""

    def __init__(
        self,
        world: World,
        *,
        modes: tuple[str, ...] = DEFAULT_MODES,
        dave: bool = False,
        speaking_late: bool = False,
        rng: random.Random | None = None,
        dave_commit_timeout: float = DAVE_COMMIT_TIMEOUT,
        member_dave: str = "libdave",
    ) -> None:
        if not modes:
            raise ValueError("offer at least one encryption mode")
        self.world = world
        self.modes = tuple(modes)
        self.dave = dave
        #: The DAVE library simulated members run: "libdave" (Discord's) or "davey".
        self.member_dave = member_dave
        self.speaking_late = speaking_late
        self._rng = rng or random.Random()
        #: The call: the voice channel the bot is in (see :meth:`move_bot`).
        self.channel_id = world.voice_channel.id
        self.group = DaveGroup(self.channel_id, protocol_version=1 if dave else 0)
        self.expected: BotVoiceExpectation | None = None
        self.connection: VoiceConnection | None = None
        self.udp_port = 0
        self._udp: _UdpProtocol | None = None
        self.members: dict[int, MemberVoice] = {}
        #: Datagrams the bot sent us (besides IP discovery): its own audio and keepalives.
        self.received_from_bot: collections.deque[bytes] = collections.deque(
            maxlen=RECEIVED_FROM_BOT_LIMIT
        )
        #: Datagrams to this address are dropped (see black_hole_bot) and counted.
        self.black_holed: tuple[str, int] | None = None
        self.black_holed_datagrams = 0
        #: What members did, in order: ("speaking", user_id) for op 5 sent, ("media", user_id)
        #: for an RTP packet sent, ("lost", user_id) for one dropped by ``loss``.
        self.timeline: collections.deque[tuple[str, int]] = collections.deque(maxlen=TIMELINE_LIMIT)
        #: Human-readable story of the voice side, oldest first: every op to and from the bot
        #: (heartbeats left out), members joining and leaving, DAVE commits, injected faults.
        #: ``cantobot simulate`` and the end-to-end tests print it when something goes wrong.
        self.journal: collections.deque[str] = collections.deque(maxlen=JOURNAL_LIMIT)
        self._journal_t0 = time.monotonic()
        #: The furthest any real-time speak() fell behind its 20 ms schedule (s): a member
        #: cannot speak in real time on a machine too busy to run this loop in time, and a
        #: test judging the bot's timing must tell that apart from the bot being late.
        self.max_send_lag = 0.0
        self._corrupt_commits = 0
        self._commits_noted = 0
        self._sockets: set[web.WebSocketResponse] = set()
        self._connected = asyncio.Event()
        self._bot_op = asyncio.Event()
        self.dave_commit_timeout = dave_commit_timeout
        self._commit_timer: asyncio.Task[None] | None = None

    def note(self, text: str) -> None:
        """Add a line to :attr:`journal`, stamped with seconds since the server was made."""
        self.journal.append(f"{time.monotonic() - self._journal_t0:8.3f} {text}")

    def name_of(self, user_id: int) -> str:
        member = self.world.members.get(user_id)
        return member.name if member is not None else str(user_id)

    def corrupt_next_commit(self, count: int = 1) -> None:
        """Flip a byte in the next ``count`` op 29 commits sent to the bot (a damaged commit:
        the bot must answer op 31 and be removed and re-added to the group)."""
        self._corrupt_commits += count
        self.note(f"fault armed: corrupt the next {count} op 29 commit(s) to the bot")

    # -- lifecycle -------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.handle)
        return app

    async def start_udp(self) -> int:
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(self), local_addr=("127.0.0.1", 0)
        )
        self._udp = protocol
        self.udp_port = int(transport.get_extra_info("sockname")[1])
        _log.info("voice: UDP on 127.0.0.1:%d", self.udp_port)
        return self.udp_port

    async def close(self) -> None:
        timer, self._commit_timer = self._commit_timer, None
        if timer is not None:
            timer.cancel()
            await asyncio.gather(timer, return_exceptions=True)
        for ws in list(self._sockets):
            await ws.close(code=1001)
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.close()
            await self._udp.closed  # the socket is closed on a later loop iteration
            self._udp = None

    async def wait_session(self) -> VoiceConnection:
        """Wait until the bot has a SESSION_DESCRIPTION (its key); bound it with a timeout."""
        while True:
            conn = self.connection
            if conn is not None and conn.cipher is not None:
                return conn
            self._connected.clear()
            await self._connected.wait()

    async def wait_for_bot_op(self, op: int, count: int = 1) -> None:
        """Wait until the bot's voice connection sent ``op`` ``count`` times (e.g. 23: ready)."""
        while True:
            conn = self.connection
            if conn is not None and conn.ops_in.count(op) >= count:
                return
            self._bot_op.clear()
            await self._bot_op.wait()

    # -- gateway side ----------------------------------------------------------------------------
    async def on_bot_voice(self, channel_id: int | None, session_id: str, token: str) -> None:
        """The main gateway saw the bot's op 4: expect (or stop expecting) its IDENTIFY."""
        if channel_id is None:
            self.expected = None
            return
        self.expected = BotVoiceExpectation(channel_id, session_id, token)

    def member_voice(self, user_id: int) -> MemberVoice:
        mv = self.members.get(user_id)
        if mv is None:
            mv = MemberVoice(
                user_id=user_id,
                ssrc=self._rng.randrange(1, 1 << 31),
                sequence=self._rng.randrange(0, 1 << 16),
                timestamp=self._rng.randrange(0, 1 << 32),
            )
            self.members[user_id] = mv
        return mv

    async def member_joined(self, user_id: int) -> None:
        """A simulated member entered a voice channel: if it is the bot's, op 11 and, with DAVE,
        an MLS Add; if another, the member has left the bot's call (if it was in it)."""
        if self.world.member(user_id).voice_channel_id != self.channel_id:
            if user_id in self.members:
                await self.member_left(user_id)
            return
        mv = self.member_voice(user_id)
        mv.spoke_before = False
        self.note(f"member {self.name_of(user_id)} joined (ssrc {mv.ssrc})")
        conn = self.connection
        if conn is not None and conn.cipher is not None:
            await conn.send_json(OP_CLIENTS_CONNECT, {"user_ids": [str(user_id)]})
        mv.dave = make_member(self.member_dave, user_id, self.channel_id)
        await self._deliver(self.group.add_member(mv.dave))

    async def move_bot(self, channel_id: int, session_id: str, token: str) -> None:
        """Discord moved the bot to ``channel_id``: that channel's call (its members, new SSRCs,
        its own DAVE group) replaces the old one, whose websocket is closed with 4014. The
        gateway sends VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE (``session_id``, ``token``)."""
        self.expected = BotVoiceExpectation(channel_id, session_id, token)
        self.channel_id = channel_id
        self.group = DaveGroup(channel_id, protocol_version=self.group.protocol_version)
        self._commits_noted = 0
        self.members.clear()
        old, self.connection = self.connection, None
        self.note(f"bot moved to channel {channel_id}")
        for member in self.world.members.values():
            if not member.bot and member.voice_channel_id == channel_id:
                mv = self.member_voice(member.user_id)
                mv.dave = make_member(self.member_dave, member.user_id, channel_id)
                await self._deliver(self.group.add_member(mv.dave))
        if old is not None and not old.ws.closed:
            await old.ws.close(code=CLOSE_DISCONNECTED)

    async def member_left(self, user_id: int) -> None:
        """A simulated member left: op 13 and an MLS Remove. Its media state is dropped, so a
        rejoin gets a new SSRC (a new connection on Discord)."""
        mv = self.members.pop(user_id, None)
        if mv is None:
            return  # not in the bot's call
        self.note(f"member {self.name_of(user_id)} left")
        conn = self.connection
        if conn is not None and conn.cipher is not None:
            await conn.send_json(OP_CLIENT_DISCONNECT, {"user_id": str(user_id)})
            conn.announced.discard(user_id)
        if mv is not None:
            mv.dave = None
        await self._deliver(self.group.leave(user_id))

    async def _deliver(self, deliveries: list[Delivery]) -> None:
        conn = self.connection
        for user_id, frame in deliveries:
            if conn is None or user_id != conn.user_id or conn.ws.closed:
                _log.debug("voice: DAVE frame for %s not deliverable", user_id)
                continue
            if isinstance(frame, bytes):
                if frame[0] == OP_MLS_ANNOUNCE_COMMIT_TRANSITION and self._corrupt_commits > 0:
                    self._corrupt_commits -= 1
                    frame = frame[:-1] + bytes([frame[-1] ^ 0xFF])  # a flipped signature byte
                    self.note("fault: the next op 29 to the bot is corrupted")
                await conn.send_binary(frame)
            else:
                await conn.send_json(int(frame["op"]), frame["d"])
        history = self.group.history
        while self._commits_noted < len(history):
            committer, epoch, tid = history[self._commits_noted]
            self._commits_noted += 1
            self.note(
                f"DAVE epoch {epoch} committed by {self.name_of(committer)} (transition {tid}); "
                f"group {[self.name_of(u) for u in self.group.members]}"
            )
        self._arm_commit_timer()

    def _arm_commit_timer(self) -> None:
        """While proposals await the bot's commit, fall back to a member's after a timeout."""
        if not self.group.awaiting_commit or self._commit_timer is not None:
            return
        self._commit_timer = asyncio.create_task(
            self._commit_deadline(len(self.group.history)), name="dave-commit-deadline"
        )

    async def _commit_deadline(self, commits_before: int) -> None:
        try:
            await asyncio.sleep(self.dave_commit_timeout)
        finally:
            self._commit_timer = None
        if self.group.awaiting_commit and len(self.group.history) == commits_before:
            _log.info(
                "voice: the bot did not commit within %.1fs; a member commits",
                self.dave_commit_timeout,
            )
            await self._deliver(self.group.commit_timeout())
        else:
            self._arm_commit_timer()

    async def downgrade_dave(self) -> None:
        """Turn end-to-end encryption off for the call (op 21 → 23 → 22, protocol version 0)."""
        _log.info("voice: downgrading the call to DAVE protocol version 0")
        await self._deliver(self.group.downgrade())

    async def upgrade_dave(self) -> None:
        """Turn it back on (op 24 epoch 1 + op 25; a new group forms as on joining)."""
        _log.info("voice: upgrading the call to DAVE protocol version 1")
        await self._deliver(self.group.upgrade())

    # -- websocket -------------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True, max_msg_size=0)
        await ws.prepare(request)
        self._sockets.add(ws)
        _log.info("voice: gateway connection opened (v=%s)", request.query.get("v"))
        conn: VoiceConnection | None = None
        try:
            await ws.send_str(
                json.dumps(
                    {
                        "op": OP_HELLO,
                        "d": {
                            "heartbeat_interval": VOICE_HEARTBEAT_INTERVAL_MS,
                            "v": VOICE_GATEWAY_VERSION,
                        },
                    }
                )
            )
            async for msg in ws:
                if msg.type is WSMsgType.TEXT:
                    conn = await self._on_json(ws, conn, json.loads(msg.data))
                elif msg.type is WSMsgType.BINARY and conn is not None:
                    await self._on_binary(conn, bytes(msg.data))
        except DaveGroupError as exc:
            _log.warning("voice: DAVE error from the bot: %s", exc)
            await ws.close(code=4005)
        finally:
            self._sockets.discard(ws)
            _log.info("voice: gateway connection closed (code %s)", ws.close_code)
            self.note(f"voice gateway connection closed (code {ws.close_code})")
            if conn is not None and self.connection is conn:
                self.connection = None
                if conn.in_dave_group:
                    await self._deliver(self.group.leave(conn.user_id))
        return ws

    async def _on_json(
        self, ws: web.WebSocketResponse, conn: VoiceConnection | None, payload: dict[str, Any]
    ) -> VoiceConnection | None:
        op, data = payload.get("op"), payload.get("d") or {}
        _log.debug("voice in  op=%s", op)
        if op != OP_HEARTBEAT:
            self.note(f"<- bot op {op} {_brief(data)}")
        if conn is not None:
            conn.ops_in.append(int(op or 0))
            self._bot_op.set()
        if op == OP_HEARTBEAT:
            reply = {
                "op": OP_HEARTBEAT_ACK,
                "d": {"t": data.get("t") if isinstance(data, dict) else data},
            }
            await ws.send_str(json.dumps(reply))
        elif op == OP_IDENTIFY:
            return await self._identify(ws, data)
        elif op == OP_RESUME:
            return await self._resume(ws, data)
        elif conn is None:
            _log.warning("voice: op %s before IDENTIFY", op)
        elif op == OP_SELECT_PROTOCOL:
            await self._select_protocol(conn, data)
        elif op == OP_SPEAKING:
            _log.debug("voice: bot speaking=%s", data.get("speaking"))
        elif op == OP_DAVE_TRANSITION_READY:
            await self._deliver(
                self.group.on_transition_ready(conn.user_id, int(data["transition_id"]))
            )
        elif op == OP_MLS_INVALID_COMMIT_WELCOME:
            _log.info("voice: bot could not process transition %s", data.get("transition_id"))
            await self._deliver(
                self.group.on_invalid_commit_welcome(conn.user_id, int(data["transition_id"]))
            )
        elif op == OP_CLIENT_CONNECT:
            pass
        else:
            _log.warning("voice: unexpected op %s", op)
        return conn

    async def _on_binary(self, conn: VoiceConnection, data: bytes) -> None:
        if not data:
            return
        op, payload = data[0], data[1:]
        conn.ops_in.append(op)
        self.note(f"<- bot op {op} ({len(payload)} bytes)")
        self._bot_op.set()
        _log.debug("voice in  binary op=%s (%d bytes)", op, len(payload))
        if op == OP_MLS_KEY_PACKAGE:
            await self._deliver(self.group.on_key_package(conn.user_id, payload))
        elif op == OP_MLS_COMMIT_WELCOME:
            await self._deliver(self.group.on_commit_welcome(conn.user_id, payload))
        else:
            _log.warning("voice: unexpected binary op %s", op)

    async def _identify(
        self, ws: web.WebSocketResponse, data: dict[str, Any]
    ) -> VoiceConnection | None:
        exp = self.expected
        bot = self.world.bot
        self.black_holed = None  # a new voice session: a new path through the NAT
        ok = (
            exp is not None
            and str(data.get("server_id")) == str(self.world.guild_id)
            and str(data.get("user_id")) == str(bot.user_id)
            and data.get("session_id") == exp.session_id
            and data.get("token") == exp.token
        )
        if not ok:
            _log.info("voice: IDENTIFY does not match VOICE_SERVER_UPDATE; closing 4004")
            await ws.close(code=CLOSE_AUTHENTICATION_FAILED)
            return None
        if self.connection is not None and not self.connection.ws.closed:
            old = self.connection
            self.connection = None
            if old.in_dave_group:
                await self._deliver(self.group.leave(old.user_id))
            await old.ws.close(code=CLOSE_SESSION_INVALID)
        conn = VoiceConnection(
            ws=ws, user_id=bot.user_id, ssrc=self._rng.randrange(1, 1 << 31), journal=self.note
        )
        self.connection = conn
        _log.info(
            "voice: bot identified (max DAVE version %s); offering %s",
            data.get("max_dave_protocol_version"),
            list(self.modes),
        )
        await conn.send_json(
            OP_READY,
            {
                "ssrc": conn.ssrc,
                "ip": "127.0.0.1",
                "port": self.udp_port,
                "modes": list(self.modes),
                "experiments": [],
                "heartbeat_interval": VOICE_HEARTBEAT_INTERVAL_MS,
            },
        )
        return conn

    async def _resume(
        self, ws: web.WebSocketResponse, data: dict[str, Any]
    ) -> VoiceConnection | None:
        conn = self.connection
        exp = self.expected
        if (
            conn is None
            or exp is None
            or data.get("session_id") != exp.session_id
            or data.get("token") != exp.token
        ):
            _log.info("voice: RESUME of an unknown session; closing 4006")
            await ws.close(code=CLOSE_SESSION_INVALID)
            return None
        conn.ws = ws
        await conn.send_json(OP_RESUMED, None)
        _log.info("voice: session resumed")
        return conn

    async def _select_protocol(self, conn: VoiceConnection, data: dict[str, Any]) -> None:
        inner = data.get("data") or {}
        mode = inner.get("mode") or data.get("mode")
        if mode not in self.modes:
            _log.info("voice: SELECT_PROTOCOL with unoffered mode %r; closing 4016", mode)
            await conn.ws.close(code=4016)
            return
        conn.client_addr = (str(inner["address"]), int(inner["port"]))
        conn.mode = mode
        conn.secret_key = secrets.token_bytes(32)
        conn.cipher = TransportCipher(mode, conn.secret_key)
        _log.info("voice: protocol selected (%s), client at %s:%d", mode, *conn.client_addr)
        await conn.send_json(
            OP_SESSION_DESCRIPTION,
            {
                "mode": mode,
                "secret_key": list(conn.secret_key),
                "dave_protocol_version": self.group.protocol_version,
                "audio_codec": "opus",
                "video_codec": None,
                "media_session_id": secrets.token_hex(16),
            },
        )
        present = [
            m.user_id
            for m in self.world.members.values()
            if not m.bot and m.voice_channel_id == self.channel_id
        ]
        if present:
            await conn.send_json(OP_CLIENTS_CONNECT, {"user_ids": [str(u) for u in present]})
        for uid in present:
            mv = self.members.get(uid)
            if mv is not None and mv.spoke_before:
                await self._announce(conn, mv)
        conn.in_dave_group = True
        await self._deliver(self.group.join(conn.user_id))
        self._connected.set()

    # -- UDP -------------------------------------------------------------------------------------
    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) == IP_DISCOVERY_SIZE and data[1] == IP_DISCOVERY_REQUEST:
            ssrc = struct.unpack_from(">I", data, 4)[0]
            _log.debug("voice: IP discovery from %s:%d (ssrc %d)", addr[0], addr[1], ssrc)
            self._sendto(ip_discovery_response(ssrc, addr[0], addr[1]), addr)
            return
        self.received_from_bot.append(data)

    def black_hole_bot(self) -> None:
        """Silently drop every datagram to the bot's current voice address (a NAT that forgot
        the mapping: the bot stays connected but goes deaf) until it identifies afresh."""
        conn = self.connection
        self.black_holed = conn.client_addr if conn is not None else None
        _log.info("voice: black-holing UDP to the bot at %s", self.black_holed)

    def _sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr == self.black_holed:
            self.black_holed_datagrams += 1
            return
        if self._udp is not None and self._udp.transport is not None:
            self._udp.transport.sendto(data, addr)

    # -- members speaking ------------------------------------------------------------------------
    def _live_connection(self) -> VoiceConnection | None:
        """The bot's connection if media can be sent to it now (key and address known)."""
        conn = self.connection
        if conn is None or conn.cipher is None or conn.client_addr is None or conn.ws.closed:
            return None
        return conn

    async def _announce(self, conn: VoiceConnection, mv: MemberVoice) -> None:
        await conn.send_json(
            OP_SPEAKING, {"user_id": str(mv.user_id), "ssrc": mv.ssrc, "speaking": 1}
        )
        conn.announced.add(mv.user_id)
        self.timeline.append(("speaking", mv.user_id))

    def _send_media(self, conn: VoiceConnection, mv: MemberVoice, opus: bytes, rms: float) -> None:
        assert conn.cipher is not None and conn.client_addr is not None
        payload = mv.dave.encrypt_opus(opus) if mv.dave is not None else opus
        header, ext = build_rtp_header(
            mv.sequence,
            mv.timestamp,
            mv.ssrc,
            extension=audio_level_extension(audio_level_dbov(rms)),
        )
        packet = conn.cipher.encrypt(header, ext, payload, mv.nonce)
        mv.nonce = (mv.nonce + 1) & 0xFFFFFFFF
        self._sendto(packet, conn.client_addr)
        mv.packets_sent += 1
        mv.octets_sent += len(payload)
        if mv.packets_sent % RTCP_EVERY_PACKETS == 1:
            self._send_rtcp(conn, mv)

    def _send_rtcp(self, conn: VoiceConnection, mv: MemberVoice) -> None:
        assert conn.cipher is not None and conn.client_addr is not None
        report = rtcp_sender_report(
            mv.ssrc, mv.timestamp, mv.packets_sent, mv.octets_sent, time.time()
        )
        # _rtpsize modes: the first 8 bytes (header + sender SSRC) are clear and authenticated.
        packet = conn.cipher.encrypt(report[:8], b"", report[8:], mv.nonce)
        mv.nonce = (mv.nonce + 1) & 0xFFFFFFFF
        self._sendto(packet, conn.client_addr)

    async def speak(
        self,
        user_id: int,
        pcm: npt.NDArray[np.int16],
        *,
        loss: float = 0.0,
        rng: random.Random | None = None,
        realtime: bool = True,
        speaking_late: bool | None = None,
        clock: Callable[[], float] | None = None,
    ) -> int:
        """Send ``pcm`` (48 kHz stereo int16, shape (n, 2) or interleaved) as ``user_id``'s voice.

        Returns the number of media packets handed to the network (lost ones excluded).
        """
        member = self.world.member(user_id)
        if member.voice_channel_id != self.channel_id:
            raise ValueError(f"{member.name} is not in the bot's voice channel")
        if not 0.0 <= loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        frames = np.asarray(pcm, dtype=np.int16).reshape(-1, CHANNELS)
        pad = (-len(frames)) % FRAME_SAMPLES
        if pad:
            frames = np.concatenate([frames, np.zeros((pad, CHANNELS), np.int16)])
        rng = rng or self._rng
        late = self.speaking_late if speaking_late is None else speaking_late
        mv = self.member_voice(user_id)
        self.note(
            f"{member.name} starts speaking ({len(frames) / SAMPLE_RATE:.2f} s, ssrc {mv.ssrc})"
        )
        lost = 0
        lag = 0.0
        loop = asyncio.get_running_loop()
        now = clock or loop.time
        start = now()
        sent = 0
        trailing_silence = SILENCE_FRAMES_AFTER_SPURT  # nothing to close before the first spurt
        packets_this_spurt = 0
        with OpusEncoder(SAMPLE_RATE, CHANNELS) as encoder:
            for i in range(len(frames) // FRAME_SAMPLES):
                if self.members.get(user_id) is not mv:
                    break  # the member left the call mid-sentence
                frame = frames[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]
                rms = frame_rms(frame)
                live = self._live_connection()
                opus: bytes | None = None
                if rms >= SILENCE_RMS:
                    if trailing_silence >= SILENCE_FRAMES_AFTER_SPURT:
                        packets_this_spurt = 0
                    trailing_silence = 0
                    opus = encoder.encode(np.ascontiguousarray(frame))
                    if live is not None and not late and user_id not in live.announced:
                        await self._announce(live, mv)
                elif trailing_silence < SILENCE_FRAMES_AFTER_SPURT:
                    trailing_silence += 1
                    opus = OPUS_SILENCE_FRAME
                if opus is not None:
                    mv.spoke_before = True
                    if live is not None and rng.random() >= loss:
                        self._send_media(live, mv, opus, rms)
                        self.timeline.append(("media", user_id))
                        sent += 1
                    elif live is not None:
                        self.timeline.append(("lost", user_id))
                        lost += 1
                    packets_this_spurt += 1
                    mv.sequence = (mv.sequence + 1) & 0xFFFF
                    if (
                        live is not None
                        and late
                        and packets_this_spurt >= LATE_SPEAKING_AFTER_PACKETS
                        and user_id not in live.announced
                    ):
                        await self._announce(live, mv)
                mv.timestamp = (mv.timestamp + FRAME_SAMPLES) & 0xFFFFFFFF
                if realtime:
                    delay = start + (i + 1) * FRAME_SECONDS - now()
                    lag = max(lag, -delay)
                    await asyncio.sleep(max(0.0, delay))
                elif opus is not None:
                    await asyncio.sleep(FAST_PACKET_GAP)
        _log.info(
            "voice: %s spoke %d frames, %d packets sent",
            member.name,
            len(frames) // FRAME_SAMPLES,
            sent,
        )
        self.max_send_lag = max(self.max_send_lag, lag)
        self.note(
            f"{member.name} stops speaking: {sent} packets sent, {lost} dropped as loss, "
            f"at most {lag:.3f} s behind real time"
        )
        return sent

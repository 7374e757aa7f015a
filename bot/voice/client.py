"""discord.py adapter for voice receive: a VoiceClient subclass and the listener it feeds.

discord.py 2.7 sends voice but does not receive it. We hook in without forking it:

- :class:`ReceiveVoiceClient` builds its ``VoiceConnectionState`` with a websocket hook, so we see
  every JSON voice-gateway message after discord.py has handled it: op 2 READY (new voice
  session: SSRCs are reassigned), op 4 SESSION_DESCRIPTION (transport mode and key; the UDP socket
  exists now, so this is where the socket listener is (re-)attached, after every reconnect or
  move), op 5 SPEAKING (SSRC -> member), op 13 client disconnect.
- It also offers ``aead_aes256_gcm_rtpsize`` (Discord's preferred mode; far cheaper to decrypt
  than XChaCha20) with the matching send-side encryption discord.py looks up by mode name.
- :class:`VoiceListener` outlives any one voice client: it owns the :class:`VoiceReceiver`, reads
  the UDP socket on the event loop through :class:`~bot.voice.inbox.DatagramInbox` (or, where
  the loop cannot watch sockets, takes datagrams from discord.py's socket-reader thread through
  its bounded queue; the thread never blocks), runs the receiver's clock,
  sends a UDP keepalive (discord.py sends none while it plays nothing, and NATs forget the
  mapping), and watches for a connection that went deaf. The clock and keepalive tasks are
  supervised (:func:`supervise`): if one ever ends it is logged and started again, because
  without the clock a meeting gets no silence fill, no idle detection and no watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import discord
from discord.voice_state import SocketReader, VoiceConnectionState

from bot.voice.buglog import ThrottledTraceback
from bot.voice.crypto import TransportCipher
from bot.voice.dave import DaveReceiver
from bot.voice.inbox import DatagramInbox
from bot.voice.receiver import ReceiveCounters, VoiceReceiver

log = logging.getLogger(__name__)

#: Voice gateway opcodes we observe (discord.py handles the rest itself).
OP_READY = 2
OP_SESSION_DESCRIPTION = 4
OP_SPEAKING = 5
OP_CLIENTS_CONNECT = 11
OP_CLIENT_DISCONNECT = 13

#: How often the receiver's clock runs (silence fill, stalled jitter buffers, idle members).
TICK_SECONDS = 0.05
#: A supervised task that ended is started again after this long (no busy loop if it keeps
#: failing at once).
RESTART_DELAY = 0.5
#: At most one log line per this many seconds for a clock tick that failed (a bug).
TICK_ERROR_LOG_INTERVAL = 30.0


async def supervise(
    name: str,
    body: Callable[[], Coroutine[Any, Any, None]],
    *,
    restart_delay: float = RESTART_DELAY,
    on_restart: Callable[[str], None] | None = None,
) -> None:
    """Run ``body()`` for ever: whenever it ends (returns or raises), log it and run it again.

    Only cancellation stops it. For loops that must outlive any bug in one iteration.
    """
    while True:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed; restarting it in %.1f s", name, restart_delay)
        else:
            log.error("%s ended by itself; restarting it in %.1f s", name, restart_delay)
        if on_restart is not None:
            on_restart(name)
        await asyncio.sleep(restart_delay)


class VoiceListener:
    """Receives one guild's voice, across voice reconnects, moves and gateway RESUMEs."""

    def __init__(
        self,
        receiver: VoiceReceiver,
        *,
        keepalive_seconds: float = 5.0,
        watchdog_seconds: float = 15.0,
        on_stalled: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        tick_seconds: float = TICK_SECONDS,
        restart_delay: float = RESTART_DELAY,
    ) -> None:
        self.receiver = receiver
        self._tick_seconds = tick_seconds
        self._restart_delay = restart_delay
        self._keepalive_seconds = keepalive_seconds
        self._watchdog_seconds = watchdog_seconds
        self._on_stalled = on_stalled
        self._clock = clock
        #: Datagrams of the voice UDP socket, handed to the receiver on the loop.
        self.inbox = DatagramInbox(receiver.handle_packet, clock)
        self._vc: ReceiveVoiceClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.last_speaking_at: float | None = None
        self.keepalives_sent = 0
        #: Clock ticks run so far, and restarts of supervised tasks (0 unless a bug struck).
        self.ticks = 0
        self.restarts = 0
        self.tick_errors = 0
        self._log_tick_bug = ThrottledTraceback(log, "voice receive tick failed (%d so far)",
                                                TICK_ERROR_LOG_INTERVAL)
        self._stall_reported_at: float | None = None
        self._keepalive_counter = 0
        if receiver.dave is None:
            # DAVE through whichever session discord.py holds right now (replaced on reconnect).
            receiver.dave = DaveReceiver(self._dave_session, self._dave_protocol_version)

    def _dave_session(self) -> Any:
        vc = self._vc
        return vc._connection.dave_session if vc is not None else None

    def _dave_protocol_version(self) -> int:
        vc = self._vc
        return int(vc._connection.dave_protocol_version) if vc is not None else 0

    # -- binding to a voice client ---------------------------------------------------------------

    @property
    def voice_client(self) -> ReceiveVoiceClient | None:
        return self._vc

    def factory(self) -> Callable[[discord.Client, discord.abc.Connectable], ReceiveVoiceClient]:
        """``channel.connect(cls=listener.factory())`` joins with a client bound to us."""

        def make(client: discord.Client, channel: discord.abc.Connectable) -> ReceiveVoiceClient:
            return ReceiveVoiceClient(client, channel, listener=self)

        return make

    def bind(self, vc: ReceiveVoiceClient) -> None:
        self._vc = vc
        self.start(vc.loop)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the supervised clock and keepalive tasks on ``loop`` (once; idempotent)."""
        self.inbox.bind(loop)
        if not self._tasks:
            self._tasks = [
                loop.create_task(self._supervised("voice receive clock", self._tick_loop),
                                 name="voice-receive-tick"),
                loop.create_task(self._supervised("voice UDP keepalive", self._keepalive_loop),
                                 name="voice-udp-keepalive"),
            ]

    async def _supervised(self, name: str, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        await supervise(name, body, restart_delay=self._restart_delay,
                        on_restart=self._count_restart)

    def _count_restart(self, _name: str) -> None:
        self.restarts += 1

    @property
    def clock_alive(self) -> bool:
        """True while the receiver's clock task runs (it is supervised: it always should)."""
        return bool(self._tasks) and not self._tasks[0].done()

    def counters(self) -> ReceiveCounters:
        """Where every datagram of this guild's voice went (``/transcribe status`` shows it)."""
        counters = self.receiver.counters()
        counters.inbox_dropped = self.inbox.dropped
        counters.socket_dropped = self.inbox.socket_dropped
        return counters

    def attach_socket(self) -> None:
        """(Re-)attach to the current connection's UDP socket: read it on the event loop where
        the loop can watch sockets, else through discord.py's socket-reader thread."""
        vc = self._vc
        if vc is None:
            return
        conn = vc._connection
        conn.remove_socket_listener(self.inbox.put)
        sock = getattr(conn, "socket", None)
        if isinstance(sock, socket.socket) and self.inbox.read_from(sock):
            return
        self.inbox.stop_reading()
        conn.add_socket_listener(self.inbox.put)

    async def aclose(self) -> None:
        """Stop the clock and keepalive tasks and detach, handing on what the socket already
        received; idempotent."""
        if self._vc is not None:
            try:
                self._vc._connection.remove_socket_listener(self.inbox.put)
            except Exception:  # the connection may already be torn down
                log.debug("removing socket listener failed", exc_info=True)
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
        self.inbox.drain_all()
        self.inbox.stop_reading()

    # -- voice gateway hook ------------------------------------------------------------------------

    async def on_voice_ws_message(self, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        data = msg.get("d") or {}
        now = self._clock()
        if op == OP_READY:
            # A fresh voice session: drop SSRC state; members keep their streams.
            self.inbox.drain_all()
            self.receiver.reset_connection()
        elif op == OP_SESSION_DESCRIPTION:
            try:
                self.receiver.set_transport(str(data["mode"]), bytes(data["secret_key"]))
            except (KeyError, TypeError, ValueError):
                log.warning("voice session description without a usable mode/key")
                return
            self.attach_socket()
            self.inbox.drain_all()  # packets that waited for the key
        elif op == OP_SPEAKING:
            try:
                user_id, ssrc = int(data["user_id"]), int(data["ssrc"])
            except (KeyError, TypeError, ValueError):
                return
            if data.get("speaking", 1):
                self.last_speaking_at = now
            self.inbox.drain_all()
            self.receiver.on_speaking(user_id, ssrc, now)
        elif op == OP_CLIENT_DISCONNECT:
            try:
                self.receiver.on_client_disconnect(int(data["user_id"]))
            except (KeyError, TypeError, ValueError):
                return

    # -- clock, keepalive, watchdog ----------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick_seconds)
            try:
                self._tick_once()
            except Exception:  # never let one bad member or callback stop everyone's clock
                self.tick_errors += 1
                self._log_tick_bug(self.tick_errors)

    def _tick_once(self) -> None:
        self.inbox.drain_all()
        now = self._clock()
        self.ticks += 1
        self.receiver.tick(now)
        self._watchdog(now)

    def _watchdog(self, now: float) -> None:
        """Members are speaking but no packet arrived for watchdog_seconds: say so, once."""
        if self._on_stalled is None or self.last_speaking_at is None:
            return
        last_packet = self.receiver.last_packet_at
        reference = max(self.last_speaking_at, last_packet or 0.0)
        if last_packet is not None and last_packet >= self.last_speaking_at:
            return
        if now - reference < self._watchdog_seconds:
            return
        if self._stall_reported_at is not None and self._stall_reported_at >= reference:
            return
        self._stall_reported_at = now
        self._on_stalled(
            f"members are speaking but no voice packets arrived for "
            f"{self._watchdog_seconds:.0f} s"
        )

    async def _keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self._keepalive_seconds)
            self.send_keepalive()

    def send_keepalive(self) -> None:
        """An 8-byte UDP datagram (a counter), as Discord's own clients send every few seconds."""
        vc = self._vc
        if vc is None or not vc.is_connected():
            return
        state = vc._connection
        try:
            self._keepalive_counter = (self._keepalive_counter + 1) & 0xFFFFFFFF
            state.socket.sendto(struct.pack("<Q", self._keepalive_counter),
                                (state.endpoint_ip, state.voice_port))
            self.keepalives_sent += 1
        except (OSError, TypeError, AttributeError):
            log.debug("voice keepalive not sent", exc_info=True)

    def voice_client_gone(self, vc: ReceiveVoiceClient) -> None:
        """discord.py dropped the voice connection by itself (e.g. a 4015 resume that timed
        out): without this the meeting would stay live and deaf. Reported like a stall."""
        if vc is not self._vc or not self._tasks or self._on_stalled is None:
            return  # an older client, or we are closed: nothing to recover
        log.warning("voice connection dropped by discord.py without our asking")
        self._stall_reported_at = self._clock()
        self._on_stalled("Discord closed the voice connection and it could not be resumed")

    def reset_watchdog(self) -> None:
        self.last_speaking_at = None
        self._stall_reported_at = None


class ReceiveVoiceClient(discord.VoiceClient):
    """discord.py's VoiceClient plus the receive hook and AES-GCM transport."""

    # discord.py's SupportedModes Literal has no AES-GCM mode; we add it (our own cipher).
    supported_modes = (  # type: ignore[assignment]
        "aead_aes256_gcm_rtpsize",
        "aead_xchacha20_poly1305_rtpsize",
    )

    def __init__(self, client: discord.Client, channel: discord.abc.Connectable, *,
                 listener: VoiceListener) -> None:
        self.listener = listener  # before super().__init__, which builds the connection state
        self._send_cipher: tuple[bytes, TransportCipher] | None = None
        self._leaving = False
        super().__init__(client, channel)
        listener.bind(self)

    async def disconnect(self, *, force: bool = False) -> None:
        self._leaving = True  # asked for: not a lost connection
        await super().disconnect(force=force)

    def cleanup(self) -> None:
        super().cleanup()
        if not self._leaving:
            self.listener.voice_client_gone(self)

    def create_connection_state(self) -> VoiceConnectionState:
        return _ReceiveConnectionState(self, hook=self._voice_ws_hook)

    async def _voice_ws_hook(self, ws: Any, msg: dict[str, Any]) -> None:
        await self.listener.on_voice_ws_message(msg)

    def _encrypt_aead_aes256_gcm_rtpsize(self, header: bytes, data: bytes) -> bytes:
        """Send side of the AES-GCM mode; discord.py finds it by the mode's name."""
        key = bytes(self.secret_key)
        if self._send_cipher is None or self._send_cipher[0] != key:
            self._send_cipher = (key, TransportCipher("aead_aes256_gcm_rtpsize", key))
        nonce = self._incr_nonce
        self.checked_add("_incr_nonce", 1, 4294967295)
        return self._send_cipher[1].encrypt(bytes(header), b"", bytes(data), nonce)


#: The reader thread's longest sleep in ``select``. A voice reconnect replaces the UDP socket;
#: a thread already on its way into ``select`` with the old descriptor number sleeps on whatever
#: now holds that number (often a quiet socket of the new connection), and IP discovery's answer
#: waits unread on the new socket until it wakes: up to discord.py's 30 s (the full 4006 voice
#: reconnect stalled so, rarely, under load). A short timeout bounds that to this much.
READER_SELECT_TIMEOUT = 0.25


class _WakingSocketReader(SocketReader):
    """discord.py's socket reader thread, made safe across voice reconnects.

    With a listener registered (ours), the reader thread sits in ``select`` on the UDP socket.
    A voice reconnect pauses it and closes that socket, which does not wake ``select`` on Linux:
    ``shutdown(SHUT_RD)`` on the old socket (in :meth:`pause`) makes it readable at once. And the
    loop (:meth:`_do_run`) selects with :data:`READER_SELECT_TIMEOUT`, and drops what it read
    from a socket that was replaced meanwhile, so a stale descriptor costs at most that long.
    With no callback registered it reads nothing: the listener may be reading the same socket
    on the event loop, and a datagram taken here would be lost to it.
    """

    def pause(self) -> None:
        super().pause()
        sock = getattr(self.state, "socket", None)
        if sock is None or sock is discord.utils.MISSING:
            return
        try:
            sock.shutdown(socket.SHUT_RD)
        except OSError:  # not connected yet, or already closed: nothing is waiting on it
            pass

    def _do_run(self) -> None:
        while not self._end.is_set():
            if not self._running.is_set():
                self._running.wait()
                continue
            sock = self.state.socket
            try:
                readable, _, _ = select.select([sock], [], [], READER_SELECT_TIMEOUT)
            except (ValueError, TypeError, OSError):  # closed, or not created yet: a reconnect
                self._end.wait(READER_SELECT_TIMEOUT / 5)  # never spin while it settles
                continue
            if not readable or sock is not self.state.socket:
                continue  # nothing yet, or the socket was replaced while we slept
            if not self._callbacks:
                # Nobody to give it to (IP discovery just ended; the listener reads the socket
                # on the event loop): leave the datagram for whoever reads it. The loop's top
                # waits once discord.py has paused us for having no callbacks.
                self._end.wait(0.001)
                continue
            try:
                data = sock.recv(2048)
            except OSError:  # the old socket, shut down or closed under us
                continue
            for callback in list(self._callbacks):
                try:
                    callback(data)
                except Exception:
                    log.exception("voice socket listener %r failed", callback)


class _ReceiveConnectionState(VoiceConnectionState):
    """discord.py's connection state with :class:`_WakingSocketReader` as its reader thread.

    While discord.py itself listens on the UDP socket (IP discovery, which a move repeats on
    the same socket), the listener stops reading it on the event loop, which would take the
    answer; it reads it again from the next SESSION_DESCRIPTION (op 4).
    """

    def __init__(self, voice_client: discord.VoiceClient, **kwargs: Any) -> None:
        super().__init__(voice_client, **kwargs)
        stock = self._socket_reader
        stock.stop()  # it has not run yet (it starts paused): let it end and use ours
        self._socket_reader = _WakingSocketReader(self)
        self._socket_reader.start()

    def add_socket_listener(self, callback: Callable[[bytes], Any]) -> None:
        listener = getattr(self.voice_client, "listener", None)
        if listener is not None and callback != listener.inbox.put:
            listener.inbox.stop_reading()
        super().add_socket_listener(callback)

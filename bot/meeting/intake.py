"""Voice intake: the voice channel a meeting hears, from joining it to draining it.

Owns the :class:`~bot.voice.receiver.VoiceReceiver` (RTP -> per-member PCM), the
:class:`~bot.voice.client.VoiceListener` bound to discord.py's voice client, the rejoin when the
listener's watchdog reports a stall, following a move to another channel, and :meth:`drain`.
What the receiver emits goes to the callbacks it is given (the speakers); what members should
hear about goes to the notice callbacks (the ledger). It knows nothing of STT or storage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import discord
import numpy as np

from bot.config import Config
from bot.meeting.consent import Encryption
from bot.meeting.tasks import TaskOwner
from bot.transcript.escape import ERROR_BUDGET, outside
from bot.voice.client import VoiceListener
from bot.voice.receiver import VoiceReceiver

log = logging.getLogger(__name__)

#: Seconds a shutdown waits for discord.py to leave voice (it waits for the gateway).
LEAVE_AT_SHUTDOWN = 1.0

#: Seconds to wait for discord.py to join (or rejoin) a voice channel.
JOIN_TIMEOUT = 30.0

#: Seconds to wait after joining (or a move) for the voice session and its DAVE state.
SETTLE_TIMEOUT = 10.0
SETTLE_POLL = 0.05

VoiceChannel = discord.VoiceChannel | discord.StageChannel


class VoiceIntake:
    """One meeting's voice connection; see the module docstring."""

    def __init__(
        self,
        *,
        config: Config,
        guild: discord.Guild,
        channel: VoiceChannel,
        tasks: TaskOwner,
        on_audio: Callable[[int, np.ndarray], None],
        on_idle: Callable[[int], None],
        is_ignored: Callable[[int], bool],
        notice_once: Callable[[str, str], None],
        say: Callable[[str], None],
    ) -> None:
        self.guild = guild
        self.channel = channel
        self._tasks = tasks
        self._notice_once = notice_once
        self._say = say
        #: The channel whose consent notice Discord accepted; audio of any other is dropped.
        self._admitted: int | None = None
        self._moved_from_ws: object | None = None
        self.receiver = VoiceReceiver(
            sample_rate=config.stt.sample_rate,
            on_audio=on_audio,
            on_idle=on_idle,
            is_ignored=is_ignored,
            jitter_packets=max(1, config.voice.jitter_ms // 20),
            idle_timeout=config.voice.idle_timeout,
            # Audio in whole STT chunks: the pipeline's chunker would hold anything less.
            batch_ms=config.stt.chunk_ms,
        )
        self.listener = VoiceListener(
            self.receiver,
            keepalive_seconds=config.voice.keepalive_seconds,
            watchdog_seconds=config.voice.watchdog_seconds,
            on_stalled=self._on_stalled,
        )

    @property
    def output_rate(self) -> int:
        return self.receiver.output_rate

    async def join(self) -> None:
        """Join the channel (undeafened: we receive). Raises what discord.py raises."""
        await self.channel.connect(cls=self.listener.factory(), timeout=JOIN_TIMEOUT,
                                   self_deaf=False)

    # -- keeping the connection ------------------------------------------------------------------

    def _on_stalled(self, why: str) -> None:
        self._notice_once("voice-stalled", f"\N{WARNING SIGN} Voice receive stalled ({why}); "
                                           "reconnecting to the voice channel.")
        self._tasks.spawn(self._reconnect(), "voice-reconnect")

    async def _reconnect(self) -> None:
        vc = self.listener.voice_client
        log.warning("guild %s: reconnecting voice", self.guild.id)
        if vc is not None:
            try:
                await vc.disconnect(force=True)
            except Exception:
                log.debug("disconnect before reconnect failed", exc_info=True)
        self.receiver.reset_connection()
        self.listener.reset_watchdog()
        try:
            await self.channel.connect(cls=self.listener.factory(), timeout=JOIN_TIMEOUT)
        except Exception as exc:
            self._notice_once("voice-lost", f"\N{WARNING SIGN} Lost the voice connection and "
                                            f"could not rejoin: {outside(str(exc), ERROR_BUDGET)}")

    def _heard_channel(self) -> VoiceChannel | None:
        """The channel the bot's voice connection is in now, as discord.py knows it."""
        me = self.guild.me
        voice = me.voice if me is not None else None
        channel = voice.channel if voice is not None else None
        if channel is None:
            vc = self.listener.voice_client
            channel = vc.channel if vc is not None else None
        if not isinstance(channel, discord.VoiceChannel | discord.StageChannel):
            return None  # between sessions, or disconnected
        return channel

    def follow_move(self) -> VoiceChannel | None:
        """Discord (or a moderator) moved the bot to another voice channel: hear that one from
        now on (status, empty-channel stop, rejoin) and return it; None when not moved. Its
        audio stays dropped until :meth:`admit` (the consent notice was accepted there).
        discord.py follows the move by itself (a new voice session; the listener re-binds on
        its READY and SESSION_DESCRIPTION); the bot's own voice state is the first to know."""
        channel = self._heard_channel()
        if channel is None or channel.id == self.channel.id:
            return None
        log.info("guild %s: moved from %s to %s", self.guild.id, self.channel.id, channel.id)
        self.channel = channel
        vc = self.listener.voice_client
        self._moved_from_ws = vc._connection.ws if vc is not None else None
        return channel

    # -- the consent gate ------------------------------------------------------------------------

    def admit(self, channel_id: int) -> None:
        """The consent notice of this channel was accepted by Discord: its audio may go on."""
        self._admitted = channel_id

    def admits_audio(self) -> bool:
        """Audio goes on only from the channel whose consent notice Discord has accepted; the
        bot's own voice state is checked too, so audio of a room the bot was just moved to is
        dropped even before the move has been followed."""
        admitted = self._admitted
        if admitted is None or self.channel.id != admitted:
            return False
        # Per packet, so the cheap look: discord.py updates its voice client's channel on the
        # bot's VOICE_STATE_UPDATE, before the new room's voice session exists.
        vc = self.listener.voice_client
        return vc is None or vc.channel is None or vc.channel.id == admitted

    async def settle(self, *, moved: bool, limit: float = SETTLE_TIMEOUT) -> Encryption:
        """Wait (bounded) for the voice session of the current channel and its DAVE state:
        after a move, the new voice websocket; then either protocol version 0 or our DAVE
        session in the group. What is known then goes into the consent notice."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while loop.time() < deadline:
            vc = self.listener.voice_client
            if vc is not None and vc.is_connected() and not (
                    moved and vc._connection.ws is self._moved_from_ws):
                version = int(vc._connection.dave_protocol_version)
                dave = self.receiver.dave
                if version == 0:
                    return Encryption(dave=False)
                if dave is not None and dave.is_e2ee():
                    return Encryption(dave=True, privacy_code=dave.privacy_code())
            await asyncio.sleep(SETTLE_POLL)
        log.warning("guild %s: voice/DAVE state not settled within %.0f s", self.guild.id,
                    limit)
        vc = self.listener.voice_client
        if vc is not None and int(vc._connection.dave_protocol_version) == 0:
            return Encryption(dave=False)
        return Encryption(dave=None)

    def humans_in_channel(self) -> int:
        return sum(1 for m in self.channel.members if not m.bot)

    def forget_member(self, user_id: int) -> None:
        """Nothing more of this member is decoded (an opt-out)."""
        self.receiver.forget_member(user_id)

    # -- ending ----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop receiving and hand on everything already received: what the socket delivered,
        then every jitter buffer, and end every member (``on_idle`` for each). Audio after this
        is not heard."""
        await self.listener.aclose()
        self.receiver.drain(time.monotonic())

    async def leave(self, deadline: float | None = None) -> None:
        """Disconnect from voice (after :meth:`drain`); safe when never joined. With a
        ``deadline`` (a shutdown's, loop time) for at most :data:`LEAVE_AT_SHUTDOWN` seconds:
        discord.py waits for a gateway that may be unreachable, and the minutes need the time."""
        if deadline is None:
            await self._leave()
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + LEAVE_AT_SHUTDOWN)):
                await self._leave()
        except TimeoutError:
            log.warning("guild %s: shutting down: leaving voice timed out (Discord "
                        "unreachable?)", self.guild.id)

    async def _leave(self) -> None:
        await self.listener.aclose()
        vc = self.listener.voice_client
        if vc is not None and vc.is_connected():
            await vc.disconnect(force=True)

    # -- status ----------------------------------------------------------------------------------

    def e2ee(self) -> tuple[bool, str | None]:
        """(end-to-end encrypted?, the voice privacy code) of the current connection."""
        dave = self.receiver.dave
        if dave is None or self.listener.voice_client is None:
            return False, None
        return dave.is_e2ee(), dave.privacy_code()

"""Each member's stream against the wall clock: the receiver's time half.

Packets say what was said and in which order; only the wall clock says that someone stopped.
:class:`MemberClock` keeps one :class:`~bot.voice.timeline.MemberTimeline` per member heard on
a voice connection, with the SSRC streams each owns, and on every :meth:`~MemberClock.tick`:

- releases a jitter buffer that waited ``fill_after`` for a missing packet (holes concealed);
- fills silence in real time for a member who paused (``fill_after`` after Discord's
  end-of-spurt silence frames, ``stall_fill_after`` when packets merely stopped), so the STT
  service hears the pause and commits the sentence;
- ends a member's stream after ``idle_timeout`` without packets (``on_idle``), handing on what
  was batched for them first.

:meth:`~MemberClock.drain` ends every stream at a meeting's stop. No sockets and no timers here
either: the receiver's adapter calls the tick with the time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from bot.voice.counters import ReceiveCounters
from bot.voice.jitter import Frame
from bot.voice.ssrcs import SsrcState, SsrcStreams
from bot.voice.timeline import Emitter, MemberTimeline


class MemberClock:
    """The members of one voice connection (``by_user``) and their SSRC streams, on the clock."""

    def __init__(self, *, emitter: Emitter, streams: SsrcStreams, counters: ReceiveCounters,
                 on_idle: Callable[[int], None], idle_timeout: float, fill_after: float,
                 stall_fill_after: float) -> None:
        self._emitter = emitter
        self._streams = streams
        self._c = counters
        self._on_idle = on_idle
        self._idle_timeout = idle_timeout
        self._fill_after = fill_after
        self._stall_fill_after = stall_fill_after
        #: The members heard and not yet ended, by user id (looked up for every packet).
        self.by_user: dict[int, MemberTimeline] = {}

    def member(self, user_id: int, now: float) -> MemberTimeline:
        """The member's timeline; a new stream starts at ``now`` if they have none."""
        member = self.by_user.get(user_id)
        if member is None:
            member = MemberTimeline(user_id=user_id, emitted_until=now, started=now,
                                    last_packet=now)
            self.by_user[user_id] = member
        return member

    def open_ssrc(self, ssrc: int, user_id: int, now: float) -> SsrcState:
        """A new SSRC stream for the member (opening their timeline if needed)."""
        state = self._streams.open(ssrc, user_id, now)
        self.member(user_id, now).ssrcs.add(ssrc)
        return state

    def drop_ssrc(self, ssrc: int) -> None:
        """Close the SSRC stream (what its jitter buffer held counts as ``closed``)."""
        state = self._streams.close(ssrc)
        if state is not None:
            member = self.by_user.get(state.user_id)
            if member is not None:
                member.ssrcs.discard(ssrc)

    def forget(self, user_id: int, ssrcs: Iterable[int]) -> None:
        """Drop the member now, with their SSRCs: what was batched for them is never handed on
        (an opt-out), and ``on_idle`` is not called."""
        for ssrc in list(ssrcs):
            self.drop_ssrc(ssrc)
        self.by_user.pop(user_id, None)

    def tick(self, now: float) -> None:
        """Release stalled jitter buffers, fill silence in real time, end idle members."""
        for state in list(self._streams.by_ssrc.values()):
            if now - state.last_packet > self._fill_after:
                self._release(state, now)
        for member in list(self.by_user.values()):
            silent_for = now - member.last_packet
            if silent_for >= self._idle_timeout:
                self._end(member)
                continue
            # After Discord's end-of-spurt silence frames the pause is real: fill at once so the
            # STT hears it. Packets that merely stopped (network stall, lost end frames) may
            # resume mid-word, so wait much longer before inventing silence.
            threshold = self._fill_after if member.paused else self._stall_fill_after
            if silent_for > threshold:
                self._emitter.fill_silence(member, now)

    def drain(self, now: float) -> None:
        """No more packets will come: hand on what every jitter buffer holds, then end every
        member (``on_idle`` for each)."""
        for state in list(self._streams.by_ssrc.values()):
            self._release(state, now)
        for member in list(self.by_user.values()):
            self._end(member)

    def _release(self, state: SsrcState, now: float) -> None:
        """Everything the SSRC's jitter buffer holds, holes declared lost."""
        member = self.by_user.get(state.user_id)
        outs = state.jitter.drain()
        if member is not None:
            self._emitter.emit_all(state.decoder, member, outs, now)
        else:
            self._c.closed += sum(isinstance(out, Frame) for out in outs)

    def _end(self, member: MemberTimeline) -> None:
        del self.by_user[member.user_id]
        for ssrc in list(member.ssrcs):
            self.drop_ssrc(ssrc)
        try:
            self._emitter.flush(member)
        finally:  # the stream ends even if handing on its last audio failed
            self._on_idle(member.user_id)

"""Where every datagram a voice receiver was handed went: decoded, dropped by reason, waiting.

Its own module so both halves of the receive path (:mod:`bot.voice.receiver`, which routes
packets, and :mod:`bot.voice.timeline`, which turns them into each member's audio) count into
one :class:`ReceiveCounters`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


@dataclass(slots=True)
class ReceiveCounters:
    """Where every received datagram went, for logs and ``/transcribe status``.

    Each datagram the receiver was handed (``received``) is in exactly one bucket: ``decoded``
    or one of :data:`DROP_REASONS`, or still ``waiting`` (for its member's op 5, or in a
    jitter buffer for a hole before it): ``received == decoded + dropped + waiting``. The last
    three fields are not datagram buckets.
    """

    received: int = 0
    decoded: int = 0
    # -- dropped, by reason --
    #: RTCP sharing the voice socket (reports, not audio).
    rtcp: int = 0
    #: Not an RTP packet, or its header (CSRC list, extension header) runs past its end.
    malformed: int = 0
    #: Authenticated, but its padding or extension length does not fit the payload.
    bad_payload: int = 0
    other_payload_type: int = 0
    #: From a member who opted out (or the bot): dropped before any decryption.
    ignored: int = 0
    #: Arrived before the transport key (SESSION_DESCRIPTION).
    no_key: int = 0
    #: Failed transport authentication (wrong key, tampering, corruption, too short).
    bad_tag: int = 0
    #: DAVE could not decrypt it (reasons in ``DaveReceiver.stats``).
    dave_failed: int = 0
    #: Its SSRC was never named by an op 5 in time (held, then expired or crowded out).
    unknown_ssrc: int = 0
    duplicate: int = 0
    #: Arrived after its place in the timeline was concealed.
    late: int = 0
    #: Far outside its stream's sequence and not confirmed as a restart.
    stray: int = 0
    #: libopus refused it (or it was empty): concealed instead.
    undecodable: int = 0
    #: Would have put the member's audio ahead of the wall clock by more than the jitter window.
    too_fast: int = 0
    #: Still in a jitter buffer when its stream closed (reconnect, member left or opted out).
    closed: int = 0
    #: An unexpected error handling it (a bug; logged).
    internal_error: int = 0
    # -- not yet settled --
    waiting: int = 0
    # -- not datagrams --
    #: Missing 20 ms frames concealed (PLC, or recovered from in-band FEC).
    concealed_frames: int = 0
    #: Invented audio (silence, concealment) or excess decoded audio cut to keep members within
    #: the wall clock, in milliseconds.
    trimmed_ms: int = 0
    #: Losses whose length was not whole 2.5 ms units (timestamps off Opus' grid): concealed to
    #: the grid, the rest filled with silence.
    repaired_gaps: int = 0
    #: Datagrams dropped by the voice client before the receiver saw them (inbox full).
    inbox_dropped: int = 0
    #: Datagrams the kernel dropped because the socket's receive buffer was full (the loop was
    #: busy for longer than it holds; Linux only, from /proc/net/udp).
    socket_dropped: int = 0

    def drops(self) -> dict[str, int]:
        """Dropped datagrams by reason, only the reasons that happened."""
        return {name: getattr(self, name) for name in DROP_REASONS if getattr(self, name)}

    @property
    def dropped(self) -> int:
        return sum(getattr(self, name) for name in DROP_REASONS)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        """One line for ``/transcribe status``: decoded, drops by reason, trimmed audio."""
        parts = [f"{self.decoded:,} decoded"]
        drops = self.drops()
        if drops:
            reasons = ", ".join(f"{name.replace('_', ' ')} {n:,}" for name, n in drops.items())
            parts.append(f"{self.dropped:,} dropped ({reasons})")
        else:
            parts.append("none dropped")
        if self.inbox_dropped:
            parts.append(f"{self.inbox_dropped:,} lost to a full inbox")
        if self.socket_dropped:
            parts.append(f"{self.socket_dropped:,} lost to a full socket buffer")
        if self.concealed_frames:
            parts.append(f"{self.concealed_frames:,} lost frames concealed")
        if self.repaired_gaps:
            parts.append(f"{self.repaired_gaps:,} off-grid gaps repaired")
        if self.trimmed_ms:
            parts.append(f"{self.trimmed_ms / 1000:.1f} s of audio trimmed to real time")
        return "voice packets: " + "; ".join(parts)


#: The drop buckets of :class:`ReceiveCounters`, in field order.
DROP_REASONS: tuple[str, ...] = tuple(
    f.name for f in fields(ReceiveCounters)
    if f.name not in ("received", "decoded", "waiting", "concealed_frames", "trimmed_ms",
                      "repaired_gaps", "inbox_dropped")
)

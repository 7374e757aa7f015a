"""RTP packets as Discord voice sends them: parse and recognise RTCP (receive side only).

Pure and sans-IO: bytes in, values out. This module knows the RTP wire layout (RFC 3550) and
the split Discord's ``*_rtpsize`` AEAD modes make of it; it knows nothing of keys or ciphers
(see :mod:`bot.voice.crypto`) nor of Opus or DAVE. Building packets is the send side, which
only the loopback Discord, benchmarks and tests need: :mod:`bot.sim.sender`.

Layout of one voice packet in the ``_rtpsize`` modes (read from discord.py 2.7.1
``VoiceClient._get_voice_packet`` and Discord's voice documentation)::

    clear (AAD)   | 12-byte RTP header | CSRCs (4 * CC) | [BE DE len16]  <- RtpPacket.header
    encrypted     | extension body (4 * len) | DAVE frame or Opus       \\
    clear         | AEAD tag (16)            | nonce suffix (4, BE)      >- RtpPacket.body

The extension *header* is authenticated in clear but its *body* is encrypted with the payload,
so the parser cannot check the extension body against the packet: after decryption,
:func:`strip_extension_body` drops it. Discord's RTCP (sender/receiver reports) arrives on the
same UDP socket; :func:`is_rtcp` lets a receiver skip it before parsing.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bot.errors import VoiceError

#: RFC 3550 section 5.1: the fixed header is 12 bytes; version is always 2.
RTP_HEADER_SIZE = 12
RTP_VERSION = 2
#: Discord's Opus payload type (``header[1] = 0x78`` in discord.py's ``_get_voice_packet``).
DISCORD_OPUS_PAYLOAD_TYPE = 0x78
#: RFC 8285 section 4.2: the one-byte-form header extension profile ``0xBEDE``.
ONE_BYTE_EXTENSION_PROFILE = 0xBEDE
#: RFC 3550 section 12.1: RTCP packet types SR=200, RR=201, SDES=202, BYE=203, APP=204. Their
#: second byte collides with an RTP marker bit + payload type 72..76, which Discord never uses.
RTCP_PACKET_TYPES = range(200, 205)

_FIXED = struct.Struct(">BBHII")
_EXT_HEADER = struct.Struct(">HH")


class MalformedPacket(VoiceError):
    """A datagram from Discord that is not a usable RTP packet (the peer's fault; skip it)."""


@dataclass(frozen=True, slots=True)
class RtpPacket:
    """One received RTP packet, split into the clear header (the AAD) and the rest."""

    version: int
    padding: bool
    marker: bool
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    csrcs: tuple[int, ...]
    has_extension: bool
    extension_profile: int | None
    #: Length of the (encrypted) extension body in 32-bit words; 0 without an extension.
    extension_words: int
    #: Everything sent in clear: fixed header, CSRCs and the 4-byte extension header if any.
    header: bytes
    #: The rest: ciphertext (extension body + payload) with its tag, then the nonce suffix.
    body: bytes


def is_rtcp(data: bytes) -> bool:
    """True for an RTCP packet (SR/RR/SDES/BYE/APP) sharing the voice socket; receivers skip it."""
    return len(data) >= 2 and data[0] >> 6 == RTP_VERSION and data[1] in RTCP_PACKET_TYPES


#: First bytes of the common packet: version 2 with only the extension bit (0x90) or nothing
#: (0x80) set: no padding, no CSRCs.
_B0_EXTENSION = 0x90
_B0_PLAIN = 0x80
#: The extension header plus at least a 4-byte nonce suffix: shorter is never the common shape.
_COMMON_MIN_SIZE = RTP_HEADER_SIZE + 4


def common_opus_header(data: bytes) -> tuple[int, int, int, int, int] | None:
    """``(sequence, timestamp, ssrc, header_size, extension_words)`` of the datagram Discord
    sends nearly always (version 2, Opus payload type, no padding, CSRCs or marker, at most the
    extension header), read with one ``struct`` call and no :class:`RtpPacket`; None for
    anything else, which :func:`parse_rtp` then judges."""
    if type(data) is not bytes or len(data) < _COMMON_MIN_SIZE:
        return None
    b0, b1, sequence, timestamp, ssrc = _FIXED.unpack_from(data)
    if b1 != DISCORD_OPUS_PAYLOAD_TYPE:
        return None
    if b0 == _B0_EXTENSION:
        return (sequence, timestamp, ssrc, RTP_HEADER_SIZE + 4,
                _EXT_HEADER.unpack_from(data, RTP_HEADER_SIZE)[1])
    if b0 == _B0_PLAIN:
        return sequence, timestamp, ssrc, RTP_HEADER_SIZE, 0
    return None


def parse_rtp(data: bytes) -> RtpPacket:
    """Split a received datagram into header fields, clear header and body.

    Raises :class:`MalformedPacket` when it is too short, not version 2, or its CSRC list or
    extension header runs past the end.
    """
    if type(data) is not bytes:  # bytearray/memoryview: one copy so slices are bytes (PyNaCl)
        data = bytes(data)
    size = len(data)
    if size < RTP_HEADER_SIZE:
        raise MalformedPacket(f"RTP packet too short ({size} bytes)")
    b0, b1, sequence, timestamp, ssrc = _FIXED.unpack_from(data)
    version = b0 >> 6
    if version != RTP_VERSION:
        raise MalformedPacket(f"RTP version {version}, expected 2")
    csrc_count = b0 & 0x0F
    offset = RTP_HEADER_SIZE + 4 * csrc_count
    if offset > size:
        raise MalformedPacket(f"CSRC list ({csrc_count}) runs past the end ({size} bytes)")
    csrcs = struct.unpack_from(f">{csrc_count}I", data, RTP_HEADER_SIZE) if csrc_count else ()
    has_extension = bool(b0 & 0x10)
    profile: int | None = None
    words = 0
    if has_extension:
        if offset + 4 > size:
            raise MalformedPacket("extension header runs past the end")
        profile, words = _EXT_HEADER.unpack_from(data, offset)
        offset += 4
    return RtpPacket(
        version=version,
        padding=bool(b0 & 0x20),
        marker=bool(b1 & 0x80),
        payload_type=b1 & 0x7F,
        sequence=sequence,
        timestamp=timestamp,
        ssrc=ssrc,
        csrcs=csrcs,
        has_extension=has_extension,
        extension_profile=profile,
        extension_words=words,
        header=data[:offset],
        body=data[offset:],
    )


def strip_extension_body(plaintext: bytes, packet: RtpPacket) -> bytes:
    """The DAVE/Opus frame from a decrypted ``_rtpsize`` payload.

    The first ``4 * extension_words`` bytes are the header extension body (encrypted with the
    payload in these modes). With the RTP padding bit set, the last byte counts padding bytes
    (RFC 3550 section 5.1) and those are dropped too. Raises :class:`MalformedPacket` when the
    lengths do not fit.
    """
    return strip_payload(plaintext, packet.extension_words, packet.padding)


def strip_payload(plaintext: bytes, extension_words: int, padding: bool) -> bytes:
    """:func:`strip_extension_body` from the header fields alone (the receiver's fast path
    reads them without building an :class:`RtpPacket`)."""
    start = 4 * extension_words
    end = len(plaintext)
    if start > end:
        raise MalformedPacket(f"extension body ({start} bytes) longer than the payload ({end})")
    if padding:
        pad = plaintext[-1] if end else 0
        if pad == 0 or start + pad > end:
            raise MalformedPacket(f"invalid RTP padding count {pad}")
        end -= pad
    if start == 0 and end == len(plaintext):
        return plaintext
    return plaintext[start:end]


def extension_body(plaintext: bytes, packet: RtpPacket) -> bytes:
    """The decrypted header extension body (e.g. to read the audio level); empty without one."""
    return plaintext[: 4 * packet.extension_words]

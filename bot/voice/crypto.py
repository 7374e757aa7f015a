"""Discord voice transport encryption (the ``*_rtpsize`` AEAD modes): decrypt and encrypt.

Pure: packets in, plaintext out; no sockets. This is the transport layer under DAVE: it uses
the 32-byte ``secret_key`` from SESSION_DESCRIPTION (voice op 4) and yields the DAVE frame (or
plain Opus with DAVE off). The layout is the one discord.py 2.7.1's
``VoiceClient._encrypt_aead_xchacha20_poly1305_rtpsize`` writes::

    header (clear, AAD) | AEAD(ext body + payload) incl. 16-byte tag | nonce counter (4, BE)

The nonce is the 4-byte counter followed by zeros: 12 bytes for AES-256-GCM, 24 for
XChaCha20-Poly1305. Ciphers are chosen from a dict of mode -> implementation, never by
``getattr`` on a mode string, and each :class:`TransportCipher` keeps its cipher object for
its key (one per voice connection), so nothing is rebuilt per packet.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

import nacl.exceptions
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)

from bot.errors import VoiceError
from bot.voice.rtp import MalformedPacket, RtpPacket, strip_extension_body, strip_payload

MODE_AES256_GCM = "aead_aes256_gcm_rtpsize"
MODE_XCHACHA20 = "aead_xchacha20_poly1305_rtpsize"
#: Modes we accept, in preference order (Discord's documentation prefers AES-256-GCM).
SUPPORTED_MODES: tuple[str, ...] = (MODE_AES256_GCM, MODE_XCHACHA20)

#: Discord voice: SESSION_DESCRIPTION's ``secret_key`` is 32 bytes for both modes.
SECRET_KEY_SIZE = 32
#: The nonce counter appended to each packet (discord.py: ``nonce[:4]``, big-endian).
NONCE_SUFFIX_SIZE = 4
#: Poly1305 and GCM tags are both 16 bytes.
TAG_SIZE = 16
_MAX_NONCE = 0xFFFFFFFF

_U32 = struct.Struct(">I")
_PAD_12 = bytes(12 - NONCE_SUFFIX_SIZE)
_PAD_24 = bytes(24 - NONCE_SUFFIX_SIZE)


class DecryptError(VoiceError):
    """A packet failed authentication (wrong key, tampering, corruption) or is too short."""


class UnsupportedMode(VoiceError):
    """Discord offered or chose a transport mode we do not implement."""

    permanent = True


class _Aead(Protocol):
    def decrypt(self, suffix: bytes, ciphertext: bytes, aad: bytes) -> bytes: ...

    def encrypt(self, suffix: bytes, plaintext: bytes, aad: bytes) -> bytes: ...


class _AesGcm:
    """AES-256-GCM with a 12-byte nonce; one ``AESGCM`` object per key, reused."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)

    def decrypt(self, suffix: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(suffix + _PAD_12, ciphertext, aad)
        except InvalidTag:
            raise DecryptError("AES-GCM authentication failed") from None

    def encrypt(self, suffix: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(suffix + _PAD_12, plaintext, aad)


class _XChaCha20:
    """XChaCha20-Poly1305 (IETF) with a 24-byte nonce, through libsodium (PyNaCl)."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        self._key = key

    def decrypt(self, suffix: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        try:
            return crypto_aead_xchacha20poly1305_ietf_decrypt(
                ciphertext, aad, suffix + _PAD_24, self._key
            )
        except nacl.exceptions.CryptoError:
            raise DecryptError("XChaCha20-Poly1305 authentication failed") from None

    def encrypt(self, suffix: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return crypto_aead_xchacha20poly1305_ietf_encrypt(
            plaintext, aad, suffix + _PAD_24, self._key
        )


_IMPLEMENTATIONS: dict[str, Callable[[bytes], _Aead]] = {
    MODE_AES256_GCM: _AesGcm,
    MODE_XCHACHA20: _XChaCha20,
}


def choose_mode(offered: list[str] | tuple[str, ...]) -> str:
    """Our preferred mode among those Discord offers in READY; :class:`UnsupportedMode` if none."""
    for mode in SUPPORTED_MODES:
        if mode in offered:
            return mode
    raise UnsupportedMode(f"no supported voice encryption mode among {list(offered)}")


class TransportCipher:
    """Decrypts (and, for senders, encrypts) voice packets for one mode and secret key."""

    __slots__ = ("mode", "_impl")

    def __init__(self, mode: str, secret_key: bytes) -> None:
        factory = _IMPLEMENTATIONS.get(mode)
        if factory is None:
            raise UnsupportedMode(f"unsupported voice encryption mode {mode!r}")
        key = bytes(secret_key)
        if len(key) != SECRET_KEY_SIZE:
            raise VoiceError(
                f"voice secret key must be {SECRET_KEY_SIZE} bytes, got {len(key)}",
                permanent=True,
            )
        self.mode = mode
        self._impl = factory(key)

    def __repr__(self) -> str:  # never show the key
        return f"TransportCipher({self.mode!r})"

    def decrypt(self, packet: RtpPacket) -> bytes:
        """The DAVE/Opus frame of ``packet`` (extension body and RTP padding removed).

        Raises :class:`DecryptError` on a bad tag or a body too short to hold tag and nonce,
        :class:`~bot.voice.rtp.MalformedPacket` when the decrypted lengths do not fit.
        """
        return strip_extension_body(self.decrypt_raw(packet), packet)

    def decrypt_raw(self, packet: RtpPacket) -> bytes:
        """The whole decrypted payload, extension body included (to read e.g. audio levels)."""
        body = packet.body
        if len(body) < TAG_SIZE + NONCE_SUFFIX_SIZE:
            raise DecryptError(f"encrypted body too short ({len(body)} bytes)")
        return self._impl.decrypt(
            body[-NONCE_SUFFIX_SIZE:], body[:-NONCE_SUFFIX_SIZE], packet.header
        )

    def decrypt_datagram(self, data: bytes, header_size: int, extension_words: int,
                         padding: bool = False) -> bytes:
        """:meth:`decrypt` of a whole datagram whose clear header is ``data[:header_size]``:
        the same checks and result, without an :class:`RtpPacket` (the receiver's fast path).
        """
        if len(data) - header_size < TAG_SIZE + NONCE_SUFFIX_SIZE:
            raise DecryptError(f"encrypted body too short ({len(data) - header_size} bytes)")
        plain = self._impl.decrypt(data[-NONCE_SUFFIX_SIZE:], data[header_size:-NONCE_SUFFIX_SIZE],
                                   data[:header_size])
        if padding:
            return strip_payload(plain, extension_words, padding)
        start = 4 * extension_words  # strip_payload without padding, inlined (every packet)
        if start > len(plain):
            raise MalformedPacket(f"extension body ({start} bytes) longer than the payload")
        return plain[start:] if start else plain

    def encrypt(self, header: bytes, ext_body: bytes, payload: bytes, nonce: int) -> bytes:
        """The full packet exactly as Discord/discord.py send it.

        ``header`` and ``ext_body`` come from the send side (:mod:`bot.sim.sender`); ``nonce``
        is the sender's 32-bit counter (incremented per packet, never reused with one key).
        """
        if not 0 <= nonce <= _MAX_NONCE:
            raise ValueError(f"nonce {nonce} out of 32-bit range")
        suffix = _U32.pack(nonce)
        plaintext = ext_body + payload if ext_body else payload
        return b"".join((header, self._impl.encrypt(suffix, plaintext, header), suffix))


def nonce_of(packet: RtpPacket) -> int:
    """The sender's nonce counter of ``packet`` (clear, unauthenticated until decrypted)."""
    if len(packet.body) < NONCE_SUFFIX_SIZE:
        raise DecryptError("packet has no nonce suffix")
    return int(_U32.unpack_from(packet.body, len(packet.body) - NONCE_SUFFIX_SIZE)[0])


@dataclass(slots=True)
class PacketCounters:
    """What happened to received datagrams, for logs and the status command (one per connection)."""

    received: int = 0
    rtcp: int = 0
    malformed: int = 0
    bad_tag: int = 0
    decrypted: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

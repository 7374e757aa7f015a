"""Reference prototype: the receive path with no Python around libopus, against the product.

The product (:class:`bot.voice.receiver.VoiceReceiver`) now takes the same in-order fast path
this prototype showed: one ``struct`` unpack of the fixed header, no ``RtpPacket`` and no
jitter-buffer outputs for the packet due next, Opus decoded by ``OpusDecoder.decode_into``
straight into the member's buffer, handed on in whole 100 ms chunks (``batch_ms``). What it
keeps and this prototype does not, and what the ~2-3 µs per packet still between them pays for:
the jitter buffer's bookkeeping (``push_in_order``), the wall-clock bound (``too_fast``,
trimming), silence fill and idle ends on ``tick`` (this ``tick`` does nothing), the opt-out
check before decryption, the receive counters, SPEAKING-pending packets, RTCP, padding and CSRC
packets, and an exception guard per packet. Kept as the reference: a contender for row 1
(``lean (prototype)``) and row 2e (``lean``), to show what is left above the floor.
:class:`LeanReceiver` unpacks the header, looks the SSRC up in a dict, makes the same AEAD and
davey calls and calls ``opus_decode`` through ctypes at the chunk buffer's fill offset, so the
only object made per 100 ms is the chunk's ``bytes``; anything out of order is only counted.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Callable
from typing import Any, Final

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

from bot.voice import opus as opus_mod
from bot.voice.crypto import MODE_AES256_GCM

OPUS_PAYLOAD_TYPE: Final = 120
_FIXED = struct.Struct(">BBHII")
_PAD12 = bytes(8)
_PAD24 = bytes(20)
#: Room after a full chunk for the largest Opus packet (120 ms) at 48 kHz.
_SLACK_SAMPLES: Final = 5760


class _Ssrc:
    __slots__ = ("buf", "cap", "chunk", "decoder", "expected", "fill", "ptr", "user_id")

    def __init__(self, lib: Any, rate: int, chunk_samples: int, user_id: int) -> None:
        err = ctypes.c_int(0)
        self.decoder = lib.opus_decoder_create(rate, 1, ctypes.byref(err))
        if err.value != 0 or not self.decoder:
            raise RuntimeError(f"opus_decoder_create failed: {err.value}")
        self.chunk = chunk_samples
        self.buf = (ctypes.c_int16 * (chunk_samples + _SLACK_SAMPLES))()
        self.ptr = ctypes.addressof(self.buf)
        self.cap = chunk_samples + _SLACK_SAMPLES
        self.fill = 0
        self.expected = -1
        self.user_id = user_id


class LeanReceiver:
    """In-order packets -> 16-bit mono chunks of ``chunk_ms``, handed to ``on_chunk``."""

    def __init__(self, *, mode: str, secret_key: bytes, users: dict[int, int],
                 on_chunk: Callable[[int, bytes], None], rate: int = 16000,
                 chunk_ms: int = 100, dave_session: Any = None,
                 clock: Callable[[], float] | None = None) -> None:
        self._lib = opus_mod._load()
        self._rate = rate
        self._chunk = rate * chunk_ms // 1000
        self._users = users  # ssrc -> user id (from SPEAKING)
        self._on_chunk = on_chunk
        self._states: dict[int, _Ssrc] = {}
        if mode == MODE_AES256_GCM:
            aes = AESGCM(secret_key)
            self._decrypt: Callable[[bytes, bytes, bytes], bytes] = (
                lambda suffix, ct, aad: aes.decrypt(suffix + _PAD12, ct, aad))
        else:
            key = secret_key
            self._decrypt = (lambda suffix, ct, aad: crypto_aead_xchacha20poly1305_ietf_decrypt(
                ct, aad, suffix + _PAD24, key))
        self._dave = dave_session
        if dave_session is not None:
            import davey
            self._audio = davey.MediaType.audio
        self.out_of_order = 0
        #: With a ``clock`` (row 2u): wall time spent in ``opus_decode`` and the packets it
        #: decoded, to set libopus in a real-time loop beside the bench's tight-loop floor.
        self._clock = clock
        self.decode_s = 0.0
        self.decoded = 0

    def handle_packet(self, data: bytes, now: float) -> None:
        b0, b1, seq, _ts, ssrc = _FIXED.unpack_from(data)
        if b0 & 0xC0 != 0x80 or b1 & 0x7F != OPUS_PAYLOAD_TYPE:
            return
        st = self._states.get(ssrc)
        if st is None:
            user = self._users.get(ssrc)
            if user is None:
                return
            st = self._states[ssrc] = _Ssrc(self._lib, self._rate, self._chunk, user)
        if seq != st.expected and st.expected >= 0:
            self.out_of_order += 1  # the shipped version: to the jitter buffer instead
        st.expected = (seq + 1) & 0xFFFF
        off = 12 + 4 * (b0 & 0x0F)
        words = 0
        if b0 & 0x10:
            words = int.from_bytes(data[off + 2 : off + 4], "big")
            off += 4
        plain = self._decrypt(data[-4:], data[off:-4], data[:off])
        frame = plain[4 * words :] if words else plain
        if self._dave is not None:
            frame = self._dave.decrypt(st.user_id, self._audio, frame)
        fill = st.fill
        clock = self._clock
        if clock is None:
            n = self._lib.opus_decode(st.decoder, frame, len(frame), st.ptr + 2 * fill,
                                      st.cap - fill, 0)
        else:
            t = clock()
            n = self._lib.opus_decode(st.decoder, frame, len(frame), st.ptr + 2 * fill,
                                      st.cap - fill, 0)
            self.decode_s += clock() - t
            self.decoded += 1
        if n < 0:
            return
        fill += n
        if fill >= st.chunk:
            size = 2 * st.chunk
            self._on_chunk(st.user_id, ctypes.string_at(st.ptr, size))
            fill -= st.chunk
            if fill:
                ctypes.memmove(st.ptr, st.ptr + size, 2 * fill)
        st.fill = fill

    def tick(self, now: float) -> None:
        """Nothing to release: in-order packets are decoded as they come."""

    def close(self) -> None:
        for st in self._states.values():
            self._lib.opus_decoder_destroy(st.decoder)
        self._states.clear()

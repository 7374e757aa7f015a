"""The send side of Discord voice: Opus encoding and RTP headers as a Discord client makes them.

Used only by the loopback Discord (:mod:`bot.sim.discord.voice`), the benchmarks and the tests;
the bot itself only receives, so none of this is in the product's voice modules
(:mod:`bot.voice.opus` decodes, :mod:`bot.voice.rtp` parses). Transport encryption of a built
packet is :meth:`bot.voice.crypto.TransportCipher.encrypt` (the bot also sends with it).

Pure: PCM and numbers in, bytes out; the encoder uses the libopus that :mod:`bot.voice.opus`
loads.
"""

from __future__ import annotations

import ctypes
import struct
from collections.abc import Iterable
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

from bot.voice.opus import (
    DISCORD_CHANNELS,
    DISCORD_SAMPLE_RATE,
    OPUS_SAMPLE_RATES,
    OpusError,
    load_libopus,
)
from bot.voice.rtp import (
    DISCORD_OPUS_PAYLOAD_TYPE,
    ONE_BYTE_EXTENSION_PROFILE,
    RTP_VERSION,
    MalformedPacket,
)

__all__ = [
    "AUDIO_LEVEL_EXTENSION_ID",
    "OpusEncoder",
    "audio_level_extension",
    "build_rtp_header",
    "one_byte_extension",
    "parse_one_byte_extension",
]

#: Extension id Discord's clients use for the RFC 6464 client-to-mixer audio level.
AUDIO_LEVEL_EXTENSION_ID: Final = 1
#: RFC 8285 one-byte form: ids 1..14 carry data (0 is padding, 15 is reserved), 1..16 bytes each.
ONE_BYTE_MAX_ID: Final = 14
ONE_BYTE_MAX_DATA: Final = 16

_FIXED = struct.Struct(">BBHII")
_EXT_HEADER = struct.Struct(">HH")
_U32 = struct.Struct(">I")

# --- Opus encoder ----------------------------------------------------------------------------

#: Largest packet we ask the encoder for; libopus docs recommend 4000 bytes (opus_encode).
MAX_PACKET_BYTES: Final = 4000
OPUS_OK: Final = 0
OPUS_BAD_ARG: Final = -1
# Applications (opus_defines.h OPUS_APPLICATION_*).
_APPLICATIONS: Final[dict[str, int]] = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
# Encoder CTL requests (opus_defines.h); values as discord.py's Encoder sets them.
_SET_BITRATE: Final = 4002
_SET_BANDWIDTH: Final = 4008
_SET_INBAND_FEC: Final = 4012
_SET_PACKET_LOSS_PERC: Final = 4014
_SET_SIGNAL: Final = 4024
_BANDWIDTH_FULLBAND: Final = 1105
_SIGNAL_AUTO: Final = -1000
#: Bitrate bounds accepted by OPUS_SET_BITRATE (opus_encoder.c: 500 b/s .. 512 kb/s; we ask 6k+).
_MIN_BITRATE: Final = 6000
_MAX_BITRATE: Final = 512000

_VP = ctypes.c_void_p
_INT = ctypes.c_int
_I32 = ctypes.c_int32
_INT_PTR = ctypes.POINTER(ctypes.c_int)
_declared = False


def _encoder_lib() -> ctypes.CDLL:
    """libopus with the encoder functions declared (opus_encoder_ctl is variadic: no argtypes)."""
    global _declared
    lib = load_libopus()
    if not _declared:
        lib.opus_encoder_create.argtypes = [_I32, _INT, _INT, _INT_PTR]
        lib.opus_encoder_create.restype = _VP
        lib.opus_encoder_destroy.argtypes = [_VP]
        lib.opus_encoder_destroy.restype = None
        lib.opus_encode.argtypes = [_VP, _VP, _INT, _VP, _I32]
        lib.opus_encode.restype = _I32
        lib.opus_encoder_ctl.restype = _INT
        _declared = True
    return lib


class OpusEncoder:
    """Encode PCM frames as a Discord client does (tests, the loopback Discord, benchmarks).

    Settings follow discord.py's ``Encoder``: full band, automatic signal type, in-band FEC
    with an expected packet loss. ``bitrate`` is in bits per second.
    """

    def __init__(
        self,
        sample_rate: int = DISCORD_SAMPLE_RATE,
        channels: int = DISCORD_CHANNELS,
        *,
        application: Literal["audio", "voip", "lowdelay"] = "audio",
        bitrate: int = 64000,
        fec: bool = True,
        packet_loss_percent: int = 5,
    ) -> None:
        if sample_rate not in OPUS_SAMPLE_RATES or channels not in (1, 2):
            raise ValueError(f"Opus needs a rate in {OPUS_SAMPLE_RATES} and 1 or 2 channels, "
                             f"got {sample_rate} Hz, {channels} channel(s)")
        if application not in _APPLICATIONS:
            raise ValueError(f"application must be one of {sorted(_APPLICATIONS)}")
        if not _MIN_BITRATE <= bitrate <= _MAX_BITRATE:
            raise ValueError(f"bitrate must be {_MIN_BITRATE}..{_MAX_BITRATE} b/s, got {bitrate}")
        if not 0 <= packet_loss_percent <= 100:
            raise ValueError(f"packet_loss_percent must be 0..100, got {packet_loss_percent}")
        lib = _encoder_lib()
        self.sample_rate: Final = sample_rate
        self.channels: Final = channels
        err = ctypes.c_int(0)
        state = lib.opus_encoder_create(
            sample_rate, channels, _APPLICATIONS[application], ctypes.byref(err)
        )
        if err.value != OPUS_OK or not state:
            raise OpusError(err.value or OPUS_BAD_ARG, "opus_encoder_create")
        self._state: int | None = state
        self._encode = lib.opus_encode
        self._destroy = lib.opus_encoder_destroy
        self._ctl_fn = lib.opus_encoder_ctl
        self._out = ctypes.create_string_buffer(MAX_PACKET_BYTES)
        self._out_ptr = ctypes.addressof(self._out)
        # Durations libopus accepts: 2.5, 5, 10, 20, 40, 60 ms (opus_encode docs).
        self._frame_sizes = frozenset(sample_rate * t // 400 for t in (1, 2, 4, 8, 16, 24))
        self._ctl(_SET_BITRATE, bitrate)
        self._ctl(_SET_INBAND_FEC, 1 if fec else 0)
        self._ctl(_SET_PACKET_LOSS_PERC, packet_loss_percent)
        self._ctl(_SET_BANDWIDTH, _BANDWIDTH_FULLBAND)
        self._ctl(_SET_SIGNAL, _SIGNAL_AUTO)

    def _ctl(self, request: int, value: int) -> None:
        ret = self._ctl_fn(_VP(self._live_state()), _INT(request), _I32(value))
        if ret < 0:
            raise OpusError(ret, f"opus_encoder_ctl({request})")

    def _live_state(self) -> int:
        if self._state is None:
            raise ValueError("this OpusEncoder is closed")
        return self._state

    def close(self) -> None:
        """Free the libopus state; safe to call twice."""
        state, self._state = self._state, None
        if state:
            self._destroy(state)

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self.close()

    def __enter__(self) -> OpusEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, pcm: npt.NDArray[np.int16]) -> bytes:
        """Encode exactly one frame: int16, interleaved 1-D or shaped (samples, channels)."""
        if not isinstance(pcm, np.ndarray) or pcm.dtype != np.int16:
            raise TypeError("encode needs a numpy int16 array")
        if pcm.ndim == 2 and pcm.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {pcm.shape}")
        frame = np.ascontiguousarray(pcm)
        frame_size, rem = divmod(frame.size, self.channels)
        if rem or frame_size not in self._frame_sizes:
            ms = sorted(f * 1000 / self.sample_rate for f in self._frame_sizes)
            raise ValueError(
                f"one Opus frame is {', '.join(f'{m:g}' for m in ms)} ms; got {frame.size} "
                f"samples for {self.channels} channel(s) at {self.sample_rate} Hz"
            )
        n: int = self._encode(
            self._live_state(), frame.ctypes.data, frame_size, self._out_ptr, MAX_PACKET_BYTES
        )
        if n < 0:
            raise OpusError(n, "opus_encode")
        return ctypes.string_at(self._out_ptr, n)


# --- RTP headers -----------------------------------------------------------------------------


def build_rtp_header(
    sequence: int,
    timestamp: int,
    ssrc: int,
    *,
    payload_type: int = DISCORD_OPUS_PAYLOAD_TYPE,
    marker: bool = False,
    csrcs: Iterable[int] = (),
    extension: bytes | None = None,
) -> tuple[bytes, bytes]:
    """``(clear header, extension body)`` as a Discord client sends them.

    ``extension`` is a one-byte-form body (see :func:`one_byte_extension`) whose length is a
    multiple of 4; the clear header then ends with ``BE DE len``. Encrypt the extension body
    together with the payload (:meth:`bot.voice.crypto.TransportCipher.encrypt`).
    """
    csrc_list = tuple(csrcs)
    if not 0 <= sequence <= 0xFFFF:
        raise ValueError(f"sequence {sequence} out of 16-bit range")
    if not 0 <= timestamp <= 0xFFFFFFFF or not 0 <= ssrc <= 0xFFFFFFFF:
        raise ValueError("timestamp and ssrc must fit in 32 bits")
    if not 0 <= payload_type <= 0x7F:
        raise ValueError(f"payload type {payload_type} out of 7-bit range")
    if len(csrc_list) > 15:
        raise ValueError("at most 15 CSRCs fit in an RTP header")
    b0 = RTP_VERSION << 6 | len(csrc_list)
    ext = b""
    if extension is not None:
        if len(extension) % 4:
            raise ValueError("extension body must be padded to a multiple of 4 bytes")
        if len(extension) // 4 > 0xFFFF:
            raise ValueError("extension body too long")
        b0 |= 0x10
        ext = _EXT_HEADER.pack(ONE_BYTE_EXTENSION_PROFILE, len(extension) // 4)
    header = b"".join(
        (
            _FIXED.pack(b0, (0x80 if marker else 0) | payload_type, sequence, timestamp, ssrc),
            b"".join(_U32.pack(c) for c in csrc_list),
            ext,
        )
    )
    return header, extension or b""


def one_byte_extension(elements: Iterable[tuple[int, bytes]]) -> bytes:
    """An RFC 8285 one-byte-form extension body from ``(id, data)`` pairs, zero-padded to 4."""
    out = bytearray()
    for ext_id, data in elements:
        if not 1 <= ext_id <= ONE_BYTE_MAX_ID:
            raise ValueError(f"one-byte extension id {ext_id} not in 1..{ONE_BYTE_MAX_ID}")
        if not 1 <= len(data) <= ONE_BYTE_MAX_DATA:
            raise ValueError(f"one-byte extension data must be 1..{ONE_BYTE_MAX_DATA} bytes")
        out.append(ext_id << 4 | (len(data) - 1))
        out += data
    out += bytes(-len(out) % 4)
    return bytes(out)


def audio_level_extension(level_dbov: int, *, voice: bool = True) -> bytes:
    """The extension body Discord's clients send: RFC 6464 audio level (id 1), padded to 4.

    ``level_dbov`` is the level as a positive number of -dBov (0 loudest, 127 silence).
    """
    if not 0 <= level_dbov <= 127:
        raise ValueError("audio level must be 0..127 (-dBov)")
    level = bytes([(0x80 if voice else 0) | level_dbov])
    return one_byte_extension([(AUDIO_LEVEL_EXTENSION_ID, level)])


def parse_one_byte_extension(body: bytes) -> dict[int, bytes]:
    """``{id: data}`` from a decrypted one-byte-form extension body (RFC 8285 section 4.2).

    Padding bytes (id 0) are skipped; id 15 ends parsing as the RFC requires. Raises
    :class:`~bot.voice.rtp.MalformedPacket` when an element runs past the end.
    """
    out: dict[int, bytes] = {}
    i, size = 0, len(body)
    while i < size:
        b = body[i]
        ext_id = b >> 4
        if ext_id == 0:
            i += 1
            continue
        if ext_id == 15:
            break
        length = (b & 0x0F) + 1
        if i + 1 + length > size:
            raise MalformedPacket(f"extension element {ext_id} runs past the end")
        out[ext_id] = body[i + 1 : i + 1 + length]
        i += 1 + length
    return out

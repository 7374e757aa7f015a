"""Our own ctypes binding to libopus: decode Discord's Opus straight to the rate we need.

Job: turn one Opus packet into int16 PCM (mono or stereo) at any rate libopus decodes natively
(8, 12, 16, 24 or 48 kHz), conceal lost packets (PLC) and recover a lost packet from the next
packet's in-band FEC. (The send side, an encoder, serves only the loopback Discord, benchmarks
and tests: :mod:`bot.sim.sender`.)

Boundary: packets in, PCM out. No sockets, no timers, no RTP; the jitter buffer decides *when*
to decode, conceal or use FEC. Errors are :class:`OpusError` (libopus said no) and
:class:`OpusNotAvailable` (the shared library is missing).

Why not ``discord.opus.Decoder``: it is fixed at 48 kHz stereo and allocates a ctypes array per
call. Decoding 48 kHz stereo and then downmixing and resampling to 16 kHz mono costs six times
the samples; libopus can produce 16 kHz mono itself. This module is on the per-packet hot path,
so each decoder keeps a preallocated output buffer, the ctypes function pointers are resolved
once, and error checks are inline (no ``errcheck`` callbacks).

Constants come from ``opus_defines.h`` (libopus 1.3/1.4) unless noted.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from bot.errors import VoiceError

__all__ = [
    "DISCORD_CHANNELS",
    "DISCORD_SAMPLE_RATE",
    "FRAME_MS",
    "MAX_FRAME_MS",
    "OPUS_SAMPLE_RATES",
    "OPUS_SILENCE_FRAME",
    "OpusDecoder",
    "OpusError",
    "OpusNotAvailable",
    "decode_rate",
    "libopus_version",
    "load_libopus",
]

_log = logging.getLogger(__name__)

#: Rates libopus decodes and encodes natively (RFC 6716 section 2; opus_decoder_create docs).
OPUS_SAMPLE_RATES: Final = (8000, 12000, 16000, 24000, 48000)
#: What Discord voice sends: 48 kHz stereo in 20 ms frames (Discord voice docs; discord/opus.py).
DISCORD_SAMPLE_RATE: Final = 48000
DISCORD_CHANNELS: Final = 2
FRAME_MS: Final = 20
#: Longest Opus packet: 120 ms (RFC 6716 section 3.2.5, up to 48 frames of 2.5 ms).
MAX_FRAME_MS: Final = 120
#: The 3-byte frame Discord sends after a speaker stops (five of them), a CELT silence frame.
OPUS_SILENCE_FRAME: Final = b"\xf8\xff\xfe"

# Error codes (opus_defines.h).
OPUS_OK: Final = 0
OPUS_BAD_ARG: Final = -1
OPUS_INVALID_PACKET: Final = -4

# Decoder CTL requests (opus_defines.h).
_RESET_STATE: Final = 4028


class OpusNotAvailable(VoiceError):
    """libopus could not be loaded; nothing voice-related can work without it."""

    permanent = True


class OpusError(VoiceError):
    """libopus returned an error; ``code`` is the (negative) libopus error code."""

    def __init__(self, code: int, action: str = "opus call") -> None:
        self.code = code
        reason = _strerror(code)
        super().__init__(f"{action} failed: {reason} (libopus error {code})")


# --- loading -------------------------------------------------------------------------------

_VP = ctypes.c_void_p
_INT = ctypes.c_int
_I32 = ctypes.c_int32
_CP = ctypes.c_char_p
_INT_PTR = ctypes.POINTER(ctypes.c_int)

# name -> (argtypes, restype). opus_*_ctl are variadic, so they get no argtypes (every argument
# is passed as an explicit ctypes value, which is the defined way to call a C varargs function).
_SIGNATURES: Final[dict[str, tuple[list[Any] | None, Any]]] = {
    "opus_get_version_string": ([], _CP),
    "opus_strerror": ([_INT], _CP),
    "opus_decoder_create": ([_I32, _INT, _INT_PTR], _VP),
    "opus_decoder_destroy": ([_VP], None),
    "opus_decode": ([_VP, _CP, _I32, _VP, _INT, _INT], _INT),
    "opus_decoder_ctl": (None, _INT),
    "opus_packet_get_nb_samples": ([_CP, _I32, _I32], _INT),
}

#: Tried after ``ctypes.util.find_library('opus')`` (which needs ldconfig or gcc to answer).
_FALLBACK_NAMES: tuple[str, ...] = ("libopus.so.0",)

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _load() -> ctypes.CDLL:
    """Load libopus once per process and declare every function we call."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        names = [n for n in (ctypes.util.find_library("opus"), *_FALLBACK_NAMES) if n]
        errors: list[str] = []
        lib: ctypes.CDLL | None = None
        for name in names:
            try:
                lib = ctypes.CDLL(name)
                break
            except OSError as exc:
                errors.append(f"{name}: {exc}")
        if lib is None:
            detail = "; ".join(errors) or "not found by ctypes.util.find_library('opus')"
            raise OpusNotAvailable(
                f"libopus is not installed ({detail}); install the libopus0 package "
                "(apt-get install libopus0)"
            )
        try:
            for fname, (argtypes, restype) in _SIGNATURES.items():
                func = getattr(lib, fname)
                if argtypes is not None:
                    func.argtypes = argtypes
                func.restype = restype
        except AttributeError as exc:
            raise OpusNotAvailable(f"the loaded libopus is missing a function: {exc}") from exc
        _lib = lib
        _log.debug("loaded %s", lib.opus_get_version_string().decode("ascii", "replace"))
        return lib


def load_libopus() -> ctypes.CDLL:
    """The process's libopus (loaded once), for the send side in :mod:`bot.sim.sender`."""
    return _load()


def _strerror(code: int) -> str:
    try:
        raw: bytes | None = _load().opus_strerror(code)
    except OpusNotAvailable:
        return "unknown error"
    return raw.decode("ascii", "replace") if raw else "unknown error"


def decode_rate(stt_rate: int) -> int:
    """The rate to decode at for an STT stream at ``stt_rate``: that rate where libopus decodes
    it natively (8/12/16/24/48 kHz), else Discord's 48 kHz, which a resampler then converts."""
    return stt_rate if stt_rate in OPUS_SAMPLE_RATES else DISCORD_SAMPLE_RATE


def libopus_version() -> str:
    """The loaded library's version string, e.g. ``libopus 1.4`` (for ``check-config``)."""
    raw: bytes = _load().opus_get_version_string()
    return raw.decode("ascii", "replace")


def _check_rate_channels(sample_rate: int, channels: int) -> None:
    if sample_rate not in OPUS_SAMPLE_RATES:
        raise ValueError(f"Opus sample rate must be one of {OPUS_SAMPLE_RATES}, got {sample_rate}")
    if channels not in (1, 2):
        raise ValueError(f"Opus channels must be 1 or 2, got {channels}")


Int16Array = npt.NDArray[np.int16]


def _closed_decoder(*_args: object) -> int:
    raise ValueError("this OpusDecoder is closed")


# --- decoder -------------------------------------------------------------------------------


class OpusDecoder:
    """One libopus decoder for one stream (one SSRC): it keeps state between packets.

    Output is int16 at ``sample_rate``; with ``channels == 2`` it is interleaved L, R.
    Not thread-safe (neither is libopus' decoder state); use one per speaker.
    """

    def __init__(self, sample_rate: int = DISCORD_SAMPLE_RATE, channels: int = 1) -> None:
        _check_rate_channels(sample_rate, channels)
        lib = _load()
        self.sample_rate: Final = sample_rate
        self.channels: Final = channels
        #: Samples per channel in the longest possible packet (120 ms).
        self.max_frame_samples: Final = sample_rate * MAX_FRAME_MS // 1000
        #: PLC and FEC need whole 2.5 ms units (opus_decode: frame_size % (Fs/400)).
        self._plc_unit = sample_rate // 400
        err = ctypes.c_int(0)
        state = lib.opus_decoder_create(sample_rate, channels, ctypes.byref(err))
        if err.value != OPUS_OK or not state:
            raise OpusError(err.value or OPUS_BAD_ARG, "opus_decoder_create")
        self._state: int | None = state
        # Hot path: bound function pointers and the preallocated buffer's address, cached.
        # Typed as a plain callable: close() swaps in _closed_decoder.
        self._opus_decode: Callable[..., int] = lib.opus_decode
        self._get_nb_samples = lib.opus_packet_get_nb_samples
        self._destroy = lib.opus_decoder_destroy
        self._ctl = lib.opus_decoder_ctl
        self._buf: Int16Array = np.zeros(self.max_frame_samples * channels, dtype=np.int16)
        self._buf_ptr: int = self._buf.ctypes.data
        # decode_into caches the last caller buffer (held, so its identity cannot be reused).
        self._out: Int16Array | None = None
        self._out_ptr = 0
        self._out_frames = 0

    # -- lifecycle --

    def close(self) -> None:
        """Free the libopus state; safe to call twice. Later calls raise ValueError."""
        state, self._state = self._state, None
        # The hot paths call the cached pointer without checking _state: passing libopus a
        # NULL decoder would crash the process, so swap in a function that refuses.
        self._opus_decode = _closed_decoder
        if state:
            self._destroy(state)

    def __del__(self) -> None:
        if getattr(self, "_state", None):
            self.close()

    def __enter__(self) -> OpusDecoder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget inter-packet state (a new talk spurt from an unrelated stream, an SSRC reuse)."""
        ret = self._ctl(_VP(self._live_state()), _INT(_RESET_STATE))
        if ret < 0:
            raise OpusError(ret, "OPUS_RESET_STATE")

    def _live_state(self) -> int:
        if self._state is None:
            raise ValueError("this OpusDecoder is closed")
        return self._state

    # -- decoding --

    def samples_per_frame(self, packet: bytes) -> int:
        """Samples per channel ``packet`` decodes to at this decoder's rate."""
        n: int = self._get_nb_samples(packet, len(packet), self.sample_rate)
        if n < 0:
            raise OpusError(n, "opus_packet_get_nb_samples")
        return n

    def decode(self, packet: bytes, *, fec: bool = False) -> Int16Array:
        """Decode one packet (``fec=True``: decode the FEC copy of the frame *before* it)."""
        if not packet:
            raise ValueError("decode() needs a packet; use conceal() for a lost one")
        frame_size = self.samples_per_frame(packet) if fec else self.max_frame_samples
        n: int = self._opus_decode(
            self._state, packet, len(packet), self._buf_ptr, frame_size, 1 if fec else 0
        )
        if n < 0:
            raise OpusError(n, "opus_decode")
        return self._buf[: n * self.channels].copy()

    def decode_into(self, packet: bytes, out: Int16Array, offset: int = 0) -> int:
        """Decode into the caller's int16 buffer from sample frame ``offset`` on (room for up to
        ``out.size // channels - offset`` samples per channel); returns samples per channel
        written. The allocation-free path: a buffer used again is not checked again."""
        if out is not self._out:
            self._bind_out(out)
        if not packet:  # libopus would silently run PLC for an empty packet
            raise ValueError("decode_into() needs a packet; use conceal() for a lost one")
        room = self._out_frames - offset
        if offset < 0 or room < self._plc_unit:
            raise ValueError(f"offset {offset} leaves no room in a {self._out_frames}-frame buffer")
        n: int = self._opus_decode(
            self._state, packet, len(packet), self._out_ptr + offset * 2 * self.channels, room, 0
        )
        if n < 0:
            raise OpusError(n, "opus_decode")
        return n

    def _bind_out(self, out: Int16Array) -> None:
        if not isinstance(out, np.ndarray) or out.dtype != np.int16:
            raise TypeError("decode_into needs a numpy int16 array")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("decode_into needs a writeable C-contiguous array")
        frames = out.size // self.channels
        if frames < self._plc_unit:
            raise ValueError(f"output buffer too small: {out.size} samples")
        self._out, self._out_ptr, self._out_frames = out, out.ctypes.data, frames

    def conceal(self, samples: int) -> Int16Array:
        """Packet-loss concealment: ``samples`` per channel of plausible audio for a gap.

        ``samples`` must be a whole number of 2.5 ms units (libopus' rule), e.g. 320 at 16 kHz
        for one lost 20 ms packet. Long gaps are concealed 120 ms at a time; libopus fades PLC
        output towards silence by itself.
        """
        self._check_plc_length(samples)
        ch = self.channels
        out: Int16Array = np.empty(samples * ch, dtype=np.int16)
        base = out.ctypes.data
        done = 0
        while done < samples:
            step = min(samples - done, self.max_frame_samples)
            n: int = self._opus_decode(self._live_state(), None, 0, base + done * ch * 2, step, 0)
            if n < 0:
                raise OpusError(n, "opus_decode (PLC)")
            done += n
        return out

    def decode_fec(self, next_packet: bytes, samples: int) -> Int16Array:
        """Rebuild the lost frame just before ``next_packet`` from its in-band FEC data.

        ``samples`` is the lost duration per channel (normally one frame). If the packet carries
        no FEC, libopus falls back to PLC, so the result always has ``samples`` per channel.
        Afterwards decode ``next_packet`` normally.
        """
        if not next_packet:
            raise ValueError("decode_fec() needs the packet that follows the loss")
        self._check_plc_length(samples)
        if samples > self.max_frame_samples:
            # FEC covers one frame at most; conceal the older part of a longer gap first.
            head = self.conceal(samples - self.max_frame_samples)
            return np.concatenate([head, self.decode_fec(next_packet, self.max_frame_samples)])
        n: int = self._opus_decode(
            self._live_state(), next_packet, len(next_packet), self._buf_ptr, samples, 1
        )
        if n < 0:
            raise OpusError(n, "opus_decode (FEC)")
        return self._buf[: n * self.channels].copy()

    def _check_plc_length(self, samples: int) -> None:
        if samples <= 0 or samples % self._plc_unit:
            raise ValueError(
                f"concealed length must be a positive multiple of 2.5 ms "
                f"({self._plc_unit} samples at {self.sample_rate} Hz), got {samples}"
            )

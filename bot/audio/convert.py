"""Audio conversion for the STT stream: downmix, int16, per-speaker resampling, chunking.

Job: turn whatever PCM a source gives us (decoded Opus, a WAV track; int16 or float; mono or
stereo; any rate) into what cantonese.ai wants: mono 16-bit little-endian PCM at the session's
sample rate, cut into fixed-duration chunks for ``audio-chunk`` events.

Boundary: pure. Arrays and bytes in, arrays and bytes out; no I/O, no clocks, no asyncio.
Resampling is CPU work measured in microseconds per 20 ms frame, so it is a plain method, not a
coroutine.

Why a *stream* resampler: resampling each packet on its own restarts the filter at every
boundary, which clicks 50 times a second and drifts in length. One ``soxr.ResampleStream`` per
speaker carries the filter state across chunks (as pipecat's ``SOXRStreamAudioResampler`` does),
so streaming in pieces gives the same samples as converting in one go, and once flushed the
total length is exactly ``round(input * out_rate / in_rate)``.

Sample scale: floats are in [-1, 1] and int16 maps to floats by dividing by 32768, so an int16
signal survives int16 -> float -> int16 unchanged.
"""

from __future__ import annotations

from typing import Final, Literal

import numpy as np
import numpy.typing as npt
import soxr

__all__ = [
    "INT16_SCALE",
    "MAX_OUT_RATE",
    "MIN_OUT_RATE",
    "Chunker",
    "StreamConverter",
    "downmix",
    "to_int16",
]

#: Full scale of int16 as a float divisor (2**15): -32768 maps to exactly -1.0.
INT16_SCALE: Final = 32768.0
#: Output rates the STT session accepts; the same bounds as ``bot.config.SttConfig.sample_rate``.
MIN_OUT_RATE: Final = 8000
MAX_OUT_RATE: Final = 48000
#: Input rates we accept: anything a sound file may carry (8 kHz telephone .. 384 kHz studio).
MIN_IN_RATE: Final = 1000
MAX_IN_RATE: Final = 384000
#: soxr quality presets good enough for speech recognition: HQ is 20-bit precision with a
#: steep anti-alias filter (> 100 dB stop band, libsoxr docs); VHQ is 28-bit, slower.
Quality = Literal["HQ", "VHQ"]

Int16Array = npt.NDArray[np.int16]
#: int16 little-endian: what ``audio-chunk`` carries (the native int16 dtype on x86 and ARM).
_LE_INT16: Final = np.dtype("<i2")
Float32Array = npt.NDArray[np.float32]


def downmix(frames: npt.NDArray[np.generic]) -> Float32Array:
    """Mono float32 in [-1, 1]: the mean of the channels of ``frames`` (shape (n,) or (n, ch)).

    int16 input is scaled by 1/32768; float input is taken as already in [-1, 1].
    The mean (not the sum) keeps a centred voice at its level and cannot clip.
    """
    x = np.asarray(frames)
    if x.ndim not in (1, 2):
        raise ValueError(f"expected shape (frames,) or (frames, channels), got {x.shape}")
    if x.dtype == np.int16:
        mono = x.astype(np.float32) if x.ndim == 1 else x.mean(axis=1, dtype=np.float32)
        mono *= np.float32(1.0 / INT16_SCALE)
        return mono
    if x.dtype.kind != "f":
        raise TypeError(f"expected int16 or float samples, got {x.dtype}")
    if x.ndim == 1:
        return x.astype(np.float32, copy=True)
    mono_mean: Float32Array = x.mean(axis=1, dtype=np.float32)  # numpy types mean() as Any
    return mono_mean


def to_int16(x: npt.NDArray[np.generic]) -> Int16Array:
    """int16 samples from float [-1, 1] (rounded, clipped at full scale); int16 is copied."""
    a = np.asarray(x)
    if a.dtype == np.int16:
        return a.copy()
    if a.dtype.kind != "f":
        raise TypeError(f"expected float or int16 samples, got {a.dtype}")
    scaled = np.rint(a * INT16_SCALE)
    np.clip(scaled, -32768, 32767, out=scaled)
    return scaled.astype(np.int16)


class StreamConverter:
    """Per-speaker converter: any layout and rate in, mono int16 at ``out_rate`` out.

    Keep one per audio stream and feed it in order; ``flush()`` at the end of the stream
    returns the resampler's tail and readies the converter for a new, unrelated stream.
    When ``in_rate == out_rate`` no resampler exists and conversion is a downmix only.
    """

    def __init__(
        self, in_rate: int, in_channels: int, out_rate: int, *, quality: Quality = "HQ"
    ) -> None:
        if not MIN_IN_RATE <= in_rate <= MAX_IN_RATE:
            raise ValueError(f"input rate must be {MIN_IN_RATE}..{MAX_IN_RATE} Hz, got {in_rate}")
        if not MIN_OUT_RATE <= out_rate <= MAX_OUT_RATE:
            raise ValueError(
                f"output rate must be {MIN_OUT_RATE}..{MAX_OUT_RATE} Hz, got {out_rate}"
            )
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        if quality not in ("HQ", "VHQ"):
            raise ValueError(f"quality must be 'HQ' or 'VHQ', got {quality!r}")
        self.in_rate: Final = in_rate
        self.in_channels: Final = in_channels
        self.out_rate: Final = out_rate
        self._stream: soxr.ResampleStream | None = (
            None
            if in_rate == out_rate
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=quality)
        )
        self._frames_in = 0

    @property
    def frames_in(self) -> int:
        """Input frames consumed since construction or the last flush."""
        return self._frames_in

    def process(self, pcm: npt.NDArray[np.generic] | bytes) -> Int16Array:
        """Convert the next piece of the stream; may return fewer samples than the ratio
        suggests (the resampler holds back a filter's worth until more input or ``flush``).

        ``pcm``: int16 or float (in [-1, 1]) shaped (frames,) for mono or (frames, channels),
        an interleaved 1-D array of ``frames * channels`` samples, or raw int16 LE bytes.
        """
        frames = self._as_frames(pcm)
        self._frames_in += frames.shape[0]
        if self._stream is None and frames.ndim == 1 and frames.dtype == np.int16:
            # The common pass-through: already mono int16 at the rate (astype copies).
            return frames.astype(np.int16)
        mono = downmix(frames)
        if self._stream is None:
            return to_int16(mono)
        return to_int16(self._stream.resample_chunk(mono))

    def flush(self) -> Int16Array:
        """End of stream: the resampler's remaining output. The converter then starts afresh."""
        self._frames_in = 0
        if self._stream is None:
            return np.zeros(0, dtype=np.int16)
        tail = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self._stream.clear()
        return to_int16(tail)

    def _as_frames(self, pcm: npt.NDArray[np.generic] | bytes) -> npt.NDArray[np.generic]:
        ch = self.in_channels
        if isinstance(pcm, bytes | bytearray | memoryview):
            raw = memoryview(pcm).cast("B")
            if len(raw) % (2 * ch):
                raise ValueError(
                    f"{len(raw)} bytes is not a whole number of {ch}-channel int16 frames"
                )
            x: npt.NDArray[np.generic] = np.frombuffer(raw, dtype="<i2").astype(np.int16)
        else:
            x = np.asarray(pcm)
        if x.ndim == 2:
            if x.shape[1] != ch:
                raise ValueError(f"expected {ch} channel(s), got shape {x.shape}")
            return x
        if x.ndim != 1:
            raise ValueError(f"expected shape (frames,) or (frames, {ch}), got {x.shape}")
        if ch == 1:
            return x
        if x.size % ch:
            raise ValueError(f"{x.size} interleaved samples is not whole {ch}-channel frames")
        return x.reshape(-1, ch)


class Chunker:
    """Cut a mono int16 stream into fixed-duration little-endian chunks for ``audio-chunk``.

    ``samples_per_chunk`` is ``sample_rate * chunk_ms // 1000`` (rounded down where the rate
    does not divide evenly, e.g. 1102 samples = 99.95 ms at 11025 Hz).
    """

    def __init__(self, sample_rate: int, chunk_ms: int) -> None:
        if sample_rate <= 0 or chunk_ms <= 0:
            raise ValueError("sample_rate and chunk_ms must be positive")
        self.sample_rate: Final = sample_rate
        self.chunk_ms: Final = chunk_ms
        self.samples_per_chunk: Final = sample_rate * chunk_ms // 1000
        if self.samples_per_chunk < 1:
            raise ValueError(f"{chunk_ms} ms at {sample_rate} Hz is less than one sample")
        self._chunk_bytes = self.samples_per_chunk * 2
        self._buf = bytearray()

    @property
    def pending_samples(self) -> int:
        """Samples held back waiting for a full chunk."""
        return len(self._buf) // 2

    def push(self, mono_int16: Int16Array) -> list[bytes]:
        """Add samples; return every chunk now complete (possibly none)."""
        x = mono_int16
        if type(x) is np.ndarray and x.dtype is _LE_INT16 and x.ndim == 1:
            # The voice receiver's case (its batches of whole chunks): no conversion to check.
            self._buf += x.tobytes()
        else:
            x = np.asarray(x)
            if x.dtype != np.int16 or x.ndim != 1:
                raise ValueError(f"expected 1-D int16 mono samples, got {x.dtype} {x.shape}")
            self._buf += x.astype("<i2", copy=False).tobytes()
        size = self._chunk_bytes
        if len(self._buf) < size:
            return []
        n = len(self._buf) // size
        chunks = [bytes(self._buf[i * size:(i + 1) * size]) for i in range(n)]
        del self._buf[: n * size]
        return chunks

    def flush(self) -> bytes:
        """The partial last chunk (``b""`` if none); the chunker is then empty."""
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

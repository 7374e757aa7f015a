"""Tone-coded test speech: text encoded as audio that a loopback fake STT can "recognise".

No machine here can run real Cantonese recognition, so the simulator speaks text as tones and
the fake cantonese.ai server (:mod:`bot.sim.stt_server`) decodes them back. The code is built to
survive what the real pipeline does to audio: resampling (8..48 kHz), Opus at 48 kHz and packet
loss with concealment.

Wire format of one utterance (all tones are sine bursts with raised-cosine ramps)::

    START_A (120 ms, 600 Hz) | START_B (120 ms, 3400 Hz) | data+CRC slots | END (120 ms)

* data: the UTF-8 bytes of the text then one CRC-8 byte (polynomial 0x07), as nibbles, high
  nibble first; nibble ``n`` is a 60 ms tone at ``500 + 200 * n`` Hz (500..3500 Hz, below the
  4 kHz Nyquist of 8 kHz audio). The CRC lets the decoder tell a corrupted utterance (it still
  returns its best-effort text).
* time diversity: nibbles go in blocks of 4 and each block is sent twice in a row
  (``n0 n1 n2 n3 n0 n1 n2 n3 n4 ...``; a last block of 2 likewise), so a burst of concealed
  packets up to 240 ms long spoils at most one copy; the decoder keeps the clearer copy.
* markers sit on the even hundreds (600, 2000, 3400 Hz), between the data tones, so a marker is
  never mistaken for data.

:class:`ToneDecoder` is streaming: it synchronises on the START_A -> START_B -> data transitions
with short sliding windows, then reads each symbol from the middle half of its slot only (Opus
packet-loss concealment repeats the previous tone into the start of a slot), picking the
strongest of the candidate bins. It commits an utterance once the END marker and
:data:`COMMIT_SILENCE_S` of further input have been heard, like a real STT commits after a pause.

Pure: numpy arrays in, values out; no clocks (times are sample positions of the decoder's input).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = [
    "COMMIT_SILENCE_S",
    "SYMBOL_S",
    "DecoderEvent",
    "Partial",
    "TimedChar",
    "ToneDecoder",
    "Utterance",
    "crc8",
    "encode_utterance",
    "speech_track",
    "utterance_duration",
]

#: Length of one symbol (one nibble). 60 ms = three 20 ms Discord Opus packets, so one lost
#: packet (concealed) spoils at most the edge of a slot, never its middle half.
SYMBOL_S = 0.060
#: Each marker tone lasts two symbols, so a concealed packet inside one leaves it recognisable.
MARKER_S = 2 * SYMBOL_S
END_MARKER_S = 2 * SYMBOL_S
#: Nibbles per repeated block (a block and its copy are 8 slots = 480 ms apart at most).
BLOCK = 4
#: Raised-cosine ramp at each burst edge: keeps the spectrum tight (no clicks) through Opus.
RAMP_S = 0.005
#: Peak amplitude (float, full scale 1.0): loud enough for Opus, far from clipping.
AMPLITUDE = 0.4
#: Data tones: nibble n -> 500 + 200 n Hz, i.e. 500..3500 Hz (fits under 8 kHz sampling's 4 kHz).
DATA_FREQS: tuple[float, ...] = tuple(500.0 + 200.0 * n for n in range(16))
START_A_HZ = 600.0
START_B_HZ = 3400.0
END_HZ = 2000.0
#: A real STT commits after a pause; we commit once this much input followed the end marker.
COMMIT_SILENCE_S = 0.300

# Decoder tuning.
#: Sync window and hop: 20 ms windows every 5 ms (a window of a 60 ms tone fits 9 hops).
_SYNC_WIN_S = 0.020
_SYNC_HOP_S = 0.005
#: Hops a marker label must hold to count (tolerates a concealed packet inside a marker).
_SYNC_MIN_HOPS = 4
#: Hops of another label (or none) inside a run that are absorbed back into it: up to two
#: concealed 20 ms packets.
_GLITCH_HOPS = 8
#: A silent run between the markers shorter than this (in hops) is concealed loss, not a gap.
_SYNC_GAP_HOPS = 16
#: Fraction of a window's energy that must sit in its strongest bin for a "tone" label (a pure
#: tone gives ~1.0, white noise ~2/window-length).
_TONALITY = 0.5
#: RMS (int16 units) under which a window counts as silence (about -50 dBFS).
_SILENCE_RMS = 100.0
#: Consecutive silent symbol slots that abandon an utterance lacking its end marker.
_MAX_SILENT_SYMBOLS = 5

_START_A, _START_B, _END = 16, 17, 18
_ALL_FREQS: tuple[float, ...] = (*DATA_FREQS, START_A_HZ, START_B_HZ, END_HZ)
_SYMBOL_FREQS: tuple[float, ...] = (*DATA_FREQS, END_HZ)  # what a data slot may hold


def crc8(data: bytes) -> int:
    """CRC-8 (polynomial 0x07, init 0): detects any single corrupted symbol."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def _nibbles(data: bytes) -> list[int]:
    out: list[int] = []
    for byte in data:
        out += (byte >> 4, byte & 0x0F)
    return out


def _spread(nibbles: list[int]) -> list[int]:
    """Each block of :data:`BLOCK` nibbles followed by its copy."""
    out: list[int] = []
    for i in range(0, len(nibbles), BLOCK):
        block = nibbles[i : i + BLOCK]
        out += block + block
    return out


def _burst(freq: float, seconds: float, sample_rate: int) -> npt.NDArray[np.float32]:
    n = round(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    tone = AMPLITUDE * np.sin(2 * np.pi * freq * t)
    ramp = min(round(RAMP_S * sample_rate), n // 2)
    if ramp:
        edge = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        tone[:ramp] *= edge
        tone[n - ramp :] *= edge[::-1]
    return tone.astype(np.float32)


def _check_rate(sample_rate: int) -> None:
    if not 8000 <= sample_rate <= 192000:
        raise ValueError(f"sample_rate must be 8000..192000 Hz, got {sample_rate}")


def utterance_duration(text: str) -> float:
    """Seconds of audio :func:`encode_utterance` makes for ``text``."""
    n_symbols = 2 * 2 * (len(text.encode("utf-8")) + 1)
    return 2 * MARKER_S + n_symbols * SYMBOL_S + END_MARKER_S


def encode_utterance(text: str, sample_rate: int) -> npt.NDArray[np.float32]:
    """``text`` as tone-coded float32 mono audio at ``sample_rate`` (no leading/trailing pause)."""
    _check_rate(sample_rate)
    if not text:
        raise ValueError("cannot encode an empty utterance")
    data = text.encode("utf-8")
    parts = [_burst(START_A_HZ, MARKER_S, sample_rate), _burst(START_B_HZ, MARKER_S, sample_rate)]
    # Slots are placed on an exact sample grid so the decoder's symbol positions never drift.
    sym = SYMBOL_S * sample_rate
    for i, nib in enumerate(_spread(_nibbles(data + bytes([crc8(data)])))):
        n = round((i + 1) * sym) - round(i * sym)
        parts.append(_burst(DATA_FREQS[nib], n / sample_rate, sample_rate))
    parts.append(_burst(END_HZ, END_MARKER_S, sample_rate))
    return np.concatenate(parts)


def speech_track(
    lines: Sequence[tuple[float, str]], sample_rate: int, duration: float | None = None
) -> npt.NDArray[np.float32]:
    """Utterances placed at their start seconds with silence between (float32 mono).

    ``duration`` defaults to the end of the last utterance plus 0.5 s, enough for the decoder to
    commit it. Overlapping utterances are refused (one speaker says one thing at a time).
    """
    _check_rate(sample_rate)
    placed: list[tuple[int, npt.NDArray[np.float32]]] = []
    end = 0
    for start, text in sorted(lines, key=lambda line: line[0]):
        if start < 0:
            raise ValueError(f"utterance {text!r} starts before 0 s")
        begin = round(start * sample_rate)
        if begin < end:
            raise ValueError(f"utterance {text!r} at {start} s overlaps the previous one")
        audio = encode_utterance(text, sample_rate)
        placed.append((begin, audio))
        end = begin + len(audio)
    total = end + round(0.5 * sample_rate) if duration is None else round(duration * sample_rate)
    if total < end:
        raise ValueError(
            f"duration {duration} s is shorter than the utterances ({end / sample_rate:.3f} s)"
        )
    track = np.zeros(total, dtype=np.float32)
    for begin, audio in placed:
        track[begin : begin + len(audio)] = audio
    return track


class TimedChar(NamedTuple):
    """One decoded character and its span in seconds of the decoder's input."""

    text: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Partial:
    """The text heard so far of an utterance still being received."""

    text: str


@dataclass(frozen=True, slots=True)
class Utterance:
    """A finished utterance; ``checksum_ok`` is False when the text is only a best effort."""

    text: str
    start: float
    end: float
    words: tuple[TimedChar, ...]
    checksum_ok: bool = True


DecoderEvent = Partial | Utterance


class _State(Enum):
    IDLE = "idle"  # hunting for START_A -> START_B -> data
    RECEIVING = "receiving"  # reading symbol slots on the grid


@dataclass(slots=True)
class _Run:
    """Consecutive sync windows with the same label; ``start`` is the estimated boundary."""

    label: int | None
    length: int
    start: int


@dataclass(frozen=True, slots=True)
class _Slot:
    nibble: int
    confidence: float  # strongest bin power / runner-up power (inf-safe)


def _basis(freqs: Sequence[float], n: int, sample_rate: int) -> npt.NDArray[np.float64]:
    """Cosines over sines, one row per frequency, for :func:`_power`."""
    phase = 2 * np.pi * np.outer(freqs, np.arange(n) / sample_rate)
    return np.ascontiguousarray(np.vstack((np.cos(phase), np.sin(phase))))


def _power(basis: npt.NDArray[np.float64], x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """|DFT of ``x``|² at each of the basis's frequencies.

    einsum runs numpy's own loop on this thread. ``basis @ x`` would call BLAS, whose
    OpenBLAS splits a 17 x 480 product over its worker threads; with the cores busy (the
    bot, a bench, a test suite beside this fake) those threads wait their turn: with two
    busy cores a step took 788 µs instead of 13, and the fake fell behind what it was sent.
    """
    y: npt.NDArray[np.float64] = np.einsum("ij,j->i", basis, x)
    y *= y
    half = len(y) // 2
    return y[:half] + y[half:]


def _energy(x: npt.NDArray[np.float64]) -> float:
    return float(np.einsum("i,i->", x, x))  # not np.dot: BLAS again (see _power)


def _merge_copies(slots: Sequence[_Slot]) -> list[int]:
    """Undo :func:`_spread`: per nibble, keep the clearer of its two copies."""
    out: list[int] = []
    i = 0
    while i < len(slots):
        size = min(BLOCK, (len(slots) - i) // 2)
        if size == 0:  # a stray odd slot (a damaged utterance): best effort
            out.append(slots[i].nibble)
            break
        for j in range(size):
            a, b = slots[i + j], slots[i + size + j]
            out.append(a.nibble if a.confidence >= b.confidence else b.nibble)
        i += 2 * size
    return out


class ToneDecoder:
    """Streaming decoder: feed int16 mono PCM, get :class:`Partial` / :class:`Utterance` events."""

    def __init__(self, sample_rate: int) -> None:
        _check_rate(sample_rate)
        self.sample_rate = sample_rate
        self._sym = SYMBOL_S * sample_rate  # float: slot k starts at round(k * sym)
        self._marker = round(MARKER_S * sample_rate)
        self._win = round(_SYNC_WIN_S * sample_rate)
        self._hop = round(_SYNC_HOP_S * sample_rate)
        self._slot_win = round(self._sym / 2)
        self._sync_basis = _basis(_ALL_FREQS, self._win, sample_rate)
        self._slot_basis = _basis(_SYMBOL_FREQS, self._slot_win, sample_rate)
        self._buf = np.zeros(0, dtype=np.float64)
        self._buf_start = 0  # absolute sample index of _buf[0]
        self._pending: Utterance | None = None
        self._pending_due = 0  # absolute sample at which _pending is committed
        self._reset_idle(0)

    # -- public ------------------------------------------------------------------------------

    def feed(self, pcm_int16: npt.NDArray[np.int16]) -> list[DecoderEvent]:
        """Consume more input; returns the events it completed, in order."""
        samples = np.asarray(pcm_int16).astype(np.float64).ravel()
        self._buf = np.concatenate((self._buf, samples))
        events: list[DecoderEvent] = []
        while self._step(events):
            pass
        self._trim()
        return events

    def flush(self) -> list[DecoderEvent]:
        """End of input: commit whatever is pending or half-received (best effort)."""
        events: list[DecoderEvent] = []
        if self._pending is not None:
            events.append(self._pending)
            self._pending = None
        if self._state is _State.RECEIVING:
            end = self._data_start + round(len(self._slots) * self._sym)
            utt = self._finish(end)
            if utt is not None:
                events.append(utt)
        self._reset_idle(self._buf_start + len(self._buf))
        return events

    @property
    def position(self) -> float:
        """Seconds of input consumed so far."""
        return (self._buf_start + len(self._buf)) / self.sample_rate

    @property
    def pending(self) -> str | None:
        """Text of an utterance heard to its end marker, waiting for its commit pause."""
        return self._pending.text if self._pending is not None else None

    @property
    def receiving(self) -> bool:
        """True while an utterance is being heard or waits for its commit."""
        return self._state is _State.RECEIVING or self._pending is not None

    # -- internals ---------------------------------------------------------------------------

    def _reset_idle(self, pos: int) -> None:
        self._state = _State.IDLE
        self._pos = pos  # next sync-window start (absolute sample)
        self._runs: list[_Run] = []
        self._utt_start = pos
        self._data_start = pos
        self._slots: list[_Slot] = []
        self._silent = 0
        self._end_like = False
        self._partial = ""

    def _window(self, start: int, n: int) -> npt.NDArray[np.float64] | None:
        i = max(0, start - self._buf_start)  # < 0 only if an estimate reached trimmed input
        if i + n > len(self._buf):
            return None
        return self._buf[i : i + n]

    def _trim(self) -> None:
        if self._state is _State.IDLE:
            # The data start is estimated from the markers, up to two markers behind the window.
            keep_from = self._pos - 3 * self._marker
        else:
            keep_from = self._data_start + round(len(self._slots) * self._sym)
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop

    @staticmethod
    def _classify(
        x: npt.NDArray[np.float64], basis: npt.NDArray[np.float64]
    ) -> tuple[int, float, float, float]:
        """(strongest bin, tonality 0..1, rms, strongest / runner-up power)."""
        energy = _energy(x)
        if energy == 0.0:
            return 0, 0.0, 0.0, 0.0
        power = _power(basis, x)
        order = np.argsort(power)
        best, second = int(order[-1]), float(power[order[-2]])
        tonality = float(2.0 * power[best] / (len(x) * energy))
        confidence = float(power[best]) / (second + 1e-9 * energy)
        return best, tonality, float(np.sqrt(energy / len(x))), confidence

    def _step(self, events: list[DecoderEvent]) -> bool:
        if self._state is _State.IDLE:
            return self._sync_step(events)
        return self._slot_step(events)

    def _sync_step(self, events: list[DecoderEvent]) -> bool:
        x = self._window(self._pos, self._win)
        if x is None:
            return False
        if self._pending is not None and self._pos + self._win >= self._pending_due:
            events.append(self._pending)
            self._pending = None
        best, tonality, rms, _ = self._classify(x, self._sync_basis)
        label = best if (rms >= _SILENCE_RMS and tonality >= _TONALITY) else None
        # The label flips once the window's centre passes a boundary.
        boundary = self._pos + self._win // 2 - self._hop // 2
        self._pos += self._hop
        runs = self._runs
        if runs and runs[-1].label == label:
            runs[-1].length += 1
        elif len(runs) >= 2 and runs[-1].length <= _GLITCH_HOPS and runs[-2].label == label:
            # A short glitch (a transition window, a concealed packet) inside a run: absorb it.
            glitch = runs.pop()
            runs[-1].length += glitch.length + 1
        else:
            runs.append(_Run(label, 1, boundary))
            del runs[:-16]
        data_start = self._find_preamble()
        if data_start is not None:
            self._begin_receiving(data_start, events)
        return True

    def _find_preamble(self) -> int | None:
        """Data start if the runs end with START_A, START_B, then a data tone; else None."""
        runs = self._runs
        current = runs[-1]
        if current.label is None or current.label >= len(DATA_FREQS):
            return None
        if current.length != _SYNC_MIN_HOPS // 2:  # seen long enough not to be a glitch
            return None
        # Runs that count: a marker-length tone, or a silence longer than concealment makes.
        significant = [
            r
            for r in runs[:-1]
            if r.length >= (_SYNC_MIN_HOPS if r.label is not None else _SYNC_GAP_HOPS)
        ]
        if len(significant) < 2:
            return None
        a, b = significant[-2], significant[-1]
        if a.label != _START_A or b.label != _START_B:
            return None
        # Concealment only ever makes a tone last longer, so the earlier of the two estimates
        # of where the data starts is the better one.
        return min(b.start + self._marker, current.start)

    def _begin_receiving(self, data_start: int, events: list[DecoderEvent]) -> None:
        if self._pending is not None:  # a new utterance begins: the previous one is over
            events.append(self._pending)
            self._pending = None
        a = next(r for r in reversed(self._runs) if r.label == _START_A)
        self._reset_idle(data_start)
        self._state = _State.RECEIVING
        self._utt_start = a.start

    def _slot_step(self, events: list[DecoderEvent]) -> bool:
        k = len(self._slots)
        slot = self._data_start + round(k * self._sym)
        x = self._window(slot + round((self._sym - self._slot_win) / 2), self._slot_win)
        if x is None:
            return False
        energy = _energy(x)
        power = _power(self._slot_basis, x)
        data_power = power[: len(DATA_FREQS)]
        order = np.argsort(data_power)
        best = int(order[-1])
        confidence = float(data_power[best]) / (float(data_power[order[-2]]) + 1e-9 * energy + 1e-9)
        silent = float(np.sqrt(energy / len(x))) < _SILENCE_RMS
        is_end = not silent and float(power[-1]) > float(data_power[best])
        # The END marker fills two slots; one END-looking slot between data slots is damage
        # (concealment noise), so the end is declared on END + (END or silence).
        previous_end = self._end_like
        self._end_like = is_end
        if previous_end and (is_end or silent):
            self._slots.pop()  # the tentative END slot was no data
            end = slot - round(self._sym) + round(END_MARKER_S * self.sample_rate)
            utt = self._finish(end)
            self._reset_idle(end)
            if utt is not None:
                self._pending = utt
                self._pending_due = end + round(COMMIT_SILENCE_S * self.sample_rate)
            return True
        if silent:
            self._silent += 1
            if self._silent >= _MAX_SILENT_SYMBOLS:  # no end marker: give up on this one
                keep = k + 1 - self._silent
                del self._slots[keep:]
                end = self._data_start + round(keep * self._sym)
                utt = self._finish(end)
                self._reset_idle(end)
                if utt is not None:
                    events.append(utt)
                return True
        else:
            self._silent = 0
        if silent or is_end:
            confidence = 0.0
        self._slots.append(_Slot(best, confidence))
        if len(self._slots) % (2 * BLOCK) == 0:
            self._emit_partial(events)
        return True

    def _nibbles(self) -> list[int]:
        return _merge_copies(self._slots)

    @staticmethod
    def _to_bytes(nibbles: Sequence[int]) -> bytes:
        return bytes((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, len(nibbles) - 1, 2))

    def _emit_partial(self, events: list[DecoderEvent]) -> None:
        # The last byte received may be the checksum: hold it back.
        text = self._to_bytes(self._nibbles())[:-1].decode("utf-8", "ignore")
        if text and text != self._partial:
            self._partial = text
            events.append(Partial(text))

    def _finish(self, end_sample: int) -> Utterance | None:
        nibbles = self._nibbles()
        raw = self._to_bytes(nibbles)
        if len(raw) < 2:
            return None
        data, crc = raw[:-1], raw[-1]
        text = data.decode("utf-8", "replace")
        ok = crc8(data) == crc and len(nibbles) % 2 == 0 and "\ufffd" not in text
        # Characters share the data span in proportion to their bytes (copies included).
        rate, span = self.sample_rate, len(self._slots) * self._sym
        words: list[TimedChar] = []
        offset = 0
        for ch in text:
            n = len(ch.encode("utf-8")) if ch != "\ufffd" else 1
            s = self._data_start + span * offset / len(raw)
            e = self._data_start + span * (offset + n) / len(raw)
            words.append(TimedChar(ch, s / rate, e / rate))
            offset += n
        return Utterance(text, self._utt_start / rate, end_sample / rate, tuple(words), ok)

"""Row 1 and the in-process part of row 4: the receive path per packet, against the floor.

Every contender gets the same datagrams (freshly DAVE-encrypted per repeat: davey rejects a
replayed frame, as it must) and is timed over the whole stream in thread CPU time; the
figure is the median over repeats of µs per 20 ms packet. Each pass first checks that every
packet became audio (a contender that silently drops packets would look fast).

Contenders:

* ``product``: :class:`bot.voice.receiver.VoiceReceiver` (parse, transport AEAD, DAVE, jitter
  buffer, Opus straight to 16 kHz mono) with ``tick`` every 50 ms of stream time as the adapter
  calls it, handing on 100 ms of PCM at a time (``batch_ms``, as the meeting intake sets it)
  into :class:`bot.audio.convert.Chunker` (100 ms chunks).
* ``lean (prototype)``: :class:`bench.lean.LeanReceiver`, the fast path without the receiver's
  bookkeeping: the reference for what is left above the floor.
* ``floor``: the least Python can do for the same output: slice the known header, the same
  AEAD call, the same davey call, then ``opus_decode`` through ctypes straight to 16 kHz mono into
  one preallocated buffer (no parsing, no checks, no copies).
* ``floor 48k stereo``: the same at Discord's 48 kHz stereo, for reference.
* ``plain``: what a bot built on discord.py does without thought: ``discord.opus.Decoder``
  (48 kHz stereo, a new ctypes buffer per call), a numpy downmix and a soxr stream resample to
  16 kHz, with the same decryption as the floor.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import discord.opus
import numpy as np
import soxr
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt

from bench.media import (
    EXTENSION_BODY_BYTES,
    FRAME_SAMPLES,
    PACKETS_PER_SECOND,
    PacketSet,
    Recording,
    make_packets,
)
from bot.audio.convert import Chunker
from bot.voice import opus as opus_mod
from bot.voice.crypto import MODE_AES256_GCM
from bot.voice.dave import DaveReceiver
from bot.voice.receiver import VoiceReceiver

#: The STT stream: 16 kHz mono in 100 ms chunks (the product's defaults).
STT_RATE: Final = 16000
CHUNK_MS: Final = 100
#: The voice adapter's clock tick (bot.voice.client.TICK_SECONDS).
TICK_SECONDS: Final = 0.05
#: Clear bytes before the ciphertext in our packets: 12-byte RTP header + 4-byte BEDE header.
HEADER_BYTES: Final = 16
#: The extension body (encrypted with the payload): see bench.media.extension_body.
EXT_BODY_BYTES: Final = EXTENSION_BODY_BYTES
_PAD12 = bytes(8)
_PAD24 = bytes(20)
_US: Final = 1e6
#: The clock contenders are timed with: this thread's CPU time, not wall time. On a machine
#: shared with other work, wall time counts the moments another process had the CPU, which
#: land on one contender's pass and not the other's; CPU time counts only our own work.
CLOCK = time.thread_time


@dataclass(frozen=True)
class Timing:
    """µs per packet (median over repeats) and the spread, for one contender on one input.

    ``ratio``: the median over repeats of (this contender's time / the floor's time in the same
    repeat), ``ratio_spread`` its (min, max): measured back to back on the same packets, a slow
    patch of the machine cancels out of the ratio, which is why the ratio, not the µs, is what
    the bench compares."""

    name: str
    label: str
    us_per_packet: float
    spread: tuple[float, float]
    packets: int
    ratio: float = 0.0
    ratio_spread: tuple[float, float] = (0.0, 0.0)

    @property
    def core_percent_per_speaker(self) -> float:
        return self.us_per_packet * PACKETS_PER_SECOND / _US * 100

    @property
    def speakers_per_core(self) -> float:
        return _US / (self.us_per_packet * PACKETS_PER_SECOND)


Runner = Callable[[PacketSet], float]  # returns seconds spent on the whole stream


def _fresh(rec: Recording, template: PacketSet) -> PacketSet:
    """The same packets again; DAVE frames re-encrypted (new nonces) by the same members."""
    if not template.dave:
        return template
    return make_packets(rec.opus, rec.levels, mode=template.mode, dave=True,
                        speakers=len(template.speakers), call=template.call,
                        secret_key=template.secret_key)


def measure(name: str, runner: Runner, rec: Recording, template: PacketSet,
            repeats: int) -> Timing:
    runs = []
    for _ in range(repeats):
        packets = _fresh(rec, template)
        runs.append(runner(packets) / len(packets.datagrams) * _US)
    return Timing(name, template.label, statistics.median(runs), (min(runs), max(runs)),
                  len(template.datagrams))


# --- the product ---------------------------------------------------------------------------------


def run_product(packets: PacketSet) -> float:
    """Seconds for VoiceReceiver (+ tick) -> Chunker over the stream; checks nothing is lost."""
    chunkers = {s.user_id: Chunker(STT_RATE, CHUNK_MS) for s in packets.speakers}
    chunks = 0

    def on_audio(user_id: int, pcm: np.ndarray) -> None:
        nonlocal chunks
        chunks += len(chunkers[user_id].push(pcm))

    dave = None
    if packets.call is not None:
        session = packets.call.session
        dave = DaveReceiver(lambda: session, lambda: 1)
    receiver = VoiceReceiver(sample_rate=STT_RATE, on_audio=on_audio, on_idle=lambda _u: None,
                             is_ignored=lambda _u: False, dave=dave, batch_ms=CHUNK_MS)
    receiver.set_transport(packets.mode, packets.secret_key)
    for s in packets.speakers:
        receiver.on_speaking(s.user_id, s.ssrc, 0.0)
    n_speakers = len(packets.speakers)
    datagrams = packets.datagrams
    handle, tick = receiver.handle_packet, receiver.tick
    per_tick = max(1, round(TICK_SECONDS * PACKETS_PER_SECOND * n_speakers))
    started = CLOCK()
    for i, (_k, data) in enumerate(datagrams):
        now = i / n_speakers / PACKETS_PER_SECOND
        handle(data, now)
        if i % per_tick == per_tick - 1:
            tick(now)
    elapsed = CLOCK() - started
    frames = len(datagrams) // n_speakers
    expected = n_speakers * (frames * FRAME_SAMPLES // 3 // (STT_RATE * CHUNK_MS // 1000))
    bad = {k: v for k, v in receiver.counters().as_dict().items()
           if k not in ("received", "decoded", "waiting") and v}
    if bad or chunks < expected:
        raise RuntimeError(f"product lost audio: {chunks}/{expected} chunks, stats {bad}")
    return elapsed


# --- the floor -----------------------------------------------------------------------------------


def _aead(packets: PacketSet) -> Callable[[bytes, bytes, bytes], bytes]:
    """decrypt(nonce_suffix, ciphertext, aad) for the set's mode, as bare as the library allows."""
    if packets.mode == MODE_AES256_GCM:
        aes = AESGCM(packets.secret_key)
        return lambda suffix, ct, aad: aes.decrypt(suffix + _PAD12, ct, aad)
    key = packets.secret_key
    return lambda suffix, ct, aad: crypto_aead_xchacha20poly1305_ietf_decrypt(
        ct, aad, suffix + _PAD24, key)


def floor_runner(rate: int, channels: int) -> Runner:
    def run(packets: PacketSet) -> float:
        lib = opus_mod._load()
        err = ctypes.c_int(0)
        states = [lib.opus_decoder_create(rate, channels, ctypes.byref(err))
                  for _ in packets.speakers]
        frame = rate // PACKETS_PER_SECOND
        buf = np.zeros(frame * channels * 6, dtype=np.int16)  # room for a 120 ms packet
        ptr, cap = buf.ctypes.data, frame * 6
        decode = lib.opus_decode
        decrypt = _aead(packets)
        users = [s.user_id for s in packets.speakers]
        dave_decrypt = None
        if packets.call is not None:
            import davey
            session, audio = packets.call.session, davey.MediaType.audio
            dave_decrypt = session.decrypt
        total = 0
        started = CLOCK()
        for k, data in packets.datagrams:
            plain = decrypt(data[-4:], data[HEADER_BYTES:-4], data[:HEADER_BYTES])
            payload = plain[EXT_BODY_BYTES:]
            if dave_decrypt is not None:
                payload = dave_decrypt(users[k], audio, payload)
            total += decode(states[k], payload, len(payload), ptr, cap, 0)
        elapsed = CLOCK() - started
        for st in states:
            lib.opus_decoder_destroy(st)
        if total != len(packets.datagrams) * frame:
            raise RuntimeError(f"floor decoded {total} samples, expected more")
        return elapsed

    return run


# --- the plain approach -------------------------------------------------------------------------


def run_plain(packets: PacketSet) -> float:
    """discord.py's Decoder (48 kHz stereo) + numpy downmix + soxr stream resample to 16 kHz."""
    if not discord.opus.is_loaded():
        discord.opus._load_default()
    # discord.py's Decoder.__init__ is unannotated (a third-party boundary).
    decoders = [discord.opus.Decoder() for _ in packets.speakers]  # type: ignore[no-untyped-call]
    resamplers = [soxr.ResampleStream(48000, STT_RATE, 1, dtype="float32")
                  for _ in packets.speakers]
    chunkers = [Chunker(STT_RATE, CHUNK_MS) for _ in packets.speakers]
    decrypt = _aead(packets)
    users = [s.user_id for s in packets.speakers]
    dave_decrypt = None
    if packets.call is not None:
        import davey
        session, audio = packets.call.session, davey.MediaType.audio
        dave_decrypt = session.decrypt
    out = 0
    started = CLOCK()
    for k, data in packets.datagrams:
        plain = decrypt(data[-4:], data[HEADER_BYTES:-4], data[:HEADER_BYTES])
        payload = plain[EXT_BODY_BYTES:]
        if dave_decrypt is not None:
            payload = dave_decrypt(users[k], audio, payload)
        pcm = decoders[k].decode(payload, fec=False)
        stereo = np.frombuffer(pcm, dtype=np.int16).reshape(-1, 2)
        mono = stereo.mean(axis=1, dtype=np.float32) * np.float32(1 / 32768)
        resampled = resamplers[k].resample_chunk(mono)
        x = np.clip(np.rint(resampled * 32768), -32768, 32767).astype(np.int16)
        out += len(x)
        chunkers[k].push(x)
    elapsed = CLOCK() - started
    if out < len(packets.datagrams) * 320 * 0.9:
        raise RuntimeError("plain approach produced too little audio")
    return elapsed


# --- prototype: no per-packet Python objects (bench/lean.py) ---------------------------------


def run_lean(packets: PacketSet) -> float:
    """Seconds for :class:`bench.lean.LeanReceiver` over the stream; checks nothing is lost."""
    from bench.lean import LeanReceiver

    chunks = 0

    def on_chunk(_user: int, _pcm: bytes) -> None:
        nonlocal chunks
        chunks += 1

    session = packets.call.session if packets.call is not None else None
    receiver = LeanReceiver(mode=packets.mode, secret_key=packets.secret_key,
                            users={s.ssrc: s.user_id for s in packets.speakers},
                            on_chunk=on_chunk, rate=STT_RATE, chunk_ms=CHUNK_MS,
                            dave_session=session)
    n_speakers = len(packets.speakers)
    handle = receiver.handle_packet
    started = CLOCK()
    for i, (_k, data) in enumerate(packets.datagrams):
        handle(data, i / n_speakers / PACKETS_PER_SECOND)
    elapsed = CLOCK() - started
    receiver.close()
    frames = len(packets.datagrams) // n_speakers
    expected = n_speakers * (frames * FRAME_SAMPLES // 3 // (STT_RATE * CHUNK_MS // 1000))
    if chunks < expected or receiver.out_of_order:
        raise RuntimeError(f"lean prototype lost audio: {chunks}/{expected} chunks")
    return elapsed


CONTENDERS: Final[dict[str, Runner]] = {
    "product": run_product,
    "lean (prototype)": run_lean,
    "floor": floor_runner(STT_RATE, 1),
    "floor 48k stereo": floor_runner(48000, 2),
    "plain": run_plain,
}


def ratio_stats(ratios: list[float]) -> tuple[float, tuple[float, float]]:
    """Median and (min, max) of per-repeat ratios."""
    return statistics.median(ratios), (min(ratios), max(ratios))


def _timed(runner: Runner, packets: PacketSet) -> float:
    """µs per packet for one pass, with the cyclic GC off (a collection landing inside one
    contender's pass but not the other's would be noise, not a difference between them)."""
    gc.collect()
    gc.disable()
    try:
        return runner(packets) / len(packets.datagrams) * _US
    finally:
        gc.enable()


def row1(rec: Recording, sets: list[PacketSet], repeats: int,
         contenders: tuple[str, ...] = tuple(CONTENDERS),
         reference: str = "floor") -> list[Timing]:
    """Every contender on every packet set (mode x DAVE), interleaved.

    Within one repeat each contender runs once on the same packets, back to back, in an order
    that alternates between repeats (A B C, C B A, ...) so that neither a warm cache nor a drift
    of the machine's speed favours whoever runs first. A contender's ratio to ``reference`` is
    taken per repeat, and its figure is the median of those ratios (with their spread)."""
    order = list(contenders)
    if reference not in order:
        order.append(reference)
    runs: dict[tuple[int, str], list[float]] = {}
    for r in range(repeats):
        for i, packets in enumerate(sets):
            for name in (order if r % 2 == 0 else order[::-1]):
                fresh = _fresh(rec, packets)
                runs.setdefault((i, name), []).append(_timed(CONTENDERS[name], fresh))
    out = []
    for (i, name), v in runs.items():
        if name not in contenders:
            continue
        ref = runs[(i, reference)]
        ratio, ratio_spread = ratio_stats([a / b for a, b in zip(v, ref, strict=True)])
        out.append(Timing(name, sets[i].label, statistics.median(v), (min(v), max(v)),
                          len(sets[i].datagrams), ratio, ratio_spread))
    return out

"""Drive a peer library's receive pipeline with the bench's packets; print one JSON line.

Runs *inside the peer's venv* (``python bench/peer_driver.py FLAVOR FILE MODE KEYHEX REPEATS``),
so it imports nothing from cantobot. FLAVOR is ``voice-recv`` (discord-ext-voice-recv) or
``py-cord``. Both libraries' receive path is: ``decode`` the RTP packet, ``PacketDecryptor``
(transport AEAD, extension header), then a per-SSRC ``PacketDecoder`` with its heap jitter
buffer and ``discord.opus.Decoder`` (48 kHz stereo PCM, their sinks' input). Their reader and
router threads only move packets between these calls; they are replaced by a plain loop here,
with stand-ins for the voice client objects the decoder consults for a member lookup.
Output: ``{"flavor", "us_per_packet", "runs", "samples", "floor_runs", "ratios"}``; no DAVE
(packets must be DAVE-off).

Steadiness: the bench's floor (the same XChaCha20 call, then ``opus_decode`` through ctypes
straight to 16 kHz mono into one preallocated buffer, no errcheck) runs in *this* process too,
alternating with the peer within every repeat (peer, floor, floor, peer, ...), and the figure
that counts is the median of the per-repeat ratios ``peer / floor``: both sides see the same
process and the same moment of the machine, which a ratio across processes would not.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import statistics
import struct
import sys
import time
from types import SimpleNamespace
from typing import Any

_US = 1e6
#: The clock contenders are timed with: this thread's CPU time, not wall time. On a machine
#: shared with other work, wall time counts the moments another process had the CPU, which
#: land on one contender's pass and not the other's; CPU time counts only our own work.
CLOCK = time.thread_time
USER_ID = 1000
#: The bench's packets: 12-byte RTP header + 4-byte extension header in the clear, then the
#: encrypted 8-byte extension body before the Opus payload, and a 4-byte nonce suffix at the end.
HEADER_BYTES = 16
EXT_BODY_BYTES = 8
FLOOR_RATE = 16000


def read_packets(path: str) -> list[bytes]:
    out, data, i = [], open(path, "rb").read(), 0
    while i < len(data):
        (n,) = struct.unpack_from(">H", data, i)
        out.append(data[i + 2 : i + 2 + n])
        i += 2 + n
    return out


def _stubs(flavor: str) -> tuple[Any, Any]:
    waiter = SimpleNamespace(register=lambda d: None, unregister=lambda d: None)
    nobody = SimpleNamespace(get_member=lambda uid: None, get_user=lambda uid: None)
    if flavor == "voice-recv":
        vc = SimpleNamespace(guild=nobody, client=nobody, _get_id_from_ssrc=lambda s: USER_ID)
        sink = SimpleNamespace(wants_opus=lambda: False, voice_client=vc)
    else:
        conn = SimpleNamespace(dave_session=None, ssrc_user_map={})
        vc = SimpleNamespace(guild=nobody, client=nobody, _ssrc_to_id={}, _connection=conn)
        sink = SimpleNamespace(is_opus=lambda: False, client=vc)
    return SimpleNamespace(sink=sink, waiter=waiter), vc


def pipeline(flavor: str, mode: str, key: bytes) -> Any:
    """A function running one full pass over the packets; returns PCM samples produced."""
    import discord.opus

    if not discord.opus.is_loaded():
        discord.opus._load_default()
    if flavor == "voice-recv":
        from discord.ext.voice_recv import rtp
        from discord.ext.voice_recv.opus import PacketDecoder
        from discord.ext.voice_recv.reader import PacketDecryptor

        decode_rtp = rtp.decode_rtp

        def make_decryptor(vc: Any) -> Any:
            return PacketDecryptor(mode, key)
    else:
        # py-cord's modules (mypy sees discord.py's package of the same name)
        from discord.opus import PacketDecoder  # type: ignore[attr-defined]
        from discord.voice.packets import rtp as pycord_rtp
        from discord.voice.receive.reader import PacketDecryptor

        decode_rtp = pycord_rtp.decode

        def make_decryptor(vc: Any) -> Any:
            return PacketDecryptor(mode, key, vc)

    def run(packets: list[bytes]) -> tuple[float, int]:
        router, vc = _stubs(flavor)
        decryptor = make_decryptor(vc)
        decoders: dict[int, Any] = {}
        samples = 0
        started = CLOCK()
        for data in packets:
            packet = decode_rtp(data)
            packet.decrypted_data = decryptor.decrypt_rtp(packet)
            dec = decoders.get(packet.ssrc)
            if dec is None:
                dec = decoders[packet.ssrc] = PacketDecoder(router, packet.ssrc)
            dec.push_packet(packet)
            while (out := dec.pop_data()) is not None:
                samples += len(out.pcm) // 4
        for dec in decoders.values():
            while (out := dec.pop_data()) is not None:
                samples += len(out.pcm) // 4
        return CLOCK() - started, samples

    return run


def floor(key: bytes) -> Any:
    """The bench's floor for XChaCha20 without DAVE (see bench.receive.floor_runner)."""
    import discord.opus
    from nacl.bindings import crypto_aead_xchacha20poly1305_ietf_decrypt as decrypt

    if not discord.opus.is_loaded():
        discord.opus._load_default()
    # A handle of our own on the same libopus: discord.py's functions carry errcheck wrappers.
    lib = ctypes.CDLL(discord.opus._lib._name)
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int,
                                        ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int32,
                                ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.opus_decode.restype = ctypes.c_int
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decoder_destroy.restype = None
    pad = bytes(20)
    frame = FLOOR_RATE // 50

    def run(packets: list[bytes]) -> tuple[float, int]:
        err = ctypes.c_int(0)
        state = lib.opus_decoder_create(FLOOR_RATE, 1, ctypes.byref(err))
        buf = (ctypes.c_int16 * (frame * 6))()
        ptr, cap = ctypes.addressof(buf), frame * 6
        decode = lib.opus_decode
        total = 0
        started = CLOCK()
        for data in packets:
            plain = decrypt(data[HEADER_BYTES:-4], data[:HEADER_BYTES], data[-4:] + pad, key)
            payload = plain[EXT_BODY_BYTES:]
            total += decode(state, payload, len(payload), ptr, cap, 0)
        elapsed = CLOCK() - started
        lib.opus_decoder_destroy(state)
        if total != len(packets) * frame:
            raise RuntimeError(f"floor decoded {total} samples, expected {len(packets) * frame}")
        return elapsed, total

    return run


def _timed(run: Any, packets: list[bytes]) -> tuple[float, int]:
    gc.collect()
    gc.disable()
    try:
        seconds, samples = run(packets)
    finally:
        gc.enable()
    return seconds / len(packets) * _US, samples


def main() -> None:
    flavor, path, mode, key_hex, repeats = sys.argv[1:6]
    packets = read_packets(path)
    key = bytes.fromhex(key_hex)
    run = pipeline(flavor, mode, key)
    base = floor(key)
    runs: list[float] = []
    floor_runs: list[float] = []
    samples = 0
    for r in range(int(repeats)):
        if r % 2 == 0:
            us, samples = _timed(run, packets)
            f, _ = _timed(base, packets)
        else:
            f, _ = _timed(base, packets)
            us, samples = _timed(run, packets)
        runs.append(us)
        floor_runs.append(f)
    ratios = [a / b for a, b in zip(runs, floor_runs, strict=True)]
    print(json.dumps({"flavor": flavor, "us_per_packet": statistics.median(runs),
                      "runs": runs, "floor_runs": floor_runs, "ratios": ratios,
                      "samples": samples, "packets": len(packets)}))


if __name__ == "__main__":
    main()

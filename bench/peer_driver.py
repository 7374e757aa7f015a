"""Drive a peer library's receive pipeline with the bench's packets; print one JSON line.

Runs *inside the peer's venv* (``python bench/peer_driver.py FLAVOR FILE MODE KEYHEX REPEATS``),
so it imports nothing from cantobot. FLAVOR is ``voice-recv`` (discord-ext-voice-recv) or
``py-cord``. Both libraries' receive path is: ``decode`` the RTP packet, ``PacketDecryptor``
(transport AEAD, extension header), then a per-SSRC ``PacketDecoder`` with its heap jitter
buffer and ``discord.opus.Decoder`` (48 kHz stereo PCM, their sinks' input). Their reader and
router threads only move packets between these calls; they are replaced by a plain loop here,
with stand-ins for the voice client objects the decoder consults for a member lookup.
Output: ``{"flavor", "us_per_packet", "runs", "samples"}``; no DAVE (packets must be DAVE-off).
"""

from __future__ import annotations

import json
import statistics
import struct
import sys
import time
from types import SimpleNamespace
from typing import Any

_US = 1e6
USER_ID = 1000


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
        started = time.perf_counter()
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
        return time.perf_counter() - started, samples

    return run


def main() -> None:
    flavor, path, mode, key_hex, repeats = sys.argv[1:6]
    packets = read_packets(path)
    run = pipeline(flavor, mode, bytes.fromhex(key_hex))
    runs, samples = [], 0
    for _ in range(int(repeats)):
        seconds, samples = run(packets)
        runs.append(seconds / len(packets) * _US)
    print(json.dumps({"flavor": flavor, "us_per_packet": statistics.median(runs),
                      "runs": runs, "samples": samples, "packets": len(packets)}))


if __name__ == "__main__":
    main()

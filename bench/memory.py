"""Memory: RSS per active speaker, and RSS over a one-hour session in simulated time.

Each measurement runs in a fresh interpreter (``python -m bench.memory per-speaker N`` or
``... hour SPEAKERS``) so that nothing the parent allocated blurs the figure; it prints one JSON
line. RSS is ``VmRSS`` from ``/proc/self/status``.

* per-speaker: N speakers each send 2 s of packets into one :class:`VoiceReceiver` (an SSRC
  state, a jitter buffer and a libopus decoder each), each gets a :class:`Chunker` and an
  unconnected :class:`SttSession` holding 3 s of unconfirmed audio (a commit every few seconds
  is normal speech; the bound, ``stt.max_buffer_seconds`` = 120 s, would be 3.75 MiB).
  Figure: (RSS after - RSS before) / N.
* hour: a receiver fed an hour of packets per speaker as fast as it decodes them (stream time
  advances 20 ms per packet, ticks every 50 ms), RSS sampled every simulated 5 minutes.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from typing import Any, Final

import numpy as np

from bench.media import PACKETS_PER_SECOND, make_packets, record
from bench.receive import STT_RATE, TICK_SECONDS
from bot.audio.convert import Chunker
from bot.stt.session import SttSession
from bot.voice.crypto import MODE_AES256_GCM
from bot.voice.receiver import VoiceReceiver

UNCONFIRMED_SECONDS: Final = 3.0
SAMPLE_EVERY_S: Final = 300.0
RUN_TIMEOUT_S: Final = 900


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def per_speaker(n: int) -> dict[str, Any]:
    rec = record(2.0)
    packets = make_packets(rec.opus, rec.levels, mode=MODE_AES256_GCM, dave=False, speakers=n)
    audio = bytes(int(UNCONFIRMED_SECONDS * STT_RATE) * 2)
    gc.collect()
    before = rss_bytes()
    chunkers = {s.user_id: Chunker(STT_RATE, 100) for s in packets.speakers}
    sessions = [SttSession(url="http://127.0.0.1:9", api_key="k", sample_rate=STT_RATE,
                           speaker=f"s{s.user_id}", on_event=lambda e: None)
                for s in packets.speakers]
    for session in sessions:
        for i in range(0, len(audio), 3200):
            session.send_audio(audio[i : i + 3200])

    def on_audio(user_id: int, pcm: np.ndarray) -> None:
        chunkers[user_id].push(pcm)

    receiver = VoiceReceiver(sample_rate=STT_RATE, on_audio=on_audio, on_idle=lambda u: None,
                             is_ignored=lambda u: False, batch_ms=100)
    receiver.set_transport(packets.mode, packets.secret_key)
    for s in packets.speakers:
        receiver.on_speaking(s.user_id, s.ssrc, 0.0)
    for i, (_k, data) in enumerate(packets.datagrams):
        receiver.handle_packet(data, i / n / PACKETS_PER_SECOND)
    gc.collect()
    after = rss_bytes()
    assert len(receiver.active_members()) == n
    return {"speakers": n, "rss_before": before, "rss_after": after,
            "bytes_per_speaker": (after - before) / n}


def hour(speakers: int, seconds: float = 3600.0) -> dict[str, Any]:
    rec = record(20.0)
    packets = make_packets(rec.opus, rec.levels, mode=MODE_AES256_GCM, dave=False,
                           speakers=speakers)
    chunkers = {s.user_id: Chunker(STT_RATE, 100) for s in packets.speakers}
    chunks = 0

    def on_audio(user_id: int, pcm: np.ndarray) -> None:
        nonlocal chunks
        chunks += len(chunkers[user_id].push(pcm))

    receiver = VoiceReceiver(sample_rate=STT_RATE, on_audio=on_audio, on_idle=lambda u: None,
                             is_ignored=lambda u: False, batch_ms=100)
    receiver.set_transport(packets.mode, packets.secret_key)
    for s in packets.speakers:
        receiver.on_speaking(s.user_id, s.ssrc, 0.0)
    # The recorded 20 s loop is re-sent with continuing sequence numbers and timestamps.
    from bench.media import FRAME_SAMPLES
    from bot.sim.sender import build_rtp_header
    from bot.voice.crypto import TransportCipher
    cipher = TransportCipher(packets.mode, packets.secret_key)
    frames = len(rec.opus)
    total = int(seconds * PACKETS_PER_SECOND)
    samples: list[tuple[float, int]] = [(0.0, rss_bytes())]
    per_tick = max(1, round(TICK_SECONDS * PACKETS_PER_SECOND))
    nonce = 1
    for i in range(total):
        now = i / PACKETS_PER_SECOND
        for s in packets.speakers:
            header, ext = build_rtp_header(i & 0xFFFF, (i * FRAME_SAMPLES) & 0xFFFFFFFF,
                                           s.ssrc, extension=bytes(8))  # padding
            data = cipher.encrypt(header, ext, rec.opus[i % frames], nonce)
            nonce = nonce % 0xFFFFFFFF + 1
            receiver.handle_packet(data, now)
        if i % per_tick == per_tick - 1:
            receiver.tick(now)
        if i and i % int(SAMPLE_EVERY_S * PACKETS_PER_SECOND) == 0:
            samples.append((now, rss_bytes()))
    samples.append((total / PACKETS_PER_SECOND, rss_bytes()))
    bad = {k: v for k, v in receiver.counters().as_dict().items()
           if k not in ("received", "decoded", "waiting") and v}
    return {"speakers": speakers, "seconds": seconds, "chunks": chunks, "problems": bad,
            "rss": samples, "growth_after_first_sample": samples[-1][1] - samples[1][1]}


def run_isolated(*args: str) -> dict[str, Any]:
    """One measurement in a fresh interpreter; its JSON line."""
    proc = subprocess.run([sys.executable, "-m", "bench.memory", *args], capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, check=True)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


if __name__ == "__main__":
    kind, value = sys.argv[1], sys.argv[2]
    if kind == "per-speaker":
        print(json.dumps(per_speaker(int(value))))
    else:
        seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3600.0
        print(json.dumps(hour(int(value), seconds)))

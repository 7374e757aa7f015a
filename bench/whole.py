"""Row 3: the whole bot with N speakers, through the ``cantobot simulate`` harness.

``python -m bench.whole N`` (a fresh interpreter per N, one JSON line out) runs
:func:`bot.sim.simulate.simulate`: the real :class:`bot.app.CantoBot` logged into LocalDiscord in
this process, members speaking tone-coded Cantonese in real time with DAVE on, and the
loopback cantonese.ai fake (``python -m bot fake-stt``) in *another* process, so its tone
decoding is not charged here. This process's CPU therefore is the bot plus LocalDiscord's side
of the call (per member: Opus encoding, DAVE and transport encryption, UDP sends).

Delay: a committed transcript arriving is seen where the meeting handles it (bot.meeting logs
``line N from SPEAKER posted`` synchronously in its STT event callback; a logging handler stamps
it with ``time.monotonic``); its Discord message request is stamped when LocalDiscord records
the posted message (``simulate``'s ``on_message``, called as the REST request is handled)
whose text is the line's.
Commits and requests are matched per speaker, in order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Final

import numpy as np

from bot.config import load_config, with_overrides
from bot.sim.discord.state import PostedMessage
from bot.sim.simulate import SimSpeaker, simulate
from bot.sim.tonecode import speech_track

RUN_TIMEOUT_S: Final = 600
API_KEY: Final = "bench-key"
LINES_PER_SPEAKER: Final = 2
_LINE_RE = re.compile(r"line \d+ from (\S+) posted")


class _CommitClock(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.commits: list[tuple[str, float]] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = _LINE_RE.search(record.getMessage())
        if m:
            self.commits.append((m.group(1), time.monotonic()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def speakers(n: int) -> tuple[list[SimSpeaker], dict[str, str]]:
    """n members, each saying LINES_PER_SPEAKER unique lines; text -> speaker name."""
    out, owner = [], {}
    for i in range(n):
        name = f"m{i}"
        lines = [(0.5 + 5.0 * k + 0.3 * (i % 5), f"第{i}號講第{k}句") for k in
                 range(LINES_PER_SPEAKER)]
        for _, text in lines:
            owner[text] = name
        mono = speech_track(lines, 48000, duration=5.0 * LINES_PER_SPEAKER + 2.0)
        pcm = np.clip(mono * 32767 * 0.5, -32768, 32767).astype(np.int16)
        out.append(SimSpeaker(name, np.repeat(pcm[:, None], 2, axis=1)))
    return out, owner


async def run(n: int) -> dict[str, Any]:
    port = _free_port()
    stt = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "fake-stt", "--port", str(port), "--api-key", API_KEY,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    clock = _CommitClock()
    logging.getLogger("bot.meeting").addHandler(clock)
    logging.getLogger("bot.meeting").setLevel(logging.INFO)
    try:
        for _ in range(100):  # wait for the fake to listen
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.1)
        config = with_overrides(load_config(None, environ={}),
                                stt={"url": f"http://127.0.0.1:{port}", "api_key": API_KEY})
        people, owner = speakers(n)
        posted_at: list[tuple[str, float]] = []

        def on_message(message: PostedMessage) -> None:
            posted_at.append((message.content, time.monotonic()))

        cpu0, wall0 = time.process_time(), time.monotonic()
        await simulate(people, config, on_message=on_message)
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
        rss = _rss_mib()
    finally:
        stt.terminate()
        async with asyncio.timeout(10):
            await stt.wait()
    posted: dict[str, list[float]] = {}
    for content, at in posted_at:
        for text, name in owner.items():
            if text in content:
                posted.setdefault(name, []).append(at)
    committed: dict[str, list[float]] = {}
    for name, at in clock.commits:
        committed.setdefault(name, []).append(at)
    delays = sorted((p - c) * 1000 for name, cs in committed.items()
                    for c, p in zip(cs, posted.get(name, []), strict=False))
    return {
        "speakers": n,
        "cpu_percent": cpu / wall * 100,
        "rss_mib": rss,
        "lines": len(delays),
        "expected_lines": n * LINES_PER_SPEAKER,
        "p50_ms": statistics.median(delays) if delays else float("nan"),
        "p99_ms": delays[min(len(delays) - 1, int(0.99 * len(delays)))] if delays else float(
            "nan"),
    }


def row3(counts: tuple[int, ...] = (2, 12)) -> list[dict[str, Any]]:
    out = []
    for n in counts:
        proc = subprocess.run([sys.executable, "-m", "bench.whole", str(n)], capture_output=True,
                              text=True, timeout=RUN_TIMEOUT_S)
        if proc.returncode != 0:
            logging.getLogger(__name__).warning("whole bot with %d speakers failed: %s", n,
                                                proc.stderr[-2000:])
            continue
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(int(sys.argv[1])))))

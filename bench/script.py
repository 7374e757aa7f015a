"""Row ``script``: converting one committed line for showing (OpenCC script + PyCantonese
Jyutping), per line, after :func:`bot.transcript.script.warm_up`.

Lines are cut at random offsets from mixed Cantonese-English meeting speech, 20 and 200
characters long; the memo caches are cleared before each timed call, so every figure is a
first conversion (what a new committed line costs), never a cache hit. Wall time includes
whatever else the machine runs (on a shared machine, its p99 is mostly preemption); CPU time is
the calling thread's own (``time.thread_time``), the cost of the conversion itself.
``python -m bench.script [N]`` prints the rows as JSON lines.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass

from bot.transcript import script
from bot.transcript.script import JyutpingMode, Readability, Script

#: Meeting speech the lines are cut from (Hong Kong Traditional with code-switching).
SPEECH = (
    "大家好，今日開會主要傾下個季度嘅預算。我哋上次講過marketing嗰邊要加人，"
    "但係finance話暫時冇咁多錢，所以要再諗下點樣分配。阿明，你可唔可以先講下你哋team嘅情況？"
    "好，我哋而家有五個人，project已經delay咗兩個禮拜，如果唔加人嘅話，好難喺年尾之前完成。"
    "明白，咁我建議先畀一個contract staff你哋，三個月之後再review。大家有冇問題？"
    "冇問題，不過我想確認下個budget係咪已經批咗，定係仲要等老闆sign？"
    "應該下個禮拜一就有答覆，到時我send個email畀大家。好，咁今日就講到呢度，拜拜。"
)
SIZES = (20, 200)
TARGET_P99_MS = 2.0


@dataclass(frozen=True)
class ScriptRow:
    chars: int
    mode: str
    lines: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    cpu_p50_ms: float
    cpu_p99_ms: float


def _lines(size: int, n: int, rng: random.Random) -> list[str]:
    text = SPEECH * (size // len(SPEECH) + 2)
    return [text[(o := rng.randrange(len(SPEECH))):o + size] for _ in range(n)]


def _pct(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, int(q * len(sorted_ms)))]


def row_script(n: int = 2000, seed: int = 14) -> list[ScriptRow]:
    """p50/p99/max ms per line for each size, script only and script + Jyutping line."""
    asyncio.run(script.warm_up())
    rng = random.Random(seed)
    modes = {"simplified": Readability(Script.SIMPLIFIED, JyutpingMode.OFF),
             "simplified + jyutping": Readability(Script.SIMPLIFIED, JyutpingMode.LINE)}
    out = []
    for size in SIZES:
        lines = _lines(size, n, rng)
        for label, readability in modes.items():
            times, cpu = [], []
            for line in lines:
                script.clear_caches()
                t0, c0 = time.perf_counter(), time.thread_time()
                script.read_line(line, readability)
                cpu.append((time.thread_time() - c0) * 1000)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            cpu.sort()
            out.append(ScriptRow(size, label, n, _pct(times, 0.5), _pct(times, 0.99), times[-1],
                                 _pct(cpu, 0.5), _pct(cpu, 0.99)))
    return out


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    for r in row_script(count):
        print(json.dumps(asdict(r)), flush=True)

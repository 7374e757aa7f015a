"""``python -m bench [--quick] [--rows 1,2,3,4,mem,script,speech] [--no-install]``: Markdown tables,
then one JSON line ``{"speakers_per_core": N, "floor_ratio": R, "added_latency_ms_p99": L}``.

N: concurrent speakers one core sustains for receive + convert + upstream emit at 100 ms chunks
(1 s / (50 x product µs per packet + client CPU per session-second of row 2)), AES-GCM with DAVE
on (what Discord negotiates today). R: the product's receive path over the floor on the same
packets. L: p99 of what is added on top of filling one chunk: row 2's send lag plus one
packet's receive time.

``--quick`` (under 45 s): 10 s of speech, 3 repeats, two packet sets, row 2 at 200 sessions
for 3 s, peers only if their venvs already exist; no rows 3 and memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
from typing import Any

from bench.media import MODES, make_packets, record
from bench.receive import Timing, row1
from bot.voice.crypto import MODE_AES256_GCM, MODE_XCHACHA20

log = logging.getLogger("bench")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _f(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced rows 1, 2, 4 (< 45 s)")
    parser.add_argument("--rows", default="1,2,3,4,mem,script,speech",
                        help="comma-separated subset of 1,2,3,4,mem,script,speech "
                             "(default: all)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not create the peers' venvs (skip peers without one)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    rows = {"1", "2", "4", "script"} if args.quick else set(args.rows.split(","))
    quick = args.quick
    started = time.monotonic()
    seconds = 10.0 if quick else 30.0
    repeats = 3 if quick else 7
    print(f"# cantobot bench{' (quick)' if quick else ''}\n")
    print(f"Machine: {os.cpu_count()} CPUs, {cpu_model()}; Python {platform.python_version()}; "
          f"load average at start {os.getloadavg()[0]:.2f}\n")

    rec = record(seconds)
    print(f"Input: {rec.seconds:g} s of synthetic speech, {len(rec.opus)} Opus packets "
          f"(48 kHz stereo, 20 ms, 64 kbit/s, FEC; mean "
          f"{sum(map(len, rec.opus)) / len(rec.opus):.0f} bytes), one speaker; "
          f"median of {repeats} runs.\n")
    combos = ([(MODE_AES256_GCM, True), (MODE_XCHACHA20, False)] if quick
              else [(m, d) for m in MODES for d in (True, False)])
    sets = [make_packets(rec.opus, rec.levels, mode=m, dave=d) for m, d in combos]
    timings: list[Timing] = []
    if rows & {"1", "4"}:
        timings = row1(rec, sets, repeats)
    by = {(t.name, t.label): t for t in timings}
    headline = "aes-gcm, DAVE on"
    product = by.get(("product", headline))
    floor = by.get(("floor", headline))
    floor_ratio = product.us_per_packet / floor.us_per_packet if product and floor else None

    if "1" in rows and timings:
        print("## 1. Receive path per speaker (decrypt -> DAVE -> jitter -> Opus to 16 kHz mono "
              "-> 100 ms chunks)\n")
        print(table(
            ["packets", "µs / packet (min..max)", "CPU % of a core per speaker",
             "speakers / core (receive only)"],
            [[t.label, f"{_f(t.us_per_packet)} ({_f(t.spread[0])}..{_f(t.spread[1])})",
              _f(t.core_percent_per_speaker, 2), _f(t.speakers_per_core, 0)]
             for t in timings if t.name == "product"]))
        print()

    upstream: list[Any] = []
    if "2" in rows:
        from bench.upstream import row2
        counts = (200,) if quick else (50, 200, 500)
        upstream = asyncio.run(row2(counts, 3.0 if quick else 10.0))
        print("## 2. Upstream: N SttSessions, 100 ms chunks, loopback Socket.IO server "
              "(another process)\n")
        print(table(
            ["sessions", "client CPU % of a core", "µs CPU / session-second",
             "server CPU %", "send lag p50 / p99 / max (ms)", "chunks arrived"],
            [[str(u.sessions), _f(u.cpu_percent), _f(u.us_per_session_second, 0),
              _f(u.server_cpu_percent), f"{_f(u.lag_p50_ms, 2)} / {_f(u.lag_p99_ms, 2)} / "
              f"{_f(u.lag_max_ms, 2)}", f"{u.chunks_arrived}/{u.chunks_sent}"]
             for u in upstream]))
        print()

    whole: list[Any] = []
    if "3" in rows and not quick:
        from bench.whole import row3
        whole = row3()
        if whole:
            print("## 3. Whole bot (cantobot simulate harness: LocalDiscord + the real CantoBot "
                  "in one process, STT stand-in in another)\n")
            print(table(
                ["speakers", "process CPU % (bot + LocalDiscord)", "RSS MiB",
                 "commit -> Discord request p50 / p99 (ms)", "lines"],
                [[str(w["speakers"]), _f(w["cpu_percent"]), _f(w["rss_mib"]),
                  f"{_f(w['p50_ms'], 2)} / {_f(w['p99_ms'], 2)}", str(w["lines"])]
                 for w in whole]))
            if len(whole) >= 2:
                a, b = whole[0], whole[-1]
                dn = b["speakers"] - a["speakers"]
                print(f"\nPer added speaker: {_f((b['cpu_percent'] - a['cpu_percent']) / dn, 2)}"
                      f" % CPU (includes LocalDiscord's Opus encode + encryption of that "
                      f"member), {_f((b['rss_mib'] - a['rss_mib']) / dn * 1024, 0)} KiB RSS.")
            print()

    peers: list[Any] = []
    if "4" in rows and timings:
        from bench.peers import run_peers
        peer_set = next((s for s in sets if s.mode == MODE_XCHACHA20 and not s.dave), None)
        if peer_set is not None:
            peers = run_peers(peer_set, repeats, install=not (quick or args.no_install))
        print("## 4. The floor and the peers, same packets\n")
        rows4 = []
        for s in sets:
            f = by[("floor", s.label)]
            for name in ("floor", "floor 48k stereo", "product", "plain"):
                t = by[(name, s.label)]
                rows4.append([s.label, name, _f(t.us_per_packet),
                              f"{t.us_per_packet / f.us_per_packet:.2f}x"])
            if s is peer_set:
                for p in peers:
                    rows4.append([s.label, f"{p.flavor} {p.version} (48 kHz stereo out)",
                                  _f(p.us_per_packet), f"{p.us_per_packet / f.us_per_packet:.2f}x"])
        print(table(["packets", "contender", "µs / packet", "ratio to floor"], rows4))
        print("\nfloor: transport AEAD (+ davey) + ctypes opus_decode straight to 16 kHz mono "
              "into a preallocated buffer. plain: discord.py opus.Decoder (48 kHz stereo) + numpy "
              "downmix + soxr stream resample to 16 kHz. Peers: their own rtp decode, "
              "PacketDecryptor, PacketDecoder (heap jitter buffer + discord.opus.Decoder), "
              "driven without their threads.\n")

    if "mem" in rows and not quick:
        from bench.memory import run_isolated
        per = run_isolated("per-speaker", "200")
        hour = run_isolated("hour", "2")
        print("## Memory\n")
        print(f"- RSS per active speaker (200 speakers, receiver state + Opus decoder + chunker "
              f"+ SttSession holding 3 s unconfirmed audio): "
              f"{per['bytes_per_speaker'] / 1024:.0f} KiB")
        samples = ", ".join(f"{t / 60:.0f} min {r / 2**20:.1f} MiB" for t, r in hour["rss"])
        print(f"- One hour of simulated time, 2 speakers ({hour['chunks']} chunks): RSS {samples};"
              f" growth after the first 5 min: {hour['growth_after_first_sample'] / 1024:.0f} KiB"
              f"{'; problems: ' + str(hour['problems']) if hour['problems'] else ''}\n")

    if "script" in rows:
        from bench.script import TARGET_P99_MS, row_script
        script_rows = row_script(500 if quick else 2000)
        print("## Readability: one committed line converted for showing (after warm-up)\n")
        print(table(
            ["chars", "conversion", "wall p50 / p99 / max (ms)", "CPU p50 / p99 (ms)",
             f"CPU p99 ≤ {TARGET_P99_MS:g} ms"],
            [[str(r.chars), r.mode, f"{r.p50_ms:.3f} / {r.p99_ms:.3f} / {r.max_ms:.3f}",
              f"{r.cpu_p50_ms:.3f} / {r.cpu_p99_ms:.3f}",
              "yes" if r.cpu_p99_ms <= TARGET_P99_MS else "no"] for r in script_rows]))
        print()

    if "speech" in rows and not quick:
        from bench.speech import REPLAY_SPEED, row_speech
        speech_rows = row_speech()
        print("## Audio sent to the STT service ÷ speech (silence gating off = every sample; "
              f"on = speech + 200 ms pre-roll + silence tail; replay at {REPLAY_SPEED:g}x)\n")
        print(table(
            ["input", "gating", "speech s", "sent s", "sent ÷ speech", "lines",
             "worst line start − speech start"],
            [[r.source, r.gating, _f(r.speech_s), _f(r.sent_s), f"{r.ratio:.2f}x",
              f"{r.lines}/{r.expected_lines}",
              "" if r.worst_time_error_s is None else f"{r.worst_time_error_s:.2f} s"]
             for r in speech_rows]))
        print()

    speakers_per_core = latency = None
    up = next((u for u in upstream if u.sessions == 200), upstream[-1] if upstream else None)
    if product is not None and up is not None:
        per_speaker_us = product.us_per_packet * 50 + up.us_per_session_second
        speakers_per_core = 1e6 / per_speaker_us
        latency = up.lag_p99_ms + product.us_per_packet / 1000
        print("## Targets\n")
        print(table(["target", "measured", "met"], [
            ["≥ 300 speakers / core (receive + convert + emit, 100 ms chunks)",
             f"{speakers_per_core:.0f} ({per_speaker_us / 1000:.2f} ms CPU per speaker-second"
             f" = {_f(product.us_per_packet * 50 / 1000, 2)} receive + "
             f"{_f(up.us_per_session_second / 1000, 2)} upstream at {up.sessions} sessions)",
             "yes" if speakers_per_core >= 300 else "no"],
            ["receive path ≤ 1.5x the libopus floor",
             f"{floor_ratio:.2f}x" if floor_ratio else "?",
             "yes" if floor_ratio and floor_ratio <= 1.5 else "no"],
            ["audio at the STT socket ≤ one chunk + 5 ms after its packet",
             f"one chunk + {latency:.2f} ms (p99, {up.sessions} sessions)",
             "yes" if latency <= 5 else "no"],
            *([["commit -> Discord request ≤ 50 ms p99",
                f"{max(w['p99_ms'] for w in whole):.1f} ms", "yes" if max(
                    w["p99_ms"] for w in whole) <= 50 else "no"]] if whole else []),
        ]))
        print()
    print(f"Wall time: {time.monotonic() - started:.1f} s; load average at end "
          f"{os.getloadavg()[0]:.2f}\n")
    print(json.dumps({
        "speakers_per_core": round(speakers_per_core) if speakers_per_core else None,
        "floor_ratio": round(floor_ratio, 3) if floor_ratio else None,
        "added_latency_ms_p99": round(latency, 2) if latency is not None else None,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

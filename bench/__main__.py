"""``python -m bench [--quick] [--rows 1,2,2e,2u,3,4,mem,script,speech] [--no-install]``: Markdown
tables, then one JSON line
``{"speakers_per_core": N, "floor_ratio": R, "added_latency_ms_p99": L, ...}`` (also row 2e's
and row 2u's speakers per core and lag p99, row 2u's at 250 speakers).

Steadiness: compared contenders run interleaved within every repeat (same packets, alternating
order), and every ratio is the median of per-repeat ratios, printed with its (min..max) spread.
Row 2 pins the loopback STT server and this process to different CPUs (on a machine with two or
more), so the server's CPU is not counted as the client's latency.

N: concurrent speakers one core sustains for receive + convert + upstream emit at 100 ms chunks
(1 s / (50 x product µs per packet + client CPU per session-second of row 2)), AES-GCM with DAVE
on (what Discord negotiates today). R: the product's receive path over the floor on the same
packets (median of per-repeat ratios). L: p99 of what is added on top of filling one chunk:
row 2's send lag plus one packet's receive time. ``floor_us_per_packet``: the floor itself,
bare libopus (+ AEAD, davey) on this host at this moment; a shared VM's speed moves by 20 % or
more from one hour to the next, and this says which speed the line was measured at.

``--quick`` (under 45 s): 10 s of speech, 15 repeats (peers 9), two packet sets, row 2 at 250
sessions for 2.4 s, row 2e at 250 speakers for 1.2 s per variant (variants interleaved) and row
2u (real UDP) at 250 speakers for 2 s, product only; peers only if their venvs already exist;
no rows 3, memory and speech, and no row 2e at 400 speakers (the full run's capacity check).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from typing import Any

from bench.media import MODES, make_packets, record
from bench.receive import Timing, row1
from bot.config import SttConfig
from bot.voice.crypto import MODE_AES256_GCM, MODE_XCHACHA20

log = logging.getLogger("bench")

#: Sessions per process of issue 15's latency target: row 2 and the headline latency are
#: measured at this count, and rows 2e and 2u too.
SIZING = 250
#: What ``stt.max_sessions`` defaults to (the README's sizing): a full run measures row 2u here
#: too, where one process keeps real time with headroom and a low lag.
PER_PROCESS: int = next(f.default for f in dataclasses.fields(SttConfig)
                        if f.name == "max_sessions")  # type: ignore[assignment]
#: Issue 15's capacity target: speakers one process (one event loop, so one core) handles end to
#: end in real time. Row 2e runs it too in a full run: rows 1 + 2 added up are an estimate; this
#: is the check (the per-chunk cost falls as the loop gets busier and handles more per wake-up).
CAPACITY = 400


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


def _ratio(median: float, spread: tuple[float, float]) -> str:
    return f"{median:.2f}x ({spread[0]:.2f}..{spread[1]:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="reduced rows 1, 2, 4 (< 45 s)")
    parser.add_argument("--rows", default="1,2,2e,2u,3,4,mem,script,speech",
                        help="comma-separated subset of 1,2,2e,2u,3,4,mem,script,speech "
                             "(default: all)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not create the peers' venvs (skip peers without one)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    rows = ({"1", "2", "2e", "2u", "4", "script"} if args.quick
            else set(args.rows.split(",")))
    quick = args.quick
    started = time.monotonic()
    seconds = 10.0 if quick else 30.0
    repeats = 15
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
    lean = by.get(("lean (prototype)", headline))
    floor = by.get(("floor", headline))
    floor_ratio = product.ratio if product and floor else None

    if "1" in rows and timings:
        print("## 1. Receive path per speaker (decrypt -> DAVE -> jitter -> Opus to 16 kHz mono "
              "-> 100 ms chunks)\n")
        print(table(
            ["packets", "µs / packet (min..max)", "ratio to floor (min..max)",
             "CPU % of a core per speaker", "speakers / core (receive only)"],
            [[t.label, f"{_f(t.us_per_packet)} ({_f(t.spread[0])}..{_f(t.spread[1])})",
              _ratio(t.ratio, t.ratio_spread),
              _f(t.core_percent_per_speaker, 2), _f(t.speakers_per_core, 0)]
             for t in timings if t.name == "product"]))
        print()

    # As `cantobot run` does at its first READY: what start-up built leaves the collector's
    # full passes, so the event-loop rows below see the pauses a running bot sees (row 1 times
    # CPU with the collector off and is left as it was).
    from bot.app import freeze_startup_heap
    freeze_startup_heap()

    upstream: list[Any] = []
    if "2" in rows:
        from bench.upstream import row2
        counts = (SIZING,) if quick else (50, SIZING, 500)
        upstream = asyncio.run(row2(counts, 2.4 if quick else 12.0,
                                    repeats=2 if quick else 4))
        pinned = bool(upstream) and upstream[0].pinned
        print("## 2. Upstream: N SttSessions, 100 ms chunks, loopback Socket.IO server "
              "(another process)\n")
        print(("Server and client pinned to different CPUs (os.sched_setaffinity), so the "
               "server's CPU is not the client's latency. " if pinned else
               "Server and client NOT pinned (fewer than 2 CPUs or no sched_setaffinity): the "
               "server's CPU competes with the client's. ") +
              "Send path: SttSession.send_audio (each chunk one websocket frame, written in the "
              "call that queues it when nothing is ahead).\n")
        print(table(
            ["sessions", "send path", "client CPU % of a core", "µs CPU / session-second",
             "CPU vs product per round", "server CPU %", "send lag p50 / p99 / max (ms)",
             "p99 per round (ms)", "chunks arrived"],
            [[str(u.sessions), u.variant, _f(u.cpu_percent), _f(u.us_per_session_second, 0),
              (_ratio(statistics.median(u.cpu_ratios),
                      (min(u.cpu_ratios), max(u.cpu_ratios)))
               if u.cpu_ratios and u.variant != "product" else "-"),
              _f(u.server_cpu_percent), f"{_f(u.lag_p50_ms, 2)} / {_f(u.lag_p99_ms, 2)} / "
              f"{_f(u.lag_max_ms, 2)}", " ".join(_f(x, 1) for x in u.lag_p99_per_round),
              f"{u.chunks_arrived}/{u.chunks_sent}"]
             for u in upstream]))
        print()

    e2e: list[Any] = []
    if "2e" in rows:
        from bench.e2e import row2e
        e2e = asyncio.run(row2e(rec, (SIZING,) if quick else (SIZING, CAPACITY),
                                1.2 if quick else 8.0, repeats=2 if quick else 4))
        print(f"## 2e. End to end in one process: {SIZING} (and in a full run {CAPACITY}) "
              "speakers' packets -> VoiceReceiver "
              "-> Chunker -> SttSession -> loopback server (pinned as in row 2; AES-GCM, "
              "DAVE off; UDP reads not included)\n")
        print("product: as shipped. lean: the receive prototype of bench/lean.py (no receiver "
              "bookkeeping), into the same sessions; not shipped, it shows what is left above "
              "the floor. CPU is per second of audio handled; lag runs from the moment the "
              "chunk's last packet was due.\n")
        print(table(
            ["speakers", "send path", "process CPU % of a core", "µs CPU / speaker-second",
             "speakers / core", "CPU vs product per round",
             "packet due -> chunk at server p50 / p99 / max (ms)", "p99 per round (ms)",
             "chunks arrived", "real time kept"],
            [[str(e.speakers), e.variant, _f(e.cpu_percent), _f(e.us_per_speaker_second, 0),
              _f(e.speakers_per_core, 0),
              (_ratio(statistics.median(e.cpu_ratios), (min(e.cpu_ratios), max(e.cpu_ratios)))
               if e.cpu_ratios and e.variant != "product" else "-"),
              f"{_f(e.lag_p50_ms, 2)} / {_f(e.lag_p99_ms, 2)} / {_f(e.lag_max_ms, 2)}",
              " ".join(_f(x, 1) for x in e.lag_p99_per_round),
              f"{e.chunks_arrived}/{e.chunks_sent}",
              "yes" if e.behind_s < 0.05 else f"no ({e.behind_s:.2f} s behind)"]
             for e in e2e]))
        print()

    udp: list[Any] = []
    if "2u" in rows:
        from bench.e2e_udp import row2u
        udp = asyncio.run(row2u((SIZING,), 2.0, ("loop",)) if quick else row2u(
            tuple(sorted({PER_PROCESS, SIZING})), 8.0, ("loop", "lean", "thread")))
        sizes = " and ".join(str(n) for n in sorted({u.speakers for u in udp}))
        print(f"## 2u. End to end with real UDP: {sizes} speakers' datagrams from another "
              "process over loopback UDP -> row 2e's product path (this process, all its "
              "threads, pinned to one CPU)\n")
        print("product: the listener reads the socket on the event loop (what row 2e leaves "
              "out: a recv per datagram and the loop's wake-ups). reader thread: discord.py's "
              "socket-reader thread into the inbox (a select and a recv per datagram, the GIL "
              "handed between it and the loop): the fallback where the loop cannot watch "
              "sockets, and the product before. lean: the receive prototype of bench/lean.py "
              "in the product's place, read as the product reads (not shipped: the least Python "
              "this path can have). Lag runs from the moment the sender sent the "
              "chunk's last datagram (its log of when each burst went out) to the chunk at the "
              "server, so time in the socket's receive buffer counts.\n")
        print(table(
            ["speakers", "reader", "process CPU % of a core", "µs CPU / speaker-second",
             "speakers / core", "datagram sent -> chunk at server p50 / p99 / max (ms)",
             "chunks arrived", "real time kept"],
            [[str(u.speakers), u.variant, _f(u.cpu_percent), _f(u.us_per_speaker_second, 0),
              _f(u.speakers_per_core, 0),
              f"{_f(u.lag_p50_ms, 2)} / {_f(u.lag_p99_ms, 2)} / {_f(u.lag_max_ms, 2)}",
              f"{u.chunks_arrived}/{u.chunks_sent}",
              "yes" if u.behind_s < 0.05 else f"no ({u.behind_s:.2f} s behind or lost)"]
             for u in udp]))
        tight = by.get(("floor", "aes-gcm, DAVE off"))
        for u in udp:
            if u.decode_us_per_packet is not None:
                print(f"\n{u.variant}, {u.speakers} speakers: opus_decode took "
                      f"{u.decode_us_per_packet:.1f} µs per packet in the real-time loop (wall "
                      "time of the call)"
                      + (f", against {tight.us_per_packet:.1f} µs for AEAD + opus_decode in "
                         "row 4's tight loop (floor, aes-gcm, DAVE off)" if tight else "") + ".")
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
            peers = run_peers(peer_set, 9 if quick else repeats,
                              install=not (quick or args.no_install))
        print("## 4. The floor and the peers, same packets\n")
        rows4 = []
        for s in sets:
            for name in ("floor", "floor 48k stereo", "product", "lean (prototype)", "plain"):
                t = by[(name, s.label)]
                rows4.append([s.label, name, _f(t.us_per_packet),
                              _ratio(t.ratio, t.ratio_spread)])
            if s is peer_set:
                for p in peers:
                    rows4.append([s.label, f"{p.flavor} {p.version} (48 kHz stereo out)",
                                  _f(p.us_per_packet), _ratio(p.ratio, p.ratio_spread) +
                                  " vs its own in-process floor"])
        print(table(["packets", "contender", "µs / packet (median)",
                     "ratio to floor, median of per-repeat ratios (min..max)"], rows4))
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
    up = next((u for u in upstream if u.sessions == SIZING and u.variant == "product"),
              upstream[0] if upstream else None)
    if product is not None and up is not None:
        per_speaker_us = product.us_per_packet * 50 + up.us_per_session_second
        speakers_per_core = 1e6 / per_speaker_us
        latency = up.lag_p99_ms + product.us_per_packet / 1000
        print("## Targets\n")
        print(table(["target", "measured", "met"], [
            ["≥ 400 speakers / core (receive + convert + emit, 100 ms chunks; rows 1 + 2 added)",
             f"{speakers_per_core:.0f} ({per_speaker_us / 1000:.2f} ms CPU per speaker-second"
             f" = {_f(product.us_per_packet * 50 / 1000, 2)} receive + "
             f"{_f(up.us_per_session_second / 1000, 2)} upstream at {up.sessions} sessions)",
             "yes" if speakers_per_core >= 400 else "no"],
            *([["(prototype) the same with the lean receive path of bench/lean.py",
                f"{1e6 / (lean.us_per_packet * 50 + up.us_per_session_second):.0f} "
                f"({_f(lean.us_per_packet * 50 / 1000, 2)} ms receive, "
                f"{_ratio(lean.ratio, lean.ratio_spread)} the floor)",
                "not shipped"]] if lean else []),
            ["receive path ≤ 1.5x the libopus floor",
             _ratio(floor_ratio, product.ratio_spread) if floor_ratio else "?",
             "yes" if floor_ratio and floor_ratio <= 1.5 else "no"],
            ["audio at the STT socket ≤ one chunk + 5 ms after its packet",
             f"one chunk + {latency:.2f} ms (p99, {up.sessions} sessions"
             f"{', pinned' if up.pinned else ''})",
             "yes" if latency <= 5 else "no"],
            *([[f"end to end (row 2e, {e.variant}, {e.speakers} speakers in one process): "
                 "≥ 400 speakers / core; ≤ one chunk + 5 ms p99",
                 f"{e.speakers_per_core:.0f} / core; one chunk + {e.lag_p99_ms:.2f} ms"
                 f"{'' if e.behind_s < 0.05 else ' (fell behind real time)'}",
                 ("yes" if e.speakers_per_core >= 400 and e.lag_p99_ms <= 5 else "no")
                 + ("" if e.variant == "product" else " (prototype, not shipped)")]
               for e in e2e]),
            *([[f"capacity: {e.speakers} speakers end to end in one process (one event loop: "
                 "one core) keep real time",
                 f"{e.cpu_percent:.0f} % of a core, "
                 f"{'real time kept' if e.behind_s < 0.05 else f'{e.behind_s:.2f} s behind'}",
                 "yes" if e.behind_s < 0.05 and e.cpu_percent < 100 else "no"]
               for e in e2e if e.variant == "product" and e.speakers == CAPACITY]),
            *([[f"end to end with real UDP reads (row 2u, {u.variant}, {u.speakers} "
                 "speakers): ≥ 400 speakers / core",
                 f"{u.speakers_per_core:.0f} / core ({u.cpu_percent:.0f} % of a core); "
                 f"one chunk + {u.lag_p99_ms:.2f} ms p99"
                 f"{'' if u.behind_s < 0.05 else ' (fell behind real time or lost datagrams)'}",
                 ("yes" if u.speakers_per_core >= 400 else "no")
                 + ("" if u.variant.startswith("product") else " (prototype, not shipped)"
                    if u.variant.startswith("lean") else " (the fallback)")]
               for u in udp]),
            *([["commit -> Discord request ≤ 50 ms p99",
                f"{max(w['p99_ms'] for w in whole):.1f} ms", "yes" if max(
                    w["p99_ms"] for w in whole) <= 50 else "no"]] if whole else []),
        ]))
        print()
    print(f"Wall time: {time.monotonic() - started:.1f} s; load average at end "
          f"{os.getloadavg()[0]:.2f}\n")
    e2e_product = next((e for e in e2e if e.variant == "product"), None)
    udp_product = next((u for u in udp if u.speakers == SIZING
                        and u.variant.startswith("product")), None)
    print(json.dumps({
        "speakers_per_core": round(speakers_per_core) if speakers_per_core else None,
        "floor_ratio": round(floor_ratio, 3) if floor_ratio else None,
        "floor_ratio_spread": ([round(x, 3) for x in product.ratio_spread]
                               if floor_ratio and product else None),
        "added_latency_ms_p99": round(latency, 2) if latency is not None else None,
        "floor_us_per_packet": round(floor.us_per_packet, 1) if floor else None,
        "e2e_speakers_per_core": round(e2e_product.speakers_per_core) if e2e_product else None,
        "e2e_latency_ms_p99": round(e2e_product.lag_p99_ms, 2) if e2e_product else None,
        "udp_speakers_per_core": round(udp_product.speakers_per_core) if udp_product else None,
        "udp_latency_ms_p99": round(udp_product.lag_p99_ms, 2) if udp_product else None,
    }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

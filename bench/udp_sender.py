"""Row 2u's Discord side, in its own process: N speakers' RTP datagrams sent in real time over
loopback UDP.

``python -m bench.udp_sender HOST PORT KEY_HEX SPEAKERS SECONDS LOG`` encodes the bench
recording, encrypts it (AES-GCM, DAVE off) as ``SPEAKERS`` members with the given key, prints
``READY``, reads the start time (``time.monotonic``, one clock system-wide) from stdin and sends
each speaker one packet per 20 ms from then on, the speakers' phases spread over the 20 ms as in
row 2e, talking as a meeting does (:mod:`bench.media`, ``meeting=True``: each says something
else and starts at its own moment). At the end it writes LOG, when each burst of datagrams went
out (:func:`read_send_log`), and prints ``DONE <datagrams sent> <worst lateness in s>``. Its CPU
is not the bot's: row 2u pins it to the other CPU, with the STT stand-in.
"""

from __future__ import annotations

import bisect
import socket
import struct
import sys
import time
from array import array

from bench.media import PACKETS_PER_SECOND, make_packets, record
from bot.voice.crypto import MODE_AES256_GCM

#: Sleep between sends of what is due: ~2,000 wake-ups a second; 250 speakers' packets are due
#: 12,500 times a second, so each wake-up sends a few, as a real network delivers them.
PACE_S = 0.0005


def main(argv: list[str]) -> int:
    host, port, key_hex, speakers, seconds, log_path = (argv[0], int(argv[1]), argv[2],
                                                        int(argv[3]), float(argv[4]), argv[5])
    rec = record(seconds + 1.0)
    frames = int(seconds * PACKETS_PER_SECOND)
    packets = make_packets(rec.opus[:frames], rec.levels[:frames], mode=MODE_AES256_GCM,
                           dave=False, speakers=speakers, secret_key=bytes.fromhex(key_hex),
                           meeting=True)
    datagrams = [d for _k, d in packets.datagrams]
    dues = packets.due
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.connect((host, port))
    print("READY", flush=True)
    t0 = float(sys.stdin.readline())
    pos, worst = 0, 0.0
    send = sock.send
    # Where each burst started: datagrams[firsts[j]:firsts[j + 1]] went out at times[j].
    firsts, times = array("i"), array("d")
    while pos < len(datagrams):
        now = time.monotonic()
        due = bisect.bisect_right(dues, now - t0, lo=pos)
        if due > pos:
            worst = max(worst, now - (t0 + dues[pos]))
            firsts.append(pos)
            times.append(now)
        while pos < due:
            try:
                send(datagrams[pos])
            except BlockingIOError:  # the receiver fell far behind: its loss, counted there
                pass
            pos += 1
        time.sleep(PACE_S)
    with open(log_path, "wb") as f:
        f.write(struct.pack("<i", len(firsts)) + firsts.tobytes() + times.tobytes())
    print(f"DONE {pos} {worst:.4f}", flush=True)
    return 0


def read_send_log(path: str) -> tuple[array[int], array[float]]:
    """LOG as written by :func:`main`: the first datagram of each burst, and its send time."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack_from("<i", raw)
    firsts, times = array("i"), array("d")
    firsts.frombytes(raw[4 : 4 + 4 * n])
    times.frombytes(raw[4 + 4 * n : 4 + 12 * n])
    return firsts, times


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

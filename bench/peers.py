"""Row 4's peers: discord-ext-voice-recv and py-cord, each in its own venv, on the same packets.

py-cord and discord.py both own the ``discord`` package, so each peer gets a venv under
``$CANTOBOT_BENCH_VENVS`` (default ``~/.cache/cantobot-bench``), created on first use with the
package registry's ordinary client (``pip install``): voice-recv on top of the system's
discord.py 2.7.1 (``--system-site-packages``, installed ``--no-deps``), py-cord in a clean venv.
:mod:`bench.peer_driver` runs inside the venv and prints its figures as one JSON line.
Neither peer supports AES-GCM in a form the bench can share (voice-recv has no AES-GCM mode),
and voice-recv has no DAVE, so peers get XChaCha20, DAVE off.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench.media import PacketSet, write_packet_file

log = logging.getLogger(__name__)

VENV_ROOT: Final = Path(os.environ.get("CANTOBOT_BENCH_VENVS",
                                       Path.home() / ".cache" / "cantobot-bench"))
DRIVER: Final = Path(__file__).with_name("peer_driver.py")
PIP_TIMEOUT_S: Final = 600
RUN_TIMEOUT_S: Final = 300


@dataclass(frozen=True)
class Peer:
    flavor: str
    venv: str
    system_site_packages: bool
    requirements: tuple[str, ...]
    no_deps: bool
    version_of: str


PEERS: Final = (
    Peer("voice-recv", "voice-recv", True, ("discord-ext-voice-recv",), True,
         "discord-ext-voice-recv"),
    Peer("py-cord", "pycord", False, ("py-cord[voice]", "numpy"), False, "py-cord"),
)


@dataclass(frozen=True)
class PeerResult:
    flavor: str
    version: str
    us_per_packet: float
    samples: int
    packets: int
    #: Median (min, max) of per-repeat ratios to the floor run alternately in the peer's process.
    ratio: float = 0.0
    ratio_spread: tuple[float, float] = (0.0, 0.0)


def python_of(peer: Peer) -> Path:
    return VENV_ROOT / peer.venv / "bin" / "python"


def ensure_venv(peer: Peer, *, install: bool) -> bool:
    """True when the peer's venv is ready; creates it when ``install`` (minutes, network)."""
    py = python_of(peer)
    if py.exists():
        return True
    if not install:
        return False
    VENV_ROOT.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", "venv", str(VENV_ROOT / peer.venv)]
    if peer.system_site_packages:
        args.append("--system-site-packages")
    subprocess.run(args, check=True, timeout=PIP_TIMEOUT_S)
    pip = [str(py), "-m", "pip", "install", "-q", *(["--no-deps"] if peer.no_deps else []),
           *peer.requirements]
    log.info("installing %s into %s", " ".join(peer.requirements), VENV_ROOT / peer.venv)
    subprocess.run(pip, check=True, timeout=PIP_TIMEOUT_S)
    return True


def _version(peer: Peer) -> str:
    out = subprocess.run(
        [str(python_of(peer)), "-c",
         f"import importlib.metadata as m; print(m.version({peer.version_of!r}))"],
        capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or "?"


def run_peers(packets: PacketSet, repeats: int, *, install: bool) -> list[PeerResult]:
    """Each available peer on speaker 0's datagrams (must be XChaCha20, DAVE off)."""
    if packets.dave or len(packets.speakers) != 1:
        raise ValueError("peers take one speaker's packets without DAVE")
    out = []
    with tempfile.TemporaryDirectory(prefix="cantobot-bench-") as tmp:
        path = str(Path(tmp) / "packets.bin")
        write_packet_file(path, packets)
        for peer in PEERS:
            try:
                if not ensure_venv(peer, install=install):
                    log.info("peer %s skipped: no venv at %s", peer.flavor, python_of(peer))
                    continue
                proc = subprocess.run(
                    [str(python_of(peer)), str(DRIVER), peer.flavor, path, packets.mode,
                     packets.secret_key.hex(), str(repeats)],
                    capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=True)
            except (subprocess.SubprocessError, OSError) as exc:
                log.warning("peer %s failed: %s", peer.flavor, exc)
                continue
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            ratios = data["ratios"]
            out.append(PeerResult(peer.flavor, _version(peer), data["us_per_packet"],
                                  data["samples"], data["packets"],
                                  statistics.median(ratios), (min(ratios), max(ratios))))
    return out

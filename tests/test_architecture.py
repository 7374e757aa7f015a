"""The layering stays as designed: pure core <- adapters <- app <- entry points.

Pure modules (bytes and values in and out) import only the standard library, numpy, crypto
libraries and other pure modules: no sockets, no discord.py, no Socket.IO. The library (`bot/`)
never imports the command surface (`cogs/`), and nothing imports the loopback fakes (`bot.sim`)
except the simulation entry points.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PURE = [
    "bot/config.py",
    "bot/errors.py",
    "bot/logsafe.py",
    "bot/voice/rtp.py",
    "bot/voice/crypto.py",
    "bot/voice/jitter.py",
    "bot/voice/speakers.py",
    "bot/voice/receiver.py",
    "bot/voice/counters.py",
    "bot/voice/timeline.py",
    "bot/audio/convert.py",
    "bot/stt/protocol.py",
    "bot/stt/events.py",
    "bot/stt/core.py",
    "bot/stt/gate.py",
    "bot/stt/buffer.py",
    "bot/stt/clock.py",
    "bot/stt/twins.py",
    "bot/stt/lines.py",
    "bot/stt/stats.py",
    "bot/stt/upstream.py",
    "bot/backoff.py",
    "bot/lifecycle.py",
    "bot/meeting/state.py",
    "bot/transcript/model.py",
    "bot/transcript/format.py",
    "bot/transcript/escape.py",
    "bot/transcript/minutes.py",
]
#: Third-party packages a pure module may use (no I/O of their own).
PURE_THIRD_PARTY = {"numpy", "nacl", "cryptography", "yaml", "soxr", "davey"}
#: I/O adapters and entry points a pure module must never reach.
IO_MODULES = ("discord", "socketio", "engineio", "aiohttp", "bot.stt.session", "bot.sinks.",
              "bot.storage", "bot.meeting", "bot.app", "bot.cli", "bot.sim", "cogs",
              "bot.voice.client")


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", PURE)
def test_pure_modules_do_no_io(module: str) -> None:
    for name in imports_of(ROOT / module):
        top = name.split(".")[0]
        if top == "bot":
            assert not name.startswith(IO_MODULES), f"{module} imports the adapter {name}"
            continue
        if top in PURE_THIRD_PARTY:
            continue
        assert top in _stdlib(), f"{module} imports {name}, not allowed in a pure module"


def test_the_library_never_imports_the_command_surface_or_the_fakes() -> None:
    # The entry points: the CLI runs the demo and simulate; the doctor encodes test voice
    # packets with the sim's Opus encoder to time this host's decode.
    allowed_sim_users = {"bot/sim", "bot/cli.py", "bot/doctor.py"}
    for path in (ROOT / "bot").rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        for name in imports_of(path):
            assert not name.startswith("cogs"), f"{rel} imports {name}"
            if name.startswith("bot.sim"):
                assert any(rel.startswith(p) for p in allowed_sim_users), f"{rel} imports {name}"


def _stdlib() -> frozenset[str]:
    import sys

    return frozenset(sys.stdlib_module_names) | {"__future__"}

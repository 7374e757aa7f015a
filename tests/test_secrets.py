"""Secrets stay secret (issue 11, items 8-11): storage.url's password, tokens in logs at DEBUG,
the SQLite file's mode, and plain-text transports to other hosts."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import secrets
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bot.cli import setup_logging
from bot.config import load_config, with_overrides
from bot.errors import ConfigError
from bot.logsafe import redact_record, redact_text, redact_url
from bot.sim.simulate import Simulation, demo_speakers
from bot.sim.stt_server import FakeSttServer
from bot.storage import describe_target
from bot.storage.db import Storage
from bot.transcript.model import Segment


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text, encoding="utf-8")
    return p


# -- item 8: storage.url is a secret; URLs are printed redacted ----------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:hunter2@h:5432/d", "postgresql://u:***@h:5432/d"),
        ("postgresql://u@h/d?password=hunter2&sslmode=require",
         "postgresql://u@h/d?password=***&sslmode=require"),
        ("postgresql://h/d?sslmode=require&PassWord=hunter2", "postgresql://h/d?sslmode=require"
         "&PassWord=***"),
        ("postgresql://u:p%40ss@h/d?sslpassword=hunter2", "postgresql://u:***@h/d?sslpassword=***"),
        ("postgresql://u:hunter2@[::1/d", "postgresql://***"),  # does not parse: hide it all
        ("https://cantonese.ai", "https://cantonese.ai"),
    ],
)
def test_a_url_is_printed_without_its_passwords(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "hunter2" not in describe_target(url)


def test_check_config_never_prints_the_storage_password(tmp_path: Path) -> None:
    p = write(tmp_path, "storage:\n  url: postgresql://bot:hunter2@db.example:5432/cantobot"
                        "?password=hunter3&sslmode=require\n")
    out = subprocess.run([sys.executable, "-m", "bot", "check-config", "--config", str(p)],
                         capture_output=True, text=True, timeout=60, check=True)
    printed = out.stdout + out.stderr
    assert "hunter2" not in printed and "hunter3" not in printed, printed
    assert "postgresql://bot:***@db.example:5432/cantobot?password=***&sslmode=require" in printed
    config = load_config(p, environ={})
    assert config.storage.url is not None
    assert config.storage.url.reveal().startswith("postgresql://bot:hunter2@")


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("discord: MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs\n", "discord"),
        ("discord:\n  guilds: MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs\n",
         "discord.guilds"),
        ("discord:\n  manager_role: [MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se]\n",
         "discord.manager_role"),
        ("stt:\n  url: MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs\n", "stt.url"),
        ("stt:\n  sample_rate: MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs\n",
         "stt.sample_rate"),
        ("storage:\n  url: [postgresql://u:MTk4NjIyNDgzNDcxOTI1MjQ4@h/d]\n", "storage.url"),
        ("discord:\n  MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs: 1\n",
         "discord."),
    ],
)
def test_a_config_error_in_a_secret_bearing_section_never_echoes_the_value(
    tmp_path: Path, yaml_text: str, key: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, yaml_text), environ={})
    message = caught.value.user_message
    assert key in message and "MTk4NjIyNDgzNDcxOTI1MjQ4" not in message, message


# -- item 11: no plain http:// or ws:// to another host unless allowed ----------------------------


@pytest.mark.parametrize(
    ("yaml_text", "key", "what"),
    [
        ("stt:\n  url: http://stt.example:8000\n", "stt.url", "API key"),
        ("discord:\n  api_base: http://discord.example/api/v10\n", "discord.api_base",
         "bot token"),
        ("discord:\n  gateway_url: ws://gateway.example\n", "discord.gateway_url", "bot token"),
    ],
)
def test_plain_text_to_another_host_is_refused_unless_the_section_allows_it(
    tmp_path: Path, yaml_text: str, key: str, what: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, yaml_text), environ={})
    message = caught.value.user_message
    assert key in message and what in message and "allow_insecure: true" in message
    assert "\n" not in message
    section = key.split(".")[0]
    allowed = yaml_text.replace(f"{section}:\n", f"{section}:\n  allow_insecure: true\n")
    with caplog.at_level(logging.WARNING, logger="bot.config"):
        for _ in range(2):  # `cantobot` loads its config twice: one warning line, not two
            load_config(write(tmp_path, allowed), environ={})
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "bot.config"]
    assert "unencrypted" in warning and key in warning


def test_loopback_and_tls_need_no_permission_and_the_command_line_is_checked_too() -> None:
    base = load_config(None, environ={})
    for url in ("http://127.0.0.1:9", "http://localhost:9", "http://[::1]:9", "https://x.example"):
        assert with_overrides(base, stt={"url": url}).stt.url == url
    with pytest.raises(ConfigError, match="command line: stt.url"):
        with_overrides(base, stt={"url": "http://10.0.0.5:8000"})


# -- item 10: the SQLite files are the bot's alone ------------------------------------------------


async def test_the_sqlite_database_and_its_wal_and_shm_are_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)  # the usual umask: without care, files come out 0644
    try:
        path = tmp_path / "bot.sqlite3"
        storage = await Storage.open(str(path))
        try:
            meeting = await storage.start_meeting(guild_id=1, text_channel_id=2,
                                                  voice_channel_id=3, title="t",
                                                  started_at=datetime.now(UTC))
            await storage.add_line(meeting, Segment("a", "你好", 0.0, 1.0, speaker_id=1))
            files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
            for f in files:
                assert f.exists(), f
                assert stat.S_IMODE(f.stat().st_mode) == 0o600, (f, oct(f.stat().st_mode))
        finally:
            await storage.close()
        # A database created before (0644) is made private when opened.
        path.chmod(0o644)
        storage = await Storage.open(str(path))
        await storage.close()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old_umask)


# -- item 9: no token in any log record, at any level ---------------------------------------------


def test_the_log_redaction_hides_every_token_shape() -> None:
    hook = f"https://127.0.0.1:1/api/v10/webhooks/123/{'t' * 68}?wait=1"
    text = redact_text(
        f"POST {hook} with {{'token': 'voice-tok-123', 'secret_key': [1, 2, 3]}} "
        f"/interactions/99/aW50ZXJhY3Rpb24abc/callback Authorization: Bot abcdefghijklmnopqrstu "
        "MTk4NjIyNDgzNDcxOTI1MjQ4.Cl2FMQ.ZnCjm1XVW7vRze4b7Cq4se7kKWs "
        "postgresql://u:hunter2@h/d?password=hunter3")
    for leaked in ("t" * 68, "voice-tok-123", "[1, 2, 3]", "aW50ZXJhY3Rpb24abc",
                   "abcdefghijklmnopqrstu", "ZnCjm1XVW7vRze4b7Cq4se7kKWs", "hunter2", "hunter3"):
        assert leaked not in text, (leaked, text)
    assert "/webhooks/123/***?wait=1" in text
    # A record's message and traceback, as install() treats every record when it is made.
    try:
        raise RuntimeError(f"failed: {hook}")
    except RuntimeError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "calling %s", (hook,),
                                   sys.exc_info())
    redact_record(record)
    shown = logging.Formatter().format(record)
    assert "t" * 68 not in shown and shown.count("webhooks/123/***") == 2, shown


@pytest.mark.xdist_group("cpu_heavy")  # one CPU-heavy test at a time in parallel runs (pyproject)
async def test_a_demo_run_logged_at_debug_holds_no_token(tmp_path: Path) -> None:
    """The demo meeting (loopback Discord and STT) with every logger at DEBUG: discord.py logs
    webhook URLs, interaction callbacks and gateway/voice payloads; none may show a token."""
    setup_logging("DEBUG")  # as `cantobot` does (pytest's handlers are kept: basicConfig no-op)
    key = f"stt-key-{secrets.token_hex(16)}"
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger()
    saved = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in ("discord", "socketio", "engineio", "aiohttp"):
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        async with asyncio.timeout(120), FakeSttServer(api_key=key) as stt:
            config = with_overrides(load_config(None, environ={}),
                                    stt={"url": stt.url, "api_key": key})
            speakers = demo_speakers()
            async with Simulation(config, members=[s.name for s in speakers],
                                  storage_path=str(tmp_path / "demo.sqlite3")) as sim:
                await sim.join(sim.host, *sim.names)
                await sim.start(threads=True)
                await sim.speak_together({s.name: s.pcm for s in speakers})
                await sim.stop()
                world = sim.discord.world
                tokens = {"bot token": sim.discord.token, "stt key": key}
                tokens |= {f"webhook {h.id}": h.token for h in world.webhooks.values()}
                tokens |= {f"interaction {r.command}": t
                           for t, r in sim.discord.rest.interactions.items()}
                assert any(k.startswith("webhook") for k in tokens), "lines went by webhook"
    finally:
        root.removeHandler(handler)
        root.setLevel(saved)
    logged = stream.getvalue()
    assert len(logged) > 10_000
    for what, token in tokens.items():
        assert token not in logged, f"the {what} is in the DEBUG log"
    assert re.search(r"/webhooks/\d+/\*\*\*", logged), \
        "webhook URLs were logged (redacted), so the search above meant something"

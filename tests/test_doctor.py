"""`cantobot doctor`: one ✓/✗ line per check, exit 0 only when everything passes.

Against the real loopback services: the loopback Discord (REST over TLS; a guild where the bot's
role lacks Manage Webhooks) and the loopback cantonese.ai (a wrong key, then the right one), a
real SQLite file migrated by the real storage code, and this machine's libopus and libsndfile.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import discord
import pytest

from bot.doctor import (
    FAIL,
    OK,
    RECEIVE_SLACK_ADVISED_S,
    Capacity,
    _datagrams_held,
    check_capacity,
    check_receive_buffer,
    measure_capacity,
    run_doctor,
)
from bot.invite import REQUIRED_PERMISSIONS, invite_url, missing_permissions, permission_integer
from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.state import BOT_ROLE_PERMISSIONS, PERM_MANAGE_WEBHOOKS
from bot.sim.discord.tls import ssl_context_trusting
from bot.sim.stt_server import FakeSttServer
from bot.storage import open_storage_at
from tests.bot_process import loopback_env

REPO = Path(__file__).resolve().parent.parent
KEY = "doctor-key"


def env_for(fake: LocalDiscord, stt: FakeSttServer, db: Path, key: str = KEY) -> dict[str, str]:
    """The loopback overrides alone: the doctor runs in-process and must not see this host's."""
    return loopback_env(fake, stt, key, db)


async def register_commands(fake: LocalDiscord) -> None:
    """What `cantobot run` does at start: PUT the application's global commands."""
    async with aiohttp.ClientSession() as http:
        url = f"{fake.api_base}/applications/{fake.world.application_id}/commands"
        body = [{"name": "transcribe", "description": "Live captions", "type": 1}]
        async with http.put(url, json=body, headers={"Authorization": f"Bot {fake.token}"},
                            ssl=ssl_context_trusting(fake.ca_file)) as resp:
            assert resp.status == 200, await resp.text()


async def migrated(db: Path) -> Path:
    storage = await open_storage_at(str(db))
    await storage.close()
    return db


async def doctor(env: dict[str, str], config: Path | None = None) -> tuple[int, list[str]]:
    lines: list[str] = []
    code = await run_doctor(str(config) if config else None, environ=env, out=lines.append)
    return code, lines


@pytest.fixture
async def stt() -> AsyncIterator[FakeSttServer]:
    async with FakeSttServer(api_key=KEY) as server:
        yield server


async def test_all_checks_pass_exit_0_and_the_stt_session_carries_no_audio(
    tmp_path: Path, stt: FakeSttServer
) -> None:
    async with LocalDiscord() as fake:
        await register_commands(fake)
        db = await migrated(tmp_path / "bot.sqlite3")
        code, lines = await doctor(env_for(fake, stt, db))
    assert code == 0, lines
    assert all(line.startswith(OK + " ") for line in lines), lines
    text = "\n".join(lines)
    for fragment in ("libopus loads", "libsndfile loads", "config valid",
                     "API key accepted", "Discord token valid", "/transcribe registered",
                     "all 8 permissions", "migrated (schema version",
                     "µs per voice packet here: one process holds"):
        assert fragment in text, text
    (record,) = stt.records.values()  # one connection: started, stopped, no audio
    assert len(record.sample_rates) == 1 and record.session_stops == 1
    assert record.audio_bytes == 0 and record.disconnected


async def test_a_missing_permission_and_a_wrong_key_are_named_with_what_to_do(
    tmp_path: Path, stt: FakeSttServer
) -> None:
    perms = BOT_ROLE_PERMISSIONS & ~PERM_MANAGE_WEBHOOKS
    async with LocalDiscord(bot_permissions=perms) as fake:
        await register_commands(fake)
        db = await migrated(tmp_path / "bot.sqlite3")
        code, lines = await doctor(env_for(fake, stt, db, key="wrong-key"))
        guild = f"guild 'Local Guild' ({fake.world.guild_id})"
        app_id = fake.world.application_id
    assert code == 1
    failed = [line for line in lines if line.startswith(FAIL)]
    assert len(failed) == 2, lines
    assert failed[0] == (f"{FAIL} cantonese.ai at {stt.url} rejected the API key (HTTP 401) -> "
                         "check CANTONESE_AI_API_KEY / stt.api_key")
    assert failed[1].startswith(f"{FAIL} {guild}: missing Manage Webhooks -> ")
    assert invite_url(app_id) in failed[1]
    assert stt.rejected_attempts == 1


async def test_unregistered_commands_unmigrated_storage_and_no_token(
    tmp_path: Path, stt: FakeSttServer
) -> None:
    async with LocalDiscord() as fake:
        db = tmp_path / "fresh.sqlite3"
        code, lines = await doctor(env_for(fake, stt, db))
        assert code == 1
        text = "\n".join(lines)
        assert f"{FAIL} /transcribe is not registered (globally) -> start `cantobot run`" in text
        assert f"{FAIL} storage SQLite {db}: the file does not exist yet" in text
        assert not db.exists(), "doctor must not create or migrate storage"

        env = env_for(fake, stt, db)
        del env["DISCORD_TOKEN"]
        code, lines = await doctor(env)
        assert code == 1
        assert any(line.startswith(f"{FAIL} Discord: no bot token -> set DISCORD_TOKEN")
                   for line in lines), lines


async def test_an_invalid_config_is_one_line_and_exit_1(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("stt:\n  smaple_rate: 16000\n", encoding="utf-8")
    code, lines = await doctor({}, bad)
    assert code == 1
    assert lines[-1].startswith(f"{FAIL} config not valid: ") and "stt.smaple_rate" in lines[-1]


async def test_cantobot_doctor_command_prints_the_report_on_stdout(
    tmp_path: Path, stt: FakeSttServer
) -> None:
    perms = BOT_ROLE_PERMISSIONS & ~PERM_MANAGE_WEBHOOKS
    async with LocalDiscord(bot_permissions=perms) as fake:
        await register_commands(fake)
        db = await migrated(tmp_path / "bot.sqlite3")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "doctor", cwd=REPO,
            env={**os.environ, **env_for(fake, stt, db)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    assert proc.returncode == 1, err.decode()
    lines = out.decode().splitlines()
    assert [line[0] for line in lines] == [OK] * 8 + [FAIL] + [OK], lines
    assert "voice receive buffer" in lines[3]
    assert "µs per voice packet here" in lines[4]
    assert "missing Manage Webhooks" in lines[8]
    assert fake.token not in out.decode() + err.decode()


def test_the_permission_list_matches_discord_py_flags() -> None:
    """Our bit values against discord.py's own flags of the same names."""
    flags = discord.Permissions(
        view_channel=True, connect=True, send_messages=True, create_public_threads=True,
        send_messages_in_threads=True, manage_webhooks=True, attach_files=True,
        change_nickname=True,
    )
    assert permission_integer() == flags.value == 309842709504
    assert [name for name, _ in REQUIRED_PERMISSIONS] == [
        "View Channel", "Connect", "Send Messages", "Create Public Threads",
        "Send Messages in Threads", "Manage Webhooks", "Attach Files", "Change Nickname"]
    assert missing_permissions(flags.value) == []
    assert missing_permissions(flags.value & ~discord.Permissions(attach_files=True).value) == [
        "Attach Files"]
    assert missing_permissions(discord.Permissions(administrator=True).value) == []
    assert invite_url(42) == (
        "https://discord.com/oauth2/authorize?client_id=42&scope=bot+applications.commands"
        "&permissions=309842709504")


async def test_storage_check_on_postgresql_reads_never_migrates() -> None:
    from bot.config import load_config
    from bot.doctor import check_storage
    from tests.pg_support import fresh_database

    async with fresh_database() as url:
        config = load_config(None, environ={"CANTOBOT_STORAGE_URL": url})
        before = await check_storage(config)
        assert not before.ok and "schema version 0, this cantobot needs" in before.what, before
        assert "run `cantobot migrate`" in before.fix
        storage = await open_storage_at(url)
        version = await storage.schema_version()
        await storage.close()
        after = await check_storage(config)
        assert after.ok and f"migrated (schema version {version})" in after.what, after


async def test_storage_check_names_an_unreachable_database() -> None:
    from bot.config import load_config
    from bot.doctor import check_storage
    from tests.test_cli_startup import closed_port

    port = closed_port()
    url = f"postgresql://bot:pw-secret@127.0.0.1:{port}/cantobot"
    check = await check_storage(load_config(None, environ={"CANTOBOT_STORAGE_URL": url}))
    assert not check.ok
    assert f"storage PostgreSQL postgresql://bot:***@127.0.0.1:{port}/cantobot not reachable" \
        in check.what, check
    assert "connection refused" in check.what and "pw-secret" not in check.line()


def test_the_receive_buffer_check_says_how_long_it_holds_the_configured_speakers() -> None:
    """Measured on a real socket: a few speakers fit in any buffer; a huge cap gets the advice
    to raise net.core.rmem_max, and the check still passes (small meetings need no change)."""
    few = check_receive_buffer(2)
    assert few.ok and not few.fix and "of 2 speakers talking at once" in few.what
    many = check_receive_buffer(1_000_000)
    assert many.ok and "net.core.rmem_max=" in many.fix and "README" in many.fix
    held, granted = _datagrams_held(1 << 20)
    # The kernel counts a voice datagram at several times its 200 bytes; it holds some.
    assert 0 < held < granted // 200
    slack = held / (2 * 50)
    assert slack >= RECEIVE_SLACK_ADVISED_S  # what made the first check advise nothing


def test_a_buffer_larger_than_the_check_fills_is_reported_as_a_lower_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import bot.doctor

    monkeypatch.setattr(bot.doctor, "FILL_LIMIT", 100)  # far below any socket's buffer
    check = check_receive_buffer(2)
    assert check.ok and "at least 100 voice packets, at least 1000 ms of 2 speakers" in check.what


def test_the_capacity_check_times_this_hosts_libopus_and_always_passes() -> None:
    """Measured: real packets from the real encoder through the real decoder. Advice comes only
    past 75 % of a core (two speakers never need it); the check passes either way."""
    cap = measure_capacity()
    assert 1 < cap.decode_us < 1000  # a 20 ms packet; libopus takes tens of µs on a PC
    # A session rate libopus does not decode natively is decoded at 48 kHz, as the receiver does.
    assert 1 < measure_capacity(22050).decode_us < 1000
    few = check_capacity(2, capacity=cap)
    assert few.ok and not few.fix, few
    assert f"one process holds ~{cap.speakers} speakers talking at once" in few.what
    assert "stt.max_sessions 2 would take ~" in few.what
    many = check_capacity(100_000, capacity=cap)
    assert many.ok and f"set stt.max_sessions to {cap.speakers} and run" in many.fix


def test_a_slow_host_is_told_how_many_sessions_one_process_holds_and_how_many_processes() -> None:
    """The estimate: decode x 50 packets x END_TO_END_PER_DECODE (3.0) of a core per speaker,
    75 % of a core per process. At 20 µs a speaker costs 0.3 % of a core: 250 speakers."""
    pc = Capacity(decode_us=20.0)
    assert pc.speakers == 250
    fine = check_capacity(200, capacity=pc)
    assert fine.ok and not fine.fix and "~60% of a core (estimated)" in fine.what
    board = Capacity(decode_us=80.0)  # a small board: four times slower
    assert board.speakers == 62
    told = check_capacity(200, capacity=board)
    assert told.ok and "~240% of a core" in told.what  # passes: small meetings need no change
    assert told.fix.startswith("for meetings that large set stt.max_sessions to 62 and run 4 "
                               "processes"), told.fix


def test_without_libopus_the_capacity_check_fails_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bot.voice import opus

    monkeypatch.setattr(opus, "_lib", None)
    monkeypatch.setattr(opus.ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(opus, "_FALLBACK_NAMES", ("libopus-does-not-exist.so.0",))
    check = check_capacity(200)
    assert not check.ok and "libopus does not load" in check.what
    assert check.fix == "apt-get install libopus0"

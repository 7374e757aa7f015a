"""Shutdown is bounded even when Discord is unreachable (issue 12 item 15).

A real ``python -m bot run`` subprocess, the loopback Discord taken offline mid-meeting (REST
and gateway refuse connections), SIGTERM: the process exits 0 within
``transcribe.shutdown_timeout``, every line (the last ones only stop-session brings in) is
stored, and the minutes Discord could not take are posted by the next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

from bot.sim.discord.server import LocalDiscord
from bot.sim.stt_server import FakeSttServer
from bot.storage.db import Storage
from tests.bot_process import bot_env
from tests.test_reliability import (
    HOST,
    KEY,
    REPO,
    WAIT,
    lines_of,
    live_meeting_in_process,
    track,
    until,
)

#: The configured bound (s), and what process start-up/teardown may add to it under load.
SHUTDOWN_TIMEOUT = 4.0
EXIT_SLACK = 2.5


@contextlib.asynccontextmanager
async def bot_process(tmp_path: Path, fake: LocalDiscord, stt: FakeSttServer,
                      name: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m bot run`` as deployed (env + config file) with a short shutdown bound."""
    config = tmp_path / "cantobot.yaml"
    config.write_text(textwrap.dedent(f"""\
        discord:
          guilds: [{fake.guild_id}]
        stt:
          stop_timeout: 3
          reconnect_initial_delay: 0.2
        voice:
          idle_timeout: 30
        transcribe:
          shutdown_timeout: {SHUTDOWN_TIMEOUT}
        """))
    env = bot_env(tmp_path, fake, stt, KEY)
    log_path = tmp_path / f"{name}.log"
    log = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", "--config", str(config),
        cwd=REPO, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        await until(lambda: b"logged in as" in log_path.read_bytes()
                    or proc.returncode is not None)
        assert proc.returncode is None, log_path.read_text()
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def test_sigterm_with_discord_unreachable_exits_0_in_time_and_next_start_posts_minutes(
    tmp_path: Path,
) -> None:
    alice = ["開會", "散會", "再見"]
    async with (
        FakeSttServer(api_key=KEY) as stt,
        LocalDiscord(human_names=(HOST, "alice"), moderators=(HOST,)) as fake,
    ):
        async with bot_process(tmp_path, fake, stt, "unreachable") as proc:
            ids = await live_meeting_in_process(fake)
            await fake.speak(ids["alice"], track(alice[0]))
            await until(lambda: lines_of(fake.messages, "alice") == alice[:1])
            # The last sentences end right before the signal: still pending upstream, only
            # stop-session brings them in, and Discord can no longer take them.
            await fake.speak(ids["alice"], track(*alice[1:], gap=0.05))
            await fake.go_offline()
            assert "再見" not in stt.committed_texts
            sent_before = len(fake.requests)
            signalled = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                code = await proc.wait()
            took = time.monotonic() - signalled
            log_text = (tmp_path / "unreachable.log").read_text()
            assert code == 0, log_text
            assert took <= SHUTDOWN_TIMEOUT + EXIT_SLACK, (took, log_text)
            assert "left open" in log_text, log_text
        assert len(fake.requests) == sent_before  # Discord really was unreachable
        live = [r for r in stt.records.values() if r.session_starts]
        assert live and all(r.session_stops == 1 for r in live)
        storage = await Storage.open(str(tmp_path / "bot.sqlite3"))
        try:
            stored = await storage.minutes(1)
            unfinished = await storage.unfinished_meetings()
        finally:
            await storage.close()
        # Every line was stored, the last ones included; the meeting waits for its minutes.
        assert [s.text for s in stored.segments] == alice
        assert [m.id for m in unfinished] == [1]

        await fake.come_back()
        async with bot_process(tmp_path, fake, stt, "restarted"):
            await until(lambda: any("minutes.md" in q.files for q in fake.requests))
        uploads = [q for q in fake.requests if "minutes.md" in q.files]
        assert len(uploads) == 1
        markdown = uploads[0].file_contents[uploads[0].files.index("minutes.md")].decode()
        assert all(text in markdown for text in alice), markdown
        assert len([m for m in fake.messages if "restarted during meeting" in m.content]) == 1
        storage = await Storage.open(str(tmp_path / "bot.sqlite3"))
        try:
            assert await storage.unfinished_meetings() == []
        finally:
            await storage.close()


async def test_minutes_discord_took_but_answered_too_late_are_not_posted_twice_by_the_next_start(
    tmp_path: Path,
) -> None:
    """At shutdown Discord stores the minutes but its answer misses the deadline, so the
    meeting is left open; the next start's recovery post carries the minutes' own nonce and
    Discord returns the first message: one minutes message in the channel, the meeting ended."""
    async with (
        FakeSttServer(api_key=KEY) as stt,
        LocalDiscord(human_names=(HOST, "alice"), moderators=(HOST,)) as fake,
    ):
        async with bot_process(tmp_path, fake, stt, "late") as proc:
            ids = await live_meeting_in_process(fake)
            await fake.speak(ids["alice"], track("開會"))
            await until(lambda: lines_of(fake.messages, "alice") == ["開會"])
            fake.rest.answer_uploads_late = 3 * SHUTDOWN_TIMEOUT
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(WAIT):
                code = await proc.wait()
            log_text = (tmp_path / "late.log").read_text()
            assert code == 0, log_text
            assert "left open" in log_text, log_text
        fake.rest.answer_uploads_late = 0.0
        uploads = [m for m in fake.messages if "minutes.md" in m.attachments]
        assert len(uploads) == 1  # Discord did take them

        async with bot_process(tmp_path, fake, stt, "restarted-late"):
            await until(lambda: len([q for q in fake.requests if "minutes.md" in q.files]) == 2)
            storage = await Storage.open(str(tmp_path / "bot.sqlite3"))
            try:
                assert await storage.unfinished_meetings() == []  # ended before the post
            finally:
                await storage.close()
        assert [m.message_id for m in fake.messages if "minutes.md" in m.attachments] == [
            uploads[0].message_id]
        assert not [m for m in fake.messages if "restarted during meeting" in m.content]

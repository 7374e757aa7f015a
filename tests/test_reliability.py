"""Faults a deployed meeting bot meets, injected on loopback: nothing said is lost or doubled.

Every test runs the real :class:`bot.app.CantoBot` (discord.py, the voice receiver, one real
Socket.IO session per speaker, SQLite) against :class:`LocalDiscord` and the loopback
cantonese.ai fake, as ``cantobot simulate`` does; members speak short tone-coded sentences the
fake decodes back to text, so the test knows exactly what must appear in the channel. Faults are
the fakes' own knobs (restart, ignore ``session-started``, ``session-error``, close codes, 401,
REST 429/5xx, gateway reconnect, voice websocket closed, UDP black hole) or real signals to a
``python -m bot run`` subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bot.app import CantoBot, redirect_discord
from bot.config import Config, load_config, with_overrides
from bot.meeting import Meeting, MeetingState
from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.state import PostedMessage
from bot.sim.simulate import bot_config
from bot.sim.stt_server import FakeSttServer
from bot.sim.tonecode import speech_track, utterance_duration
from bot.storage.db import Storage
from tests.bot_process import bot_env

KEY = "reliability-key"
HOST = "host"
#: Bound on any one wait of these tests (a hang fails instead of blocking the suite).
WAIT = 30.0
#: Pause before and after each sentence in a member's track (the fake commits after 0.3 s).
GAP = 0.6
LINE_PREFIX = re.compile(r"^`\[\d\d:\d\d(?::\d\d)?\]` ")

# Fast recovery so faults heal within a test's few seconds (the defaults are 0.5 s .. 30 s).
STT_OVERRIDES: dict[str, Any] = {
    "reconnect_initial_delay": 0.2,
    "reconnect_max_delay": 2.0,
    "start_timeout": 1.0,
    "connect_timeout": 2.0,
    "stop_timeout": 8.0,
}
VOICE_OVERRIDES: dict[str, Any] = {"idle_timeout": 4.0}


# -- harness --------------------------------------------------------------------------------------


def track(*texts: str, gap: float = GAP, lead: float = GAP) -> np.ndarray:
    """Sentences one after another, as a Discord client captures them (48 kHz stereo int16)."""
    lines, t = [], lead
    for text in texts:
        lines.append((t, text))
        t += utterance_duration(text) + gap
    mono = speech_track(lines, 48000, duration=t + gap)
    pcm = np.clip(mono * 32767 * 0.5, -32768, 32767).astype(np.int16)
    return np.repeat(pcm[:, None], 2, axis=1)


async def until(condition: Callable[[], bool], limit: float = WAIT) -> None:
    """Wait for a condition spanning several fakes (``limit`` only guards against hangs)."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - no one event covers bot, fakes and storage
            await asyncio.sleep(0.02)


def lines_of(messages: list[PostedMessage], speaker: str) -> list[str]:
    """Transcript lines posted as ``speaker`` in the text channel (not edits, not threads)."""
    return [
        LINE_PREFIX.sub("", m.content)
        for m in messages
        if m.author == speaker and not m.edit and m.thread is None
    ]


def notices(messages: list[PostedMessage], marker: str) -> list[str]:
    return [m.content for m in messages if not m.edit and marker in m.content]


def make_config(stt: FakeSttServer, **sections: dict[str, Any]) -> Config:
    base = load_config(None, environ={})
    stt_values = {"url": stt.url, "api_key": KEY, **STT_OVERRIDES, **sections.pop("stt", {})}
    voice_values = {**VOICE_OVERRIDES, **sections.pop("voice", {})}
    return with_overrides(base, stt=stt_values, voice=voice_values, **sections)


@dataclass
class Rig:
    discord: LocalDiscord
    stt: FakeSttServer
    bot: CantoBot
    ids: dict[str, int]
    tmp: Path

    @property
    def meeting(self) -> Meeting:
        assert self.bot.meetings is not None
        meeting = self.bot.meetings.get(self.discord.guild_id)
        assert meeting is not None
        return meeting

    def lines(self, speaker: str) -> list[str]:
        return lines_of(self.discord.messages, speaker)

    async def speak(self, name: str, pcm: np.ndarray) -> None:
        await self.discord.speak(self.ids[name], pcm)

    async def wait_lines(self, expected: dict[str, list[str]], limit: float = WAIT) -> None:
        await until(lambda: all(self.lines(n) == want for n, want in expected.items()), limit)

    async def start_meeting(self) -> None:
        start = await self.discord.invoke("transcribe start", {}, user_id=self.ids[HOST])
        async with asyncio.timeout(WAIT):
            await start.wait_followups(1)
        assert self.bot.meetings is not None
        await until(lambda: self.bot.meetings is not None
                    and (m := self.bot.meetings.get(self.discord.guild_id)) is not None
                    and m.state is MeetingState.LIVE
                    and self.discord.voice.connection is not None
                    and self.discord.voice.connection.cipher is not None)

    async def stop_meeting(self) -> None:
        stop = await self.discord.invoke("transcribe stop", {}, user_id=self.ids[HOST])
        async with asyncio.timeout(WAIT):
            await stop.wait_followups(1)


class TracebackLog(logging.Handler):
    """Collects every log record that carries a traceback while the bot runs, except those
    whose message starts with one of ``expected`` (a fault the test causes on purpose), and
    discord.py voice records of threads older than this bot: an earlier test's stock
    ``VoiceClient`` (tests/test_local_discord.py) leaves its socket reader thread asleep in a
    30 s ``select`` on the closed socket; woken by a later socket that got its descriptor
    number, it logs the failed read ("safe to ignore") with a traceback, into whatever test
    then runs in this process (under xdist, often one of these)."""

    def __init__(self, expected: tuple[str, ...] = ()) -> None:
        super().__init__(logging.DEBUG)
        self.expected = expected
        self.records: list[logging.LogRecord] = []
        self.earlier_threads = set(threading.enumerate())

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("discord.voice") and (
            threading.current_thread() in self.earlier_threads
        ):
            return
        if (record.exc_info or record.stack_info) and not (
            self.expected and record.getMessage().startswith(self.expected)
        ):
            self.records.append(record)

    def report(self) -> str:
        return "\n".join(logging.Formatter().format(r) for r in self.records)


def test_a_traceback_from_an_earlier_tests_voice_thread_is_not_this_bots() -> None:
    """The stale reader's "safe to ignore" record is left out; the same record from a thread
    started with this bot (its own reader) still fails the test."""
    voice_log = logging.getLogger("discord.voice_state")

    def read_error() -> None:
        try:
            raise OSError(9, "Bad file descriptor")
        except OSError:
            voice_log.debug("Error reading from socket in <SocketReader>, this should be safe "
                            "to ignore", exc_info=True)

    woken = threading.Event()
    stale = threading.Thread(target=lambda: (woken.wait(), read_error()))
    stale.start()
    tracebacks = TracebackLog()
    voice_log.addHandler(tracebacks)
    level = voice_log.level
    voice_log.setLevel(logging.DEBUG)  # as in a test run with the bot's DEBUG logging
    try:
        woken.set()
        stale.join()
        assert tracebacks.records == []
        mine = threading.Thread(target=read_error)
        mine.start()
        mine.join()
        assert len(tracebacks.records) == 1
    finally:
        voice_log.setLevel(level)
        voice_log.removeHandler(tracebacks)


@contextlib.asynccontextmanager
async def logged_in_bot(
    config: Config, expected_tracebacks: tuple[str, ...] = ()
) -> AsyncIterator[CantoBot]:
    """The bot logged in to LocalDiscord; on the way out it must stop by itself (no error from
    its task) and must not have logged any traceback (an unexpected exception anywhere)."""
    redirect_discord(config)
    bot = CantoBot(config)
    # discord.py waits guild_ready_timeout (2 s) after the last GUILD_CREATE before on_ready;
    # LocalDiscord sends its one guild at once, so waiting that long only slows the suite.
    bot._connection.guild_ready_timeout = 0.05
    tracebacks = TracebackLog(expected_tracebacks)
    logging.getLogger().addHandler(tracebacks)
    task = asyncio.create_task(bot.start(config.discord.token.reveal()), name="bot")
    failed = False
    try:
        await until(lambda: bot.is_ready() or task.done())
        if task.done():
            task.result()
        yield bot
    except BaseException:
        failed = True
        raise
    finally:
        try:
            await bot.close()
            async with asyncio.timeout(WAIT):
                await task  # bot.start returns once closed; anything it raises fails the test
        finally:
            logging.getLogger().removeHandler(tracebacks)
    if not failed:
        assert not tracebacks.records, f"unexpected traceback(s) in the log:\n{tracebacks.report()}"


@contextlib.asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    names: tuple[str, ...] = ("alice", "bob"),
    dave: bool = False,
    start: bool = True,
    stt_key: str = KEY,
    expected_tracebacks: tuple[str, ...] = (),
    **sections: dict[str, Any],
) -> AsyncIterator[Rig]:
    """LocalDiscord + STT fake + the real bot, all members in voice, a meeting LIVE."""
    async with asyncio.timeout(120):
        async with (
            FakeSttServer(api_key=stt_key) as stt,
            LocalDiscord(human_names=(HOST, *names), moderators=(HOST,), dave=dave) as fake,
        ):
            cfg = bot_config(make_config(stt, **sections), fake, str(tmp_path / "bot.sqlite3"))
            async with logged_in_bot(cfg, expected_tracebacks) as bot:
                ids = fake.member_ids
                for name in (HOST, *names):
                    await fake.member_join_voice(ids[name])
                r = Rig(fake, stt, bot, ids, tmp_path)
                if start:
                    await r.start_meeting()
                yield r


# -- 1. STT server killed and restarted mid-utterance ---------------------------------------------


async def test_stt_restart_mid_sentence_loses_and_doubles_nothing(tmp_path: Path) -> None:
    alice, bob = ["早晨", "開會", "好嘢"], ["收到", "明白", "拜拜"]
    async with rig(tmp_path) as r:
        speaking = asyncio.gather(r.speak("alice", track(*alice)),
                                  r.speak("bob", track(*bob, lead=1.2)))
        # Restart when the fake has decoded the start of alice's 2nd line but not its end.
        await until(lambda: any(p.startswith(alice[1][0])
                                for rec in r.stt.records.values() for p in rec.partials))
        assert alice[1] not in r.stt.heard_texts, "the restart must hit alice mid-sentence"
        sessions_before = len(r.stt.records)
        await r.stt.restart()
        await speaking
        await r.wait_lines({"alice": alice, "bob": bob})
        # Both speakers came back on new connections, each after a backoff delay.
        assert len(r.stt.records) >= sessions_before + 2
        assert all(s.session.stats.reconnects >= 1 for s in r.meeting.transcriber.streams())
        await r.stop_meeting()
        assert r.lines("alice") == alice and r.lines("bob") == bob
        # Every sentence reached the server at least once: the re-sent audio is why.
        assert {*alice, *bob} <= set(r.stt.committed_texts)


# -- 2. session-started never comes / session-error / close with non-1000 -------------------------


@pytest.mark.parametrize("fault", ["no-session-started", "session-error-at-start",
                                   "session-error-mid", "close-1011-mid"])
async def test_stt_session_faults_are_said_once_and_transcription_recovers(
    tmp_path: Path, fault: str
) -> None:
    alice = ["你好", "完結"]
    async with rig(tmp_path, names=("alice",)) as r:
        if fault == "no-session-started":
            r.stt.ignore_start_session = True
        elif fault == "session-error-at-start":
            r.stt.start_session_error = "upstream busy"
        elif fault == "session-error-mid":
            r.stt.error_after_chunks = 15  # 1.5 s into alice's stream: mid-sentence
        else:
            r.stt.close_code = 1011
            r.stt.close_after_chunks = 15
        await r.speak("alice", track(*alice))
        await r.wait_lines({"alice": alice})
        warnings = notices(r.discord.messages, "\N{WARNING SIGN}")
        assert len(warnings) == 1, warnings
        assert "cantonese.ai" in warnings[0] and "retrying" in warnings[0]
        assert len(notices(r.discord.messages, "Speech-to-text is back")) == 1
        await r.stop_meeting()
        assert r.lines("alice") == alice


# -- 3. rejected key (401) ------------------------------------------------------------------------


def most_attempts(window: float, initial: float, cap: float, streams: int = 1) -> int:
    """Connection attempts a capped exponential backoff with jitter in [0.5, 1] allows at most
    in ``window`` seconds (each waits at least half its delay), plus one per concurrent stream
    whose first attempt precedes the shared backoff."""
    attempts, t, delay = 1, 0.0, initial
    while True:
        t += 0.5 * delay
        if t > window:
            return attempts + streams - 1
        attempts += 1
        delay = min(cap, delay * 2)


async def test_rejected_key_makes_no_reconnect_storm_says_so_once_and_status_shows_it(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, stt_key="the-real-key") as r:  # the bot's key is wrong
        attempts_at_start = r.stt.connection_attempts
        talk = asyncio.gather(r.speak("alice", track("你好", "喂喂", "聽唔聽到")),
                              r.speak("bob", track("收到", "冇聲")))
        loop = asyncio.get_running_loop()
        began = loop.time()
        await talk
        window = loop.time() - began
        attempts = r.stt.connection_attempts - attempts_at_start
        stt = r.bot.config.stt
        assert 1 <= attempts <= most_attempts(window, stt.reconnect_initial_delay,
                                              stt.reconnect_max_delay, streams=2), attempts
        assert r.stt.rejected_attempts == r.stt.connection_attempts  # never got in
        said = [n for n in notices(r.discord.messages, "rejected the API key")
                if "could not be transcribed" not in n]  # the losses it caused: per speaker
        assert len(said) == 1 and "retrying" not in said[0], said
        status = await r.discord.invoke("transcribe status", {}, user_id=r.ids[HOST])
        async with asyncio.timeout(WAIT):
            await status.wait_original_content()
        assert "rejected the API key" in status.response_content
        assert r.lines("alice") == [] and r.lines("bob") == []


# -- 5. rejoin with a new SSRC, overlapping speakers ----------------------------------------------


async def test_rejoin_with_new_ssrc_keeps_one_stream_and_overlapping_speakers_both_transcribed(
    tmp_path: Path,
) -> None:
    alice, bob = ["第一", "第二"], ["我講", "你講", "佢講"]
    async with rig(tmp_path, voice={"idle_timeout": 8.0}) as r:
        uid = r.ids["alice"]
        bob_talks = asyncio.create_task(r.speak("bob", track(*bob, gap=0.3)))
        await r.speak("alice", track(alice[0]))  # overlaps bob's first sentence
        old_ssrc = r.discord.voice.members[uid].ssrc
        await r.discord.leave_voice(uid)
        # Discord gives a member who comes back a new SSRC: forget the simulated client's.
        r.discord.voice.members.pop(uid, None)
        await r.discord.member_join_voice(uid)
        await r.speak("alice", track(alice[1], lead=0.2))
        assert r.discord.voice.members[uid].ssrc != old_ssrc
        await bob_talks
        await r.wait_lines({"alice": alice, "bob": bob})
        # One STT session per speaker: the rejoin continued alice's stream.
        assert sum(rec.session_starts for rec in r.stt.records.values()) == 2
        await r.stop_meeting()
        assert r.lines("alice") == alice and r.lines("bob") == bob


# -- 6. Discord 429 and 5xx on line posts ---------------------------------------------------------


async def test_rate_limits_and_server_errors_on_posts_delay_but_never_drop_or_reorder_lines(
    tmp_path: Path,
) -> None:
    alice = ["一號", "二號", "三號"]
    async with rig(tmp_path, names=("alice",)) as r:
        lines_path = "/webhooks/"  # lines are posted as the speaker through the captions webhook
        # The first line meets a server error, two rate limits and a global one, in that order
        # (discord.py sleeps 1 s after a first 5xx and Retry-After after each 429).
        r.discord.fail_next(1, status=503, path_prefix=lines_path)
        r.discord.fail_next(2, status=429, path_prefix=lines_path, retry_after=0.4)
        r.discord.fail_next(1, status=429, path_prefix=lines_path, retry_after=0.3,
                            is_global=True)
        await r.speak("alice", track(*alice))
        await r.wait_lines({"alice": alice})
        followups = f"/webhooks/{r.discord.application_id}/"  # interaction replies
        posts = [q for q in r.discord.requests if q.method == "POST"
                 and q.path.startswith(lines_path) and not q.path.startswith(followups)]
        statuses = [q.status for q in posts]
        assert statuses.count(429) == 3 and statuses.count(503) == 1, statuses
        for failed, retry in zip(posts, posts[1:], strict=False):
            if failed.status == 429:
                assert retry.at - failed.at >= 0.3, "retried before Retry-After"
        await r.stop_meeting()
        assert r.lines("alice") == alice


# -- 4. Discord voice: connection closed, gateway RESUME, deaf connection, keepalive -------------


async def voice_session_renewed(r: Rig, old: object, limit: float = WAIT) -> None:
    await until(lambda: (c := r.discord.voice.connection) is not None and c is not old
                and c.cipher is not None, limit)


# 4006 is a full voice reconnect: new socket, IP discovery, session. It used to take ~30 s
# (discord.py's reader thread slept in select on the closed socket), and under load it sometimes
# stalled anyway: the reader thread, on its way into select with the old socket's descriptor
# number, slept on whatever socket had been given that number, while IP discovery's answer waited
# unread on the new one (bot/voice/client.py READER_SELECT_TIMEOUT). So it runs in CI again.
@pytest.mark.parametrize("fault", ["voice-ws-closed-4015",
                                   "voice-ws-closed-4006",
                                   "gateway-resume"])
async def test_voice_reconnects_and_resumes_keep_transcribing(tmp_path: Path, fault: str) -> None:
    # A move to another channel (4014 + new gateway voice updates) is tested below.
    alice = ["之前", "之後"]
    # discord.py logs its reconnect after an unhandled close code (4006) with the traceback,
    # and its socket reader's read of the swapped socket ("safe to ignore") with one too.
    expected = (("Disconnected from voice... Reconnecting", "Error reading from socket")
                if fault.endswith("4006") else ())
    async with rig(tmp_path, names=("alice",), expected_tracebacks=expected) as r:
        await r.speak("alice", track(alice[0]))
        await r.wait_lines({"alice": alice[:1]})
        conn = r.discord.voice.connection
        assert conn is not None
        if fault == "gateway-resume":
            await r.discord.force_reconnect()
            await until(lambda: r.discord.gateway.resume_count >= 1)
        else:
            code = int(fault.rsplit("-", 1)[1])
            if code == 4015:
                # discord.py tries a voice RESUME, which waits for gateway voice updates that
                # LocalDiscord (like Discord for a channel the bot is already in) does not send;
                # it gives up after the connect timeout (30 s; shortened here) and drops the
                # voice client. The listener notices and the meeting rejoins.
                vc = r.meeting.listener.voice_client
                assert vc is not None
                vc._connection.timeout = 1.0
            await conn.ws.close(code=code)
            # A new session, UDP path and SSRCs. A full reconnect (4006) must not sit deaf for
            # discord.py's 30 s reader select (the bound is far above the ~1 s it takes).
            await voice_session_renewed(r, conn, limit=15.0 if code == 4006 else WAIT)
        await r.speak("alice", track(alice[1]))
        await r.wait_lines({"alice": alice})
        await r.stop_meeting()
        assert r.lines("alice") == alice


async def test_bot_moved_to_another_channel_keeps_transcribing_there(tmp_path: Path) -> None:
    # Discord's move: VOICE_STATE_UPDATE (new channel) + VOICE_SERVER_UPDATE, the old voice
    # websocket closed with 4014; discord.py opens a new voice session in the new channel.
    alice, bob = ["之前"], ["搬咗", "之後"]
    async with rig(tmp_path, transcribe={"empty_channel_timeout": 1.0}) as r:
        await r.speak("alice", track(*alice))
        await r.wait_lines({"alice": alice})
        breakout = r.discord.second_voice_channel_id
        await r.discord.member_join_voice(r.ids["bob"], breakout)
        conn = r.discord.voice.connection
        await r.discord.move_bot(breakout)
        await voice_session_renewed(r, conn)
        await until(lambda: r.meeting.voice_channel.id == breakout)
        assert r.meeting.status().voice_channel == "Breakout Room"
        with pytest.raises(ValueError):  # alice stayed behind: the bot's call no longer has her
            await r.speak("alice", track("喂"))
        await r.speak("bob", track(*bob))
        await r.wait_lines({"alice": alice, "bob": bob})
        assert len(notices(r.discord.messages, "Moved to **Breakout Room**")) == 1
        # The old channel still has people; the one the bot is in empties: the meeting ends.
        await r.discord.leave_voice(r.ids["bob"])
        await until(lambda: any("minutes.md" in q.files for q in r.discord.requests))
        upload = next(q for q in r.discord.requests if "minutes.md" in q.files)
        markdown = upload.file_contents[upload.files.index("minutes.md")].decode()
        assert all(text in markdown for text in alice + bob), markdown
        assert len(notices(r.discord.messages, "Moved to")) == 1


async def test_deaf_voice_connection_is_noticed_said_and_reconnected(tmp_path: Path) -> None:
    alice, bob = ["聽到", "又聽到"], ["喂", "有冇人", "聽到嗎"]
    async with rig(tmp_path, voice={"watchdog_seconds": 1.5, "keepalive_seconds": 0.5}) as r:
        await r.speak("alice", track(alice[0]))
        await r.wait_lines({"alice": alice[:1]})
        conn = r.discord.voice.connection
        r.discord.voice.black_hole_bot()  # connected, but no datagram reaches the bot any more
        # bob starts talking: Discord says so (op 5) but his packets go nowhere.
        await r.speak("bob", track(bob[0]))
        await voice_session_renewed(r, conn)
        assert r.discord.voice.black_holed_datagrams > 0
        said = notices(r.discord.messages, "Voice receive stalled")
        assert len(said) == 1, said
        await asyncio.gather(r.speak("bob", track(*bob[1:])), r.speak("alice", track(alice[1])))
        await r.wait_lines({"alice": alice, "bob": bob[1:]})


async def test_udp_keepalive_is_sent_while_nobody_speaks(tmp_path: Path) -> None:
    # discord.py 2.7.1 sends no keepalive while the bot plays nothing; NATs then forget the
    # mapping after a while and receive goes deaf. Ours: an 8-byte counter every few seconds.
    async with rig(tmp_path, names=("alice",), voice={"keepalive_seconds": 0.5}) as r:
        r.discord.voice.received_from_bot.clear()
        await asyncio.sleep(2.0)
        keepalives = [d for d in r.discord.voice.received_from_bot if len(d) == 8]
        counters = [int.from_bytes(d, "little") for d in keepalives]
        assert len(counters) >= 2
        assert counters == sorted(counters) and len(set(counters)) == len(counters)


# -- 7./8. the bot process: SIGTERM / SIGINT flush everything; SIGKILL loses nothing stored -------

REPO = Path(__file__).resolve().parent.parent


@contextlib.asynccontextmanager
async def bot_process(tmp_path: Path, fake: LocalDiscord, stt: FakeSttServer,
                      name: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``python -m bot run`` configured like a deployment (env + a config file) against the
    fakes of this test; killed at the end if the test left it running."""
    config = tmp_path / "cantobot.yaml"
    config.write_text(textwrap.dedent(f"""\
        discord:
          guilds: [{fake.guild_id}]
        stt:
          stop_timeout: 8
          reconnect_initial_delay: 0.2
        voice:
          idle_timeout: 30
        """))
    env = bot_env(tmp_path, fake, stt, KEY)
    log = (tmp_path / f"{name}.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "run", "--config", str(config),
        cwd=REPO, env=env, stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        # Ready once on_ready ran (interactions before that may be dropped by discord.py).
        log_path = tmp_path / f"{name}.log"
        await until(lambda: b"logged in as" in log_path.read_bytes()
                    or proc.returncode is not None)
        assert proc.returncode is None, log_path.read_text()
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def live_meeting_in_process(fake: LocalDiscord) -> dict[str, int]:
    ids = fake.member_ids
    for name in ids:
        await fake.member_join_voice(ids[name])
    start = await fake.invoke("transcribe start", {}, user_id=ids[HOST])
    async with asyncio.timeout(WAIT):
        await start.wait_followups(1)
    await until(lambda: (c := fake.voice.connection) is not None and c.cipher is not None)
    return ids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_mid_meeting_flushes_every_session_posts_minutes_and_exits_0(
    tmp_path: Path, sig: signal.Signals
) -> None:
    alice, bob = ["散會", "再見"], ["好嘅"]
    async with (
        FakeSttServer(api_key=KEY) as stt,
        LocalDiscord(human_names=(HOST, "alice", "bob"), moderators=(HOST,)) as fake,
        bot_process(tmp_path, fake, stt, sig.name) as proc,
    ):
        ids = await live_meeting_in_process(fake)
        # The last sentences end right before the signal: they are still pending upstream and
        # only stop-session (the fake then commits what it heard) brings them in.
        await asyncio.gather(fake.speak(ids["alice"], track(*alice, gap=0.05)),
                             fake.speak(ids["bob"], track(*bob, gap=0.05, lead=2.0)))
        # The fake has heard "再見" to its end marker: its commit waits for a pause that the
        # signal (sent in the same loop turn as this check) comes before.
        await until(lambda: "再見" in stt.heard_texts)
        assert "再見" not in stt.committed_texts
        proc.send_signal(sig)
        async with asyncio.timeout(WAIT):
            code = await proc.wait()
        log_text = (tmp_path / f"{sig.name}.log").read_text()
        assert code == 0, log_text
        assert lines_of(fake.messages, "alice") == alice
        assert lines_of(fake.messages, "bob") == bob
        live = [r for r in stt.records.values() if r.session_starts]
        assert len(live) == 2 and all(r.session_stops == 1 for r in live)
        minutes = [m for m in fake.messages if "minutes.md" in m.attachments]
        assert len(minutes) == 1 and "3 lines" in minutes[0].content
        storage = await Storage.open(str(tmp_path / "bot.sqlite3"))
        try:
            stored = await storage.minutes(1)
        finally:
            await storage.close()
        assert sorted(s.text for s in stored.segments) == sorted(alice + bob)


async def test_sigkill_mid_meeting_keeps_stored_lines_and_minutes_posts_them_after_restart(
    tmp_path: Path,
) -> None:
    alice = ["記低", "唔好唔見"]
    async with (
        FakeSttServer(api_key=KEY) as stt,
        LocalDiscord(human_names=(HOST, "alice"), moderators=(HOST,)) as fake,
    ):
        async with bot_process(tmp_path, fake, stt, "killed") as proc:
            ids = await live_meeting_in_process(fake)
            await fake.speak(ids["alice"], track(*alice))
            await until(lambda: lines_of(fake.messages, "alice") == alice)
            proc.kill()
            assert await proc.wait() == -signal.SIGKILL
        async with bot_process(tmp_path, fake, stt, "restarted"):
            # On start the meeting left open is ended and its minutes posted by themselves ...
            await until(lambda: any("minutes.md" in q.files for q in fake.requests))
            # ... and /transcribe minutes can post them again.
            asked = await fake.invoke("transcribe minutes", {}, user_id=ids[HOST])
            async with asyncio.timeout(WAIT):
                await asked.wait_followups(1)
        uploads = [q for q in fake.requests if "minutes.md" in q.files]
        assert len(uploads) == 2
        notice = [m for m in fake.messages if "restarted during meeting" in m.content]
        assert len(notice) == 1 and notice[0].attachments
        for upload in uploads:
            markdown = upload.file_contents[upload.files.index("minutes.md")].decode()
            assert all(text in markdown for text in alice), markdown


# -- 5c. one speaker, ten minutes without a pause long enough to end the stream ------------------


@pytest.mark.xdist_group("cpu_heavy")  # one CPU-heavy test at a time in parallel runs (pyproject)
async def test_ten_minutes_of_nonstop_talk_commits_every_line_and_stays_bounded() -> None:
    from bench.soak import run_soak

    async with asyncio.timeout(120):
        result = await run_soak(minutes=10, speakers=1)
    assert result.ok, result.report()
    assert result.expected_lines > 200 and result.committed_lines == result.expected_lines
    assert result.dropped_s == 0


async def test_unconfirmed_audio_is_bounded_when_nothing_is_ever_committed() -> None:
    from bot.stt.session import SttSession

    async with asyncio.timeout(30), FakeSttServer(api_key=KEY) as server:
        server.ignore_start_session = True  # the session never streams: nothing is confirmed
        session = SttSession(url=server.url, api_key=KEY, sample_rate=16000, speaker="alice",
                             on_event=lambda e: None, start_timeout=0.5, max_buffer_seconds=3.0)
        with contextlib.suppress(Exception):
            await session.start()
        chunk = b"\x01\x00" * 1600  # 100 ms
        for _ in range(6000):  # ten minutes
            session.send_audio(chunk)
        buffered = session.unconfirmed_samples
        assert buffered <= 3 * 16000
        assert session.stats.dropped_seconds == pytest.approx(600 - 3, abs=0.2)
        await session.aclose()

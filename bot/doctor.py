"""``cantobot doctor``: a pre-flight check before the first meeting, one line per check.

An operator otherwise learns from a failed ``/transcribe start`` that the token, the key, a
permission or libopus is wrong. Each check prints ``✓ what`` or ``✗ what: problem -> what to
do``; the exit code is 0 only when every check passed. Checks only read: the STT check opens one
Socket.IO connection and starts and stops a session without sending audio; the Discord checks
are GETs (no gateway session, no command sync); storage is opened read-only and never migrated.
"""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import Config, load_config
from bot.errors import CantobotError, SttAuthError, SttUnavailable
from bot.invite import REQUIRED_PERMISSIONS, invite_url, missing_permissions
from bot.reach import Unreachable, describe_failure, discord_get
from bot.voice.opus import FRAME_MS

OK, FAIL = "\N{CHECK MARK}", "\N{BALLOT X}"
#: Slash command group ``cantobot run`` registers.
COMMAND_NAME = "transcribe"
#: Voice packets a talking member sends per second (one per 20 ms frame).
PACKETS_PER_SECOND = 1000 // FRAME_MS
#: Guilds per page of ``GET /users/@me/guilds`` (Discord's maximum).
GUILDS_PAGE = 200


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    ok: bool
    what: str
    fix: str = ""

    def line(self) -> str:
        """``✓ what``, ``✗ what -> fix``; a passed check may carry advice: ``✓ what -> fix``."""
        return f"{OK if self.ok else FAIL} {self.what}" + (f" -> {self.fix}" if self.fix else "")


def check_libopus() -> Check:
    from bot.voice.opus import OpusNotAvailable, libopus_version

    try:
        return Check(True, f"libopus loads ({libopus_version()})")
    except OpusNotAvailable as exc:
        return Check(False, f"libopus does not load: {exc}",
                     "apt-get install libopus0 (voice cannot be decoded without it)")


def check_libsndfile() -> Check:
    try:
        import soundfile
    except (OSError, ImportError) as exc:
        return Check(False, f"libsndfile does not load: {exc}",
                     "apt-get install libsndfile1 (needed by `cantobot replay`)")
    return Check(True, f"libsndfile loads ({soundfile.__libsndfile_version__})")


#: Slack below which the receive-buffer check advises raising net.core.rmem_max: what a busy
#: event loop may take before it reads again (bench row 2u at 250 speakers: lag p99 17-24 ms
#: over three runs; a start-up GC pass ~30-60 ms).
RECEIVE_SLACK_ADVISED_S = 0.1
#: A Discord voice datagram as the kernel sees it: RTP + AEAD tag + a 64 kbit/s Opus frame.
VOICE_DATAGRAM_BYTES = 200
#: Datagrams the check sends at most (a fraction of a second): a buffer that holds them all
#: holds minutes of any meeting, and is reported as "at least".
FILL_LIMIT = 50_000


def check_receive_buffer(speakers: int) -> Check:
    """How long the voice socket's receive buffer holds ``speakers`` talking at once while
    the loop is busy: measured, by filling a loopback socket set up as the listener sets up
    its own, since the kernel counts each datagram at far more than its size."""
    from bot.voice.inbox import RECEIVE_BUFFER_BYTES

    held, granted = _datagrams_held(RECEIVE_BUFFER_BYTES)
    slack = held / (speakers * PACKETS_PER_SECOND)
    lasts = f"{slack:.0f} s" if slack >= 10 else f"{slack * 1000:.0f} ms"
    at_least = "at least " if held >= FILL_LIMIT else ""
    what = (f"voice receive buffer {granted // 1024} KiB: {at_least}{held} voice packets, "
            f"{at_least or '~'}{lasts} of "
            f"{speakers} speaker{'s' if speakers != 1 else ''} talking at once "
            "(stt.max_sessions)")
    if slack >= RECEIVE_SLACK_ADVISED_S:
        return Check(True, what)
    return Check(True, what, "for meetings that large raise it: sysctl -w "
                             f"net.core.rmem_max={RECEIVE_BUFFER_BYTES} (README \"Performance\","
                             " Sizing); fewer speakers need less")


def _datagrams_held(ask: int) -> tuple[int, int]:
    """(datagrams a UDP socket holds unread, bytes granted) when ``ask`` bytes are asked."""
    with (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx,
          socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx):
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, ask)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx.connect(rx.getsockname())
        granted = rx.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        payload = bytes(VOICE_DATAGRAM_BYTES)
        # Linux reports (and holds) twice what it grants; a datagram costs at least its size.
        for _ in range(min(granted // VOICE_DATAGRAM_BYTES + 1, FILL_LIMIT)):
            try:
                tx.send(payload)
            except OSError:  # the sender's own buffer full: the receiver's is full too
                break
        held = 0
        while True:
            try:
                rx.recv(VOICE_DATAGRAM_BYTES)
            except BlockingIOError:
                return held, granted
            held += 1


#: CPU per speaker-second end to end (receive, decrypt, decode, convert, STT client; bench row
#: 2u, real UDP, speakers talking as a meeting does) as a multiple of this check's decode of
#: the same second, measured side by side on the bench host at stt.max_sessions' default (150
#: speakers; fewer cost more each, as each wake-up of the loop handles fewer datagrams), with
#: row 2u's sender on its own CPU: 2.47-3.19 over eight pairs, median ~2.85 (the spread is
#: mostly this check's quarter-second decode catching the host's speed of the moment). Above
#: the median, so that the estimate errs towards fewer.
END_TO_END_PER_DECODE = 3.0
#: Share of one core the speakers of ``stt.max_sessions`` may take before the check advises
#: fewer: the rest is the event loop's slack for bursts, commits and Discord (on the bench host
#: 150 speakers ran at 54-74 % of a core with a lag p99 of 1-18 ms; 250 at 84-92 % with 17-24
#: ms).
CORE_BUDGET = 0.75
#: Seconds of Discord-shaped audio the capacity check encodes, and CPU seconds it decodes for.
CAPACITY_AUDIO_S = 2.0
CAPACITY_CPU_S = 0.25


@dataclass(frozen=True)
class Capacity:
    """What one process holds, estimated from this host's Opus decode speed."""

    decode_us: float  #: CPU per 20 ms packet, Discord's 48 kHz stereo to 16 kHz mono

    @property
    def cpu_per_speaker(self) -> float:
        """Share of one core one speaker talking without a pause costs, end to end."""
        return self.decode_us * 1e-6 * PACKETS_PER_SECOND * END_TO_END_PER_DECODE

    @property
    def speakers(self) -> int:
        """Speakers talking at once one process holds within :data:`CORE_BUDGET`."""
        return max(1, int(CORE_BUDGET / self.cpu_per_speaker))


def check_capacity(max_sessions: int, sample_rate: int = 16000,
                   capacity: Capacity | None = None) -> Check:
    """Whether this host keeps ``max_sessions`` speakers in real time in one process: an
    estimate (the decode measured here, the rest scaled as the bench measured it), since the
    default suits the bench host and a small board or a shared vCPU may hold far fewer."""
    from bot.voice.opus import OpusNotAvailable

    try:
        cap = capacity if capacity is not None else measure_capacity(sample_rate)
    except OpusNotAvailable:
        return Check(False, "speakers per process not estimated: libopus does not load",
                     "apt-get install libopus0")
    load = max_sessions * cap.cpu_per_speaker
    what = (f"Opus decode {cap.decode_us:.0f} µs per voice packet here: one process holds "
            f"~{cap.speakers} speakers talking at once; stt.max_sessions {max_sessions} would "
            f"take ~{load:.0%} of a core (estimated)")
    if load <= CORE_BUDGET:
        return Check(True, what)
    processes = -(-max_sessions // cap.speakers)
    return Check(True, what, f"for meetings that large set stt.max_sessions to {cap.speakers} "
                             f"and run {processes} processes (README \"Scaling\"); smaller "
                             "meetings need no change")


def measure_capacity(sample_rate: int = 16000) -> Capacity:
    """Time this host's libopus on Discord-shaped packets (48 kHz stereo, 20 ms, 64 kbit/s,
    FEC) decoded as the receiver decodes them for an STT session at ``sample_rate``: mono, at
    that rate where libopus decodes it natively, else at 48 kHz (the receiver then resamples,
    which this leaves out); the median of several passes."""
    import time

    import numpy as np

    from bot.sim.sender import OpusEncoder
    from bot.voice.opus import (
        DISCORD_CHANNELS,
        DISCORD_SAMPLE_RATE,
        MAX_FRAME_MS,
        OpusDecoder,
        decode_rate,
    )

    rate, frame = DISCORD_SAMPLE_RATE, DISCORD_SAMPLE_RATE * FRAME_MS // 1000
    t = np.arange(int(CAPACITY_AUDIO_S * rate)) / rate
    # A voice-like test signal: a wandering pitch's harmonics, a syllable rhythm, room noise.
    pitch = 150 + 50 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(pitch) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    voice *= 0.3 * (0.55 + 0.45 * np.sin(2 * np.pi * 4.0 * t) ** 2)
    voice += 0.003 * np.random.default_rng(1).standard_normal(t.size)
    pcm = np.repeat((np.clip(voice, -1, 1) * 32767).astype(np.int16)[:, None],
                    DISCORD_CHANNELS, axis=1)
    with OpusEncoder(rate, DISCORD_CHANNELS, bitrate=64000, fec=True) as enc:
        packets = [enc.encode(pcm[i:i + frame]) for i in range(0, len(pcm) - frame + 1, frame)]
    passes: list[float] = []
    spent = 0.0
    out_rate = decode_rate(sample_rate)
    with OpusDecoder(out_rate, 1) as dec:
        out = np.zeros(out_rate * MAX_FRAME_MS // 1000, dtype=np.int16)
        while spent < CAPACITY_CPU_S or len(passes) < 3:
            t0 = time.process_time()
            for packet in packets:
                dec.decode_into(packet, out)
            took = time.process_time() - t0
            spent += took
            passes.append(took / len(packets))
    passes.sort()
    return Capacity(decode_us=passes[len(passes) // 2] * 1e6)


async def check_stt(config: Config) -> Check:
    """One connection: start-session, then stop-session without audio."""
    from bot.stt.session import SttSession

    url = config.stt.url
    if not config.stt.api_key:
        return Check(False, "cantonese.ai: no API key",
                     "set CANTONESE_AI_API_KEY (or stt.api_key in the config)")
    session = SttSession(
        url=url, api_key=config.stt.api_key.reveal(), sample_rate=config.stt.sample_rate,
        speaker="doctor", on_event=lambda _event: None,
        connect_timeout=config.stt.connect_timeout, start_timeout=config.stt.start_timeout,
        stop_timeout=config.stt.stop_timeout,
    )
    try:
        await session.start()
        await session.stop()
    except SttAuthError:
        return Check(False, f"cantonese.ai at {url} rejected the API key (HTTP 401)",
                     "check CANTONESE_AI_API_KEY / stt.api_key")
    except SttUnavailable as exc:
        reason = describe_failure(exc.__cause__, url) if exc.__cause__ else str(exc)
        return Check(False, f"cannot reach cantonese.ai at {url}: {reason}",
                     "check stt.url / CANTONESE_AI_URL and the network")
    except CantobotError as exc:
        return Check(False, f"cantonese.ai at {url}: {exc}", "check stt.url and try again")
    finally:
        await session.aclose()
    return Check(True, f"cantonese.ai at {url} reachable, API key accepted "
                       "(a session started and stopped)")


async def _all_guilds(config: Config) -> list[dict[str, Any]]:
    guilds: list[dict[str, Any]] = []
    after = "0"
    while True:
        page = await discord_get(config, f"/users/@me/guilds?limit={GUILDS_PAGE}&after={after}")
        guilds.extend(page)
        if len(page) < GUILDS_PAGE:
            return guilds
        after = page[-1]["id"]


async def check_discord(config: Config) -> list[Check]:
    """The token (``/users/@me``), the registered commands, each guild's permissions."""
    if not config.discord.token:
        return [Check(False, "Discord: no bot token",
                      "set DISCORD_TOKEN (discord.com/developers/applications -> your app -> "
                      "Bot -> Reset Token)")]
    try:
        me = await discord_get(config, "/users/@me")
    except Unreachable as exc:
        return [Check(False, str(exc), "check DISCORD_TOKEN, discord.api_base and the network"),
                Check(False, "Discord commands and guild permissions: not checked",
                      "fix the line above first")]
    checks = [Check(True, f"Discord token valid (bot user {me.get('username')}, "
                          f"id {me.get('id')})")]
    try:
        app = await discord_get(config, "/oauth2/applications/@me")
        app_id = int(app["id"])
        if config.discord.guilds:
            scopes = [(f"guild {g}", f"/applications/{app_id}/guilds/{g}/commands")
                      for g in config.discord.guilds]
        else:
            scopes = [("globally", f"/applications/{app_id}/commands")]
        missing = []
        for label, path in scopes:
            names = {c.get("name") for c in await discord_get(config, path)}
            if COMMAND_NAME not in names:
                missing.append(label)
        if missing:
            checks.append(Check(
                False, f"/{COMMAND_NAME} is not registered ({', '.join(missing)})",
                "start `cantobot run` once: it registers the commands (global ones can take "
                "up to an hour to show; discord.guilds makes it instant)"))
        else:
            where = "globally" if not config.discord.guilds else \
                f"in {len(config.discord.guilds)} configured guild(s)"
            checks.append(Check(True, f"/{COMMAND_NAME} registered {where}"))
        guilds = await _all_guilds(config)
    except Unreachable as exc:
        checks.append(Check(False, str(exc), "check discord.api_base and the network"))
        return checks
    invite = invite_url(app_id)
    if not guilds:
        checks.append(Check(False, "the bot is in no guild", f"invite it: {invite}"))
    for guild in guilds:
        name = f"guild {guild.get('name')!r} ({guild.get('id')})"
        lacking = missing_permissions(int(guild.get("permissions", "0")))
        if lacking:
            checks.append(Check(
                False, f"{name}: missing {', '.join(lacking)}",
                "give the bot's role these permissions (Server Settings -> Roles) or re-invite "
                f"it with {invite}"))
        else:
            checks.append(Check(True, f"{name}: all {len(REQUIRED_PERMISSIONS)} permissions "
                                      "/transcribe needs"))
    return checks


async def check_storage(config: Config) -> Check:
    """Reachable and at the schema this cantobot knows; read-only (never migrates)."""
    from bot.storage import describe_target, is_postgres_url, storage_target
    from bot.storage.common import load_migrations

    target = storage_target(config.storage)
    where = describe_target(target)
    flag = f" --config {config.source}" if config.source != "<defaults>" else ""
    fix = f"run `cantobot migrate{flag}`"
    try:
        if is_postgres_url(target):
            import asyncpg

            latest = load_migrations("postgres")[-1].version
            conn = await asyncpg.connect(target, timeout=10)
            try:
                exists = await conn.fetchval("SELECT to_regclass('schema_version') IS NOT NULL")
                version = int(await conn.fetchval(
                    "SELECT COALESCE(MAX(version), 0) FROM schema_version")) if exists else 0
            finally:
                await conn.close()
        else:
            latest = load_migrations("sqlite")[-1].version
            if not await asyncio.to_thread(Path(target).is_file):
                return Check(False, f"storage {where}: the file does not exist yet",
                             f"{fix} (or `cantobot run`, which creates and migrates it)")
            version = await asyncio.to_thread(_sqlite_version, target)
    except Exception as exc:  # any driver error is one line here
        return Check(False, f"storage {where} not reachable: {describe_failure(exc, target)}",
                     "check storage.url / storage.path")
    if version < latest:
        return Check(False, f"storage {where}: schema version {version}, this cantobot needs "
                            f"{latest}", fix)
    if version > latest:
        return Check(False, f"storage {where}: schema version {version} is newer than this "
                            f"cantobot ({latest})", "upgrade cantobot")
    return Check(True, f"storage {where} reachable, migrated (schema version {version})")


def _sqlite_version(path: str) -> int:
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, timeout=5)
    try:
        has = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='schema_version'"
        ).fetchone()
        if not has:
            return 0
        return int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version")
                   .fetchone()[0])
    finally:
        conn.close()


async def run_doctor(
    config_path: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Run every check, print one line each, return 0 only if all passed."""
    checks: list[Check] = []

    def report(*new: Check) -> None:
        for c in new:
            checks.append(c)
            out(c.line())

    # One after another, each printed when known (a slow check shows where it is).
    report(check_libopus(), check_libsndfile())
    try:
        config = load_config(config_path, environ)
    except CantobotError as exc:
        report(Check(False, f"config not valid: {exc}",
                     "fix the key named; see config.yaml.example"))
        return 1
    source = config.source if config.source != "<defaults>" else "no file: defaults + environment"
    report(Check(True, f"config valid ({source})"))
    report(check_receive_buffer(config.stt.max_sessions))
    report(check_capacity(config.stt.max_sessions, config.stt.sample_rate))
    report(await check_stt(config))
    report(*await check_discord(config))
    report(await check_storage(config))
    return 0 if all(c.ok for c in checks) else 1

"""`cantobot run` at start-up: every failure to reach Discord or cantonese.ai is one line, exit 1.

Each case is a real `python -m bot run` process against real sockets on loopback: a closed port,
a `.invalid` host name (RFC 2606: never resolves), a TLS certificate for another host name, a
server that accepts and never answers, and a rejected token or key (the loopback Discord and
STT answer 401). Once started, the bot logs the invite link with exactly the needed permissions.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import signal
import socket
import ssl
import sys
import wave
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bot.invite import permission_integer
from bot.sim.discord.server import LocalDiscord
from bot.sim.stt_server import FakeSttServer
from tests.bot_process import bot_env

REPO = Path(__file__).resolve().parent.parent
KEY = "startup-key"
WAIT = 60.0


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def base_env(tmp_path: Path, fake: LocalDiscord, stt: FakeSttServer) -> dict[str, str]:
    return bot_env(tmp_path, fake, stt, KEY)


async def run_cantobot(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, cwd=REPO, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def the_error_line(err: str) -> str:
    """stderr holds log lines and exactly one `cantobot: ...` line, and no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("cantobot: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
async def services() -> AsyncIterator[tuple[LocalDiscord, FakeSttServer]]:
    async with FakeSttServer(api_key=KEY) as stt, LocalDiscord() as fake:
        yield fake, stt


def wrong_host_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed CA certificate valid only for wrong.example (and its key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wrong.example")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("wrong.example")]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "wrong.pem", directory / "wrong.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@asynccontextmanager
async def https_server_for_wrong_host(tmp_path: Path) -> AsyncIterator[tuple[str, Path]]:
    """An HTTPS server on 127.0.0.1 whose certificate (trusted: ca_file) names another host."""
    cert_file, key_file = wrong_host_certificate(tmp_path)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_file, key_file)
    app = web.Application()
    app.router.add_get("/{tail:.*}", lambda _r: web.json_response({"id": "1"}))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://127.0.0.1:{port}", cert_file
    finally:
        await runner.cleanup()


# -- Discord ---------------------------------------------------------------------------------------


async def test_discord_refused_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    port = closed_port()
    env = {**base_env(tmp_path, fake, stt), "DISCORD_API_BASE": f"https://127.0.0.1:{port}/api"}
    code, out, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1 and out == ""
    assert f"cannot reach Discord at https://127.0.0.1:{port}/api: connection refused" in line


async def test_discord_unresolvable_host_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    env = {**base_env(tmp_path, fake, stt), "DISCORD_API_BASE": "https://discord.invalid/api/v10"}
    code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert "cannot reach Discord at https://discord.invalid/api/v10" in line
    assert "DNS lookup of discord.invalid failed" in line


async def test_discord_certificate_for_another_host_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    async with https_server_for_wrong_host(tmp_path) as (url, ca_file):
        env = {**base_env(tmp_path, fake, stt), "DISCORD_API_BASE": url + "/api/v10",
               "DISCORD_CA_FILE": str(ca_file)}
        code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert f"cannot reach Discord at {url}/api/v10: TLS certificate not accepted" in line
    assert "Hostname mismatch" in line or "IP address mismatch" in line, line


async def test_discord_rejecting_the_token_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    env = {**base_env(tmp_path, fake, stt), "DISCORD_TOKEN": "not-the-token"}
    code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert "rejected the bot token (HTTP 401)" in line and "not-the-token" not in err


async def test_discord_gateway_refused_is_one_line_not_endless_retries(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    port = closed_port()
    env = {**base_env(tmp_path, fake, stt), "DISCORD_GATEWAY_URL": f"wss://127.0.0.1:{port}"}
    code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert f"cannot reach the Discord gateway at wss://127.0.0.1:{port}: connection refused" in line


async def test_discord_silent_server_times_out_in_one_line(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    from bot.reach import PROBE_TIMEOUT

    fake, stt = services
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept, never answer (not even the TLS handshake)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    env = {**base_env(tmp_path, fake, stt), "DISCORD_API_BASE": f"https://127.0.0.1:{port}/api"}
    try:
        code, _, err = await run_cantobot(env, "run")
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
    line = the_error_line(err)
    assert code == 1 and accepted
    assert line.endswith(f"cannot reach Discord at https://127.0.0.1:{port}/api: timed out "
                         f"(no answer within {PROBE_TIMEOUT:g} s)"), line


# -- cantonese.ai ----------------------------------------------------------------------------------


async def test_stt_refused_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    port = closed_port()
    env = {**base_env(tmp_path, fake, stt), "CANTONESE_AI_URL": f"http://127.0.0.1:{port}"}
    code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert f"cannot reach cantonese.ai at http://127.0.0.1:{port}: connection refused" in line


async def test_stt_unresolvable_host_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    env = {**base_env(tmp_path, fake, stt), "CANTONESE_AI_URL": "https://stt.invalid"}
    code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert "cannot reach cantonese.ai at https://stt.invalid: DNS lookup of stt.invalid" in line


async def test_stt_certificate_for_another_host_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    async with https_server_for_wrong_host(tmp_path) as (url, ca_file):
        # python-socketio's aiohttp session trusts the system store plus SSL_CERT_FILE.
        env = {**base_env(tmp_path, fake, stt), "CANTONESE_AI_URL": url,
               "SSL_CERT_FILE": str(ca_file)}
        code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert f"cannot reach cantonese.ai at {url}: TLS certificate not accepted" in line


async def test_stt_silent_server_times_out_in_one_line(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    accepted: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # accept, never answer

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text("stt:\n  connect_timeout: 0.5\n", encoding="utf-8")
    env = {**base_env(tmp_path, fake, stt), "CANTONESE_AI_URL": f"http://127.0.0.1:{port}"}
    try:
        code, _, err = await run_cantobot(env, "run", "--config", str(config))
    finally:
        for w in accepted:
            w.close()
        server.close()
        await server.wait_closed()
    line = the_error_line(err)
    assert code == 1
    assert f"cannot reach cantonese.ai at http://127.0.0.1:{port}: timed out" in line
    assert accepted, "the probe never connected"


async def test_stt_rejecting_the_key_is_one_line_exit_1(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    env = {**base_env(tmp_path, fake, stt), "CANTONESE_AI_API_KEY": "wrong-key"}
    code, _, err = await run_cantobot(env, "run")
    line = the_error_line(err)
    assert code == 1
    assert f"cantonese.ai at {stt.url} rejected the API key (HTTP 401)" in line
    assert stt.rejected_attempts == 1


async def test_replay_unreachable_stt_says_why(tmp_path: Path) -> None:
    clip = tmp_path / "a.wav"
    with wave.open(str(clip), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * 1600)
    port = closed_port()
    env = {**os.environ, "CANTONESE_AI_URL": f"http://127.0.0.1:{port}",
           "CANTONESE_AI_API_KEY": KEY}
    code, _, err = await run_cantobot(env, "replay", "--speaker", f"a={clip}")
    line = the_error_line(err)
    assert code == 1
    assert "connection refused" in line and str(port) in line


# -- a good start ----------------------------------------------------------------------------------


async def test_run_logs_the_invite_link_once_with_exactly_the_needed_permissions(
    tmp_path: Path, services: tuple[LocalDiscord, FakeSttServer]
) -> None:
    fake, stt = services
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", cwd=REPO, env=base_env(tmp_path, fake, stt),
            stdout=log, stderr=asyncio.subprocess.STDOUT)
    try:
        async with asyncio.timeout(WAIT):
            # The sign is a line in another process's log: no event to wait on.
            while proc.returncode is None:  # noqa: ASYNC110
                if b"logged in as" in log_path.read_bytes():
                    break
                await asyncio.sleep(0.1)
        assert proc.returncode is None, log_path.read_text()
        await fake.force_reconnect()  # a reconnect does not log it again
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = log_path.read_text()
    links = re.findall(r"https://discord\.com/oauth2/authorize\S*", text)
    assert links == [
        f"https://discord.com/oauth2/authorize?client_id={fake.world.application_id}"
        f"&scope=bot+applications.commands&permissions={permission_integer()}"
    ], text
    # The preflight opened one STT connection (no session) and closed it.
    assert stt.connection_attempts == 1 and stt.rejected_attempts == 0
    # The start-up heap left the collector's full passes once, at the first READY.
    assert len(re.findall(r"moved \d+ start-up objects out of the garbage collector", text)) == 1

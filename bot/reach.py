"""Can we reach Discord and cantonese.ai? One-shot probes that fail with one readable line.

``cantobot run`` calls :func:`preflight` before logging in, and ``cantobot doctor`` calls the
probes one by one: a wrong URL, a DNS failure, a refused port, a certificate that does not match
or a rejected token/key then ends start-up with one line naming what could not be reached and
why (:class:`Unreachable`, exit code 1), instead of an aiohttp traceback or discord.py's endless
gateway retries. Once running, transient failures are discord.py's and
:class:`~bot.stt.session.SttSession`'s business (they reconnect); nothing here retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import socketio

from bot.config import Config
from bot.errors import CantobotError, RemoteError
from bot.stt import protocol as p

#: Bound on each probe (seconds) when the config gives none.
PROBE_TIMEOUT = 10.0


class Unreachable(RemoteError):
    """``what`` at ``url`` could not be reached (or refused our credentials) at start-up."""

    permanent = True

    def __init__(self, what: str, url: str, reason: str) -> None:
        self.what, self.url, self.reason = what, url, reason
        super().__init__(f"cannot reach {what} at {url}: {reason}")


class Rejected(Unreachable):
    """Reached, but our token or key was refused (HTTP 401)."""

    def __init__(self, what: str, url: str, reason: str) -> None:
        self.what, self.url, self.reason = what, url, reason
        CantobotError.__init__(self, f"{what} at {url} {reason}")


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first (libraries hide the real error there)."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen):
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def describe_failure(exc: BaseException, url: str, timeout: float | None = None) -> str:
    """Why a connection to ``url`` failed, in a few words: DNS, refused, TLS, timeout, HTTP."""
    chain = _chain(exc)
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme in ("https", "wss") else 80)
    for e in chain:
        if isinstance(e, aiohttp.ClientConnectorError):  # knows where it tried to connect
            host, port = e.host, e.port or port
            break
    for e in chain:
        if isinstance(e, aiohttp.ClientConnectorCertificateError):
            e = e.certificate_error
        if isinstance(e, ssl.SSLCertVerificationError):
            detail = e.verify_message or str(e)
            return f"TLS certificate not accepted ({detail})"
    for e in chain:
        if isinstance(e, ssl.SSLError | aiohttp.ClientSSLError):
            return f"TLS handshake failed ({getattr(e, 'reason', None) or e})"
    for e in chain:
        if isinstance(e, aiohttp.ClientConnectorDNSError | socket.gaierror):
            return f"DNS lookup of {host} failed (no such host or no DNS server)"
    for e in chain:
        if isinstance(e, ConnectionRefusedError):
            return f"connection refused ({host} port {port}: nothing listening)"
    for e in chain:
        if isinstance(e, TimeoutError | aiohttp.ServerTimeoutError):
            within = f" within {timeout:g} s" if timeout is not None else ""
            return f"timed out (no answer{within})"
    for e in chain:
        status = getattr(e, "status", None)
        if isinstance(status, int) and status >= 400:
            return f"HTTP {status}"
    for e in chain:
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
    inner = chain[-1]
    return str(inner) or type(inner).__name__


def _discord_ssl(config: Config) -> ssl.SSLContext | bool:
    """System trust plus ``discord.ca_file`` (as the bot itself connects)."""
    if config.discord.ca_file is None:
        return True
    ctx = ssl.create_default_context()
    ctx.load_verify_locations(cafile=config.discord.ca_file)
    return ctx


async def discord_get(config: Config, path: str) -> Any:
    """``GET {discord.api_base}{path}`` with the bot token; JSON, or :class:`Unreachable`."""
    timeout = PROBE_TIMEOUT
    url = config.discord.api_base.rstrip("/") + path
    headers = {"Authorization": f"Bot {config.discord.token.reveal()}"}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.get(url, headers=headers, ssl=_discord_ssl(config)) as resp,
        ):
            if resp.status == 401:
                raise Rejected("Discord", config.discord.api_base,
                               "rejected the bot token (HTTP 401): check DISCORD_TOKEN")
            if resp.status >= 400:
                raise Unreachable("Discord", url, f"HTTP {resp.status} for GET {path}")
            return await resp.json()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Unreachable(
            "Discord", config.discord.api_base, describe_failure(exc, url, timeout)
        ) from exc


async def check_discord_gateway(config: Config) -> None:
    """Open the gateway websocket and wait for its HELLO (no IDENTIFY: no session is used)."""
    timeout = PROBE_TIMEOUT
    url = config.discord.gateway_url
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as http,
            http.ws_connect(url, params={"v": "10", "encoding": "json"},
                            ssl=_discord_ssl(config)) as ws,
        ):
            msg = await ws.receive(timeout=timeout)
            if msg.type is not aiohttp.WSMsgType.TEXT or '"op":10' not in msg.data.replace(
                " ", ""
            ):
                raise Unreachable("the Discord gateway", url,
                                  f"no HELLO from the gateway (got {msg.type.name})")
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise Unreachable("the Discord gateway", url,
                          describe_failure(exc, url, timeout)) from exc


async def check_stt_connect(config: Config) -> None:
    """One Socket.IO connection to ``stt.url`` with the key (its handshake answers 401), closed."""
    url = config.stt.url
    timeout = config.stt.connect_timeout
    http = aiohttp.ClientSession()
    client = socketio.AsyncClient(reconnection=False, http_session=http, handle_sigint=False)
    try:
        await asyncio.wait_for(
            client.connect(
                url,
                headers={p.API_KEY_HEADER: config.stt.api_key.reveal()},
                transports=["websocket"],
                socketio_path=p.SOCKETIO_PATH,
                wait_timeout=timeout,
            ),
            timeout,
        )
    except (socketio.exceptions.ConnectionError, aiohttp.ClientError, OSError,
            TimeoutError) as exc:
        raise stt_failure(config, exc) from exc
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(client.disconnect(), 2.0)
        await http.close()


def stt_failure(config: Config, exc: BaseException) -> Unreachable:
    """The one-line :class:`Unreachable` for a failed connection to cantonese.ai."""
    reason = describe_failure(exc, config.stt.url, config.stt.connect_timeout)
    if reason == "HTTP 401":
        return Rejected("cantonese.ai", config.stt.url,
                        "rejected the API key (HTTP 401): check CANTONESE_AI_API_KEY")
    return Unreachable("cantonese.ai", config.stt.url, reason)


async def preflight(config: Config) -> dict[str, Any]:
    """Discord REST (the token), the Discord gateway and cantonese.ai (the key), in that order.

    Returns the bot user (``/users/@me``). Raises :class:`Unreachable` on the first failure.
    """
    me: dict[str, Any] = await discord_get(config, "/users/@me")
    await check_discord_gateway(config)
    await check_stt_connect(config)
    return me

"""Keep secrets out of printed URLs and out of every log record.

Why: discord.py logs webhook and interaction URLs (their path holds the token), gateway and
voice payloads (``"token"``, ``"secret_key"``) at DEBUG; a storage URL carries a password. A
log file is read by more people than the bot's config, so nothing that grants access may reach
it, at any level.

:func:`redact_url` parses a URL and hides the user-info password and secret query values.
:func:`redact_text` applies that and a few token shapes to any text. :func:`install` puts
:func:`redact_text` into every log record as it is created (a record factory, so every handler,
level and logger is covered, tracebacks included). Pure: standard library only.
"""

from __future__ import annotations

import logging
import re
import threading
import traceback
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
#: Query parameter names whose values are secrets (compared lower-case).
SECRET_QUERY_KEYS = frozenset({
    "password", "passwd", "pass", "pwd", "sslpassword", "token", "access_token", "api_key",
    "apikey", "key", "secret", "auth", "authorization", "signature", "sig",
})
#: Exact secrets shorter than this are not replaced in free text (they would mangle it).
MIN_SECRET_LENGTH = 8

_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s'\"<>]+")
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Webhook and interaction URLs carry their token in the path.
    (re.compile(r"(/webhooks/\d+/)[^/\s'\"?>]+"), r"\1" + MASK),
    (re.compile(r"(/interactions/\d+/)[^/\s'\"?>]+"), r"\1" + MASK),
    # Payload fields, as JSON or as a Python dict repr.
    (re.compile(r"""(['"](?:token|password|api_key|apikey|access_token|secret|authorization)"""
                r"""['"]\s*:\s*['"])[^'"]*""", re.IGNORECASE), r"\1" + MASK),
    (re.compile(r"""(['"]secret_key['"]\s*:\s*)\[[^\]]*\]"""), r"\1[" + MASK + "]"),
    # Authorization header values.
    (re.compile(r"\b(Bot|Bearer)\s+[A-Za-z0-9_.\-]{16,}"), r"\1 " + MASK),
    # A Discord bot token's shape: base64 user id . timestamp . hmac.
    (re.compile(r"\b[A-Za-z0-9_\-]{23,28}\.[A-Za-z0-9_\-]{6,7}\.[A-Za-z0-9_\-]{27,}"), MASK),
)


def redact_url(url: str) -> str:
    """``url`` with the user-info password and secret query values replaced by ``***``.

    A URL that does not parse is hidden whole but for its scheme: better unreadable than leaked.
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError on a malformed port
    except ValueError:
        scheme = url.split("://", 1)[0] if "://" in url else ""
        return f"{scheme}://{MASK}" if scheme else MASK
    netloc = parts.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{host}"
    query = "&".join(_redact_pair(pair) for pair in parts.query.split("&")) if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _redact_pair(pair: str) -> str:
    name, eq, _ = pair.partition("=")
    if eq and unquote(name).strip().lower() in SECRET_QUERY_KEYS:
        return f"{name}={MASK}"
    return pair


class _Secrets:
    """Exact secret strings known at run time (the bot token, the STT key), thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: tuple[str, ...] = ()

    def add(self, values: Iterable[str]) -> None:
        with self._lock:
            known = set(self._values)
            known.update(v for v in values if len(v) >= MIN_SECRET_LENGTH)
            # Longest first, so a secret containing another is replaced whole.
            self._values = tuple(sorted(known, key=len, reverse=True))

    @property
    def values(self) -> tuple[str, ...]:
        return self._values


_SECRETS = _Secrets()


def add_secrets(*values: str) -> None:
    """Also replace these exact strings in logs (empty and very short ones are ignored)."""
    _SECRETS.add(values)


def redact_text(text: str) -> str:
    """``text`` with every URL redacted (:func:`redact_url`), token shapes and known secrets
    replaced by ``***``."""
    for secret in _SECRETS.values:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL.sub(lambda m: redact_url(m.group(0)), text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Redact every log record from now on, whoever logs it and wherever it goes (idempotent).

    The message is formatted (``msg % args``) and redacted when the record is made; an
    exception's traceback is formatted and redacted then too, so handlers print the safe text.
    """
    global _installed
    with _install_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = previous(*args, **kwargs)
            redact_record(record)
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


def redact_record(record: logging.LogRecord) -> None:
    """Format ``record``'s message (and traceback) now, redacted; what :func:`install` does to
    every record."""
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: let logging report it as it always does
        return
    record.msg, record.args = redact_text(message), None
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = redact_text("".join(traceback.format_exception(*record.exc_info))
                                      .rstrip("\n"))
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)

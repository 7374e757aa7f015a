"""Configuration: YAML file + environment overrides -> frozen dataclasses.

Every problem (unknown key, wrong type, value out of range, missing secret) is one
:class:`~bot.errors.ConfigError` naming the file and the dotted key, never a traceback.
Secrets are wrapped in :class:`Secret`, whose ``repr``/``str`` never show the value, so a
config object can be logged safely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from bot.errors import ConfigError
from bot.logsafe import redact_url
from bot.transcript.script import Readability, ReadabilityError, parse_jyutping, parse_script

log = logging.getLogger(__name__)

DEFAULT_STT_URL = "https://cantonese.ai"
DEFAULT_DISCORD_API_BASE = "https://discord.com/api/v10"
DEFAULT_DISCORD_GATEWAY = "wss://gateway.discord.gg"

#: Sample rates the pipeline accepts for the STT session (Hz).
MIN_SAMPLE_RATE = 8000
MAX_SAMPLE_RATE = 48000


class Secret(str):
    """A string that never prints its value (``repr``/``format`` show ``'***'``)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"

    def __str__(self) -> str:  # pragma: no cover - str() of a str subclass is rarely used
        return "***" if self else ""

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def reveal(self) -> str:
        """The real value, for the one place that needs it (an HTTP header, a login)."""
        return str.__str__(self)


class SecretUrl(Secret):
    """A URL that may hold a password (``storage.url``): printed with it redacted.

    ``repr``/``str``/``format`` show :func:`~bot.logsafe.redact_url` of it (user-info password
    and ``password=`` query values as ``***``), so where the data lives stays visible.
    """

    def __repr__(self) -> str:
        return f"SecretUrl({redact_url(self.reveal())!r})"

    def __str__(self) -> str:
        return redact_url(self.reveal())


def _range(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    return {"range": (lo, hi)}


@dataclass(frozen=True)
class DiscordConfig:
    token: Secret = Secret("")
    #: Guild ids to sync slash commands to on start-up; empty means global sync.
    guilds: tuple[int, ...] = ()
    #: Role name (besides Manage Channels) allowed to start/stop transcription.
    manager_role: str | None = None
    api_base: str = DEFAULT_DISCORD_API_BASE
    gateway_url: str = DEFAULT_DISCORD_GATEWAY
    #: Extra CA bundle (PEM) trusted for REST, gateway and voice TLS (a proxy, the local Discord).
    ca_file: str | None = None
    shard_count: int | None = field(default=None, metadata=_range(1, None))
    shard_ids: tuple[int, ...] | None = None
    #: Allow plain http:// / ws:// to a host other than loopback (the token goes in clear).
    allow_insecure: bool = False


@dataclass(frozen=True)
class SttConfig:
    url: str = DEFAULT_STT_URL
    api_key: Secret = Secret("")
    sample_rate: int = field(default=16000, metadata=_range(MIN_SAMPLE_RATE, MAX_SAMPLE_RATE))
    chunk_ms: int = field(default=100, metadata=_range(10, 1000))
    connect_timeout: float = field(default=10.0, metadata=_range(0.1, 300))
    start_timeout: float = field(default=10.0, metadata=_range(0.1, 300))
    stop_timeout: float = field(default=10.0, metadata=_range(0.1, 300))
    #: Audio held for re-sending while disconnected; past it the oldest audio is dropped.
    max_buffer_seconds: float = field(default=120.0, metadata=_range(1, 3600))
    reconnect_initial_delay: float = field(default=0.5, metadata=_range(0.01, 60))
    reconnect_max_delay: float = field(default=30.0, metadata=_range(0.1, 3600))
    #: STT sessions one process runs at once; further speakers wait in order. 150: all of them
    #: talking at once as a meeting does, one process (one event loop, about one core) keeps
    #: real time at 54-74 % of a core with a ~1-4 ms p99 from datagram to STT socket (bench row
    #: 2u, real UDP); 250 took 84-92 % (p99 17-24 ms), too little room for the host's slow
    #: phases (~30 % more) or a burst -- ``python -m bench`` measures 150 and 250.
    max_sessions: int = field(default=150, metadata=_range(1, None))
    #: Silence sent after speech so that the upstream hears the pause that makes it commit the
    #: sentence; longer silence is not sent (it would be paid for). See README "Speech, not
    #: silence" for the default. The tail ends earlier once the commit arrives. 0 sends every
    #: sample, silence included (the old behaviour, kept for comparison in the bench).
    silence_tail_ms: int = field(default=2000, metadata=_range(0, 10000))
    #: Allow plain http:// / ws:// to a host other than loopback (the API key goes in clear).
    allow_insecure: bool = False


@dataclass(frozen=True)
class VoiceConfig:
    #: Seconds of silence after which a speaker's STT session is stopped.
    idle_timeout: float = field(default=10.0, metadata=_range(0.5, 3600))
    #: Seconds without packets while members are speaking before the watchdog reconnects.
    watchdog_seconds: float = field(default=15.0, metadata=_range(1, 3600))
    jitter_ms: int = field(default=60, metadata=_range(0, 1000))
    keepalive_seconds: float = field(default=5.0, metadata=_range(0.5, 600))


@dataclass(frozen=True)
class TranscribeConfig:
    threads: bool = False
    captions: bool = False
    #: Minutes end by themselves after this many seconds with no humans in the channel.
    empty_channel_timeout: float = field(default=60.0, metadata=_range(1, 86400))
    caption_edit_interval: float = field(default=1.0, metadata=_range(0.2, 60))
    #: How speech is shown where a guild chose nothing: hk | simplified | as-is.
    script: str = "as-is"
    #: A Jyutping line under each posted sentence: off | line.
    jyutping: str = "off"
    #: Seconds a SIGTERM/SIGINT may take: STT flushed and lines stored first, then whatever
    #: Discord takes in time; minutes it could not take are posted by the next start.
    shutdown_timeout: float = field(default=10.0, metadata=_range(1, 600))

    @property
    def readability(self) -> Readability:
        """The default :class:`Readability` (checked by :func:`load_config`)."""
        return Readability.parse(self.script, self.jyutping)
    #: When Discord (or a moderator) moves the bot to another voice channel: follow it, telling
    #: the new room first (true), or end the meeting (false).
    follow_moves: bool = True


@dataclass(frozen=True)
class StorageConfig:
    path: str = "cantobot.sqlite3"
    url: SecretUrl | None = None
    retention_days: int = field(default=30, metadata=_range(0, None))

    def __post_init__(self) -> None:
        # A URL given as a plain string (code building a config directly) is a secret too.
        if self.url is not None and not isinstance(self.url, SecretUrl):
            object.__setattr__(self, "url", SecretUrl(self.url))


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"


@dataclass(frozen=True)
class Config:
    discord: DiscordConfig = DiscordConfig()
    stt: SttConfig = SttConfig()
    voice: VoiceConfig = VoiceConfig()
    transcribe: TranscribeConfig = TranscribeConfig()
    storage: StorageConfig = StorageConfig()
    logging: LoggingConfig = LoggingConfig()
    #: Where the values came from, for error messages.
    source: str = field(default="<defaults>", compare=False)

    def require_stt_key(self) -> None:
        if not self.stt.api_key:
            raise ConfigError(
                self.source,
                "stt.api_key",
                "no cantonese.ai API key; set stt.api_key or CANTONESE_AI_API_KEY",
            )


#: Environment variables that override keys (env wins over the file).
ENV_OVERRIDES: Mapping[str, str] = {
    "DISCORD_TOKEN": "discord.token",
    "DISCORD_API_BASE": "discord.api_base",
    "DISCORD_GATEWAY_URL": "discord.gateway_url",
    "DISCORD_CA_FILE": "discord.ca_file",
    "CANTONESE_AI_API_KEY": "stt.api_key",
    "CANTONESE_AI_URL": "stt.url",
    "CANTOBOT_SAMPLE_RATE": "stt.sample_rate",
    "CANTOBOT_STORAGE_URL": "storage.url",
    "CANTOBOT_STORAGE_PATH": "storage.path",
    "CANTOBOT_LOG_LEVEL": "logging.level",
}

_LOG_LEVELS = {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}

#: Sections holding a secret: a mistake anywhere in them is reported without the value (a
#: token pasted under the wrong key, or as the section itself, must not reach a terminal or log).
SECRET_SECTIONS = frozenset({"discord", "stt", "storage"})
#: What a real key looks like; anything else under a secret section may be a pasted secret.
_KEY_LIKE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


def _shown(value: Any, key: str) -> str:
    """``value`` for an error message, unless ``key`` lies in a secret-bearing section."""
    if key.split(".", 1)[0] in SECRET_SECTIONS:
        return f"{_kind(value)} (value not shown: this section holds secrets)"
    return repr(value)


def _kind(value: Any) -> str:
    return {bool: "true/false", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "a mapping", type(None): "null"}.get(type(value), "a value")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " (or null)"
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp in (Secret, SecretUrl):
        return "a string"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _coerce(value: Any, tp: Any, file: str, key: str, from_env: bool) -> Any:
    """Check ``value`` against the annotation ``tp``; env strings are parsed."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        if value is None or (from_env and value == ""):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _coerce(value, inner, file, key, from_env)
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if from_env and isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise ConfigError(file, key, f"expected {_type_name(tp)}, got {_shown(value, key)}")
        return tuple(_coerce(v, item_tp, file, key, from_env) for v in value)
    if tp is bool:
        if from_env and isinstance(value, str):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
        if isinstance(value, bool):
            return value
        raise ConfigError(file, key, f"expected true or false, got {_shown(value, key)}")
    if tp is int:
        if from_env and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
        elif isinstance(value, str) and value.isdigit():
            return int(value)  # Discord ids are often quoted in YAML
        raise ConfigError(file, key, f"expected an integer, got {_shown(value, key)}")
    if tp is float:
        if from_env and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(file, key, f"expected a number, got {_shown(value, key)}")
    if tp in (str, Secret, SecretUrl):
        if isinstance(value, str):
            return tp(value) if tp is not str else value
        if tp is not str:
            raise ConfigError(file, key, "expected a string (value not shown: it is a secret)")
        raise ConfigError(file, key, f"expected a string, got {_shown(value, key)}")
    raise AssertionError(f"unsupported config type {tp!r}")  # a bug in this module


def _check_range(f: dataclasses.Field[Any], value: Any, file: str, key: str) -> None:
    lo, hi = f.metadata.get("range", (None, None))
    if isinstance(value, int | float) and not isinstance(value, bool):
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
            raise ConfigError(file, key, f"must be {bounds}, got {value}")  # numbers only


def _build(cls: type[Any], data: Any, file: str, prefix: str, env: Mapping[str, Any]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        where = prefix or "<top level>"
        raise ConfigError(file, where, f"expected a mapping, got {_shown(data, where)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in fields:
            dotted = f"{prefix}.{key}" if prefix else str(key)
            if prefix.split(".")[0] in SECRET_SECTIONS and not _KEY_LIKE.match(str(key)):
                dotted = f"{prefix}.<a key not shown: it looks like a value>"  # a pasted secret
            known = ", ".join(sorted(fields))
            raise ConfigError(file, dotted, f"unknown key (known keys here: {known})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a nested section
            kwargs[name] = _build(tp, data.get(name), file, dotted, env)
            continue
        if dotted in env:
            var, raw = env[dotted]
            kwargs[name] = _coerce(raw, tp, f"environment variable {var}", dotted, True)
            value = kwargs[name]
        elif name in data:
            kwargs[name] = _coerce(data[name], tp, file, dotted, False)
            value = kwargs[name]
        else:
            continue
        _check_range(f, value, file, dotted)
    return cls(**kwargs)


def load_config(
    path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Read ``path`` (optional) and apply environment overrides."""
    environ = os.environ if environ is None else environ
    file = str(path) if path is not None else "<defaults>"
    data: Any = {}
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(file, "", "file not found (copy config.yaml.example)") from None
        except OSError as exc:
            raise ConfigError(file, "", f"cannot read: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}" if mark is not None else "?"
            problem = getattr(exc, "problem", None) or "invalid YAML"
            raise ConfigError(file, "", f"invalid YAML at {where}: {problem}") from None
    section = data.get("transcribe") if isinstance(data, dict) else None
    if isinstance(section, dict) and isinstance(section.get("jyutping"), bool):
        # YAML 1.1 reads a bare `off` as false: take it as the word the user wrote.
        section["jyutping"] = "line" if section["jyutping"] else "off"
    env = {key: (var, environ[var]) for var, key in ENV_OVERRIDES.items() if var in environ}
    config: Config = _build(Config, data, file, "", env)
    if config.logging.level.upper() not in _LOG_LEVELS:
        raise ConfigError(
            file, "logging.level", f"must be one of {', '.join(sorted(_LOG_LEVELS))}"
        )
    for key, url in (("stt.url", config.stt.url), ("discord.api_base", config.discord.api_base)):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(file, key, f"must be an http(s) URL, got {_shown(url, key)}")
    if not config.discord.gateway_url.startswith(("ws://", "wss://")):
        raise ConfigError(file, "discord.gateway_url", "must be a ws(s) URL")
    check_transport(config, file)
    _check_readability(config, file)
    if config.discord.ca_file is not None and not Path(config.discord.ca_file).is_file():
        raise ConfigError(file, "discord.ca_file", f"no such file: {config.discord.ca_file}")
    return dataclasses.replace(config, source=file)


def is_loopback_host(host: str | None) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1): traffic never leaves the machine."""
    if not host:
        return False
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_transport(config: Config, source: str) -> None:
    """Refuse plain http:// or ws:// to a non-loopback host unless the section allows it:
    the STT key and the Discord token would cross the network in clear."""
    checks = (
        ("stt", config.stt.url, config.stt.allow_insecure, "the cantonese.ai API key"),
        ("discord", config.discord.api_base, config.discord.allow_insecure, "the bot token"),
        ("discord", config.discord.gateway_url, config.discord.allow_insecure, "the bot token"),
    )
    for section, url, allowed, what in checks:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "ws") or is_loopback_host(parts.hostname):
            continue
        key = f"{section}.{'url' if section == 'stt' else _url_key(config, url)}"
        if not allowed:
            raise ConfigError(
                source, key,
                f"plain {parts.scheme}:// to {parts.hostname} would send {what} unencrypted; use "
                f"{parts.scheme}s:// or set {section}.allow_insecure: true")
        if (key, url) not in _warned_insecure:  # once per process, however often it is loaded
            _warned_insecure.add((key, url))
            log.warning("%s: plain %s:// to %s sends %s unencrypted (%s.allow_insecure is true)",
                        key, parts.scheme, parts.hostname, what, section)


_warned_insecure: set[tuple[str, str]] = set()


def _url_key(config: Config, url: str) -> str:
    return "api_base" if url == config.discord.api_base else "gateway_url"
def _check_readability(config: Config, file: str) -> None:
    for key, parse, value in (("transcribe.script", parse_script, config.transcribe.script),
                              ("transcribe.jyutping", parse_jyutping, config.transcribe.jyutping)):
        try:
            parse(value)
        except ReadabilityError as exc:
            raise ConfigError(file, key, str(exc)) from None


def with_overrides(config: Config, **section_values: Mapping[str, Any]) -> Config:
    """A copy with e.g. ``stt={"url": ...}`` replaced; used by CLI flags (validated)."""
    sections: dict[str, Any] = {}
    for section, values in section_values.items():
        current = getattr(config, section)
        hints = typing.get_type_hints(type(current))
        checked = {}
        for key, value in values.items():
            if value is None:
                continue
            checked[key] = _coerce(value, hints[key], "command line", f"{section}.{key}", True)
            f = {f.name: f for f in dataclasses.fields(current)}[key]
            _check_range(f, checked[key], "command line", f"{section}.{key}")
        sections[section] = dataclasses.replace(current, **checked)
    updated = dataclasses.replace(config, **sections)
    if "stt" in sections or "discord" in sections:
        check_transport(updated, "command line")
    _check_readability(updated, "command line")
    return updated


# -- check-config: every key, its value and where it came from (added for issue 16) -----------

#: Where a value came from, as ``check-config`` says it.
ORIGIN_DEFAULT = "default"


def _printed(value: Any, tp: Any) -> str:
    """A value as ``check-config`` prints it: secrets and URL passwords never shown."""
    if isinstance(value, SecretUrl):  # where the data lives stays visible, its password not
        return redact_url(value.reveal()) if value else "not set"
    if tp is Secret or isinstance(value, Secret):
        return "set" if value else "not set"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, str) and "://" in value:
        return redact_url(value)
    return str(value)


def describe_config(config: Config, environ: Mapping[str, str] | None = None) -> list[str]:
    """One ``section.key: value  (origin)`` line per key: default, file or environment.

    ``config`` is what :func:`load_config` returned for ``config.source`` and ``environ``; the
    file is read again only to tell which keys it sets (the loader stays as it is).
    """
    environ = os.environ if environ is None else environ
    data: Any = {}
    if config.source != "<defaults>":
        with contextlib.suppress(OSError, yaml.YAMLError):
            data = yaml.safe_load(Path(config.source).read_text(encoding="utf-8")) or {}
    env_var = {key: var for var, key in ENV_OVERRIDES.items() if var in environ}
    lines: list[str] = []
    for section in dataclasses.fields(Config):
        if section.name == "source":
            continue
        value = getattr(config, section.name)
        file_section = data.get(section.name) if isinstance(data, dict) else None
        hints = typing.get_type_hints(type(value))
        for f in dataclasses.fields(value):
            key = f"{section.name}.{f.name}"
            if key in env_var:
                origin = f"environment {env_var[key]}"
            elif isinstance(file_section, dict) and f.name in file_section:
                origin = f"file {config.source}"
            else:
                origin = ORIGIN_DEFAULT
            shown = _printed(getattr(value, f.name), hints.get(f.name))
            lines.append(f"{key}: {shown}  ({origin})")
    return lines

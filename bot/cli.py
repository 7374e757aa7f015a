"""The `cantobot` command line: run | replay | simulate | demo | fake-stt | check-config | doctor |
migrate.

Parsing and error reporting live here; each sub-command calls into the library. Any
:class:`~bot.errors.CantobotError` becomes one line on stderr and a non-zero exit, never a
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from bot.config import Config, describe_config, load_config, with_overrides
from bot.errors import CantobotError, ConfigError, SttUnavailable
from bot.logsafe import install as install_log_redaction

log = logging.getLogger("cantobot")

#: Exit codes: 0 ok, 1 a runtime failure (server, key, file), 2 bad usage or config.
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def setup_logging(level: str) -> None:
    """Logs go to stderr with levels; stdout stays clean for --jsonl."""
    logging.basicConfig(
        level=level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    install_log_redaction()  # no token, key or password in any record, at any level
    # Chatty third-party loggers stay at WARNING unless we debug.
    if level.upper() != "DEBUG":
        for name in ("socketio", "engineio", "discord", "aiohttp"):
            logging.getLogger(name).setLevel(logging.WARNING)


def _speaker_arg(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r}")
    return name, path


def _late_arg(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=SECONDS, got {text!r}")
    try:
        delay = float(seconds) if sep else 2.0
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=SECONDS, got {text!r}") from None
    if not 0 <= delay < 3600:
        raise argparse.ArgumentTypeError("SECONDS must be from 0 up to an hour")
    return name, delay


def _speed_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 (as fast as possible) or more")
    return value


def _add_stt_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config.yaml (default: none, env only)")
    p.add_argument("--stt-url", metavar="URL", help="cantonese.ai base URL")
    p.add_argument("--api-key", metavar="KEY", help="cantonese.ai API key")
    p.add_argument("--sample-rate", metavar="HZ", type=int, help="STT sample rate (8000-48000)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cantobot",
        description="Live Cantonese captions and meeting minutes for Discord voice channels.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the Discord bot")
    p.add_argument("--config", metavar="FILE", help="config.yaml")
    p.add_argument("--shard-ids", metavar="IDS", help="comma-separated shard ids to own")
    p.add_argument("--shard-count", metavar="N", type=int, help="total number of shards")

    p = sub.add_parser("replay", help="transcribe recorded per-speaker tracks")
    p.add_argument("--speaker", metavar="NAME=FILE", type=_speaker_arg, action="append",
                   default=[], help="a speaker and their audio file (repeatable)")
    p.add_argument("--tracks", metavar="PATH", action="append", default=[],
                   help="a folder or .zip of per-speaker tracks (Craig's 1-alice.flac -> alice)")
    _add_stt_flags(p)
    p.add_argument("--speed", type=_speed_arg, default=1.0, metavar="X",
                   help="pace at real time x X (default 1; 0 = as fast as possible)")
    p.add_argument("--jsonl", action="store_true", help="one JSON object per committed line")
    p.add_argument("--minutes", metavar="DIR", help="write minutes (md, srt, vtt, json) here")

    p = sub.add_parser(
        "simulate", help="run the real bot against a local Discord",
        # The documented interface (issue 5) first, as written there; then the extras.
        usage="%(prog)s --speaker NAME=FILE [--speaker ...] [--stt-url URL] [--api-key KEY] "
        "[--sample-rate HZ] [--threads] [--mode MODE] [--dave | --no-dave] [--loss PCT] "
        "[--jsonl] [--config FILE] [--captions]",
    )
    p.add_argument("--speaker", metavar="NAME=FILE", type=_speaker_arg, action="append",
                   required=True,
                   help="a simulated member and the file they speak (repeatable)")
    _add_stt_flags(p)
    p.add_argument("--threads", action="store_true", help="one caption thread per speaker")
    p.add_argument("--captions", action="store_true", help="live partial captions")
    p.add_argument("--mode", metavar="MODE", action="append", default=None,
                   help="transport mode(s) the voice gateway offers")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dave", dest="dave", action="store_true", default=True,
                   help="DAVE end-to-end encryption (default)")
    g.add_argument("--no-dave", dest="dave", action="store_false")
    p.add_argument("--loss", type=float, default=0.0, metavar="PCT",
                   help="drop this percentage of RTP packets at random")
    p.add_argument("--jsonl", action="store_true", help="every posted message as JSON lines")
    p.add_argument("--member-dave", choices=("libdave", "davey"), default="libdave",
                   help="DAVE library the simulated members run: libdave (Discord's own, "
                        "default; needs the sim extra) or davey (the bot's)")
    p.add_argument("--join-late", metavar="NAME[=SECONDS]", type=_late_arg, action="append",
                   default=[], help="this speaker joins the call SECONDS (default 2) after the "
                                    "others start speaking (a DAVE re-key mid-meeting)")

    p = sub.add_parser("demo", help="offline demo: local Discord + local STT, no token or key")
    p.add_argument("--jsonl", action="store_true")
    p.add_argument("--threads", action="store_true")
    p.add_argument("--script", choices=("hk", "simplified", "as-is"), default=None,
                   help="characters of posts and minutes (transcribe.script)")
    p.add_argument("--jyutping", choices=("off", "line"), default=None,
                   help="a Jyutping line under each sentence (transcribe.jyutping)")

    p = sub.add_parser("fake-stt", help="serve the loopback cantonese.ai fake (tone-coded text)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--api-key", default="demo-key")

    p = sub.add_parser("check-config", help="validate a config file and print it (no secrets)")
    p.add_argument("--config", metavar="FILE")

    p = sub.add_parser("doctor", help="pre-flight check: libraries, config, cantonese.ai key, "
                       "Discord token, commands, permissions, storage")
    p.add_argument("--config", metavar="FILE", help="config.yaml (default: none, env only)")

    p = sub.add_parser("migrate", help="apply storage migrations (SQLite or PostgreSQL) and exit")
    p.add_argument("--config", metavar="FILE", help="config.yaml (storage.url / storage.path)")
    p.add_argument("--url", metavar="URL_OR_PATH",
                   help="postgresql://user:pass@host/db or a SQLite file (overrides the config)")
    return parser


def _config_from_args(args: argparse.Namespace) -> Config:
    config = load_config(getattr(args, "config", None))
    return with_overrides(
        config,
        stt={
            "url": getattr(args, "stt_url", None),
            "api_key": getattr(args, "api_key", None),
            "sample_rate": getattr(args, "sample_rate", None),
        },
    )


async def _dispatch(args: argparse.Namespace) -> int:
    command: str = args.command
    if command == "replay":
        from bot.replay import run_replay

        return await run_replay(args, _config_from_args(args))
    if command == "run":
        from bot.app import run_bot

        return await run_bot(args, load_config(args.config))
    if command == "simulate":
        from bot.sim.simulate import run_simulate

        return await run_simulate(args, _config_from_args(args))
    if command == "demo":
        from bot.sim.simulate import run_demo

        return await run_demo(args)
    if command == "fake-stt":
        from bot.sim.stt_server import serve_forever

        await serve_forever(args.host, args.port, args.api_key)
        return EXIT_OK
    if command == "migrate":
        from bot.storage import describe_target, open_storage_at, storage_target

        target = args.url or storage_target(load_config(args.config).storage)
        storage = await open_storage_at(target)
        try:
            version = await storage.schema_version()
        finally:
            await storage.close()
        print(f"{describe_target(target)}: schema version {version}")
        return EXIT_OK
    if command == "check-config":
        config = load_config(args.config)
        for line in describe_config(config):
            print(line)
        return EXIT_OK
    if command == "doctor":
        from bot.doctor import run_doctor

        return await run_doctor(args.config)
    raise AssertionError(command)


def one_line(exc: CantobotError) -> str:
    """The error's line, plus why a connection failed (DNS, refused, TLS, timeout) if known."""
    message = exc.user_message
    if isinstance(exc, SttUnavailable) and exc.__cause__ is not None:
        from bot.reach import describe_failure

        message = f"{message}: {describe_failure(exc.__cause__, '')}"
    return message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = "INFO"
    try:
        if getattr(args, "config", None):
            level = load_config(args.config).logging.level
    except CantobotError as exc:
        print(f"cantobot: {exc.user_message}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "doctor" and level.upper() != "DEBUG":
        level = "WARNING"  # its report is the output; progress logs would only interleave
    setup_logging(level)
    try:
        return asyncio.run(_dispatch(args))
    except CantobotError as exc:
        print(f"cantobot: {one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 130

"""What a real ``python -m bot run`` subprocess in a test is given: the loopback Discord and
STT fake as environment variables (the documented overrides), and its own SQLite file."""

from __future__ import annotations

import os
from pathlib import Path

from bot.sim.discord.server import LocalDiscord
from bot.sim.stt_server import FakeSttServer


def loopback_env(fake: LocalDiscord, stt: FakeSttServer, key: str, db: Path) -> dict[str, str]:
    """Only the documented overrides that point the bot at the loopback services and ``db``."""
    return {
        "DISCORD_TOKEN": fake.token,
        "DISCORD_API_BASE": fake.api_base,
        "DISCORD_GATEWAY_URL": fake.gateway_url,
        "DISCORD_CA_FILE": fake.ca_file,
        "CANTONESE_AI_URL": stt.url,
        "CANTONESE_AI_API_KEY": key,
        "CANTOBOT_STORAGE_PATH": str(db),
    }


def bot_env(tmp_path: Path, fake: LocalDiscord, stt: FakeSttServer, key: str) -> dict[str, str]:
    """A subprocess's whole environment: this one's, the loopback overrides, INFO logs."""
    return {**os.environ, **loopback_env(fake, stt, key, tmp_path / "bot.sqlite3"),
            "CANTOBOT_LOG_LEVEL": "INFO"}

"""A loopback Discord (REST, gateway, voice gateway, UDP) that unmodified discord.py talks to."""

from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.tls import ssl_context_trusting

__all__ = ["LocalDiscord", "ssl_context_trusting"]

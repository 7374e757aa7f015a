"""A loopback Discord (REST, gateway, voice gateway, UDP) that unmodified discord.py talks to."""

from bot.sim.discord.server import LocalDiscord
from bot.sim.discord.tls import client_kwargs, ssl_context_trusting

__all__ = ["LocalDiscord", "client_kwargs", "ssl_context_trusting"]

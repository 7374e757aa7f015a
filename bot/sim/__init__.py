"""Loopback fakes that speak the real wire protocols: cantonese.ai STT and a local Discord."""

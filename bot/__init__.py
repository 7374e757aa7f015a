"""cantobot: live Cantonese captions and meeting minutes for Discord voice channels.

`bot/` is the library: pure pieces (audio conversion, RTP, transcripts) with I/O kept in thin
adapters (STT session, Discord voice, sinks, storage). `cogs/` is the Discord command surface.
"""

__version__ = "0.1.0"

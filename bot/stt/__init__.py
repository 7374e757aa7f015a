"""cantonese.ai real-time speech-to-text, one session per speaker.

Owns: the wire protocol (:mod:`~bot.stt.protocol`, pure), the events a session hands its owner
(:mod:`~bot.stt.events`, pure: states, lines with their ``LineRef``, amends, partials), the
session's logic without a socket (:mod:`~bot.stt.core`, pure: buffer, cursor, re-send origin,
twin pairing, voice detection) and the Socket.IO adapter with every retry
(:mod:`~bot.stt.session`). May import: the standard library, numpy, ``bot.errors``,
``bot.backoff``, ``bot.transcript.model``; only ``session`` imports python-socketio and aiohttp.
Never Discord, storage or the meeting.
"""

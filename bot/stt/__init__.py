"""cantonese.ai real-time speech-to-text, one session per speaker.

Owns: the wire protocol (:mod:`~bot.stt.protocol`, pure), the events a session hands its owner
(:mod:`~bot.stt.events`, pure: states, lines with their ``LineRef``, amends, partials), the
session's logic without a socket (:mod:`~bot.stt.core`, pure: buffer, cursor, re-send origin),
made of pure parts: the speech gate and voice detection (:mod:`~bot.stt.gate`), the unconfirmed
audio (:mod:`~bot.stt.buffer`), the upstream session's clock (:mod:`~bot.stt.clock`), twin
pairing (:mod:`~bot.stt.twins`), line times and refs (:mod:`~bot.stt.lines`) and the counters
(:mod:`~bot.stt.stats`); what an upstream error code means (:mod:`~bot.stt.upstream`, pure);
and the Socket.IO adapter with every retry (:mod:`~bot.stt.session`, which applies that policy,
and its stop procedure, :mod:`~bot.stt.stopping`). May import: the standard library, numpy,
``bot.errors``, ``bot.backoff``, ``bot.lifecycle``, ``bot.transcript.model``; only ``session``
imports python-socketio and aiohttp. Never Discord, storage or the meeting.
"""

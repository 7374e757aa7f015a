"""Where transcripts go in Discord: channel messages, webhooks, caption threads, minutes.

One module per concern:

* :mod:`~bot.sinks.discord_sink`: :class:`DiscordTranscriptSink`, one meeting's channel: the
  webhook or fallback mode, lines, notices, minutes and the stats of every destination; it
  composes the caption threads.
* :mod:`~bot.sinks.threads`: :class:`CaptionThreads`, each speaker's caption thread (created on
  first use), their live captions (throttled edits, edited into the committed line), ``silence``
  and one outbox per thread.
* :mod:`~bot.sinks.outbox`: strict per-destination order, retries, burst merging, the backlog
  bound.
* :mod:`~bot.sinks.payloads`: the values queued items carry (author, post, nonce) and the
  no-mentions policy.

May import: discord.py, aiohttp, ``bot.transcript``, ``bot.backoff``, ``bot.errors``. Never
``bot.meeting``, ``bot.storage``, ``cogs`` or ``bot.sim``.
"""

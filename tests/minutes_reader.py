"""Reads cantobot's JSON minutes back into :class:`~bot.transcript.model.Minutes`.

Only the tests need it (a round trip proves ``minutes.json`` loses nothing); the bot writes
minutes and never reads them.
"""

from __future__ import annotations

import json
from datetime import datetime

from bot.transcript.model import Minutes, Segment, TranscriptError, Word


def from_json(text: str) -> Minutes:
    """Read back what :func:`~bot.transcript.minutes.to_json` wrote: the tests' check that the
    JSON minutes keep everything (no part of the bot reads minutes back)."""
    try:
        doc = json.loads(text)
        ended = doc["ended_at"]
        return Minutes(
            title=doc["title"],
            started_at=datetime.fromisoformat(doc["started_at"]),
            ended_at=datetime.fromisoformat(ended) if ended is not None else None,
            segments=tuple(
                Segment(
                    speaker=s["speaker"],
                    text=s["text"],
                    start=s["start"],
                    end=s["end"],
                    words=tuple(Word(w["text"], w["start"], w["end"]) for w in s["words"]),
                    speaker_id=s["speaker_id"],
                )
                for s in doc["segments"]
            ),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise TranscriptError(f"not a cantobot minutes JSON document: {exc}") from exc

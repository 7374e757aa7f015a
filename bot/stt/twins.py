"""Pairing the two forms of a committed sentence (pure).

The server sends each sentence twice, plain and with word timestamps (either may come first,
and either may be missing), and gives the two nothing else in common than the text. The first
form makes the line and gets its ref; :class:`Twins` finds it for the other form.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from bot.stt.events import LineRef

#: Commits awaiting their timestamped twin (or twins awaiting a plain form) kept per session; a
#: server that sends only one form would otherwise grow the lists forever.
MAX_UNMATCHED: Final = 64


class Twins:
    """Lines waiting for their other form, on one upstream session."""

    def __init__(self) -> None:
        self._plain: deque[tuple[str, LineRef]] = deque(maxlen=MAX_UNMATCHED)
        self._early: deque[str] = deque(maxlen=MAX_UNMATCHED)  # timestamped came first

    def plain_made(self, text: str, ref: LineRef) -> None:
        """A plain commit made line ``ref``; its timestamped twin may follow."""
        self._plain.append((text, ref))

    def timestamped_made(self, text: str) -> None:
        """A timestamped commit came first and made its line; its plain twin may follow."""
        self._early.append(text)

    def plain_is_twin(self, text: str) -> bool:
        """True (once) if this plain commit's timestamped twin already made its line."""
        if text in self._early:
            self._early.remove(text)
            return True
        return False

    def plain_of(self, text: str) -> LineRef | None:
        """The oldest plain commit of this sentence still waiting for its timestamped twin."""
        for i, (waiting, ref) in enumerate(self._plain):
            if waiting == text:
                del self._plain[i]
                return ref
        return None

    def clear(self) -> None:
        """A new upstream session: no twin of the old one's lines can come."""
        self._plain.clear()
        self._early.clear()

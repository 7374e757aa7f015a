"""The unconfirmed audio of one STT session (pure): kept pieces in stream order, with gaps
where silence was skipped; also the send queue (the cursor lives in :class:`~bot.stt.core.SttCore`).
"""

from __future__ import annotations

from collections import deque

from bot.stt.stats import BYTES_PER_SAMPLE

Piece = tuple[int, bytes]


def _end(piece: Piece) -> int:
    return piece[0] + len(piece[1]) // BYTES_PER_SAMPLE


class PcmBuffer:
    """``(start sample, pcm)`` pieces of mono int16 LE audio, oldest first."""

    def __init__(self) -> None:
        self.pieces: deque[Piece] = deque()
        self.samples = 0  # samples held (the gaps are not counted)

    def push(self, start: int, pcm: bytes) -> None:
        if pcm:
            self.pieces.append((start, pcm))
            self.samples += len(pcm) // BYTES_PER_SAMPLE

    def unsent(self, send_pos: int) -> int:
        """Samples held at or after ``send_pos``."""
        total = 0
        for piece in reversed(self.pieces):
            end = _end(piece)
            if end <= send_pos:
                break
            total += end - max(piece[0], send_pos)
        return total

    def piece_at(self, send_pos: int) -> Piece | None:
        """The piece holding ``send_pos``, else the first after it (None: all sent)."""
        # Scan from the newest piece: the unsent tail is short while the unconfirmed head can
        # hold minutes of audio (a scan from the left cost O(buffer) per chunk sent).
        found: Piece | None = None
        for piece in reversed(self.pieces):
            if _end(piece) <= send_pos:
                break
            found = piece
        return found

    def trim_to(self, sample: int) -> None:
        """Forget audio before stream ``sample``."""
        while self.pieces:
            start, pcm = self.pieces[0]
            end = start + len(pcm) // BYTES_PER_SAMPLE
            if end <= sample:
                self.pieces.popleft()
                self.samples -= end - start
            elif start < sample:
                self.pieces[0] = (sample, pcm[(sample - start) * BYTES_PER_SAMPLE :])
                self.samples -= sample - start
                break
            else:
                break

    def drop_oldest(self, excess: int) -> list[tuple[int, int]]:
        """Forget the oldest ``excess`` samples; returns (piece start, samples cut) per cut."""
        cuts: list[tuple[int, int]] = []
        while excess > 0 and self.pieces:
            start, pcm = self.pieces[0]
            n = len(pcm) // BYTES_PER_SAMPLE
            cut = min(n, excess)
            if cut == n:
                self.pieces.popleft()
            else:
                self.pieces[0] = (start + cut, pcm[cut * BYTES_PER_SAMPLE:])
            self.samples -= cut
            excess -= cut
            cuts.append((start, cut))
        return cuts

    def cut_after(self, pos: int) -> list[int]:
        """Forget audio from stream ``pos`` on; returns the samples cut, per piece."""
        cuts: list[int] = []
        while self.pieces:
            start, pcm = self.pieces[-1]
            n = len(pcm) // BYTES_PER_SAMPLE
            if start >= pos:
                self.pieces.pop()
                cuts.append(n)
            elif start + n > pos:
                keep = pos - start
                self.pieces[-1] = (start, pcm[: keep * BYTES_PER_SAMPLE])
                cuts.append(n - keep)
                break
            else:
                break
        self.samples -= sum(cuts)
        return cuts

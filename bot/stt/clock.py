"""One upstream session's clock (pure): the upstream hears the kept audio back to back, so its
times (seconds of audio sent in this session) map back to stream samples through the runs of
contiguous audio sent."""

from __future__ import annotations


class UpstreamClock:
    """Where each run of contiguous audio sent starts, on both clocks."""

    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate
        #: Stream sample where this upstream session's audio (and its clock) starts.
        self.origin = 0
        self._runs: list[tuple[int, int]] = []  # (upstream sample, stream sample)
        self.sent_samples = 0  # upstream samples sent so far
        self._sent_end: int | None = None  # stream sample just after the last chunk sent

    def reset(self, origin: int) -> None:
        """A new upstream session, whose clock starts at stream sample ``origin``."""
        self.origin = origin
        self._runs = []
        self.sent_samples = 0
        self._sent_end = None

    @property
    def started(self) -> bool:
        """Some audio went out in this upstream session."""
        return bool(self._runs)

    def sent(self, start: int, n: int) -> None:
        """``n`` samples from stream sample ``start`` went out."""
        if self._sent_end != start:
            self._runs.append((self.sent_samples, start))  # a new run on the upstream's clock
        self.sent_samples += n
        self._sent_end = start + n

    def to_stream(self, seconds: float) -> float:
        """Stream sample (fractional) of a time on this upstream session's clock."""
        t = seconds * self.sample_rate
        base_up, base_stream = 0, self.origin
        for up, stream in self._runs:
            if up > t:
                break
            base_up, base_stream = up, stream
        return base_stream + (t - base_up)

    def seconds(self) -> float:
        """Audio sent in this upstream session (its clock's extent)."""
        return self.sent_samples / self.sample_rate

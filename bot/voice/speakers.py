"""Who is speaking: the SSRC <-> Discord user map, and packets waiting for it.

Pure and sans-IO: the receiver feeds voice gateway events in and asks questions; time is passed
in as ``now`` (monotonic seconds). Discord announces an SSRC's owner with op 5 SPEAKING
``{user_id, ssrc, speaking}``, members joining with op 11 CLIENT_CONNECT ``{user_ids}`` and
leaving with op 13 CLIENT_DISCONNECT ``{user_id}`` (discord.py ignores these ops; our hook
forwards them). A member who leaves and rejoins gets a new SSRC that maps to the same user, so
the receiver keeps one stream per *user*, not per SSRC.

Audio can arrive before its op 5 (discord.py's ``connect()`` returns before ops 11/5 are
processed): :class:`PendingPackets` holds such packets briefly, bounded in count and age.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")

#: SSRCs remembered per user; older ones (from earlier joins) are forgotten first.
MAX_SSRCS_PER_USER = 8
#: PendingPackets defaults: 50 packets = 1 s of 20 ms Opus per SSRC; 2 s is far longer than
#: the op 5 delay seen after connect, short enough that stale audio is not replayed late.
DEFAULT_PENDING_PER_SSRC = 50
DEFAULT_PENDING_SSRCS = 32
DEFAULT_PENDING_MAX_AGE = 2.0


class SpeakerMap:
    """SSRC -> user id and user id -> SSRCs, fed by voice gateway ops 5, 11 and 13."""

    __slots__ = ("_user_by_ssrc", "_ssrcs_by_user", "_members")

    def __init__(self) -> None:
        self._user_by_ssrc: dict[int, int] = {}
        # insertion-ordered dict used as an ordered set: oldest SSRC first
        self._ssrcs_by_user: dict[int, dict[int, None]] = {}
        self._members: set[int] = set()

    def on_speaking(self, user_id: int, ssrc: int) -> int | None:
        """Op 5: ``ssrc`` belongs to ``user_id``. Returns the user it belonged to before, if
        another (Discord reassigned the SSRC): that user's stream for it must be closed."""
        user_id, ssrc = int(user_id), int(ssrc)
        self._members.add(user_id)
        previous = self._user_by_ssrc.get(ssrc)
        if previous == user_id:
            return None
        if previous is not None:
            self._unlink(previous, ssrc)
        self._user_by_ssrc[ssrc] = user_id
        owned = self._ssrcs_by_user.setdefault(user_id, {})
        owned[ssrc] = None
        while len(owned) > MAX_SSRCS_PER_USER:
            oldest = next(iter(owned))
            del owned[oldest]
            del self._user_by_ssrc[oldest]
        return previous

    def on_client_connect(self, user_ids: Iterable[int]) -> None:
        """Op 11: these users are in the call (their SSRCs follow in op 5)."""
        self._members.update(int(u) for u in user_ids)

    def on_client_disconnect(self, user_id: int) -> set[int]:
        """Op 13: the user left; forget them and return the SSRCs they had (to close streams)."""
        user_id = int(user_id)
        self._members.discard(user_id)
        owned = self._ssrcs_by_user.pop(user_id, {})
        for ssrc in owned:
            del self._user_by_ssrc[ssrc]
        return set(owned)

    def user_for(self, ssrc: int) -> int | None:
        """The user sending on ``ssrc``, or None until op 5 names them."""
        return self._user_by_ssrc.get(ssrc)

    def ssrcs_for(self, user_id: int) -> set[int]:
        """Every SSRC known for ``user_id`` (several after a rejoin); a copy."""
        return set(self._ssrcs_by_user.get(user_id, ()))

    @property
    def members(self) -> frozenset[int]:
        """Users in the call as far as ops 11, 5 and 13 told us."""
        return frozenset(self._members)

    def _unlink(self, user_id: int, ssrc: int) -> None:
        owned = self._ssrcs_by_user.get(user_id)
        if owned is not None:
            owned.pop(ssrc, None)
            if not owned:
                del self._ssrcs_by_user[user_id]


class PendingPackets(Generic[T]):
    """Packets of SSRCs whose user is not known yet, held briefly and boundedly.

    Past ``max_per_ssrc`` an SSRC's oldest packet is dropped; past ``max_ssrcs`` the SSRC with
    the oldest packet is dropped whole; :meth:`expire` drops packets older than ``max_age``.
    Every drop is counted in :attr:`dropped`.
    """

    __slots__ = ("max_per_ssrc", "max_ssrcs", "max_age", "dropped", "_queues")

    def __init__(
        self,
        max_per_ssrc: int = DEFAULT_PENDING_PER_SSRC,
        max_ssrcs: int = DEFAULT_PENDING_SSRCS,
        max_age: float = DEFAULT_PENDING_MAX_AGE,
    ) -> None:
        if max_per_ssrc < 1 or max_ssrcs < 1 or max_age <= 0:
            raise ValueError("PendingPackets bounds must be positive")
        self.max_per_ssrc = max_per_ssrc
        self.max_ssrcs = max_ssrcs
        self.max_age = max_age
        self.dropped = 0
        self._queues: dict[int, deque[tuple[float, T]]] = {}

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def __contains__(self, ssrc: object) -> bool:
        return ssrc in self._queues

    def add(self, ssrc: int, item: T, now: float) -> None:
        """Hold ``item`` for ``ssrc`` (arrived at ``now``), dropping the oldest past a bound."""
        queue = self._queues.get(ssrc)
        if queue is None:
            if len(self._queues) >= self.max_ssrcs:
                victim = min(self._queues, key=lambda s: self._queues[s][0][0])
                self.dropped += len(self._queues.pop(victim))
            queue = self._queues[ssrc] = deque()
        elif len(queue) >= self.max_per_ssrc:
            queue.popleft()
            self.dropped += 1
        queue.append((now, item))

    def release(self, ssrc: int) -> list[T]:
        """All held items of ``ssrc`` in arrival order (its user just became known)."""
        queue = self._queues.pop(ssrc, None)
        return [item for _, item in queue] if queue else []

    def discard(self, ssrc: int) -> int:
        """Drop what is held for ``ssrc`` (its user left); returns how many, also counted."""
        queue = self._queues.pop(ssrc, None)
        count = len(queue) if queue else 0
        self.dropped += count
        return count

    def discard_all(self) -> int:
        """Drop everything held (a new voice session, or the end); returns how many, counted."""
        count = len(self)
        self._queues.clear()
        self.dropped += count
        return count

    def expire(self, now: float) -> int:
        """Drop items older than ``max_age`` at ``now``; returns how many were dropped."""
        cutoff = now - self.max_age
        count = 0
        for ssrc in list(self._queues):
            queue = self._queues[ssrc]
            while queue and queue[0][0] < cutoff:
                queue.popleft()
                count += 1
            if not queue:
                del self._queues[ssrc]
        self.dropped += count
        return count

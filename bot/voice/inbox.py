"""Datagrams from the voice UDP socket to the receiver, on the event loop.

Two sources, one hand-off. Where the loop can watch a socket (selector loops: Linux, macOS),
:meth:`DatagramInbox.read_from` reads it on the loop whenever it is readable: no thread, so no
GIL hand-over and no loop wake-up through the self-pipe per datagram (bench row 2u: ~22 % less
CPU per speaker than discord.py's socket-reader thread at 200 speakers, and on one CPU the
thread was starved by GIL hand-overs and fell behind at 250). The kernel's receive buffer then
holds what arrives while the loop is busy, so it is asked for :data:`RECEIVE_BUFFER_BYTES`.
Elsewhere discord.py's reader thread calls :meth:`DatagramInbox.put`, which appends and never
blocks: past :data:`INBOX_LIMIT` the oldest waiting datagram is dropped and counted, and the loop
is woken once per burst (``call_soon_threadsafe``).

Either way a burst is worked off :data:`INBOX_BATCH` datagrams per callback, so whatever became
ready meanwhile (an STT chunk completed early in the burst, to be sent) runs between steps
instead of after all of it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
from collections.abc import Callable
from typing import Final

log = logging.getLogger(__name__)

#: Datagrams waiting for the loop; past this the oldest are dropped (about 1 s of 40 speakers).
INBOX_LIMIT: Final = 2000
#: Datagrams handled per event-loop callback (bench row 2e at 250 speakers: the send lag's p99
#: went from ~41 to ~20 ms against handling a whole burst in one callback).
INBOX_BATCH: Final = 32
#: Receive buffer asked of the kernel for a socket read on the loop (capped by
#: net.core.rmem_max, 208 KiB on a stock Linux: ~20 ms of 250 speakers, ~100 ms of 50).
RECEIVE_BUFFER_BYTES: Final = 4 << 20
#: Largest datagram read (Discord voice packets are a few hundred bytes).
MAX_DATAGRAM: Final = 2048


class DatagramInbox:
    """Hands each datagram, with its arrival time, to ``handle`` on the event loop."""

    def __init__(self, handle: Callable[[bytes, float], None],
                 clock: Callable[[], float]) -> None:
        self._handle = handle
        self._clock = clock
        self._queue: collections.deque[tuple[bytes, float]] = collections.deque(
            maxlen=INBOX_LIMIT)
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Datagrams dropped because the loop fell INBOX_LIMIT behind (thread source only).
        self.dropped = 0
        #: The socket read on the loop (read_from), if any.
        self._sock: socket.socket | None = None
        self._fd = -1
        #: Kernel drops of the sockets read before the current one.
        self._socket_dropped_before = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake ``loop`` from now on (before that, datagrams wait for :meth:`drain_all`)."""
        self._loop = loop

    def read_from(self, sock: socket.socket) -> bool:
        """Read ``sock`` on the bound loop from now on, instead of any socket before it; False
        (nothing changed) if the loop cannot watch sockets (e.g. Windows' proactor loop)."""
        loop = self._loop
        if loop is None or sock.fileno() < 0 or sock.getblocking():
            return False  # a blocking socket would block the loop (discord.py's is not)
        self.stop_reading()
        fd = sock.fileno()
        try:
            # A socket closed while watched leaves its number registered with the loop (the
            # kernel forgot it): clear that before a new socket with the same number is added.
            loop.remove_reader(fd)
            loop.add_reader(fd, self._read_some)
        except NotImplementedError:
            return False
        self._sock, self._fd = sock, fd
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER_BYTES)
            granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            granted = -1
        if 0 <= granted < RECEIVE_BUFFER_BYTES:  # Linux reports twice what it grants
            log.info("voice socket read on the event loop; receive buffer %d KiB, capped by "
                     "net.core.rmem_max: for meetings of 100+ speakers raise it (README "
                     "\"Performance\", Sizing)", granted // 1024)
        else:
            log.info("voice socket read on the event loop (receive buffer %d KiB)",
                     granted // 1024)
        return True

    def stop_reading(self) -> None:
        """Stop reading the socket given to :meth:`read_from` (idempotent)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            self._socket_dropped_before += socket_drops(sock) or 0
        if sock is not None and self._loop is not None:
            try:
                self._loop.remove_reader(self._fd)
            except (OSError, ValueError, RuntimeError):  # closed socket or loop: nothing to undo
                pass

    @property
    def socket_dropped(self) -> int:
        """Datagrams the kernel dropped for the sockets read on the loop (a full receive
        buffer: the loop was busy longer than it holds); 0 where that is not known."""
        current = socket_drops(self._sock) if self._sock is not None else None
        return self._socket_dropped_before + (current or 0)

    @property
    def reading(self) -> bool:
        """True while a socket is read on the loop."""
        return self._sock is not None

    def _read_some(self) -> None:
        """The socket is readable: up to INBOX_BATCH datagrams (the loop calls again if more)."""
        self._read(INBOX_BATCH)

    def _read(self, limit: int) -> int:
        sock = self._sock
        if sock is None:
            return 0
        handle, clock, recv = self._handle, self._clock, sock.recv
        n = 0
        while n < limit:
            try:
                data = recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # closed under us (a voice reconnect): the next op 4 attaches anew
                log.debug("voice socket read failed; stop reading it", exc_info=True)
                self.stop_reading()
                break
            n += 1
            handle(data, clock())
        return n

    def put(self, data: bytes) -> None:
        """Runs on the socket-reader thread: append and wake the loop, never block."""
        if len(self._queue) == INBOX_LIMIT:
            self.dropped += 1
        self._queue.append((data, self._clock()))
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._drain_some)
            except RuntimeError:  # loop closed during shutdown
                pass

    def _drain_some(self) -> None:
        """Up to INBOX_BATCH datagrams, then a new callback for the rest (after what is ready)."""
        self._scheduled = False
        queue, handle = self._queue, self._handle
        for _ in range(INBOX_BATCH):
            if not queue:
                return
            data, at = queue.popleft()
            handle(data, at)
        if queue and self._loop is not None and not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._drain_some)

    def drain_all(self) -> None:
        """Everything received so far (before a voice op or the clock acts on the stream)."""
        while self._queue:
            self._drain_some()
        self._read(INBOX_LIMIT)  # bounded: a flood cannot keep the caller here


def socket_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped for ``sock`` since it was made: the ``drops`` column of
    Linux's /proc/net/udp (or udp6) on the socket's inode; None where that is not available
    (another OS, a closed socket)."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except (OSError, ValueError):
        return None
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        try:
            with open(table, encoding="ascii") as f:
                next(f, None)  # the header
                for line in f:
                    fields = line.split()
                    if len(fields) > 12 and fields[9] == inode:
                        return int(fields[12])
        except (OSError, ValueError):
            continue
    return None

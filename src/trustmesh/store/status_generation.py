"""A counter, shared by every process on one SQLite datastore, that moves whenever a
certificate's status changes.

The OCSP responder processes answer thousands of requests a second. Reading each
status from SQLite costs a read transaction (file locks on the WAL index, a check of
the database file); not reading it for every request raised signed answers per
second by about 13 % (docs/BENCHMARKS.md). With this counter a reader may keep the
statuses it read, and trust them exactly as long as the counter has not moved since
it read them:

- every writer of a status (a revocation, journalled revocations put back) advances
  the counter *after* its commit, under an exclusive lock on the counter's file, so
  no advance is lost when two processes (two servers sharing the database) advance
  at once;
- a reader takes the counter's value *before* it queries, and files what it read
  under that value. A revocation that commits after the reader took the value
  advances the counter past it, so the next request reads the database again.

The counter lives in a small file next to the database, mapped into every process
(SQLite's WAL mode already requires all of them to share one machine's memory). A
status that only goes from unknown to good (a certificate issued) needs no advance:
readers never keep "unknown".

PostgreSQL has no such shared memory (replicas run on other machines), so readers
there query every time.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from pathlib import Path

__all__ = ["StatusGeneration"]

_SIZE = 8  # one unsigned 64-bit counter, page-aligned, so a read is one load


class StatusGeneration:
    """The counter file of one SQLite database (``<database>-status``), mode 0600."""

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + "-status")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)  # a new file: the counter starts at zero
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED,
                                  mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._counter = memoryview(self._map).cast("Q")

    def read(self) -> int:
        """The counter now (no lock: a reader only compares it with what it saw)."""
        return self._counter[0]

    def advance(self) -> int:
        """Move the counter on after a committed status change; returns the new value."""
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value = (self._counter[0] + 1) & 0xFFFF_FFFF_FFFF_FFFF
            self._counter[0] = value
            return value
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._counter.release()
        self._map.close()
        os.close(self._fd)

"""An append-only, fsync'd journal of revocations kept beside the datastore.

A revocation is written here before the datastore changes and before the CRL
or OCSP answer changes. If the datastore is later restored from an old backup
or lost, the server replays the journal on start, so no revocation is ever
silently forgotten.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from trustmesh.errors import ConfigError

__all__ = ["RevocationJournal"]


class RevocationJournal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def append(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def entries(self) -> list[dict[str, Any]]:
        """Every complete entry; a torn last line (crash mid-write) is ignored."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read revocation journal {self.path}: {exc}") from None
        out = []
        for line in raw.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and {"serial", "at", "reason", "actor"} <= entry.keys():
                out.append(entry)
        return out

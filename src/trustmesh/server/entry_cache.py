"""The server's in-memory view of registration entries, kept current from the change log.

Agents sync often; the server must not re-scan the datastore for each sync
(the scale trouble SPIRE met). The cache asks the datastore only for changes
after the revision it has seen (an indexed range query), and answers "what
may this agent serve" from a parent index in memory.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

from trustmesh.server.entries import Entry
from trustmesh.spiffe.ids import SpiffeId
from trustmesh.store.datastore import Datastore

__all__ = ["AgentChanges", "EntryCache"]

_PAGE = 1000


@dataclass(frozen=True)
class AgentChanges:
    """What changed for one agent: entries to keep (new or updated), ids to drop."""

    upserts: tuple[Entry, ...]
    removed: tuple[str, ...]
    revision: int
    more: bool


class EntryCache:
    def __init__(self, store: Datastore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self.revision = 0
        self._entries: dict[str, Entry] = {}
        self._by_parent: dict[SpiffeId, set[str]] = {}
        # entry id -> revision of its last change (deletions included), and the same
        # as an append-only log in revision order, so a sync reads only the tail.
        self._changed_at: dict[str, int] = {}
        self._log: list[tuple[int, str]] = []

    def refresh(self) -> int:
        """Apply the datastore's changes since the last refresh; returns the revision."""
        with self._lock:
            while True:
                changes, revision = self._store.entry_changes(self.revision, limit=_PAGE)
                for entry_id, deleted, body in changes:
                    old = self._entries.pop(entry_id, None)
                    if old is not None:
                        self._by_parent.get(old.parent_id, set()).discard(entry_id)
                    new = None
                    if not deleted and body is not None:
                        new = Entry.from_json(body)
                        self._entries[entry_id] = new
                        self._by_parent.setdefault(new.parent_id, set()).add(entry_id)
                    rev = new.revision if new is not None else revision
                    self._mark(entry_id, rev)
                    # Descendants change hands with their ancestor: mark them too.
                    for sid in {e.spiffe_id for e in (old, new) if e is not None}:
                        for child in self._descendants(sid):
                            self._mark(child, rev)
                self.revision = revision
                if len(changes) < _PAGE:
                    if len(self._log) > 2 * len(self._changed_at) + 1024:
                        self._log = sorted((r, e) for e, r in self._changed_at.items())
                    return self.revision

    def _mark(self, entry_id: str, revision: int) -> None:
        self._changed_at[entry_id] = revision
        self._log.append((revision, entry_id))

    def _descendants(self, spiffe_id: SpiffeId) -> set[str]:
        out: set[str] = set()
        frontier = [spiffe_id]
        while frontier:
            for entry_id in self._by_parent.get(frontier.pop(), ()):
                if entry_id not in out:
                    out.add(entry_id)
                    frontier.append(self._entries[entry_id].spiffe_id)
        return out

    def get(self, entry_id: str) -> Entry | None:
        return self._entries.get(entry_id)

    def authorized_ids(self, agent_id: SpiffeId) -> set[str]:
        """Entries the agent may serve: its children, their children, and so on."""
        return self._descendants(agent_id)

    def changes_for_agent(self, agent_id: SpiffeId, since: int, page_size: int
                          ) -> AgentChanges:
        """Entries of this agent changed after ``since`` (all of them when since is 0),
        and ids that changed and are not (or no longer) the agent's."""
        with self._lock:
            authorized = self.authorized_ids(agent_id)
            start = bisect.bisect_right(self._log, (since, "\U0010ffff"))
            upserts: list[Entry] = []
            removed: list[str] = []
            seen: set[str] = set()
            last = since
            more = False
            for rev, eid in self._log[start:]:
                if self._changed_at.get(eid) != rev or eid in seen:
                    continue  # superseded by a later change in the log
                if len(seen) >= page_size and rev != last:
                    more = True  # pages end between revisions, never inside one
                    break
                seen.add(eid)
                last = rev
                if eid in authorized:
                    upserts.append(self._entries[eid])
                elif since > 0:
                    removed.append(eid)
            if not more:
                last = max(last, self.revision)
            return AgentChanges(tuple(upserts), tuple(removed), last, more)

"""The server's entry cache: incremental agent syncs from the change log."""

from __future__ import annotations

from pathlib import Path

from trustmesh.clock import FixedClock
from trustmesh.server.entry_cache import EntryCache
from trustmesh.server.registry import Registry
from trustmesh.spiffe.ids import SpiffeId, TrustDomain
from trustmesh.store.datastore import Datastore

NODE1 = SpiffeId.parse("spiffe://example.org/node1")
NODE2 = SpiffeId.parse("spiffe://example.org/node2")


def setup(tmp_path: Path) -> tuple[Registry, EntryCache]:
    store = Datastore(f"sqlite:///{tmp_path / 'c.sqlite3'}")
    store.migrate()
    reg = Registry(store, TrustDomain.parse("example.org"), FixedClock())
    for node in (NODE1, NODE2):
        reg.create_join_token(None, str(node), "t")
    return reg, EntryCache(store)


def make(reg: Registry, sid: str, parent: SpiffeId | str) -> str:
    return reg.create_entries([{"spiffe_id": sid, "parent_id": str(parent),
                                "selectors": ["unix:uid:1"]}], "t")[0].id


def test_incremental_sync_sends_only_changes(tmp_path: Path) -> None:
    reg, cache = setup(tmp_path)
    a = make(reg, "spiffe://example.org/a", NODE1)
    make(reg, "spiffe://example.org/x", NODE2)
    cache.refresh()
    full = cache.changes_for_agent(NODE1, 0, 100)
    assert [e.id for e in full.upserts] == [a] and full.removed == ()
    nothing = cache.changes_for_agent(NODE1, full.revision, 100)
    assert nothing.upserts == () and nothing.removed == ()
    b = make(reg, "spiffe://example.org/b", "spiffe://example.org/a")
    cache.refresh()
    inc = cache.changes_for_agent(NODE1, full.revision, 100)
    assert [e.id for e in inc.upserts] == [b]


def test_reparenting_moves_the_whole_subtree(tmp_path: Path) -> None:
    reg, cache = setup(tmp_path)
    a = make(reg, "spiffe://example.org/a", NODE1)
    b = make(reg, "spiffe://example.org/b", "spiffe://example.org/a")
    cache.refresh()
    r1 = cache.changes_for_agent(NODE1, 0, 100).revision
    r2 = cache.changes_for_agent(NODE2, 0, 100).revision
    reg.update_entry(a, {"parent_id": str(NODE2)}, "t")
    cache.refresh()
    gone = cache.changes_for_agent(NODE1, r1, 100)
    assert set(gone.removed) == {a, b} and gone.upserts == ()
    gained = cache.changes_for_agent(NODE2, r2, 100)
    assert {e.id for e in gained.upserts} == {a, b}


def test_pages_never_split_a_revision(tmp_path: Path) -> None:
    reg, cache = setup(tmp_path)
    ids = [make(reg, f"spiffe://example.org/w{i}", NODE1) for i in range(7)]
    cache.refresh()
    seen: list[str] = []
    since = 0
    while True:
        page = cache.changes_for_agent(NODE1, since, 3)
        seen += [e.id for e in page.upserts]
        since = page.revision
        if not page.more:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))


def test_deleted_entries_are_removed(tmp_path: Path) -> None:
    reg, cache = setup(tmp_path)
    a = make(reg, "spiffe://example.org/a", NODE1)
    cache.refresh()
    r = cache.changes_for_agent(NODE1, 0, 100).revision
    reg.delete_entry(a, "t")
    cache.refresh()
    assert cache.changes_for_agent(NODE1, r, 100).removed == (a,)
    assert cache.get(a) is None

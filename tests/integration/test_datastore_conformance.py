"""One datastore conformance suite, run against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from trustmesh.errors import ConfigError, Conflict, NotFound
from trustmesh.store import models
from trustmesh.store.datastore import CertificateRecord, Datastore, normalize_url

_counter = itertools.count()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.sqlite3'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.new_database(f"conf{next(_counter)}"))


@pytest.fixture
def store(store_url: str) -> Iterator[Datastore]:
    ds = Datastore(store_url)
    ds.migrate()
    try:
        yield ds
    finally:
        ds.close()


def record(serial: str, *, key: str | None = None, ca_id: str = "ca1") -> CertificateRecord:
    return CertificateRecord(
        serial=serial, ca_id=ca_id, subject="CN=x", sans=("DNS:x.internal",),
        template="end-entity", not_before=1, not_after=2, der=b"\x30\x00",
        requested_by="tester", created_at=1, idempotency_key=key,
        request_digest="d" if key else None)


def test_a_new_sqlite_database_and_its_wal_are_private(tmp_path: Path) -> None:
    ds = Datastore(f"sqlite:///{tmp_path / 'private.sqlite3'}")
    try:
        ds.migrate()
        ds.insert_certificates([record("p1")], [{}])
        for name in ("private.sqlite3", "private.sqlite3-wal", "private.sqlite3-shm",
                     "private.sqlite3-status"):
            assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
    finally:
        ds.close()
    # an existing database keeps the mode its owner chose (a backup agent may read it)
    (tmp_path / "shared.sqlite3").touch(mode=0o640)
    os.chmod(tmp_path / "shared.sqlite3", 0o640)
    ds = Datastore(f"sqlite:///{tmp_path / 'shared.sqlite3'}")
    try:
        ds.migrate()
        assert (tmp_path / "shared.sqlite3").stat().st_mode & 0o777 == 0o640
    finally:
        ds.close()


def test_one_status_counter_however_the_database_path_is_spelled(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    writer = Datastore(f"sqlite:///{real / 'db.sqlite3'}")
    writer.migrate()
    reader = Datastore(f"sqlite:///{tmp_path / 'link' / '.' / 'db.sqlite3'}")
    try:
        before = reader.status_generation()
        writer.insert_certificates([record("s1")], [{}])
        writer.revoke("s1", at=1, reason="superseded", actor="admin", details={})
        assert (reader.status_generation() or 0) > (before or 0)
        assert not (tmp_path / "link" / "db.sqlite3-status").is_symlink()
        assert sorted(p.name for p in real.iterdir() if p.name.endswith("-status")) == [
            "db.sqlite3-status"]
    finally:
        reader.close()
        writer.close()


def test_migrate_is_idempotent(store: Datastore) -> None:
    store.migrate()
    store.migrate()
    assert store.count_certificates() == 0


def test_a_newer_schema_is_refused(store: Datastore) -> None:
    from sqlalchemy import update

    with store.engine.begin() as conn:
        conn.execute(update(models.schema_info).values(version=models.SCHEMA_VERSION + 1))
    with pytest.raises(ConfigError, match="newer than this trustmesh"):
        store.migrate()


def test_settings_round_trip_and_overwrite(store: Datastore) -> None:
    assert store.get_setting("a") is None
    store.put_settings({"a": "1", "b": "2"})
    store.put_settings({"a": "3"})
    assert (store.get_setting("a"), store.get_setting("b")) == ("3", "2")


def test_replace_setting_is_compare_and_set(store: Datastore) -> None:
    assert store.replace_setting("slots", None, "v1") is True
    assert store.replace_setting("slots", None, "other") is False  # already there
    assert store.replace_setting("slots", "stale", "v2") is False
    assert store.get_setting("slots") == "v1"
    assert store.replace_setting("slots", "v1", "v2") is True
    assert store.get_setting("slots") == "v2"


def test_latest_not_after_per_ca(store: Datastore) -> None:
    assert store.latest_not_after("ca1") is None
    late = CertificateRecord(**{**record("f2").__dict__, "not_after": 50})
    store.insert_certificates([record("f1"), late, record("f3", ca_id="ca2")], [{}, {}, {}])
    assert store.latest_not_after("ca1") == 50
    assert store.latest_not_after("ca2") == 2


def test_batch_insert_is_all_or_nothing(store: Datastore) -> None:
    store.insert_certificates([record("a1")], [{"n": 1}])
    with pytest.raises(Conflict):
        store.insert_certificates([record("b2"), record("a1")], [{}, {}])
    assert store.count_certificates() == 1
    with pytest.raises(NotFound):
        store.get_certificate("b2")
    assert [e.serial for e in store.audit_events()] == ["a1"]


def test_idempotency_keys_are_unique(store: Datastore) -> None:
    store.insert_certificates([record("c1", key="k")], [{}])
    with pytest.raises(Conflict):
        store.insert_certificates([record("c2", key="k")], [{}])
    found = store.find_by_idempotency_key("k")
    assert found is not None and found.serial == "c1" and found.der == b"\x30\x00"
    assert store.find_by_idempotency_key("other") is None


def test_revoke_records_status_and_audit(store: Datastore) -> None:
    store.insert_certificates([record("d1")], [{}])
    rec = store.revoke("d1", at=100, reason="key-compromise", actor="admin", details={"x": 1})
    assert (rec.status, rec.revoked_at, rec.revocation_reason) == ("revoked", 100,
                                                                    "key-compromise")
    assert store.certificate_status("d1") == ("ca1", "revoked", 100, "key-compromise")
    with pytest.raises(Conflict, match="already revoked"):
        store.revoke("d1", at=101, reason="superseded", actor="admin", details={})
    with pytest.raises(NotFound):
        store.revoke("nope", at=1, reason="superseded", actor="admin", details={})
    actions = [(e.action, e.actor) for e in store.audit_events(serial="d1")]
    assert actions == [("issue", "tester"), ("revoke", "admin")]
    assert [r.serial for r in store.revoked_certificates("ca1")] == ["d1"]
    assert store.revoked_certificates("other") == []


def test_status_of_an_unknown_serial_is_none(store: Datastore) -> None:
    assert store.certificate_status("ffff") is None


def test_journal_replay_is_idempotent(store: Datastore) -> None:
    store.insert_certificates([record("e1"), record("e2")], [{}, {}])
    entries = [{"serial": "e1", "at": 5, "reason": "superseded", "actor": "a"},
               {"serial": "zz", "at": 5, "reason": "superseded", "actor": "a"}]
    assert store.apply_revocations(entries) == ["e1"]
    assert store.apply_revocations(entries) == []
    assert store.certificate_status("e1") == ("ca1", "revoked", 5, "superseded")
    assert store.certificate_status("e2") == ("ca1", "valid", None, None)


def test_status_generation_moves_after_every_status_change_for_every_process(
        store: Datastore, store_url: str, tmp_path: Path) -> None:
    """SQLite: the counter OCSP responders trust their kept statuses by moves after each
    committed revocation, seen by another process on the same database; PostgreSQL has
    none (its readers read every time)."""
    reader = Datastore(store_url)  # a responder process's own datastore
    try:
        if store.dialect == "postgresql":
            assert store.status_generation() is None and reader.status_generation() is None
            return
        start = reader.status_generation()
        assert isinstance(start, int)
        store.insert_certificates([record("g1"), record("g2")], [{}, {}])
        assert reader.status_generation() == start  # issuance: unknown -> good, no move
        store.revoke("g1", at=7, reason="superseded", actor="admin", details={})
        after_revoke = reader.status_generation()
        assert after_revoke is not None and after_revoke > start
        with pytest.raises(Conflict):
            store.revoke("g1", at=8, reason="superseded", actor="admin", details={})
        assert reader.status_generation() == after_revoke  # nothing committed
        assert store.apply_revocations([{"serial": "g1", "at": 7, "reason": "superseded",
                                         "actor": "a"}]) == []
        assert reader.status_generation() == after_revoke
        assert store.apply_revocations([{"serial": "g2", "at": 9, "reason": "superseded",
                                         "actor": "a"}]) == ["g2"]
        after_restore = reader.status_generation()
        assert after_restore is not None and after_restore > after_revoke
        # another process (a second server on the database) moves it for this one too
        subprocess.run([sys.executable, "-c", (
            "import sys; from trustmesh.store.datastore import Datastore\n"
            "from trustmesh.store.datastore import CertificateRecord as R\n"
            "d = Datastore(sys.argv[1])\n"
            "d.insert_certificates([R('g3', 'ca1', 'CN=x', (), 'end-entity', 1, 2, b'0', "
            "'t', 1)], [{}])\n"
            "d.revoke('g3', at=1, reason='superseded', actor='other', details={})\n"
            "d.close()\n"), store_url], check=True, timeout=60)
        moved = reader.status_generation()
        assert moved is not None and moved > after_restore
        # a server start moves it too (a writer may have died between commit and advance)
        store.migrate()
        assert (reader.status_generation() or 0) > moved
        counter = Path(str(store._sqlite_file()) + "-status")
        assert counter.stat().st_mode & 0o777 == 0o600
    finally:
        reader.close()


def test_crl_numbers_only_grow_even_across_replicas(store: Datastore, store_url: str) -> None:
    replica = Datastore(store_url)  # a second server sharing the database
    numbers: list[int] = []
    lock = threading.Lock()

    def sign(ds: Datastore) -> None:
        for _ in range(10):
            rec = ds.store_crl("ca1", this_update=1, next_update=2,
                               build=lambda n: f"crl-{n}".encode())
            assert rec.der == f"crl-{rec.number}".encode()
            with lock:
                numbers.append(rec.number)

    threads = [threading.Thread(target=sign, args=(ds,)) for ds in (store, replica, store)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replica.close()
    assert sorted(numbers) == list(range(1, 31))
    latest = store.latest_crl("ca1")
    assert latest is not None and latest.number == 30 and latest.der == b"crl-30"
    assert store.latest_crl("other") is None


def test_urls_are_normalised_and_passwords_hidden() -> None:
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("sqlite:///x") == "sqlite:///x"
    ds = Datastore("postgresql://user:secret@127.0.0.1:1/db")
    assert "secret" not in ds.redacted_url and "user:***@" in ds.redacted_url


def test_unknown_schemes_and_dead_servers_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unsupported datastore URL scheme 'mysql'"):
        Datastore("mysql://x/y")
    from trustmesh.errors import Unavailable

    dead = Datastore("postgresql://nobody@127.0.0.1:1/none")
    with pytest.raises(Unavailable, match="cannot reach datastore"):
        dead.migrate()


def test_mesh_resources_apply_is_versioned_and_reports_changes(store: Datastore) -> None:
    assert store.mesh_revision() == 0
    pol = ("AuthorizationPolicy", "default", "deny", {"spec": {}})
    wl = ("Workload", "default", "web", {"spec": {"serviceAccount": "web"}})
    rev1, out = store.apply_mesh_resources([pol, wl], now_us=10)
    assert rev1 == 1 and out == ["created", "created"]
    rev2, out = store.apply_mesh_resources([pol], now_us=20)
    assert rev2 == rev1 and out == ["unchanged"]  # nothing changed, no new revision
    changed = ("AuthorizationPolicy", "default", "deny", {"spec": {"action": "DENY"}})
    rev3, out = store.apply_mesh_resources([changed, wl], now_us=30)
    assert rev3 == 2 and out == ["configured", "unchanged"]
    revision, rows = store.list_mesh_resources()
    assert revision == 2
    assert [(k, ns, n, created) for k, ns, n, _, created in rows] == [
        ("AuthorizationPolicy", "default", "deny", 10), ("Workload", "default", "web", 10)]
    assert rows[0][3] == {"spec": {"action": "DENY"}}  # replaced, creation time kept
    assert [r[0] for r in store.list_mesh_resources("Workload")[1]] == ["Workload"]


def test_mesh_resources_delete_is_all_or_nothing(store: Datastore) -> None:
    store.apply_mesh_resources([("Workload", "a", "x", {}), ("Workload", "a", "y", {})], 1)
    with pytest.raises(NotFound, match="Workload a/zzz does not exist"):
        store.delete_mesh_resources([("Workload", "a", "x"), ("Workload", "a", "zzz")])
    assert len(store.list_mesh_resources()[1]) == 2  # x was not deleted
    assert store.mesh_revision() == 1
    rev, gone = store.delete_mesh_resources(
        [("Workload", "a", "x"), ("Workload", "a", "zzz")], ignore_missing=True)
    assert rev == 2 and gone == [True, False]
    assert [r[2] for r in store.list_mesh_resources()[1]] == ["y"]


def test_mesh_revisions_are_unique_across_replicas(store: Datastore, store_url: str) -> None:
    replica = Datastore(store_url)
    revisions: list[int] = []
    lock = threading.Lock()

    def apply(ds: Datastore, tag: str) -> None:
        for i in range(10):
            rev, _ = ds.apply_mesh_resources([("Workload", "ns", f"{tag}{i}", {})], now_us=i)
            with lock:
                revisions.append(rev)

    threads = [threading.Thread(target=apply, args=(ds, tag))
               for ds, tag in ((store, "a"), (replica, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    replica.close()
    assert sorted(revisions) == list(range(1, 21))

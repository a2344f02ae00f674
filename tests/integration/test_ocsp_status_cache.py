"""The OCSP responder processes' status lookup: on SQLite it keeps what it read until
the datastore's status generation moves; it never keeps "unknown"; on PostgreSQL it
reads every time. Revocations come from another process, as from the server."""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from trustmesh.pki.ocsp import Status
from trustmesh.server.certificate_status import _KEEP_STATUSES_FOR, status_lookup
from trustmesh.store.datastore import CertificateRecord, Datastore

_counter = itertools.count()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'store.sqlite3'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = str(server.new_database(f"cache{next(_counter)}"))
    writer = Datastore(url)
    writer.migrate()
    writer.insert_certificates([record(s) for s in ("a1", "a2")], [{}, {}])
    writer.close()
    yield url


def record(serial: str) -> CertificateRecord:
    return CertificateRecord(serial=serial, ca_id="ca1", subject="CN=x", sans=(),
                             template="end-entity", not_before=1, not_after=2, der=b"\x30\x00",
                             requested_by="tester", created_at=1)


def in_another_process(url: str, code: str) -> None:
    """Run datastore writes in a separate Python process (as the server does them)."""
    prelude = ("import sys\nfrom trustmesh.store.datastore import Datastore, CertificateRecord\n"
               "d = Datastore(sys.argv[1])\n")
    subprocess.run([sys.executable, "-c", prelude + code + "\nd.close()\n", url], check=True,
                   timeout=60)


class CountingStore:
    """The real datastore, counting the status reads that reach it."""

    def __init__(self, url: str) -> None:
        self.store = Datastore(url)
        self.reads = 0
        self.status_generation = self.store.status_generation

    def certificate_status(self, serial: str) -> tuple[str, str, int | None, str | None] | None:
        self.reads += 1
        return self.store.certificate_status(serial)


@pytest.fixture
def reader(store_url: str) -> Iterator[CountingStore]:
    counting = CountingStore(store_url)
    try:
        yield counting
    finally:
        counting.store.close()


def lookup_of(reader: CountingStore, clock: Callable[[], float] | None = None
              ) -> Callable[[str, int], object]:
    kwargs = {} if clock is None else {"clock": clock}
    return status_lookup(reader, **kwargs)  # type: ignore[arg-type]


def test_a_revocation_by_another_process_is_seen_by_the_next_lookup(
        store_url: str, reader: CountingStore) -> None:
    lookup = lookup_of(reader)
    for _ in range(5):
        assert lookup("ca1", 0xA1).status is Status.GOOD  # type: ignore[attr-defined]
    sqlite = store_url.startswith("sqlite")
    assert reader.reads == (1 if sqlite else 5)
    in_another_process(store_url, "d.revoke('a1', at=50, reason='key-compromise', "
                                  "actor='admin', details={})")
    status = lookup("ca1", 0xA1)
    assert status.status is Status.REVOKED  # type: ignore[attr-defined]
    assert status.reason.value == "key-compromise"  # type: ignore[attr-defined]
    # the other serial's kept answer was dropped with the move: read again, still good
    before = reader.reads
    assert lookup("ca1", 0xA2).status is Status.GOOD  # type: ignore[attr-defined]
    assert reader.reads == before + 1


def test_unknown_is_never_kept(store_url: str, reader: CountingStore) -> None:
    lookup = lookup_of(reader)
    assert lookup("ca1", 0xB1).status is Status.UNKNOWN  # type: ignore[attr-defined]
    # issued afterwards, by another process, without moving the generation
    in_another_process(store_url, "d.insert_certificates([CertificateRecord('b1', 'ca1', "
                                  "'CN=x', (), 'end-entity', 1, 2, b'0', 't', 1)], [{}])")
    assert lookup("ca1", 0xB1).status is Status.GOOD  # type: ignore[attr-defined]


def test_a_status_of_another_ca_is_unknown_kept_or_not(reader: CountingStore) -> None:
    lookup = lookup_of(reader)
    assert lookup("ca1", 0xA1).status is Status.GOOD  # type: ignore[attr-defined]
    assert lookup("other-ca", 0xA1).status is Status.UNKNOWN  # type: ignore[attr-defined]


def test_nothing_is_kept_longer_than_the_bound(store_url: str, reader: CountingStore) -> None:
    now = [1000.0]
    lookup = lookup_of(reader, clock=lambda: now[0])
    lookup("ca1", 0xA1)
    lookup("ca1", 0xA1)
    kept_reads = reader.reads
    now[0] += _KEEP_STATUSES_FOR + 0.01
    lookup("ca1", 0xA1)
    assert reader.reads == kept_reads + 1
    assert kept_reads == (1 if store_url.startswith("sqlite") else 2)

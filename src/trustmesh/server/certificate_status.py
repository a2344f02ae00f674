"""The OCSP responders' certificate status lookup over the datastore."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from trustmesh.pki.crl import RevocationReason
from trustmesh.pki.ocsp import CertificateStatus, Status
from trustmesh.store.datastore import Datastore

__all__ = ["status_lookup"]

_GOOD = CertificateStatus(Status.GOOD)
_UNKNOWN = CertificateStatus(Status.UNKNOWN)
_KEEP_STATUSES_FOR = 5.0  # seconds; see status_lookup
_KEEP_AT_MOST = 65536


def status_lookup(store: Datastore, *, clock: Callable[[], float] = time.monotonic
                  ) -> Callable[[str, int], CertificateStatus]:
    """The responder's status lookup over a datastore's ``certificate_status``.

    Where the datastore has a status generation (SQLite: ``trustmesh.store.
    status_generation``), a status read is kept under the generation taken just before
    the read, and used while the generation is still that one: a revocation committed
    by any process moves it, and the next lookup reads the database again. "Unknown"
    is never kept (the serial may be issued next), and nothing is kept longer than
    ``_KEEP_STATUSES_FOR``, which bounds what a writer that died between its commit and
    its advance could leave stale. Elsewhere (PostgreSQL) every lookup reads the
    database. Statuses are immutable values; the same ones are handed out again."""
    revoked: dict[tuple[int | None, str | None], CertificateStatus] = {}
    # serial -> (generation, when read, ca_id, status)
    kept: dict[int, tuple[int, float, str, CertificateStatus]] = {}
    generation = store.status_generation

    def lookup(ca_id: str, serial: int) -> CertificateStatus:
        taken = generation()
        if taken is not None:
            hit = kept.get(serial)
            if hit is not None and hit[0] == taken and clock() - hit[1] < _KEEP_STATUSES_FOR:
                return hit[3] if hit[2] == ca_id else _UNKNOWN
        row = store.certificate_status(format(serial, "x"))
        if row is None:
            return _UNKNOWN
        if row[1] != "revoked":
            status = _GOOD
        else:
            key = (row[2], row[3])
            status = revoked.get(key)  # type: ignore[assignment]
            if status is None:
                status = CertificateStatus(Status.REVOKED,
                                           datetime.fromtimestamp(row[2] or 0, UTC),
                                           RevocationReason.parse(row[3] or "unspecified"))
                if len(revoked) >= 10000:
                    revoked.clear()
                revoked[key] = status
        if taken is not None:
            if len(kept) >= _KEEP_AT_MOST:
                kept.clear()
            kept[serial] = (taken, clock(), row[0], status)
        return status if row[0] == ca_id else _UNKNOWN

    return lookup

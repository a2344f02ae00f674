"""The datastore: one interface over SQLite (embedded default) and PostgreSQL.

Writes that matter for security (issuance with its audit event, revocation
with its audit event) happen in one transaction each; SQLite runs with
``synchronous=FULL`` so a committed revocation survives a power cut.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from trustmesh.errors import ConfigError, Conflict, NotFound, PermissionDenied, Unavailable
from trustmesh.store import models as m
from trustmesh.store.status_generation import StatusGeneration

__all__ = ["AuditEvent", "CertificateRecord", "CrlRecord", "Datastore", "normalize_url"]


@dataclass(frozen=True)
class CertificateRecord:
    serial: str
    ca_id: str
    subject: str
    sans: tuple[str, ...]
    template: str
    not_before: int
    not_after: int
    der: bytes
    requested_by: str
    created_at: int
    idempotency_key: str | None = None
    request_digest: str | None = None
    status: str = "valid"
    revoked_at: int | None = None
    revocation_reason: str | None = None
    revoked_by: str | None = None


@dataclass(frozen=True)
class AuditEvent:
    id: int
    at: int
    actor: str
    action: str
    serial: str | None
    details: dict[str, Any]


@dataclass(frozen=True)
class CrlRecord:
    ca_id: str
    number: int
    this_update: int
    next_update: int
    der: bytes


_CERTIFICATE_COLUMNS = ("serial", "ca_id", "subject", "sans", "template", "not_before",
                        "not_after", "der", "requested_by", "idempotency_key",
                        "request_digest", "created_at", "status")
_AUDIT_COLUMNS = ("at", "actor", "action", "serial", "details")
_sorted_json = json.JSONEncoder(sort_keys=True).encode  # json.dumps(..., sort_keys=True)


def normalize_url(url: str) -> str:
    """Map user-facing URLs to SQLAlchemy ones (``postgresql://`` uses psycopg 3)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url[len("postgres://") :]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://") :]
    return url


def _row_to_cert(row: Any) -> CertificateRecord:
    return CertificateRecord(
        serial=row.serial,
        ca_id=row.ca_id,
        subject=row.subject,
        sans=tuple(json.loads(row.sans)),
        template=row.template,
        not_before=row.not_before,
        not_after=row.not_after,
        der=bytes(row.der),
        requested_by=row.requested_by,
        created_at=row.created_at,
        idempotency_key=row.idempotency_key,
        request_digest=row.request_digest,
        status=row.status,
        revoked_at=row.revoked_at,
        revocation_reason=row.revocation_reason,
        revoked_by=row.revoked_by,
    )


class Datastore:
    """Thread-safe access to the datastore. Create once per process."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        self.dialect = self.url.split(":", 1)[0].split("+", 1)[0]
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"unsupported datastore URL scheme {self.dialect!r}; use sqlite:///PATH or "
                "postgresql://USER@HOST/DB",
                field="datastore",
            )
        self._write_lock = threading.Lock()  # SQLite allows one writer; avoid busy loops
        self._local = threading.local()
        self._raws: list[Any] = []  # the per-thread status connections, closed in close()
        self._raw_lock = threading.Lock()
        self._generation: StatusGeneration | None = None
        self._generation_failed = False
        try:
            if self.dialect == "sqlite":
                self.engine: Engine = create_engine(
                    self.url,
                    connect_args={"check_same_thread": False, "timeout": 30},
                )
                event.listen(self.engine, "connect", _sqlite_pragmas)
                event.listen(self.engine, "begin", _sqlite_begin)
            else:
                self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=5)
        except (SQLAlchemyError, ImportError, ValueError) as exc:
            raise ConfigError(f"cannot open datastore {self.redacted_url}: {exc}",
                              field="datastore") from None
        self._create_private_sqlite_file()

    def _create_private_sqlite_file(self) -> None:
        """Create a new SQLite database file 0600 (it holds the audit log and agent
        records), before SQLite would create it with the umask's mode; its -wal and -shm
        files take the same mode. An existing file keeps the mode its owner gave it."""
        path = self._sqlite_file()
        if path is None:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError:
            return  # there already, or a directory that is not: SQLite says what is wrong
        os.close(fd)

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (SQLite: BEGIN IMMEDIATE, taking the file's write lock)."""
        with self._write_lock, self.engine.connect().execution_options(
                trustmesh_write=True) as conn, conn.begin():
            yield conn

    @property
    def redacted_url(self) -> str:
        """The URL with any password hidden, for logs and errors."""
        head, sep, tail = self.url.partition("://")
        if "@" in tail:
            creds, _, host = tail.rpartition("@")
            user = creds.split(":", 1)[0]
            return f"{head}{sep}{user}:***@{host}" if ":" in creds else self.url
        return self.url

    def close(self) -> None:
        with self._raw_lock:
            raws, self._raws = self._raws, []
        for raw in raws:
            try:
                raw.close()
            except Exception:  # noqa: S110 - closing what may already be broken
                pass
        if self._generation is not None:
            self._generation.close()
            self._generation = None
        self.engine.dispose()

    # -- status generation (SQLite) ------------------------------------------
    def _sqlite_file(self) -> Path | None:
        """The database file, symbolic links resolved (as SQLite does for its -wal and
        -shm), so that every process names one status counter however it was told the
        path."""
        database = self.engine.url.database if self.dialect == "sqlite" else None
        if not database or database == ":memory:" or self.engine.url.query.get("uri"):
            return None
        return Path(os.path.realpath(database))

    def _open_generation(self, *, required: bool = False) -> StatusGeneration | None:
        """The status counter, opened on first use. ``required`` (a server starting):
        a SQLite datastore whose counter cannot be opened is a configuration error, for
        readers would keep statuses this writer changes."""
        if self._generation is None and (required or not self._generation_failed):
            path = self._sqlite_file()
            if path is not None:
                try:
                    self._generation = StatusGeneration(path)
                except OSError as exc:
                    if required:
                        raise ConfigError(f"cannot open {path.name}-status next to the "
                                          f"datastore: {exc.strerror}",
                                          field="datastore") from None
            self._generation_failed = self._generation is None
        return self._generation

    def status_generation(self) -> int | None:
        """The shared counter that moves on every certificate status change
        (``trustmesh.store.status_generation``), or None where there is none
        (PostgreSQL, an in-memory SQLite database): then statuses must be read anew
        every time."""
        generation = self._open_generation()
        return None if generation is None else generation.read()

    def _statuses_changed(self) -> None:
        # after the commit: a reader that took the old value reads the database again.
        # A server opened the counter in migrate() (or failed to start); any other
        # writer opens it here. Readers also forget what they keep after a few seconds
        # (trustmesh.server.certificate_status), which bounds what a lost advance could cost.
        generation = self._open_generation()
        if generation is not None:
            generation.advance()

    # -- schema --------------------------------------------------------------
    def migrate(self) -> None:
        """Create the schema, or check that an existing one is one we understand."""
        try:
            m.metadata.create_all(self.engine)
            with self._write() as conn:
                version = conn.execute(select(m.schema_info.c.version)).scalar()
                if version is None:
                    conn.execute(insert(m.schema_info).values(id=1, version=m.SCHEMA_VERSION))
                elif version > m.SCHEMA_VERSION:
                    raise ConfigError(
                        f"the datastore has schema version {version}, newer than this "
                        f"trustmesh understands ({m.SCHEMA_VERSION}); upgrade trustmesh",
                        field="datastore",
                    )
        except OperationalError as exc:
            raise Unavailable(f"cannot reach datastore {self.redacted_url}: {exc.orig}") from None
        # fail here, at start-up, rather than after a revocation's commit
        self._open_generation(required=True)
        # whatever happened while no server ran (a revocation whose writer died between
        # its commit and its advance), readers start afresh
        self._statuses_changed()

    # -- settings ------------------------------------------------------------
    def get_setting(self, key: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(m.settings.c.value).where(m.settings.c.key == key)).scalar()

    def put_settings(self, values: dict[str, str]) -> None:
        """Write several settings in one transaction (all or nothing)."""
        with self._write() as conn:
            for key, value in values.items():
                updated = conn.execute(
                    update(m.settings).where(m.settings.c.key == key).values(value=value)
                ).rowcount
                if not updated:
                    conn.execute(insert(m.settings).values(key=key, value=value))

    def replace_setting(self, key: str, expected: str | None, value: str) -> bool:
        """Compare and set: write ``value`` only if the setting still holds ``expected``
        (None: absent). False when another writer changed it first."""
        try:
            with self._write() as conn:
                if expected is None:
                    conn.execute(insert(m.settings).values(key=key, value=value))
                    return True
                return bool(conn.execute(
                    update(m.settings)
                    .where(m.settings.c.key == key, m.settings.c.value == expected)
                    .values(value=value)
                ).rowcount)
        except IntegrityError:
            return False  # inserted by another writer in the meantime

    # -- certificates --------------------------------------------------------
    def insert_certificates(
        self, records: Sequence[CertificateRecord], actor_details: Sequence[dict[str, Any]]
    ) -> None:
        """Store issued certificates and their audit events in one transaction."""
        if not records:
            return
        cert_rows = [
            (r.serial, r.ca_id, r.subject, json.dumps(list(r.sans)), r.template, r.not_before,
             r.not_after, r.der, r.requested_by, r.idempotency_key, r.request_digest,
             r.created_at, "valid")
            for r in records
        ]
        audit_rows = [
            (r.created_at, r.requested_by, "issue", r.serial, _sorted_json(d))
            for r, d in zip(records, actor_details, strict=True)
        ]
        try:
            with self._write() as conn:
                # straight to the driver's executemany: the batch path of issuance (every
                # X509-SVID), where the ORM-level bind processing per value costs more than
                # the statement
                conn.exec_driver_sql(self._insert_sql("certificates", _CERTIFICATE_COLUMNS),
                                     cert_rows)
                conn.exec_driver_sql(self._insert_sql("audit_events", _AUDIT_COLUMNS),
                                     audit_rows)
        except IntegrityError as exc:
            raise Conflict(f"certificate already stored (serial or idempotency key): {exc.orig}"
                           ) from None

    def _insert_sql(self, table: str, columns: tuple[str, ...]) -> str:
        mark = "?" if self.dialect == "sqlite" else "%s"
        return (f"INSERT INTO {table} ({', '.join(columns)}) "  # noqa: S608 - fixed names
                f"VALUES ({', '.join(mark for _ in columns)})")

    def find_by_idempotency_key(self, key: str) -> CertificateRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(m.certificates).where(m.certificates.c.idempotency_key == key)
            ).first()
        return _row_to_cert(row) if row else None

    def get_certificate(self, serial: str) -> CertificateRecord:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(m.certificates).where(m.certificates.c.serial == serial)
            ).first()
        if row is None:
            raise NotFound(f"no certificate with serial {serial}", field="serial")
        return _row_to_cert(row)

    def list_certificates(self, *, status: str | None = None, limit: int = 1000
                          ) -> list[CertificateRecord]:
        q = select(m.certificates).order_by(m.certificates.c.created_at).limit(limit)
        if status:
            q = q.where(m.certificates.c.status == status)
        with self.engine.connect() as conn:
            return [_row_to_cert(r) for r in conn.execute(q)]

    def count_certificates(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(m.certificates)).scalar()
                       or 0)

    def revoke(
        self, serial: str, *, at: int, reason: str, actor: str, details: dict[str, Any]
    ) -> CertificateRecord:
        """Mark a certificate revoked and record who did it; both or neither."""
        with self._write() as conn:
            row = conn.execute(
                select(m.certificates).where(m.certificates.c.serial == serial)
            ).first()
            if row is None:
                raise NotFound(f"no certificate with serial {serial} was issued by this CA",
                               field="serial")
            if row.status == "revoked":
                raise Conflict(
                    f"certificate {serial} is already revoked (since {row.revoked_at}, "
                    f"reason {row.revocation_reason})",
                    field="serial",
                )
            conn.execute(
                update(m.certificates)
                .where(m.certificates.c.serial == serial)
                .values(status="revoked", revoked_at=at, revocation_reason=reason,
                        revoked_by=actor)
            )
            conn.execute(
                insert(m.audit_events).values(
                    at=at, actor=actor, action="revoke", serial=serial,
                    details=json.dumps(details, sort_keys=True),
                )
            )
            row = conn.execute(
                select(m.certificates).where(m.certificates.c.serial == serial)
            ).first()
        self._statuses_changed()
        return _row_to_cert(row)

    def apply_revocations(self, entries: Iterable[dict[str, Any]]) -> list[str]:
        """Re-apply journalled revocations the database lost; returns the serials fixed."""
        fixed: list[str] = []
        with self._write() as conn:
            for e in entries:
                row = conn.execute(
                    select(m.certificates.c.status).where(m.certificates.c.serial == e["serial"])
                ).first()
                if row is None or row.status == "revoked":
                    continue
                conn.execute(
                    update(m.certificates)
                    .where(m.certificates.c.serial == e["serial"])
                    .values(status="revoked", revoked_at=e["at"], revocation_reason=e["reason"],
                            revoked_by=e["actor"])
                )
                conn.execute(
                    insert(m.audit_events).values(
                        at=e["at"], actor=e["actor"], action="revoke", serial=e["serial"],
                        details=json.dumps({**e.get("details", {}), "restored_from_journal":
                                            True}, sort_keys=True),
                    )
                )
                fixed.append(e["serial"])
        if fixed:
            self._statuses_changed()
        return fixed

    def latest_not_after(self, ca_id: str) -> int | None:
        """The latest notAfter (unix seconds) among the certificates a CA issued."""
        with self.engine.connect() as conn:
            value = conn.execute(select(func.max(m.certificates.c.not_after))
                                 .where(m.certificates.c.ca_id == ca_id)).scalar()
        return None if value is None else int(value)

    def revoked_certificates(self, ca_id: str) -> list[CertificateRecord]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(m.certificates)
                .where(m.certificates.c.ca_id == ca_id, m.certificates.c.status == "revoked")
                .order_by(m.certificates.c.revoked_at)
            )
            return [_row_to_cert(r) for r in rows]

    def certificate_status(self, serial: str) -> tuple[str, str, int | None, str | None] | None:
        """(ca_id, status, revoked_at, reason) of a serial, or None if never issued.

        This is the OCSP hot path: it runs one prepared statement on a connection
        kept per thread, and always reads committed data, so a revocation made by
        any server replica shows at once.
        """
        for attempt in (1, 2):
            driver = self._status_driver()
            try:
                row = driver.execute(self._status_sql, (serial,)).fetchone()
                if self.dialect == "postgresql":
                    driver.rollback()  # never leave the connection idle in a transaction
                return (row[0], row[1], row[2], row[3]) if row else None
            except Exception as exc:
                self._drop_status_connection()
                if attempt == 2:
                    raise Unavailable(f"datastore read failed: {exc}") from None
        return None  # pragma: no cover - the loop returns or raises

    @property
    def _status_sql(self) -> str:
        return _STATUS_SQL_SQLITE if self.dialect == "sqlite" else _STATUS_SQL_PG

    def _status_driver(self) -> Any:
        """This thread's status connection as the driver's own object (sqlite3 or
        psycopg), without the pool proxy's wrapper around every call."""
        driver = getattr(self._local, "driver", None)
        if driver is None:
            conn = self.engine.raw_connection()
            with self._raw_lock:
                self._raws.append(conn)
            self._local.raw = conn
            self._local.driver = driver = conn.driver_connection
        return driver

    def _drop_status_connection(self) -> None:
        conn = getattr(self._local, "raw", None)
        self._local.raw = self._local.driver = None
        if conn is not None:
            try:
                conn.invalidate()
            except Exception:  # noqa: S110 - it is being thrown away
                pass

    # -- CRLs ----------------------------------------------------------------
    def store_crl(self, ca_id: str, *, this_update: int, next_update: int,
                  build: Any) -> CrlRecord:
        """Take the next CRL number, call ``build(number)`` for the DER, and store it.

        The number is read and written in the same transaction, so it only grows,
        across restarts and across server replicas sharing one database.
        """
        for attempt in (1, 2):
            try:
                with self._write() as conn:
                    q = select(m.crls.c.number).where(m.crls.c.ca_id == ca_id)
                    if self.dialect == "postgresql":
                        q = q.with_for_update()
                    current = conn.execute(q).scalar()
                    number = 1 if current is None else int(current) + 1
                    der = build(number)
                    values = {"number": number, "this_update": this_update,
                              "next_update": next_update, "der": der}
                    if current is None:
                        conn.execute(insert(m.crls).values(ca_id=ca_id, **values))
                    else:
                        conn.execute(
                            update(m.crls).where(m.crls.c.ca_id == ca_id).values(**values))
                break
            except IntegrityError:
                # Another replica created this CA's first CRL at the same moment.
                if attempt == 2:
                    raise
        return CrlRecord(ca_id, number, this_update, next_update, der)

    def latest_crl(self, ca_id: str) -> CrlRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(m.crls).where(m.crls.c.ca_id == ca_id)).first()
        if row is None:
            return None
        return CrlRecord(row.ca_id, row.number, row.this_update, row.next_update, bytes(row.der))

    # -- registry: entries -----------------------------------------------------
    def _next_revision(self, conn: Connection, counter: str = "registry") -> int:
        """Bump a named counter inside the caller's transaction (rows locked on PostgreSQL,
        the database write-locked on SQLite), so revisions are unique across replicas."""
        q = select(m.counters.c.value).where(m.counters.c.name == counter)
        if self.dialect == "postgresql":
            q = q.with_for_update()
        current = conn.execute(q).scalar()
        if current is None:
            conn.execute(insert(m.counters).values(name=counter, value=1))
            return 1
        conn.execute(update(m.counters).where(m.counters.c.name == counter)
                     .values(value=int(current) + 1))
        return int(current) + 1

    def registry_revision(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(m.counters.c.value).where(m.counters.c.name == "registry")).scalar()
        return int(value or 0)

    def _parent_exists(self, conn: Connection, parent_id: str) -> bool:
        if conn.execute(select(m.entries.c.id).where(
                m.entries.c.spiffe_id == parent_id, m.entries.c.deleted == 0).limit(1)).first():
            return True
        if conn.execute(select(m.agents.c.spiffe_id).where(
                m.agents.c.spiffe_id == parent_id).limit(1)).first():
            return True
        return conn.execute(select(m.join_tokens.c.token_hash).where(
            m.join_tokens.c.spiffe_id == parent_id).limit(1)).first() is not None

    def create_entries(self, bodies: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store new entries (all or nothing); parents must exist, duplicates are refused.

        A parent exists when it is an entry's SPIFFE ID (also one created in the same
        call), an attested agent, or the agent ID a join token will grant.
        """
        out: list[dict[str, Any]] = []
        with self._write() as conn:
            batch_ids = {b["spiffe_id"] for b in bodies}
            for i, body in enumerate(bodies):
                where = f"entries[{i}]" if len(bodies) > 1 else "entry"
                if body["parent_id"] not in batch_ids and not self._parent_exists(
                        conn, body["parent_id"]):
                    raise NotFound(
                        f"parent {body['parent_id']} does not exist: it must be an attested "
                        "agent, the agent ID of a join token, or another entry's SPIFFE ID",
                        field=f"{where}.parent_id")
                selectors = json.dumps(sorted(body["selectors"]))
                clash = conn.execute(select(m.entries.c.id).where(
                    m.entries.c.spiffe_id == body["spiffe_id"],
                    m.entries.c.parent_id == body["parent_id"],
                    m.entries.c.selectors == selectors, m.entries.c.deleted == 0)).first()
                if clash is not None:
                    raise Conflict(
                        f"an entry with the same SPIFFE ID, parent and selectors exists "
                        f"({clash.id})", field=f"{where}.spiffe_id")
                # One revision per entry: sync pages then always end on a whole revision.
                revision = self._next_revision(conn)
                stored = {**body, "revision": revision}
                try:
                    conn.execute(insert(m.entries).values(
                        id=body["id"], spiffe_id=body["spiffe_id"], parent_id=body["parent_id"],
                        selectors=selectors, body=json.dumps(stored, sort_keys=True),
                        revision=revision, deleted=0))
                except IntegrityError:
                    raise Conflict(f"entry id {body['id']} already exists",
                                   field=f"{where}.id") from None
                out.append(stored)
        return out

    def update_entry(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._write() as conn:
            row = conn.execute(select(m.entries).where(
                m.entries.c.id == body["id"], m.entries.c.deleted == 0)).first()
            if row is None:
                raise NotFound(f"no entry with id {body['id']}", field="id")
            if body["parent_id"] != row.parent_id and not self._parent_exists(
                    conn, body["parent_id"]):
                raise NotFound(f"parent {body['parent_id']} does not exist", field="parent_id")
            revision = self._next_revision(conn)
            stored = {**body, "revision": revision}
            conn.execute(update(m.entries).where(m.entries.c.id == body["id"]).values(
                spiffe_id=body["spiffe_id"], parent_id=body["parent_id"],
                selectors=json.dumps(sorted(body["selectors"])),
                body=json.dumps(stored, sort_keys=True), revision=revision))
        return stored

    def delete_entry(self, entry_id: str) -> int:
        """Turn the entry into a tombstone; returns the revision of the deletion."""
        with self._write() as conn:
            row = conn.execute(select(m.entries.c.id).where(
                m.entries.c.id == entry_id, m.entries.c.deleted == 0)).first()
            if row is None:
                raise NotFound(f"no entry with id {entry_id}", field="id")
            revision = self._next_revision(conn)
            conn.execute(update(m.entries).where(m.entries.c.id == entry_id).values(
                deleted=1, revision=revision))
        return revision

    def get_entry(self, entry_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(m.entries.c.body).where(
                m.entries.c.id == entry_id, m.entries.c.deleted == 0)).first()
        if row is None:
            raise NotFound(f"no entry with id {entry_id}", field="id")
        return dict(json.loads(row.body))

    def list_entries(self, *, spiffe_id: str | None = None, parent_id: str | None = None,
                     limit: int = 10000, after_id: str = "") -> list[dict[str, Any]]:
        """Live entries in id order, ``limit`` at a time after ``after_id`` (paging)."""
        q = (select(m.entries.c.body).where(m.entries.c.deleted == 0, m.entries.c.id > after_id)
             .order_by(m.entries.c.id).limit(limit))
        if spiffe_id:
            q = q.where(m.entries.c.spiffe_id == spiffe_id)
        if parent_id:
            q = q.where(m.entries.c.parent_id == parent_id)
        with self.engine.connect() as conn:
            return [dict(json.loads(r.body)) for r in conn.execute(q)]

    def entry_changes(self, since: int, *, limit: int = 1000
                      ) -> tuple[list[tuple[str, bool, dict[str, Any] | None]], int]:
        """Entries changed after revision ``since``: (id, deleted, body) in revision order,
        at most ``limit``; and the revision to ask from next time."""
        q = (select(m.entries.c.id, m.entries.c.deleted, m.entries.c.body, m.entries.c.revision)
             .where(m.entries.c.revision > since)
             .order_by(m.entries.c.revision, m.entries.c.id).limit(limit))
        with self.engine.connect() as conn:
            rows = conn.execute(q).all()
        if not rows:
            return [], since
        changes = [(r.id, bool(r.deleted), None if r.deleted else dict(json.loads(r.body)))
                   for r in rows]
        return changes, int(rows[-1].revision)

    # -- mesh configuration ------------------------------------------------------
    def mesh_revision(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(m.counters.c.value).where(m.counters.c.name == "mesh")).scalar()
        return int(value or 0)

    def apply_mesh_resources(self, bodies: Sequence[tuple[str, str, str, dict[str, Any]]],
                             now_us: int) -> tuple[int, list[str]]:
        """Create or replace resources given as (kind, namespace, name, body), all in one
        transaction. Returns the new revision (unchanged when nothing changed) and, per
        resource, ``created``, ``configured`` or ``unchanged``."""
        outcomes: list[str] = []
        with self._write() as conn:
            revision: int | None = None
            for kind, namespace, name, body in bodies:
                text = json.dumps(body, sort_keys=True)
                key = (m.mesh_resources.c.kind == kind,
                       m.mesh_resources.c.namespace == namespace,
                       m.mesh_resources.c.name == name)
                row = conn.execute(select(m.mesh_resources.c.body).where(*key)).first()
                if row is not None and row.body == text:
                    outcomes.append("unchanged")
                    continue
                if revision is None:
                    revision = self._next_revision(conn, "mesh")
                if row is None:
                    conn.execute(insert(m.mesh_resources).values(
                        kind=kind, namespace=namespace, name=name, body=text,
                        revision=revision, created_at=now_us))
                    outcomes.append("created")
                else:
                    conn.execute(update(m.mesh_resources).where(*key).values(
                        body=text, revision=revision))
                    outcomes.append("configured")
            if revision is None:
                revision = int(conn.execute(select(m.counters.c.value).where(
                    m.counters.c.name == "mesh")).scalar() or 0)
        return revision, outcomes

    def delete_mesh_resources(self, keys: Sequence[tuple[str, str, str]], *,
                              ignore_missing: bool = False) -> tuple[int, list[bool]]:
        """Delete resources by (kind, namespace, name), all or nothing: a missing one is
        NotFound unless ``ignore_missing``. Returns the revision and what was deleted."""
        deleted: list[bool] = []
        with self._write() as conn:
            for i, (kind, namespace, name) in enumerate(keys):
                gone = conn.execute(m.mesh_resources.delete().where(
                    m.mesh_resources.c.kind == kind, m.mesh_resources.c.namespace == namespace,
                    m.mesh_resources.c.name == name)).rowcount
                if not gone and not ignore_missing:
                    raise NotFound(f"{kind} {namespace}/{name} does not exist",
                                   field=f"resources[{i}]")
                deleted.append(bool(gone))
            if any(deleted):
                revision = self._next_revision(conn, "mesh")
            else:
                revision = int(conn.execute(select(m.counters.c.value).where(
                    m.counters.c.name == "mesh")).scalar() or 0)
        return revision, deleted

    def list_mesh_resources(self, kind: str | None = None
                            ) -> tuple[int, list[tuple[str, str, str, dict[str, Any], int]]]:
        """The mesh revision and its resources as (kind, namespace, name, body,
        created_at), oldest first; read in one transaction so the two agree."""
        q = select(m.mesh_resources).order_by(m.mesh_resources.c.created_at,
                                              m.mesh_resources.c.kind,
                                              m.mesh_resources.c.namespace,
                                              m.mesh_resources.c.name)
        if kind:
            q = q.where(m.mesh_resources.c.kind == kind)
        with self.engine.connect() as conn, conn.begin():
            revision = conn.execute(select(m.counters.c.value).where(
                m.counters.c.name == "mesh")).scalar()
            rows = conn.execute(q).all()
        return int(revision or 0), [(r.kind, r.namespace, r.name, dict(json.loads(r.body)),
                                     int(r.created_at)) for r in rows]

    # -- federation ----------------------------------------------------------------
    def federation_revision(self) -> int:
        with self.engine.connect() as conn:
            value = conn.execute(
                select(m.counters.c.value).where(m.counters.c.name == "federation")).scalar()
        return int(value or 0)

    def put_federated_bundle(self, trust_domain: str, body: str, *, now: int, actor: str
                             ) -> tuple[int, bool]:
        """Create or replace a federated bundle. Returns the federation revision and
        whether anything changed."""
        with self._write() as conn:
            key = m.federated_bundles.c.trust_domain == trust_domain
            row = conn.execute(select(m.federated_bundles.c.body).where(key)).first()
            if row is not None and row.body == body:
                current = conn.execute(select(m.counters.c.value).where(
                    m.counters.c.name == "federation")).scalar()
                return int(current or 0), False
            revision = self._next_revision(conn, "federation")
            values = {"body": body, "revision": revision, "updated_at": now,
                      "updated_by": actor}
            if row is None:
                conn.execute(insert(m.federated_bundles).values(trust_domain=trust_domain,
                                                                **values))
            else:
                conn.execute(update(m.federated_bundles).where(key).values(**values))
        return revision, True

    def delete_federated_bundle(self, trust_domain: str) -> int:
        """Remove a federated bundle (NotFound if there is none); returns the revision."""
        with self._write() as conn:
            gone = conn.execute(m.federated_bundles.delete().where(
                m.federated_bundles.c.trust_domain == trust_domain)).rowcount
            if not gone:
                raise NotFound(f"no federated bundle for trust domain {trust_domain}",
                               field="trust_domain")
            return self._next_revision(conn, "federation")

    def list_federated_bundles(self) -> tuple[int, list[dict[str, Any]]]:
        """The federation revision and every federated bundle, by trust domain name."""
        with self.engine.connect() as conn, conn.begin():
            revision = conn.execute(select(m.counters.c.value).where(
                m.counters.c.name == "federation")).scalar()
            rows = conn.execute(select(m.federated_bundles).order_by(
                m.federated_bundles.c.trust_domain)).all()
        return int(revision or 0), [
            {"trust_domain": r.trust_domain, "bundle": json.loads(r.body),
             "revision": int(r.revision), "updated_at": int(r.updated_at),
             "updated_by": r.updated_by} for r in rows]

    # -- registry: join tokens and agents -------------------------------------
    def create_join_token(self, token_hash: str, *, spiffe_id: str, created_at: int,
                          expires_at: int, created_by: str) -> None:
        with self._write() as conn:
            conn.execute(insert(m.join_tokens).values(
                token_hash=token_hash, spiffe_id=spiffe_id, created_at=created_at,
                expires_at=expires_at, created_by=created_by, used_at=None))

    def consume_join_token(self, token_hash: str, now: int) -> str:
        """Use a token exactly once; returns the agent ID it grants."""
        with self._write() as conn:
            used = conn.execute(update(m.join_tokens).where(
                m.join_tokens.c.token_hash == token_hash, m.join_tokens.c.used_at.is_(None),
                m.join_tokens.c.expires_at > now).values(used_at=now)).rowcount
            row = conn.execute(select(m.join_tokens).where(
                m.join_tokens.c.token_hash == token_hash)).first()
        if used == 1 and row is not None:
            return str(row.spiffe_id)
        if row is None:
            raise PermissionDenied("unknown join token")
        if row.used_at is not None:
            raise PermissionDenied("this join token was already used")
        raise PermissionDenied("this join token has expired")

    def upsert_agent(self, spiffe_id: str, *, attestation: str, serial: str, expires_at: int,
                     now: int) -> None:
        with self._write() as conn:
            row = conn.execute(select(m.agents.c.banned).where(
                m.agents.c.spiffe_id == spiffe_id)).first()
            if row is not None and row.banned:
                raise PermissionDenied(f"agent {spiffe_id} was evicted")
            values = {"attestation": attestation, "serial": serial, "expires_at": expires_at,
                      "last_seen": now}
            if row is None:
                conn.execute(insert(m.agents).values(spiffe_id=spiffe_id, created_at=now,
                                                     banned=0, **values))
            else:
                conn.execute(update(m.agents).where(m.agents.c.spiffe_id == spiffe_id)
                             .values(**values))

    def get_agent(self, spiffe_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(m.agents).where(m.agents.c.spiffe_id == spiffe_id)).first()
        return dict(row._mapping) if row else None

    def list_agents(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                select(m.agents).order_by(m.agents.c.spiffe_id))]

    def ban_agent(self, spiffe_id: str) -> None:
        with self._write() as conn:
            n = conn.execute(update(m.agents).where(m.agents.c.spiffe_id == spiffe_id)
                             .values(banned=1)).rowcount
        if n == 0:
            raise NotFound(f"no agent {spiffe_id}", field="spiffe_id")

    # -- audit ---------------------------------------------------------------
    def audit_events(self, *, action: str | None = None, serial: str | None = None,
                     limit: int = 10000) -> list[AuditEvent]:
        q = select(m.audit_events).order_by(m.audit_events.c.id).limit(limit)
        if action:
            q = q.where(m.audit_events.c.action == action)
        if serial:
            q = q.where(m.audit_events.c.serial == serial)
        with self.engine.connect() as conn:
            return [
                AuditEvent(r.id, r.at, r.actor, r.action, r.serial, json.loads(r.details))
                for r in conn.execute(q)
            ]


_STATUS_SQL_SQLITE = (
    "SELECT ca_id, status, revoked_at, revocation_reason FROM certificates WHERE serial = ?")
_STATUS_SQL_PG = (
    "SELECT ca_id, status, revoked_at, revocation_reason FROM certificates WHERE serial = %s")


def _sqlite_begin(conn: Any) -> None:
    # Write transactions take SQLite's write lock when they start, so that
    # read-then-write sequences (the CRL number) are atomic even across processes
    # sharing the file; reads start a deferred transaction and never block writers.
    if conn.get_execution_options().get("trustmesh_write"):
        conn.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        conn.exec_driver_sql("BEGIN")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # The driver must not open transactions on its own; SQLAlchemy's "begin" does.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()

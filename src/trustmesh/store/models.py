"""Datastore schema (SQLAlchemy Core), shared by SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

SCHEMA_VERSION = 1

metadata = MetaData()

schema_info = Table(
    "schema_info",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("version", Integer, nullable=False),
)

# Small key/value state of the CA: certificates of the hierarchy, key ids.
settings = Table(
    "settings",
    metadata,
    Column("key", String(128), primary_key=True),
    Column("value", Text, nullable=False),
)

certificates = Table(
    "certificates",
    metadata,
    Column("serial", String(64), primary_key=True),  # lower-case hex, no leading zeros
    Column("ca_id", String(32), nullable=False),
    Column("subject", Text, nullable=False),
    Column("sans", Text, nullable=False),  # JSON list of "DNS:x" / "URI:y" / "IP:z"
    Column("template", String(64), nullable=False),
    Column("not_before", BigInteger, nullable=False),  # epoch seconds
    Column("not_after", BigInteger, nullable=False),
    Column("der", LargeBinary, nullable=False),
    Column("requested_by", Text, nullable=False),
    Column("idempotency_key", String(256), nullable=True, unique=True),
    Column("request_digest", String(64), nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("status", String(16), nullable=False, default="valid"),  # valid | revoked
    Column("revoked_at", BigInteger, nullable=True),
    Column("revocation_reason", String(32), nullable=True),
    Column("revoked_by", Text, nullable=True),
)
Index("ix_certificates_ca_status", certificates.c.ca_id, certificates.c.status)

audit_events = Table(
    "audit_events",
    metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("at", BigInteger, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", String(32), nullable=False),  # issue | revoke
    Column("serial", String(64), nullable=True),
    Column("details", Text, nullable=False),  # JSON
)
Index("ix_audit_at", audit_events.c.at)

crls = Table(
    "crls",
    metadata,
    Column("ca_id", String(32), primary_key=True),
    Column("number", BigInteger, nullable=False),
    Column("this_update", BigInteger, nullable=False),
    Column("next_update", BigInteger, nullable=False),
    Column("der", LargeBinary, nullable=False),
)

# Monotonic counters (the registry revision) updated inside write transactions.
counters = Table(
    "counters",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

# Registration entries. A deleted entry stays as a tombstone with the revision
# of its deletion, so agents can sync incrementally ("changes since N").
entries = Table(
    "entries",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("spiffe_id", Text, nullable=False),
    Column("parent_id", Text, nullable=False),
    Column("selectors", Text, nullable=False),  # canonical JSON list, sorted
    Column("body", Text, nullable=False),  # the whole entry as JSON
    Column("revision", BigInteger, nullable=False),
    Column("deleted", Integer, nullable=False, default=0),
)
Index("ix_entries_revision", entries.c.revision)
Index("ix_entries_parent", entries.c.parent_id)
Index("ix_entries_spiffe_id", entries.c.spiffe_id)

# Mesh configuration (AuthorizationPolicy, PeerAuthentication, Workload, Service):
# one row per resource; the "mesh" counter gives every apply/delete a revision that
# the xDS server and the other replicas follow.
mesh_resources = Table(
    "mesh_resources",
    metadata,
    Column("kind", String(64), primary_key=True),
    Column("namespace", String(253), primary_key=True),
    Column("name", String(253), primary_key=True),
    Column("body", Text, nullable=False),  # the resource as JSON (its canonical form)
    Column("revision", BigInteger, nullable=False),  # of the last change
    Column("created_at", BigInteger, nullable=False),  # epoch microseconds: "oldest wins"
)

# Bundles of other trust domains this one federates with (SPIFFE bundle JSON, as set
# by an operator); the "federation" counter versions the set for agents and replicas.
federated_bundles = Table(
    "federated_bundles",
    metadata,
    Column("trust_domain", String(255), primary_key=True),
    Column("body", Text, nullable=False),  # the SPIFFE bundle (JWKS), canonical JSON
    Column("revision", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("updated_by", Text, nullable=False),
)

# One-time join tokens: only a hash is stored.
join_tokens = Table(
    "join_tokens",
    metadata,
    Column("token_hash", String(64), primary_key=True),
    Column("spiffe_id", Text, nullable=False),  # the agent ID the token grants
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("used_at", BigInteger, nullable=True),
)

# Attested agents (nodes).
agents = Table(
    "agents",
    metadata,
    Column("spiffe_id", String(512), primary_key=True),
    Column("attestation", String(32), nullable=False),  # join_token | x509pop
    Column("serial", String(64), nullable=True),  # current node SVID
    Column("expires_at", BigInteger, nullable=True),
    Column("created_at", BigInteger, nullable=False),
    Column("last_seen", BigInteger, nullable=True),
    Column("banned", Integer, nullable=False, default=0),
)

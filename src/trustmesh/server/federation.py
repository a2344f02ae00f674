"""Federated trust bundles: the trust anchors of other trust domains, as an operator sets
them (``trustmesh bundle set``), stored in the datastore and handed to agents for the
registration entries that federate with those trust domains.

A bundle is checked before it is stored: it must parse as a SPIFFE bundle (or PEM), name
a trust domain other than this one, and hold at least one authority. What is stored is
the canonical SPIFFE bundle, so every replica and agent sees the same bytes.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from trustmesh.clock import Clock
from trustmesh.errors import InvalidInput, NotFound, TrustmeshError
from trustmesh.log import get_logger
from trustmesh.spiffe.bundle import Bundle
from trustmesh.spiffe.ids import TrustDomain
from trustmesh.store.datastore import Datastore

__all__ = ["FederatedBundle", "FederationStore", "parse_trust_domain"]

log = get_logger("trustmesh.server.federation")

FORMATS = ("spiffe", "pem")


def parse_trust_domain(value: object, field: str = "trust_domain") -> TrustDomain:
    """A trust domain given as ``example.org`` or ``spiffe://example.org``."""
    if not isinstance(value, str) or not value:
        raise InvalidInput("a trust domain name is required (example.org)", field=field)
    try:
        return TrustDomain.parse(value)
    except TrustmeshError as exc:
        raise InvalidInput(f"{value!r} is not a trust domain: {exc.message}",
                           field=field) from None


@dataclass(frozen=True)
class FederatedBundle:
    """One stored federated bundle and what agents are given of it."""

    trust_domain: str
    document: Mapping[str, Any]  # the SPIFFE bundle (JWKS)
    revision: int
    updated_at: int
    updated_by: str

    @property
    def jwks(self) -> bytes:
        return json.dumps(self.document, sort_keys=True).encode()

    def summary(self) -> dict[str, Any]:
        bundle = Bundle.parse_jwks(self.document, self.trust_domain)
        return {
            "trust_domain": self.trust_domain,
            "x509_authorities": [{
                "subject": c.subject.rfc4514_string(),
                "not_after": c.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": c.fingerprint(hashes.SHA256()).hex(),
            } for c in bundle.x509_authorities],
            "jwt_authorities": sorted(bundle.jwt_authorities),
            "spiffe_sequence": bundle.sequence_number,
            "revision": self.revision,
            "updated_at": self.updated_at,
            "updated_by": self.updated_by,
        }


def parse_bundle(trust_domain: TrustDomain, data: str, fmt: str) -> Bundle:
    """Read an operator's bundle; InvalidInput says what is wrong with it."""
    if fmt not in FORMATS:
        raise InvalidInput(f"unknown bundle format {fmt!r}; use spiffe or pem", field="format")
    if fmt == "pem":
        bundle = Bundle.from_pem(trust_domain, data)
        if not bundle.x509_authorities:
            raise InvalidInput("the PEM bundle holds no certificate", field="bundle")
    else:
        bundle = Bundle.parse_jwks(data, trust_domain, strict=True)
        if not bundle.x509_authorities and not bundle.jwt_authorities:
            raise InvalidInput("the bundle holds no X.509 or JWT authority", field="bundle")
    for i, cert in enumerate(bundle.x509_authorities):
        try:
            ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        if not ca:
            raise InvalidInput(f"X.509 authority {i} ({cert.subject.rfc4514_string()}) is not "
                               "a CA certificate", field="bundle")
    return bundle


class FederationStore:
    """Set, list and delete federated bundles; answer agents from a revision-checked cache."""

    def __init__(self, store: Datastore, own: TrustDomain, clock: Clock) -> None:
        self.store = store
        self.own = own
        self.clock = clock
        self._lock = threading.Lock()
        self._cached: tuple[int, dict[str, FederatedBundle]] | None = None

    def set_bundle(self, trust_domain: object, data: object, fmt: object, actor: str
                   ) -> tuple[FederatedBundle, bool]:
        td = parse_trust_domain(trust_domain)
        if td == self.own:
            raise InvalidInput(f"{td} is this server's own trust domain; its bundle is "
                               "managed by the CA, not set by hand", field="trust_domain")
        if not isinstance(data, str) or not data.strip():
            raise InvalidInput("the bundle is empty", field="bundle")
        if not isinstance(fmt, str):
            raise InvalidInput("must be a string", field="format")
        bundle = parse_bundle(td, data, fmt)
        document = bundle.to_jwks_dict()
        body = json.dumps(document, sort_keys=True)
        now = int(self.clock.now().timestamp())
        revision, changed = self.store.put_federated_bundle(td.name, body, now=now, actor=actor)
        if changed:
            log.info("federated bundle set", extra={
                "trust_domain": td.name, "actor": actor, "revision": revision,
                "x509_authorities": len(bundle.x509_authorities),
                "jwt_authorities": len(bundle.jwt_authorities)})
        return self.get(td.name), changed

    def delete_bundle(self, trust_domain: object, actor: str) -> int:
        td = parse_trust_domain(trust_domain)
        revision = self.store.delete_federated_bundle(td.name)
        log.info("federated bundle deleted", extra={"trust_domain": td.name, "actor": actor,
                                                    "revision": revision})
        return revision

    def all(self) -> dict[str, FederatedBundle]:
        """Every federated bundle by trust domain name; the datastore is read again only
        when its federation revision moved (another replica may have changed it)."""
        revision = self.store.federation_revision()
        with self._lock:
            if self._cached is not None and self._cached[0] == revision:
                return self._cached[1]
        revision, rows = self.store.list_federated_bundles()
        bundles = {r["trust_domain"]: FederatedBundle(
            r["trust_domain"], r["bundle"], r["revision"], r["updated_at"], r["updated_by"])
            for r in rows}
        with self._lock:
            self._cached = (revision, bundles)
        return bundles

    def get(self, trust_domain: object) -> FederatedBundle:
        td = parse_trust_domain(trust_domain)
        found = self.all().get(td.name)
        if found is None:
            raise NotFound(f"no federated bundle for trust domain {td}", field="trust_domain")
        return found

    def for_trust_domains(self, names: Iterable[str]) -> dict[str, bytes]:
        """The SPIFFE bundles (JWKS bytes) of those of ``names`` that are federated."""
        bundles = self.all()
        return {n: bundles[n].jwks for n in sorted(set(names)) if n in bundles}

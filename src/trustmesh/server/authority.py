"""The trust authority's certificate service: hierarchy, issuance, revocation, CRL, OCSP.

This is a thin stateful shell: it loads keys and certificates, calls the pure
signing code in ``trustmesh.pki`` and records results in the datastore. The
HTTP and admin APIs call it; it never speaks HTTP itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from trustmesh.clock import Clock
from trustmesh.config import ServerConfig
from trustmesh.errors import (
    ConfigError,
    Conflict,
    InternalError,
    InvalidInput,
    NotFound,
    TrustmeshError,
)
from trustmesh.log import get_logger
from trustmesh.pki.ca import (
    CaUrls,
    IssuancePolicy,
    IssuanceRequest,
    SigningAuthority,
    build_intermediate,
    build_root,
    ca_id_of,
    fingerprint,
    issue_certificate,
    parse_subject,
)
from trustmesh.pki.crl import RevocationReason, RevokedCertificate, build_crl
from trustmesh.pki.csr import RequestedNames
from trustmesh.pki.keys.base import KeyAlgorithm, KeyManager, generate_software_key
from trustmesh.pki.ocsp import (
    CertificateStatus,
    OcspAnswer,
    OcspResponder,
    ResponderIdentity,
    Status,
)
from trustmesh.pki.templates import get_template
from trustmesh.server.bundle import BundlePublisher
from trustmesh.server.issuance import SignItem, SignOutcome, sign_requests
from trustmesh.server.journal import RevocationJournal
from trustmesh.server.jwt_authority import JwtAuthority
from trustmesh.store.datastore import CertificateRecord, Datastore

__all__ = ["CertificateAuthority", "IssueParams", "IssuedCertificate", "normalize_serial"]

log = get_logger("trustmesh.server.ca")

_ROOT_PATH_LEN = 2
_INTERMEDIATE_PATH_LEN = 1
_OCSP_RESPONSE_VALIDITY = timedelta(hours=1)
# The DNS name in the server's own X509-SVID; agents verify it (and the chain).
SERVER_DNS_NAME = "trustmesh-server"


def normalize_serial(text: str) -> str:
    """``0A:1B``, ``0x0a1b`` and ``A1B`` all become ``a1b``."""
    cleaned = text.strip().lower().replace(":", "")
    if cleaned.startswith("0x"):
        cleaned = cleaned[2:]
    if not cleaned or any(c not in "0123456789abcdef" for c in cleaned) or len(cleaned) > 64:
        raise InvalidInput(f"{text!r} is not a hexadecimal serial number", field="serial")
    return format(int(cleaned, 16), "x")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _epoch(dt: datetime) -> int:
    return int(dt.timestamp())


def _from_epoch(value: int) -> datetime:
    return datetime.fromtimestamp(value, UTC)


@dataclass(frozen=True)
class IssueParams:
    """An issuance request as the admin API receives it."""

    csr: bytes
    template: str
    validity: timedelta | None = None
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    path_length: int | None = None
    idempotency_key: str | None = None

    def digest(self) -> str:
        """What makes two requests "the same" for idempotency."""
        h = hashlib.sha256()
        for part in (
            self.csr.strip(),
            self.template.encode(),
            str(self.validity.total_seconds() if self.validity else "").encode(),
            json.dumps([self.dns_names, self.uris, self.ip_addresses, self.path_length]).encode(),
        ):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.hexdigest()


class IssuedCertificate:
    """A certificate as the API returns it; parsed only when something needs the object."""

    __slots__ = ("_cert", "chain_tail", "der", "reused", "serial")

    def __init__(self, der: bytes, chain_tail: tuple[x509.Certificate, ...], serial: str,
                 reused: bool = False) -> None:
        self.der = der
        self.chain_tail = chain_tail  # the CA chain above the leaf, trust anchor last
        self.serial = serial
        self.reused = reused  # True when an idempotency key returned an earlier certificate
        self._cert: x509.Certificate | None = None

    @property
    def certificate(self) -> x509.Certificate:
        if self._cert is None:
            self._cert = x509.load_der_x509_certificate(self.der)
        return self._cert

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """Leaf first, trust anchor last."""
        return (self.certificate, *self.chain_tail)

    def to_json(self) -> dict[str, Any]:
        leaf = self.certificate
        return {
            "serial": self.serial,
            "subject": leaf.subject.rfc4514_string(),
            "not_before": leaf.not_valid_before_utc.isoformat(),
            "not_after": leaf.not_valid_after_utc.isoformat(),
            "fingerprint_sha256": fingerprint(leaf),
            "chain_pem": "".join(_pem(c) for c in self.chain),
            "reused": self.reused,
        }


@dataclass
class _Hierarchy:
    authority: SigningAuthority
    anchors: tuple[x509.Certificate, ...]
    upstream: bool


@dataclass
class _Responder:
    responder: OcspResponder
    certificate: x509.Certificate
    refresh_at: datetime
    extra: dict[str, Any] = field(default_factory=dict)


class CertificateAuthority:
    """One signing CA (with its chain) and the records of what it signed."""

    def __init__(
        self,
        config: ServerConfig,
        datastore: Datastore,
        keys: KeyManager,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = datastore
        self.keys = keys
        self.clock = clock
        self.journal = RevocationJournal(config.data_dir / "revocations.journal")
        self.policy = IssuancePolicy(mode=config.ca_mode, backdate=config.backdate)
        self._lock = threading.RLock()
        self._hierarchy = self._load_or_create_hierarchy()
        self._responder = self._new_responder()
        self._replay_journal()
        self.ensure_crl(force=self.store.latest_crl(self.ca_id) is None)
        self.jwt = JwtAuthority(datastore, keys, clock)
        self.bundles = BundlePublisher(datastore)

    # -- hierarchy -------------------------------------------------------------
    @property
    def authority(self) -> SigningAuthority:
        return self._hierarchy.authority

    @property
    def ca_id(self) -> str:
        return self._hierarchy.authority.ca_id

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        return self._hierarchy.anchors

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The signing CA first, then its issuers up to the trust anchor."""
        a = self._hierarchy.authority
        return (a.certificate, *a.chain)

    def urls_for(self, ca_id: str) -> CaUrls:
        base = self.config.base_url
        return CaUrls(
            crl_url=f"{base}/crl/{ca_id}.crl",
            ocsp_url=f"{base}/ocsp",
            ca_issuers_url=f"{base}/ca/{ca_id}.der",
        )

    def _load_or_create_hierarchy(self) -> _Hierarchy:
        stored = self.store.get_setting("ca.state")
        if stored:
            loaded = self._load_hierarchy(json.loads(stored))
            if loaded is not None:
                return loaded
        return self._create_hierarchy()

    def _permitted(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (self.config.trust_domain,), tuple(self.config.permitted_dns_domains)

    def _load_hierarchy(self, state: dict[str, Any]) -> _Hierarchy | None:
        signing = x509.load_pem_x509_certificate(state["signing_pem"].encode())
        chain = tuple(x509.load_pem_x509_certificates(state["chain_pem"].encode()))
        key = self.keys.get_key(state["signing_key_id"])
        if key is None:
            if self.keys.name == "memory":
                log.warning(
                    "the memory key manager lost the CA key on restart; creating a new CA",
                    extra={"old_ca_id": state.get("ca_id")},
                )
                return None
            raise ConfigError(
                f"the CA signing key {state['signing_key_id']!r} is missing from the "
                f"{self.keys.name} key manager; restore it or use a fresh data directory"
            )
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != signing.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ConfigError("the stored CA key does not match the stored CA certificate")
        if state.get("trust_domain") != self.config.trust_domain:
            raise ConfigError(
                f"this data directory belongs to trust domain {state.get('trust_domain')!r}, "
                f"not {self.config.trust_domain!r}"
            )
        ca_id = state["ca_id"]
        uri_domains, dns_domains = self._permitted()
        authority = SigningAuthority(
            certificate=signing,
            key=key,
            chain=chain,
            urls=self.urls_for(ca_id),
            permitted_uri_domains=uri_domains,
            permitted_dns_domains=dns_domains,
            ca_id=ca_id,
        )
        anchors = tuple(x509.load_pem_x509_certificates(state["anchors_pem"].encode()))
        log.info("loaded CA", extra={"ca_id": ca_id, "upstream": state.get("upstream", False)})
        return _Hierarchy(authority, anchors, bool(state.get("upstream")))

    def _create_hierarchy(self) -> _Hierarchy:
        now = self.clock.now()
        algorithm = KeyAlgorithm.parse(self.config.ca_key_algorithm)
        stamp = now.strftime("%Y%m%dT%H%M%S")
        base_subject = parse_subject(self.config.ca_subject)
        uri_domains, dns_domains = self._permitted()
        signing_key_id = f"intermediate-{stamp}"
        signing_key = self.keys.generate_key(signing_key_id, algorithm)
        inter_subject = x509.Name(
            [*base_subject, x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                               f"trustmesh intermediate CA {stamp}")]
        )
        upstream = self.config.upstream_ca_cert is not None
        if upstream:
            up_chain, up_key = self._load_upstream()
            issuer_cert = up_chain[0]
            signing_cert = build_intermediate(
                signing_key.public_key(), inter_subject, issuer_cert, up_key, now,
                self.config.intermediate_ttl, path_length=_INTERMEDIATE_PATH_LEN,
                permitted_uri_domains=uri_domains, permitted_dns_domains=dns_domains,
                backdate=self.config.backdate,
            )
            chain = tuple(up_chain)
            anchors = (up_chain[-1],)
        else:
            root_key_id = f"root-{stamp}"
            root_key = self.keys.generate_key(root_key_id, algorithm)
            root_subject = x509.Name(
                [*base_subject, x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                                   f"trustmesh root CA {stamp}")]
            )
            root = build_root(root_key, root_subject, now, self.config.root_ttl,
                              path_length=_ROOT_PATH_LEN, backdate=self.config.backdate)
            signing_cert = build_intermediate(
                signing_key.public_key(), inter_subject, root, root_key, now,
                self.config.intermediate_ttl, path_length=_INTERMEDIATE_PATH_LEN,
                permitted_uri_domains=uri_domains, permitted_dns_domains=dns_domains,
                backdate=self.config.backdate,
            )
            chain = (root,)
            anchors = (root,)
        ca_id = ca_id_of(signing_cert)
        state = {
            "ca_id": ca_id,
            "trust_domain": self.config.trust_domain,
            "signing_key_id": signing_key_id,
            "signing_pem": _pem(signing_cert),
            "chain_pem": "".join(_pem(c) for c in chain),
            "anchors_pem": "".join(_pem(c) for c in anchors),
            "upstream": upstream,
            "key_manager": self.keys.name,
            "created_at": now.isoformat(),
        }
        self.store.put_settings({"ca.state": json.dumps(state)})
        log.info("created CA", extra={"ca_id": ca_id, "upstream": upstream,
                                      "algorithm": algorithm.value})
        authority = SigningAuthority(
            certificate=signing_cert, key=signing_key, chain=chain,
            urls=self.urls_for(ca_id), permitted_uri_domains=uri_domains,
            permitted_dns_domains=dns_domains, ca_id=ca_id,
        )
        return _Hierarchy(authority, anchors, upstream)

    def _load_upstream(self) -> tuple[list[x509.Certificate], Any]:
        cert_path = self.config.upstream_ca_cert
        key_path = self.config.upstream_ca_key
        if cert_path is None or key_path is None:
            raise ConfigError("--upstream-ca-cert and --upstream-ca-key must be given together")
        try:
            certs = x509.load_pem_x509_certificates(Path(cert_path).read_bytes())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load upstream CA certificate {cert_path}: {exc}") from None
        passphrase = None
        if self.config.upstream_ca_key_passphrase_file:
            passphrase = Path(self.config.upstream_ca_key_passphrase_file).read_bytes().rstrip(
                b"\r\n")
        try:
            key = serialization.load_pem_private_key(Path(key_path).read_bytes(), passphrase)
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigError(f"cannot load upstream CA key {key_path}: {exc}") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(serialization.Encoding.DER, spki) != certs[
            0
        ].public_key().public_bytes(serialization.Encoding.DER, spki):
            raise ConfigError(
                "the upstream CA key does not match the first certificate in "
                f"{cert_path}"
            )
        return certs, key

    # -- OCSP responder --------------------------------------------------------
    def _new_responder(self) -> _Responder:
        """A fresh delegated responder key and certificate (kept in memory only)."""
        now = self.clock.now()
        authority = self.authority
        key = generate_software_key(KeyAlgorithm.EC_P256)
        ttl = min(self.config.ocsp_responder_ttl,
                  authority.certificate.not_valid_after_utc - now)
        subject = x509.Name(
            [*parse_subject(self.config.ca_subject),
             x509.NameAttribute(x509.NameOID.COMMON_NAME, f"trustmesh OCSP responder {self.ca_id}")]
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(subject)
            .sign(key, hashes.SHA256())
        )
        request = IssuanceRequest(
            csr=csr, template=get_template("ocsp-signing"), validity=ttl,
            names=RequestedNames(),
        )
        cert = issue_certificate(authority, request, now, x509.random_serial_number(),
                                 IssuancePolicy(mode=self.config.ca_mode,
                                                backdate=self.config.backdate))
        responder = OcspResponder(
            [ResponderIdentity(self.ca_id, authority.certificate, cert, key)],
            validity=_OCSP_RESPONSE_VALIDITY,
        )
        lifetime = cert.not_valid_after_utc - now
        log.info("issued OCSP responder certificate",
                 extra={"serial": format(cert.serial_number, "x"),
                        "not_after": cert.not_valid_after_utc.isoformat()})
        return _Responder(responder, cert, now + lifetime * 2 / 3)

    def rotate_responder_if_due(self) -> bool:
        if self.clock.now() < self._responder.refresh_at:
            return False
        with self._lock:
            self._responder = self._new_responder()
        return True

    @property
    def responder_certificate(self) -> x509.Certificate:
        return self._responder.certificate

    def ocsp(self, request_der: bytes) -> OcspAnswer:
        return self._responder.responder.respond(request_der, self._status_lookup,
                                                 self.clock.now())

    def _status_lookup(self, ca_id: str, serial: int) -> CertificateStatus:
        row = self.store.certificate_status(format(serial, "x"))
        if row is None or row[0] != ca_id:
            return CertificateStatus(Status.UNKNOWN)
        _, status, revoked_at, reason = row
        if status == "revoked":
            return CertificateStatus(
                Status.REVOKED,
                _from_epoch(revoked_at or 0),
                RevocationReason.parse(reason or "unspecified"),
            )
        return CertificateStatus(Status.GOOD)

    # -- issuance ------------------------------------------------------------
    def now(self) -> datetime:
        return self.clock.now()

    def check_idempotency(self, params: IssueParams) -> IssuedCertificate | None:
        """The earlier certificate for a retried request, or None; Conflict on misuse."""
        if not params.idempotency_key:
            return None
        if len(params.idempotency_key) > 256:
            raise InvalidInput("idempotency key longer than 256 characters",
                               field="idempotency_key")
        return self._idempotent_hit(params.idempotency_key, params.digest())

    def make_item(self, params: IssueParams) -> SignItem:
        """Cheap checks done before any signing work, and a fresh serial."""
        template = get_template(params.template)
        validity = params.validity or min(self.config.default_validity, template.max_validity)
        return SignItem(
            csr=params.csr,
            template=template.name,
            validity_seconds=validity.total_seconds(),
            dns_names=params.dns_names,
            uris=params.uris,
            ip_addresses=params.ip_addresses,
            path_length=params.path_length,
            serial=x509.random_serial_number(),
        )

    def issue(self, params: IssueParams, actor: str) -> IssuedCertificate:
        """Issue one certificate in this process (the server batches; see issuance.py)."""
        earlier = self.check_idempotency(params)
        if earlier is not None:
            return earlier
        item = self.make_item(params)
        outcome = sign_requests(self.authority, self.policy, [item], self.clock.now())[0]
        result = self.record_signed([(item, (params, actor), outcome)])[0]
        if isinstance(result, TrustmeshError):
            raise result
        return result

    def record_signed(
        self, entries: Sequence[tuple[SignItem, tuple[IssueParams, str], SignOutcome]]
    ) -> list[IssuedCertificate | TrustmeshError]:
        """Store a batch of signed certificates (one transaction) with their audit events."""
        results: list[IssuedCertificate | TrustmeshError | None] = [None] * len(entries)
        to_store: list[tuple[int, CertificateRecord, dict[str, Any]]] = []
        created_at = _epoch(self.clock.now())
        for i, (item, (params, actor), outcome) in enumerate(entries):
            if outcome.error is not None:
                try:
                    outcome.raise_error()
                except TrustmeshError as err:
                    results[i] = err
                continue
            record, details = self._record_for(outcome, item, params, actor, created_at)
            to_store.append((i, record, details))
        if to_store:
            try:
                self.store.insert_certificates([t[1] for t in to_store],
                                               [t[2] for t in to_store])
                stored = [(i, rec) for i, rec, _ in to_store]
            except Conflict:
                stored = []  # a duplicate idempotency key in the batch: store one by one
                for i, rec, details in to_store:
                    try:
                        self.store.insert_certificates([rec], [details])
                        stored.append((i, rec))
                    except Conflict as err:
                        params = entries[i][1][0]
                        try:
                            earlier = self.check_idempotency(params)
                        except TrustmeshError as conflict:
                            results[i] = conflict
                            continue
                        results[i] = earlier if earlier is not None else err
            chain = self.chain
            for i, rec in stored:
                results[i] = IssuedCertificate(rec.der, chain, rec.serial)
            if log.isEnabledFor(logging.INFO):
                log.info("issued certificates", extra={
                    "count": len(stored), "serials": [rec.serial for _, rec in stored[:64]],
                    "templates": sorted({rec.template for _, rec in stored})})
        return [r if r is not None else InternalError("issuance produced no result")
                for r in results]

    def _record_for(self, outcome: SignOutcome, item: SignItem, params: IssueParams,
                    actor: str, created_at: int) -> tuple[CertificateRecord, dict[str, Any]]:
        assert outcome.der is not None
        record = CertificateRecord(
            serial=format(item.serial, "x"),
            ca_id=self.ca_id,
            subject=outcome.subject,
            sans=outcome.sans,
            template=item.template,
            not_before=outcome.not_before,
            not_after=outcome.not_after,
            der=outcome.der,
            requested_by=actor,
            created_at=created_at,
            idempotency_key=params.idempotency_key,
            request_digest=params.digest() if params.idempotency_key else None,
        )
        details = {
            "subject": record.subject,
            "sans": list(record.sans),
            "template": item.template,
            "not_before": _from_epoch(record.not_before).isoformat(),
            "not_after": _from_epoch(record.not_after).isoformat(),
            "ca_id": self.ca_id,
        }
        return record, details

    def _idempotent_hit(self, key: str, digest: str | None) -> IssuedCertificate | None:
        record = self.store.find_by_idempotency_key(key)
        if record is None:
            return None
        if record.request_digest != digest:
            raise Conflict(
                f"idempotency key {key!r} was already used for a different request",
                field="idempotency_key",
            )
        return IssuedCertificate(record.der, self.chain, record.serial, reused=True)

    def bundle(self) -> dict[str, Any]:
        """This trust domain's bundle (SPIFFE format): trust anchors and JWT keys."""
        return self.bundles.current(self.anchors, self.jwt.published())

    def bundle_jwks(self) -> bytes:
        return json.dumps(self.bundle(), indent=2).encode()

    def issue_server_identity(self, ttl: timedelta) -> tuple[Any, tuple[x509.Certificate, ...]]:
        """A fresh key and X509-SVID (spiffe://<td>/trustmesh/server) for the agent API."""
        key = generate_software_key(KeyAlgorithm.EC_P256)
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        item = SignItem(csr=csr, template="x509-svid", validity_seconds=ttl.total_seconds(),
                        dns_names=(SERVER_DNS_NAME,),
                        uris=(f"spiffe://{self.config.trust_domain}/trustmesh/server",),
                        ip_addresses=(), path_length=None,
                        serial=x509.random_serial_number(),
                        subject=f"O=trustmesh,CN={SERVER_DNS_NAME}", names_from_csr=False)
        outcome = sign_requests(self.authority, self.policy, [item], self.clock.now())[0]
        outcome.raise_error()
        assert outcome.der is not None
        leaf = x509.load_der_x509_certificate(outcome.der)
        return key, (leaf, *self.chain)

    # -- revocation ----------------------------------------------------------
    def revoke(self, serial_text: str, reason_text: str, actor: str) -> CertificateRecord:
        serial = normalize_serial(serial_text)
        reason = RevocationReason.parse(reason_text)
        record = self.store.get_certificate(serial)  # NotFound for unknown serials
        if record.status == "revoked":
            raise Conflict(f"certificate {serial} is already revoked", field="serial")
        now = self.clock.now()
        entry: dict[str, Any] = {
            "serial": serial, "at": _epoch(now), "reason": reason.value, "actor": actor,
            "details": {"subject": record.subject, "sans": list(record.sans),
                        "reason": reason.value},
        }
        # Durable first: the journal, then the datastore, then CRL and OCSP change.
        self.journal.append(entry)
        with self._lock:
            revoked = self.store.revoke(serial, at=entry["at"], reason=reason.value,
                                        actor=actor, details=entry["details"])
            self.ensure_crl(force=True)
        log.info("revoked certificate", extra={"serial": serial, "reason": reason.value,
                                               "actor": actor})
        return revoked

    def _replay_journal(self) -> None:
        fixed = self.store.apply_revocations(self.journal.entries())
        if fixed:
            log.warning("restored revocations the datastore had lost",
                        extra={"serials": fixed})

    # -- CRL -----------------------------------------------------------------
    def ensure_crl(self, *, force: bool = False) -> bool:
        """Re-sign the CRL when forced or when half its validity is gone."""
        with self._lock:
            now = self.clock.now()
            latest = self.store.latest_crl(self.ca_id)
            if latest is not None and not force:
                half = latest.this_update + (latest.next_update - latest.this_update) // 2
                if _epoch(now) < half:
                    return False
            revoked = [
                RevokedCertificate(
                    int(r.serial, 16), _from_epoch(r.revoked_at or 0),
                    RevocationReason.parse(r.revocation_reason or "unspecified"),
                )
                for r in self.store.revoked_certificates(self.ca_id)
            ]
            this_update = now.replace(microsecond=0)
            next_update = this_update + self.config.crl_validity
            authority = self.authority

            def build(number: int) -> bytes:
                crl = build_crl(authority.certificate, authority.key, revoked, number=number,
                                this_update=this_update, next_update=next_update)
                return crl.public_bytes(serialization.Encoding.DER)

            rec = self.store.store_crl(self.ca_id, this_update=_epoch(this_update),
                                       next_update=_epoch(next_update), build=build)
            log.info("signed CRL", extra={"ca_id": self.ca_id, "number": rec.number,
                                          "revoked": len(revoked)})
            return True

    def crl_der(self, ca_id: str) -> bytes:
        rec = self.store.latest_crl(ca_id)
        if rec is None:
            raise NotFound(f"no CRL for CA {ca_id}")
        return rec.der

    def ca_certificate(self, ca_id: str) -> x509.Certificate:
        for cert in self.chain:
            if ca_id_of(cert) == ca_id:
                return cert
        raise NotFound(f"no CA certificate {ca_id}")

    # -- views ---------------------------------------------------------------
    def describe(self) -> dict[str, Any]:
        def info(cert: x509.Certificate, role: str) -> dict[str, Any]:
            return {
                "role": role,
                "ca_id": ca_id_of(cert),
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "serial": format(cert.serial_number, "x"),
                "not_before": cert.not_valid_before_utc.isoformat(),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "fingerprint_sha256": fingerprint(cert),
                "pem": _pem(cert),
            }

        chain = self.chain
        roles = ["signing"] + ["upstream" if self._hierarchy.upstream else "root"] * (
            len(chain) - 1)
        return {
            "trust_domain": self.config.trust_domain,
            "mode": self.config.ca_mode.value,
            "key_manager": self.keys.name,
            "ca_id": self.ca_id,
            "crl_url": self.authority.urls.crl_url,
            "ocsp_url": self.authority.urls.ocsp_url,
            "chain": [info(c, r) for c, r in zip(chain, roles, strict=True)],
            "trust_anchors_pem": "".join(_pem(c) for c in self.anchors),
            "ocsp_responder": info(self._responder.certificate, "ocsp-responder"),
        }

    def audit(self, action: str | None = None, serial: str | None = None
              ) -> list[dict[str, Any]]:
        if serial:
            serial = normalize_serial(serial)
        if action not in (None, "issue", "revoke"):
            raise InvalidInput(f"unknown audit action {action!r}; use issue or revoke",
                               field="action")
        out = []
        for ev in self.store.audit_events(action=action, serial=serial):
            out.append({
                "id": ev.id,
                "at": _from_epoch(ev.at).isoformat(),
                "actor": ev.actor,
                "action": ev.action,
                "serial": ev.serial,
                **ev.details,
            })
        return out


def chain_pem(certs: Sequence[x509.Certificate]) -> str:
    return "".join(_pem(c) for c in certs)

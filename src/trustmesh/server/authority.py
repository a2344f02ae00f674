"""The trust authority's certificate service: hierarchy, issuance, revocation, CRL, OCSP.

This is a thin stateful shell: it loads keys and certificates, calls the pure
signing code in ``trustmesh.pki`` and records results in the datastore. The
HTTP and admin APIs call it; it never speaks HTTP itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
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
    OcspAnswer,
    OcspResponder,
    ResponderIdentity,
)
from trustmesh.pki.templates import get_template
from trustmesh.server.bundle import BundlePublisher
from trustmesh.server.ca_rotation import CaSlot, SlotState, plan_ca_rotation, retire_due
from trustmesh.server.certificate_status import status_lookup
from trustmesh.server.issuance import SignItem, SignOutcome, sign_requests
from trustmesh.server.journal import RevocationJournal
from trustmesh.server.jwt_authority import JwtAuthority
from trustmesh.store.datastore import CertificateRecord, CrlRecord, Datastore

__all__ = ["CertificateAuthority", "IssueParams", "IssuedCertificate", "normalize_serial"]

log = get_logger("trustmesh.server.ca")

_ROOT_PATH_LEN = 2
_INTERMEDIATE_PATH_LEN = 1
_OCSP_RESPONSE_VALIDITY = timedelta(hours=1)
_MIN_RESPONDER_TTL = timedelta(seconds=2)
_ROTATION_RETRY = timedelta(seconds=5)
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

    __slots__ = ("_cert", "_not_after", "chain_tail", "der", "reused", "serial")

    def __init__(self, der: bytes, chain_tail: tuple[x509.Certificate, ...], serial: str,
                 reused: bool = False, not_after: int | None = None) -> None:
        self.der = der
        self.chain_tail = chain_tail  # the CA chain above the leaf, trust anchor last
        self.serial = serial
        self.reused = reused  # True when an idempotency key returned an earlier certificate
        self._cert: x509.Certificate | None = None
        self._not_after = not_after

    @property
    def not_after(self) -> int:
        """notAfter in epoch seconds (known from the record, or read from the leaf)."""
        if self._not_after is None:
            self._not_after = int(self.certificate.not_valid_after_utc.timestamp())
        return self._not_after

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


@dataclass(frozen=True)
class _Slot:
    """One CA slot: its place in the rotation schedule and what it signs with."""

    schedule: CaSlot
    authority: SigningAuthority
    anchors: tuple[x509.Certificate, ...]  # the root(s) validators need for it
    upstream: bool
    key_ids: tuple[str, ...]  # in the key manager: the signing key first, then its root's

    @property
    def ca_id(self) -> str:
        return self.schedule.ca_id

    @property
    def state(self) -> SlotState:
        return self.schedule.state

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The signing CA first, then its issuers up to the trust anchor."""
        return (self.authority.certificate, *self.authority.chain)

    def to_json(self) -> dict[str, Any]:
        s = self.schedule

        def when(dt: datetime | None) -> str | None:
            return dt.isoformat() if dt is not None else None

        return {
            "ca_id": s.ca_id,
            "state": s.state.value,
            "created_at": s.created_at.isoformat(),
            "prepared_at": s.prepared_at.isoformat(),
            "activated_at": when(s.activated_at),
            "deactivated_at": when(s.deactivated_at),
            "signing_key_id": self.key_ids[0],
            "key_ids": list(self.key_ids),
            "signing_pem": _pem(self.authority.certificate),
            "chain_pem": "".join(_pem(c) for c in self.authority.chain),
            "anchors_pem": "".join(_pem(c) for c in self.anchors),
            "upstream": self.upstream,
        }


@dataclass(frozen=True)
class _Responder:
    identity: ResponderIdentity
    refresh_at: datetime

    @property
    def certificate(self) -> x509.Certificate:
        return self.identity.responder_certificate


_SLOTS_SETTING = "ca.slots"
_LEGACY_SETTING = "ca.state"  # one CA, as written before rotation existed
_SIGNING_STATES = (SlotState.ACTIVE, SlotState.OLD)  # slots that have signed: OCSP
# Slots with CRLs: every published one, so a validator that checks every CA in a chain
# (Envoy's SPIFFE validator given CRLs) has them before the prepared CA signs anything.
_CRL_STATES = (SlotState.PREPARED, SlotState.ACTIVE, SlotState.OLD)
_CRL_CACHE_SECONDS = 1.0


def root_crl_id(ca_id: str) -> str:
    """Where the CRL signed by a slot's root is stored and served (/crl/<id>.crl)."""
    return f"{ca_id}-root"


class CertificateAuthority:
    """The signing CAs (one active, a prepared successor, the previous one) and the
    records of what they signed."""

    def __init__(
        self,
        config: ServerConfig,
        datastore: Datastore,
        keys: KeyManager,
        clock: Clock,
    ) -> None:
        self.config = config
        self.store = datastore
        # the responder's statuses (kept on SQLite while its status generation holds)
        self._status_lookup = status_lookup(datastore)
        self.keys = keys
        self.clock = clock
        self.journal = RevocationJournal(config.data_dir / "revocations.journal")
        self.policy = IssuancePolicy(mode=config.ca_mode, backdate=config.backdate)
        self._lock = threading.RLock()
        self._crl_cache: tuple[float, int, list[bytes]] | None = None
        self._slots: tuple[_Slot, ...] = ()
        self._stored: str | None = None  # the slots as last read or written (compare-and-set)
        self._signed_until: dict[str, datetime] = {}
        self._next_check = clock.now()
        self._responders: dict[str, _Responder] = {}
        self._ocsp = OcspResponder([], validity=_OCSP_RESPONSE_VALIDITY)
        self._load_slots()
        self.rotate_x509()  # the first CA, or what came due while the server was stopped
        self._after_change()  # CRLs and OCSP responders of the loaded CAs
        self._replay_journal()
        self.jwt = JwtAuthority(datastore, keys, clock)
        self.bundles = BundlePublisher(datastore)

    # -- slots -----------------------------------------------------------------
    @property
    def _active(self) -> _Slot:
        for slot in self._slots:
            if slot.state is SlotState.ACTIVE:
                return slot
        raise InternalError("no active CA")

    @property
    def authority(self) -> SigningAuthority:
        """The CA that signs now."""
        return self._active.authority

    @property
    def ca_id(self) -> str:
        return self._active.ca_id

    @property
    def anchors(self) -> tuple[x509.Certificate, ...]:
        """Every trust anchor validators need: the previous CA's, the active one's and its
        prepared successor's, each once, oldest first (activation alone changes nothing)."""
        out: list[x509.Certificate] = []
        for slot in self._slots:
            out.extend(a for a in slot.anchors if a not in out)
        return tuple(out)

    @property
    def chain(self) -> tuple[x509.Certificate, ...]:
        """The active signing CA first, then its issuers up to the trust anchor."""
        return self._active.chain

    def chain_for(self, ca_id: str) -> tuple[x509.Certificate, ...]:
        """The chain of the CA ``ca_id`` if it is still published, else the active one."""
        for slot in self._slots:
            if slot.ca_id == ca_id:
                return slot.chain
        return self.chain

    def slot_states(self) -> list[tuple[str, str]]:
        """(ca_id, state) of every published CA."""
        return [(s.ca_id, s.state.value) for s in self._slots]

    def seconds_until_rotation(self) -> float:
        """How long until the CA schedule may change (for the housekeeping loop)."""
        return max(0.0, (self._next_check - self.clock.now()).total_seconds())

    def urls_for(self, ca_id: str) -> CaUrls:
        base = self.config.base_url
        return CaUrls(
            crl_url=f"{base}/crl/{ca_id}.crl",
            ocsp_url=f"{base}/ocsp",
            ca_issuers_url=f"{base}/ca/{ca_id}.der",
        )

    def _permitted(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return (self.config.trust_domain,), tuple(self.config.permitted_dns_domains)

    def _load_slots(self) -> None:
        raw = self.store.get_setting(_SLOTS_SETTING)
        self._stored = raw
        if raw is not None:
            slots = self._parse_slots(raw)
        else:
            legacy = self.store.get_setting(_LEGACY_SETTING)
            one = self._legacy_slot(json.loads(legacy)) if legacy else None
            slots = (one,) if one is not None else ()
        self._slots = slots
        for slot in slots:
            log.info("loaded CA", extra={"ca_id": slot.ca_id, "state": slot.state.value,
                                         "upstream": slot.upstream})

    def _parse_slots(self, raw: str) -> tuple[_Slot, ...]:
        doc = json.loads(raw)
        self._check_trust_domain(doc.get("trust_domain"))
        out = []
        for body in doc.get("slots", []):
            slot = self._slot_from_json(body)
            if slot is None:
                return ()  # the memory key manager lost the keys: start a new CA
            out.append(slot)
        return tuple(out)

    def _check_trust_domain(self, stored: str | None) -> None:
        if stored != self.config.trust_domain:
            raise ConfigError(
                f"this data directory belongs to trust domain {stored!r}, "
                f"not {self.config.trust_domain!r}"
            )

    def _legacy_slot(self, state: dict[str, Any]) -> _Slot | None:
        """The single CA of a data directory written before rotation existed."""
        self._check_trust_domain(state.get("trust_domain"))
        signing = x509.load_pem_x509_certificate(state["signing_pem"].encode())
        created = (datetime.fromisoformat(state["created_at"]) if state.get("created_at")
                   else signing.not_valid_before_utc)
        key_ids = [state["signing_key_id"]]
        if key_ids[0].startswith("intermediate-"):
            key_ids.append("root-" + key_ids[0].removeprefix("intermediate-"))
        body = {**state, "state": SlotState.ACTIVE.value, "created_at": created.isoformat(),
                "prepared_at": created.isoformat(), "activated_at": created.isoformat(),
                "key_ids": key_ids}
        return self._slot_from_json(body)

    def _slot_from_json(self, body: dict[str, Any]) -> _Slot | None:
        signing = x509.load_pem_x509_certificate(body["signing_pem"].encode())
        chain = tuple(x509.load_pem_x509_certificates(body["chain_pem"].encode()))
        key = self.keys.get_key(body["signing_key_id"])
        if key is None:
            if self.keys.name == "memory":
                log.warning(
                    "the memory key manager lost the CA key on restart; creating a new CA",
                    extra={"old_ca_id": body.get("ca_id")},
                )
                return None
            raise ConfigError(
                f"the CA signing key {body['signing_key_id']!r} is missing from the "
                f"{self.keys.name} key manager; restore it or use a fresh data directory"
            )
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != signing.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ConfigError("the stored CA key does not match the stored CA certificate")
        ca_id = body["ca_id"]
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

        def when(name: str) -> datetime | None:
            value = body.get(name)
            return datetime.fromisoformat(value) if value else None

        created = when("created_at") or signing.not_valid_before_utc
        schedule = CaSlot(
            ca_id=ca_id, created_at=created, not_after=signing.not_valid_after_utc,
            state=SlotState(body["state"]), prepared_at=when("prepared_at") or created,
            activated_at=when("activated_at"), deactivated_at=when("deactivated_at"),
        )
        anchors = tuple(x509.load_pem_x509_certificates(body["anchors_pem"].encode()))
        key_ids = tuple(body.get("key_ids") or [body["signing_key_id"]])
        return _Slot(schedule, authority, anchors, bool(body.get("upstream")), key_ids)

    def _serialize(self, slots: Sequence[_Slot]) -> str:
        return json.dumps({
            "trust_domain": self.config.trust_domain,
            "key_manager": self.keys.name,
            "slots": [s.to_json() for s in slots],
        })

    def _new_slot(self, now: datetime, state: SlotState) -> _Slot:
        """Keys and certificates of a new CA; nothing is published or used until the
        caller has stored it."""
        algorithm = KeyAlgorithm.parse(self.config.ca_key_algorithm)
        stamp = now.strftime("%Y%m%dT%H%M%S")
        unique = f"{stamp}-{secrets.token_hex(4)}"
        base_subject = parse_subject(self.config.ca_subject)
        uri_domains, dns_domains = self._permitted()
        signing_key_id = f"intermediate-{unique}"
        signing_key = self.keys.generate_key(signing_key_id, algorithm)
        key_ids = [signing_key_id]
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
            if signing_cert.not_valid_after_utc < now + self.config.intermediate_ttl:
                log.warning("the upstream CA expires before the intermediate_ttl: the new "
                            "CA is cut short and will rotate sooner",
                            extra={"upstream_not_after":
                                   issuer_cert.not_valid_after_utc.isoformat()})
        else:
            root_key_id = f"root-{unique}"
            root_key = self.keys.generate_key(root_key_id, algorithm)
            key_ids.append(root_key_id)
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
        authority = SigningAuthority(
            certificate=signing_cert, key=signing_key, chain=chain,
            urls=self.urls_for(ca_id), permitted_uri_domains=uri_domains,
            permitted_dns_domains=dns_domains, ca_id=ca_id,
        )
        schedule = CaSlot(ca_id=ca_id, created_at=now, not_after=signing_cert.not_valid_after_utc,
                          state=state, prepared_at=now,
                          activated_at=now if state is SlotState.ACTIVE else None)
        return _Slot(schedule, authority, anchors, upstream, tuple(key_ids))

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

    # -- rotation --------------------------------------------------------------
    def _signed_until_map(self, now: datetime) -> dict[str, datetime]:
        """The latest notAfter each old CA signed. Asked once per CA, after it has been
        old for the propagation time (what it signed last is recorded by then; before
        that the schedule keeps it anyway)."""
        prop = self.config.ca_propagation
        for slot in self._slots:
            s = slot.schedule
            if (s.state is SlotState.OLD and slot.ca_id not in self._signed_until
                    and s.deactivated_at is not None and now >= s.deactivated_at + prop):
                latest = self.store.latest_not_after(slot.ca_id)
                self._signed_until[slot.ca_id] = (
                    _from_epoch(latest) if latest is not None else s.deactivated_at)
        return dict(self._signed_until)

    def rotate_x509(self) -> bool:
        """Apply the CA rotation schedule; True when the published CAs changed.

        Every change is stored (compare-and-set against what this server last saw)
        before it is used: a crash leaves either the old slots or the new ones.
        """
        with self._lock:
            # should this check fail half way, the next one comes soon, not at once
            self._next_check = self.clock.now() + _ROTATION_RETRY
            followed = False
            stored = self.store.get_setting(_SLOTS_SETTING)
            if stored is not None and stored != self._stored:
                # another replica moved the schedule (or this is a restart): follow it
                self._slots, self._stored = self._parse_slots(stored), stored
                followed = True
            now = self.clock.now()
            prop = self.config.ca_propagation
            plan = plan_ca_rotation([s.schedule for s in self._slots], now, prop,
                                    self._signed_until_map(now))
            if not plan.changed:
                self._next_check = plan.next_check
                if followed:
                    self._after_change()
                return followed
            by_id = {s.ca_id: s for s in self._slots}
            after = [replace(by_id[c.ca_id], schedule=c) for c in plan.slots]
            created = self._new_slot(now, plan.create) if plan.create is not None else None
            if created is not None:
                after.append(created)
            payload = self._serialize(after)
            if not self.store.replace_setting(_SLOTS_SETTING, self._stored, payload):
                if created is not None:
                    self._delete_keys(created)
                log.warning("another server changed the CA slots first; following it")
                self._next_check = now  # the next check reads and follows theirs
                return followed
            self._stored = payload
            self._slots = tuple(after)
            for move in plan.transitions:
                ca_id = move.ca_id or (created.ca_id if created is not None else "")
                log.info("CA slot transition", extra={
                    "ca_id": ca_id,
                    "from": move.before.value if move.before else None,
                    "to": move.after.value if move.after else "retired",
                    "reason": move.reason})
                if move.after is None and move.ca_id in by_id:
                    self._signed_until.pop(move.ca_id, None)
                    self._delete_keys(by_id[move.ca_id])
            self._after_change()
            replanned = plan_ca_rotation([s.schedule for s in self._slots], now, prop,
                                         self._signed_until_map(now))
            self._next_check = now if replanned.changed else replanned.next_check
            return True

    def _delete_keys(self, slot: _Slot) -> None:
        for key_id in slot.key_ids:
            try:
                self.keys.delete_key(key_id)
            except Exception:  # a key already gone is no reason to stop rotating
                log.warning("could not delete a retired CA key", extra={"key_id": key_id},
                            exc_info=True)

    def _after_change(self) -> None:
        """CRLs and OCSP responders follow the slots that have signed."""
        self._active  # noqa: B018 - fail loudly if the plan left no active CA
        for slot in self._slots:
            if slot.state in _CRL_STATES and self.store.latest_crl(slot.ca_id) is None:
                self._ensure_crl_for(slot, force=True)
        self._refresh_responders()

    # -- OCSP responder --------------------------------------------------------
    def _new_responder(self, slot: _Slot, now: datetime) -> _Responder | None:
        """A fresh delegated responder key and certificate (kept in memory only)."""
        authority = slot.authority
        key = generate_software_key(KeyAlgorithm.EC_P256)
        ttl = min(self.config.ocsp_responder_ttl,
                  authority.certificate.not_valid_after_utc - now)
        if ttl <= _MIN_RESPONDER_TTL:
            return None  # the CA ends in a moment: keep the responder it has
        subject = x509.Name(
            [*parse_subject(self.config.ca_subject),
             x509.NameAttribute(x509.NameOID.COMMON_NAME,
                                f"trustmesh OCSP responder {slot.ca_id}")]
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
        lifetime = cert.not_valid_after_utc - now
        log.info("issued OCSP responder certificate",
                 extra={"ca_id": slot.ca_id, "serial": format(cert.serial_number, "x"),
                        "not_after": cert.not_valid_after_utc.isoformat()})
        identity = ResponderIdentity(slot.ca_id, authority.certificate, cert, key)
        return _Responder(identity, now + lifetime * 2 / 3)

    def _refresh_responders(self) -> bool:
        """A responder for every CA that has signed, renewed at two thirds of its life."""
        with self._lock:
            now = self.clock.now()
            wanted = {s.ca_id: s for s in self._slots if s.state in _SIGNING_STATES}
            changed = False
            for ca_id in [c for c in self._responders if c not in wanted]:
                del self._responders[ca_id]
                changed = True
            for ca_id, slot in wanted.items():
                current = self._responders.get(ca_id)
                if current is not None and now < current.refresh_at:
                    continue
                fresh = self._new_responder(slot, now)
                if fresh is not None:
                    self._responders[ca_id] = fresh
                    changed = True
            if changed:
                self._ocsp = OcspResponder([r.identity for r in self._responders.values()],
                                           validity=_OCSP_RESPONSE_VALIDITY)
            return changed

    def rotate_responder_if_due(self) -> bool:
        return self._refresh_responders()

    @property
    def responder_certificate(self) -> x509.Certificate:
        """The active CA's OCSP responder certificate."""
        return self._responders[self.ca_id].certificate

    @property
    def ocsp_responder(self) -> OcspResponder:
        """The OCSP responder in use: replaced, never changed, when responders rotate
        (the responder processes reload when it is a different object)."""
        return self._ocsp

    def ocsp(self, request_der: bytes) -> OcspAnswer:
        return self._ocsp.respond(request_der, self._status_lookup, self.clock.now())

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
            for i, rec in stored:
                results[i] = IssuedCertificate(rec.der, self.chain_for(rec.ca_id), rec.serial,
                                               not_after=rec.not_after)
            if log.isEnabledFor(logging.INFO):
                log.info("issued certificates", extra={
                    "count": len(stored), "serials": [rec.serial for _, rec in stored[:64]],
                    "templates": sorted({rec.template for _, rec in stored})})
        return [r if r is not None else InternalError("issuance produced no result")
                for r in results]

    def _record_for(self, outcome: SignOutcome, item: SignItem, params: IssueParams,
                    actor: str, created_at: int) -> tuple[CertificateRecord, dict[str, Any]]:
        assert outcome.der is not None
        ca_id = outcome.ca_id or self.ca_id  # the CA that signed it, even if it just rotated
        record = CertificateRecord(
            serial=format(item.serial, "x"),
            ca_id=ca_id,
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
            "ca_id": ca_id,
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
        return IssuedCertificate(record.der, self.chain_for(record.ca_id), record.serial,
                                 reused=True)

    def bundle(self) -> dict[str, Any]:
        """This trust domain's bundle (SPIFFE format): trust anchors and JWT keys."""
        return self.bundles.current(self.anchors, self.jwt.published())

    def bundle_jwks(self) -> bytes:
        return json.dumps(self.bundle(), indent=2).encode()

    def issue_server_identity(self, ttl: timedelta) -> tuple[Any, tuple[x509.Certificate, ...]]:
        """A fresh key and X509-SVID (spiffe://<td>/trustmesh/server) for the agent API,
        signed by the active CA and never outliving it."""
        slot = self._active
        now = self.clock.now()
        ttl = min(ttl, slot.authority.certificate.not_valid_after_utc - now)
        key = generate_software_key(KeyAlgorithm.EC_P256)
        csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
               .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        item = SignItem(csr=csr, template="x509-svid", validity_seconds=ttl.total_seconds(),
                        dns_names=(SERVER_DNS_NAME,),
                        uris=(f"spiffe://{self.config.trust_domain}/trustmesh/server",),
                        ip_addresses=(), path_length=None,
                        serial=x509.random_serial_number(),
                        subject=f"O=trustmesh,CN={SERVER_DNS_NAME}", names_from_csr=False)
        outcome = sign_requests(slot.authority, self.policy, [item], now)[0]
        outcome.raise_error()
        assert outcome.der is not None
        leaf = x509.load_der_x509_certificate(outcome.der)
        return key, (leaf, *slot.chain)

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
            # a retired CA's certificates have all expired: its CRL no longer matters
            self.ensure_crl(force=True, ca_id=record.ca_id)
        log.info("revoked certificate", extra={"serial": serial, "reason": reason.value,
                                               "actor": actor})
        return revoked

    def _replay_journal(self) -> None:
        fixed = self.store.apply_revocations(self.journal.entries())
        if fixed:
            log.warning("restored revocations the datastore had lost",
                        extra={"serials": fixed})

    # -- CRL -----------------------------------------------------------------
    def ensure_crl(self, *, force: bool = False, ca_id: str | None = None) -> bool:
        """Re-sign the CRL of every CA that has signed (or only ``ca_id``) when forced or
        when half its validity is gone; True when one was signed."""
        with self._lock:
            signed = False
            for slot in self._slots:
                if slot.state in _CRL_STATES and ca_id in (None, slot.ca_id):
                    signed = self._ensure_crl_for(slot, force=force) or signed
            return signed

    def _ensure_root_crl(self, slot: _Slot, now: datetime) -> None:
        """The CRL of the slot's own root (the CA certificates it revoked: none, trustmesh
        never revokes its intermediates), re-signed at half its validity. An upstream root
        is not ours to sign for."""
        if slot.upstream or len(slot.key_ids) < 2 or not slot.anchors:
            return
        crl_id = root_crl_id(slot.ca_id)
        latest = self.store.latest_crl(crl_id)
        if latest is not None:
            half = latest.this_update + (latest.next_update - latest.this_update) // 2
            if _epoch(now) < half:
                return
        root, key = slot.anchors[0], self.keys.get_key(slot.key_ids[1])
        if key is None:
            log.warning("no root key for the root CRL", extra={"ca_id": slot.ca_id})
            return
        this_update = (now - self.config.backdate).replace(microsecond=0)
        next_update = now.replace(microsecond=0) + self.config.crl_validity

        def build(number: int) -> bytes:
            return build_crl(root, key, [], number=number, this_update=this_update,
                             next_update=next_update).public_bytes(serialization.Encoding.DER)

        rec = self.store.store_crl(crl_id, this_update=_epoch(this_update),
                                   next_update=_epoch(next_update), build=build)
        self._crl_cache = None
        log.info("signed root CRL", extra={"ca_id": slot.ca_id, "number": rec.number})

    def revocation_lists(self) -> list[bytes]:
        """The current CRLs (DER) of every published CA and of its root, for validators
        that check each CA of a chain; empty unless every one is there and unexpired (a
        chain whose CRL is missing would be refused outright), so an upstream root, whose
        CRL is not ours, turns this off."""
        now = _epoch(self.clock.now())
        tick = time.monotonic()
        cached = self._crl_cache
        if cached is not None and tick - cached[0] < _CRL_CACHE_SECONDS and cached[1] > now:
            return cached[2]  # every agent asks on every sync: read the datastore once a second
        out: list[bytes] = []
        expires = now + 3600
        with self._lock:
            slots = [s for s in self._slots if s.state in _CRL_STATES]
        for slot in slots:
            if slot.upstream:
                return []
            for crl_id in (slot.ca_id, root_crl_id(slot.ca_id)):
                rec = self.store.latest_crl(crl_id)
                if rec is None or rec.next_update <= now:
                    return []
                out.append(rec.der)
                expires = min(expires, rec.next_update)
        self._crl_cache = (tick, expires, out)
        return out

    def _ensure_crl_for(self, slot: _Slot, *, force: bool) -> bool:
        with self._lock:
            now = self.clock.now()
            self._ensure_root_crl(slot, now)
            latest = self.store.latest_crl(slot.ca_id)
            if latest is not None and not force:
                half = latest.this_update + (latest.next_update - latest.this_update) // 2
                if _epoch(now) < half:
                    return False
            revoked = [
                RevokedCertificate(
                    int(r.serial, 16), _from_epoch(r.revoked_at or 0),
                    RevocationReason.parse(r.revocation_reason or "unspecified"),
                )
                for r in self.store.revoked_certificates(slot.ca_id)
            ]
            # backdated like certificates: a validator whose clock is a little behind
            # must not see a CRL that is not valid yet (it would refuse every chain)
            this_update = (now - self.config.backdate).replace(microsecond=0)
            next_update = now.replace(microsecond=0) + self.config.crl_validity
            authority = slot.authority

            def build(number: int) -> bytes:
                crl = build_crl(authority.certificate, authority.key, revoked, number=number,
                                this_update=this_update, next_update=next_update)
                return crl.public_bytes(serialization.Encoding.DER)

            rec = self.store.store_crl(slot.ca_id, this_update=_epoch(this_update),
                                       next_update=_epoch(next_update), build=build)
            self._crl_cache = None
            log.info("signed CRL", extra={"ca_id": slot.ca_id, "number": rec.number,
                                          "revoked": len(revoked)})
            return True

    def crl_der(self, ca_id: str) -> bytes:
        return self.crl_record(ca_id).der

    def crl_record(self, ca_id: str) -> CrlRecord:
        """The latest CRL of a CA (any published slot); NotFound when it has none."""
        rec = self.store.latest_crl(ca_id)
        if rec is None:
            raise NotFound(f"no CRL for CA {ca_id}")
        return rec

    def ca_certificate(self, ca_id: str) -> x509.Certificate:
        """A CA certificate of any published slot (AIA caIssuers of older certificates)."""
        for slot in self._slots:
            for cert in slot.chain:
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

        def when(dt: datetime | None) -> str | None:
            return dt.isoformat() if dt is not None else None

        active = self._active
        prop = self.config.ca_propagation
        slots = []
        for slot in self._slots:
            s = slot.schedule
            role = "upstream" if slot.upstream else "root"
            view: dict[str, Any] = {
                "state": s.state.value,
                "ca_id": slot.ca_id,
                "upstream": slot.upstream,
                "created_at": s.created_at.isoformat(),
                "prepared_at": s.prepared_at.isoformat(),
                "activated_at": when(s.activated_at),
                "deactivated_at": when(s.deactivated_at),
                "not_after": s.not_after.isoformat(),
                "chain": [info(c, r) for c, r in zip(
                    slot.chain, ["signing"] + [role] * len(slot.authority.chain), strict=True)],
            }
            if s.state is SlotState.ACTIVE:
                view["prepare_next_at"] = s.prepare_due.isoformat()
                view["activate_next_at"] = s.activate_successor_due.isoformat()
            elif s.state is SlotState.PREPARED:
                view["signs_from"] = max(active.schedule.activate_successor_due,
                                         s.prepared_at + prop).isoformat()
            elif s.state is SlotState.OLD:
                until = self._signed_until.get(slot.ca_id)
                view["retire_at"] = retire_due(s, until, prop).isoformat() if until else None
            slots.append(view)
        return {
            "trust_domain": self.config.trust_domain,
            "mode": self.config.ca_mode.value,
            "key_manager": self.keys.name,
            "ca_id": self.ca_id,
            "crl_url": self.authority.urls.crl_url,
            "ocsp_url": self.authority.urls.ocsp_url,
            "chain": slots[self._slots.index(active)]["chain"],
            "trust_anchors_pem": "".join(_pem(c) for c in self.anchors),
            "ocsp_responder": info(self.responder_certificate, "ocsp-responder"),
            "slots": slots,
            "rotation": {"intermediate_ttl_seconds": self.config.intermediate_ttl.total_seconds(),
                         "propagation_seconds": prop.total_seconds(),
                         "next_check": self._next_check.isoformat()},
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

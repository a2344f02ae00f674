"""The certificate authority rotating its X.509 CA with a clock the test moves."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID

from trustmesh.clock import FixedClock
from trustmesh.config import ServerConfig
from trustmesh.errors import ConfigError
from trustmesh.pki.ca import ca_id_of
from trustmesh.pki.keys.disk import DiskKeyManager
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.server.authority import CertificateAuthority, IssueParams, root_crl_id
from trustmesh.store.datastore import Datastore

# 60h CA: the successor is published at 30h and signs at 50h; leaves last 1h.
TTL = timedelta(hours=60)
H = timedelta(hours=1)


def make_config(tmp_path: Path, **extra: object) -> ServerConfig:
    values: dict[str, object] = {
        "data_dir": tmp_path, "intermediate_ttl": "60h", "root_ttl": "120h",
        "ca_propagation": "1h", "default_validity": "1h", "agent_svid_ttl": "1h",
        "backdate": "0s", **extra}
    return ServerConfig.build({}, values)


def open_store(config: ServerConfig) -> Datastore:
    store = Datastore(config.datastore_url)
    store.migrate()
    return store


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    config = make_config(tmp_path)
    return CertificateAuthority(config, open_store(config), MemoryKeyManager(), FixedClock())


def advance(ca: CertificateAuthority, delta: timedelta) -> None:
    clock = ca.clock
    assert isinstance(clock, FixedClock)
    clock.advance(delta)
    ca.rotate_x509()


def csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a.internal")]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def bundle_roots(ca: CertificateAuthority) -> set[str]:
    doc = ca.bundle()
    return {ca_id_of(x509.load_der_x509_certificate(base64.b64decode(k["x5c"][0])))
            for k in doc["keys"] if k["use"] == "x509-svid"}


def x509_sequence(ca: CertificateAuthority) -> int:
    """The bundle's sequence (JWT keys stay still here: nobody calls ``ca.jwt.rotate``)."""
    return int(ca.bundle()["spiffe_sequence"])


def states(ca: CertificateAuthority) -> list[str]:
    return [state for _, state in ca.slot_states()]


def ocsp_status(ca: CertificateAuthority, leaf: x509.Certificate,
                issuer: x509.Certificate) -> ocsp.OCSPCertStatus:
    req = (ocsp.OCSPRequestBuilder().add_certificate(leaf, issuer, hashes.SHA256()).build()
           .public_bytes(serialization.Encoding.DER))
    resp = ocsp.load_der_ocsp_response(ca.ocsp(req).der)
    assert resp.response_status == ocsp.OCSPResponseStatus.SUCCESSFUL
    return resp.certificate_status


def test_a_ca_goes_through_prepared_active_old_and_retired(ca: CertificateAuthority) -> None:
    first = ca.ca_id
    root1 = ca.chain[-1]
    seq1 = x509_sequence(ca)
    assert states(ca) == ["active"] and bundle_roots(ca) == {ca_id_of(root1)}

    advance(ca, 29 * H)
    assert states(ca) == ["active"] and x509_sequence(ca) == seq1
    advance(ca, 1 * H)  # 30h: the successor is prepared and published, not signing
    assert states(ca) == ["active", "prepared"]
    second = ca.slot_states()[1][0]
    seq2 = x509_sequence(ca)
    assert seq2 == seq1 + 1 and len(bundle_roots(ca)) == 2
    issued_old = ca.issue(IssueParams(csr=csr(), template="end-entity"), "t")
    assert issued_old.chain[1].subject == ca.chain[0].subject and ca.ca_id == first

    advance(ca, 19 * H)  # 49h: not yet
    assert ca.ca_id == first
    advance(ca, 1 * H)  # 50h: the successor signs; the old CA stays published
    assert ca.ca_id == second and states(ca) == ["old", "active"]
    assert x509_sequence(ca) == seq2  # same roots: no new sequence
    issued_new = ca.issue(IssueParams(csr=csr(), template="end-entity"), "t")
    assert ca.store.get_certificate(issued_new.serial).ca_id == second
    assert issued_new.chain[-1] != root1

    # the old CA's certificate still has its CRL and OCSP answers
    old_inter = issued_old.chain[1]
    assert ocsp_status(ca, issued_old.certificate, old_inter) == ocsp.OCSPCertStatus.GOOD
    ca.revoke(issued_old.serial, "superseded", "t")
    assert ocsp_status(ca, issued_old.certificate, old_inter) == ocsp.OCSPCertStatus.REVOKED
    crl = x509.load_der_x509_crl(ca.crl_der(first))
    assert crl.get_revoked_certificate_by_serial_number(int(issued_old.serial, 16))
    assert crl.is_signature_valid(old_inter.public_key())  # type: ignore[arg-type]
    assert ocsp_status(ca, issued_new.certificate, issued_new.chain[1]) == (
        ocsp.OCSPCertStatus.GOOD)
    assert ca.responder_certificate.issuer == issued_new.chain[1].subject

    # the last certificate the old CA signed ends at 31h: the old CA goes at 51h
    # (one propagation time after it stopped signing)
    advance(ca, 1 * H)
    assert states(ca) == ["active"] and bundle_roots(ca) == {ca_id_of(issued_new.chain[-1])}
    assert x509_sequence(ca) == seq2 + 1
    req = (ocsp.OCSPRequestBuilder().add_certificate(issued_old.certificate, old_inter,
                                                     hashes.SHA256()).build()
           .public_bytes(serialization.Encoding.DER))
    assert ca.ocsp(req).outcome == "unauthorized"  # no longer a CA we answer for


def test_the_old_ca_waits_for_its_longest_certificate(ca: CertificateAuthority) -> None:
    advance(ca, 30 * H)
    long_lived = ca.issue(IssueParams(csr=csr(), template="end-entity",
                                      validity=timedelta(hours=25)), "t")
    assert long_lived.certificate.not_valid_after_utc == ca.now() + 25 * H  # ends at 55h
    advance(ca, 20 * H)  # 50h: hand over
    assert states(ca) == ["old", "active"]
    advance(ca, 4 * H + timedelta(minutes=59))
    assert states(ca) == ["old", "active"]
    assert ca.describe()["slots"][0]["retire_at"] == (ca.now() + timedelta(minutes=1)
                                                      ).isoformat()
    advance(ca, timedelta(minutes=1))
    assert states(ca) == ["active"]


def test_slots_survive_a_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path, key_manager={"kind": "disk"})
    clock = FixedClock()
    first = CertificateAuthority(config, open_store(config), DiskKeyManager(tmp_path / "keys"),
                                 clock)
    clock.advance(30 * H)
    first.rotate_x509()
    before = first.slot_states()
    again = CertificateAuthority(config, open_store(config), DiskKeyManager(tmp_path / "keys"),
                                 clock)
    assert again.slot_states() == before and again.ca_id == first.ca_id
    assert again.anchors == first.anchors
    assert again.responder_certificate.issuer == first.chain[0].subject
    # while stopped, the hand-over came due: it happens at start
    clock.advance(21 * H)
    third = CertificateAuthority(config, open_store(config), DiskKeyManager(tmp_path / "keys"),
                                 clock)
    assert [s for _, s in third.slot_states()] == ["old", "active"]
    assert third.ca_id == before[1][0]


def test_a_crash_before_the_slots_are_stored_leaves_the_old_state(tmp_path: Path) -> None:
    config = make_config(tmp_path, key_manager={"kind": "disk"})
    clock = FixedClock()
    store = open_store(config)
    ca = CertificateAuthority(config, store, DiskKeyManager(tmp_path / "keys"), clock)
    stored = store.get_setting("ca.slots")
    anchors = ca.anchors

    def crash(*_: object) -> bool:
        raise RuntimeError("power cut")

    store.replace_setting = crash  # type: ignore[method-assign]
    clock.advance(30 * H)
    with pytest.raises(RuntimeError):
        ca.rotate_x509()
    # nothing was published or used: the new CA only exists once it is stored
    assert ca.anchors == anchors and states(ca) == ["active"]
    assert store.get_setting("ca.slots") == stored
    restarted = CertificateAuthority(config, open_store(config),
                                     DiskKeyManager(tmp_path / "keys"), clock)
    assert [s for _, s in restarted.slot_states()] == ["active", "prepared"]


def test_another_replica_moving_first_is_followed(tmp_path: Path) -> None:
    config = make_config(tmp_path, key_manager={"kind": "disk"})
    clock = FixedClock()
    keys = DiskKeyManager(tmp_path / "keys")  # shared keys, as an HSM would be
    a = CertificateAuthority(config, open_store(config), keys, clock)
    b = CertificateAuthority(config, open_store(config), keys, clock)
    clock.advance(30 * H)
    assert a.rotate_x509() is True
    assert b.rotate_x509() is True  # b reads a's prepared CA instead of making its own
    assert a.slot_states() == b.slot_states() and len(a.slot_states()) == 2


def test_upstream_mode_rotates_intermediates_under_the_same_root(tmp_path: Path) -> None:
    up_key = ec.generate_private_key(ec.SECP256R1())
    clock = FixedClock()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Root")])
    up = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(up_key.public_key()).serial_number(1)
          .not_valid_before(clock.now() - H).not_valid_after(clock.now() + 1000 * H)
          .add_extension(x509.BasicConstraints(ca=True, path_length=2), critical=True)
          .sign(up_key, hashes.SHA256()))
    (tmp_path / "up.pem").write_bytes(up.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "up.key").write_bytes(up_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    config = make_config(tmp_path, upstream_ca_cert=str(tmp_path / "up.pem"),
                         upstream_ca_key=str(tmp_path / "up.key"), root_ttl="1h")
    ca = CertificateAuthority(config, open_store(config), MemoryKeyManager(), clock)
    seq = x509_sequence(ca)
    first = ca.ca_id
    advance(ca, 30 * H)
    advance(ca, 20 * H)
    assert states(ca) == ["old", "active"] and ca.ca_id != first
    assert ca.anchors == (up,) and x509_sequence(ca) == seq  # the bundle is the
    assert ca.chain[1] == up  # upstream root throughout


def test_a_data_directory_from_before_rotation_is_loaded(tmp_path: Path) -> None:
    config = make_config(tmp_path, key_manager={"kind": "disk"})
    clock = FixedClock()
    store = open_store(config)
    ca = CertificateAuthority(config, store, DiskKeyManager(tmp_path / "keys"), clock)
    slot = json.loads(store.get_setting("ca.slots") or "")["slots"][0]
    legacy = {k: slot[k] for k in ("ca_id", "signing_key_id", "signing_pem", "chain_pem",
                                   "anchors_pem", "upstream", "created_at")}
    legacy["trust_domain"] = config.trust_domain
    with store.engine.begin() as conn:
        from sqlalchemy import delete

        from trustmesh.store import models
        conn.execute(delete(models.settings).where(models.settings.c.key == "ca.slots"))
    store.put_settings({"ca.state": json.dumps(legacy)})
    loaded = CertificateAuthority(config, store, DiskKeyManager(tmp_path / "keys"), clock)
    assert loaded.ca_id == ca.ca_id and states(loaded) == ["active"]


@pytest.mark.parametrize("values,message", [
    ({"intermediate_ttl": "30s"}, "too short to rotate; use at least 1m"),
    ({"intermediate_ttl": "10m", "ca_propagation": "5m", "default_validity": "1m",
      "agent_svid_ttl": "1m"}, "at least 15m"),
    ({"intermediate_ttl": "3d"}, "must be at least 6d"),
    ({"root_ttl": "7d", "intermediate_ttl": "30d"}, "shorter than intermediate_ttl"),
])
def test_a_ttl_too_short_to_rotate_is_refused(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.build({}, values)


def _crls(ca: CertificateAuthority) -> list[x509.CertificateRevocationList]:
    return [x509.load_der_x509_crl(d) for d in ca.revocation_lists()]


def test_validators_get_a_crl_for_every_published_ca_and_its_root(
        ca: CertificateAuthority) -> None:
    """Envoy's SPIFFE validator checks every CA of a chain once it has CRLs: each
    published CA and each root must have one, the prepared CA's before it signs."""
    [one, root_crl] = _crls(ca)
    assert one.issuer == ca.authority.certificate.subject
    assert one.is_signature_valid(ca.authority.certificate.public_key())  # type: ignore[arg-type]
    assert root_crl.issuer == ca.anchors[0].subject and len(root_crl) == 0
    assert root_crl.is_signature_valid(ca.anchors[0].public_key())  # type: ignore[arg-type]
    issued = ca.issue(IssueParams(csr=csr(), template="end-entity"), "t")
    ca.revoke(issued.serial, "keyCompromise", "t")
    [one, _] = _crls(ca)
    assert one.get_revoked_certificate_by_serial_number(int(issued.serial, 16)) is not None

    advance(ca, 30 * H)  # a CA is prepared: its CRLs are there before it signs
    assert states(ca) == ["active", "prepared"]
    [prepared] = [c for c, state in ca.slot_states() if state == "prepared"]
    assert ca.store.latest_crl(prepared) is not None
    assert ca.store.latest_crl(root_crl_id(prepared)) is not None
    ca.ensure_crl()  # housekeeping re-signs the active CA's CRLs, expired by now
    issuers = [c.issuer for c in _crls(ca)]
    assert len(issuers) == 4 and len(set(issuers)) == 4
    assert {a.subject for a in ca.anchors} <= set(issuers)


def test_no_crls_for_validators_once_one_has_expired(ca: CertificateAuthority) -> None:
    assert len(_crls(ca)) == 2
    clock = ca.clock
    assert isinstance(clock, FixedClock)
    clock.advance(ca.config.crl_validity + timedelta(seconds=1))  # nobody re-signed them
    assert ca.revocation_lists() == []
    ca.ensure_crl()
    assert len(_crls(ca)) == 2


def test_no_crls_for_validators_under_an_upstream_root(tmp_path: Path) -> None:
    up_key = ec.generate_private_key(ec.SECP256R1())
    clock = FixedClock()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp Root")])
    up = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(up_key.public_key()).serial_number(1)
          .not_valid_before(clock.now() - H).not_valid_after(clock.now() + 1000 * H)
          .add_extension(x509.BasicConstraints(ca=True, path_length=2), critical=True)
          .sign(up_key, hashes.SHA256()))
    (tmp_path / "up.pem").write_bytes(up.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "up.key").write_bytes(up_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    config = make_config(tmp_path, upstream_ca_cert=str(tmp_path / "up.pem"),
                         upstream_ca_key=str(tmp_path / "up.key"))
    ca = CertificateAuthority(config, open_store(config), MemoryKeyManager(), clock)
    assert ca.store.latest_crl(ca.ca_id) is not None  # its own CRL is still published
    assert ca.revocation_lists() == []  # but the upstream root's CRL is not ours

"""Batched signing: every item of a batch gets its own outcome, in order, whichever phase
refuses it, and the certificates are the ones signed one at a time would be."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.clock import FixedClock
from trustmesh.config import ServerConfig
from trustmesh.pki.keys.memory import MemoryKeyManager
from trustmesh.server import issuance
from trustmesh.server.authority import CertificateAuthority
from trustmesh.server.issuance import SignItem, sign_requests
from trustmesh.store.datastore import Datastore


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    config = ServerConfig(data_dir=tmp_path)
    store = Datastore(config.datastore_url)
    store.migrate()
    return CertificateAuthority(config, store, MemoryKeyManager(), FixedClock())


def _csr(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


def _item(csr: bytes, serial: int, **changes: Any) -> SignItem:
    fields: dict[str, Any] = {"csr": csr, "template": "end-entity", "validity_seconds": 3600.0,
                              "dns_names": (), "uris": (), "ip_addresses": (),
                              "path_length": None, "serial": serial}
    fields.update(changes)
    return SignItem(**fields)


def _tampered(csr: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[der.find(b"bad-sig.internal")] ^= 0x01  # inside the signed part
    return bytes(der)


def test_every_item_gets_its_own_outcome_whichever_phase_refuses_it(
        ca: CertificateAuthority) -> None:
    items = [
        _item(_csr("a.internal"), 101),
        _item(b"not a CSR", 102),                                     # the CSR check
        _item(_tampered(_csr("bad-sig.internal")), 103),              # the CSR check
        _item(_csr("b.internal"), 104, dns_names=("bad..name",)),     # preparing the names
        _item(_csr("c.internal"), 105, template="no-such-template"),  # preparing the template
        _item(_csr("d.internal"), 106, validity_seconds=3650 * 86400.0),  # building
        _item(_csr("e.internal"), 107, dns_names=("extra.internal",)),
    ]
    out = sign_requests(ca.authority, ca.policy, items, ca.now())
    assert len(out) == len(items)
    errors = [o.error["message"] if o.error else None for o in out]
    assert errors[0] is None and errors[6] is None
    assert "not a valid PKCS#10 CSR" in str(errors[1])
    assert "signature does not verify" in str(errors[2])
    assert "bad..name" in str(errors[3])
    assert "no-such-template" in str(errors[4])
    assert "validity" in str(errors[5])
    for index, names in ((0, ["a.internal"]), (6, ["e.internal", "extra.internal"])):
        outcome = out[index]
        assert outcome.der is not None and outcome.error is None
        cert = x509.load_der_x509_certificate(outcome.der)
        assert cert.serial_number == items[index].serial
        cert.verify_directly_issued_by(ca.authority.certificate)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == names
        assert outcome.sans == tuple(f"DNS:{n}" for n in names)
        assert outcome.subject == f"CN={names[0]}"
        assert outcome.not_after - outcome.not_before == 3600 + 60  # the backdate
        assert outcome.ca_id == ca.authority.ca_id


def test_a_batch_signs_what_single_items_sign(ca: CertificateAuthority) -> None:
    csrs = [_csr(f"svc{i}.internal") for i in range(5)]
    now = ca.now()
    batch = sign_requests(ca.authority, ca.policy,
                          [_item(c, 200 + i) for i, c in enumerate(csrs)], now)
    for i, c in enumerate(csrs):
        alone = sign_requests(ca.authority, ca.policy, [_item(c, 200 + i)], now)[0]
        assert alone.der is not None and batch[i].der is not None
        # ECDSA signatures differ from run to run; everything they sign is the same
        assert (x509.load_der_x509_certificate(alone.der).tbs_certificate_bytes
                == x509.load_der_x509_certificate(batch[i].der).tbs_certificate_bytes)
        assert (alone.subject, alone.sans, alone.not_before, alone.not_after) == (
            batch[i].subject, batch[i].sans, batch[i].not_before, batch[i].not_after)


def test_our_own_bug_fails_only_its_item_and_is_logged(
        ca: CertificateAuthority, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    real = issuance.plan_certificate

    def broken_for_one(authority: Any, request: Any, now: Any, serial: int,
                       policy: Any) -> x509.CertificateBuilder:
        if serial == 302:
            raise RuntimeError("a bug")
        return real(authority, request, now, serial, policy)

    monkeypatch.setattr(issuance, "plan_certificate", broken_for_one)
    items = [_item(_csr(f"x{i}.internal"), 300 + i) for i in range(4)]
    with caplog.at_level(logging.ERROR, logger="trustmesh.server.issuance"):
        out = sign_requests(ca.authority, ca.policy, items, ca.now() + timedelta(seconds=1))
    assert [o.error["code"] if o.error else None for o in out] == [
        None, None, "internal", None]
    assert "see the server log" in str(out[2].error)
    assert any(r.getMessage() == "signing failed" for r in caplog.records)

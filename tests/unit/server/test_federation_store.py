"""Federated bundles on the server: what an operator may set, what is stored, what agents
are given, and how a second replica on the same datastore follows."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.clock import FixedClock
from trustmesh.errors import InvalidInput, NotFound
from trustmesh.server.federation import FederationStore
from trustmesh.spiffe.bundle import Bundle
from trustmesh.spiffe.ids import TrustDomain
from trustmesh.store.datastore import Datastore


def _cert(cn: str, *, ca: bool) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime(2030, 1, 1, tzinfo=UTC)
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


def _pem(*certs: x509.Certificate) -> str:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs).decode()


@pytest.fixture
def store(tmp_path: Path) -> Datastore:
    ds = Datastore(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ds.migrate()
    return ds


@pytest.fixture
def fed(store: Datastore) -> FederationStore:
    return FederationStore(store, TrustDomain.parse("a.test"), FixedClock())


def test_a_spiffe_bundle_is_stored_canonical_and_setting_it_again_changes_nothing(
        fed: FederationStore) -> None:
    root = _cert("b root", ca=True)
    jwt_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    doc = Bundle(TrustDomain.parse("b.test"), (root,), {"k1": jwt_key}, 7).to_jwks(indent=4)
    stored, changed = fed.set_bundle("spiffe://b.test", doc, "spiffe", "alice")
    assert changed and stored.trust_domain == "b.test"
    summary = stored.summary()
    assert summary["jwt_authorities"] == ["k1"] and summary["spiffe_sequence"] == 7
    assert summary["x509_authorities"][0]["fingerprint_sha256"] == root.fingerprint(
        hashes.SHA256()).hex()
    assert summary["updated_by"] == "alice"
    again, changed = fed.set_bundle("b.test", doc.replace("    ", "  "), "spiffe", "bob")
    assert not changed and again.revision == stored.revision and again.updated_by == "alice"
    assert Bundle.parse_jwks(stored.jwks, "b.test").x509_authorities == (root,)


def test_pem_bundles_and_replacement_move_the_revision(fed: FederationStore,
                                                       store: Datastore) -> None:
    first, _ = fed.set_bundle("b.test", _pem(_cert("r1", ca=True)), "pem", "ops")
    second, changed = fed.set_bundle("b.test", _pem(_cert("r2", ca=True), _cert("r3", ca=True)),
                                     "pem", "ops")
    assert changed and second.revision > first.revision
    assert len(second.summary()["x509_authorities"]) == 2
    assert store.federation_revision() == second.revision


@pytest.mark.parametrize(("td", "data", "fmt", "field", "message"), [
    ("a.test", None, "spiffe", "trust_domain", "own trust domain"),
    ("spiffe://a.test", None, "spiffe", "trust_domain", "own trust domain"),
    ("B.Test!", None, "spiffe", "trust_domain", "is not a trust domain"),
    ("", None, "spiffe", "trust_domain", "trust domain name is required"),
    ("b.test", "", "spiffe", "bundle", "empty"),
    ("b.test", "{not json", "spiffe", None, "not valid JSON"),
    ("b.test", '{"keys": []}', "spiffe", "bundle", "no X.509 or JWT authority"),
    ("b.test", '{"kets": []}', "spiffe", "keys", "no 'keys'"),
    ("b.test", "just text", "pem", "bundle", "holds no certificate"),
    ("b.test", "LEAF", "pem", "bundle", "is not a CA certificate"),
    ("b.test", "ROOT", "der", "format", "unknown bundle format"),
])
def test_bad_bundles_are_refused_and_nothing_is_stored(
        fed: FederationStore, store: Datastore, td: str, data: str | None, fmt: str,
        field: str | None, message: str) -> None:
    text = {"LEAF": _pem(_cert("leaf", ca=False)), "ROOT": _pem(_cert("r", ca=True))}.get(
        data or "", data)
    if text is None:
        text = _pem(_cert("r", ca=True))
    with pytest.raises(InvalidInput) as err:
        fed.set_bundle(td, text, fmt, "ops")
    assert message in err.value.message
    if field is not None:
        assert err.value.field == field
    assert store.list_federated_bundles() == (0, [])


def test_delete_and_not_found(fed: FederationStore) -> None:
    fed.set_bundle("b.test", _pem(_cert("r", ca=True)), "pem", "ops")
    revision = fed.delete_bundle("spiffe://b.test", "ops")
    assert revision == 2 and fed.all() == {}
    with pytest.raises(NotFound, match="no federated bundle for trust domain b.test"):
        fed.delete_bundle("b.test", "ops")
    with pytest.raises(NotFound):
        fed.get("b.test")


def test_agents_get_only_the_trust_domains_asked_for(fed: FederationStore) -> None:
    for td in ("b.test", "c.test"):
        fed.set_bundle(td, _pem(_cert(td, ca=True)), "pem", "ops")
    given = fed.for_trust_domains(["c.test", "d.test"])
    assert list(given) == ["c.test"]
    assert json.loads(given["c.test"])["keys"][0]["use"] == "x509-svid"
    assert fed.for_trust_domains([]) == {}


def test_a_second_replica_sees_changes_through_the_revision(store: Datastore) -> None:
    one = FederationStore(store, TrustDomain.parse("a.test"), FixedClock())
    two = FederationStore(store, TrustDomain.parse("a.test"), FixedClock())
    assert two.all() == {}  # cached at revision 0
    one.set_bundle("b.test", _pem(_cert("r", ca=True)), "pem", "ops")
    assert list(two.all()) == ["b.test"]
    one.delete_bundle("b.test", "ops")
    assert two.all() == {}

"""The agent's SVID cache: selector index, rotation at half-life, no expired SVIDs."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from trustmesh.agent.cache import CachedEntry, CachedSvid, SvidCache, rotation_due
from trustmesh.agent.node_store import load_node, save_node
from trustmesh.agent.server_client import NodeCredentials

KEY = ec.generate_private_key(ec.SECP256R1())


def entry(i: int, *selectors: str, revision: int = 1) -> CachedEntry:
    return CachedEntry(id=f"e{i}", spiffe_id=f"spiffe://td/w{i}", parent_id="spiffe://td/n",
                       selectors=frozenset(selectors), x509_svid_ttl=3600, jwt_svid_ttl=300,
                       dns_names=(), federates_with=(), hint="", revision=revision)


def svid(e: CachedEntry, start: float, life: float) -> CachedSvid:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(KEY.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(datetime.fromtimestamp(start, UTC))
            .not_valid_after(datetime.fromtimestamp(start + life, UTC))
            .sign(KEY, hashes.SHA256()))
    return CachedSvid(e.id, e.revision, e.spiffe_id, KEY, (cert,))


def test_rotation_at_half_life() -> None:
    assert not rotation_due(0, 100, 49.9)
    assert rotation_due(0, 100, 50)


def test_all_selectors_of_an_entry_must_match() -> None:
    cache = SvidCache()
    cache.apply_changes([entry(1, "unix:uid:1"), entry(2, "unix:uid:1", "unix:gid:2"),
                         entry(3, "unix:uid:3")], [], 3)
    ids = [e.id for e in cache.match(["unix:uid:1"])]
    assert ids == ["e1"]
    assert [e.id for e in cache.match(["unix:uid:1", "unix:gid:2", "x:y"])] == ["e1", "e2"]
    assert cache.match(["unix:gid:2"]) == []


def test_updates_and_removals_keep_the_index_exact() -> None:
    cache = SvidCache()
    cache.apply_changes([entry(1, "unix:uid:1")], [], 1)
    cache.apply_changes([entry(1, "unix:uid:9", revision=2)], [], 2)
    assert cache.match(["unix:uid:1"]) == []
    assert [e.id for e in cache.match(["unix:uid:9"])] == ["e1"]
    gen = cache.generation
    assert cache.apply_changes([entry(1, "unix:uid:9", revision=2)], [], 2) is False
    assert cache.generation == gen  # same entry again: nothing changed
    cache.apply_changes([], ["e1"], 3)
    assert cache.match(["unix:uid:9"]) == [] and cache.revision == 3


def test_due_for_missing_old_or_outdated_svids() -> None:
    cache = SvidCache()
    e1, e2, e3 = entry(1, "a:1"), entry(2, "a:2"), entry(3, "a:3")
    cache.apply_changes([e1, e2, e3], [], 3)
    now = 1_900_000_000.0
    cache.store([svid(e1, now - 10, 100), svid(e2, now - 60, 100)])
    assert cache.due(now) == ["e2", "e3"]  # e2 is past half-life, e3 has none
    cache.apply_changes([entry(1, "a:1", revision=7)], [], 7)
    assert "e1" in cache.due(now)  # the entry changed after its SVID was signed


def test_expired_svids_are_never_served() -> None:
    cache = SvidCache()
    e1 = entry(1, "a:1")
    cache.apply_changes([e1], [], 1)
    now = 1_900_000_000.0
    cache.store([svid(e1, now - 100, 50)])
    assert cache.svids_for(["a:1"], now) == []
    assert cache.expire(now) == ["e1"] and cache.svids == {}


def test_svids_for_unknown_entries_are_not_stored() -> None:
    cache = SvidCache()
    cache.store([svid(entry(5, "a:5"), 0, 10)])
    assert cache.svids == {}


def test_node_svid_renewal_counts_from_receipt_not_from_the_backdated_not_before(
        tmp_path: Path) -> None:
    # a 15 s node SVID whose notBefore the server backdated by 60 s: half of
    # notBefore..notAfter is gone on arrival, half of its real life is not
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "node")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(KEY.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(datetime.fromtimestamp(1000 - 60, UTC))
            .not_valid_after(datetime.fromtimestamp(1000 + 15, UTC))
            .sign(KEY, hashes.SHA256()))
    node = NodeCredentials("spiffe://td/node", KEY, (cert,), received_at=1000.0)
    assert rotation_due(node.issued_at, node.expires_at, 1001)  # the old, wrong start
    assert not rotation_due(node.lifetime_start, node.expires_at, 1007)
    assert rotation_due(node.lifetime_start, node.expires_at, 1007.5)
    # a receipt time outside the certificate's validity is clamped to it
    assert NodeCredentials("n", KEY, (cert,), received_at=0.0).lifetime_start == 940.0
    assert NodeCredentials("n", KEY, (cert,), received_at=9e9).lifetime_start == 1015.0
    assert NodeCredentials("n", KEY, (cert,)).lifetime_start == 940.0
    # stored and loaded again: the receipt time is when the file was written
    save_node(tmp_path, node)
    os.utime(tmp_path / "node.pem", (1003.0, 1003.0))
    loaded = load_node(tmp_path)
    assert loaded is not None and loaded.lifetime_start == 1003.0

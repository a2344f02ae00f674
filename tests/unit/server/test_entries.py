"""Registration entry input: every field checked, errors name the field."""

from __future__ import annotations

from typing import Any

import pytest

from trustmesh.errors import InvalidInput
from trustmesh.server.entries import (
    Entry,
    Selector,
    entries_for_agent,
    entry_from_input,
    parse_selector,
)
from trustmesh.spiffe.ids import SpiffeId, TrustDomain

TD = TrustDomain.parse("example.org")
BASE: dict[str, Any] = {
    "spiffe_id": "spiffe://example.org/ns/web/sa/frontend",
    "parent_id": "spiffe://example.org/node1",
    "selectors": ["unix:uid:1000"],
}


def make(**changes: Any) -> Entry:
    return entry_from_input({**BASE, **changes}, TD)


def test_defaults_and_round_trip() -> None:
    e = make(dns_names=["Web.Internal"], labels={"app": "web"}, hint="frontend")
    assert e.x509_svid_ttl == 3600 and e.jwt_svid_ttl == 300
    assert e.dns_names == ("web.internal",)
    assert Entry.from_json(e.to_json()) == e
    assert e.selectors == (Selector("unix", "uid:1000"),)


def test_selectors_are_deduplicated_and_sorted() -> None:
    e = make(selectors=["unix:uid:1000", "docker:label:a:b", "unix:uid:1000"])
    assert [str(s) for s in e.selectors] == ["docker:label:a:b", "unix:uid:1000"]


def test_ttls_accept_durations_and_seconds() -> None:
    assert make(x509_svid_ttl="2h").x509_svid_ttl == 7200
    assert make(jwt_svid_ttl=60).jwt_svid_ttl == 60


@pytest.mark.parametrize("changes,field,match", [
    ({"spiffe_id": "spiffe://Example.org/x"}, "spiffe_id", ""),
    ({"spiffe_id": "https://example.org/x"}, "spiffe_id", ""),
    ({"spiffe_id": "spiffe://other.org/x"}, "spiffe_id", "not in this server's trust domain"),
    ({"spiffe_id": "spiffe://example.org"}, "spiffe_id", "trust domain itself"),
    ({"parent_id": None}, "parent_id", "required"),
    ({"parent_id": "spiffe://example.org/ns/web/sa/frontend"}, "parent_id", "its own parent"),
    ({"selectors": []}, "selectors", "at least one selector"),
    ({"selectors": ["uid1000"]}, "selectors[0]", "has no type"),
    ({"selectors": [":1000"]}, "selectors[0]", "has no type"),
    ({"selectors": ["unix:"]}, "selectors[0]", "empty value"),
    ({"selectors": ["Unix:uid:1"]}, "selectors[0]", "lower-case"),
    ({"selectors": "unix:uid:1"}, "selectors", "list of strings"),
    ({"x509_svid_ttl": 0}, "x509_svid_ttl", "between"),
    ({"x509_svid_ttl": "soon"}, "x509_svid_ttl", "invalid duration"),
    ({"jwt_svid_ttl": True}, "jwt_svid_ttl", "number of seconds"),
    ({"dns_names": ["bad name"]}, "dns_names[0]", "whitespace"),
    ({"federates_with": ["example.org"]}, "federates_with[0]", "its own trust domain"),
    ({"federates_with": ["BAD"]}, "federates_with[0]", ""),
    ({"labels": {"bad key!": "x"}}, "labels.bad key!", "not valid"),
    ({"admin": "yes"}, "admin", "true or false"),
    ({"colour": "blue"}, "colour", "unknown field"),
])
def test_bad_input_names_the_field(changes: dict[str, Any], field: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match or None) as info:
        make(**changes)
    assert info.value.field == field


def test_errors_in_bulk_input_carry_the_entry_index() -> None:
    with pytest.raises(InvalidInput) as info:
        entry_from_input({**BASE, "selectors": ["nope"]}, TD, where="entries[3]")
    assert info.value.field == "entries[3].selectors[0]"


def test_parse_selector_keeps_colons_in_the_value() -> None:
    assert parse_selector("k8s:pod-label:app:web") == Selector("k8s", "pod-label:app:web")


def test_entries_for_agent_follows_parent_chains() -> None:
    node = SpiffeId.parse("spiffe://example.org/node1")
    a = make(spiffe_id="spiffe://example.org/a", parent_id=str(node))
    b = make(spiffe_id="spiffe://example.org/b", parent_id="spiffe://example.org/a")
    c = make(spiffe_id="spiffe://example.org/c", parent_id="spiffe://example.org/b")
    other = make(spiffe_id="spiffe://example.org/d", parent_id="spiffe://example.org/node2")
    got = {str(e.spiffe_id) for e in entries_for_agent(node, [c, other, b, a])}
    assert got == {"spiffe://example.org/a", "spiffe://example.org/b", "spiffe://example.org/c"}

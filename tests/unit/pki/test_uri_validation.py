"""URI and DNS SANs: checked once per distinct string, refused every time when bad."""

from __future__ import annotations

import pytest

from trustmesh.errors import InvalidInput
from trustmesh.pki import csr


@pytest.mark.parametrize("uri", [
    "spiffe://example.org/ns/a/../b",  # dot segment
    "spiffe://Example.org/w",  # upper-case trust domain
    "spiffe://example.org/w?x=1",  # query
    "spiffe://example.org/w%41",  # percent-encoding
    "spiffe://example.org/",  # trailing slash
    "no-scheme",
    "https://host/with space",
])
def test_a_bad_uri_is_refused_every_time_it_comes(uri: str) -> None:
    for _ in range(2):  # a refusal is never remembered as a pass
        with pytest.raises(InvalidInput):
            csr.validate_uri(uri)
    assert uri not in csr._VALID_URIS


def test_a_good_uri_is_remembered_and_the_memory_stays_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(csr, "_VALID_URIS", set())
    monkeypatch.setattr(csr, "_REMEMBER_AT_MOST", 4)
    assert csr.validate_uri("spiffe://example.org/w0") == "spiffe://example.org/w0"
    assert "spiffe://example.org/w0" in csr._VALID_URIS
    for i in range(1, 10):
        csr.validate_uri(f"spiffe://example.org/w{i}")
        assert len(csr._VALID_URIS) <= 4
    assert csr.validate_uri("https://example.org/x") == "https://example.org/x"


@pytest.mark.parametrize("name", ["", "bad name", "a..b", "-x.example", "*.com", "x.*.example",
                                  "trailing.dot.", "a" * 64 + ".example"])
def test_a_bad_dns_name_is_refused_every_time_it_comes(name: str) -> None:
    for _ in range(2):
        with pytest.raises(InvalidInput):
            csr.validate_dns_name(name)
    assert name not in csr._VALID_DNS_NAMES


def test_a_good_dns_name_is_remembered_in_its_checked_form() -> None:
    assert csr.validate_dns_name("Web.Example.ORG") == "web.example.org"
    assert csr._VALID_DNS_NAMES["Web.Example.ORG"] == "web.example.org"
    assert csr.validate_dns_name("Web.Example.ORG") == "web.example.org"
    assert csr.validate_dns_name("*.svc.example") == "*.svc.example"

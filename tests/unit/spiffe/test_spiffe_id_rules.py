"""One test per rule of the SPIFFE-ID specification."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trustmesh.errors import InvalidInput
from trustmesh.spiffe.ids import SpiffeId, TrustDomain

VALID = [
    "spiffe://example.org",
    "spiffe://example.org/ns/default/sa/web",
    "spiffe://a-b_c.d0/Path.With-Mixed_Case/0",
    "spiffe://x/" + "a" * 2030,
]


@pytest.mark.parametrize("text", VALID)
def test_valid_ids_round_trip(text: str) -> None:
    sid = SpiffeId.parse(text)
    assert str(sid) == text and SpiffeId.parse(str(sid)) == sid


@pytest.mark.parametrize("text,match", [
    ("", "empty"),
    ("example.org/x", "starts with 'spiffe://'"),
    ("https://example.org/x", "scheme must be 'spiffe'"),
    ("SPIFFE://example.org/x", "lower case"),
    ("spiffe:///x", "trust domain is missing"),
    ("spiffe://", "trust domain is missing"),
])
def test_scheme_and_trust_domain_presence(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        SpiffeId.parse(text)


def test_trust_domain_must_be_lower_case() -> None:
    with pytest.raises(InvalidInput, match="upper-case character 'E' at position 9"):
        SpiffeId.parse("spiffe://Example.org/x")


@pytest.mark.parametrize("text,match", [
    ("spiffe://example.org:8080/x", "no port"),
    ("spiffe://user@example.org/x", "no user info"),
    ("spiffe://exa%6Dple.org/x", "percent-encoding"),
    ("spiffe://exa mple.org/x", "character ' '"),
])
def test_trust_domain_characters(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        SpiffeId.parse(text)


def test_trust_domain_length_limit() -> None:
    SpiffeId.parse("spiffe://" + "a" * 255)
    with pytest.raises(InvalidInput, match="longer than 255"):
        SpiffeId.parse("spiffe://" + "a" * 256)


@pytest.mark.parametrize("text,match", [
    ("spiffe://example.org/", "must not end with '/'"),
    ("spiffe://example.org/a//b", "empty segment"),
    ("spiffe://example.org/a/./b", "'.' is not allowed"),
    ("spiffe://example.org/a/../b", "'..' is not allowed"),
    ("spiffe://example.org/a%20b", "percent-encoding"),
    ("spiffe://example.org/a b", "character ' '"),
    ("spiffe://example.org/a?x=1", "query"),
    ("spiffe://example.org/a#frag", "fragment"),
])
def test_path_rules(text: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        SpiffeId.parse(text)


def test_total_length_limit() -> None:
    with pytest.raises(InvalidInput, match="at most 2048 bytes"):
        SpiffeId.parse("spiffe://x/" + "a" * 2040)


def test_trust_domain_parse_forms() -> None:
    assert TrustDomain.parse("example.org") == TrustDomain.parse("spiffe://example.org")
    assert str(TrustDomain.parse("example.org").id) == "spiffe://example.org"
    with pytest.raises(InvalidInput, match="with a path"):
        TrustDomain.parse("spiffe://example.org/x")


def test_membership_and_segments() -> None:
    sid = SpiffeId.from_segments("example.org", "ns", "web")
    assert str(sid) == "spiffe://example.org/ns/web"
    assert sid.member_of(TrustDomain("example.org"))
    assert not sid.member_of(TrustDomain("other.org"))
    with pytest.raises(InvalidInput):
        SpiffeId.from_segments("example.org", "a/b", "..")


@given(st.text(max_size=80))
def test_parser_raises_only_invalid_input(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except InvalidInput:
        return
    assert str(sid) == text


_seg = st.text(alphabet="abcXYZ019.-_", min_size=1, max_size=8).filter(
    lambda s: s not in (".", ".."))


@given(st.text(alphabet="abc019.-_", min_size=1, max_size=20), st.lists(_seg, max_size=5))
def test_generated_valid_ids_round_trip(td: str, segments: list[str]) -> None:
    sid = SpiffeId.from_segments(td, *segments)
    assert SpiffeId.parse(str(sid)) == sid

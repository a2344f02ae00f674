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


# --- One test per rule of the SPIFFE-ID specification, named after the rule. ---------------

def test_scheme_must_be_spiffe() -> None:
    for text in ("https://example.org/x", "spiffy://example.org/x", "urn:spiffe:example.org"):
        with pytest.raises(InvalidInput):
            SpiffeId.parse(text)


def test_scheme_must_be_lower_case() -> None:
    with pytest.raises(InvalidInput, match="lower case"):
        SpiffeId.parse("Spiffe://example.org/x")


def test_scheme_must_be_followed_by_double_slash() -> None:
    for text in ("spiffe:example.org/x", "spiffe:/example.org/x"):
        with pytest.raises(InvalidInput, match="starts with 'spiffe://'"):
            SpiffeId.parse(text)


def test_trust_domain_must_not_be_empty() -> None:
    with pytest.raises(InvalidInput, match="trust domain is missing"):
        SpiffeId.parse("spiffe:///path")
    with pytest.raises(InvalidInput, match="trust domain is missing"):
        TrustDomain.parse("")


def test_trust_domain_must_not_have_a_port() -> None:
    with pytest.raises(InvalidInput, match="no port at position 20"):
        SpiffeId.parse("spiffe://example.org:443/x")


def test_trust_domain_must_not_have_userinfo() -> None:
    with pytest.raises(InvalidInput, match="no user info"):
        SpiffeId.parse("spiffe://user:pass@example.org/x")


def test_trust_domain_must_not_be_percent_encoded() -> None:
    with pytest.raises(InvalidInput, match="percent-encoding"):
        TrustDomain.parse("ex%41mple.org")


@pytest.mark.parametrize("ch", list("!$&'()*+,;=[]~ ") + ["\u00e9", "\n"])
def test_trust_domain_allows_only_lower_case_letters_digits_dot_dash_underscore(ch: str) -> None:
    with pytest.raises(InvalidInput, match="trust domain contains"):
        TrustDomain.parse(f"ex{ch}ample.org")


def test_trust_domain_is_at_most_255_characters() -> None:
    assert len(TrustDomain.parse("a" * 255).name) == 255
    with pytest.raises(InvalidInput, match="longer than 255"):
        TrustDomain.parse("a" * 256)


def test_path_segments_must_not_be_empty() -> None:
    with pytest.raises(InvalidInput, match="empty segment"):
        SpiffeId.parse("spiffe://example.org//x")


def test_path_must_not_have_a_trailing_slash() -> None:
    with pytest.raises(InvalidInput, match="must not end with '/'"):
        SpiffeId.parse("spiffe://example.org/x/")


@pytest.mark.parametrize("seg", [".", ".."])
def test_path_must_not_contain_dot_segments(seg: str) -> None:
    with pytest.raises(InvalidInput, match=f"path segment '{seg}' is not allowed"):
        SpiffeId.parse(f"spiffe://example.org/a/{seg}/b")
    with pytest.raises(InvalidInput, match="is not allowed"):
        SpiffeId.parse(f"spiffe://example.org/{seg}")


def test_path_segments_may_contain_dots_within_names() -> None:
    assert SpiffeId.parse("spiffe://example.org/.hidden/a..b/...").segments == (
        ".hidden", "a..b", "...")


@pytest.mark.parametrize("ch", list("!$&'()*+,;=:@~% ") + ["\u00e9"])
def test_path_allows_only_letters_digits_dot_dash_underscore(ch: str) -> None:
    with pytest.raises(InvalidInput):
        SpiffeId.parse(f"spiffe://example.org/a{ch}b")


def test_path_may_use_upper_case() -> None:
    assert SpiffeId.parse("spiffe://example.org/Ns/Default").path == "/Ns/Default"


def test_spiffe_ids_must_not_have_a_query() -> None:
    with pytest.raises(InvalidInput, match="must not have a query"):
        SpiffeId.parse("spiffe://example.org/x?y=1")


def test_spiffe_ids_must_not_have_a_fragment() -> None:
    with pytest.raises(InvalidInput, match="must not have a fragment"):
        SpiffeId.parse("spiffe://example.org/x#y")


def test_spiffe_ids_are_at_most_2048_bytes() -> None:
    base = "spiffe://example.org/"
    SpiffeId.parse(base + "a" * (2048 - len(base)))
    with pytest.raises(InvalidInput, match="at most 2048 bytes"):
        SpiffeId.parse(base + "a" * (2049 - len(base)))


def test_trust_domain_id_has_no_path() -> None:
    sid = SpiffeId.parse("spiffe://example.org")
    assert sid.is_trust_domain_id and sid.segments == () and sid == TrustDomain("example.org").id


# The spec's valid/invalid examples, as one table.
SPEC_TABLE = [
    ("spiffe://example.org/service", True),
    ("spiffe://staging.example.org/payments/mysql", True),
    ("spiffe://k8s-west.example.org/ns/staging/sa/default", True),
    ("spiffe://example_with_underscore.org/x", True),
    ("spiffe://example.org", True),
    ("spiffe://EXAMPLE.org/service", False),
    ("spiffe://example.org:8080/service", False),
    ("spiffe://user@example.org/service", False),
    ("spiffe://example.org/service/", False),
    ("spiffe://example.org/./service", False),
    ("spiffe://example.org/../service", False),
    ("spiffe://example.org//service", False),
    ("spiffe://example.org/service?query", False),
    ("spiffe://example.org/service#fragment", False),
    ("spiffe://example.org/%41", False),
    ("spiffe://", False),
    ("example.org/service", False),
    ("", False),
]


@pytest.mark.parametrize("text,valid", SPEC_TABLE)
def test_spec_examples(text: str, valid: bool) -> None:
    if valid:
        assert str(SpiffeId.parse(text)) == text
    else:
        with pytest.raises(InvalidInput):
            SpiffeId.parse(text)


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidInput, match="upper-case"):
        TrustDomain("Example.org")
    with pytest.raises(InvalidInput, match="'..' is not allowed"):
        SpiffeId(TrustDomain("example.org"), "/a/..")
    with pytest.raises(InvalidInput, match="starts with '/'"):
        SpiffeId(TrustDomain("example.org"), "a")


def test_from_segments_refuses_slashes_inside_a_segment() -> None:
    with pytest.raises(InvalidInput, match="contains '/'"):
        SpiffeId.from_segments("example.org", "a/b")


def test_ids_are_hashable_and_ordered() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    b = SpiffeId.parse("spiffe://example.org/b")
    assert len({a, SpiffeId.parse(str(a)), b}) == 2
    assert sorted([b, a]) == [a, b]
    assert TrustDomain("a.org") < TrustDomain("b.org")

"""The request path AuthorizationPolicy paths are matched against: what Envoy's inbound HTTP
connection manager (normalize_path, merge_slashes, escaped slashes unescaped) hands to the
RBAC filter, query left out. The rows were observed on the pinned Envoy (escaped slashes:
after following its redirect); the integration test checks generated paths against it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.policy.authz import normalise_path


@pytest.mark.parametrize(("sent", "seen"), [
    ("/admin/x", "/admin/x"),
    ("/", "/"),
    ("", "/"),
    # the query and the fragment are not part of the path
    ("/api/x?y=/admin", "/api/x"), ("/?x", "/"), ("/a#frag", "/a"),
    # dot segments (RFC 3986 5.2.4), also percent-encoded
    ("/api/../admin/x", "/admin/x"), ("/./admin", "/admin"), ("/admin/.", "/admin/"),
    ("/a/b/../../admin/x", "/admin/x"), ("/../admin/x", "/admin/x"), ("/..", "/"),
    ("/.", "/"), ("/a/..", "/"), ("/a/b/..", "/a/"), ("/%2e%2e/admin/x", "/admin/x"),
    ("/a/%2E%2E/b", "/b"), ("/a/.%2e/b", "/b"), ("/%2E", "/"), ("/a/%2e%2E", "/"),
    ("/a/...", "/a/..."), ("/a/.b", "/a/.b"), ("/a/b.", "/a/b."), ("/a/.../b", "/a/.../b"),
    # a dot segment with parameters counts as one; an escaped dot before ';' does not
    ("/a/..;/b", "/b"), ("/a/..;x/b", "/b"), ("/a/.;/b", "/a/b"), ("/a/%2e;/b", "/a/.;/b"),
    ("/a/.%3b/b", "/a/.%3b/b"), ("/a/b;x/..", "/a/"), ("/a/;/b", "/a/;/b"),
    ("/admin/x;p=1", "/admin/x;p=1"),
    # runs of slashes are merged, after dot segments are resolved
    ("//admin//x", "/admin/x"), ("/a//../b", "/a/b"), ("//../a", "/a"),
    ("/a///b/./../c", "/a/c"),
    # escapes of unreserved characters are decoded, others kept as written
    ("/%61dmin/x", "/admin/x"), ("/%41dmin/x", "/Admin/x"), ("/admin/%7Ex", "/admin/~x"),
    ("/a/%7e", "/a/~"), ("/a/%2d%5F%2E", "/a/-_."), ("/a/%7E%41%5a%30", "/a/~AZ0"),
    ("/a/%20b", "/a/%20b"), ("/a/%C3%A9", "/a/%C3%A9"), ("/a/%25", "/a/%25"),
    ("/a/%3a", "/a/%3a"), ("/admin/%zz", "/admin/%zz"), ("/a/%4", "/a/%4"), ("/a/%", "/a/%"),
    ("/a/%%41", "/a/%A"), ("/a/b%2", "/a/b%2"),
    # characters Envoy escapes; others left alone
    ('/a/"x', "/a/%22x"), ("/a/<x>", "/a/%3Cx%3E"), ("/a/{x}", "/a/%7Bx%7D"),
    ("/a/|^`", "/a/%7C%5E%60"), ("/a/:@!$&()*+,;=", "/a/:@!$&()*+,;="), ("/a/'x", "/a/'x"),
    # backslashes are slashes; escaped slashes redirect to the unescaped path
    ("/admin\\x", "/admin/x"), ("/a/%2f", "/a/"), ("/a/x%5Cy", "/a/x/y"),
    ("/a%2f..%2fb", "/b"), ("/a/%5c../b", "/a/b"),
    # case is kept
    ("/ADMIN/x", "/ADMIN/x"),
])
def test_paths_as_envoy_normalises_them(sent: str, seen: str) -> None:
    assert normalise_path(sent) == seen


_pieces = st.sampled_from(["a", "Z", ".", "..", "%2e", "%2E", "", "%41", "%7e", "%2f", "%5C",
                           "\\", ";", "x;p", "..;", "%", "%zz", "?", "#", "~", '"', "%20"])


@settings(max_examples=300)
@given(st.lists(_pieces, max_size=8).map(lambda parts: "/" + "/".join(parts)))
def test_normalised_paths_are_canonical(path: str) -> None:
    once = normalise_path(path)
    assert normalise_path(once) == once  # a normalised path stays as it is
    assert once.startswith("/") and "//" not in once
    assert "?" not in once and "#" not in once and "\\" not in once
    assert not {".", ".."} & set(once.split("/"))

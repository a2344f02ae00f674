"""The lean HTTP reader of the OCSP responder processes: bytes in, decisions out."""

from __future__ import annotations

import base64
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.server.ocsp_http import (
    MAX_BODY,
    MAX_HEAD,
    NEED_MORE,
    Forward,
    OcspCall,
    Refusal,
    ocsp_response_bytes,
    read_request,
    refusal_bytes,
)

DER = bytes(range(100))


def post(body: bytes = DER, *, version: bytes = b"HTTP/1.0", extra: bytes = b"",
         ctype: bytes = b"application/ocsp-request") -> bytes:
    return (b"POST /ocsp " + version + b"\r\nHost: x\r\nContent-Type: " + ctype
            + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n"
            + body)


def test_post_as_openssl_sends_it() -> None:
    call = read_request(post())
    assert call == OcspCall(DER, keep_alive=False, consumed=len(post()))


@pytest.mark.parametrize("cut", [0, 10, 30, len(post()) - 50, len(post()) - 1])
def test_incomplete_request_waits_for_more(cut: int) -> None:
    assert read_request(post()[:cut]) is NEED_MORE


def test_bare_lf_line_ends_are_accepted() -> None:
    raw = post().replace(b"\r\n", b"\n")
    assert isinstance(read_request(raw), OcspCall)


def test_get_form_decodes_url_encoded_base64() -> None:
    encoded = quote(base64.b64encode(DER).decode(), safe="")
    call = read_request(f"GET /ocsp/{encoded} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert isinstance(call, OcspCall) and call.der == DER and call.keep_alive
    assert call.get  # a GET: its answer may carry caching headers


def test_a_post_is_not_marked_as_a_get() -> None:
    call = read_request(post())
    assert isinstance(call, OcspCall) and not call.get


def test_get_form_with_slashes_unescaped() -> None:
    raw_b64 = base64.b64encode(b"\xff" * 30).decode()  # contains '/'
    assert "/" in raw_b64
    call = read_request(f"GET /ocsp/{raw_b64} HTTP/1.0\r\n\r\n".encode())
    assert isinstance(call, OcspCall) and call.der == b"\xff" * 30


def test_get_form_that_is_not_base64_is_answered_as_malformed() -> None:
    call = read_request(b"GET /ocsp/!!!notbase64 HTTP/1.0\r\n\r\n")
    assert isinstance(call, OcspCall) and call.der == b""


def test_keep_alive_rules_of_http_1_0_and_1_1() -> None:
    assert read_request(post(version=b"HTTP/1.1")).keep_alive  # type: ignore[union-attr]
    closing = read_request(post(version=b"HTTP/1.1", extra=b"Connection: close\r\n"))
    assert not closing.keep_alive  # type: ignore[union-attr]
    kept = read_request(post(extra=b"Connection: Keep-Alive\r\n"))
    assert kept.keep_alive  # type: ignore[union-attr]


def test_pipelined_requests_are_read_one_at_a_time() -> None:
    first = post(version=b"HTTP/1.1")
    call = read_request(first + first[:20])
    assert isinstance(call, OcspCall) and call.consumed == len(first)


def test_other_routes_are_forwarded_with_connection_close() -> None:
    fwd = read_request(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n"
                       b"Accept: */*\r\n\r\n")
    assert isinstance(fwd, Forward)
    assert fwd.request == (b"GET /healthz HTTP/1.1\r\nhost: x\r\naccept: */*\r\n"
                           b"Connection: close\r\n\r\n")


def test_absolute_form_target() -> None:
    call = read_request(post().replace(b"POST /ocsp", b"POST http://ca.example:8080/ocsp"))
    assert isinstance(call, OcspCall)


@pytest.mark.parametrize(("raw", "status"), [
    (b"garbage\r\n\r\n", 400),
    (b"GET  HTTP/1.1\r\n\r\n", 400),
    (b"G(T /ocsp HTTP/1.1\r\n\r\n", 400),
    (b"GET /ocsp/x HTTP/2.0\r\n\r\n", 505),
    (b"GET /ocsp/x SPDY/3\r\n\r\n", 400),
    (b"GET /ocsp/x HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /ocsp/x HTTP/1.1\r\n folded: value\r\n\r\n", 400),
    (b"GET /ocsp/x HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET /ocsp/x HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    (b"GET ocsp HTTP/1.1\r\n\r\n", 400),
    (b"GET /ocsp HTTP/1.1\r\n\r\n", 405),
    (b"PUT /ocsp/abc HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"POST /ocsp HTTP/1.1\r\n\r\n", 411),
    (b"POST /ocsp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST /ocsp HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /ocsp HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"POST /ocsp HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n", 413),
    (post(ctype=b"text/plain"), 415),
    (b"GET /" + b"a" * (MAX_HEAD + 1), 414),
    (b"GET /" + b"a" * (MAX_HEAD + 1) + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * (MAX_HEAD // 6 + 1), 431),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 100 + b"\r\n", 431),
    (b"GET /ocsp/" + b"A" * (MAX_BODY + 4) + b" HTTP/1.1\r\n\r\n", 414),
])
def test_malformed_or_oversized_requests_are_refused(raw: bytes, status: int) -> None:
    refusal = read_request(raw)
    assert isinstance(refusal, Refusal), refusal
    assert refusal.status == status
    response = refusal_bytes(refusal)
    assert response.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close\r\n" in response


def test_405_names_the_allowed_method() -> None:
    refusal = read_request(b"GET /ocsp HTTP/1.1\r\n\r\n")
    assert isinstance(refusal, Refusal)
    assert b"Allow: POST\r\n" in refusal_bytes(refusal)


def test_response_framing() -> None:
    assert ocsp_response_bytes(b"abc", keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\n"
        b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")
    assert b"Connection: keep-alive" in ocsp_response_bytes(b"abc", keep_alive=True)
    with_headers = ocsp_response_bytes(b"abc", keep_alive=False,
                                       headers=[("ETag", '"x"'), ("Cache-Control", "public")])
    assert with_headers == (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\n"
        b'ETag: "x"\r\nCache-Control: public\r\n'
        b"Content-Length: 3\r\nConnection: close\r\n\r\nabc")


_CTL_BYTES = bytes([*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F])  # all but HTAB and LF
_TOKEN_BYTES = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _expected_field_refusal(fields: list[tuple[bytes, bytes]]) -> Refusal | None:
    """The rule, line by line: the first line without a token name and a colon, or with
    a control character in its value once spaces, tabs and CRs are trimmed, refuses."""
    for name, value in fields:
        if not name or any(c not in _TOKEN_BYTES for c in name):
            return Refusal(400, "malformed header field")
        if any(c in _CTL_BYTES for c in value.strip(b" \t\r")):
            return Refusal(400, "control character in a header field")
    return None


@settings(max_examples=800, deadline=None)
@given(fields=st.lists(st.tuples(
    st.sampled_from([b"X-Test", b"Accept", b"Connection", b"Bad Name", b"", b"(x)",
                     b" Folded", b"X\x7f"]),
    st.binary(max_size=12).map(lambda b: bytes(
        b"a \t\r\x00\x01\x0b\x1f\x7f\xe9"[x % 10] for x in b))), max_size=5),
       line_end=st.sampled_from([b"\r\n", b"\n"]))
def test_header_lines_are_refused_by_the_first_bad_one_checked_at_once_or_line_by_line(
        fields: list[tuple[bytes, bytes]], line_end: bytes) -> None:
    # with CRLF line ends the reader checks the whole block with one expression first
    # and skips the per-line checks when it passes; it must decide as the rule does
    head = b"".join(name + b": " + value + line_end for name, value in fields)
    decision = read_request(b"POST /ocsp HTTP/1.0" + line_end + b"Content-Length: 2" + line_end
                            + head + line_end + b"hi")
    expected = _expected_field_refusal(fields)
    if expected is not None:
        assert decision == expected
    else:
        assert isinstance(decision, OcspCall) and decision.der == b"hi"

"""The lean HTTP/1.x reader of the OCSP responder processes: bytes in, a decision out.

No IO here (the shape of h11): ``read_request`` looks at what a connection has
sent so far and says whether to wait for more, answer an OCSP request, hand the
request to the server's full HTTP app, or refuse it. Only the two forms OCSP
clients use are answered here (RFC 6960 A.1): ``POST /ocsp`` with a
Content-Length body and ``GET /ocsp/<url-encoded base64 DER>``. Every other
well-formed request (``/healthz``, ``/metrics``, ``/crl/...``, ``/ca/...``) is
forwarded; anything malformed or over a limit gets a 4xx/5xx and the connection
is closed.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote_to_bytes

__all__ = [
    "MAX_BODY",
    "MAX_HEAD",
    "NEED_MORE",
    "Forward",
    "NeedMore",
    "OcspCall",
    "Refusal",
    "ocsp_response_bytes",
    "read_request",
    "refusal_bytes",
]

MAX_BODY: Final = 16 * 1024  # a DER OCSP request for one certificate is ~100 bytes
MAX_HEAD: Final = 24 * 1024  # request line (a GET carries the request, base64) + headers
MAX_HEADERS: Final = 64

_TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value (HTAB is allowed)
# Header lines that all pass the per-line checks below (a token, a colon, a value without
# control characters, CRLF): when the whole block matches, the loop skips those checks.
_WELL_FORMED_FIELDS = re.compile(
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*\r\n)*")
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"upgrade", b"te"})
_DECIDING = frozenset({b"content-length", b"content-type", b"connection", b"transfer-encoding"})


@dataclass(frozen=True)
class NeedMore:
    """The request is not complete yet."""


NEED_MORE: Final = NeedMore()


@dataclass(frozen=True)
class OcspCall:
    """An OCSP request to answer. ``der`` is empty when a GET's path is not base64,
    which the responder answers as malformedRequest."""

    der: bytes
    keep_alive: bool
    consumed: int  # bytes of the buffer this request used (pipelined requests follow)
    get: bool = False  # a GET, whose answer HTTP caches may keep (RFC 5019 6.2)


@dataclass(frozen=True)
class Forward:
    """A request for another route, rewritten for a one-shot upstream connection."""

    request: bytes


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str
    allow: str | None = None  # the Allow header of a 405


_PHRASES: Final = {
    400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 411: "Length Required", 413: "Content Too Large",
    414: "URI Too Long", 415: "Unsupported Media Type",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


def _end_of_head(buf: bytes) -> tuple[int, int]:
    """(end of the header lines, start of the body), or (-1, -1) when not all there yet."""
    crlf = buf.find(b"\r\n\r\n")
    lf = buf.find(b"\n\n")
    if lf >= 0 and (crlf < 0 or lf < crlf):
        return lf, lf + 2
    if crlf >= 0:
        return crlf, crlf + 4
    return -1, -1


def read_request(buf: bytes) -> NeedMore | OcspCall | Forward | Refusal:
    """Decide what to do with the bytes a connection has sent so far."""
    head_end, body_start = _end_of_head(buf)
    if head_end > MAX_HEAD or (head_end < 0 and len(buf) > MAX_HEAD):
        line_end = buf.find(b"\n", 0, MAX_HEAD + 1)
        return (Refusal(414, "request line too long") if line_end < 0
                else Refusal(431, "request headers too large"))
    if head_end < 0:
        return NEED_MORE
    lines = buf[:head_end].split(b"\n")
    request_line = lines[0].rstrip(b"\r")
    parts = request_line.split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        return Refusal(400, "malformed request line")
    method, target, version = parts
    if method.translate(None, _TOKEN):
        return Refusal(400, "malformed method")
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        if version.startswith(b"HTTP/"):
            return Refusal(505, "only HTTP/1.0 and HTTP/1.1 are served")
        return Refusal(400, "malformed request line")
    if len(lines) > MAX_HEADERS + 1:
        return Refusal(431, "too many header fields")
    # One pass over the fields, keeping the few that decide anything.
    length: bytes | None = None
    content_type = connection = b""
    checked = body_start == head_end + 4 and _WELL_FORMED_FIELDS.fullmatch(
        buf, len(lines[0]) + 1, head_end + 2) is not None
    for raw in lines[1:]:
        name, sep, value = raw.partition(b":")
        if not checked and (not sep or not name or name.translate(None, _TOKEN)):
            # also refuses obsolete line folding (a line starting with whitespace)
            return Refusal(400, "malformed header field")
        name = name.lower()
        if name not in _DECIDING:
            if not checked and _CTL.search(value.strip(b" \t\r")):
                return Refusal(400, "control character in a header field")
            continue
        value = value.strip(b" \t\r")
        if not checked and _CTL.search(value):
            return Refusal(400, "control character in a header field")
        if name == b"content-length":
            if not value.isdigit() or (length is not None and value != length):
                return Refusal(400, "invalid Content-Length")
            length = value
        elif name == b"content-type":
            content_type = value
        elif name == b"connection":
            connection += b"," + value
        elif name == b"transfer-encoding":
            return Refusal(501, "transfer codings are not supported; send Content-Length")
    size = 0 if length is None else int(length)
    if size > MAX_BODY:
        return Refusal(413, f"request body over {MAX_BODY} bytes")
    consumed = body_start + size
    if len(buf) < consumed:
        return NEED_MORE

    path = target
    if path.startswith((b"http://", b"https://")):  # absolute form (RFC 9112 3.2.2)
        slash = path.find(b"/", path.find(b"//") + 2)
        path = path[slash:] if slash >= 0 else b"/"
    if not path.startswith(b"/"):
        return Refusal(400, "malformed request target")
    route = path.split(b"?", 1)[0]

    if route == b"/ocsp" or route == b"/ocsp/":
        if method != b"POST":
            return Refusal(405, "OCSP requests are POSTed here or sent as GET /ocsp/<base64>",
                           allow="POST")
        if length is None:
            return Refusal(411, "a POSTed OCSP request needs a Content-Length")
        if content_type and not content_type.lower().startswith(b"application/ocsp-request"):
            return Refusal(415, "expected application/ocsp-request")
        return OcspCall(buf[body_start:consumed], _keep_alive(version, connection), consumed)
    if route.startswith(b"/ocsp/"):
        if method != b"GET":
            return Refusal(405, "OCSP requests are POSTed to /ocsp or sent as "
                                "GET /ocsp/<base64>", allow="GET")
        # RFC 6960 A.1: the url-encoding of the base64 of the DER request. The whole rest
        # of the target is the request ('/' is a base64 character).
        encoded = unquote_to_bytes(path[len(b"/ocsp/"):])
        if len(encoded) > MAX_BODY:
            return Refusal(414, "OCSP request in the URL too long")
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            der = b""  # answered as malformedRequest, as a POST of garbage is
        return OcspCall(der, _keep_alive(version, connection), consumed, get=True)

    forwarded = [request_line]
    for raw in lines[1:]:  # all well-formed (checked above)
        name, _, value = raw.partition(b":")
        name = name.lower()
        if name not in _HOP_BY_HOP:
            forwarded.append(name + b": " + value.strip(b" \t\r"))
    forwarded.append(b"Connection: close")
    return Forward(b"\r\n".join(forwarded) + b"\r\n\r\n" + buf[body_start:consumed])


def _keep_alive(version: bytes, connection: bytes) -> bool:
    if not connection:  # no Connection header: the version's default
        return version == b"HTTP/1.1"
    tokens = {t.strip().lower() for t in connection.split(b",")}
    if version == b"HTTP/1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def ocsp_response_bytes(der: bytes, *, keep_alive: bool,
                        headers: Sequence[tuple[str, str]] = ()) -> bytes:
    """The HTTP response carrying a DER OCSP response."""
    extra = "".join(f"{name}: {value}\r\n" for name, value in headers).encode()
    return b"".join((
        b"HTTP/1.1 200 OK\r\nContent-Type: application/ocsp-response\r\n",
        extra,
        b"Content-Length: ",
        str(len(der)).encode(),
        b"\r\nConnection: keep-alive\r\n\r\n" if keep_alive else b"\r\nConnection: close\r\n\r\n",
        der,
    ))


def refusal_bytes(refusal: Refusal) -> bytes:
    """The HTTP response of a refused request (the connection closes after it)."""
    body = (refusal.reason + "\n").encode()
    allow = f"Allow: {refusal.allow}\r\n" if refusal.allow else ""
    phrase = _PHRASES.get(refusal.status, "Error")
    return (f"HTTP/1.1 {refusal.status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n").encode() + body

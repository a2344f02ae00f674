"""HTTP caching of the CA's public answers, as pure functions of what is answered.

OCSP answers to GET requests carry the headers of RFC 5019 6.2, so a cache or a
CDN in front of the responder can serve them. CRLs carry an ETag and answer
``If-None-Match`` with 304, but every cache must ask again before it reuses one:
a CRL is re-signed at each revocation, and a revocation must not wait in a
cache until nextUpdate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from email.utils import formatdate

from trustmesh.pki.ocsp import OcspAnswer
from trustmesh.store.datastore import CrlRecord

__all__ = ["crl_cache_headers", "not_modified", "ocsp_cache_headers"]


def ocsp_cache_headers(answer: OcspAnswer, now: float) -> list[tuple[str, str]]:
    """The caching headers of an answer to a GET, or none when the answer is not one to
    keep (the request had a nonce; a refusal).

    Caches may keep the answer until this responder would sign a fresh one anyway
    (``fresh_until``, never past nextUpdate), so a revocation reaches readers behind a
    cache within that window; ``must-revalidate`` stops a cache from serving it later.
    """
    if answer.this_update is None or answer.next_update is None or answer.fresh_until is None:
        return []
    max_age = max(0, answer.fresh_until - int(now))
    return [
        ("Last-Modified", formatdate(answer.this_update, usegmt=True)),
        ("Expires", formatdate(answer.next_update, usegmt=True)),
        ("ETag", '"' + hashlib.sha1(answer.der, usedforsecurity=False).hexdigest() + '"'),
        ("Cache-Control", f"max-age={max_age}, public, no-transform, must-revalidate"),
    ]


def crl_cache_headers(record: CrlRecord, representation: str) -> dict[str, str]:
    """Validators of one CRL in one representation (``crl``: DER, ``pem``)."""
    return {
        "ETag": f'"{record.ca_id}-{record.number}-{representation}"',
        "Last-Modified": formatdate(record.this_update, usegmt=True),
        "Cache-Control": "public, no-cache, no-transform",
    }


def not_modified(request_headers: Mapping[str, str], etag: str) -> bool:
    """Whether a conditional GET may be answered 304: its If-None-Match names ``etag``
    (weak comparison, RFC 9110 13.1.2) or is ``*``.

    If-Modified-Since is not evaluated (RFC 9110 leaves that to the server): two CRLs
    signed within one second share their Last-Modified, and a 304 on the date alone
    could keep the older one, without the newer revocation, in a client.
    """
    if_none_match = request_headers.get("If-None-Match")
    if if_none_match is None:
        return False
    wanted = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
    return "*" in wanted or etag.removeprefix("W/") in wanted

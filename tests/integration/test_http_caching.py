"""HTTP caching of the public answers, through both responders (the OCSP worker processes
and the server's own HTTP app): RFC 5019 headers on OCSP GETs, validators and 304s on CRLs."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from cryptography.x509 import ocsp

from harness import ServerProcess, issue, make_csr, ocsp_request, urls_of

CACHE_HEADERS = ("etag", "cache-control", "expires", "last-modified")
REUSE_SECONDS = 15 * 60  # a quarter of the responses' one-hour validity


@pytest.fixture(params=[2, 0], ids=["workers", "in-process"])
def ocsp_workers(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture
def srv(ocsp_workers: int, start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "disk", "--signing-workers", "0",
                        "--ocsp-workers", str(ocsp_workers))


def _get(srv: ServerProcess, der: bytes) -> httpx.Response:
    path = quote(base64.b64encode(der).decode(), safe="")
    resp = httpx.get(f"{srv.base_url}/ocsp/{path}", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp


def _max_age(resp: httpx.Response) -> int:
    directives = [d.strip() for d in resp.headers["cache-control"].split(",")]
    assert {"public", "no-transform", "must-revalidate"} <= set(directives), directives
    ages = [int(d.split("=", 1)[1]) for d in directives if d.startswith("max-age=")]
    assert len(ages) == 1, directives
    return ages[0]


def test_an_ocsp_get_without_a_nonce_carries_the_rfc5019_headers(
        srv: ServerProcess, ocsp_workers: int, tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    der = ocsp_request(out, nonce=False)
    resp = _get(srv, der)
    answer = ocsp.load_der_ocsp_response(resp.content)
    assert answer.certificate_status == ocsp.OCSPCertStatus.GOOD
    assert answer.next_update_utc is not None
    # the headers are the response's own times and digest
    assert parsedate_to_datetime(resp.headers["last-modified"]) == answer.this_update_utc
    assert parsedate_to_datetime(resp.headers["expires"]) == answer.next_update_utc
    assert resp.headers["etag"] == '"' + hashlib.sha1(resp.content).hexdigest() + '"'  # noqa: S324
    age = _max_age(resp)
    assert 0 < age <= REUSE_SECONDS
    lifetime = (answer.next_update_utc - answer.this_update_utc).total_seconds()
    assert age < lifetime
    # asked again: each responder process reuses the answer it signed, with its tag
    bodies = {resp.content}
    for _ in range(8):
        again = _get(srv, der)
        assert again.headers["etag"] == '"' + hashlib.sha1(again.content).hexdigest() + '"'  # noqa: S324
        assert 0 < _max_age(again) <= REUSE_SECONDS
        bodies.add(again.content)
    assert len(bodies) <= max(1, ocsp_workers)  # one per responder process


def test_answers_that_are_not_for_caches_carry_no_cache_headers(srv: ServerProcess,
                                                                 tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    # a nonce makes the answer unique to its asker
    with_nonce = _get(srv, ocsp_request(out, nonce=True))
    assert ocsp.load_der_ocsp_response(with_nonce.content).certificate_status == (
        ocsp.OCSPCertStatus.GOOD)
    assert not [h for h in CACHE_HEADERS if h in with_nonce.headers]
    # caches do not keep POSTs (RFC 5019 5)
    posted = httpx.post(f"{srv.base_url}/ocsp", content=ocsp_request(out, nonce=False), timeout=10,
                        headers={"Content-Type": "application/ocsp-request"})
    assert posted.status_code == 200
    assert not [h for h in CACHE_HEADERS if h in posted.headers]
    # a refusal (malformedRequest) is not kept either
    garbage = httpx.get(f"{srv.base_url}/ocsp/{quote(base64.b64encode(b'junk').decode())}",
                        timeout=10)
    assert ocsp.load_der_ocsp_response(garbage.content).response_status == (
        ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    assert not [h for h in CACHE_HEADERS if h in garbage.headers]


def test_a_revocation_gives_a_new_answer_with_a_new_tag(srv: ServerProcess,
                                                        tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    der = ocsp_request(out, nonce=False)
    before = _get(srv, der)
    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "key-compromise")
    after = _get(srv, der)
    assert ocsp.load_der_ocsp_response(after.content).certificate_status == (
        ocsp.OCSPCertStatus.REVOKED)
    assert after.headers["etag"] != before.headers["etag"]
    assert 0 < _max_age(after) <= REUSE_SECONDS


def test_a_crl_has_validators_and_answers_conditional_requests(srv: ServerProcess,
                                                               tmp_path: Path) -> None:
    out = issue(srv, tmp_path, make_csr(tmp_path, "web"), "--template", "end-entity")
    crl_url, _ = urls_of(Path(str(out["leaf"])))
    first = httpx.get(crl_url, timeout=10)
    assert first.status_code == 200
    crl = x509.load_der_x509_crl(first.content)
    etag = first.headers["etag"]
    assert re.fullmatch(r'"[0-9a-f]+-\d+-crl"', etag), etag
    assert parsedate_to_datetime(first.headers["last-modified"]) == crl.last_update_utc
    # caches may store it but must ask before every use: a revocation re-signs the CRL
    assert "no-cache" in first.headers["cache-control"]
    pem = httpx.get(crl_url.removesuffix(".crl") + ".pem", timeout=10)
    assert pem.status_code == 200 and pem.headers["etag"] != etag

    unchanged = httpx.get(crl_url, headers={"If-None-Match": etag}, timeout=10)
    assert unchanged.status_code == 304 and unchanged.content == b""
    assert unchanged.headers["etag"] == etag
    weak_in_a_list = httpx.get(crl_url, headers={"If-None-Match": f'"other", W/{etag}'},
                               timeout=10)
    assert weak_in_a_list.status_code == 304
    assert httpx.get(crl_url, headers={"If-None-Match": '"other"'},
                     timeout=10).status_code == 200
    # a date alone is not enough: two CRLs signed in one second share it
    since = httpx.get(crl_url, headers={"If-Modified-Since": first.headers["last-modified"]},
                      timeout=10)
    assert since.status_code == 200 and since.content == first.content

    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "superseded")
    fresh = httpx.get(crl_url, headers={"If-None-Match": etag}, timeout=10)
    assert fresh.status_code == 200
    assert fresh.headers["etag"] != etag
    revoked = x509.load_der_x509_crl(fresh.content)
    assert revoked.get_revoked_certificate_by_serial_number(int(str(out["serial"]), 16))
    assert httpx.get(crl_url, headers={"If-None-Match": fresh.headers["etag"]},
                     timeout=10).status_code == 304

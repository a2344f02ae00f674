"""Public HTTP endpoints: health, metrics, CA certificates, CRL and OCSP (RFC 6960 A.1)."""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Awaitable, Callable
from urllib.parse import unquote

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from trustmesh.errors import NotFound
from trustmesh.pki.ocsp import OcspAnswer
from trustmesh.server.authority import CertificateAuthority, chain_pem
from trustmesh.server.http_cache import crl_cache_headers, not_modified, ocsp_cache_headers
from trustmesh.server.metrics import ServerMetrics

__all__ = ["build_public_app"]

_MAX_OCSP_REQUEST = 16 * 1024
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_public_app(ca: CertificateAuthority, metrics: ServerMetrics, *,
                     before_scrape: Callable[[], None] | None = None) -> web.Application:
    """The public routes. ``before_scrape`` runs before /metrics is rendered (the OCSP
    responder processes add their counts there)."""
    app = web.Application(client_max_size=_MAX_OCSP_REQUEST)

    def timed(route: str, handler: Handler) -> Handler:
        hist = metrics.http_latency.labels(route)

        async def wrapped(request: web.Request) -> web.StreamResponse:
            start = time.perf_counter()
            try:
                return await handler(request)
            finally:
                hist.observe(time.perf_counter() - start)

        return wrapped

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "ca_id": ca.ca_id})

    async def metrics_handler(_: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        return web.Response(body=generate_latest(metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def crl(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        ca_id, _, ext = name.rpartition(".")
        if ext not in ("crl", "pem"):
            raise web.HTTPNotFound(text="CRLs are served as <ca-id>.crl (DER) or .pem\n")
        try:
            record = ca.crl_record(ca_id)
        except NotFound:
            raise web.HTTPNotFound(text=f"no CRL for CA {ca_id}\n") from None
        headers = crl_cache_headers(record, ext)
        if not_modified(request.headers, headers["ETag"]):
            return web.Response(status=304, headers=headers)
        if ext == "pem":
            b64 = base64.encodebytes(record.der).decode()
            body = f"-----BEGIN X509 CRL-----\n{b64}-----END X509 CRL-----\n"
            return web.Response(text=body, content_type="application/x-pem-file",
                                headers=headers)
        return web.Response(body=record.der, content_type="application/pkix-crl",
                            headers=headers)

    async def ca_cert(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in ("bundle.pem", "roots.pem"):
            return web.Response(text=chain_pem(ca.anchors), content_type="application/x-pem-file")
        if name == "chain.pem":
            return web.Response(text=chain_pem(ca.chain), content_type="application/x-pem-file")
        ca_id, _, ext = name.rpartition(".")
        try:
            cert = ca.ca_certificate(ca_id)
        except NotFound:
            raise web.HTTPNotFound(text=f"no CA certificate {ca_id}\n") from None
        if ext == "der":
            return web.Response(body=cert.public_bytes(serialization.Encoding.DER),
                                content_type="application/pkix-cert")
        if ext == "pem":
            return web.Response(text=chain_pem([cert]), content_type="application/x-pem-file")
        raise web.HTTPNotFound(text="CA certificates are served as <ca-id>.der or .pem\n")

    def ocsp_response(answer: OcspAnswer, *, get: bool = False) -> web.Response:
        metrics.ocsp_responses.labels(answer.outcome).inc()
        headers = ocsp_cache_headers(answer, ca.now().timestamp()) if get else []
        return web.Response(body=answer.der, content_type="application/ocsp-response",
                            headers=dict(headers))

    async def ocsp_post(request: web.Request) -> web.Response:
        ctype = request.headers.get("Content-Type", "")
        if ctype and not ctype.startswith("application/ocsp-request"):
            raise web.HTTPUnsupportedMediaType(text="expected application/ocsp-request\n")
        body = await request.read()
        return ocsp_response(ca.ocsp(body))

    async def ocsp_get(request: web.Request) -> web.Response:
        # RFC 6960 A.1.1: GET {url}/{url-encoding of base-64 encoding of the DER request}
        raw = request.raw_path.split("/ocsp/", 1)[1]
        encoded = unquote(raw)
        if len(encoded) > _MAX_OCSP_REQUEST:
            raise web.HTTPRequestURITooLong()
        try:
            der = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            der = b""  # answered below as malformedRequest
        return ocsp_response(ca.ocsp(der), get=True)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/crl/{name}", timed("crl", crl))
    app.router.add_get("/ca/{name}", timed("ca", ca_cert))
    app.router.add_post("/ocsp", timed("ocsp", ocsp_post))
    app.router.add_post("/ocsp/", timed("ocsp", ocsp_post))
    app.router.add_get("/ocsp/{req:.*}", timed("ocsp", ocsp_get))
    return app

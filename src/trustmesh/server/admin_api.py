"""The local admin API: JSON over HTTP on a Unix socket that only its owner may use.

The kernel names the caller (``SO_PEERCRED``); only root and the server's own
user are served, and the caller's uid is what the audit log records.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from trustmesh.config import parse_duration
from trustmesh.errors import InternalError, InvalidInput, PermissionDenied, TrustmeshError
from trustmesh.log import get_logger
from trustmesh.server.authority import CertificateAuthority, IssueParams, chain_pem
from trustmesh.server.issuance import AsyncIssuer
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.registry import Registry

__all__ = ["build_admin_app", "peer_uid"]

log = get_logger("trustmesh.server.admin")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def peer_uid(request: web.Request) -> int | None:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _actor(uid: int) -> str:
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = "?"
    return f"unix:uid:{uid}({name})"


def _error_response(err: TrustmeshError) -> web.Response:
    return web.json_response({"error": err.to_dict()}, status=err.http_status)


def _str_list(body: dict[str, Any], key: str) -> tuple[str, ...]:
    value = body.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidInput("must be a list of strings", field=key)
    return tuple(value)


_ISSUE_FIELDS = {"csr", "template", "validity", "dns_names", "uris", "ip_addresses",
                 "path_length", "idempotency_key"}


def build_admin_app(ca: CertificateAuthority, metrics: ServerMetrics,
                    issuer: AsyncIssuer, registry: Registry) -> web.Application:
    allowed_uids = {0, os.getuid()}

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        uid = peer_uid(request)
        if uid is None or uid not in allowed_uids:
            log.warning("refused admin API caller", extra={"uid": uid})
            return _error_response(PermissionDenied(
                f"uid {uid} may not use the admin socket; only root and the server's user may"))
        request["actor"] = _actor(uid)
        try:
            return await handler(request)
        except TrustmeshError as err:
            return _error_response(err)
        except web.HTTPException:
            raise
        except Exception:
            log.exception("admin API request failed", extra={"path": request.path})
            return _error_response(InternalError(
                "internal error while handling the request; see the server log"))

    app = web.Application(middlewares=[guard], client_max_size=1024 * 1024)

    async def json_body(request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise InvalidInput("request body is not JSON") from None
        if not isinstance(body, dict):
            raise InvalidInput("request body must be a JSON object")
        return body

    async def run(fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def show_ca(_: web.Request) -> web.Response:
        return web.json_response(ca.describe())

    async def issue(request: web.Request) -> web.Response:
        body = await json_body(request)
        unknown = set(body) - _ISSUE_FIELDS
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        csr = body.get("csr")
        template = body.get("template")
        if not isinstance(csr, str) or not csr:
            raise InvalidInput("a PEM CSR is required", field="csr")
        if not isinstance(template, str) or not template:
            raise InvalidInput("a template name is required", field="template")
        validity = None
        if body.get("validity") is not None:
            try:
                validity = parse_duration(body["validity"])
            except (ValueError, TypeError) as exc:
                raise InvalidInput(str(exc), field="validity") from None
        plen = body.get("path_length")
        if plen is not None and (not isinstance(plen, int) or isinstance(plen, bool)):
            raise InvalidInput("must be an integer", field="path_length")
        idem = body.get("idempotency_key")
        if idem is not None and (not isinstance(idem, str) or not idem):
            raise InvalidInput("must be a non-empty string", field="idempotency_key")
        params = IssueParams(
            csr=csr.encode(),
            template=template,
            validity=validity,
            dns_names=_str_list(body, "dns_names"),
            uris=_str_list(body, "uris"),
            ip_addresses=_str_list(body, "ip_addresses"),
            path_length=plen,
            idempotency_key=idem,
        )
        try:
            issued = await issuer.issue(params, request["actor"])
        except TrustmeshError as err:
            metrics.issue_errors.labels(err.code).inc()
            raise
        if not issued.reused:
            metrics.issued.labels(template).inc()
        return web.json_response(issued.to_json(), status=200 if issued.reused else 201)

    async def show_cert(request: web.Request) -> web.Response:
        from trustmesh.server.authority import normalize_serial

        serial = normalize_serial(request.match_info["serial"])
        rec = await run(ca.store.get_certificate, serial)
        return web.json_response({
            "serial": rec.serial, "subject": rec.subject, "sans": list(rec.sans),
            "template": rec.template, "status": rec.status, "not_before": rec.not_before,
            "not_after": rec.not_after, "revoked_at": rec.revoked_at,
            "revocation_reason": rec.revocation_reason, "requested_by": rec.requested_by,
        })

    async def revoke(request: web.Request) -> web.Response:
        body = await json_body(request)
        reason = body.get("reason", "unspecified")
        if not isinstance(reason, str):
            raise InvalidInput("must be a string", field="reason")
        rec = await run(ca.revoke, request.match_info["serial"], reason, request["actor"])
        metrics.revoked.labels(rec.revocation_reason or "unspecified").inc()
        latest = await run(ca.store.latest_crl, ca.ca_id)
        if latest is not None:
            metrics.crl_number.labels(ca.ca_id).set(latest.number)
        return web.json_response({
            "serial": rec.serial, "status": rec.status, "revoked_at": rec.revoked_at,
            "reason": rec.revocation_reason,
        })

    async def audit(request: web.Request) -> web.Response:
        events = await run(ca.audit, request.query.get("action"), request.query.get("serial"))
        return web.json_response({"events": events})

    # -- registry ---------------------------------------------------------------
    async def create_entries(request: web.Request) -> web.Response:
        body = await json_body(request)
        if set(body) - {"entries"} or not isinstance(body.get("entries"), list):
            raise InvalidInput("expected {\"entries\": [...]}")
        entries = await run(registry.create_entries, body["entries"], request["actor"])
        return web.json_response({"entries": [e.to_json() for e in entries]}, status=201)

    async def list_entries(request: web.Request) -> web.Response:
        entries = await run(lambda: registry.list_entries(
            spiffe_id=request.query.get("spiffe_id"), parent_id=request.query.get("parent_id")))
        return web.json_response({"entries": [e.to_json() for e in entries]})

    async def show_entry(request: web.Request) -> web.Response:
        entry = await run(registry.get_entry, request.match_info["id"])
        return web.json_response(entry.to_json())

    async def update_entry(request: web.Request) -> web.Response:
        body = await json_body(request)
        entry = await run(registry.update_entry, request.match_info["id"], body,
                          request["actor"])
        return web.json_response(entry.to_json())

    async def delete_entry(request: web.Request) -> web.Response:
        revision = await run(registry.delete_entry, request.match_info["id"], request["actor"])
        return web.json_response({"id": request.match_info["id"], "deleted": True,
                                  "revision": revision})

    async def create_token(request: web.Request) -> web.Response:
        body = await json_body(request)
        unknown = set(body) - {"ttl", "spiffe_id"}
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        ttl = None
        if body.get("ttl") is not None:
            try:
                ttl = parse_duration(body["ttl"])
            except (ValueError, TypeError) as exc:
                raise InvalidInput(str(exc), field="ttl") from None
        token = await run(registry.create_join_token, ttl, body.get("spiffe_id"),
                          request["actor"])
        return web.json_response(token.to_json(), status=201)

    async def list_agents(_: web.Request) -> web.Response:
        return web.json_response({"agents": await run(registry.list_agents)})

    async def evict_agent(request: web.Request) -> web.Response:
        body = await json_body(request)
        spiffe_id = body.get("spiffe_id")
        if not isinstance(spiffe_id, str):
            raise InvalidInput("a SPIFFE ID is required", field="spiffe_id")
        await run(registry.evict_agent, spiffe_id, request["actor"])
        return web.json_response({"spiffe_id": spiffe_id, "evicted": True})

    app.router.add_post("/v1/entries", create_entries)
    app.router.add_get("/v1/entries", list_entries)
    app.router.add_get("/v1/entries/{id}", show_entry)
    app.router.add_patch("/v1/entries/{id}", update_entry)
    app.router.add_delete("/v1/entries/{id}", delete_entry)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_get("/v1/agents", list_agents)
    app.router.add_post("/v1/agents/evict", evict_agent)

    async def show_bundle(_: web.Request) -> web.Response:
        bundle = await run(ca.bundle)
        return web.json_response({"bundle": bundle, "pem": chain_pem(ca.anchors)})

    app.router.add_get("/v1/bundle", show_bundle)
    app.router.add_get("/v1/ca", show_ca)
    app.router.add_post("/v1/certificates", issue)
    app.router.add_get("/v1/certificates/{serial}", show_cert)
    app.router.add_post("/v1/certificates/{serial}/revoke", revoke)
    app.router.add_get("/v1/audit", audit)
    return app

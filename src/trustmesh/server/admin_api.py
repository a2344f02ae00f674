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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web
from cryptography import x509
from cryptography.x509.oid import NameOID

from trustmesh.config import parse_duration
from trustmesh.errors import InternalError, InvalidInput, PermissionDenied, TrustmeshError
from trustmesh.log import get_logger
from trustmesh.policy.rbac import TRUSTMESH_API_GROUP
from trustmesh.policy.rbac import Request as RbacRequest
from trustmesh.server.authority import CertificateAuthority, IssueParams, chain_pem
from trustmesh.server.issuance import AsyncIssuer
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.rbac_store import RbacPolicyStore
from trustmesh.server.registry import Registry

if TYPE_CHECKING:
    from trustmesh.server.mesh_config import MeshConfigService

__all__ = [
    "ROUTE_PERMISSIONS",
    "Caller",
    "build_admin_app",
    "local_caller",
    "peer_uid",
    "remote_caller_from_certificate",
]

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


@dataclass(frozen=True)
class Caller:
    """Who is calling: the audit log's actor, and the identity RBAC checks (remote only)."""

    actor: str
    user: str = ""
    groups: tuple[str, ...] = ()
    local: bool = False


# (method, route) -> (verb, resource, subresource, name taken from this path parameter)
ROUTE_PERMISSIONS: dict[tuple[str, str], tuple[str, str, str, str]] = {
    ("GET", "/v1/ca"): ("get", "ca", "", ""),
    ("POST", "/v1/certificates"): ("create", "certificates", "", ""),
    ("GET", "/v1/certificates/{serial}"): ("get", "certificates", "", "serial"),
    ("POST", "/v1/certificates/{serial}/revoke"): ("update", "certificates", "revoke", "serial"),
    ("GET", "/v1/audit"): ("list", "audit", "", ""),
    ("POST", "/v1/entries"): ("create", "entries", "", ""),
    ("GET", "/v1/entries"): ("list", "entries", "", ""),
    ("GET", "/v1/entries/{id}"): ("get", "entries", "", "id"),
    ("PATCH", "/v1/entries/{id}"): ("update", "entries", "", "id"),
    ("DELETE", "/v1/entries/{id}"): ("delete", "entries", "", "id"),
    ("POST", "/v1/tokens"): ("create", "tokens", "", ""),
    ("GET", "/v1/agents"): ("list", "agents", "", ""),
    ("POST", "/v1/agents/evict"): ("delete", "agents", "", ""),
    ("GET", "/v1/bundle"): ("get", "bundles", "", ""),
    ("GET", "/v1/federation/bundles"): ("list", "federatedbundles", "", ""),
    ("GET", "/v1/federation/bundles/{td}"): ("get", "federatedbundles", "", "td"),
    ("PUT", "/v1/federation/bundles/{td}"): ("update", "federatedbundles", "", "td"),
    ("DELETE", "/v1/federation/bundles/{td}"): ("delete", "federatedbundles", "", "td"),
    ("GET", "/v1/rbac"): ("get", "rbacpolicies", "", ""),
    ("PUT", "/v1/rbac"): ("update", "rbacpolicies", "", ""),
    # Mesh resources are authorized per document (kind and namespace) in the handler.
    ("POST", "/v1/mesh/apply"): ("update", "", "", ""),
    ("POST", "/v1/mesh/delete"): ("delete", "", "", ""),
    ("GET", "/v1/mesh/resources"): ("list", "", "", ""),
    ("POST", "/v1/mesh/explain"): ("get", "", "", ""),
}

MESH_RESOURCE_NAMES = {"AuthorizationPolicy": "authorizationpolicies",
                       "PeerAuthentication": "peerauthentications",
                       "Workload": "workloads", "Service": "services"}


def local_caller(request: web.Request) -> Caller:
    """The local socket: the kernel names the caller; only root and the server's user."""
    uid = peer_uid(request)
    if uid is None or uid not in {0, os.getuid()}:
        log.warning("refused admin API caller", extra={"uid": uid})
        raise PermissionDenied(
            f"uid {uid} may not use the admin socket; only root and the server's user may")
    return Caller(_actor(uid), local=True)


def remote_caller_from_certificate(cert: x509.Certificate) -> Caller:
    """A client certificate's identity: its SPIFFE ID, or its CN with O as groups
    (the Kubernetes convention for client certificates)."""
    groups = tuple(str(a.value) for a in cert.subject.get_attributes_for_oid(
        NameOID.ORGANIZATION_NAME))
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    if spiffe:
        user = spiffe[0]
    else:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if not cns:
            raise PermissionDenied("the client certificate names no user (no SPIFFE ID, no CN)")
        user = str(cns[0].value)
    return Caller(f"tls:{user}", user=user, groups=groups)


def build_admin_app(ca: CertificateAuthority, metrics: ServerMetrics,
                    issuer: AsyncIssuer, registry: Registry, *,
                    authenticate: Callable[[web.Request], Caller] = local_caller,
                    policy: RbacPolicyStore | None = None,
                    mesh: MeshConfigService | None = None) -> web.Application:
    """The admin API. Local callers (the socket) are trusted; remote callers (mTLS)
    are authorized on every call by the RBAC policy."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            caller = authenticate(request)
            if not caller.local:
                _authorize(request, caller)
        except TrustmeshError as err:
            return _error_response(err)
        request["actor"] = caller.actor
        request["caller"] = caller
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

    def _authorize(request: web.Request, caller: Caller) -> None:
        route = request.match_info.route.resource
        canonical = route.canonical if route is not None else request.path
        perm = ROUTE_PERMISSIONS.get((request.method, canonical))
        if perm is None or policy is None:
            raise PermissionDenied(f"{request.method} {request.path} is not available "
                                   "remotely")
        verb, resource, subresource, name_param = perm
        if not resource:
            return  # the handler authorizes each object it touches (_authorize_object)
        name = request.match_info.get(name_param, "") if name_param else ""
        req = RbacRequest(user=caller.user, verb=verb, resource=resource,
                          subresource=subresource, api_group=TRUSTMESH_API_GROUP, name=name,
                          groups=caller.groups)
        decision = policy.authorizer().authorize(req)
        if not decision.allowed:
            log.warning("RBAC denied", extra={"user": caller.user, "request": req.describe()})
            raise PermissionDenied(f"{caller.user} may not {req.describe()}")

    def _authorize_object(request: web.Request, verb: str, resource: str, namespace: str,
                          name: str = "") -> None:
        caller: Caller = request["caller"]
        if caller.local:
            return
        if policy is None:
            raise PermissionDenied(f"{request.method} {request.path} is not available remotely")
        req = RbacRequest(user=caller.user, verb=verb, resource=resource,
                          api_group=TRUSTMESH_API_GROUP, namespace=namespace, name=name,
                          groups=caller.groups)
        if not policy.authorizer().authorize(req).allowed:
            log.warning("RBAC denied", extra={"user": caller.user, "request": req.describe()})
            raise PermissionDenied(f"{caller.user} may not {req.describe()}")

    app = web.Application(middlewares=[guard], client_max_size=16 * 1024 * 1024)

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

    # -- federation ---------------------------------------------------------------
    async def list_federated(_: web.Request) -> web.Response:
        bundles = await run(registry.federation.all)
        return web.json_response({"bundles": [b.summary() for b in bundles.values()]})

    async def show_federated(request: web.Request) -> web.Response:
        found = await run(registry.federation.get, request.match_info["td"])
        return web.json_response({**found.summary(), "bundle": found.document})

    async def set_federated(request: web.Request) -> web.Response:
        body = await json_body(request)
        unknown = set(body) - {"bundle", "format"}
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        found, changed = await run(registry.federation.set_bundle, request.match_info["td"],
                                   body.get("bundle"), body.get("format", "spiffe"),
                                   request["actor"])
        return web.json_response({**found.summary(), "changed": changed})

    async def delete_federated(request: web.Request) -> web.Response:
        revision = await run(registry.federation.delete_bundle, request.match_info["td"],
                             request["actor"])
        return web.json_response({"trust_domain": request.match_info["td"], "deleted": True,
                                  "revision": revision})

    async def show_rbac(_: web.Request) -> web.Response:
        if policy is None:
            raise InvalidInput("this server has no RBAC policy store")
        return web.json_response({"policy": await run(policy.yaml)})

    async def apply_rbac(request: web.Request) -> web.Response:
        if policy is None:
            raise InvalidInput("this server has no RBAC policy store")
        body = await json_body(request)
        text = body.get("policy")
        if not isinstance(text, str):
            raise InvalidInput("expected {\"policy\": \"<RBAC YAML>\"}", field="policy")
        report = await run(policy.replace, text, request["actor"])
        return web.json_response(report)

    # -- mesh configuration --------------------------------------------------------------
    def need_mesh() -> MeshConfigService:
        if mesh is None:
            raise InvalidInput("this server has no mesh configuration store")
        return mesh

    def object_guard(request: web.Request) -> Callable[[str, Any], None]:
        from trustmesh.policy.mesh_model import resource_key

        def check(verb: str, doc: Any) -> None:
            kind, namespace, name = resource_key(doc)
            _authorize_object(request, verb, MESH_RESOURCE_NAMES.get(kind, kind.lower()),
                              namespace, name)
        return check

    async def mesh_apply(request: web.Request) -> web.Response:
        service = need_mesh()
        body = await json_body(request)
        unknown = set(body) - {"yaml", "source", "dry_run"}
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(body.get("yaml"), str):
            raise InvalidInput("expected {\"yaml\": \"<multi-document YAML>\"}", field="yaml")
        report = await run(lambda: service.apply(
            body["yaml"], str(body.get("source") or "<input>"),
            dry_run=bool(body.get("dry_run")), authorize=object_guard(request)))
        if not report["dry_run"]:
            await service.refresh()
            log.info("mesh configuration applied", extra={
                "actor": request["actor"], "revision": report["revision"],
                "results": report["results"]})
        return web.json_response(report)

    async def mesh_delete(request: web.Request) -> web.Response:
        service = need_mesh()
        body = await json_body(request)
        unknown = set(body) - {"yaml", "source", "ignore_not_found"}
        if unknown:
            raise InvalidInput(f"unknown field(s): {', '.join(sorted(unknown))}")
        if not isinstance(body.get("yaml"), str):
            raise InvalidInput("expected {\"yaml\": \"<multi-document YAML>\"}", field="yaml")
        report = await run(lambda: service.delete(
            body["yaml"], str(body.get("source") or "<input>"),
            ignore_not_found=bool(body.get("ignore_not_found")),
            authorize=object_guard(request)))
        await service.refresh()
        log.info("mesh resources deleted", extra={"actor": request["actor"],
                                                  "results": report["results"]})
        return web.json_response(report)

    async def mesh_get(request: web.Request) -> web.Response:
        service = need_mesh()
        kind = request.query.get("kind") or None
        namespace = request.query.get("namespace") or None
        from trustmesh.policy.mesh_model import canonical_kind

        resource = MESH_RESOURCE_NAMES.get(canonical_kind(kind), "") if kind else "*"
        _authorize_object(request, "list", resource or "*", namespace or "")
        return web.json_response(await run(service.get, kind, namespace))

    async def mesh_explain(request: web.Request) -> web.Response:
        service = need_mesh()
        body = await json_body(request)
        _authorize_object(request, "get", "authorizationpolicies",
                          str(body.get("namespace") or ""))
        return web.json_response(await run(service.explain, body))

    app.router.add_post("/v1/mesh/apply", mesh_apply)
    app.router.add_post("/v1/mesh/delete", mesh_delete)
    app.router.add_get("/v1/mesh/resources", mesh_get)
    app.router.add_post("/v1/mesh/explain", mesh_explain)

    app.router.add_get("/v1/rbac", show_rbac)
    app.router.add_put("/v1/rbac", apply_rbac)
    app.router.add_get("/v1/bundle", show_bundle)
    app.router.add_get("/v1/federation/bundles", list_federated)
    app.router.add_get("/v1/federation/bundles/{td}", show_federated)
    app.router.add_put("/v1/federation/bundles/{td}", set_federated)
    app.router.add_delete("/v1/federation/bundles/{td}", delete_federated)
    app.router.add_get("/v1/ca", show_ca)
    app.router.add_post("/v1/certificates", issue)
    app.router.add_get("/v1/certificates/{serial}", show_cert)
    app.router.add_post("/v1/certificates/{serial}/revoke", revoke)
    app.router.add_get("/v1/audit", audit)
    return app

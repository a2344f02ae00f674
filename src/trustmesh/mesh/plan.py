"""From mesh resources to one sidecar's plan, and ``policy explain``: pure.

The registry (Workload, Service) says where things are; PeerAuthentication
says which mTLS mode each inbound port runs; AuthorizationPolicy becomes the
RBAC of each inbound port (per-route RBAC configs on HTTP ports, network RBAC
filters on TCP ports). ``explain`` asks the same evaluator the RBAC was
compiled from, so the two cannot disagree.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

import trustmesh.mesh.envoy.rbac as envoy_rbac
import trustmesh.policy.authz as authz
import trustmesh.policy.mesh_model as mesh_model
import trustmesh.policy.peerauthn as peerauthn
from trustmesh.errors import InvalidInput, NotFound
from trustmesh.mesh.envoy.compile import GatewayListener, InboundPort, SidecarPlan, Upstream

__all__ = ["check_resources", "explain", "find_workload", "plan_sidecar"]


def _doc(r: Any) -> dict[str, Any]:
    return dict(mesh_model.dump_resource(r))


def _meta(doc: Mapping[str, Any]) -> tuple[str, str, dict[str, str]]:
    meta = doc.get("metadata") or {}
    return (str(meta.get("namespace") or "default"), str(meta.get("name") or ""),
            dict(meta.get("labels") or {}))


def _of_kind(resources: Sequence[Any], kind: str) -> list[Any]:
    return [r for r in resources if mesh_model.resource_key(r)[0] == kind]


def find_workload(resources: Sequence[Any], node_id: str) -> Any | None:
    """The Workload (or Gateway) an Envoy node ID ``namespace/name`` names."""
    namespace, _, name = node_id.partition("/")
    for kind in ("Workload", "Gateway"):
        for w in _of_kind(resources, kind):
            if mesh_model.resource_key(w)[1:] == (namespace, name):
                return w
    return None


def _selected(service: Mapping[str, Any], workloads: Sequence[Any]) -> list[Any]:
    namespace, _, _ = _meta(service)
    selector = dict((service.get("spec") or {}).get("selector") or {})
    out = []
    for w in workloads:
        wns, _, labels = _meta(_doc(w))
        if wns == namespace and all(labels.get(k) == v for k, v in selector.items()):
            out.append(w)
    return out


def _find_service(resources: Sequence[Any], ref: str, namespace: str) -> dict[str, Any] | None:
    ns, sep, name = ref.partition("/")
    if not sep:
        ns, name = namespace, ref
    for s in _of_kind(resources, "Service"):
        if mesh_model.resource_key(s)[1:] == (ns, name):
            return _doc(s)
    return None


def _policies(resources: Sequence[Any], kind: str) -> list[Any]:
    return _of_kind(resources, kind)


def plan_sidecar(resources: Sequence[Any], workload: Any, trust_domain: str,
                 root_namespace: str) -> SidecarPlan:
    """What the workload's sidecar must do, from the whole mesh configuration."""
    if isinstance(workload, mesh_model.Gateway):
        return plan_gateway(resources, workload, trust_domain)
    doc = _doc(workload)
    namespace, name, labels = _meta(doc)
    spec = doc.get("spec") or {}
    address = str(spec.get("address") or "127.0.0.1")
    authz_policies = _policies(resources, "AuthorizationPolicy")
    peer_policies = _policies(resources, "PeerAuthentication")
    inbound = []
    for p in spec.get("ports") or []:
        port = int(p["port"])
        protocol = str(p.get("protocol") or "HTTP")
        mode, _ = peerauthn.effective_mtls(peer_policies, namespace, labels, port,
                                           root_namespace)
        if protocol == "TCP":
            inbound.append(InboundPort(
                port=port, sidecar_port=int(p["sidecarPort"]), protocol=protocol,
                mtls_mode=str(mode),
                network_filters=tuple(envoy_rbac.compile_network_rbac(
                    authz_policies, namespace, labels, port, root_namespace))))
        else:
            inbound.append(InboundPort(
                port=port, sidecar_port=int(p["sidecarPort"]), protocol=protocol,
                mtls_mode=str(mode),
                http_rbac=tuple(envoy_rbac.compile_http_rbac(
                    authz_policies, namespace, labels, port, root_namespace).items())))
    upstreams = []
    for u in spec.get("upstreams") or []:
        up = _upstream(resources, str(u["service"]), int(u["port"]), namespace,
                       int(u["localPort"]), trust_domain)
        if up is not None:  # else reported as a warning on apply; nothing to route to yet
            upstreams.append(up)
    return SidecarPlan(node_id=f"{namespace}/{name}",
                       spiffe_id=mesh_model.workload_spiffe_id(workload, trust_domain),
                       address=address, inbound=tuple(inbound), upstreams=tuple(upstreams))


def _upstream(resources: Sequence[Any], ref: str, port: int, namespace: str,
              local_port: int, trust_domain: str) -> Upstream | None:
    """A service port resolved to its workloads' sidecars and identities."""
    service = _find_service(resources, ref, namespace)
    if service is None:
        return None
    sns, sname, _ = _meta(service)
    sport = next((sp for sp in (service.get("spec") or {}).get("ports") or []
                  if int(sp["port"]) == port), None)
    if sport is None:
        return None
    target = int(sport.get("targetPort") or sport["port"])
    endpoints, ids = [], []
    for w in _selected(service, _of_kind(resources, "Workload")):
        wdoc = _doc(w)
        for wp in (wdoc.get("spec") or {}).get("ports") or []:
            if int(wp["port"]) == target:
                endpoints.append((str((wdoc.get("spec") or {}).get("address") or "127.0.0.1"),
                                  int(wp["sidecarPort"])))
                ids.append(mesh_model.workload_spiffe_id(w, trust_domain))
    return Upstream(name=f"{sname}.{sns}:{sport['port']}", local_port=local_port,
                    protocol=str(sport.get("protocol") or "HTTP"), endpoints=tuple(endpoints),
                    spiffe_ids=tuple(sorted(set(ids))))


def plan_gateway(resources: Sequence[Any], gateway: mesh_model.Gateway, trust_domain: str
                 ) -> SidecarPlan:
    """An ingress gateway: TLS listeners for outside clients, mTLS to the workloads."""
    namespace = gateway.meta.namespace
    listeners = []
    for server in gateway.servers:
        routes = []
        for r in server.routes:
            up = _upstream(resources, r.service, r.port, namespace, 0, trust_domain)
            if up is not None and up.endpoints:
                routes.append((r.path_prefix, up))
        listeners.append(GatewayListener(server.port, server.hosts, server.tls_mode,
                                         tuple(routes)))
    return SidecarPlan(node_id=f"{namespace}/{gateway.meta.name}",
                       spiffe_id=mesh_model.workload_spiffe_id(gateway, trust_domain),
                       address=gateway.address, gateways=tuple(listeners))


def check_resources(merged: Sequence[Any], applied: Sequence[Any], trust_domain: str,
                    root_namespace: str) -> list[str]:
    """Refuse configurations no sidecar could run (InvalidInput); warn about the rest."""
    warnings: list[str] = []
    listen: dict[tuple[str, int], str] = {}
    workloads = _of_kind(merged, "Workload")
    for w in workloads:
        doc = _doc(w)
        namespace, name, _ = _meta(doc)
        spec = doc.get("spec") or {}
        address = str(spec.get("address") or "127.0.0.1")
        ports = [(address, int(p["sidecarPort"]), "sidecarPort") for p in spec.get("ports") or []]
        ports += [("127.0.0.1", int(u["localPort"]), "localPort")
                  for u in spec.get("upstreams") or []]
        for host, port, what in ports:
            owner = listen.get((host, port))
            if owner is not None and owner != f"{namespace}/{name}":
                raise InvalidInput(f"Workload {namespace}/{name}: {what} {port} on {host} is "
                                   f"already used by Workload {owner}")
            listen[(host, port)] = f"{namespace}/{name}"
        for u in spec.get("upstreams") or []:
            service = _find_service(merged, str(u["service"]), namespace)
            if service is None:
                warnings.append(f"Workload {namespace}/{name}: upstream service {u['service']} "
                                "does not exist (yet); its local port will not listen")
                continue
            ports_of = [int(sp["port"]) for sp in (service.get("spec") or {}).get("ports") or []]
            if int(u["port"]) not in ports_of:
                warnings.append(f"Workload {namespace}/{name}: service {u['service']} has no "
                                f"port {u['port']}")
    for gw in _of_kind(merged, "Gateway"):
        ref = f"{gw.meta.namespace}/{gw.meta.name}"
        for server in gw.servers:
            owner = listen.get((gw.address, server.port))
            if owner is not None and owner != ref:
                raise InvalidInput(f"Gateway {ref}: port {server.port} on {gw.address} is "
                                   f"already used by {owner}")
            listen[(gw.address, server.port)] = ref
            for r in server.routes:
                if _find_service(merged, r.service, gw.meta.namespace) is None:
                    warnings.append(f"Gateway {ref}: route {r.path_prefix} names service "
                                    f"{r.service}, which does not exist (yet)")
    for s in _of_kind(merged, "Service"):
        doc = _doc(s)
        if not _selected(doc, workloads):
            namespace, name, _ = _meta(doc)
            warnings.append(f"Service {namespace}/{name} selects no Workload")
    warnings += authz.tcp_warnings(_of_kind(merged, "AuthorizationPolicy"),
                                   [_workload_view(w) for w in workloads], root_namespace)
    return warnings


def _workload_view(w: Any) -> Any:
    return w


def _normalise_path(path: str) -> str:
    """The path Envoy's inbound listener matches on (normalize_path, merge_slashes)."""
    raw, sep, query = path.partition("?")
    if not raw.startswith("/"):
        raw = "/" + raw
    norm = posixpath.normpath(raw)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if raw.endswith("/") and norm != "/":
        norm += "/"
    return norm + (sep + query if sep else "")


def explain(resources: Sequence[Any], query: Mapping[str, Any], trust_domain: str,
            root_namespace: str) -> dict[str, Any]:
    """Decide a call the way the destination's sidecar will, and say why."""
    namespace = str(query.get("namespace") or "default")
    name = str(query.get("workload") or "")
    workload = find_workload(resources, f"{namespace}/{name}")
    if workload is None:
        raise NotFound(f"no Workload {namespace}/{name}", field="workload")
    doc = _doc(workload)
    _, _, labels = _meta(doc)
    ports = (doc.get("spec") or {}).get("ports") or []
    port = query.get("port")
    if port is None:
        if not ports:
            raise InvalidInput(f"Workload {namespace}/{name} has no ports", field="port")
        port = int(ports[0]["port"])
    match = next((p for p in ports if int(p["port"]) == int(port)), None)
    if match is None:
        raise InvalidInput(f"Workload {namespace}/{name} has no port {port}", field="port")
    protocol = "TCP" if str(match.get("protocol") or "HTTP") == "TCP" else "HTTP"
    peer_policies = _policies(resources, "PeerAuthentication")
    mode, mode_policy = peerauthn.effective_mtls(peer_policies, namespace, labels, int(port),
                                                 root_namespace)
    source = query.get("source_principal") or None
    if source and not str(source).startswith("spiffe://"):
        source = f"spiffe://{source}"
    lines = [f"destination: Workload {namespace}/{name} port {port} ({protocol}), "
             f"mTLS {mode}" + (f" (from PeerAuthentication {mode_policy})" if mode_policy
                               else " (default)")]
    if source is None and str(mode) == "STRICT":
        summary = "DENY: strict mTLS refuses a caller without an identity"
        lines.append(summary)
        return {"allowed": False, "mtls_mode": str(mode), "policy": mode_policy,
                "rule": None, "action": "MTLS", "summary": summary, "explanation": lines}
    request = authz.AuthzRequest(
        source_principal=source, source_ip=str(query.get("source_ip") or "127.0.0.1"),
        destination_namespace=namespace, destination_labels=labels,
        destination_port=int(port), protocol=protocol,
        host=str(query.get("host") or ""), method=str(query.get("method") or "GET").upper(),
        path=_normalise_path(str(query.get("path") or "/")),
        headers={str(k).lower(): str(v) for k, v in (query.get("headers") or {}).items()})
    decision = authz.evaluate(_policies(resources, "AuthorizationPolicy"), request,
                              root_namespace=root_namespace)
    out = decision.to_json()
    summary = out.get("summary") or ("ALLOW" if decision.allowed else "DENY")
    lines.append(str(summary))
    for extra in out.get("details", []) or []:
        lines.append(f"  {extra}")
    out.update({"allowed": decision.allowed, "mtls_mode": str(mode), "summary": summary,
                "explanation": lines})
    return out

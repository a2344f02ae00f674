"""Mesh resources and their strict YAML decoding: pure.

Kinds users already write for Istio (``security.istio.io/v1`` or ``v1beta1``
AuthorizationPolicy and PeerAuthentication) and trustmesh's small service
registry (``mesh.trustmesh.io/v1alpha1`` Workload and Service). Decoding is
all or nothing: an unknown kind, field or enum value, or an invalid
combination, is refused with the source, the document and the dotted path of
the offending field.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from trustmesh.errors import InvalidInput

__all__ = [
    "AUTHZ_ACTIONS",
    "MTLS_MODES",
    "AuthorizationPolicy",
    "Condition",
    "Gateway",
    "GatewayRoute",
    "GatewayServer",
    "Meta",
    "Operation",
    "PeerAuthentication",
    "Rule",
    "Service",
    "ServicePort",
    "Source",
    "Upstream",
    "Workload",
    "WorkloadPort",
    "canonical_kind",
    "dump_resource",
    "load_mesh_resources",
    "normalise_principal",
    "resource_from_dict",
    "resource_key",
    "workload_spiffe_id",
]

ISTIO_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1")
REGISTRY_VERSION = "mesh.trustmesh.io/v1alpha1"
AUTHZ_ACTIONS = ("ALLOW", "DENY", "AUDIT")
MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "TCP")
DRY_RUN_ANNOTATION = "istio.io/dry-run"

_KINDS = {
    "AuthorizationPolicy": ISTIO_VERSIONS,
    "PeerAuthentication": ISTIO_VERSIONS,
    "Workload": (REGISTRY_VERSION,),
    "Service": (REGISTRY_VERSION,),
    "Gateway": (REGISTRY_VERSION,),
}
_ALIASES = {
    "authorizationpolicy": "AuthorizationPolicy", "authorizationpolicies": "AuthorizationPolicy",
    "ap": "AuthorizationPolicy",
    "peerauthentication": "PeerAuthentication", "peerauthentications": "PeerAuthentication",
    "pa": "PeerAuthentication",
    "workload": "Workload", "workloads": "Workload", "wl": "Workload",
    "service": "Service", "services": "Service", "svc": "Service",
    "gateway": "Gateway", "gateways": "Gateway", "gw": "Gateway",
}
# Keys of `when` conditions trustmesh can enforce (those of Istio's list that need no
# JWT authentication and no experimental extension).
CONDITION_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.principal",
                  "destination.ip", "destination.port", "connection.sni")
_HEADER_KEY = re.compile(r"^request\.headers\[([!#$%&'*+.^_`|~0-9A-Za-z-]+)\]$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_METHOD = re.compile(r"^[A-Z]+$")


class _Path:
    """Builds error messages that point at the offending field."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def fail(self, path: str, message: str) -> InvalidInput:
        return InvalidInput(f"{self.prefix}: {path}: {message}" if path else
                            f"{self.prefix}: {message}")


# -- generic readers ------------------------------------------------------------------
def _mapping(ctx: _Path, value: Any, path: str, allowed: Sequence[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"must be a mapping, not {type(value).__name__}")
    for key in value:
        if key not in allowed:
            raise ctx.fail(f"{path}.{key}" if path else str(key), "unknown field")
    return dict(value)


def _string(ctx: _Path, value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise ctx.fail(path, "must be a non-empty string")
    return value


def _str_list(ctx: _Path, value: Any, path: str) -> tuple[str, ...] | None:
    """An optional list of strings; Istio refuses a present but empty list."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise ctx.fail(path, "must be a list of strings")
    if not value:
        raise ctx.fail(path, "must not be empty (leave the field out instead)")
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise ctx.fail(f"{path}[{i}]", "must be a string")
        if v == "":
            raise ctx.fail(f"{path}[{i}]", "must not be an empty string")
        out.append(str(v))
    return tuple(out)


def _labels(ctx: _Path, value: Any, path: str, noun: str = "label") -> Mapping[str, str]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ctx.fail(path, f"must be a mapping of {noun} names to values")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k:
            raise ctx.fail(path, f"{noun} name {k!r} must be a non-empty string")
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            # YAML reads an unquoted true or 1 as a boolean or a number
            raise ctx.fail(f"{path}.{k}", f"{noun} value must be a string (quote it: "
                           f"{k}: \"{str(v).lower() if isinstance(v, bool) else v}\")")
        out[k] = str(v)
    return MappingProxyType(out)


def _port(ctx: _Path, value: Any, path: str) -> int:
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not text.isdigit():
        raise ctx.fail(path, f"{value!r} is not a port number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ctx.fail(path, f"port {port} is out of range 1..65535")
    return port


def _cidrs(ctx: _Path, values: tuple[str, ...] | None, path: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    for i, v in enumerate(values):
        try:
            ipaddress.ip_network(v, strict=False)
        except ValueError:
            raise ctx.fail(f"{path}[{i}]", f"{v!r} is not an IP address or CIDR") from None
    return values


def _patterns(ctx: _Path, values: tuple[str, ...] | None, path: str
              ) -> tuple[str, ...] | None:
    """Istio string patterns: exact, ``prefix*``, ``*suffix`` or ``*``."""
    if values is None:
        return None
    for i, v in enumerate(values):
        if v != "*" and "*" in v[1:-1]:
            raise ctx.fail(f"{path}[{i}]", f"{v!r}: '*' may only start or end a value")
        if v.startswith("*") and v.endswith("*") and len(v) > 1:
            raise ctx.fail(f"{path}[{i}]", f"{v!r}: use a prefix or a suffix match, not both")
    return values


def normalise_principal(value: str) -> str:
    """Istio writes principals without the scheme (``cluster.local/ns/a/sa/b``)."""
    if value == "*" or value.startswith("spiffe://"):
        return value
    if value.startswith("*"):
        return value  # a suffix match on the path
    return "spiffe://" + value


# -- resources -------------------------------------------------------------------------
@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]


@dataclass(frozen=True)
class Source:
    principals: tuple[str, ...] | None = None
    not_principals: tuple[str, ...] | None = None
    namespaces: tuple[str, ...] | None = None
    not_namespaces: tuple[str, ...] | None = None
    ip_blocks: tuple[str, ...] | None = None
    not_ip_blocks: tuple[str, ...] | None = None
    remote_ip_blocks: tuple[str, ...] | None = None
    not_remote_ip_blocks: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Operation:
    hosts: tuple[str, ...] | None = None
    not_hosts: tuple[str, ...] | None = None
    ports: tuple[int, ...] | None = None
    not_ports: tuple[int, ...] | None = None
    methods: tuple[str, ...] | None = None
    not_methods: tuple[str, ...] | None = None
    paths: tuple[str, ...] | None = None
    not_paths: tuple[str, ...] | None = None

    def http_only(self) -> bool:
        return any(v is not None for v in (self.hosts, self.not_hosts, self.methods,
                                           self.not_methods, self.paths, self.not_paths))


@dataclass(frozen=True)
class Condition:
    key: str
    values: tuple[str, ...] | None
    not_values: tuple[str, ...] | None

    @property
    def header(self) -> str | None:
        m = _HEADER_KEY.match(self.key)
        return m.group(1).lower() if m else None


@dataclass(frozen=True)
class Rule:
    sources: tuple[Source, ...] | None  # `from`; None: any source
    operations: tuple[Operation, ...] | None  # `to`; None: any operation
    conditions: tuple[Condition, ...] = ()


@dataclass(frozen=True)
class AuthorizationPolicy:
    meta: Meta
    selector: Mapping[str, str] | None
    action: str
    rules: tuple[Rule, ...]
    raw: Mapping[str, Any]

    kind = "AuthorizationPolicy"

    @property
    def dry_run(self) -> bool:
        return self.meta.annotations.get(DRY_RUN_ANNOTATION) == "true"

    @property
    def ref(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class PeerAuthentication:
    meta: Meta
    selector: Mapping[str, str] | None
    mode: str
    port_modes: Mapping[int, str]
    raw: Mapping[str, Any]

    kind = "PeerAuthentication"

    @property
    def ref(self) -> str:
        return f"{self.meta.namespace}/{self.meta.name}"


@dataclass(frozen=True)
class WorkloadPort:
    name: str
    port: int
    protocol: str
    sidecar_port: int


@dataclass(frozen=True)
class Upstream:
    service: str
    port: int
    local_port: int


@dataclass(frozen=True)
class Workload:
    meta: Meta
    service_account: str
    spiffe_id: str | None
    address: str
    ports: tuple[WorkloadPort, ...]
    upstreams: tuple[Upstream, ...]
    raw: Mapping[str, Any]

    kind = "Workload"


@dataclass(frozen=True)
class ServicePort:
    name: str
    port: int
    target_port: int
    protocol: str


@dataclass(frozen=True)
class Service:
    meta: Meta
    selector: Mapping[str, str]
    ports: tuple[ServicePort, ...]
    raw: Mapping[str, Any]

    kind = "Service"


@dataclass(frozen=True)
class GatewayRoute:
    path_prefix: str
    service: str  # "name" or "namespace/name"
    port: int


@dataclass(frozen=True)
class GatewayServer:
    port: int
    hosts: tuple[str, ...]  # "*" or host names (the Host header, with or without port)
    tls_mode: str  # SIMPLE (server certificate) | MUTUAL (client certificate required too)
    routes: tuple[GatewayRoute, ...]


@dataclass(frozen=True)
class Gateway:
    """An ingress: TLS or mutual TLS for clients outside the mesh, mTLS into it."""

    meta: Meta
    service_account: str
    spiffe_id: str | None
    address: str
    servers: tuple[GatewayServer, ...]
    raw: Mapping[str, Any]

    kind = "Gateway"


MeshResource = AuthorizationPolicy | PeerAuthentication | Workload | Service | Gateway


# -- decoding --------------------------------------------------------------------------
def _meta(ctx: _Path, value: Any) -> Meta:
    m = _mapping(ctx, value, "metadata", ("name", "namespace", "labels", "annotations", "uid",
                                          "resourceVersion", "generation",
                                          "creationTimestamp"))
    name = _string(ctx, m.get("name"), "metadata.name")
    if not _NAME.match(name) or len(name) > 253:
        raise ctx.fail("metadata.name", f"{name!r} is not a valid name (lower-case letters, "
                       "digits, '-' and '.')")
    namespace = m.get("namespace", "default")
    if not isinstance(namespace, str) or not _DNS_LABEL.match(namespace) or len(namespace) > 63:
        raise ctx.fail("metadata.namespace", f"{namespace!r} is not a valid namespace name")
    return Meta(name, namespace, _labels(ctx, m.get("labels"), "metadata.labels"),
                _labels(ctx, m.get("annotations"), "metadata.annotations", "annotation"))


def _selector(ctx: _Path, value: Any, path: str) -> Mapping[str, str] | None:
    if value is None:
        return None
    sel = _mapping(ctx, value, path, ("matchLabels",))
    return _labels(ctx, sel.get("matchLabels"), f"{path}.matchLabels")


def _source(ctx: _Path, value: Any, path: str) -> Source:
    s = _mapping(ctx, value, path, ("principals", "notPrincipals", "namespaces",
                                    "notNamespaces", "ipBlocks", "notIpBlocks",
                                    "remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals",
                                    "notRequestPrincipals"))
    for key in ("requestPrincipals", "notRequestPrincipals"):
        if key in s:
            raise ctx.fail(f"{path}.{key}", "needs JWT request authentication, which "
                           "trustmesh does not support yet")

    def principals(key: str) -> tuple[str, ...] | None:
        values = _patterns(ctx, _str_list(ctx, s.get(key), f"{path}.{key}"), f"{path}.{key}")
        return tuple(normalise_principal(v) for v in values) if values is not None else None

    return Source(
        principals=principals("principals"), not_principals=principals("notPrincipals"),
        namespaces=_patterns(ctx, _str_list(ctx, s.get("namespaces"), f"{path}.namespaces"),
                             f"{path}.namespaces"),
        not_namespaces=_patterns(ctx, _str_list(ctx, s.get("notNamespaces"),
                                                f"{path}.notNamespaces"),
                                 f"{path}.notNamespaces"),
        ip_blocks=_cidrs(ctx, _str_list(ctx, s.get("ipBlocks"), f"{path}.ipBlocks"),
                         f"{path}.ipBlocks"),
        not_ip_blocks=_cidrs(ctx, _str_list(ctx, s.get("notIpBlocks"), f"{path}.notIpBlocks"),
                             f"{path}.notIpBlocks"),
        remote_ip_blocks=_cidrs(ctx, _str_list(ctx, s.get("remoteIpBlocks"),
                                               f"{path}.remoteIpBlocks"),
                                f"{path}.remoteIpBlocks"),
        not_remote_ip_blocks=_cidrs(ctx, _str_list(ctx, s.get("notRemoteIpBlocks"),
                                                   f"{path}.notRemoteIpBlocks"),
                                    f"{path}.notRemoteIpBlocks"))


def _operation(ctx: _Path, value: Any, path: str) -> Operation:
    o = _mapping(ctx, value, path, ("hosts", "notHosts", "ports", "notPorts", "methods",
                                    "notMethods", "paths", "notPaths"))

    def ports(key: str) -> tuple[int, ...] | None:
        values = _str_list(ctx, o.get(key), f"{path}.{key}")
        if values is None:
            return None
        return tuple(_port(ctx, v, f"{path}.{key}[{i}]") for i, v in enumerate(values))

    def methods(key: str) -> tuple[str, ...] | None:
        values = _patterns(ctx, _str_list(ctx, o.get(key), f"{path}.{key}"), f"{path}.{key}")
        for i, v in enumerate(values or ()):
            if v != "*" and not _METHOD.match(v.strip("*")):
                raise ctx.fail(f"{path}.{key}[{i}]", f"{v!r} is not an HTTP method "
                               "(upper case, e.g. GET)")
        return values

    def paths(key: str) -> tuple[str, ...] | None:
        values = _patterns(ctx, _str_list(ctx, o.get(key), f"{path}.{key}"), f"{path}.{key}")
        for i, v in enumerate(values or ()):
            if not (v.startswith("/") or v.startswith("*")):
                raise ctx.fail(f"{path}.{key}[{i}]", f"{v!r} must start with '/' (or '*')")
            if "?" in v or "#" in v:
                raise ctx.fail(f"{path}.{key}[{i}]", f"{v!r}: paths are matched without the "
                               "query or fragment")
            if "{" in v:
                raise ctx.fail(f"{path}.{key}[{i}]", f"{v!r}: path templates are not "
                               "supported yet")
        return values

    return Operation(
        hosts=_patterns(ctx, _str_list(ctx, o.get("hosts"), f"{path}.hosts"), f"{path}.hosts"),
        not_hosts=_patterns(ctx, _str_list(ctx, o.get("notHosts"), f"{path}.notHosts"),
                            f"{path}.notHosts"),
        ports=ports("ports"), not_ports=ports("notPorts"),
        methods=methods("methods"), not_methods=methods("notMethods"),
        paths=paths("paths"), not_paths=paths("notPaths"))


def _condition(ctx: _Path, value: Any, path: str) -> Condition:
    c = _mapping(ctx, value, path, ("key", "values", "notValues"))
    key = _string(ctx, c.get("key"), f"{path}.key")
    if key.startswith("request.auth.") or key.startswith("experimental."):
        raise ctx.fail(f"{path}.key", f"{key!r} needs JWT request authentication or an "
                       "experimental extension; trustmesh does not support it yet")
    if key not in CONDITION_KEYS and not _HEADER_KEY.match(key):
        raise ctx.fail(f"{path}.key", f"unknown condition key {key!r}; supported: "
                       f"request.headers[<name>], {', '.join(CONDITION_KEYS)}")
    values = _str_list(ctx, c.get("values"), f"{path}.values")
    not_values = _str_list(ctx, c.get("notValues"), f"{path}.notValues")
    if values is None and not_values is None:
        raise ctx.fail(path, "a condition needs values or notValues")
    for field, vals in (("values", values), ("notValues", not_values)):
        if vals is None:
            continue
        if key in ("source.ip", "remote.ip", "destination.ip"):
            _cidrs(ctx, vals, f"{path}.{field}")
        elif key == "destination.port":
            for i, v in enumerate(vals):
                _port(ctx, v, f"{path}.{field}[{i}]")
        else:
            _patterns(ctx, vals, f"{path}.{field}")
    if key == "source.principal":
        values = tuple(normalise_principal(v) for v in values) if values else values
        not_values = tuple(normalise_principal(v) for v in not_values) if not_values else (
            not_values)
    return Condition(key, values, not_values)


def _rules_list(ctx: _Path, value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise ctx.fail(path, "must be a list")
    if not value:
        raise ctx.fail(path, "must not be empty (leave the field out instead)")
    return value


def _authorization_policy(ctx: _Path, doc: dict[str, Any], meta: Meta) -> AuthorizationPolicy:
    spec = _mapping(ctx, doc.get("spec"), "spec", ("selector", "action", "rules", "provider",
                                                   "targetRef", "targetRefs"))
    for key in ("targetRef", "targetRefs"):
        if key in spec:
            raise ctx.fail(f"spec.{key}", "target references are not supported; use a "
                           "selector")
    action = spec.get("action", "ALLOW")
    if action == "CUSTOM":
        raise ctx.fail("spec.action", "CUSTOM (external authorization) is not supported yet")
    if action not in AUTHZ_ACTIONS:
        raise ctx.fail("spec.action", f"unknown action {action!r}; expected one of "
                       f"{', '.join(AUTHZ_ACTIONS)}")
    if "provider" in spec:
        raise ctx.fail("spec.provider", "only valid with action CUSTOM")
    rules = []
    raw_rules = spec.get("rules")
    if raw_rules is not None:
        if not isinstance(raw_rules, list):
            raise ctx.fail("spec.rules", "must be a list")
        for i, r in enumerate(raw_rules):
            rp = f"spec.rules[{i}]"
            rd = _mapping(ctx, r, rp, ("from", "to", "when"))
            sources = None
            if "from" in rd:
                sources = []
                for j, f in enumerate(_rules_list(ctx, rd["from"], f"{rp}.from")):
                    fd = _mapping(ctx, f, f"{rp}.from[{j}]", ("source",))
                    if not fd.get("source"):
                        raise ctx.fail(f"{rp}.from[{j}].source", "must name at least one "
                                       "field (Istio refuses a missing or empty source)")
                    source = _source(ctx, fd["source"], f"{rp}.from[{j}].source")
                    if source == Source():
                        raise ctx.fail(f"{rp}.from[{j}].source", "must name at least one "
                                       "field (Istio refuses a missing or empty source)")
                    sources.append(source)
            operations = None
            if "to" in rd:
                operations = []
                for j, t in enumerate(_rules_list(ctx, rd["to"], f"{rp}.to")):
                    td = _mapping(ctx, t, f"{rp}.to[{j}]", ("operation",))
                    if not td.get("operation"):
                        raise ctx.fail(f"{rp}.to[{j}].operation", "must name at least one "
                                       "field (Istio refuses a missing or empty operation)")
                    operation = _operation(ctx, td["operation"], f"{rp}.to[{j}].operation")
                    if operation == Operation():
                        raise ctx.fail(f"{rp}.to[{j}].operation", "must name at least one "
                                       "field (Istio refuses a missing or empty operation)")
                    operations.append(operation)
            conditions: tuple[Condition, ...] = ()
            if "when" in rd:
                conditions = tuple(_condition(ctx, c, f"{rp}.when[{j}]") for j, c in
                                   enumerate(_rules_list(ctx, rd["when"], f"{rp}.when")))
            rules.append(Rule(tuple(sources) if sources is not None else None,
                              tuple(operations) if operations is not None else None,
                              conditions))
    if action == "DENY" and not rules:
        raise ctx.fail("spec.rules", "a DENY policy without rules would never match; add "
                       "`rules: [{}]` to deny every request")
    dry = meta.annotations.get(DRY_RUN_ANNOTATION)
    if dry is not None and dry not in ("true", "false"):
        raise ctx.fail(f"metadata.annotations.{DRY_RUN_ANNOTATION}",
                       f"must be \"true\" or \"false\", not {dry!r}")
    return AuthorizationPolicy(meta, _selector(ctx, spec.get("selector"), "spec.selector"),
                               str(action), tuple(rules), doc)


def _mode(ctx: _Path, value: Any, path: str) -> str:
    m = _mapping(ctx, value, path, ("mode",))
    mode = m.get("mode", "UNSET")
    if mode not in MTLS_MODES:
        raise ctx.fail(f"{path}.mode", f"unknown mode {mode!r}; expected one of "
                       f"{', '.join(MTLS_MODES)}")
    return str(mode)


def _peer_authentication(ctx: _Path, doc: dict[str, Any], meta: Meta) -> PeerAuthentication:
    spec = _mapping(ctx, doc.get("spec"), "spec", ("selector", "mtls", "portLevelMtls"))
    selector = _selector(ctx, spec.get("selector"), "spec.selector")
    mode = _mode(ctx, spec.get("mtls"), "spec.mtls") if spec.get("mtls") is not None else "UNSET"
    ports: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        if not selector:
            raise ctx.fail("spec.portLevelMtls", "needs a workload selector (Istio applies "
                           "port-level mTLS only to selected workloads)")
        if not isinstance(raw_ports, Mapping) or not raw_ports:
            raise ctx.fail("spec.portLevelMtls", "must be a non-empty mapping of port to mtls")
        for key, value in raw_ports.items():
            port = _port(ctx, key, f"spec.portLevelMtls.{key}")
            ports[port] = _mode(ctx, value, f"spec.portLevelMtls.{key}")
    return PeerAuthentication(meta, selector, mode, MappingProxyType(ports), doc)


def _service_ref(ctx: _Path, value: Any, path: str) -> str:
    """``name`` (the Workload's namespace) or ``namespace/name``."""
    ref = _string(ctx, value, path)
    namespace, _, name = ref.rpartition("/")
    if (namespace and not _DNS_LABEL.match(namespace)) or not _NAME.match(name):
        raise ctx.fail(path, f"{ref!r} is not a Service name (\"name\" or "
                       "\"namespace/name\")")
    return ref


def _workload(ctx: _Path, doc: dict[str, Any], meta: Meta) -> Workload:
    spec = _mapping(ctx, doc.get("spec"), "spec", ("serviceAccount", "spiffeId", "address",
                                                   "ports", "upstreams"))
    sa = spec.get("serviceAccount", "default")
    if not isinstance(sa, str) or not _NAME.match(sa):
        raise ctx.fail("spec.serviceAccount", f"{sa!r} is not a valid service account name")
    spiffe_id = spec.get("spiffeId")
    if spiffe_id is not None:
        from trustmesh.spiffe.ids import SpiffeId

        try:
            spiffe_id = str(SpiffeId.parse(_string(ctx, spiffe_id, "spec.spiffeId")))
        except InvalidInput as exc:
            raise ctx.fail("spec.spiffeId", str(exc)) from None
    address = spec.get("address", "127.0.0.1")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ctx.fail("spec.address", f"{address!r} is not an IP address") from None
    ports = []
    seen: set[str] = set()
    for i, p in enumerate(spec.get("ports") or []):
        pp = f"spec.ports[{i}]"
        pd = _mapping(ctx, p, pp, ("name", "port", "protocol", "sidecarPort"))
        name = str(pd.get("name") or f"port-{i}")
        if name in seen:
            raise ctx.fail(f"{pp}.name", f"duplicate port name {name!r}")
        seen.add(name)
        protocol = pd.get("protocol", "HTTP")
        if protocol not in PROTOCOLS:
            raise ctx.fail(f"{pp}.protocol", f"unknown protocol {protocol!r}; expected one of "
                           f"{', '.join(PROTOCOLS)}")
        if "sidecarPort" not in pd:
            raise ctx.fail(f"{pp}.sidecarPort", "is required (where the sidecar accepts "
                           "connections for this port)")
        port = _port(ctx, pd.get("port"), f"{pp}.port")
        sidecar = _port(ctx, pd.get("sidecarPort"), f"{pp}.sidecarPort")
        if sidecar == port:
            raise ctx.fail(f"{pp}.sidecarPort", "must differ from the application's port")
        ports.append(WorkloadPort(name, port, str(protocol), sidecar))
    if len({p.port for p in ports}) != len(ports):
        raise ctx.fail("spec.ports", "an application port is listed twice")
    upstreams = []
    for i, u in enumerate(spec.get("upstreams") or []):
        up = f"spec.upstreams[{i}]"
        ud = _mapping(ctx, u, up, ("service", "port", "localPort"))
        upstreams.append(Upstream(_service_ref(ctx, ud.get("service"), f"{up}.service"),
                                  _port(ctx, ud.get("port"), f"{up}.port"),
                                  _port(ctx, ud.get("localPort"), f"{up}.localPort")))
    if len({u.local_port for u in upstreams}) != len(upstreams):
        raise ctx.fail("spec.upstreams", "two upstreams use the same localPort")
    return Workload(meta, sa, spiffe_id, str(address), tuple(ports), tuple(upstreams), doc)


def _service(ctx: _Path, doc: dict[str, Any], meta: Meta) -> Service:
    spec = _mapping(ctx, doc.get("spec"), "spec", ("selector", "ports"))
    selector = _labels(ctx, spec.get("selector"), "spec.selector")
    if not selector:
        raise ctx.fail("spec.selector", "is required (the labels of the Service's Workloads)")
    ports = []
    for i, p in enumerate(spec.get("ports") or []):
        pp = f"spec.ports[{i}]"
        pd = _mapping(ctx, p, pp, ("name", "port", "targetPort", "protocol"))
        protocol = pd.get("protocol", "HTTP")
        if protocol not in PROTOCOLS:
            raise ctx.fail(f"{pp}.protocol", f"unknown protocol {protocol!r}; expected one of "
                           f"{', '.join(PROTOCOLS)}")
        port = _port(ctx, pd.get("port"), f"{pp}.port")
        target = _port(ctx, pd.get("targetPort", port), f"{pp}.targetPort")
        ports.append(ServicePort(str(pd.get("name") or f"port-{i}"), port, target,
                                 str(protocol)))
    if not ports:
        raise ctx.fail("spec.ports", "a Service needs at least one port")
    return Service(meta, selector, tuple(ports), doc)


def _gateway(ctx: _Path, doc: dict[str, Any], meta: Meta) -> Gateway:
    spec = _mapping(ctx, doc.get("spec"), "spec", ("serviceAccount", "spiffeId", "address",
                                                   "servers"))
    identity = _workload(ctx, {"spec": {k: v for k, v in spec.items() if k != "servers"}},
                         meta)
    servers = []
    raw_servers = spec.get("servers")
    if not isinstance(raw_servers, list) or not raw_servers:
        raise ctx.fail("spec.servers", "a Gateway needs at least one server")
    for i, srv in enumerate(raw_servers):
        sp = f"spec.servers[{i}]"
        sd = _mapping(ctx, srv, sp, ("port", "hosts", "tls", "routes"))
        port = _port(ctx, sd.get("port"), f"{sp}.port")
        hosts = _str_list(ctx, sd.get("hosts"), f"{sp}.hosts") or ("*",)
        tls = _mapping(ctx, sd.get("tls"), f"{sp}.tls", ("mode",))
        mode = tls.get("mode", "SIMPLE")
        if mode not in ("SIMPLE", "MUTUAL"):
            raise ctx.fail(f"{sp}.tls.mode", f"unknown mode {mode!r}; expected SIMPLE or "
                           "MUTUAL (plaintext ingress is not offered)")
        routes = []
        raw_routes = sd.get("routes")
        if not isinstance(raw_routes, list) or not raw_routes:
            raise ctx.fail(f"{sp}.routes", "a server needs at least one route")
        for j, r in enumerate(raw_routes):
            rp = f"{sp}.routes[{j}]"
            rd = _mapping(ctx, r, rp, ("pathPrefix", "service", "port"))
            prefix = rd.get("pathPrefix", "/")
            if not isinstance(prefix, str) or not prefix.startswith("/"):
                raise ctx.fail(f"{rp}.pathPrefix", "must start with '/'")
            routes.append(GatewayRoute(prefix, _service_ref(ctx, rd.get("service"),
                                                            f"{rp}.service"),
                                       _port(ctx, rd.get("port"), f"{rp}.port")))
        servers.append(GatewayServer(port, hosts, str(mode), tuple(routes)))
    if len({s.port for s in servers}) != len(servers):
        raise ctx.fail("spec.servers", "two servers use the same port")
    return Gateway(meta, identity.service_account, identity.spiffe_id, identity.address,
                   tuple(servers), doc)


_DECODERS: dict[str, Callable[[_Path, dict[str, Any], Meta], MeshResource]] = {
    "AuthorizationPolicy": _authorization_policy,
             "PeerAuthentication": _peer_authentication,
             "Workload": _workload, "Service": _service, "Gateway": _gateway}


def _decode(doc: Any, prefix: str) -> MeshResource:
    ctx = _Path(prefix)
    if not isinstance(doc, Mapping):
        raise ctx.fail("", "a resource must be a mapping with apiVersion, kind and metadata")
    kind = doc.get("kind")
    if kind not in _KINDS:
        raise ctx.fail("kind", f"unknown kind {kind!r}; expected one of {', '.join(_KINDS)}")
    version = doc.get("apiVersion")
    if version not in _KINDS[kind]:
        raise ctx.fail("apiVersion", f"{kind} needs apiVersion {' or '.join(_KINDS[kind])}, "
                       f"not {version!r}")
    raw_meta = doc.get("metadata")
    if isinstance(raw_meta, Mapping) and isinstance(raw_meta.get("name"), str):
        # name the resource in every message, metadata's own included
        ns = raw_meta.get("namespace", "default")
        ctx.prefix = f"{prefix} ({kind} {ns}/{raw_meta['name']})"
    _mapping(ctx, doc, "", ("apiVersion", "kind", "metadata", "spec", "status"))
    meta = _meta(ctx, raw_meta)
    ctx.prefix = f"{prefix} ({kind} {meta.namespace}/{meta.name})"
    canonical = {"apiVersion": version, "kind": kind,
                 "metadata": {k: v for k, v in (
                     ("name", meta.name), ("namespace", meta.namespace),
                     ("labels", dict(meta.labels)), ("annotations", dict(meta.annotations)))
                     if v},
                 "spec": doc.get("spec") or {}}
    return _DECODERS[kind](ctx, canonical, meta)


def load_mesh_resources(text: str, *, source: str = "<input>") -> list[MeshResource]:
    """Decode multi-document YAML; every document or none (InvalidInput with the path)."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInput(f"{source}: not valid YAML{where}: {problem}") from None
    out: list[MeshResource] = []
    seen: dict[tuple[str, str, str], int] = {}
    index = 0
    for doc in docs:
        items = doc.get("items") if isinstance(doc, Mapping) and doc.get("kind") == "List" else [
            doc]
        if not isinstance(items, list):
            raise InvalidInput(f"{source}: a List needs items")
        for item in items:
            index += 1
            r = _decode(item, f"{source}: document {index}")
            key = resource_key(r)
            if key in seen:
                raise InvalidInput(f"{source}: document {index}: {key[0]} {key[1]}/{key[2]} "
                                   f"is also document {seen[key]}")
            seen[key] = index
            out.append(r)
    return out


def resource_from_dict(doc: Mapping[str, Any]) -> MeshResource:
    return _decode(doc, "stored resource")


def resource_key(r: MeshResource) -> tuple[str, str, str]:
    return (r.kind, r.meta.namespace, r.meta.name)


def dump_resource(r: MeshResource) -> dict[str, Any]:
    """The canonical document (loads back to an equal resource); the caller's to keep."""
    return copy.deepcopy(dict(r.raw))


def canonical_kind(kind: str) -> str:
    found = _ALIASES.get(kind.lower())
    if found is None:
        raise InvalidInput(f"unknown kind {kind!r}; expected authorizationpolicies, "
                           "peerauthentications, workloads, services or gateways")
    return found


def workload_spiffe_id(w: Workload | Gateway, trust_domain: str) -> str:
    return w.spiffe_id or (f"spiffe://{trust_domain}/ns/{w.meta.namespace}/sa/"
                           f"{w.service_account}")

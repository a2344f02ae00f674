"""AuthorizationPolicy evaluation with Istio's semantics: pure.

Order: a matching DENY policy denies; else, when ALLOW policies select the
workload, one of them must match; when none selects it, the request is
allowed. AUDIT policies only record. Dry-run policies (``istio.io/dry-run:
"true"``) are evaluated on the side and reported, never enforced.

The matching primitives here (:func:`match_string`, :func:`namespace_regex`,
:func:`host_regex`, :func:`effective_rules`) are the ones the Envoy RBAC
compiler (``trustmesh.mesh.envoy.rbac``) translates, so ``policy explain``
and the sidecars decide alike. Paths are matched as the sidecar's RBAC filter
sees them (:func:`normalise_path`): the inbound HTTP connection manager
normalises them before any filter runs.
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from trustmesh.errors import InvalidInput
from trustmesh.policy.mesh_model import (
    AuthorizationPolicy,
    Condition,
    Operation,
    Rule,
    Source,
    Workload,
)

__all__ = [
    "AuthzDecision",
    "AuthzRequest",
    "applicable_policies",
    "effective_rules",
    "evaluate",
    "header_values",
    "host_regex",
    "match_string",
    "namespace_regex",
    "normalise_path",
    "tcp_warnings",
]

HTTP_ONLY_CONDITION_PREFIX = "request."


@dataclass(frozen=True)
class AuthzRequest:
    """A call as the destination's sidecar sees it."""

    source_principal: str | None  # the peer's SPIFFE ID; None without mTLS
    source_ip: str = "127.0.0.1"
    remote_ip: str | None = None  # defaults to source_ip (no proxies in front)
    destination_namespace: str = "default"
    destination_labels: Mapping[str, str] = field(default_factory=dict)
    destination_ip: str = "127.0.0.1"
    destination_port: int = 80  # the application's port (the one policies name)
    protocol: str = "HTTP"  # HTTP or TCP
    host: str = ""
    method: str = "GET"
    path: str = "/"  # as the client sent it; normalised for matching (normalise_path)
    # lower-case names; a sequence for a header sent more than once
    headers: Mapping[str, str | Sequence[str]] = field(default_factory=dict)
    sni: str = ""

    @classmethod
    def to_workload(cls, workload: Workload, port: int, *, source_principal: str | None,
                    **fields: Any) -> AuthzRequest:
        """A request to ``workload``'s application ``port`` (namespace, labels, address and
        protocol taken from the Workload); ``fields`` set the rest."""
        match = next((p for p in workload.ports if p.port == port), None)
        if match is None:
            raise InvalidInput(f"Workload {workload.meta.namespace}/{workload.meta.name} has "
                               f"no port {port}", field="port")
        return cls(source_principal=source_principal,
                   destination_namespace=workload.meta.namespace,
                   destination_labels=dict(workload.meta.labels),
                   destination_ip=workload.address, destination_port=port,
                   protocol="TCP" if match.protocol == "TCP" else "HTTP", **fields)


@dataclass(frozen=True)
class Match:
    policy: str  # namespace/name
    action: str
    rule: int


@dataclass(frozen=True)
class AuthzDecision:
    allowed: bool
    action: str  # DENY | ALLOW | NO_ALLOW_MATCH | NO_POLICY
    policy: str | None
    rule: int | None
    reason: str
    audited: tuple[Match, ...] = ()
    dry_run: tuple[dict[str, Any], ...] = ()

    def to_json(self) -> dict[str, Any]:
        verdict = "ALLOW" if self.allowed else "DENY"
        summary = f"{verdict}: {self.reason}"
        details = [f"audited by {m.policy} rule {m.rule}" for m in self.audited]
        details += [f"dry run: {d['policy']} would {'allow' if d['allowed'] else 'deny'} "
                    f"({d['reason']})" for d in self.dry_run]
        return {"allowed": self.allowed, "action": self.action, "policy": self.policy,
                "rule": self.rule, "reason": self.reason, "summary": summary,
                "audited": [{"policy": m.policy, "rule": m.rule} for m in self.audited],
                "dry_run": list(self.dry_run), "details": details}


# -- the request path the sidecar's RBAC filter sees ------------------------------------
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
_HEX = frozenset(string.hexdigits)
_DOT_WITH_PARAMS = re.compile(r"^(\.\.?);")


def _canonical_segment(segment: str) -> str:
    """Decode escapes of unreserved characters, escape what Envoy's canonicaliser escapes."""
    out = []
    i = 0
    while i < len(segment):
        c = segment[i]
        digits = segment[i + 1:i + 3]
        if c == "%" and len(digits) == 2 and set(digits) <= _HEX:
            decoded = chr(int(digits, 16))
            out.append(decoded if decoded in _UNRESERVED else segment[i:i + 3])
            i += 3
            continue
        if ord(c) > 0x7E or c in '"<>{}|^` ' or ord(c) < 0x20:
            out.append("".join(f"%{b:02X}" for b in c.encode()))
        else:
            out.append(c)
        i += 1
    return "".join(out)


def normalise_path(path: str) -> str:
    """The path a trustmesh sidecar's RBAC filter matches for a request line's target.

    The inbound HTTP connection manager normalises before any filter runs
    (``normalize_path``, ``merge_slashes``, escaped slashes unescaped), and RBAC's
    ``url_path`` leaves the query out. So: query and fragment dropped (Envoy refuses a
    fragment; the rest of the target is what counts), ``%2F``/``%5C`` and backslashes
    become ``/`` (Envoy redirects there), escapes of unreserved characters decoded,
    ``.``/``..`` segments resolved (RFC 3986 5.2.4; a dot segment with ``;`` parameters
    counts as one, as in Envoy), then runs of ``/`` merged.
    """
    path = path.split("#", 1)[0].split("?", 1)[0]
    path = re.sub("%(2[fF]|5[cC])", "/", path).replace("\\", "/")
    segments = path.lstrip("/").split("/") if path not in ("", "/") else []
    out: list[str] = []
    for n, raw in enumerate(segments):
        last = n == len(segments) - 1
        dotted = _DOT_WITH_PARAMS.match(raw)
        segment = dotted.group(1) if dotted else _canonical_segment(raw)
        if segment in (".", ".."):
            if segment == ".." and out:
                out.pop()
            if last:
                out.append("")
            continue
        out.append(segment)
    return re.sub("/{2,}", "/", "/" + "/".join(out))


# -- string matching shared with the RBAC compiler -------------------------------------
def match_string(pattern: str, value: str | None) -> bool:
    """Istio's exact, ``prefix*``, ``*suffix`` and ``*`` (present) matching."""
    if value is None:
        return False
    if pattern == "*":
        return True
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    return value == pattern


def _pattern_regex(pattern: str, segment: str) -> str:
    if pattern == "*":
        return segment
    if pattern.endswith("*"):
        return re.escape(pattern[:-1]) + segment.replace("+", "*")
    if pattern.startswith("*"):
        return segment.replace("+", "*") + re.escape(pattern[1:])
    return re.escape(pattern)


def namespace_regex(pattern: str) -> str:
    """The principal regex Istio uses for a source namespace."""
    return ".*/ns/" + _pattern_regex(pattern, "[^/]+") + "/.*"


def host_regex(pattern: str) -> str:
    """Hosts match case-insensitively, with or without a port."""
    return "(?i)" + _pattern_regex(pattern, ".+") + "(:[0-9]+)?"


def _in_cidrs(ip: str | None, cidrs: Iterable[str]) -> bool:
    if not ip:
        return False
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in ipaddress.ip_network(c, strict=False) for c in cidrs)


# -- TCP semantics ------------------------------------------------------------------------
def _condition_http_only(c: Condition) -> bool:
    return c.key.startswith(HTTP_ONLY_CONDITION_PREFIX)


def _rule_http_only(rule: Rule) -> bool:
    return any(o.http_only() for o in rule.operations or ()) or any(
        _condition_http_only(c) for c in rule.conditions)


def _widen(rule: Rule) -> Rule:
    ops = None
    if rule.operations is not None:
        ops = tuple(replace(o, hosts=None, not_hosts=None, methods=None, not_methods=None,
                            paths=None, not_paths=None) for o in rule.operations)
    return Rule(rule.sources, ops, tuple(c for c in rule.conditions
                                         if not _condition_http_only(c)))


def effective_rules(policy: AuthorizationPolicy, protocol: str) -> list[tuple[int, Rule]]:
    """The rules that apply on a port of this protocol, with their original index.

    On TCP, HTTP-only fields cannot be checked: an ALLOW (or AUDIT) rule using one is
    dropped, and a DENY rule is kept without them (it widens), as Istio does.
    """
    out = []
    for i, rule in enumerate(policy.rules):
        if protocol == "TCP" and _rule_http_only(rule):
            if policy.action == "DENY":
                out.append((i, _widen(rule)))
            continue
        out.append((i, rule))
    return out


# -- matching -----------------------------------------------------------------------------
def _any(patterns: Sequence[str] | None, value: str | None) -> bool:
    return any(match_string(p, value) for p in patterns or ())


def _source_matches(s: Source, r: AuthzRequest) -> bool:
    p = r.source_principal
    remote = r.remote_ip or r.source_ip
    if s.principals is not None and not _any(s.principals, p):
        return False
    if s.not_principals is not None and _any(s.not_principals, p):
        return False
    if s.namespaces is not None and not (p and any(
            re.fullmatch(namespace_regex(n), p) for n in s.namespaces)):
        return False
    if s.not_namespaces is not None and p and any(
            re.fullmatch(namespace_regex(n), p) for n in s.not_namespaces):
        return False
    if s.ip_blocks is not None and not _in_cidrs(r.source_ip, s.ip_blocks):
        return False
    if s.not_ip_blocks is not None and _in_cidrs(r.source_ip, s.not_ip_blocks):
        return False
    if s.remote_ip_blocks is not None and not _in_cidrs(remote, s.remote_ip_blocks):
        return False
    return not (s.not_remote_ip_blocks is not None and _in_cidrs(remote,
                                                                 s.not_remote_ip_blocks))


def _host_matches(patterns: Sequence[str], host: str) -> bool:
    return bool(host) and any(re.fullmatch(host_regex(h), host) for h in patterns)


def _operation_matches(o: Operation, r: AuthzRequest) -> bool:
    http = r.protocol != "TCP"
    if http and o.hosts is not None and not _host_matches(o.hosts, r.host):
        return False
    if http and o.not_hosts is not None and _host_matches(o.not_hosts, r.host):
        return False
    if o.ports is not None and r.destination_port not in o.ports:
        return False
    if o.not_ports is not None and r.destination_port in o.not_ports:
        return False
    if http and o.methods is not None and not _any(o.methods, r.method):
        return False
    if http and o.not_methods is not None and _any(o.not_methods, r.method):
        return False
    path = normalise_path(r.path)
    if http and o.paths is not None and not _any(o.paths, path):
        return False
    return not (http and o.not_paths is not None and _any(o.not_paths, path))


def header_values(r: AuthzRequest, name: str) -> tuple[str, ...]:
    """A request header's values as Envoy's header matchers see them: each value of a
    repeated header on its own, surrounding whitespace trimmed, ``host`` being the
    authority."""
    if name == "host" and r.host:
        return (r.host.strip(),)
    value = r.headers.get(name)
    if value is None:
        return ()
    return (value.strip(),) if isinstance(value, str) else tuple(v.strip() for v in value)


def _condition_value(c: Condition, r: AuthzRequest) -> tuple[str, str | None]:
    """(how to compare, the request's value) for conditions on the connection."""
    return {
        "source.ip": ("ip", r.source_ip),
        "remote.ip": ("ip", r.remote_ip or r.source_ip),
        "destination.ip": ("ip", r.destination_ip),
        "destination.port": ("port", str(r.destination_port)),
        "source.principal": ("string", r.source_principal),
        "source.namespace": ("namespace", r.source_principal),
        "connection.sni": ("string", r.sni or None),
    }[c.key]


def _condition_hit(kind: str, patterns: Sequence[str], value: str | None) -> bool:
    if kind == "ip":
        return any(_in_cidrs(value, [p]) for p in patterns)
    if kind == "port":
        return value is not None and any(int(p) == int(value) for p in patterns)
    if kind == "namespace":
        return bool(value) and any(re.fullmatch(namespace_regex(p), value or "")
                                   for p in patterns)
    return _any(patterns, value)


def _condition_matches(c: Condition, r: AuthzRequest) -> bool:
    header = c.header
    if header is not None:  # any one value of the header may match
        values = header_values(r, header)
        if c.values is not None and not any(_any(c.values, v) for v in values):
            return False
        return not (c.not_values is not None and any(_any(c.not_values, v) for v in values))
    kind, value = _condition_value(c, r)
    if c.values is not None and not _condition_hit(kind, c.values, value):
        return False
    return not (c.not_values is not None and _condition_hit(kind, c.not_values, value))


def rule_matches(rule: Rule, r: AuthzRequest) -> bool:
    if rule.sources is not None and not any(_source_matches(s, r) for s in rule.sources):
        return False
    if rule.operations is not None and not any(_operation_matches(o, r)
                                               for o in rule.operations):
        return False
    return all(_condition_matches(c, r) for c in rule.conditions)


def _first_match(policy: AuthorizationPolicy, r: AuthzRequest) -> int | None:
    for i, rule in effective_rules(policy, "TCP" if r.protocol == "TCP" else "HTTP"):
        if rule_matches(rule, r):
            return i
    return None


# -- selection and evaluation --------------------------------------------------------------
def applicable_policies(policies: Iterable[AuthorizationPolicy], namespace: str,
                        labels: Mapping[str, str], root_namespace: str
                        ) -> list[AuthorizationPolicy]:
    """Policies that select a workload: its namespace's and the root namespace's, with a
    selector (all labels must match) or without one (every workload in scope)."""
    out = []
    for p in policies:
        if p.meta.namespace not in (namespace, root_namespace):
            continue
        if p.selector and any(labels.get(k) != v for k, v in p.selector.items()):
            continue
        out.append(p)
    return sorted(out, key=lambda p: (p.meta.namespace, p.meta.name))


def _decide(policies: Sequence[AuthorizationPolicy], r: AuthzRequest) -> AuthzDecision:
    audited = tuple(Match(p.ref, p.action, i) for p in policies if p.action == "AUDIT"
                    for i in [_first_match(p, r)] if i is not None)
    for p in policies:
        if p.action == "DENY":
            i = _first_match(p, r)
            if i is not None:
                return AuthzDecision(False, "DENY", p.ref, i,
                                     f"DENY policy {p.ref} rule {i} matched", audited)
    allows = [p for p in policies if p.action == "ALLOW"]
    if not allows:
        return AuthzDecision(True, "NO_POLICY", None, None,
                             "no ALLOW policy selects this workload", audited)
    for p in allows:
        i = _first_match(p, r)
        if i is not None:
            return AuthzDecision(True, "ALLOW", p.ref, i,
                                 f"ALLOW policy {p.ref} rule {i} matched", audited)
    names = ", ".join(p.ref for p in allows)
    only = allows[0].ref if len(allows) == 1 else None
    return AuthzDecision(False, "NO_ALLOW_MATCH", only, None,
                         f"no rule of the ALLOW policies ({names}) matched", audited)


def evaluate(policies: Iterable[AuthorizationPolicy], request: AuthzRequest, *,
             root_namespace: str = "istio-system") -> AuthzDecision:
    """Decide a request as the destination's sidecar does, and say why."""
    selected = applicable_policies(policies, request.destination_namespace,
                                   request.destination_labels, root_namespace)
    enforced = [p for p in selected if not p.dry_run]
    decision = _decide(enforced, request)
    shadows = []
    for p in selected:
        if not p.dry_run:
            continue
        i = _first_match(p, request)
        if p.action == "DENY":
            allowed, reason = i is None, (f"rule {i} matched" if i is not None else
                                          "no rule matched")
        elif p.action == "ALLOW":
            allowed, reason = i is not None, (f"rule {i} matched" if i is not None else
                                              "no rule matched")
        else:
            allowed, reason = True, (f"rule {i} matched" if i is not None else "no match")
        shadows.append({"policy": p.ref, "action": p.action, "rule": i, "allowed": allowed,
                        "reason": reason})
    return replace(decision, dry_run=tuple(shadows))


def tcp_warnings(policies: Iterable[AuthorizationPolicy], workloads: Iterable[Workload],
                 root_namespace: str) -> list[str]:
    """Say where HTTP-only fields meet TCP ports (Istio's documented behaviour)."""
    out = []
    policies = list(policies)
    for w in workloads:
        tcp_ports = [p.port for p in w.ports if p.protocol == "TCP"]
        if not tcp_ports:
            continue
        for p in applicable_policies(policies, w.meta.namespace, w.meta.labels,
                                     root_namespace):
            for i, rule in enumerate(p.rules):
                if not _rule_http_only(rule):
                    continue
                effect = ("is ignored on them (it allows nothing there)" if p.action != "DENY"
                          else "is enforced without its HTTP-only fields (it denies more)")
                out.append(f"AuthorizationPolicy {p.ref} rule {i} uses HTTP-only fields; "
                           f"Workload {w.meta.namespace}/{w.meta.name} has TCP port(s) "
                           f"{', '.join(map(str, tcp_ports))}: the {p.action} rule {effect}")
    return out

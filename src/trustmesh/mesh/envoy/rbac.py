"""AuthorizationPolicies -> Envoy RBAC for one workload port. Pure.

The compiler walks the same effective rules and uses the same string, host and
namespace patterns as :mod:`trustmesh.policy.authz`, so a request is allowed
by the sidecar exactly when ``policy explain`` says so.

HTTP ports get a fixed chain of RBAC filters, one per slot, in evaluation
order: AUDIT (action LOG), the dry-run slots (shadow rules, never enforced),
DENY, ALLOW. The filters themselves are neutral (no rules: they enforce
nothing); the rules of the policies that select the workload reach them as
``RBACPerRoute`` configs in the port's route configuration, keyed by the
slot's filter name. Envoy reads the route configuration for every request, so
a policy change is a route update (RDS) that applies to the next request on
connections already open, where a listener update would leave those
connections on the old filters until they drain. A slot no policy fills gets
an empty ``RBACPerRoute``, which turns the filter off for the route.

The ALLOW slot is filled as soon as one ALLOW policy selects the workload;
one with no matching rule denies everything (``spec: {}`` allows nothing).
Denied requests get Envoy's standard ``403 RBAC: access denied``. TCP ports
keep network RBAC filters on the listener (there are no routes). Envoy policy
names are ``<ns>/<name>/rule-<i>``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from envoy.config.core.v3 import address_pb2
from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.config.route.v3 import route_components_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import any_pb2

from trustmesh.policy.authz import applicable_policies, effective_rules, host_regex, namespace_regex
from trustmesh.policy.mesh_model import AuthorizationPolicy, Condition, Operation, Rule, Source

__all__ = ["HTTP_RBAC_SLOTS", "HttpRbacSlot", "compile_http_rbac", "compile_network_rbac",
           "compile_policies", "http_rbac_filters"]

_ACTIONS = {"ALLOW": rbac.RBAC.ALLOW, "DENY": rbac.RBAC.DENY, "AUDIT": rbac.RBAC.LOG}
_PRINCIPAL_KEYS = ("source.ip", "remote.ip", "source.namespace", "source.principal")


def _regex(pattern: str) -> string_pb2.StringMatcher:
    return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=pattern))


def _string(pattern: str) -> string_pb2.StringMatcher:
    if pattern == "*":
        return _regex(".+")
    if pattern.endswith("*"):
        return string_pb2.StringMatcher(prefix=pattern[:-1])
    if pattern.startswith("*"):
        return string_pb2.StringMatcher(suffix=pattern[1:])
    return string_pb2.StringMatcher(exact=pattern)


def _header(name: str, pattern: str) -> rbac.Permission:
    if pattern == "*":
        return rbac.Permission(header=route_components_pb2.HeaderMatcher(
            name=name, present_match=True))
    return rbac.Permission(header=route_components_pb2.HeaderMatcher(
        name=name, string_match=_string(pattern)))


def _cidr(text: str) -> address_pb2.CidrRange:
    net = ipaddress.ip_network(text, strict=False)
    return address_pb2.CidrRange(address_prefix=str(net.network_address),
                                 prefix_len={"value": net.prefixlen})


# -- combinators ------------------------------------------------------------------------------
def _or_perm(items: Sequence[rbac.Permission]) -> rbac.Permission:
    return items[0] if len(items) == 1 else rbac.Permission(
        or_rules=rbac.Permission.Set(rules=items))


def _and_perm(items: Sequence[rbac.Permission]) -> rbac.Permission:
    if not items:
        return rbac.Permission(any=True)
    return items[0] if len(items) == 1 else rbac.Permission(
        and_rules=rbac.Permission.Set(rules=items))


def _not_perm(item: rbac.Permission) -> rbac.Permission:
    return rbac.Permission(not_rule=item)


def _or_id(items: Sequence[rbac.Principal]) -> rbac.Principal:
    return items[0] if len(items) == 1 else rbac.Principal(
        or_ids=rbac.Principal.Set(ids=items))


def _and_id(items: Sequence[rbac.Principal]) -> rbac.Principal:
    if not items:
        return rbac.Principal(any=True)
    return items[0] if len(items) == 1 else rbac.Principal(
        and_ids=rbac.Principal.Set(ids=items))


def _not_id(item: rbac.Principal) -> rbac.Principal:
    return rbac.Principal(not_id=item)


def _authenticated(matcher: string_pb2.StringMatcher) -> rbac.Principal:
    return rbac.Principal(authenticated=rbac.Principal.Authenticated(principal_name=matcher))


# -- rule parts ---------------------------------------------------------------------------------
def _source(s: Source) -> list[rbac.Principal]:
    parts: list[rbac.Principal] = []

    def add(values: Iterable[str] | None, build: object, negate: bool) -> None:
        if values is None:
            return
        ids = [build(v) for v in values]  # type: ignore[operator]
        parts.append(_not_id(_or_id(ids)) if negate else _or_id(ids))

    def principal(v: str) -> rbac.Principal:
        return _authenticated(_string(v))

    def namespace(v: str) -> rbac.Principal:
        return _authenticated(_regex(namespace_regex(v)))

    def direct(v: str) -> rbac.Principal:
        return rbac.Principal(direct_remote_ip=_cidr(v))

    def remote(v: str) -> rbac.Principal:
        return rbac.Principal(remote_ip=_cidr(v))

    add(s.principals, principal, False)
    add(s.not_principals, principal, True)
    add(s.namespaces, namespace, False)
    add(s.not_namespaces, namespace, True)
    add(s.ip_blocks, direct, False)
    add(s.not_ip_blocks, direct, True)
    add(s.remote_ip_blocks, remote, False)
    add(s.not_remote_ip_blocks, remote, True)
    return parts


def _constant(value: bool) -> rbac.Permission:
    anything = rbac.Permission(any=True)
    return anything if value else rbac.Permission(not_rule=anything)


def _operation(o: Operation, port: int) -> list[rbac.Permission]:
    parts: list[rbac.Permission] = []

    def add(values: Iterable[object] | None, build: object, negate: bool) -> None:
        if values is None:
            return
        rules = [build(v) for v in values]  # type: ignore[operator]
        parts.append(_not_perm(_or_perm(rules)) if negate else _or_perm(rules))

    def host(v: str) -> rbac.Permission:
        return rbac.Permission(header=route_components_pb2.HeaderMatcher(
            name=":authority", string_match=_regex(host_regex(v))))

    def port_is(v: int) -> rbac.Permission:
        # The listener serves one application port: decided here, since the port Envoy
        # listens on is the sidecar's, not the application's that policies name.
        return _constant(v == port)

    def method(v: str) -> rbac.Permission:
        return _header(":method", v)

    def path(v: str) -> rbac.Permission:
        matcher = _regex(".*") if v == "*" else _string(v)
        return rbac.Permission(url_path=path_pb2.PathMatcher(path=matcher))

    add(o.hosts, host, False)
    add(o.not_hosts, host, True)
    add(o.ports, port_is, False)
    add(o.not_ports, port_is, True)
    add(o.methods, method, False)
    add(o.not_methods, method, True)
    add(o.paths, path, False)
    add(o.not_paths, path, True)
    return parts


def _condition_principal(c: Condition) -> list[rbac.Principal]:
    def one(v: str) -> rbac.Principal:
        if c.key == "source.ip":
            return rbac.Principal(direct_remote_ip=_cidr(v))
        if c.key == "remote.ip":
            return rbac.Principal(remote_ip=_cidr(v))
        if c.key == "source.namespace":
            return _authenticated(_regex(namespace_regex(v)))
        return _authenticated(_string(v))  # source.principal

    out = []
    if c.values is not None:
        out.append(_or_id([one(v) for v in c.values]))
    if c.not_values is not None:
        out.append(_not_id(_or_id([one(v) for v in c.not_values])))
    return out


def _condition_permission(c: Condition, port: int) -> list[rbac.Permission]:
    header = c.header

    def one(v: str) -> rbac.Permission:
        if header is not None:
            return _header(header, v)
        if c.key == "destination.ip":
            return rbac.Permission(destination_ip=_cidr(v))
        if c.key == "destination.port":
            return _constant(int(v) == port)
        return rbac.Permission(requested_server_name=_string(v))  # connection.sni

    out = []
    if c.values is not None:
        out.append(_or_perm([one(v) for v in c.values]))
    if c.not_values is not None:
        out.append(_not_perm(_or_perm([one(v) for v in c.not_values])))
    return out


def _policy(rule: Rule, port: int) -> rbac.Policy:
    principal_conditions = [p for c in rule.conditions if c.key in _PRINCIPAL_KEYS
                            for p in _condition_principal(c)]
    permission_conditions = [p for c in rule.conditions if c.key not in _PRINCIPAL_KEYS
                             for p in _condition_permission(c, port)]
    if rule.sources is None:
        principals = [_and_id(principal_conditions)]
    else:
        principals = [_and_id([*_source(s), *principal_conditions]) for s in rule.sources]
    if rule.operations is None:
        permissions = [_and_perm(permission_conditions)]
    else:
        permissions = [_and_perm([*_operation(o, port), *permission_conditions])
                       for o in rule.operations]
    return rbac.Policy(permissions=permissions, principals=principals)


def compile_policies(policies: Iterable[AuthorizationPolicy], protocol: str, port: int
                     ) -> dict[str, rbac.Policy]:
    """Envoy policies named ``<ns>/<name>/rule-<i>`` for the effective rules."""
    out = {}
    for p in policies:
        for i, rule in effective_rules(p, protocol):
            out[f"{p.ref}/rule-{i}"] = _policy(rule, port)
    return out


# -- filters ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HttpRbacSlot:
    """One RBAC filter of an HTTP port's fixed chain."""

    name: str  # the HTTP filter's name; its RBACPerRoute is keyed by it
    action: str  # ALLOW | DENY | AUDIT
    dry_run: bool

    @property
    def shadow_stat_prefix(self) -> str:
        # Envoy names the shadow engine's dynamic metadata and stats with the prefix of the
        # filter's own config; one in RBACPerRoute is ignored (seen with Envoy 1.40).
        return f"dry_run_{self.action.lower()}_" if self.dry_run else ""


# Evaluation order (Istio's): AUDIT, the dry runs, DENY, ALLOW.
HTTP_RBAC_SLOTS = (
    HttpRbacSlot("trustmesh.rbac.audit", "AUDIT", False),
    HttpRbacSlot("trustmesh.rbac.audit_dry_run", "AUDIT", True),
    HttpRbacSlot("trustmesh.rbac.deny_dry_run", "DENY", True),
    HttpRbacSlot("trustmesh.rbac.allow_dry_run", "ALLOW", True),
    HttpRbacSlot("trustmesh.rbac.deny", "DENY", False),
    HttpRbacSlot("trustmesh.rbac.allow", "ALLOW", False),
)


def _groups(policies: Iterable[AuthorizationPolicy], namespace: str, labels: Mapping[str, str],
            root_namespace: str) -> list[tuple[HttpRbacSlot, list[AuthorizationPolicy]]]:
    """(slot, policies) in filter order, for the slots that some policy fills."""
    selected = applicable_policies(policies, namespace, labels, root_namespace)
    out = []
    for slot in HTTP_RBAC_SLOTS:
        group = [p for p in selected if p.action == slot.action and p.dry_run == slot.dry_run]
        if group:
            out.append((slot, group))
    return out


def _pack(msg: object) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(msg)
    return out


def http_rbac_filters() -> list[hcm_pb2.HttpFilter]:
    """The RBAC filters of every inbound HTTP port, before the router.

    The same for every policy: none has rules, so none decides anything until a route
    gives it an RBACPerRoute (see :func:`compile_http_rbac`).
    """
    return [hcm_pb2.HttpFilter(name=slot.name, typed_config=_pack(http_rbac.RBAC(
        shadow_rules_stat_prefix=slot.shadow_stat_prefix))) for slot in HTTP_RBAC_SLOTS]


def compile_http_rbac(policies: Iterable[AuthorizationPolicy], namespace: str,
                      labels: Mapping[str, str], port: int, root_namespace: str
                      ) -> dict[str, http_rbac.RBACPerRoute]:
    """The RBACPerRoute of every slot (by filter name, in filter order) for a workload's
    HTTP port; an empty one turns its filter off."""
    out = {slot.name: http_rbac.RBACPerRoute() for slot in HTTP_RBAC_SLOTS}
    for slot, group in _groups(policies, namespace, labels, root_namespace):
        rules = rbac.RBAC(action=_ACTIONS[slot.action],
                          policies=compile_policies(group, "HTTP", port))
        if slot.action == "DENY" and not rules.policies and not slot.dry_run:
            continue  # a DENY policy without rules denies nothing
        # the shadow prefix is the filter's: Envoy ignores one given here
        config = (http_rbac.RBAC(shadow_rules=rules) if slot.dry_run
                  else http_rbac.RBAC(rules=rules))
        out[slot.name] = http_rbac.RBACPerRoute(rbac=config)
    return out


def compile_network_rbac(policies: Iterable[AuthorizationPolicy], namespace: str,
                         labels: Mapping[str, str], port: int, root_namespace: str
                         ) -> list[listener_components_pb2.Filter]:
    """Network RBAC filters for a workload's TCP port (before tcp_proxy)."""
    filters = []
    for slot, group in _groups(policies, namespace, labels, root_namespace):
        action, dry = slot.action, slot.dry_run
        rules = rbac.RBAC(action=_ACTIONS[action], policies=compile_policies(group, "TCP", port))
        if action == "DENY" and not rules.policies and not dry:
            continue
        prefix = f"tcp_{port}_{action.lower()}{'_dry_run' if dry else ''}_"
        config = (network_rbac.RBAC(shadow_rules=rules, stat_prefix=prefix,
                                    shadow_rules_stat_prefix="dry_run_")
                  if dry else network_rbac.RBAC(rules=rules, stat_prefix=prefix))
        filters.append(listener_components_pb2.Filter(name="envoy.filters.network.rbac",
                                                      typed_config=_pack(config)))
    return filters

"""The RBAC compiled from AuthorizationPolicies: the fixed, neutral HTTP filters and the
per-route configs that fill them (order, actions, names, matchers, shadow rules), the
network filters, and, on generated policies and requests, the same verdict as the
evaluator when the compiled config is read with Envoy's RBAC semantics (a filter whose
route gives it an empty RBACPerRoute is off; otherwise the route's rules are in force).

The real Envoy is the judge in tests/integration/test_envoy_rbac_equivalence.py; the small
reader of RBAC messages below lets hypothesis explore many more combinations quickly.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any

import yaml
from envoy.config.core.v3 import address_pb2
from envoy.config.rbac.v3 import rbac_pb2 as rbac
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac
from envoy.type.matcher.v3 import string_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.mesh.envoy.rbac import (
    HTTP_RBAC_SLOTS,
    compile_http_rbac,
    compile_network_rbac,
    http_rbac_filters,
)
from trustmesh.policy.authz import AuthzRequest, evaluate, header_values, normalise_path
from trustmesh.policy.mesh_model import AuthorizationPolicy, load_mesh_resources

ROOT = "istio-system"
LABELS = {"app": "web"}
APP_PORT = 8080
PRINCIPALS = ["spiffe://td/ns/a/sa/one", "spiffe://td/ns/b/sa/two", "spiffe://td/ns/ab/sa/x"]


def load(text: str) -> list[AuthorizationPolicy]:
    return [r for r in load_mesh_resources(text) if isinstance(r, AuthorizationPolicy)]


def per_route(policies: Sequence[AuthorizationPolicy]) -> dict[str, http_rbac.RBACPerRoute]:
    out = compile_http_rbac(policies, "default", LABELS, APP_PORT, ROOT)
    assert list(out) == [f.name for f in http_rbac_filters()]  # every filter, in chain order
    return out


def filter_config(f: Any) -> http_rbac.RBAC:
    config = http_rbac.RBAC()
    assert f.typed_config.Unpack(config)
    return config


def http_configs(policies: Sequence[AuthorizationPolicy]) -> list[http_rbac.RBAC]:
    """The RBAC configs Envoy evaluates for a request, in filter order: for each filter of
    the fixed chain, its route's RBACPerRoute.rbac, or nothing when that is empty (off)."""
    routes = per_route(policies)
    out = []
    for f in http_rbac_filters():
        route = routes[f.name]
        if route.HasField("rbac"):
            out.append(route.rbac)
    return out


def network_configs(policies: Sequence[AuthorizationPolicy]) -> list[network_rbac.RBAC]:
    out = []
    for f in compile_network_rbac(policies, "default", LABELS, APP_PORT, ROOT):
        assert f.name == "envoy.filters.network.rbac"
        config = network_rbac.RBAC()
        assert f.typed_config.Unpack(config)
        out.append(config)
    return out


def ap(name: str, spec: str, ns: str = "default", dry_run: bool = False) -> str:
    annotations = ", annotations: {istio.io/dry-run: 'true'}" if dry_run else ""
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec: {spec}\n---\n")


# -- shape ---------------------------------------------------------------------------------
def test_filter_order_actions_and_names() -> None:
    policies = load(ap("audit", "{action: AUDIT, rules: [{}]}")
                    + ap("try", "{action: DENY, rules: [{}]}", dry_run=True)
                    + ap("deny", "{action: DENY, rules: [{to: [{operation: {paths: [/a]}}]}, {}]}")
                    + ap("mesh", "{action: ALLOW, rules: [{}]}", ns=ROOT)
                    + ap("other-ns", "{action: DENY, rules: [{}]}", ns="elsewhere"))
    configs = http_configs(policies)
    summary = [("shadow" if c.HasField("shadow_rules") else "rules",
                rbac.RBAC.Action.Name((c.shadow_rules if c.HasField("shadow_rules")
                                       else c.rules).action),
                sorted((c.shadow_rules if c.HasField("shadow_rules") else c.rules).policies))
               for c in configs]
    assert summary == [
        ("rules", "LOG", ["default/audit/rule-0"]),
        ("shadow", "DENY", ["default/try/rule-0"]),
        ("rules", "DENY", ["default/deny/rule-0", "default/deny/rule-1"]),
        ("rules", "ALLOW", ["istio-system/mesh/rule-0"]),
    ]
    routes = per_route(policies)
    assert [name for name, r in routes.items() if r.HasField("rbac")] == [
        "trustmesh.rbac.audit", "trustmesh.rbac.deny_dry_run", "trustmesh.rbac.deny",
        "trustmesh.rbac.allow"]
    # Envoy names the shadow result (dynamic metadata, stats) with the filter's prefix
    filters = {f.name: filter_config(f) for f in http_rbac_filters()}
    assert filters["trustmesh.rbac.deny_dry_run"].shadow_rules_stat_prefix == "dry_run_deny_"


def test_http_filters_are_fixed_and_enforce_nothing_by_themselves() -> None:
    filters = http_rbac_filters()
    assert [f.name for f in filters] == [
        "trustmesh.rbac.audit", "trustmesh.rbac.audit_dry_run", "trustmesh.rbac.deny_dry_run",
        "trustmesh.rbac.allow_dry_run", "trustmesh.rbac.deny", "trustmesh.rbac.allow"]
    assert [(s.action, s.dry_run) for s in HTTP_RBAC_SLOTS] == [
        ("AUDIT", False), ("AUDIT", True), ("DENY", True), ("ALLOW", True), ("DENY", False),
        ("ALLOW", False)]
    for f, slot in zip(filters, HTTP_RBAC_SLOTS, strict=True):
        config = filter_config(f)
        # no rules, no matcher: Envoy's RBAC filter then applies no policy at all
        assert not config.HasField("rules") and not config.HasField("shadow_rules")
        assert not config.HasField("matcher") and not config.HasField("shadow_matcher")
        assert config.shadow_rules_stat_prefix == (
            f"dry_run_{slot.action.lower()}_" if slot.dry_run else "")
    assert filters == http_rbac_filters()


def test_slots_no_policy_fills_are_turned_off_per_route() -> None:
    routes = per_route(load(ap("deny", "{action: DENY, rules: [{}]}")))
    assert routes["trustmesh.rbac.deny"].rbac.rules.action == rbac.RBAC.DENY
    for name, route in routes.items():
        if name != "trustmesh.rbac.deny":
            assert route == http_rbac.RBACPerRoute()  # no rbac: the filter is off here
    # policies that select other workloads leave every slot off
    assert all(r == http_rbac.RBACPerRoute() for r in per_route(load(ap(
        "d", "{action: DENY, rules: [{}], selector: {matchLabels: {app: other}}}"))).values())
    assert all(r == http_rbac.RBACPerRoute() for r in per_route([]).values())


def test_allow_nothing_is_an_allow_filter_without_policies() -> None:
    [config] = http_configs(load(ap("allow-nothing", "{}")))
    assert config.rules.action == rbac.RBAC.ALLOW and not config.rules.policies
    assert http_configs(load(ap("other", "{}", ns="elsewhere"))) == []


def _only_policy(text: str, protocol: str = "HTTP") -> rbac.Policy:
    configs: Sequence[Any] = (http_configs(load(text)) if protocol == "HTTP"
                              else network_configs(load(text)))
    [config] = configs
    [policy] = config.rules.policies.values()
    return policy


def test_sources_become_principals() -> None:
    policy = _only_policy(ap("p", "{rules: [{from: [{source: {principals: "
                                  "['td/ns/a/sa/one', '*'], namespaces: [a], "
                                  "ipBlocks: ['10.0.0.0/8'], notRemoteIpBlocks: ['1.2.3.4']}}]}]}"))
    [principal] = policy.principals
    ids = principal.and_ids.ids
    names = [i.authenticated.principal_name for i in ids[0].or_ids.ids]
    assert names == [string_pb2.StringMatcher(exact="spiffe://td/ns/a/sa/one"),
                     string_pb2.StringMatcher(safe_regex={"regex": ".+"})]
    assert ids[1].authenticated.principal_name.safe_regex.regex == ".*/ns/a/.*"
    assert ids[2].direct_remote_ip == address_pb2.CidrRange(address_prefix="10.0.0.0",
                                                            prefix_len={"value": 8})
    assert ids[3].not_id.remote_ip.address_prefix == "1.2.3.4"
    assert list(policy.permissions) == [rbac.Permission(any=True)]


def test_operations_become_permissions() -> None:
    policy = _only_policy(ap("p", "{rules: [{to: [{operation: {hosts: ['*.example.com'], "
                                  "methods: [GET], paths: ['/api/*'], notPaths: ['*/secret'], "
                                  "ports: ['8080']}}]}]}"))
    [permission] = policy.permissions
    hosts, ports, methods, paths, not_paths = permission.and_rules.rules
    assert hosts.header.name == ":authority"
    assert hosts.header.string_match.safe_regex.regex == r"(?i).*\.example\.com(:[0-9]+)?"
    assert ports == rbac.Permission(any=True)  # the listener serves port 8080 only
    assert methods.header.name == ":method" and methods.header.string_match.exact == "GET"
    assert paths.url_path.path.prefix == "/api/"
    assert not_paths.not_rule.url_path.path.suffix == "/secret"
    other_port = _only_policy(ap("p", "{rules: [{to: [{operation: {ports: ['9090']}}]}]}"))
    assert other_port.permissions[0] == rbac.Permission(not_rule=rbac.Permission(any=True))


def test_conditions_split_into_principals_and_permissions() -> None:
    policy = _only_policy(ap("p", "{rules: [{when: ["
                                  "{key: 'request.headers[X-Tenant]', values: ['*']}, "
                                  "{key: source.namespace, notValues: [b]}, "
                                  "{key: connection.sni, values: ['*.local']}]}]}"))
    [permission] = policy.permissions
    header, sni = permission.and_rules.rules
    assert header.header.name == "x-tenant" and header.header.present_match
    assert sni.requested_server_name.suffix == ".local"
    [principal] = policy.principals
    assert principal.not_id.authenticated.principal_name.safe_regex.regex == ".*/ns/b/.*"


def test_tcp_ports_drop_http_allow_rules_and_widen_deny_rules() -> None:
    allow = network_configs(load(ap("a", "{rules: [{to: [{operation: {methods: [GET]}}]}, "
                                         "{from: [{source: {namespaces: [a]}}]}]}")))
    [config] = allow
    assert list(config.rules.policies) == ["default/a/rule-1"]  # rule 0 dropped
    assert config.stat_prefix
    deny = _only_policy(ap("d", "{action: DENY, rules: [{to: [{operation: {methods: [GET], "
                                "ports: ['8080']}}]}]}"), "TCP")
    assert deny.permissions[0] == rbac.Permission(any=True)  # only the port is left


# -- same verdicts as the evaluator, read with Envoy's RBAC semantics --------------------------
def _string(m: string_pb2.StringMatcher, value: str | None) -> bool:
    if value is None:
        return False
    kind = m.WhichOneof("match_pattern")
    if kind == "exact":
        return value == m.exact
    if kind == "prefix":
        return value.startswith(m.prefix)
    if kind == "suffix":
        return value.endswith(m.suffix)
    if kind == "safe_regex":
        return re.fullmatch(m.safe_regex.regex, value) is not None
    raise AssertionError(f"matcher {kind} not read here")


def _cidr(c: address_pb2.CidrRange, ip: str) -> bool:
    net = ipaddress.ip_network(f"{c.address_prefix}/{c.prefix_len.value}", strict=False)
    return ipaddress.ip_address(ip) in net


def _header(r: AuthzRequest, name: str) -> tuple[str, ...]:
    pseudo = {":authority": r.host, ":method": r.method}
    return (pseudo[name],) if name in pseudo else header_values(r, name)


def _permission(p: rbac.Permission, r: AuthzRequest) -> bool:
    kind = p.WhichOneof("rule")
    if kind == "any":
        return p.any
    if kind == "and_rules":
        return all(_permission(x, r) for x in p.and_rules.rules)
    if kind == "or_rules":
        return any(_permission(x, r) for x in p.or_rules.rules)
    if kind == "not_rule":
        return not _permission(p.not_rule, r)
    if kind == "header":  # each value of a repeated header on its own
        values = _header(r, p.header.name)
        if p.header.present_match:
            return bool(values)
        return any(_string(p.header.string_match, v) for v in values)
    if kind == "url_path":
        return _string(p.url_path.path, normalise_path(r.path))
    if kind == "destination_ip":
        return _cidr(p.destination_ip, r.destination_ip)
    if kind == "requested_server_name":
        return _string(p.requested_server_name, r.sni)
    raise AssertionError(f"permission {kind} not read here")


def _principal(p: rbac.Principal, r: AuthzRequest) -> bool:
    kind = p.WhichOneof("identifier")
    if kind == "any":
        return p.any
    if kind == "and_ids":
        return all(_principal(x, r) for x in p.and_ids.ids)
    if kind == "or_ids":
        return any(_principal(x, r) for x in p.or_ids.ids)
    if kind == "not_id":
        return not _principal(p.not_id, r)
    if kind == "authenticated":  # no peer certificate: never matches
        return (r.source_principal is not None
                and _string(p.authenticated.principal_name, r.source_principal))
    if kind == "direct_remote_ip":
        return _cidr(p.direct_remote_ip, r.source_ip)
    if kind == "remote_ip":
        return _cidr(p.remote_ip, r.remote_ip or r.source_ip)
    raise AssertionError(f"principal {kind} not read here")


def _engine_allows(rules: rbac.RBAC, r: AuthzRequest) -> bool:
    matched = any(any(_permission(x, r) for x in policy.permissions)
                  and any(_principal(x, r) for x in policy.principals)
                  for policy in rules.policies.values())
    if rules.action == rbac.RBAC.ALLOW:
        return matched
    if rules.action == rbac.RBAC.DENY:
        return not matched
    return True  # LOG


def envoy_allows(policies: Sequence[AuthorizationPolicy], r: AuthzRequest) -> bool:
    configs: Sequence[Any] = (network_configs(policies) if r.protocol == "TCP"
                              else http_configs(policies))
    return all(_engine_allows(c.rules, r) for c in configs if c.HasField("rules"))


_values = st.lists(st.sampled_from(["td/ns/a/sa/one", "spiffe://td/ns/b/sa/two", "*",
                                    "td/ns/a*", "*/sa/x"]), min_size=1, max_size=2)
_namespaces = st.lists(st.sampled_from(["a", "b", "a*", "*b", "*"]), min_size=1, max_size=2)
_ips = st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.1", "192.168.0.0/16"]), min_size=1,
                max_size=2)
_source = st.fixed_dictionaries({}, optional={
    "principals": _values, "notPrincipals": _values, "namespaces": _namespaces,
    "notNamespaces": _namespaces, "ipBlocks": _ips, "notIpBlocks": _ips,
    "remoteIpBlocks": _ips, "notRemoteIpBlocks": _ips}).filter(bool)
_operation = st.fixed_dictionaries({}, optional={
    "hosts": st.lists(st.sampled_from(["web.local", "*.local", "WEB*", "*"]), min_size=1,
                      max_size=2),
    "notHosts": st.lists(st.sampled_from(["admin.local", "*.internal"]), min_size=1),
    "ports": st.lists(st.sampled_from([str(APP_PORT), "9090"]), min_size=1, max_size=2),
    "notPorts": st.lists(st.sampled_from([str(APP_PORT), "9090"]), min_size=1, max_size=1),
    "methods": st.lists(st.sampled_from(["GET", "POST", "*", "P*"]), min_size=1, max_size=2),
    "notMethods": st.lists(st.sampled_from(["DELETE", "GET"]), min_size=1, max_size=1),
    "paths": st.lists(st.sampled_from(["/api/*", "/admin", "*/x", "*"]), min_size=1,
                      max_size=2),
    "notPaths": st.lists(st.sampled_from(["/admin*", "*.json"]), min_size=1, max_size=1),
    }).filter(bool)
_condition = st.one_of(*[
    st.fixed_dictionaries({"key": st.just(key)}, optional={
        "values": st.lists(values, min_size=1, max_size=2),
        "notValues": st.lists(values, min_size=1, max_size=2)}).filter(lambda c: len(c) > 1)
    for key, values in [
        ("request.headers[x-tenant]", st.sampled_from(["red", "r*", "*d", "*"])),
        ("request.headers[host]", st.sampled_from(["web.local", "WEB*", "*:8080"])),
        ("source.ip", st.sampled_from(["10.0.0.0/8", "127.0.0.1"])),
        ("remote.ip", st.sampled_from(["10.0.0.0/8", "203.0.113.7"])),
        ("destination.ip", st.sampled_from(["127.0.0.1", "10.9.0.0/16"])),
        ("destination.port", st.sampled_from([str(APP_PORT), "9090"])),
        ("source.namespace", st.sampled_from(["a", "b*", "*"])),
        ("source.principal", st.sampled_from(["td/ns/a/sa/one", "*"])),
        ("connection.sni", st.sampled_from(["web.local", "*.local", "*"])),
    ]])
_rule = st.fixed_dictionaries({}, optional={
    "from": st.lists(st.fixed_dictionaries({"source": _source}), min_size=1, max_size=2),
    "to": st.lists(st.fixed_dictionaries({"operation": _operation}), min_size=1, max_size=2),
    "when": st.lists(_condition, min_size=1, max_size=2)})


@st.composite
def _policies(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["ALLOW", "ALLOW", "DENY", "AUDIT"]))
        spec: dict[str, Any] = {"action": action}
        if action == "DENY" or draw(st.booleans()) or draw(st.booleans()):
            spec["rules"] = draw(st.lists(_rule, min_size=1, max_size=3))
        if draw(st.booleans()):
            spec["selector"] = {"matchLabels": draw(st.sampled_from([LABELS,
                                                                     {"app": "other"}]))}
        meta: dict[str, Any] = {"name": f"p{i}",
                                "namespace": draw(st.sampled_from(["default", ROOT]))}
        if draw(st.integers(0, 5)) == 0:
            meta["annotations"] = {"istio.io/dry-run": "true"}
        out.append({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                    "metadata": meta, "spec": spec})
    return out


_requests = st.builds(
    AuthzRequest,
    source_principal=st.sampled_from([*PRINCIPALS, None]),
    source_ip=st.sampled_from(["127.0.0.1", "10.1.2.3"]),
    remote_ip=st.sampled_from([None, "203.0.113.7", "10.1.2.3"]),
    destination_namespace=st.just("default"), destination_labels=st.just(LABELS),
    destination_ip=st.sampled_from(["127.0.0.1", "10.9.1.1"]),
    destination_port=st.just(APP_PORT), protocol=st.sampled_from(["HTTP", "HTTP", "TCP"]),
    host=st.sampled_from(["web.local", "WEB.local:8080", "admin.local", "x.internal"]),
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(["/api/v1", "/admin", "/admin/../api/x", "/a/b.json?x=1", "/x",
                          "//api//x", "/%61pi/x"]),
    headers=st.sampled_from([{}, {"x-tenant": "red"}, {"x-tenant": ""}, {"x-tenant": "blue"},
                             {"x-tenant": " red "}, {"x-tenant": ("blue", "red")}]),
    sni=st.sampled_from(["", "web.local", "db.internal"]))


@settings(max_examples=400, deadline=None)
@given(_policies(), _requests)
def test_compiled_filters_decide_as_the_evaluator(docs: list[dict[str, Any]],
                                                  request: AuthzRequest) -> None:
    policies = load(yaml.safe_dump_all(docs))
    verdict = evaluate(policies, request, root_namespace=ROOT)
    assert envoy_allows(policies, request) is verdict.allowed, verdict.to_json()

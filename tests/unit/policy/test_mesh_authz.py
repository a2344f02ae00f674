"""AuthorizationPolicy semantics (the examples of Istio's reference and tasks, as tables),
PeerAuthentication precedence, and the strict decoding of mesh resources."""

from __future__ import annotations

import pytest

from trustmesh.errors import InvalidInput
from trustmesh.policy.authz import AuthzRequest, evaluate, tcp_warnings
from trustmesh.policy.mesh_model import (
    AuthorizationPolicy,
    PeerAuthentication,
    Workload,
    load_mesh_resources,
)
from trustmesh.policy.peerauthn import effective_mtls

SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
OTHER = "spiffe://cluster.local/ns/bar/sa/other"
HTTPBIN = {"app": "httpbin", "version": "v1"}


def policies(text: str) -> list[AuthorizationPolicy]:
    return [r for r in load_mesh_resources(text) if isinstance(r, AuthorizationPolicy)]


def req(principal: str | None = SLEEP, method: str = "GET", path: str = "/info",
        ns: str = "foo", labels: dict[str, str] | None = None, **kw: object) -> AuthzRequest:
    return AuthzRequest(source_principal=principal, method=method, path=path,
                        destination_namespace=ns, destination_labels=labels or HTTPBIN,
                        **kw)  # type: ignore[arg-type]


def ap(name: str, spec: str, ns: str = "foo", annotations: str = "") -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            f"metadata: {{name: {name}, namespace: {ns}{annotations}}}\nspec:\n{spec}\n---\n")


ALLOW_NOTHING = ap("allow-nothing", "  {}")
DENY_ALL = ap("deny-all", "  action: DENY\n  rules: [{}]")
ALLOW_ALL = ap("allow-all", "  action: ALLOW\n  rules: [{}]")
# Istio reference: allow GET from the sleep service account and any POST from namespace foo
# when the request carries a valid header.
HTTPBIN_ALLOW = ap("httpbin", """\
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/foo/sa/sleep"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/info*"]}}]
  - from: [{source: {namespaces: ["bar"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/data"]}}]
    when: [{key: "request.headers[version]", values: ["v1", "v2"]}]""")
# Istio reference: deny requests from outside namespace foo, and to /admin from anyone.
HTTPBIN_DENY = ap("httpbin-deny", """\
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["foo"]}}]
  - to: [{operation: {paths: ["/admin/*"]}}]""")


@pytest.mark.parametrize(("text", "request_", "allowed", "deciding"), [
    ("", req(), True, None),  # no policy: allow
    (ALLOW_NOTHING, req(), False, "foo/allow-nothing"),  # spec {} allows nothing
    (ALLOW_NOTHING, req(ns="bar"), True, None),  # other namespaces are not selected
    (DENY_ALL, req(), False, "foo/deny-all"),
    (ALLOW_ALL, req(principal=None), True, "foo/allow-all"),  # rules: [{}] matches all
    (ALLOW_NOTHING + ALLOW_ALL, req(), True, "foo/allow-all"),  # ALLOW policies add up
    (DENY_ALL + ALLOW_ALL, req(), False, "foo/deny-all"),  # DENY before ALLOW
    (HTTPBIN_ALLOW, req(path="/info/x"), True, "foo/httpbin"),
    (HTTPBIN_ALLOW, req(method="POST", path="/info"), False, "foo/httpbin"),
    (HTTPBIN_ALLOW, req(principal=OTHER), False, "foo/httpbin"),
    (HTTPBIN_ALLOW, req(principal=OTHER, method="POST", path="/data",
                        headers={"version": "v2"}), True, "foo/httpbin"),
    (HTTPBIN_ALLOW, req(principal=OTHER, method="POST", path="/data",
                        headers={"version": "v3"}), False, "foo/httpbin"),
    (HTTPBIN_ALLOW, req(principal=OTHER, method="POST", path="/data"), False, "foo/httpbin"),
    (HTTPBIN_ALLOW, req(labels={"app": "httpbin", "version": "v2"}), True, None),  # unselected
    (HTTPBIN_DENY, req(), True, None),
    (HTTPBIN_DENY, req(principal=OTHER), False, "foo/httpbin-deny"),
    (HTTPBIN_DENY, req(path="/admin/users"), False, "foo/httpbin-deny"),
    (HTTPBIN_DENY, req(principal=None), False, "foo/httpbin-deny"),  # no identity: no ns
    (ap("mesh-deny", "  action: DENY\n  rules: [{to: [{operation: {methods: [DELETE]}}]}]",
        ns="istio-system"), req(method="DELETE", ns="anywhere"), False,
     "istio-system/mesh-deny"),  # root namespace = mesh-wide
    (ap("p", "  rules: [{to: [{operation: {paths: ['*/info']}}]}]"), req(path="/v1/info"),
     True, "foo/p"),  # suffix match
    (ap("p", "  rules: [{to: [{operation: {paths: ['/info']}}]}]"), req(path="/info?x=1"),
     True, "foo/p"),  # the query is not part of the path
    (ap("p", "  rules: [{to: [{operation: {hosts: ['httpbin.foo']}}]}]"),
     req(host="HTTPBIN.foo:8000"), True, "foo/p"),  # hosts: any case, port ignored
    (ap("p", "  rules: [{to: [{operation: {notMethods: ['GET']}}]}]"), req(), False, "foo/p"),
    (ap("p", "  rules: [{from: [{source: {ipBlocks: ['10.0.0.0/8']}}]}]"),
     req(source_ip="10.1.2.3"), True, "foo/p"),
    (ap("p", "  rules: [{from: [{source: {notPrincipals: ['*']}}]}]"), req(principal=None),
     True, "foo/p"),
    (ap("p", "  rules: [{when: [{key: source.namespace, notValues: [foo]}]}]"), req(),
     False, "foo/p"),
])
def test_istio_semantics(text: str, request_: AuthzRequest, allowed: bool,
                         deciding: str | None) -> None:
    decision = evaluate(policies(text), request_)
    assert decision.allowed is allowed, decision
    assert decision.policy == deciding, decision


def test_audit_records_and_dry_run_reports_without_enforcing() -> None:
    text = (ap("audit", "  action: AUDIT\n  rules: [{to: [{operation: {methods: [GET]}}]}]")
            + ap("try-deny", "  action: DENY\n  rules: [{}]",
                 annotations=", annotations: {istio.io/dry-run: 'true'}"))
    decision = evaluate(policies(text), req())
    assert decision.allowed and decision.action == "NO_POLICY"
    assert [(m.policy, m.rule) for m in decision.audited] == [("foo/audit", 0)]
    assert decision.dry_run == ({"policy": "foo/try-deny", "action": "DENY", "rule": 0,
                                 "allowed": False, "reason": "rule 0 matched"},)
    assert "dry run: foo/try-deny would deny" in " ".join(decision.to_json()["details"])


def test_tcp_ports_drop_http_allow_rules_and_widen_deny_rules() -> None:
    allow = policies(ap("a", "  rules: [{to: [{operation: {methods: [GET]}}]}]"))
    deny = policies(ap("d", "  action: DENY\n  rules: [{from: [{source: {namespaces: [bar]}}], "
                            "to: [{operation: {paths: [/admin]}}]}]"))
    tcp = dict(protocol="TCP", path="/", method="")
    assert evaluate(allow, req(**tcp)).allowed is False  # rule dropped: ALLOW nothing
    assert evaluate(allow, req()).allowed is True
    assert evaluate(deny, req(principal=OTHER, **tcp)).allowed is False  # widened
    assert evaluate(deny, req(principal=OTHER, path="/other")).allowed is True
    [w] = [r for r in load_mesh_resources("""\
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: foo, labels: {app: httpbin}}
spec: {ports: [{name: pg, port: 5432, protocol: TCP, sidecarPort: 15432}]}
""") if isinstance(r, Workload)]
    warnings = tcp_warnings(allow + deny, [w], "istio-system")
    assert len(warnings) == 2
    assert "ALLOW rule is ignored" in warnings[0] and "DENY rule is enforced without" in (
        warnings[1])


def pa(name: str, ns: str, spec: str) -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n")


@pytest.mark.parametrize(("text", "port", "mode", "decided"), [
    ("", 80, "STRICT", None),  # trustmesh's default
    (pa("mesh", "istio-system", "{mtls: {mode: PERMISSIVE}}"), 80, "PERMISSIVE",
     "istio-system/mesh"),
    (pa("mesh", "istio-system", "{mtls: {mode: PERMISSIVE}}")
     + pa("ns", "foo", "{mtls: {mode: STRICT}}"), 80, "STRICT", "foo/ns"),
    (pa("mesh", "istio-system", "{mtls: {mode: DISABLE}}")
     + pa("ns", "foo", "{mtls: {mode: UNSET}}"), 80, "DISABLE", "istio-system/mesh"),
    (pa("ns", "foo", "{mtls: {mode: STRICT}}")
     + pa("wl", "foo", "{selector: {matchLabels: {app: httpbin}}, mtls: {mode: PERMISSIVE}, "
                       "portLevelMtls: {8080: {mode: DISABLE}}}"), 80, "PERMISSIVE", "foo/wl"),
    (pa("wl", "foo", "{selector: {matchLabels: {app: httpbin}}, "
                     "portLevelMtls: {8080: {mode: DISABLE}}}"), 8080, "DISABLE",
     "foo/wl (port 8080)"),
    (pa("other", "foo", "{selector: {matchLabels: {app: nope}}, mtls: {mode: DISABLE}}"),
     80, "STRICT", None),
    (pa("first", "foo", "{mtls: {mode: PERMISSIVE}}")
     + pa("second", "foo", "{mtls: {mode: DISABLE}}"), 80, "PERMISSIVE", "foo/first"),
])
def test_peer_authentication_precedence(text: str, port: int, mode: str,
                                        decided: str | None) -> None:
    pas = [r for r in load_mesh_resources(text) if isinstance(r, PeerAuthentication)]
    assert effective_mtls(pas, "foo", HTTPBIN, port, "istio-system") == (mode, decided)


@pytest.mark.parametrize(("text", "message"), [
    (ap("p", "  action: PERMIT"), "document 2 (AuthorizationPolicy foo/p): spec.action: "
                                  "unknown action 'PERMIT'"),
    (ap("p", "  action: CUSTOM"), "spec.action: CUSTOM (external authorization) is not "
                                  "supported yet"),
    (ap("p", "  rules: [{to: [{operation: {ports: ['70000']}}]}]"),
     "spec.rules[0].to[0].operation.ports[0]: port 70000 is out of range 1..65535"),
    (ap("p", "  rules: [{from: [{source: {ipBlocks: ['10.0.0.300/8']}}]}]"),
     "spec.rules[0].from[0].source.ipBlocks[0]: '10.0.0.300/8' is not an IP address or CIDR"),
    (ap("p", "  rules: [{from: []}]"), "spec.rules[0].from: must not be empty"),
    (ap("p", "  rules: [{to: [{operation: {pathz: [/x]}}]}]"),
     "spec.rules[0].to[0].operation.pathz: unknown field"),
    (ap("p", "  rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]"),
     "spec.rules[0].when[0].key: 'request.auth.claims[iss]' needs JWT"),
    (ap("p", "  rules: [{when: [{key: source.color, values: [x]}]}]"),
     "unknown condition key 'source.color'"),
    (ap("p", "  rules: [{to: [{operation: {paths: ['/a*b']}}]}]"),
     "'/a*b': '*' may only start or end a value"),
    (ap("p", "  rules: [{to: [{operation: {methods: [get]}}]}]"),
     "'get' is not an HTTP method"),
    (ap("p", "  targetRefs: [{kind: Gateway, name: g}]"), "spec.targetRefs: target references"),
    (pa("x", "foo", "{portLevelMtls: {80: {mode: STRICT}}}"),
     "spec.portLevelMtls: needs a workload selector"),
    (pa("x", "foo", "{mtls: {mode: strict}}"), "spec.mtls.mode: unknown mode 'strict'"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: x}\n", "kind: unknown kind 'Pod'"),
    ("apiVersion: security.istio.io/v2\nkind: PeerAuthentication\nmetadata: {name: x}\n",
     "apiVersion: PeerAuthentication needs apiVersion"),
    ("apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: w}\n"
     "spec: {ports: [{port: 80}]}\n", "spec.ports[0].sidecarPort: is required"),
    ("apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\nmetadata: {name: s}\n"
     "spec: {ports: [{port: 80}]}\n", "spec.selector: is required"),
    (ALLOW_ALL + ALLOW_ALL, "document 3: AuthorizationPolicy foo/allow-all is also document 2"),
    ("kind: [unclosed\n", "not valid YAML (line"),
])
def test_bad_input_names_the_field(text: str, message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        load_mesh_resources(ALLOW_NOTHING + text, source="policy.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("policy.yaml")


def test_principals_without_scheme_are_normalised_and_round_trip() -> None:
    [p] = policies(HTTPBIN_ALLOW)
    assert p.rules[0].sources is not None
    assert p.rules[0].sources[0].principals == (SLEEP,)
    from trustmesh.policy.mesh_model import dump_resource, resource_from_dict

    again = resource_from_dict(dump_resource(p))
    assert again == p

"""AuthorizationPolicy, rule by rule, as Istio documents it: the examples of the
reference page and of the Authorization tasks (HTTP traffic, TCP traffic, explicit
deny, dry run), each written as a table of requests and the documented outcome."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from trustmesh.policy.authz import (
    AuthzRequest,
    applicable_policies,
    evaluate,
    match_string,
    tcp_warnings,
)
from trustmesh.policy.mesh_model import AuthorizationPolicy, Workload, load_mesh_resources

ROOT = "istio-system"
SLEEP = "spiffe://cluster.local/ns/default/sa/sleep"
FOO_SLEEP = "spiffe://cluster.local/ns/foo/sa/sleep"
TEST_NS = "spiffe://cluster.local/ns/test/sa/anything"
DEV = "spiffe://cluster.local/ns/dev/sa/tool"
PRODUCTPAGE = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
REVIEWS = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
HTTPBIN_V1 = {"app": "httpbin", "version": "v1"}


def load(text: str) -> list[AuthorizationPolicy]:
    return [r for r in load_mesh_resources(text) if isinstance(r, AuthorizationPolicy)]


def call(principal: str | None, *, ns: str = "foo", labels: Mapping[str, str] | None = None,
         method: str = "GET", path: str = "/", **kw: Any) -> AuthzRequest:
    return AuthzRequest(source_principal=principal, destination_namespace=ns,
                        destination_labels=dict(labels if labels is not None else HTTPBIN_V1),
                        method=method, path=path, **kw)


def check(policies: list[AuthorizationPolicy], cases: list[tuple[AuthzRequest, bool]]) -> None:
    for request, allowed in cases:
        decision = evaluate(policies, request, root_namespace=ROOT)
        assert decision.allowed is allowed, (request, decision.to_json())


# -- reference page ----------------------------------------------------------------------------
REFERENCE_ALLOW = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector:
    matchLabels: {app: httpbin, version: v1}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/default/sa/sleep"]}
    - source: {namespaces: ["test"]}
    to:
    - operation: {methods: ["GET"], paths: ["/info*"]}
    - operation: {methods: ["POST"], paths: ["/data"]}
""")


@pytest.mark.parametrize(("request_", "allowed"), [
    (call(SLEEP, path="/info"), True),  # sleep's service account, GET with prefix /info
    (call(SLEEP, path="/info/books"), True),
    (call(TEST_NS, method="POST", path="/data"), True),  # any workload of namespace test
    (call(SLEEP, method="POST", path="/info"), False),  # the method and path go together
    (call(SLEEP, method="GET", path="/data"), False),
    (call(DEV, path="/info"), False),  # neither the principal nor the namespace
    (call(None, path="/info"), False),  # no mTLS: no principal, no namespace
    (call(DEV, labels={"app": "httpbin", "version": "v2"}), True),  # v2 is not selected
    (call(DEV, ns="bar"), True),  # namespace bar's httpbin is not selected
])
def test_reference_allow_example(request_: AuthzRequest, allowed: bool) -> None:
    check(REFERENCE_ALLOW, [(request_, allowed)])


def test_reference_deny_example_denies_post_from_dev() -> None:
    policies = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin, version: v1}}
  action: DENY
  rules:
  - from: [{source: {namespaces: ["dev"]}}]
    to: [{operation: {methods: ["POST"]}}]
""")
    check(policies, [(call(DEV, method="POST"), False), (call(DEV, method="GET"), True),
                     (call(SLEEP, method="POST"), True)])
    decision = evaluate(policies, call(DEV, method="POST"), root_namespace=ROOT)
    assert (decision.action, decision.policy, decision.rule) == ("DENY", "foo/httpbin", 0)


def test_reference_audit_example_records_without_deciding() -> None:
    policies = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: httpbin-audit, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: AUDIT
  rules:
  - to: [{operation: {methods: ["GET"], paths: ["/user/profile/*"]}}]
""")
    hit = evaluate(policies, call(SLEEP, ns="bar", path="/user/profile/me"), root_namespace=ROOT)
    miss = evaluate(policies, call(SLEEP, ns="bar", path="/other"), root_namespace=ROOT)
    assert hit.allowed and miss.allowed  # AUDIT never allows or denies
    assert [(m.policy, m.rule) for m in hit.audited] == [("bar/httpbin-audit", 0)]
    assert miss.audited == ()
    assert hit.to_json()["audited"] == [{"policy": "bar/httpbin-audit", "rule": 0}]


ALLOW_NOTHING = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: foo}
spec: {action: ALLOW}
"""
DENY_ALL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: foo}
spec: {action: DENY, rules: [{}]}
"""
ALLOW_ALL = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: foo}
spec: {action: ALLOW, rules: [{}]}
"""


@pytest.mark.parametrize(("text", "request_", "allowed", "reason"), [
    ("", call(None), True, "no ALLOW policy selects this workload"),
    (ALLOW_NOTHING, call(SLEEP), False, "no rule of the ALLOW policies (foo/allow-nothing)"),
    (ALLOW_NOTHING, call(SLEEP, ns="bar"), True, "no ALLOW policy selects"),
    (DENY_ALL, call(SLEEP), False, "DENY policy foo/deny-all rule 0 matched"),
    (ALLOW_ALL, call(None), True, "ALLOW policy foo/allow-all rule 0 matched"),
    # an allow-all does not get past a deny-all, and ALLOW policies add up
    (DENY_ALL + "---" + ALLOW_ALL, call(SLEEP), False, "DENY policy foo/deny-all"),
    (ALLOW_NOTHING + "---" + ALLOW_ALL, call(SLEEP), True, "ALLOW policy foo/allow-all"),
])
def test_reference_default_policies(text: str, request_: AuthzRequest, allowed: bool,
                                    reason: str) -> None:
    decision = evaluate(load(text), request_, root_namespace=ROOT)
    assert decision.allowed is allowed
    assert reason in decision.reason


def test_reference_selector_scopes() -> None:
    """No selector: every workload of the policy's namespace; a selector in the root
    namespace: matching workloads in every namespace."""
    policies = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: whole-ns, namespace: foo}
spec: {action: DENY, rules: [{to: [{operation: {paths: ["/ns"]}}]}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bar-httpbin, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/bar"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: every-httpbin, namespace: istio-system}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/mesh"]}}]}]
""")
    other = {"app": "other"}
    check(policies, [
        (call(SLEEP, ns="foo", labels=other, path="/ns"), False),
        (call(SLEEP, ns="bar", labels=other, path="/ns"), True),
        (call(SLEEP, ns="bar", path="/bar"), False),
        (call(SLEEP, ns="bar", labels=other, path="/bar"), True),
        (call(SLEEP, ns="baz", path="/mesh"), False),
        (call(SLEEP, ns="baz", labels=other, path="/mesh"), True),
    ])
    assert [p.meta.name for p in applicable_policies(policies, "bar", HTTPBIN_V1, ROOT)] == [
        "bar-httpbin", "every-httpbin"]


@pytest.mark.parametrize(("pattern", "value", "matches"), [
    ("abc", "abc", True), ("abc", "abcd", False),  # exact
    ("abc*", "abcd", True), ("abc*", "abc", True), ("abc*", "xabc", False),  # prefix
    ("*abc", "xabc", True), ("*abc", "abcx", False),  # suffix
    ("*", "anything", True), ("*", "", True), ("*", None, False),  # presence
])
def test_reference_value_matching(pattern: str, value: str | None, matches: bool) -> None:
    assert match_string(pattern, value) is matches


@pytest.mark.parametrize(("source", "request_", "allowed"), [
    ("{ipBlocks: ['1.2.3.4', '5.6.0.0/16']}", call(SLEEP, source_ip="5.6.7.8"), True),
    ("{ipBlocks: ['1.2.3.4', '5.6.0.0/16']}", call(SLEEP, source_ip="1.2.3.5"), False),
    ("{notIpBlocks: ['10.0.0.0/8']}", call(SLEEP, source_ip="10.1.1.1"), False),
    # remoteIpBlocks: the original client (X-Forwarded-For), ipBlocks: the peer
    ("{remoteIpBlocks: ['203.0.113.0/24']}",
     call(SLEEP, source_ip="10.0.0.1", remote_ip="203.0.113.9"), True),
    ("{remoteIpBlocks: ['203.0.113.0/24']}", call(SLEEP, source_ip="203.0.113.9",
                                                  remote_ip="10.0.0.1"), False),
    ("{notRemoteIpBlocks: ['203.0.113.0/24']}", call(SLEEP, source_ip="203.0.113.9"), False),
    ("{principals: ['*']}", call(None), False),  # '*': any authenticated peer
    ("{principals: ['*']}", call(DEV), True),
    ("{principals: ['cluster.local/ns/default/*']}", call(SLEEP), True),
    ("{principals: ['*/sa/sleep']}", call(FOO_SLEEP), True),
    ("{notPrincipals: ['cluster.local/ns/default/sa/sleep']}", call(SLEEP), False),
    ("{notPrincipals: ['cluster.local/ns/default/sa/sleep']}", call(None), True),
    ("{namespaces: ['te*']}", call(TEST_NS), True),
    ("{namespaces: ['*st']}", call(TEST_NS), True),
    ("{namespaces: ['*']}", call(None), False),
    ("{notNamespaces: ['dev']}", call(None), True),
    ("{principals: ['cluster.local/ns/default/sa/sleep'], namespaces: ['test']}",
     call(SLEEP), False),  # fields of one source must all match
])
def test_reference_source_fields(source: str, request_: AuthzRequest, allowed: bool) -> None:
    policies = load(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: foo}}
spec: {{rules: [{{from: [{{source: {source}}}]}}]}}
""")
    check(policies, [(request_, allowed)])


@pytest.mark.parametrize(("operation", "request_", "allowed"), [
    ("{hosts: ['httpbin.foo']}", call(SLEEP, host="httpbin.foo"), True),
    ("{hosts: ['httpbin.foo']}", call(SLEEP, host="HTTPBIN.Foo:8000"), True),  # no case/port
    ("{hosts: ['*.foo']}", call(SLEEP, host="httpbin.foo"), True),
    ("{hosts: ['httpbin.foo']}", call(SLEEP, host="other.foo"), False),
    ("{notHosts: ['admin.*']}", call(SLEEP, host="admin.example"), False),
    ("{ports: ['8000']}", call(SLEEP, destination_port=8000), True),
    ("{ports: [8000]}", call(SLEEP, destination_port=8001), False),
    ("{notPorts: ['8000']}", call(SLEEP, destination_port=8000), False),
    ("{methods: ['GET', 'HEAD']}", call(SLEEP, method="HEAD"), True),
    ("{notMethods: ['DELETE']}", call(SLEEP, method="DELETE"), False),
    ("{paths: ['/info*']}", call(SLEEP, path="/info/x?q=1"), True),
    ("{paths: ['*/info']}", call(SLEEP, path="/api/info"), True),
    ("{paths: ['/info']}", call(SLEEP, path="/api/../info"), True),  # normalised first
    ("{paths: ['/info']}", call(SLEEP, path="/INFO"), False),  # paths keep their case
    ("{notPaths: ['/admin*']}", call(SLEEP, path="//admin/x"), False),
])
def test_reference_operation_fields(operation: str, request_: AuthzRequest,
                                    allowed: bool) -> None:
    policies = load(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: foo}}
spec: {{rules: [{{to: [{{operation: {operation}}}]}}]}}
""")
    check(policies, [(request_, allowed)])


@pytest.mark.parametrize(("condition", "request_", "allowed"), [
    ("{key: 'request.headers[User-Agent]', values: ['Mozilla/*']}",
     call(SLEEP, headers={"user-agent": "Mozilla/5.0"}), True),
    ("{key: 'request.headers[User-Agent]', values: ['Mozilla/*']}",
     call(SLEEP, headers={"user-agent": "curl/8"}), False),
    ("{key: 'request.headers[User-Agent]', values: ['Mozilla/*']}", call(SLEEP), False),
    ("{key: 'request.headers[x-token]', notValues: ['admin']}", call(SLEEP), True),
    ("{key: source.ip, values: ['10.1.2.3', '10.2.0.0/16']}",
     call(SLEEP, source_ip="10.2.9.9"), True),
    ("{key: remote.ip, values: ['10.1.2.3']}",
     call(SLEEP, source_ip="10.9.9.9", remote_ip="10.1.2.3"), True),
    ("{key: source.namespace, values: ['default']}", call(SLEEP), True),
    ("{key: source.namespace, values: ['default']}", call(FOO_SLEEP), False),
    ("{key: source.principal, values: ['cluster.local/ns/default/sa/sleep']}",
     call(SLEEP), True),
    ("{key: destination.ip, values: ['10.1.2.3']}", call(SLEEP, destination_ip="10.1.2.3"),
     True),
    ("{key: destination.port, values: ['80', '443']}", call(SLEEP, destination_port=443), True),
    ("{key: destination.port, notValues: ['80']}", call(SLEEP, destination_port=80), False),
    ("{key: connection.sni, values: ['www.example.com']}",
     call(SLEEP, sni="www.example.com"), True),
    ("{key: connection.sni, values: ['*.example.com']}", call(SLEEP), False),
])
def test_reference_conditions(condition: str, request_: AuthzRequest, allowed: bool) -> None:
    policies = load(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p, namespace: foo}}
spec: {{rules: [{{when: [{condition}]}}]}}
""")
    check(policies, [(request_, allowed)])


# -- task: HTTP traffic (bookinfo) -------------------------------------------------------------
def test_task_http_traffic_grants_access_step_by_step() -> None:
    allow_nothing = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
"""
    productpage_viewer = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: productpage-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: ALLOW
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"""
    details_viewer = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: details-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: details}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/bookinfo-productpage"]}}]
    to: [{operation: {methods: ["GET"]}}]
"""
    gateway = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    to_productpage = call(gateway, ns="default", labels={"app": "productpage"})
    to_details = call(PRODUCTPAGE, ns="default", labels={"app": "details"})
    # 1. allow-nothing: every workload of the namespace refuses everything
    check(load(allow_nothing), [(to_productpage, False), (to_details, False)])
    # 2. productpage opens for GET; details is still closed
    check(load(allow_nothing + "---" + productpage_viewer), [
        (to_productpage, True), (call(gateway, ns="default", labels={"app": "productpage"},
                                      method="POST"), False), (to_details, False)])
    # 3. details opens for productpage's service account only
    all_three = load(allow_nothing + "---" + productpage_viewer + "---" + details_viewer)
    check(all_three, [(to_productpage, True), (to_details, True),
                      (call(REVIEWS, ns="default", labels={"app": "details"}), False)])


# -- task: explicit deny -----------------------------------------------------------------------
def test_task_explicit_deny() -> None:
    deny_get = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-method-get, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {methods: ["GET"]}}]}]
"""
    check(load(deny_get), [(call(FOO_SLEEP, path="/get"), False),
                           (call(FOO_SLEEP, method="POST", path="/post"), True)])
    deny_get_unless_admin = deny_get.replace(
        'rules: [{to: [{operation: {methods: ["GET"]}}]}]',
        'rules: [{to: [{operation: {methods: ["GET"]}}], '
        'when: [{key: "request.headers[x-token]", notValues: ["admin"]}]}]')
    policies = load(deny_get_unless_admin)
    admin, guest = {"x-token": "admin"}, {"x-token": "guest"}
    check(policies, [(call(FOO_SLEEP, path="/get", headers=admin), True),
                     (call(FOO_SLEEP, path="/get", headers=guest), False)])
    allow_ip = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-path-ip, namespace: foo}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: ALLOW
  rules: [{to: [{operation: {paths: ["/ip"]}}]}]
"""
    policies = load(deny_get_unless_admin + "---" + allow_ip)
    check(policies, [(call(FOO_SLEEP, path="/ip", headers=admin), True),
                     (call(FOO_SLEEP, path="/get", headers=admin), False),  # no ALLOW match
                     (call(FOO_SLEEP, path="/ip", headers=guest), False)])  # DENY first


# -- task: TCP traffic -------------------------------------------------------------------------
TCP_ECHO = {"app": "tcp-echo"}


def tcp(port: int) -> AuthzRequest:
    return call(SLEEP, labels=TCP_ECHO, protocol="TCP", destination_port=port, method="",
                path="")


def test_task_tcp_traffic() -> None:
    allow_ports = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: ALLOW
  rules: [{to: [{operation: {ports: ["9000", "9001"]}}]}]
"""
    check(load(allow_ports), [(tcp(9000), True), (tcp(9001), True), (tcp(9002), False)])
    # an HTTP-only field in an ALLOW rule: the rule is dropped on TCP, nothing is allowed
    with_methods = load(allow_ports.replace('ports: ["9000", "9001"]',
                                            'methods: ["GET"], ports: ["9000"]'))
    check(with_methods, [(tcp(9000), False), (tcp(9001), False)])
    # in a DENY rule it is ignored on TCP: the rule denies more
    deny = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tcp-policy, namespace: foo}
spec:
  selector: {matchLabels: {app: tcp-echo}}
  action: DENY
  rules: [{to: [{operation: {methods: ["GET"], ports: ["9000"]}}]}]
""")
    check(deny, [(tcp(9000), False), (tcp(9001), True)])
    decision = evaluate(deny, tcp(9000), root_namespace=ROOT)
    assert (decision.policy, decision.rule) == ("foo/tcp-policy", 0)
    [workload] = [r for r in load_mesh_resources("""
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: tcp-echo, namespace: foo, labels: {app: tcp-echo}}
spec:
  ports:
  - {name: tcp, port: 9000, protocol: TCP, sidecarPort: 19000}
  - {name: http, port: 8080, sidecarPort: 18080}
""") if isinstance(r, Workload)]
    warnings = tcp_warnings(with_methods + deny, [workload], ROOT)
    assert len(warnings) == 2
    assert "foo/tcp-policy rule 0 uses HTTP-only fields" in warnings[0]
    assert "TCP port(s) 9000" in warnings[0] and "ALLOW rule is ignored" in warnings[0]
    assert "DENY rule is enforced without its HTTP-only fields" in warnings[1]
    assert tcp_warnings(load(allow_ports), [workload], ROOT) == []


# -- task: dry run -----------------------------------------------------------------------------
def test_task_dry_run_reports_without_enforcing() -> None:
    policies = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-path-headers
  namespace: foo
  annotations: {"istio.io/dry-run": "true"}
spec:
  selector: {matchLabels: {app: httpbin}}
  action: DENY
  rules: [{to: [{operation: {paths: ["/headers"]}}]}]
""")
    decision = evaluate(policies, call(FOO_SLEEP, path="/headers"), root_namespace=ROOT)
    assert decision.allowed and decision.action == "NO_POLICY"
    assert decision.dry_run == ({"policy": "foo/deny-path-headers", "action": "DENY",
                                 "rule": 0, "allowed": False, "reason": "rule 0 matched"},)
    other = evaluate(policies, call(FOO_SLEEP, path="/ip"), root_namespace=ROOT)
    assert other.dry_run[0]["allowed"] is True
    # a dry-run ALLOW policy does not make the workload allow-list only
    dry_allow = load("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-ip
  namespace: foo
  annotations: {"istio.io/dry-run": "true"}
spec: {rules: [{to: [{operation: {paths: ["/ip"]}}]}]}
""")
    decision = evaluate(dry_allow, call(FOO_SLEEP, path="/headers"), root_namespace=ROOT)
    assert decision.allowed
    assert decision.dry_run[0]["allowed"] is False
    assert "dry run: foo/only-ip would deny" in decision.to_json()["details"][0]


def test_explain_json_names_the_deciding_policy_and_rule() -> None:
    policies = load(DENY_ALL.replace("rules: [{}]", "rules: [{to: [{operation: "
                                     "{paths: ['/a']}}]}, {}]"))
    out = evaluate(policies, call(SLEEP, path="/b"), root_namespace=ROOT).to_json()
    assert {k: out[k] for k in ("allowed", "action", "policy", "rule")} == {
        "allowed": False, "action": "DENY", "policy": "foo/deny-all", "rule": 1}
    assert out["summary"] == "DENY: DENY policy foo/deny-all rule 1 matched"


def test_request_to_a_workload_takes_its_namespace_labels_and_protocol() -> None:
    [workload] = [r for r in load_mesh_resources("""
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: db, namespace: foo, labels: {app: tcp-echo}}
spec:
  address: 10.0.0.7
  ports: [{name: pg, port: 5432, protocol: TCP, sidecarPort: 15432}]
""") if isinstance(r, Workload)]
    request = AuthzRequest.to_workload(workload, 5432, source_principal=SLEEP)
    assert (request.destination_namespace, dict(request.destination_labels),
            request.destination_ip, request.destination_port, request.protocol) == (
        "foo", TCP_ECHO, "10.0.0.7", 5432, "TCP")
    from trustmesh.errors import InvalidInput

    with pytest.raises(InvalidInput, match="Workload foo/db has no port 80"):
        AuthzRequest.to_workload(workload, 80, source_principal=SLEEP)

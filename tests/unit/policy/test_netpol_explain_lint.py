"""explain names the policies and rules that decided; lint finds the usual gaps."""

from __future__ import annotations

import ipaddress

import pytest

from trustmesh.errors import InvalidInput, NotFound
from trustmesh.policy.netpol import Cluster, Protocol, explain, load_cluster, parse_endpoint
from trustmesh.policy.netpol_lint import Finding, lint, parse_required_label

SHOP = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: shop, labels: {app: web}}
  status: {podIP: 10.0.0.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: pay, namespace: shop, labels: {app: payments}}
  spec:
    containers:
    - name: pay
      ports: [{name: https, containerPort: 8443}]
  status: {podIP: 10.0.0.2}
- apiVersion: v1
  kind: Pod
  metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
  status: {podIP: 10.0.9.53}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-to-pay, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{ipBlock: {cidr: 8.8.8.0/24}}]
  - to: [{podSelector: {matchLabels: {app: payments}}}]
    ports: [{port: https}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: pay-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: 8443}]
"""


def shop() -> Cluster:
    return load_cluster([("shop.yaml", SHOP)])


def test_explain_allowed_names_policy_and_rule_on_both_sides() -> None:
    c = shop()
    v = explain(c, c.pod("shop/web"), c.pod("shop/pay"), 8443)
    assert v.allowed
    assert v.egress.selected_by == ("shop/default-deny", "shop/web-to-pay")
    assert [(r.policy, r.rule) for r in v.egress.allowed_by] == [("shop/web-to-pay", 1)]
    assert v.ingress.selected_by == ("shop/default-deny", "shop/pay-from-web")
    assert [(r.policy, r.rule) for r in v.ingress.allowed_by] == [("shop/pay-from-web", 0)]
    d = v.to_dict()
    assert d["allowed"] is True and d["egress"]["isolated"] is True  # type: ignore[index]
    assert "ALLOWED" in v.render_text()


def test_explain_denied_says_nothing_allowed() -> None:
    c = shop()
    v = explain(c, c.pod("shop/web"), c.pod("shop/pay"), 80)
    assert not v.allowed
    assert not v.egress.allowed and v.egress.allowed_by == ()
    assert "no rule of shop/default-deny, shop/web-to-pay allows shop/pay" in v.egress.reason
    assert not v.ingress.allowed
    assert "DENIED" in v.render_text()


def test_explain_not_isolated() -> None:
    c = shop()
    v = explain(c, c.pod("kube-system/coredns"), c.pod("shop/web"), 80)
    assert v.egress.allowed and v.egress.selected_by == ()
    assert "not isolated for egress: no policy selects it" in v.egress.reason
    assert not v.ingress.allowed


def test_explain_external_ips() -> None:
    c = shop()
    out = explain(c, c.pod("shop/web"), ipaddress.ip_address("8.8.8.8"), 53, Protocol.UDP)
    assert out.allowed and out.egress.allowed_by[0].rule == 0
    assert not out.ingress.in_cluster
    assert not explain(c, c.pod("shop/web"), ipaddress.ip_address("1.1.1.1"), 53).allowed
    inbound = explain(c, ipaddress.ip_address("8.8.8.8"), c.pod("shop/pay"), 8443)
    assert not inbound.allowed and inbound.egress.in_cluster is False
    with pytest.raises(InvalidInput):
        explain(c, ipaddress.ip_address("8.8.8.8"), ipaddress.ip_address("1.1.1.1"), 53)
    with pytest.raises(InvalidInput):
        explain(c, c.pod("shop/web"), c.pod("shop/pay"), 0)


def test_parse_endpoint_maps_pod_ips_to_pods() -> None:
    c = shop()
    assert parse_endpoint(c, "10.0.0.2") == c.pod("shop/pay")
    assert parse_endpoint(c, "8.8.8.8") == ipaddress.ip_address("8.8.8.8")
    with pytest.raises(NotFound):
        parse_endpoint(c, "shop/nobody")


def codes(findings: list[Finding]) -> set[tuple[str, str]]:
    return {(f.code, f.object) for f in findings}


def test_lint_shop() -> None:
    found = lint(shop(), [("app", "payments"), ("k8s-app", "kube-dns")])
    got = codes(found)
    # kube-system has pods and no default deny; coredns is selected by nothing
    assert ("NP001", "Namespace kube-system") in got
    assert ("NP001", "Namespace shop") not in got
    assert ("NP002", "Pod kube-system/coredns") in got
    assert ("NP006", "Pod kube-system/coredns") in got
    assert ("NP006", "Pod shop/pay") not in got
    # default-deny isolates egress of web and pay; web may reach 8.8.8.0/24 on any port
    # (DNS included), pay may reach nothing
    assert ("NP004", "NetworkPolicy shop/default-deny") in got
    assert ("NP004", "NetworkPolicy shop/web-to-pay") not in got
    (dns,) = [f for f in found if f.code == "NP004"]
    assert "shop/pay" in dns.message and "shop/web" not in dns.message
    assert found[0].severity == "error"
    assert all(f.severity == "error" for f in found if f.code in ("NP004", "NP006"))


def test_lint_dns_allowance_and_unused_policy() -> None:
    extra = """
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: allow-dns, namespace: shop}
spec:
  podSelector: {}
  policyTypes: [Egress]
  egress:
  - ports: [{port: 53, protocol: UDP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: stale, namespace: shop}
spec:
  podSelector: {matchLabels: {app: gone}}
"""
    got = codes(lint(load_cluster([("s.yaml", SHOP + extra)])))
    assert not any(code == "NP004" for code, _ in got)
    assert ("NP005", "NetworkPolicy shop/default-deny") in got  # UDP but no TCP 53
    assert ("NP003", "NetworkPolicy shop/stale") in got


def test_parse_required_label() -> None:
    assert parse_required_label("app=payments") == ("app", "payments")
    for bad in ("app", "bad key=x", "app=not ok"):
        with pytest.raises(InvalidInput):
            parse_required_label(bad)

"""Reachability expectations of the upstream Kubernetes network policy e2e suite.

The model is the suite's: namespaces x, y, z, each with pods a, b, c labelled
``pod=<name>``, every pod serving 80 and 81 on TCP, UDP and SCTP under the
names ``serve-<port>-<proto>``. Each case states its policies and, in the
suite's own vocabulary (ExpectPeer / ExpectAllIngress / ExpectAllEgress), the
expected truth table; both evaluators must produce exactly that table.
Expectations were written from the documented behaviour of each upstream case.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import yaml

from trustmesh.policy.netpol import (
    Cluster,
    IndexedEvaluator,
    Protocol,
    load_cluster,
    naive_matrix,
)

NAMESPACES = ("x", "y", "z")
PODS = ("a", "b", "c")
ALL = [f"{ns}/{p}" for ns in NAMESPACES for p in PODS]
NS_KEY = "kubernetes.io/metadata.name"


def ip_of(pod: str) -> str:
    ns, name = pod.split("/")
    return f"10.{NAMESPACES.index(ns) + 1}.0.{PODS.index(name) + 1}"


def model_yaml(ns_labels: dict[str, dict[str, str]] | None = None) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": (ns_labels or {}).get(ns, {})}})
        for p in PODS:
            ports = [
                {"name": f"serve-{n}-{proto.lower()}", "containerPort": n, "protocol": proto}
                for n in (80, 81) for proto in ("TCP", "UDP", "SCTP")
            ]
            docs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p, "namespace": ns, "labels": {"pod": p}},
                "spec": {"containers": [{"name": "cont", "image": "agnhost", "ports": ports}]},
                "status": {"podIP": ip_of(f"{ns}/{p}")},
            })
    return docs


def policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def build(policies: list[dict[str, Any]], ns_labels: dict[str, dict[str, str]] | None = None
          ) -> Cluster:
    text = yaml.safe_dump_all(model_yaml(ns_labels) + policies)
    return load_cluster([("e2e.yaml", text)])


def sel(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


def ns_sel(ns: str) -> dict[str, Any]:
    return {"matchLabels": {NS_KEY: ns}}


@dataclass
class Expect:
    """The suite's Reachability helper: starts all-true, then cases carve out."""

    table: dict[tuple[str, str], bool] = field(
        default_factory=lambda: {(s, d): True for s in ALL for d in ALL})

    @staticmethod
    def _match(pod: str, ns: str | None, name: str | None) -> bool:
        pns, pname = pod.split("/")
        return (ns is None or ns == pns) and (name is None or name == pname)

    def peer(self, src: tuple[str | None, str | None], dst: tuple[str | None, str | None],
             value: bool) -> Expect:
        for s in ALL:
            for d in ALL:
                if self._match(s, *src) and self._match(d, *dst):
                    self.table[(s, d)] = value
        return self

    def all_ingress(self, pod: str, value: bool) -> Expect:
        ns, name = pod.split("/")
        return self.peer((None, None), (ns, name), value)

    def all_egress(self, pod: str, value: bool) -> Expect:
        ns, name = pod.split("/")
        return self.peer((ns, name), (None, None), value)

    def pair(self, src: str, dst: str, value: bool) -> Expect:
        self.table[(src, dst)] = value
        return self


ANY: tuple[None, None] = (None, None)


def X(pod: str | None = None) -> tuple[str, str | None]:  # noqa: N802 - reads like the suite
    return ("x", pod)


def Y(pod: str | None = None) -> tuple[str, str | None]:  # noqa: N802
    return ("y", pod)


def Z(pod: str | None = None) -> tuple[str, str | None]:  # noqa: N802
    return ("z", pod)


@dataclass
class Case:
    policies: list[dict[str, Any]]
    # (port, protocol, expectation builder)
    checks: list[tuple[int, Protocol, Callable[[], Expect]]]
    ns_labels: dict[str, dict[str, str]] | None = None


TCP, UDP, SCTP = Protocol.TCP, Protocol.UDP, Protocol.SCTP
allow_a_from = {"podSelector": sel(pod="a")}

CASES: dict[str, Case] = {
    "default-deny-ingress": Case(
        [policy("deny-ingress", "x", {"podSelector": {}, "ingress": []})],
        [(80, TCP, lambda: Expect().peer(ANY, X(), False))]),
    "default-deny-all": Case(
        [policy("deny-all", "x", {"podSelector": {}, "ingress": [], "egress": [],
                                  "policyTypes": ["Ingress", "Egress"]})],
        [(80, TCP, lambda: Expect().peer(ANY, X(), False).peer(X(), ANY, False))]),
    "allow-from-pod-in-server-namespace": Case(
        [policy("x-a-allows-x-b", "x", {"podSelector": sel(pod="a"),
                                        "ingress": [{"from": [{"podSelector": sel(pod="b")}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False).pair("x/b", "x/a", True))]),
    "allow-ingress-for-a-target": Case(
        [policy("deny-all", "x", {"podSelector": {}, "ingress": []}),
         policy("allow-all-to-a", "x", {"podSelector": sel(pod="a"), "ingress": [
             {"from": [{"podSelector": {}, "namespaceSelector": {}}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/b", False).all_ingress("x/c", False))]),
    "allow-from-all-namespaces": Case(
        [policy("allow-from-another-ns", "x", {"podSelector": sel(pod="a"), "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {}}}]}]})],
        [(80, TCP, Expect)]),
    "allow-only-from-other-namespace": Case(
        [policy("allow-client-a-via-ns-selector", "x", {"podSelector": sel(pod="a"),
                "ingress": [{"from": [{"namespaceSelector": ns_sel("y")}]}]})],
        [(80, TCP, lambda: Expect().peer(X(), X("a"), False).peer(Z(), X("a"), False))]),
    "pod-selector-match-expressions": Case(
        [policy("x-a-allows-x-b", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"podSelector": {"matchExpressions": [
                {"key": "pod", "operator": "In", "values": ["b"]}]}}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False).pair("x/b", "x/a", True))]),
    "namespace-selector-match-expressions": Case(
        [policy("allow-ns-y", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [
                {"key": NS_KEY, "operator": "In", "values": ["y"]}]}}]}]})],
        [(80, TCP, lambda: Expect().peer(X(), X("a"), False).peer(Z(), X("a"), False))]),
    "pod-selector-or-namespace-selector": Case(
        [policy("or", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [
                {"key": NS_KEY, "operator": "NotIn", "values": ["x"]}]}},
            {"podSelector": sel(pod="b")}]}]})],
        [(80, TCP, lambda: Expect().pair("x/a", "x/a", False).pair("x/c", "x/a", False))]),
    "pod-selector-and-namespace-selector": Case(
        [policy("and", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [
                {"key": NS_KEY, "operator": "NotIn", "values": ["x"]}]},
             "podSelector": sel(pod="b")}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False)
          .pair("y/b", "x/a", True).pair("z/b", "x/a", True))]),
    "multiple-pod-and-namespace-selectors": Case(
        [policy("multi", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"namespaceSelector": {"matchExpressions": [
                {"key": NS_KEY, "operator": "NotIn", "values": ["x"]}]},
             "podSelector": {"matchExpressions": [
                 {"key": "pod", "operator": "In", "values": ["b", "c"]}]}}]}]})],
        [(80, TCP, lambda: Expect().peer(X(), X("a"), False)
          .pair("y/a", "x/a", False).pair("z/a", "x/a", False))]),
    "any-pod-selectors": Case(
        [policy("b-or-c", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"podSelector": sel(pod="b")}, {"podSelector": sel(pod="c")}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False)
          .pair("x/b", "x/a", True).pair("x/c", "x/a", True))]),
    "only-a-pod-in-another-namespace": Case(
        [policy("y-a", "x", {"podSelector": sel(pod="a"), "ingress": [{"from": [
            {"namespaceSelector": ns_sel("y"), "podSelector": sel(pod="a")}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False).pair("y/a", "x/a", True))]),
    "ports": Case(
        [policy("allow-81", "x", {"podSelector": sel(pod="a"), "ingress": [{
            "from": [{"namespaceSelector": ns_sel("y")}],
            "ports": [{"port": 81, "protocol": "TCP"}]}]})],
        [(81, TCP, lambda: Expect().peer(X(), X("a"), False).peer(Z(), X("a"), False)),
         (80, TCP, lambda: Expect().all_ingress("x/a", False))]),
    "stacked-policies-overlapping-selectors": Case(
        [policy(f"allow-{port}", "x", {"podSelector": sel(pod="a"), "ingress": [{
            "from": [{"namespaceSelector": ns_sel("y")}],
            "ports": [{"port": port, "protocol": "TCP"}]}]}) for port in (80, 81)],
        [(port, TCP, lambda: Expect().peer(X(), X("a"), False).peer(Z(), X("a"), False))
         for port in (80, 81)]),
    "allow-all": Case(
        [policy("allow-all", "x", {"podSelector": {}, "ingress": [{}]})],
        [(80, TCP, Expect), (81, TCP, Expect)]),
    "ingress-on-one-named-port": Case(
        [policy("allow-all", "x", {"podSelector": {}, "ingress": [
            {"ports": [{"port": "serve-81-tcp"}]}]})],
        [(81, TCP, Expect), (80, TCP, lambda: Expect().peer(ANY, X(), False))]),
    "ingress-from-namespace-on-one-named-port": Case(
        [policy("named", "x", {"podSelector": sel(pod="a"), "ingress": [{
            "from": [{"namespaceSelector": ns_sel("y")}],
            "ports": [{"port": "serve-80-tcp", "protocol": "TCP"}]}]})],
        [(80, TCP, lambda: Expect().peer(X(), X("a"), False).peer(Z(), X("a"), False)),
         (81, TCP, lambda: Expect().all_ingress("x/a", False))]),
    "egress-on-one-named-port": Case(
        # the suite sets policyTypes: [Egress]; without it Ingress would be isolated too
        [policy("allow-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"], "egress": [
            {"ports": [{"port": "serve-80-tcp"}]}]})],
        [(80, TCP, Expect), (81, TCP, lambda: Expect().peer(X(), ANY, False))]),
    "egress-rules-without-policy-types-also-isolate-ingress": Case(
        [policy("defaulted", "x", {"podSelector": {}, "egress": [{}]})],
        [(80, TCP, lambda: Expect().peer(ANY, X(), False))]),
    "updated-policy-deny-all": Case(
        [policy("mutated", "x", {"podSelector": {}, "ingress": []})],
        [(81, TCP, lambda: Expect().peer(ANY, X(), False))]),
    "ingress-from-labelled-namespace": Case(
        [policy("ns2", "x", {"podSelector": sel(pod="a"), "ingress": [
            {"from": [{"namespaceSelector": sel(ns2="updated")}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False).peer(Y(), X("a"), True))],
        ns_labels={"y": {"ns2": "updated"}}),
    "deny-egress-from-pod": Case(
        [policy("deny-egress-a", "x", {"podSelector": sel(pod="a"), "egress": [],
                                       "policyTypes": ["Egress"]})],
        [(80, TCP, lambda: Expect().all_egress("x/a", False))]),
    "deny-egress-from-namespace": Case(
        [policy("deny-egress", "x", {"podSelector": {}, "policyTypes": ["Egress"]})],
        [(80, TCP, lambda: Expect().peer(X(), ANY, False))]),
    "ingress-and-egress-together": Case(
        [policy("both", "x", {"podSelector": sel(pod="a"),
                              "ingress": [{"from": [{"podSelector": sel(pod="b")}]}],
                              "egress": [{"to": [{"namespaceSelector": ns_sel("y")}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False).pair("x/b", "x/a", True)
          .all_egress("x/a", False).peer(X("a"), Y(), True))]),
    "egress-to-a-port-range": Case(
        [policy("range", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                               "egress": [{"to": [{"namespaceSelector": ns_sel("y")}],
                                           "ports": [{"port": 80, "endPort": 81}]}]})],
        [(80, TCP, lambda: Expect().all_egress("x/a", False).peer(X("a"), Y(), True)),
         (81, TCP, lambda: Expect().all_egress("x/a", False).peer(X("a"), Y(), True)),
         (82, TCP, lambda: Expect().all_egress("x/a", False)),
         (80, UDP, lambda: Expect().all_egress("x/a", False))]),
    "ingress-from-a-port-range-multiple-rules": Case(
        [policy("range", "x", {"podSelector": sel(pod="a"), "ingress": [
            {"from": [{"namespaceSelector": ns_sel("y")}],
             "ports": [{"port": 80, "endPort": 80}]},
            {"from": [{"namespaceSelector": ns_sel("z")}],
             "ports": [{"port": 81, "endPort": 85}]}]})],
        [(80, TCP, lambda: Expect().all_ingress("x/a", False).peer(Y(), X("a"), True)),
         (81, TCP, lambda: Expect().all_ingress("x/a", False).peer(Z(), X("a"), True))]),
    "egress-to-server-in-cidr": Case(
        [policy("cidr", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                              "egress": [{"to": [{"ipBlock": {"cidr": ip_of("y/b") + "/32"}}]}]})],
        [(80, TCP, lambda: Expect().all_egress("x/a", False).pair("x/a", "y/b", True))]),
    "egress-cidr-except": Case(
        [policy("except", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                "egress": [{"to": [{"ipBlock": {
                                    "cidr": "10.2.0.0/16", "except": [ip_of("y/b") + "/32"]}}]}]})],
        [(80, TCP, lambda: Expect().all_egress("x/a", False)
          .pair("x/a", "y/a", True).pair("x/a", "y/c", True))]),
    "ip-in-cidr-and-except-allowed-by-another-policy": Case(
        [policy("except", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                "egress": [{"to": [{"ipBlock": {
                                    "cidr": "10.2.0.0/16", "except": [ip_of("y/b") + "/32"]}}]}]}),
         policy("exact", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                               "egress": [{"to": [{"ipBlock": {"cidr": ip_of("y/b") + "/32"}}]}]})],
        [(80, TCP, lambda: Expect().all_egress("x/a", False).peer(X("a"), Y(), True))]),
    "ingress-only-udp-not-tcp": Case(
        [policy("udp", "x", {"podSelector": sel(pod="a"), "ingress": [
            {"ports": [{"port": 81, "protocol": "UDP"}]}]})],
        [(81, TCP, lambda: Expect().all_ingress("x/a", False)), (81, UDP, Expect)]),
    "ingress-sctp": Case(
        [policy("sctp", "x", {"podSelector": sel(pod="a"), "ingress": [
            {"ports": [{"port": 80, "protocol": "SCTP"}]}]})],
        [(80, SCTP, Expect), (80, TCP, lambda: Expect().all_ingress("x/a", False))]),
    "any-port-on-a-protocol": Case(
        [policy("tcp-any", "x", {"podSelector": sel(pod="a"), "ingress": [
            {"ports": [{"protocol": "TCP"}]}]})],
        [(80, TCP, Expect), (81, TCP, Expect),
         (80, UDP, lambda: Expect().all_ingress("x/a", False))]),
    "egress-deny-wins-over-ingress-allow": Case(
        # client side denies even though the server explicitly allows
        [policy("deny-egress-a", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"]}),
         policy("allow-from-x-a", "y", {"podSelector": sel(pod="b"), "ingress": [{"from": [
             {"namespaceSelector": ns_sel("x"), "podSelector": sel(pod="a")}]}]})],
        [(80, TCP, lambda: Expect().all_egress("x/a", False).all_ingress("y/b", False))]),
    "multiple-egress-policies-allow-all-wins": Case(
        [policy("to-y", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                              "egress": [{"to": [{"namespaceSelector": ns_sel("y")}]}]}),
         policy("allow-all", "x", {"podSelector": sel(pod="a"), "policyTypes": ["Egress"],
                                   "egress": [{}]})],
        [(80, TCP, Expect)]),
    "ingress-rules-ignored-without-ingress-type": Case(
        # policyTypes [Egress] with an egress allow-all: the ingress list does not isolate
        [policy("egress-only", "x", {"podSelector": {}, "policyTypes": ["Egress"],
                                     "ingress": [], "egress": [{}]})],
        [(80, TCP, Expect)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_upstream_e2e_truth_table(name: str) -> None:
    case = CASES[name]
    cluster = build(case.policies, case.ns_labels)
    evaluator = IndexedEvaluator(cluster)
    for port, protocol, expect in case.checks:
        want = expect().table
        for got in (evaluator.matrix(port, protocol), naive_matrix(cluster, port, protocol)):
            table = got.to_dict()
            wrong = sorted(
                f"{s}->{d}: want {w}" for (s, d), w in want.items() if table[s][d] != w
            )
            assert not wrong, f"{name} {protocol.value}/{port}: {wrong}\n{got.render_text()}"

"""Lint a cluster's NetworkPolicies for the gaps platform teams most often leave open.

Codes:

========  ========  ==============================================================
code      severity  finding
========  ========  ==============================================================
NP001     warning   a namespace with pods has no default-deny ingress policy
NP002     warning   a pod no NetworkPolicy selects (open in both directions)
NP003     warning   a NetworkPolicy that selects no pod
NP004     error     egress is isolated but no egress rule allows DNS (UDP 53)
NP005     warning   egress allows DNS over UDP but not over TCP 53 (large answers)
NP006     error     a pod carrying a required label is selected by no NetworkPolicy
========  ========  ==============================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from trustmesh.errors import InvalidInput
from trustmesh.policy.labels import validate_label_key, validate_label_value
from trustmesh.policy.netpol import IndexedEvaluator, Pod, Protocol
from trustmesh.policy.netpol_model import Cluster, PortSpec, Rule

__all__ = ["Finding", "Severity", "lint", "parse_required_label"]

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    severity: Severity
    code: str
    object: str
    message: str

    def to_dict(self) -> dict[str, str]:
        return {
            "severity": self.severity,
            "code": self.code,
            "object": self.object,
            "message": self.message,
        }


def parse_required_label(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` for ``--require-policy-for``, both validated as label syntax."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InvalidInput(f"expected KEY=VALUE, got {text!r}", field="require-policy-for")
    validate_label_key(key, "require-policy-for")
    validate_label_value(value, "require-policy-for")
    return key, value


def _port_opens(spec: PortSpec, port: int, protocol: Protocol, cluster: Cluster) -> bool:
    if spec.protocol != protocol:
        return False
    if spec.port is None:
        return True
    if isinstance(spec.port, str):
        # A name only opens DNS if some pod serves DNS under that name.
        name = spec.port
        return any(port in pod.resolve_named_port(name, protocol) for pod in cluster.pods)
    return spec.port <= port <= (spec.end_port or spec.port)


def _rules_allow_port(rules: Sequence[Rule], port: int, protocol: Protocol,
                      cluster: Cluster) -> bool:
    return any(
        not rule.ports or any(_port_opens(s, port, protocol, cluster) for s in rule.ports)
        for rule in rules
    )


def _short(pods: Sequence[Pod], limit: int = 5) -> str:
    names = [p.key for p in pods[:limit]]
    more = f" and {len(pods) - limit} more" if len(pods) > limit else ""
    return ", ".join(names) + more


def lint(
    cluster: Cluster,
    required_labels: Sequence[tuple[str, str]] = (),
    evaluator: IndexedEvaluator | None = None,
) -> list[Finding]:
    """Every finding, errors first, then by code and object."""
    ev = evaluator or IndexedEvaluator(cluster)
    findings: list[Finding] = []
    selected_sets = [ev.selected_pods(i) for i in range(len(cluster.policies))]

    ns_with_pods = sorted({p.namespace for p in cluster.pods})
    for ns in ns_with_pods:
        if not any(
            pol.namespace == ns and pol.affects_ingress and pol.pod_selector.is_empty
            for pol in cluster.policies
        ):
            findings.append(Finding(
                "warning", "NP001", f"Namespace {ns}",
                "no default-deny ingress policy (a NetworkPolicy with an empty podSelector "
                "and Ingress in policyTypes): pods without a policy accept every connection",
            ))

    covered: set[str] = {pod.key for pods in selected_sets for pod in pods}
    for pod in cluster.pods:
        if pod.key not in covered:
            findings.append(Finding(
                "warning", "NP002", f"Pod {pod.key}",
                "no NetworkPolicy selects this pod: it is open for ingress and egress",
            ))

    for pol, pods in zip(cluster.policies, selected_sets, strict=True):
        if not pods:
            findings.append(Finding(
                "warning", "NP003", f"NetworkPolicy {pol.key}",
                f"selects no pod (podSelector {pol.pod_selector.describe()} in namespace "
                f"{pol.namespace})",
            ))

    findings.extend(_dns_findings(cluster, selected_sets))

    for key, value in required_labels:
        for pod in cluster.pods:
            if pod.labels.get(key) == value and pod.key not in covered:
                findings.append(Finding(
                    "error", "NP006", f"Pod {pod.key}",
                    f"pods labelled {key}={value} must be selected by a NetworkPolicy, "
                    "and none selects this one",
                ))

    order = {"error": 0, "warning": 1}
    findings.sort(key=lambda f: (order[f.severity], f.code, f.object))
    return findings


def _dns_findings(cluster: Cluster, selected_sets: list[list[Pod]]) -> list[Finding]:
    egress_rules: dict[str, list[Rule]] = {}
    for pol, pods in zip(cluster.policies, selected_sets, strict=True):
        if pol.affects_egress:
            for pod in pods:
                egress_rules.setdefault(pod.key, []).extend(pol.egress)
    out = []
    for pol, pods in zip(cluster.policies, selected_sets, strict=True):
        if not pol.affects_egress or not pods:
            continue
        no_udp = [p for p in pods
                  if not _rules_allow_port(egress_rules[p.key], 53, Protocol.UDP, cluster)]
        missing = {p.key for p in no_udp}
        no_tcp = [p for p in pods if p.key not in missing
                  and not _rules_allow_port(egress_rules[p.key], 53, Protocol.TCP, cluster)]
        if no_udp:
            out.append(Finding(
                "error", "NP004", f"NetworkPolicy {pol.key}",
                f"isolates egress of {len(pods)} pod(s) and no egress rule selecting "
                f"{_short(no_udp)} allows DNS (UDP 53): name resolution will fail",
            ))
        if no_tcp:
            out.append(Finding(
                "warning", "NP005", f"NetworkPolicy {pol.key}",
                f"egress of {_short(no_tcp)} allows DNS over UDP 53 but not TCP 53 "
                "(truncated answers retry over TCP)",
            ))
    return out

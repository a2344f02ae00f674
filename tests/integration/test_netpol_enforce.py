"""The kernel enforces what the evaluator says: real TCP and UDP between network namespaces.

A lab of two namespaces, x and y, with pods a, b, c each (the upstream e2e
model, one namespace fewer) runs as Linux network namespaces on a bridge. For
hand-written and generated policy sets, the rulesets are loaded, every pod
tries every pod on TCP 80, TCP 81 and UDP 80, and what connects must be
exactly the evaluator's matrix. Needs root and nft; everything the lab
creates is removed at teardown and checked to be gone.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.cli.netpol_lab import netlab
from trustmesh.enforce.netns import (
    Lab,
    apply_policies,
    compare,
    lab_down,
    lab_netns,
    lab_up,
    listeners,
    plan_lab,
    probe,
)
from trustmesh.policy.labels import LabelSelector, Operator, Requirement
from trustmesh.policy.netpol import (
    Cluster,
    IndexedEvaluator,
    IPBlock,
    NetworkPolicy,
    Peer,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
    load_cluster,
)

pytestmark = [pytest.mark.root]


@pytest.fixture(autouse=True)
def _needs_root_and_nft() -> None:
    """These tests run for real or fail; they are never skipped."""
    if os.geteuid() != 0:
        pytest.fail("needs root for network namespaces (CI runs as root)", pytrace=False)
    if shutil.which("nft") is None and not os.path.exists("/usr/sbin/nft"):
        pytest.fail("needs nft: run scripts/setup.sh --test", pytrace=False)

NAMESPACES = ("x", "y")
PODS = ("a", "b", "c")
PORTS = [(80, Protocol.TCP), (81, Protocol.TCP), (80, Protocol.UDP)]
TIMEOUT = 1.0
LAB = f"t{os.getpid() % 10**8}"


def ip_of(ns: str, pod: str) -> str:
    # x at 10.77.0.1-3, y at 10.77.0.9-11: generated /29../31 ipBlocks cut across them
    return f"10.77.0.{NAMESPACES.index(ns) * 8 + PODS.index(pod) + 1}"


def model_docs() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for ns in NAMESPACES:
        docs.append({"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns, "labels": {"team": ns}}})
        for pod in PODS:
            ports = [{"name": f"serve-{n}-{p.value.lower()}", "containerPort": n,
                      "protocol": p.value} for n, p in PORTS]
            docs.append({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": pod, "namespace": ns, "labels": {"pod": pod}},
                "spec": {"containers": [{"name": "c", "ports": ports}]},
                "status": {"podIP": ip_of(ns, pod)},
            })
    return docs


def with_policies(*policies: tuple[str, str, dict[str, Any]]) -> Cluster:
    docs = model_docs() + [
        {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
         "metadata": {"name": name, "namespace": ns}, "spec": spec}
        for name, ns, spec in policies
    ]
    return load_cluster([("model", yaml.safe_dump_all(docs))])


def assert_kernel_matches(lab: Lab, cluster: Cluster) -> None:
    apply_policies(lab, cluster)
    observed = probe(lab, PORTS, TIMEOUT)
    evaluator = IndexedEvaluator(cluster)
    diffs = []
    for got in observed:
        want = evaluator.matrix(got.port, got.protocol)
        diffs += [d.describe() for d in compare(want, got)]
    assert not diffs, "\n".join(diffs)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    cluster = with_policies()
    planned = plan_lab(cluster, LAB)
    lab_down(LAB)  # leftovers of a crashed run with the same pid
    try:
        lab_up(planned, cluster)
        with listeners(planned, PORTS):
            yield planned
    finally:
        lab_down(LAB)
        assert lab_netns(LAB) == []


def test_open_cluster_connects_everything(lab: Lab) -> None:
    cluster = with_policies()
    apply_policies(lab, cluster)
    observed = probe(lab, PORTS, TIMEOUT)
    assert all(m.count_allowed() == 36 for m in observed)


X_ALL: dict[str, Any] = {"podSelector": {}}
CASES: dict[str, list[tuple[str, str, dict[str, Any]]]] = {
    "default-deny-ingress": [("deny", "x", {**X_ALL, "policyTypes": ["Ingress"]})],
    "default-deny-both": [("deny", "x", {**X_ALL, "policyTypes": ["Ingress", "Egress"]})],
    "allow-from-namespace": [
        ("from-y", "x", {**X_ALL, "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}}}]}]}),
    ],
    "pod-and-namespace-selector-and": [
        ("ya-to-xa", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": [
            {"from": [{"namespaceSelector": {"matchLabels": {"team": "y"}},
                       "podSelector": {"matchLabels": {"pod": "a"}}}]}]}),
    ],
    "ip-block-except": [
        ("cidr", "y", {**X_ALL, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.77.0.0/29", "except": ["10.77.0.2/32"]}}]}]}),
    ],
    "named-port-ingress": [
        ("named", "x", {**X_ALL, "ingress": [{"ports": [{"port": "serve-81-tcp"}]}]}),
    ],
    "end-port-range-and-udp": [
        ("range", "x", {**X_ALL, "ingress": [{"ports": [
            {"port": 79, "endPort": 80}, {"protocol": "UDP", "port": 80}]}]}),
    ],
    "egress-with-dns-and-named-port": [
        ("deny-out", "x", {**X_ALL, "policyTypes": ["Egress"]}),
        ("dns", "x", {**X_ALL, "policyTypes": ["Egress"], "egress": [{"ports": [
            {"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}]}),
        ("to-y", "x", {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
                       "egress": [{"to": [{"namespaceSelector": {}}],
                                   "ports": [{"port": "serve-80-udp", "protocol": "UDP"},
                                             {"port": "serve-81-tcp"}]}]}),
    ],
    "both-directions-across-namespaces": [
        ("out", "x", {"podSelector": {"matchLabels": {"pod": "a"}}, "egress": [
            {"to": [{"podSelector": {"matchLabels": {"pod": "c"}},
                     "namespaceSelector": {"matchLabels": {"team": "y"}}}]}]}),
        ("in", "y", {"podSelector": {"matchLabels": {"pod": "c"}}, "ingress": [
            {"from": [{"ipBlock": {"cidr": "10.77.0.0/30"}}], "ports": [{"port": 80}]}]}),
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_matrix(lab: Lab, case: str) -> None:
    assert_kernel_matches(lab, with_policies(*CASES[case]))


# -- generated policy sets ----------------------------------------------------

KEYS = ("pod", "team")
VALUES = ("a", "b", "c", "x", "y")


@st.composite
def selector(draw: st.DrawFn) -> LabelSelector:
    pairs = draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=1))
    exprs = []
    for _ in range(draw(st.integers(0, 1))):
        op = draw(st.sampled_from(list(Operator)))
        values = frozenset(draw(st.sets(st.sampled_from(VALUES), min_size=1, max_size=2))) \
            if op in (Operator.IN, Operator.NOT_IN) else frozenset()
        exprs.append(Requirement(draw(st.sampled_from(KEYS)), op, values))
    return LabelSelector(tuple(sorted(pairs.items())), tuple(exprs))


@st.composite
def ip_block(draw: st.DrawFn) -> IPBlock:
    prefix = draw(st.integers(28, 31))
    net = ipaddress.IPv4Network(f"10.77.0.{draw(st.integers(0, 15))}/{prefix}", strict=False)
    excepts = [draw(st.sampled_from(list(net.subnets(new_prefix=draw(st.integers(prefix + 1,
                                                                               32))))))
               for _ in range(draw(st.integers(0, 2)))]
    return IPBlock(net, tuple(excepts))


@st.composite
def peer(draw: st.DrawFn) -> Peer:
    kind = draw(st.sampled_from(("pod", "ns", "both", "ip")))
    if kind == "ip":
        return Peer(ip_block=draw(ip_block()))
    return Peer(pod_selector=draw(selector()) if kind in ("pod", "both") else None,
                namespace_selector=draw(selector()) if kind in ("ns", "both") else None)


@st.composite
def port_spec(draw: st.DrawFn) -> PortSpec:
    proto = draw(st.sampled_from((Protocol.TCP, Protocol.UDP)))
    kind = draw(st.sampled_from(("any", "number", "range", "name")))
    if kind == "any":
        return PortSpec(proto)
    if kind == "name":
        return PortSpec(proto, draw(st.sampled_from(
            ("serve-80-tcp", "serve-81-tcp", "serve-80-udp", "absent"))))
    port = draw(st.sampled_from((79, 80, 81)))
    return PortSpec(proto, port, port + draw(st.integers(0, 2)) if kind == "range" else None)


rule_st = st.builds(Rule, st.lists(peer(), max_size=2).map(tuple),
                    st.lists(port_spec(), max_size=2).map(tuple))


@st.composite
def policy_set(draw: st.DrawFn) -> list[NetworkPolicy]:
    out = []
    for i in range(draw(st.integers(1, 4))):
        types = draw(st.sets(st.sampled_from(list(PolicyType)), min_size=1))
        out.append(NetworkPolicy(
            draw(st.sampled_from(NAMESPACES)), f"gen{i}", draw(selector()), frozenset(types),
            tuple(draw(st.lists(rule_st, max_size=2))),
            tuple(draw(st.lists(rule_st, max_size=2))),
        ))
    return out


@settings(max_examples=8, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(policy_set())
def test_generated_policies_kernel_matches_matrix(lab: Lab,
                                                  policies: list[NetworkPolicy]) -> None:
    base = with_policies()
    cluster = Cluster.build(base.namespaces, base.pods, policies)
    assert_kernel_matches(lab, cluster)


# -- the CLI and crash cleanup --------------------------------------------------


def test_cli_up_check_status_down(tmp_path: Any) -> None:
    name = f"c{os.getpid() % 10**8}"
    model = tmp_path / "model.yaml"
    model.write_text(yaml.safe_dump_all(model_docs()))
    pols = tmp_path / "pol.yaml"
    pols.write_text(yaml.safe_dump({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "y"},
        "spec": {"podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Ingress"]}}))
    runner = CliRunner()
    files = ["-f", str(model), "-f", str(pols), "--lab", name]
    try:
        up = runner.invoke(netlab, ["up", *files])
        assert up.exit_code == 0, up.output
        assert f"lab {name} is up: 6 pods" in up.output
        again = runner.invoke(netlab, ["up", *files])
        assert again.exit_code == 4 and "already exists" in again.output
        status = runner.invoke(netlab, ["status", "--lab", name])
        assert f"lab {name}: up, 7 namespaces" in status.output
        ok = runner.invoke(netlab, ["check", *files, "--port", "80"])
        assert ok.exit_code == 0, ok.output
        assert "36 probes (TCP/80)" in ok.output and "kernel matches the evaluator" in ok.output
        # rules loaded for the model without policy, checked against the policy: y/b differs
        runner.invoke(netlab, ["apply", "-f", str(model), "--lab", name])
        bad = runner.invoke(netlab, ["check", *files, "--no-apply", "--port", "80",
                                     "--protocol", "udp"])
        assert bad.exit_code == 1
        assert bad.output.count("DIFF ") == 6 and "-> y/b UDP/80" in bad.output
    finally:
        down = runner.invoke(netlab, ["down", "--lab", name])
    assert "removed 7 namespaces" in down.output
    assert lab_netns(name) == []


def test_down_removes_a_crashed_lab_with_processes_inside() -> None:
    name = f"k{os.getpid() % 10**8}"
    cluster = with_policies()
    planned = plan_lab(cluster, name)
    try:
        lab_up(planned, cluster)
        # a process left running in a pod namespace, as after a killed check
        proc = subprocess.Popen(  # noqa: S603
            ["ip", "netns", "exec", planned.pods[0].netns, sys.executable, "-c",
             "import time; time.sleep(60)"])
    finally:
        removed = lab_down(name)
    assert proc.wait(timeout=10) != 0
    assert len(removed) == 7 and lab_netns(name) == []

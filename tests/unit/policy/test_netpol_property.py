"""Property: the indexed evaluator, the naive reference and explain agree on generated clusters."""

from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustmesh.policy.labels import LabelSelector, Operator, Requirement
from trustmesh.policy.netpol import (
    Cluster,
    ContainerPort,
    IndexedEvaluator,
    IPBlock,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
    explain,
    naive_matrix,
)

KEYS = ("app", "tier", "env")
VALUES = ("a", "b", "c")
PORT_NAMES = ("http", "dns", "metrics")
PORTS = (53, 80, 81)
PROTOCOLS = (Protocol.TCP, Protocol.UDP)

labels_st = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)


@st.composite
def requirement(draw: st.DrawFn) -> Requirement:
    op = draw(st.sampled_from(list(Operator)))
    values: frozenset[str] = frozenset()
    if op in (Operator.IN, Operator.NOT_IN):
        values = frozenset(draw(st.sets(st.sampled_from(VALUES), min_size=1, max_size=2)))
    return Requirement(draw(st.sampled_from(KEYS)), op, values)


@st.composite
def selector(draw: st.DrawFn) -> LabelSelector:
    pairs = draw(st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=1))
    exprs = draw(st.lists(requirement(), max_size=2))
    return LabelSelector(tuple(sorted(pairs.items())), tuple(exprs))


@st.composite
def ip_block(draw: st.DrawFn) -> IPBlock:
    prefix = draw(st.integers(29, 31))
    net = ipaddress.ip_network(f"10.0.0.{draw(st.integers(0, 7))}/{prefix}", strict=False)
    excepts = []
    for _ in range(draw(st.integers(0, 2))):  # possibly overlapping
        sub_prefix = draw(st.integers(prefix + 1, 32))
        subnets = list(net.subnets(new_prefix=sub_prefix))
        excepts.append(draw(st.sampled_from(subnets)))
    return IPBlock(net, tuple(excepts))  # type: ignore[arg-type]


@st.composite
def peer(draw: st.DrawFn) -> Peer:
    kind = draw(st.sampled_from(("pod", "ns", "both", "ip", "ip")))
    if kind == "ip":
        return Peer(ip_block=draw(ip_block()))
    pod_sel = draw(selector()) if kind in ("pod", "both") else None
    ns_sel = draw(selector()) if kind in ("ns", "both") else None
    return Peer(pod_selector=pod_sel, namespace_selector=ns_sel)


@st.composite
def port_spec(draw: st.DrawFn) -> PortSpec:
    proto = draw(st.sampled_from(PROTOCOLS))
    kind = draw(st.sampled_from(("none", "number", "range", "name")))
    if kind == "none":
        return PortSpec(proto)
    if kind == "name":
        return PortSpec(proto, draw(st.sampled_from(PORT_NAMES)))
    port = draw(st.sampled_from((53, 79, 80, 81)))
    if kind == "range":
        return PortSpec(proto, port, port + draw(st.integers(0, 2)))
    return PortSpec(proto, port)


rule_st = st.builds(Rule, st.lists(peer(), max_size=2).map(tuple),
                    st.lists(port_spec(), max_size=2).map(tuple))


@st.composite
def cluster(draw: st.DrawFn) -> Cluster:
    ns_names = draw(st.lists(st.sampled_from(("x", "y", "z")), min_size=1, max_size=3,
                             unique=True))
    namespaces = [Namespace(n, draw(labels_st)) for n in ns_names]
    pods = []
    for i in range(draw(st.integers(0, 7))):
        ports = tuple(
            ContainerPort(draw(st.sampled_from(PORTS)), draw(st.sampled_from(PROTOCOLS)),
                          draw(st.sampled_from((None, *PORT_NAMES))))
            for _ in range(draw(st.integers(0, 2)))
        )
        ips = (ipaddress.ip_address(f"10.0.0.{draw(st.integers(0, 9))}"),) if draw(
            st.booleans()) else ()
        pods.append(Pod(draw(st.sampled_from(ns_names)), f"p{i}", draw(labels_st), ports, ips))
    policies = []
    for i in range(draw(st.integers(0, 5))):
        types = draw(st.sets(st.sampled_from(list(PolicyType)), min_size=1))
        policies.append(NetworkPolicy(
            draw(st.sampled_from(ns_names)), f"np{i}", draw(selector()), frozenset(types),
            tuple(draw(st.lists(rule_st, max_size=2))),
            tuple(draw(st.lists(rule_st, max_size=2))),
        ))
    return Cluster.build(namespaces, pods, policies)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cluster())
def test_indexed_equals_naive_equals_explain(c: Cluster) -> None:
    evaluator = IndexedEvaluator(c)
    for port in PORTS:
        for proto in PROTOCOLS:
            fast = evaluator.matrix(port, proto)
            slow = naive_matrix(c, port, proto)
            assert fast.rows == slow.rows, (port, proto, fast.render_text(), slow.render_text())
            for i, src in enumerate(c.pods):
                for j, dst in enumerate(c.pods):
                    assert explain(c, src, dst, port, proto).allowed == fast.allowed(i, j)


@settings(max_examples=50, deadline=None)
@given(cluster(), st.sampled_from(("10.0.0.3", "10.0.0.9", "192.0.2.1")))
def test_external_ip_only_matches_ip_blocks(c: Cluster, text: str) -> None:
    ip = ipaddress.ip_address(text)
    for pod in c.pods:
        v = explain(c, pod, ip, 80, Protocol.TCP)
        assert v.ingress.allowed and not v.ingress.in_cluster
        for ref in v.egress.allowed_by:
            policy = next(p for p in c.policies if p.key == ref.policy)
            rule = policy.egress[ref.rule]
            assert not rule.peers or any(p.ip_block is not None for p in rule.peers)


def test_nested_and_overlapping_excepts() -> None:
    pods = [Pod("x", f"p{i}", {}, (), (ipaddress.ip_address(f"10.0.0.{i}"),)) for i in range(8)]
    block = IPBlock(ipaddress.ip_network("10.0.0.0/29"), tuple(
        ipaddress.ip_network(n) for n in ("10.0.0.0/30", "10.0.0.1/32", "10.0.0.6/31")))
    target = NetworkPolicy("x", "only-block", LabelSelector(), frozenset({PolicyType.INGRESS}),
                           (Rule((Peer(ip_block=block),)),))
    c = Cluster.build([Namespace("x", {})], pods, [target])
    fast = IndexedEvaluator(c).matrix(80)
    assert fast.rows == naive_matrix(c, 80).rows
    allowed_sources = [i for i in range(8) if fast.allowed(i, 0)]
    assert allowed_sources == [4, 5]

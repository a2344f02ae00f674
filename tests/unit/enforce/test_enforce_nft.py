"""The nftables compiler: the ruleset text for known policies, one rule of the spec at a time."""

from __future__ import annotations

import ipaddress
import re

import pytest
import yaml

from trustmesh.enforce.netns import (
    Difference,
    compare,
    declared_ports,
    plan_lab,
    require_tools,
)
from trustmesh.enforce.nft import TABLE_NAME, compile_cluster, compile_pod, render_cluster
from trustmesh.errors import ConfigError, InvalidInput, PermissionDenied
from trustmesh.policy.netpol import Cluster, Protocol, Reachability, load_cluster

PODS = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {team: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: y}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a}}
  spec:
    containers:
    - name: c
      ports:
      - {name: http, containerPort: 8080}
      - {name: dns, containerPort: 53, protocol: UDP}
  status: {podIP: 10.0.0.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: b, namespace: x, labels: {pod: b}}
  spec:
    containers:
    - name: c
      ports: [{name: http, containerPort: 9090}]
  status: {podIP: 10.0.0.2}
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: y, labels: {pod: a}}
  status: {podIP: 10.0.1.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: b, namespace: y, labels: {pod: b}}
  status: {podIP: 10.0.1.2}
"""


def cluster(*policies: str) -> Cluster:
    docs = [PODS]
    for i, spec in enumerate(policies):
        docs.append(yaml.safe_dump({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"np{i}", "namespace": "x"},
            "spec": yaml.safe_load(spec),
        }))
    return load_cluster([("test", "\n---\n".join(docs))])


def chain(text: str, name: str) -> list[str]:
    """The statements of chain ``name``, without the hook line and comments."""
    body = text.split(f"chain {name} {{", 1)[1].split("\n\t}", 1)[0]
    return [
        line.strip() for line in body.splitlines()[1:]
        if line.strip() and not line.strip().startswith(("#", "type filter"))
    ]


def set_elements(text: str, name: str) -> list[str]:
    match = re.search(rf"set {name} {{.*?elements = {{ (.*?) }}", text, re.S)
    assert match, f"no set {name} in\n{text}"
    return match.group(1).split(", ")


def rules(text: str, name: str) -> list[str]:
    """The policy rules of a chain (after the fixed preamble, before the final drop)."""
    return [r for r in chain(text, name)[4:] if not r.startswith("drop")]


def test_table_is_replaced_atomically() -> None:
    text = compile_pod(cluster(), cluster().pod("x/a")).text
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines[:3] == [f"add table inet {TABLE_NAME}", f"delete table inet {TABLE_NAME}",
                         f"table inet {TABLE_NAME} {{"]
    assert "type filter hook input priority filter; policy accept;" in text
    assert "type filter hook output priority filter; policy accept;" in text


def test_unselected_pod_is_open_both_ways() -> None:
    c = cluster("{podSelector: {matchLabels: {pod: a}}}")
    text = compile_pod(c, c.pod("x/b")).text
    assert chain(text, "ingress") == [] and chain(text, "egress") == []
    assert "drop" not in text


def test_default_deny_ingress() -> None:
    c = cluster("{podSelector: {}}")
    rs = compile_pod(c, c.pod("x/a"))
    assert rs.ingress_isolated_by == ("x/np0",) and rs.egress_isolated_by == ()
    stmts = chain(rs.text, "ingress")
    assert stmts[0] == "ct state established,related accept"
    assert stmts[-1] == 'drop comment "isolated for ingress by x/np0"'
    assert rules(rs.text, "ingress") == []
    assert chain(rs.text, "egress") == []
    # other namespaces are not selected
    assert compile_pod(c, c.pod("y/a")).ingress_isolated_by == ()


def test_default_deny_both_directions() -> None:
    c = cluster("{podSelector: {}, policyTypes: [Ingress, Egress]}")
    text = compile_pod(c, c.pod("x/b")).text
    assert chain(text, "egress")[-1] == 'drop comment "isolated for egress by x/np0"'
    assert rules(text, "egress") == [] and rules(text, "ingress") == []


def test_allow_from_namespace_is_a_set_of_its_pod_ips() -> None:
    c = cluster("{podSelector: {}, ingress: [{from: [{namespaceSelector: "
                "{matchLabels: {team: y}}}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert set_elements(text, "ingress_0_v4") == ["10.0.1.1-10.0.1.2"]
    assert rules(text, "ingress") == [
        'ip saddr @ingress_0_v4 accept comment "x/np0 ingress[0]"']


def test_pod_selector_alone_means_the_policy_namespace() -> None:
    c = cluster("{podSelector: {matchLabels: {pod: a}}, ingress: [{from: "
                "[{podSelector: {matchLabels: {pod: b}}}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert set_elements(text, "ingress_0_v4") == ["10.0.0.2"]  # not y/b


def test_selectors_that_match_no_pod_allow_nothing() -> None:
    c = cluster("{podSelector: {}, ingress: [{from: [{podSelector: "
                "{matchLabels: {pod: nobody}}}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert rules(text, "ingress") == []
    assert "# x/np0 ingress[0] matches nothing here" in text


def test_ip_block_except_is_carved_out() -> None:
    c = cluster("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/24, "
                "except: [10.0.0.128/25, 10.0.0.0/30, 10.0.0.2/31]}}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert set_elements(text, "ingress_0_v4") == ["10.0.0.4-10.0.0.127"]


def test_ip_block_and_pods_are_merged_without_overlap() -> None:
    c = cluster("{podSelector: {}, policyTypes: [Egress], egress: [{to: ["
                "{ipBlock: {cidr: 10.0.0.0/31}}, {podSelector: {}}, "
                "{ipBlock: {cidr: 192.168.0.0/16, except: [192.168.1.0/24]}}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert set_elements(text, "egress_0_v4") == [
        "10.0.0.0-10.0.0.2", "192.168.0.0/24", "192.168.2.0-192.168.255.255"]
    assert rules(text, "egress") == ['ip daddr @egress_0_v4 accept comment "x/np0 egress[0]"']


def test_ipv6_block_gets_its_own_set() -> None:
    c = cluster("{podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 'fd00::/64', "
                "except: ['fd00::/65']}}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert set_elements(text, "ingress_0_v6") == ["fd00::8000:0:0:0/65"]
    assert "ip6 saddr @ingress_0_v6 accept" in text
    assert "ingress_0_v4" not in text


def test_named_port_on_ingress_resolves_on_the_pod_itself() -> None:
    c = cluster("{podSelector: {}, ingress: [{ports: [{port: http}]}]}")
    a = compile_pod(c, c.pod("x/a")).text
    b = compile_pod(c, c.pod("x/b")).text
    assert rules(a, "ingress") == ['tcp dport 8080 accept comment "x/np0 ingress[0]"']
    assert rules(b, "ingress") == ['tcp dport 9090 accept comment "x/np0 ingress[0]"']


def test_named_port_needs_the_rules_protocol() -> None:
    c = cluster("{podSelector: {}, ingress: [{ports: [{port: dns, protocol: TCP}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert rules(text, "ingress") == []  # dns is UDP on x/a


def test_named_port_on_egress_resolves_on_each_destination() -> None:
    c = cluster("{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], "
                "egress: [{to: [{podSelector: {}}], ports: [{port: http}, {port: 443}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert set_elements(text, "egress_0_named0_v4") == ["10.0.0.1 . 8080", "10.0.0.2 . 9090"]
    assert rules(text, "egress") == [
        'ip daddr @egress_0_v4 tcp dport 443 accept comment "x/np0 egress[0]"',
        'ip daddr . tcp dport @egress_0_named0_v4 accept comment "x/np0 egress[0]"',
    ]


def test_end_port_range_and_overlaps_merge() -> None:
    c = cluster("{podSelector: {}, ingress: [{ports: [{port: 8000, endPort: 8080}, "
                "{port: 8081}, {port: 7000, endPort: 7010}, {port: 7005}, "
                "{protocol: UDP, port: 53}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert rules(text, "ingress") == [
        'tcp dport { 7000-7010, 8000-8081 } accept comment "x/np0 ingress[0]"',
        'udp dport 53 accept comment "x/np0 ingress[0]"',
    ]


def test_protocol_without_port_means_every_port_of_it() -> None:
    c = cluster("{podSelector: {}, ingress: [{ports: [{protocol: SCTP}, "
                "{protocol: SCTP, port: 9}, {protocol: UDP, port: 9}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert rules(text, "ingress") == [
        'udp dport 9 accept comment "x/np0 ingress[0]"',
        'meta l4proto sctp accept comment "x/np0 ingress[0]"',
    ]


def test_egress_with_dns() -> None:
    c = cluster(
        "{podSelector: {}, policyTypes: [Egress]}",
        "{podSelector: {}, policyTypes: [Egress], egress: [{ports: "
        "[{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]}]}",
        "{podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress], egress: [{to: "
        "[{podSelector: {matchLabels: {pod: b}}}], ports: [{port: http}]}]}",
    )
    a = compile_pod(c, c.pod("x/a"))
    assert a.egress_isolated_by == ("x/np0", "x/np1", "x/np2")
    assert rules(a.text, "egress") == [
        'tcp dport 53 accept comment "x/np1 egress[0]"',
        'udp dport 53 accept comment "x/np1 egress[0]"',
        'ip daddr . tcp dport @egress_1_named0_v4 accept comment "x/np2 egress[0]"',
    ]
    assert set_elements(a.text, "egress_1_named0_v4") == ["10.0.0.2 . 9090"]
    assert "egress_1_v4" not in a.text  # only named ports: no plain address set
    assert chain(a.text, "ingress") == []


def test_rules_of_several_policies_add_up() -> None:
    c = cluster("{podSelector: {}, ingress: [{ports: [{port: 1}]}]}",
                "{podSelector: {matchLabels: {pod: a}}, ingress: [{}, {ports: [{port: 2}]}]}")
    text = compile_pod(c, c.pod("x/a")).text
    assert rules(text, "ingress") == [
        'tcp dport 1 accept comment "x/np0 ingress[0]"',
        'accept comment "x/np1 ingress[0]"',
        'tcp dport 2 accept comment "x/np1 ingress[1]"',
    ]


def test_empty_rule_list_allows_nothing() -> None:
    c = cluster("{podSelector: {}, policyTypes: [Ingress, Egress], ingress: [], egress: []}")
    text = compile_pod(c, c.pod("x/a")).text
    assert rules(text, "ingress") == [] and rules(text, "egress") == []


def test_compile_cluster_skips_pods_without_ip_and_renders_all() -> None:
    text = PODS + "\n---\n" + yaml.safe_dump({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "c", "namespace": "y"}})
    c = load_cluster([("t", text)])
    assert [r.pod.key for r in compile_cluster(c)] == ["x/a", "x/b", "y/a", "y/b"]
    assert render_cluster(c).count(f"table inet {TABLE_NAME} {{") == 4


# -- the lab plan and the comparison (pure) -----------------------------------


def test_plan_lab_names_are_safe_and_short() -> None:
    lab = plan_lab(cluster(), "t1")
    assert lab.host_netns == "tmnp-t1-host"
    names = [lp.netns for lp in lab.pods]
    assert len(set(names)) == 4
    for lp in lab.pods:
        assert re.fullmatch(r"tmnp-t1-[0-9a-f]{10}", lp.netns)
        assert len(lp.veth) <= 15
    assert plan_lab(cluster(), "t1") == lab  # deterministic, so `down` finds them


@pytest.mark.parametrize("name", ["", "UPPER", "a-b", "x" * 13, "../etc"])
def test_plan_lab_refuses_bad_lab_names(name: str) -> None:
    with pytest.raises(InvalidInput, match="lab name"):
        plan_lab(cluster(), name)


def test_plan_lab_refuses_public_ranges_and_outsiders() -> None:
    with pytest.raises(InvalidInput, match="not a private test range"):
        plan_lab(cluster(), "t", ipaddress.IPv4Network("8.8.8.0/24"))
    with pytest.raises(InvalidInput, match="10.0.1.1 is not a host address in 10.0.0.0/24"):
        plan_lab(cluster(), "t", ipaddress.IPv4Network("10.0.0.0/24"))


def test_plan_lab_needs_one_unique_ipv4_per_pod() -> None:
    dup = PODS.replace("10.0.1.2", "10.0.1.1")
    with pytest.raises(InvalidInput, match="both have 10.0.1.1"):
        plan_lab(load_cluster([("t", dup)]), "t")
    v6 = PODS.replace("podIP: 10.0.1.2", "podIP: 'fd00::2'")
    with pytest.raises(InvalidInput, match="y/b needs exactly one IPv4"):
        plan_lab(load_cluster([("t", v6)]), "t")


def test_declared_ports() -> None:
    assert declared_ports(cluster()) == [
        (8080, Protocol.TCP), (9090, Protocol.TCP), (53, Protocol.UDP)]


def test_compare_lists_each_disagreement() -> None:
    c = cluster()
    want = Reachability(c.pods, 80, Protocol.TCP, (0b1111, 0b1111, 0, 0))
    got = Reachability(c.pods, 80, Protocol.TCP, (0b1111, 0b0111, 0b0001, 0))
    diffs = compare(want, got)
    assert diffs == [
        Difference("x/b", "y/b", 80, Protocol.TCP, True, False),
        Difference("y/a", "x/a", 80, Protocol.TCP, False, True),
    ]
    assert diffs[0].describe() == "x/b -> y/b TCP/80: policy says connects, kernel blocked"


def test_lab_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    with pytest.raises(PermissionDenied, match="needs root"):
        require_tools()


def test_lab_needs_nft(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr("trustmesh.enforce.netns._find_tool",
                        lambda tool: None if tool == "nft" else "/usr/sbin/ip")
    with pytest.raises(ConfigError, match=r"nft not found: install nftables"):
        require_tools()

"""Compile NetworkPolicies into nftables rulesets, one per pod network namespace.

Pure code: a :class:`~trustmesh.policy.netpol_model.Cluster` goes in, text
that ``nft -f`` accepts comes out. Nothing here runs a command.

Each pod gets one table, ``inet trustmesh_netpol``, loaded inside the pod's
own network namespace (where the CNIs that enforce NetworkPolicy also put
their filters, at the pod's interface):

* chain ``egress`` on the ``output`` hook holds the pod's egress policy,
  matched on the destination address (the peer) and port;
* chain ``ingress`` on the ``input`` hook holds its ingress policy, matched on
  the source address (the peer) and the destination port.

A connection therefore opens only if the source's egress chain and the
destination's ingress chain both let its first packet through, which is the
evaluator's "egress at the source and ingress at the destination". Both chains
accept ``ct state established,related`` first, so replies of an allowed
connection pass. A direction no policy selects the pod for has no filtering
rule. Peers become named interval sets of addresses (pod IPs from selectors,
``ipBlock`` CIDRs minus their ``except`` blocks); a named port is resolved the
way the evaluator resolves it (on the pod itself for ingress, on each
destination pod for egress, the latter as an ``address . port`` set).

The text starts with ``add table`` + ``delete table`` so that ``nft -f``
replaces the whole table in one transaction whether or not it existed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from trustmesh.policy.netpol import peer_matches
from trustmesh.policy.netpol_model import (
    Cluster,
    IPBlock,
    IPNetwork,
    Namespace,
    NetworkPolicy,
    Pod,
    PolicyType,
    Protocol,
    Rule,
)

__all__ = [
    "TABLE_FAMILY",
    "TABLE_NAME",
    "PodRuleset",
    "compile_cluster",
    "compile_pod",
    "delete_table_text",
    "render_cluster",
]

TABLE_FAMILY = "inet"
TABLE_NAME = "trustmesh_netpol"

Direction = Literal["ingress", "egress"]

# Names as nft spells the transport headers of the three NetworkPolicy protocols.
_L4 = {Protocol.TCP: "tcp", Protocol.UDP: "udp", Protocol.SCTP: "sctp"}
_HOOK = {"ingress": "input", "egress": "output"}
# Neighbour discovery is IPv6's ARP: an isolated IPv6 pod still needs it.
_ND_TYPES = "nd-neighbor-solicit, nd-neighbor-advert, nd-router-solicit, nd-router-advert"


@dataclass(frozen=True)
class PodRuleset:
    """The ruleset for one pod's network namespace."""

    pod: Pod
    ingress_isolated_by: tuple[str, ...]
    egress_isolated_by: tuple[str, ...]
    text: str


def delete_table_text() -> str:
    """``nft -f`` input that removes the table whether or not it exists."""
    return f"add table {TABLE_FAMILY} {TABLE_NAME}\ndelete table {TABLE_FAMILY} {TABLE_NAME}\n"


# ---------------------------------------------------------------------------
# Addresses and ports
# ---------------------------------------------------------------------------


def _block_networks(block: IPBlock) -> list[IPNetwork]:
    """The CIDR minus its ``except`` blocks, as disjoint networks."""
    remaining: list[IPNetwork] = [block.cidr]
    for hole in block.excepts:
        kept: list[IPNetwork] = []
        for net in remaining:
            if not net.overlaps(hole):
                kept.append(net)
            elif net.prefixlen < hole.prefixlen:
                kept.extend(net.address_exclude(hole))  # type: ignore[arg-type]
            # else the hole covers net entirely: drop it
        remaining = kept
    return remaining


def _collapse(nets: Iterable[IPNetwork], version: int) -> list[IPNetwork]:
    picked = [n for n in nets if n.version == version]
    return list(ipaddress.collapse_addresses(picked))  # type: ignore[type-var]


def _peer_networks(
    rule: Rule, policy: NetworkPolicy, cluster: Cluster, namespaces: Mapping[str, Namespace]
) -> list[IPNetwork] | None:
    """Addresses the rule's peers cover; None when it has no peers (every peer)."""
    if not rule.peers:
        return None
    nets: list[IPNetwork] = []
    for peer in rule.peers:
        if peer.ip_block is not None:
            nets.extend(_block_networks(peer.ip_block))
            continue
        for pod in cluster.pods:
            if peer_matches(peer, policy.namespace, pod, namespaces):
                nets.extend(ipaddress.ip_network(ip) for ip in pod.ips)
    return _collapse(nets, 4) + _collapse(nets, 6)


def _merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent ranges (nft refuses overlapping set intervals)."""
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


_AnyPort = Literal["any"]


def _port_ranges(
    rule: Rule, named_on: Pod | None
) -> tuple[dict[Protocol, list[tuple[int, int]] | _AnyPort], list[tuple[Protocol, str]]]:
    """Per protocol, the ports the rule admits, and the named ports left unresolved.

    Named ports are resolved on ``named_on`` (ingress: the pod itself); with
    ``named_on`` None (egress) they come back unresolved, as they depend on
    the destination.
    """
    found: dict[Protocol, list[tuple[int, int]] | _AnyPort] = {}
    named: list[tuple[Protocol, str]] = []
    for spec in rule.ports:
        current = found.get(spec.protocol, [])
        if current == "any":
            continue
        if spec.port is None:
            found[spec.protocol] = "any"
            continue
        if isinstance(spec.port, str):
            if named_on is None:
                named.append((spec.protocol, spec.port))
                continue
            numbers = named_on.resolve_named_port(spec.port, spec.protocol)
            if not numbers:
                continue
            found[spec.protocol] = [*current, *((n, n) for n in numbers)]
        else:
            found[spec.protocol] = [*current, (spec.port, spec.end_port or spec.port)]
    return {
        proto: value if value == "any" else _merge_ranges(value)
        for proto, value in found.items()
    }, named


def _port_match(proto: Protocol, ranges: list[tuple[int, int]] | _AnyPort) -> str:
    if ranges == "any":
        return f"meta l4proto {_L4[proto]}"
    items = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges]
    if len(items) == 1:
        return f"{_L4[proto]} dport {items[0]}"
    return f"{_L4[proto]} dport {{ {', '.join(items)} }}"


def _elements(nets: Sequence[IPNetwork]) -> list[str]:
    """Set elements for sorted, disjoint networks: adjacent ones become one ``a-b`` range."""
    spans: list[tuple[int, int]] = []
    for net in nets:
        lo, hi = int(net.network_address), int(net.broadcast_address)
        if spans and lo == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], hi)
        else:
            spans.append((lo, hi))
    out = []
    address = ipaddress.IPv6Address if nets and nets[0].version == 6 else ipaddress.IPv4Address
    for lo, hi in spans:
        first, last = address(lo), address(hi)
        block = list(ipaddress.summarize_address_range(first, last))
        if lo == hi:
            out.append(str(first))
        elif len(block) == 1:
            out.append(str(block[0]))
        else:
            out.append(f"{first}-{last}")
    return out


# ---------------------------------------------------------------------------
# Chains
# ---------------------------------------------------------------------------


@dataclass
class _Chain:
    """The sets and rules of one direction, built up rule by rule."""

    direction: Direction
    sets: list[str]
    rules: list[str]

    def add_set(self, name: str, type_: str, elements: Sequence[str], interval: bool) -> None:
        flags = "\t\tflags interval\n" if interval else ""
        self.sets.append(
            f"\tset {name} {{\n\t\ttype {type_}\n{flags}"
            f"\t\telements = {{ {', '.join(elements)} }}\n\t}}"
        )


def _selects(policy: NetworkPolicy, pod: Pod) -> bool:
    return policy.namespace == pod.namespace and policy.pod_selector.matches(pod.labels)


def _compile_rule(
    chain: _Chain,
    index: int,
    rule: Rule,
    policy: NetworkPolicy,
    rule_index: int,
    pod: Pod,
    cluster: Cluster,
    namespaces: Mapping[str, Namespace],
) -> None:
    direction = chain.direction
    comment = f'comment "{policy.key} {direction}[{rule_index}]"'
    side = "saddr" if direction == "ingress" else "daddr"
    prefix = f"{direction}_{index}"

    ports, named = _port_ranges(rule, pod if direction == "ingress" else None)
    port_matches: list[str] = [""]
    if rule.ports:
        port_matches = [_port_match(proto, ports[proto]) for proto in Protocol if proto in ports]
    nets = _peer_networks(rule, policy, cluster, namespaces) if port_matches else []
    addr_matches: list[str] = [""]
    if nets is not None:
        addr_matches = []
        for version, family, type_ in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
            picked = [n for n in nets if n.version == version]
            if picked:
                name = f"{prefix}_v{version}"
                chain.add_set(name, type_, _elements(picked), interval=True)
                addr_matches.append(f"{family} {side} @{name}")

    emitted = False
    if addr_matches and port_matches:
        for addr in addr_matches:
            for port in port_matches:
                chain.rules.append(" ".join(p for p in (addr, port, "accept", comment) if p))
                emitted = True
    # Egress named ports: the number depends on the pod connected to, so match
    # (destination address, port) pairs of the peers that declare the name.
    for k, (proto, port_name) in enumerate(named):
        pairs: list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]] = []
        for dst in cluster.pods:
            if rule.peers and not any(
                peer_matches(p, policy.namespace, dst, namespaces) for p in rule.peers
            ):
                continue
            numbers = dst.resolve_named_port(port_name, proto)
            pairs.extend((ip, n) for ip in dst.ips for n in numbers)
        for version, family, type_ in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
            elements = sorted({(int(ip), n) for ip, n in pairs if ip.version == version})
            if not elements:
                continue
            name = f"{prefix}_named{k}_v{version}"
            chain.add_set(
                name,
                f"{type_} . inet_service",
                [f"{ipaddress.ip_address(a)} . {n}" for a, n in elements],
                interval=False,
            )
            chain.rules.append(
                f"{family} daddr . {_L4[proto]} dport @{name} accept {comment}"
            )
            emitted = True
    if not emitted:
        chain.rules.append(f"# {policy.key} {direction}[{rule_index}] matches nothing here")


def _compile_chain(
    direction: Direction, pod: Pod, cluster: Cluster, namespaces: Mapping[str, Namespace]
) -> tuple[_Chain, tuple[str, ...]]:
    ptype = PolicyType.INGRESS if direction == "ingress" else PolicyType.EGRESS
    selecting = [p for p in cluster.policies if ptype in p.policy_types and _selects(p, pod)]
    chain = _Chain(direction, [], [])
    index = 0
    for policy in selecting:
        rules = policy.ingress if direction == "ingress" else policy.egress
        for rule_index, rule in enumerate(rules):
            _compile_rule(chain, index, rule, policy, rule_index, pod, cluster, namespaces)
            index += 1
    return chain, tuple(p.key for p in selecting)


def _render_chain(chain: _Chain, isolated_by: tuple[str, ...], pod: Pod) -> str:
    direction = chain.direction
    lines = [
        f"\tchain {direction} {{",
        f"\t\ttype filter hook {_HOOK[direction]} priority filter; policy accept;",
    ]
    if not isolated_by:
        lines.append(f"\t\t# not isolated for {direction}: no policy selects {pod.key}")
    else:
        local = "daddr" if direction == "egress" else "saddr"
        lines += [
            "\t\tct state established,related accept",
            # traffic that never leaves the pod's loopback is no peer's business
            f"\t\tip {local} 127.0.0.0/8 accept",
            f"\t\tip6 {local} ::1 accept",
            f"\t\ticmpv6 type {{ {_ND_TYPES} }} accept",
        ]
        lines += [f"\t\t{rule}" for rule in chain.rules]
        lines.append(f'\t\tdrop comment "isolated for {direction} by {", ".join(isolated_by)}"')
    lines.append("\t}")
    return "\n".join(lines)


def compile_pod(cluster: Cluster, pod: Pod) -> PodRuleset:
    """The ruleset enforcing ``pod``'s ingress and egress policy in its network namespace."""
    namespaces = {ns.name: ns for ns in cluster.namespaces}
    ingress, in_by = _compile_chain("ingress", pod, cluster, namespaces)
    egress, out_by = _compile_chain("egress", pod, cluster, namespaces)
    ips = ", ".join(str(ip) for ip in pod.ips) or "no IP"
    body = [
        f"# NetworkPolicy for pod {pod.key} ({ips}), compiled by trustmesh",
        delete_table_text().rstrip("\n"),
        f"table {TABLE_FAMILY} {TABLE_NAME} {{",
    ]
    body += [*ingress.sets, *egress.sets]
    body.append(_render_chain(ingress, in_by, pod))
    body.append(_render_chain(egress, out_by, pod))
    body.append("}")
    return PodRuleset(pod, in_by, out_by, "\n".join(body) + "\n")


def compile_cluster(cluster: Cluster) -> tuple[PodRuleset, ...]:
    """A ruleset for every pod that has an IP (a pod without one cannot be reached)."""
    return tuple(compile_pod(cluster, pod) for pod in cluster.pods if pod.ips)


def render_cluster(cluster: Cluster) -> str:
    """Every pod's ruleset, one after the other, for people to read."""
    return "\n".join(r.text for r in compile_cluster(cluster))

"""Kubernetes NetworkPolicy (``networking.k8s.io/v1``) evaluation: matrix and explain.

Semantics follow the Kubernetes API reference:

* a pod no policy of a direction selects is open in that direction; once one
  selects it, only what some rule of some selecting policy allows gets
  through (policies are additive, there is no deny rule);
* a connection needs egress allowed at its source and ingress allowed at its
  destination; replies of an allowed connection are allowed, so every answer
  is about who may *open* a connection;
* missing or empty ``from``/``to`` means every peer, missing or empty ``ports``
  every port, while an empty rule list allows nothing;
* ``podSelector`` alone means pods of the policy's namespace,
  ``namespaceSelector`` alone every pod of the matching namespaces, both
  together their AND; ``ipBlock`` matches by IP, and (as Calico, Cilium and
  most CNIs do) it also matches cluster pods by their pod IP;
* a named port is looked up on the destination pod's container ports (ingress:
  the selected pod; egress: the pod connected to) with the rule's protocol;
* a pod talking to itself is evaluated like any other pair (the upstream e2e
  suite leaves loopback undefined because CNIs differ).

Two evaluators produce the same :class:`Reachability`: :class:`IndexedEvaluator`
(label and IP indexes, per-policy and per-rule pod sets as bitmasks) and the
deliberately naive :func:`naive_matrix` that tries every policy on every pair,
kept as the reference tests and the benchmark compare against.
"""

from __future__ import annotations

import bisect
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from trustmesh.errors import InvalidInput
from trustmesh.policy.labels import LabelSelector, Operator
from trustmesh.policy.netpol_model import (
    NAMESPACE_NAME_LABEL,
    Cluster,
    ContainerPort,
    IPAddress,
    IPBlock,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyType,
    PortSpec,
    Protocol,
    Rule,
    load_cluster,
    parse_protocol,
)

__all__ = [
    "NAMESPACE_NAME_LABEL",
    "Cluster",
    "ContainerPort",
    "DirectionVerdict",
    "Endpoint",
    "IPBlock",
    "IndexedEvaluator",
    "Namespace",
    "NetworkPolicy",
    "Peer",
    "Pod",
    "PolicyType",
    "PortSpec",
    "Protocol",
    "Reachability",
    "Rule",
    "RuleRef",
    "Verdict",
    "explain",
    "load_cluster",
    "naive_matrix",
    "naive_rows",
    "parse_endpoint",
    "parse_protocol",
    "port_allows",
    "peer_matches",
]

Endpoint = Pod | IPAddress


# ---------------------------------------------------------------------------
# The rules of the spec, one function each (shared by the naive evaluator and explain)
# ---------------------------------------------------------------------------


def peer_matches(
    peer: Peer, policy_namespace: str, endpoint: Endpoint, namespaces: Mapping[str, Namespace]
) -> bool:
    """Whether a ``from``/``to`` entry of a policy in ``policy_namespace`` matches ``endpoint``."""
    if peer.ip_block is not None:
        ips = endpoint.ips if isinstance(endpoint, Pod) else (endpoint,)
        return any(peer.ip_block.contains(ip) for ip in ips)
    if not isinstance(endpoint, Pod):
        return False  # selectors only ever select pods
    if peer.namespace_selector is None:
        if endpoint.namespace != policy_namespace:
            return False
    elif not peer.namespace_selector.matches(namespaces[endpoint.namespace].labels):
        return False
    return peer.pod_selector is None or peer.pod_selector.matches(endpoint.labels)


def port_allows(spec: PortSpec, port: int, protocol: Protocol, destination: Endpoint) -> bool:
    """Whether a ``ports`` entry admits ``protocol/port`` towards ``destination``."""
    if spec.protocol != protocol:
        return False
    if spec.port is None:
        return True
    if isinstance(spec.port, str):
        if not isinstance(destination, Pod):
            return False  # a name means nothing outside the cluster
        return port in destination.resolve_named_port(spec.port, protocol)
    if spec.end_port is not None:
        return spec.port <= port <= spec.end_port
    return spec.port == port


def _rule_allows(
    rule: Rule,
    policy: NetworkPolicy,
    peer: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: Protocol,
    namespaces: Mapping[str, Namespace],
) -> bool:
    if rule.ports and not any(port_allows(s, port, protocol, destination) for s in rule.ports):
        return False
    if not rule.peers:
        return True
    return any(peer_matches(p, policy.namespace, peer, namespaces) for p in rule.peers)


def _selects(policy: NetworkPolicy, pod: Pod) -> bool:
    return policy.namespace == pod.namespace and policy.pod_selector.matches(pod.labels)


# ---------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Reachability:
    """Who may open a connection to whom on one port: row ``i`` is a bitmask of destinations."""

    pods: tuple[Pod, ...]
    port: int
    protocol: Protocol
    rows: tuple[int, ...]

    def allowed(self, src: int, dst: int) -> bool:
        return bool(self.rows[src] >> dst & 1)

    def allowed_by_key(self, src: str, dst: str) -> bool:
        keys = [p.key for p in self.pods]
        return self.allowed(keys.index(src), keys.index(dst))

    def to_dict(self) -> dict[str, dict[str, bool]]:
        """``{"ns/src": {"ns/dst": allowed}}`` for every pair."""
        keys = [p.key for p in self.pods]
        return {
            keys[i]: {keys[j]: bool(row >> j & 1) for j in range(len(keys))}
            for i, row in enumerate(self.rows)
        }

    def render_text(self) -> str:
        """The truth table as the upstream e2e suite prints it: '.' allowed, 'X' denied."""
        keys = [p.key for p in self.pods]
        lines = ["\t".join(["-", *keys])]
        for i, row in enumerate(self.rows):
            marks = ["." if row >> j & 1 else "X" for j in range(len(keys))]
            lines.append("\t".join([keys[i], *marks]))
        return "\n".join(lines)

    def count_allowed(self) -> int:
        return sum(row.bit_count() for row in self.rows)


@dataclass(frozen=True)
class RuleRef:
    """A rule that allowed: ``policy`` is ``namespace/name``, ``rule`` its index in the list."""

    policy: str
    direction: Literal["ingress", "egress"]
    rule: int


@dataclass(frozen=True)
class DirectionVerdict:
    """The egress decision at the source, or the ingress decision at the destination."""

    direction: Literal["ingress", "egress"]
    endpoint: str
    in_cluster: bool
    selected_by: tuple[str, ...]
    allowed_by: tuple[RuleRef, ...]
    allowed: bool
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {
            "direction": self.direction,
            "endpoint": self.endpoint,
            "in_cluster": self.in_cluster,
            "isolated": bool(self.selected_by),
            "selected_by": list(self.selected_by),
            "allowed_by": [{"policy": r.policy, "rule": r.rule} for r in self.allowed_by],
            "allowed": self.allowed,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class Verdict:
    source: str
    destination: str
    port: int
    protocol: Protocol
    egress: DirectionVerdict
    ingress: DirectionVerdict

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "destination": self.destination,
            "port": self.port,
            "protocol": self.protocol.value,
            "egress": self.egress.to_dict(),
            "ingress": self.ingress.to_dict(),
            "allowed": self.allowed,
        }

    def render_text(self) -> str:
        lines = [f"{self.source} -> {self.destination} {self.protocol.value}/{self.port}"]
        for part in (self.egress, self.ingress):
            where = "source" if part.direction == "egress" else "destination"
            lines.append(f"  {part.direction} at {where} {part.endpoint}:")
            if part.selected_by:
                lines.append(f"    selected by: {', '.join(part.selected_by)}")
            lines.append(f"    {'allowed' if part.allowed else 'DENIED'}: {part.reason}")
        lines.append(f"verdict: {'ALLOWED' if self.allowed else 'DENIED'}")
        return "\n".join(lines)


def _endpoint_name(endpoint: Endpoint) -> str:
    return endpoint.key if isinstance(endpoint, Pod) else str(endpoint)


def parse_endpoint(cluster: Cluster, text: str) -> Endpoint:
    """``namespace/pod`` or an IP address (a cluster pod's IP stands for that pod)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return cluster.pod(text)
    pod = cluster.pod_with_ip(ip)
    return pod if pod is not None else ip


def _direction(
    cluster: Cluster,
    direction: Literal["ingress", "egress"],
    subject: Endpoint,
    peer: Endpoint,
    destination: Endpoint,
    port: int,
    protocol: Protocol,
    namespaces: Mapping[str, Namespace],
) -> DirectionVerdict:
    name = _endpoint_name(subject)
    if not isinstance(subject, Pod):
        return DirectionVerdict(direction, name, False, (), (), True,
                                "outside the cluster: no NetworkPolicy applies")
    ptype = PolicyType.INGRESS if direction == "ingress" else PolicyType.EGRESS
    selecting = [
        p for p in cluster.policies if ptype in p.policy_types and _selects(p, subject)
    ]
    if not selecting:
        return DirectionVerdict(direction, name, True, (), (), True,
                                f"not isolated for {direction}: no policy selects it")
    refs = []
    for policy in selecting:
        rules = policy.ingress if direction == "ingress" else policy.egress
        for i, rule in enumerate(rules):
            if _rule_allows(rule, policy, peer, destination, port, protocol, namespaces):
                refs.append(RuleRef(policy.key, direction, i))
    keys = tuple(p.key for p in selecting)
    if refs:
        reason = "allowed by " + ", ".join(f"{r.policy} {direction}[{r.rule}]" for r in refs)
        return DirectionVerdict(direction, name, True, keys, tuple(refs), True, reason)
    return DirectionVerdict(direction, name, True, keys, (), False,
                            f"isolated for {direction} and no rule of {', '.join(keys)} "
                            f"allows {_endpoint_name(peer)} on {protocol.value}/{port}")


def explain(
    cluster: Cluster, src: Endpoint, dst: Endpoint, port: int, protocol: Protocol = Protocol.TCP
) -> Verdict:
    """Why ``src`` may or may not open ``protocol/port`` to ``dst``: both halves of the decision."""
    if not 1 <= port <= 65535:
        raise InvalidInput(f"port {port} is out of range 1-65535", field="port")
    if not isinstance(src, Pod) and not isinstance(dst, Pod):
        raise InvalidInput("at least one end of the connection must be a pod of the cluster")
    namespaces = {ns.name: ns for ns in cluster.namespaces}
    egress = _direction(cluster, "egress", src, dst, dst, port, protocol, namespaces)
    ingress = _direction(cluster, "ingress", dst, src, dst, port, protocol, namespaces)
    return Verdict(_endpoint_name(src), _endpoint_name(dst), port, protocol, egress, ingress)


# ---------------------------------------------------------------------------
# Reference evaluator: every policy against every pair
# ---------------------------------------------------------------------------


def _naive_allowed(
    cluster: Cluster, src: Pod, dst: Pod, port: int, protocol: Protocol,
    namespaces: Mapping[str, Namespace],
) -> bool:
    out_isolated = out_ok = in_isolated = in_ok = False
    for policy in cluster.policies:
        if policy.affects_egress and _selects(policy, src):
            out_isolated = True
            out_ok = out_ok or any(
                _rule_allows(r, policy, dst, dst, port, protocol, namespaces)
                for r in policy.egress
            )
        if policy.affects_ingress and _selects(policy, dst):
            in_isolated = True
            in_ok = in_ok or any(
                _rule_allows(r, policy, src, dst, port, protocol, namespaces)
                for r in policy.ingress
            )
    return (not out_isolated or out_ok) and (not in_isolated or in_ok)


def naive_rows(
    cluster: Cluster, port: int, protocol: Protocol, sources: range
) -> tuple[int, ...]:
    """Rows of the brute-force matrix for the pods at ``sources`` (bitmasks over all pods)."""
    namespaces = {ns.name: ns for ns in cluster.namespaces}
    pods = cluster.pods
    out = []
    for i in sources:
        src = pods[i]
        mask = 0
        for j, dst in enumerate(pods):
            if _naive_allowed(cluster, src, dst, port, protocol, namespaces):
                mask |= 1 << j
        out.append(mask)
    return tuple(out)


def naive_matrix(cluster: Cluster, port: int, protocol: Protocol = Protocol.TCP) -> Reachability:
    """The matrix by brute force, O(pods^2 x policies): the reference the indexes must match."""
    rows = naive_rows(cluster, port, protocol, range(len(cluster.pods)))
    return Reachability(cluster.pods, port, protocol, rows)


# ---------------------------------------------------------------------------
# Indexed evaluator
# ---------------------------------------------------------------------------


def _bits(mask: int) -> list[int]:
    """Indexes of the set bits of ``mask``."""
    out = []
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


@dataclass(frozen=True)
class _CompiledRule:
    peers: int  # bitmask of pods matched by some peer (all pods when from/to is empty)
    ports: tuple[PortSpec, ...]


@dataclass(frozen=True)
class _CompiledPolicy:
    selected: int
    ingress: tuple[_CompiledRule, ...]
    egress: tuple[_CompiledRule, ...]
    affects_ingress: bool
    affects_egress: bool


class _SelectorIndex:
    """``key=value -> bitmask`` and ``key -> bitmask`` over a list of label sets."""

    def __init__(self, label_sets: list[Mapping[str, str]]) -> None:
        self.all = (1 << len(label_sets)) - 1
        self.by_pair: dict[tuple[str, str], int] = {}
        self.by_key: dict[str, int] = {}
        for i, labels in enumerate(label_sets):
            bit = 1 << i
            for key, value in labels.items():
                self.by_pair[(key, value)] = self.by_pair.get((key, value), 0) | bit
                self.by_key[key] = self.by_key.get(key, 0) | bit
        self._cache: dict[LabelSelector, int] = {}

    def select(self, selector: LabelSelector) -> int:
        hit = self._cache.get(selector)
        if hit is not None:
            return hit
        mask = self.all
        for pair in selector.match_labels:
            mask &= self.by_pair.get(pair, 0)
        for req in selector.expressions:
            if req.operator is Operator.EXISTS:
                mask &= self.by_key.get(req.key, 0)
            elif req.operator is Operator.DOES_NOT_EXIST:
                mask &= ~self.by_key.get(req.key, 0)
            else:
                values = 0
                for value in req.values:
                    values |= self.by_pair.get((req.key, value), 0)
                mask &= values if req.operator is Operator.IN else ~values
        self._cache[selector] = mask
        return mask


class IndexedEvaluator:
    """Builds the indexes once for a cluster; :meth:`matrix` then costs little per port."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        pods = cluster.pods
        self._all = (1 << len(pods)) - 1
        self._pod_index = _SelectorIndex([p.labels for p in pods])
        self._ns_index = _SelectorIndex([ns.labels for ns in cluster.namespaces])
        ns_pos = {ns.name: i for i, ns in enumerate(cluster.namespaces)}
        self._pods_of_ns = [0] * len(cluster.namespaces)
        for i, pod in enumerate(pods):
            self._pods_of_ns[ns_pos[pod.namespace]] |= 1 << i
        self._ns_pos = ns_pos
        self._ns_sel_cache: dict[LabelSelector, int] = {}
        self._ip_cache: dict[IPBlock, int] = {}
        # IPs sorted per family so an ipBlock is a bisect, not a scan.
        self._ips: dict[int, tuple[list[int], list[int]]] = {}
        for version in (4, 6):
            pairs = sorted(
                (int(ip), i) for i, p in enumerate(pods) for ip in p.ips if ip.version == version
            )
            self._ips[version] = ([a for a, _ in pairs], [i for _, i in pairs])
        # (port name, protocol, number) -> pods that expose it
        self._named: dict[tuple[str, Protocol, int], int] = {}
        for i, pod in enumerate(pods):
            for cp in pod.ports:
                if cp.name is not None:
                    key = (cp.name, cp.protocol, cp.number)
                    self._named[key] = self._named.get(key, 0) | 1 << i
        self._policies = tuple(self._compile(p) for p in cluster.policies)

    # -- sets of pods --------------------------------------------------------

    def _namespace_pods(self, selector: LabelSelector) -> int:
        hit = self._ns_sel_cache.get(selector)
        if hit is None:
            hit = 0
            for n in _bits(self._ns_index.select(selector)):
                hit |= self._pods_of_ns[n]
            self._ns_sel_cache[selector] = hit
        return hit

    def _ip_block_pods(self, block: IPBlock) -> int:
        hit = self._ip_cache.get(block)
        if hit is not None:
            return hit
        addrs, owners = self._ips[block.cidr.version]
        # the cidr minus its excepts is a few address intervals; bisect each one
        holes = sorted((int(e.network_address), int(e.broadcast_address)) for e in block.excepts)
        intervals = []
        start = int(block.cidr.network_address)
        for lo, hi in holes:
            if lo > start:
                intervals.append((start, lo - 1))
            start = max(start, hi + 1)
        intervals.append((start, int(block.cidr.broadcast_address)))
        mask = 0
        for lo, hi in intervals:
            for k in range(bisect.bisect_left(addrs, lo), bisect.bisect_right(addrs, hi)):
                mask |= 1 << owners[k]
        self._ip_cache[block] = mask
        return mask

    def _peer_pods(self, peer: Peer, namespace: str) -> int:
        if peer.ip_block is not None:
            return self._ip_block_pods(peer.ip_block)
        if peer.namespace_selector is None:
            scope = self._pods_of_ns[self._ns_pos[namespace]]
        else:
            scope = self._namespace_pods(peer.namespace_selector)
        if peer.pod_selector is None:
            return scope
        return scope & self._pod_index.select(peer.pod_selector)

    def _compile_rule(self, rule: Rule, namespace: str) -> _CompiledRule:
        if not rule.peers:
            return _CompiledRule(self._all, rule.ports)
        mask = 0
        for peer in rule.peers:
            mask |= self._peer_pods(peer, namespace)
        return _CompiledRule(mask, rule.ports)

    def _compile(self, policy: NetworkPolicy) -> _CompiledPolicy:
        selected = self._pods_of_ns[self._ns_pos[policy.namespace]] & self._pod_index.select(
            policy.pod_selector
        )
        return _CompiledPolicy(
            selected,
            tuple(self._compile_rule(r, policy.namespace) for r in policy.ingress),
            tuple(self._compile_rule(r, policy.namespace) for r in policy.egress),
            policy.affects_ingress,
            policy.affects_egress,
        )

    def selected_pods(self, policy_index: int) -> list[Pod]:
        """The pods policy number ``policy_index`` (in ``cluster.policies``) selects."""
        return [self.cluster.pods[i] for i in _bits(self._policies[policy_index].selected)]

    # -- the matrix ------------------------------------------------------------

    def _port_pods(self, ports: tuple[PortSpec, ...], port: int, protocol: Protocol) -> int:
        """Destination pods for which some entry of ``ports`` admits ``protocol/port``."""
        if not ports:
            return self._all
        mask = 0
        for spec in ports:
            if spec.protocol != protocol:
                continue
            if spec.port is None:
                return self._all
            if isinstance(spec.port, str):
                mask |= self._named.get((spec.port, protocol, port), 0)
            elif spec.port <= port <= (spec.end_port or spec.port):
                return self._all
        return mask

    def matrix(self, port: int, protocol: Protocol = Protocol.TCP) -> Reachability:
        """Every (source, destination) pod pair: may the source open ``protocol/port``?"""
        n = len(self.cluster.pods)
        full = self._all
        in_isolated = out_isolated = 0
        # Rules are grouped by their pod sets first: many rules share a peer set (the
        # same namespaceSelector, say), so each distinct set is expanded to pods once.
        targets_by_peers: dict[int, int] = {}  # peer pods -> destinations admitting them
        dsts_by_sources: dict[int, int] = {}  # selected pods -> destinations they may reach
        for cp in self._policies:
            if not cp.selected:
                continue
            if cp.affects_ingress:
                in_isolated |= cp.selected
                for rule in cp.ingress:
                    targets = cp.selected & self._port_pods(rule.ports, port, protocol)
                    if targets and rule.peers:
                        targets_by_peers[rule.peers] = (
                            targets_by_peers.get(rule.peers, 0) | targets
                        )
            if cp.affects_egress:
                out_isolated |= cp.selected
                for rule in cp.egress:
                    dsts = rule.peers & self._port_pods(rule.ports, port, protocol)
                    if dsts:
                        dsts_by_sources[cp.selected] = (
                            dsts_by_sources.get(cp.selected, 0) | dsts
                        )
        open_in = full & ~in_isolated | targets_by_peers.pop(full, 0)
        inbound = [open_in] * n  # inbound[src]: destinations whose ingress admits src
        for peers, targets in targets_by_peers.items():
            for src in _bits(peers):
                inbound[src] |= targets
        outbound = [0] * n  # outbound[src]: destinations its egress admits
        for sources, dsts in dsts_by_sources.items():
            for src in _bits(sources):
                outbound[src] |= dsts
        rows = []
        for src in range(n):
            out = outbound[src] if out_isolated >> src & 1 else full
            rows.append(out & inbound[src])
        return Reachability(self.cluster.pods, port, protocol, tuple(rows))

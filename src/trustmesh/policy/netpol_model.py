"""The cluster model NetworkPolicy evaluation works on, and its strict YAML decoding.

Input is what users keep for Kubernetes: ``v1`` Namespace, ``v1`` Pod and
``networking.k8s.io/v1`` NetworkPolicy manifests, in several YAML texts or one
multi-document text, optionally wrapped in ``kind: List``. Decoding is strict
in the way ``kubectl apply --validate=strict`` is: a field the Kubernetes
schema does not have is refused, a field it has but that plays no part in
NetworkPolicy (``image``, ``resources``, ...) is accepted and ignored.

Everything here is pure: callers hand in ``(source name, text)`` pairs; reading
files is the CLI's business.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import yaml

from trustmesh.errors import InvalidInput, NotFound
from trustmesh.policy.labels import LabelSelector, parse_label_selector, parse_labels

__all__ = [
    "NAMESPACE_NAME_LABEL",
    "Cluster",
    "ContainerPort",
    "IPBlock",
    "IPAddress",
    "IPNetwork",
    "Namespace",
    "NetworkPolicy",
    "Peer",
    "Pod",
    "PolicyType",
    "PortSpec",
    "Protocol",
    "Rule",
    "load_cluster",
    "parse_protocol",
]

NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class Protocol(StrEnum):
    """Transport protocols NetworkPolicy knows."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class PolicyType(StrEnum):
    INGRESS = "Ingress"
    EGRESS = "Egress"


def parse_protocol(value: object, field: str = "protocol") -> Protocol:
    """``TCP``, ``UDP`` or ``SCTP`` (case-sensitive, as the API server wants)."""
    try:
        return Protocol(str(value))
    except ValueError:
        raise InvalidInput(
            f"unknown protocol {value!r} (expected TCP, UDP or SCTP)", field=field
        ) from None


@dataclass(frozen=True, slots=True)
class Namespace:
    name: str
    labels: Mapping[str, str]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    def __hash__(self) -> int:
        return hash(self.name)


@dataclass(frozen=True, slots=True)
class ContainerPort:
    number: int
    protocol: Protocol = Protocol.TCP
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Pod:
    namespace: str
    name: str
    labels: Mapping[str, str]
    ports: tuple[ContainerPort, ...] = ()
    ips: tuple[IPAddress, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))

    def __hash__(self) -> int:
        return hash((self.namespace, self.name))

    @property
    def key(self) -> str:
        """``namespace/name``, the way the matrix and explain name pods."""
        return f"{self.namespace}/{self.name}"

    def resolve_named_port(self, name: str, protocol: Protocol) -> tuple[int, ...]:
        """Numbers of this pod's container ports called ``name`` with ``protocol``."""
        return tuple(p.number for p in self.ports if p.name == name and p.protocol == protocol)


@dataclass(frozen=True, slots=True)
class IPBlock:
    cidr: IPNetwork
    excepts: tuple[IPNetwork, ...] = ()

    def contains(self, ip: IPAddress) -> bool:
        if ip.version != self.cidr.version or ip not in self.cidr:
            return False
        return not any(ip in ex for ex in self.excepts)

    def describe(self) -> str:
        if not self.excepts:
            return str(self.cidr)
        return f"{self.cidr} except {', '.join(str(e) for e in self.excepts)}"


@dataclass(frozen=True, slots=True)
class Peer:
    """One ``from``/``to`` entry: selectors (AND'ed when both are set) or an ipBlock."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None

    def describe(self) -> str:
        if self.ip_block is not None:
            return f"ipBlock {self.ip_block.describe()}"
        parts = []
        if self.namespace_selector is not None:
            parts.append(f"namespaceSelector {self.namespace_selector.describe()}")
        if self.pod_selector is not None:
            parts.append(f"podSelector {self.pod_selector.describe()}")
        return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class PortSpec:
    """One ``ports`` entry: ``port`` is a number, a named port, or None (every port)."""

    protocol: Protocol = Protocol.TCP
    port: int | str | None = None
    end_port: int | None = None

    def describe(self) -> str:
        if self.port is None:
            return f"{self.protocol.value}/*"
        if self.end_port is not None:
            return f"{self.protocol.value}/{self.port}-{self.end_port}"
        return f"{self.protocol.value}/{self.port}"


@dataclass(frozen=True, slots=True)
class Rule:
    """An ingress or egress rule. Empty ``peers`` = every peer; empty ``ports`` = every port."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PortSpec, ...] = ()


@dataclass(frozen=True, slots=True)
class NetworkPolicy:
    namespace: str
    name: str
    pod_selector: LabelSelector
    policy_types: frozenset[PolicyType]
    ingress: tuple[Rule, ...] = ()
    egress: tuple[Rule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def affects_ingress(self) -> bool:
        return PolicyType.INGRESS in self.policy_types

    @property
    def affects_egress(self) -> bool:
        return PolicyType.EGRESS in self.policy_types


@dataclass(frozen=True)
class Cluster:
    """Namespaces, pods and policies, each sorted by namespace then name."""

    namespaces: tuple[Namespace, ...]
    pods: tuple[Pod, ...]
    policies: tuple[NetworkPolicy, ...]
    _ns_by_name: dict[str, Namespace] = field(default_factory=dict, repr=False, compare=False)
    _pod_by_key: dict[str, Pod] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._ns_by_name.update({ns.name: ns for ns in self.namespaces})
        self._pod_by_key.update({pod.key: pod for pod in self.pods})

    @classmethod
    def build(
        cls,
        namespaces: Iterable[Namespace],
        pods: Iterable[Pod],
        policies: Iterable[NetworkPolicy],
    ) -> Cluster:
        """Assemble a cluster, adding any namespace pods or policies name but nobody declared.

        Like the API server, every namespace carries ``kubernetes.io/metadata.name``.
        """
        by_name: dict[str, Namespace] = {}
        for ns in namespaces:
            by_name[ns.name] = Namespace(ns.name, {**ns.labels, NAMESPACE_NAME_LABEL: ns.name})
        pod_list = sorted(pods, key=lambda p: (p.namespace, p.name))
        pol_list = sorted(policies, key=lambda p: (p.namespace, p.name))
        for name in [p.namespace for p in pod_list] + [p.namespace for p in pol_list]:
            if name not in by_name:
                by_name[name] = Namespace(name, {NAMESPACE_NAME_LABEL: name})
        return cls(tuple(by_name[n] for n in sorted(by_name)), tuple(pod_list), tuple(pol_list))

    def namespace(self, name: str) -> Namespace:
        try:
            return self._ns_by_name[name]
        except KeyError:
            raise NotFound(f"no namespace {name!r} in the cluster model") from None

    def pod(self, key: str) -> Pod:
        """The pod named ``namespace/name``."""
        if "/" not in key:
            raise InvalidInput(f"expected namespace/pod, got {key!r}")
        try:
            return self._pod_by_key[key]
        except KeyError:
            raise NotFound(f"no pod {key!r} in the cluster model") from None

    def pod_with_ip(self, ip: IPAddress) -> Pod | None:
        for pod in self.pods:
            if ip in pod.ips:
                return pod
        return None


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

_META_FIELDS = frozenset({
    "name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation",
    "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds", "finalizers",
    "generateName", "managedFields", "ownerReferences", "selfLink",
})
_POD_SPEC_FIELDS = frozenset({
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
    "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
    "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "hostnameOverride",
    "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os", "overhead",
    "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
    "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates",
    "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN",
    "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds", "tolerations",
    "topologySpreadConstraints", "volumes",
})
_CONTAINER_FIELDS = frozenset({
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle",
    "livenessProbe", "name", "ports", "readinessProbe", "resizePolicy", "resources",
    "restartPolicy", "restartPolicyRules", "securityContext", "startupProbe", "stdin",
    "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty", "volumeDevices",
    "volumeMounts", "workingDir",
})
_CONTAINER_PORT_FIELDS = frozenset({"containerPort", "hostIP", "hostPort", "name", "protocol"})
_POD_STATUS_FIELDS = frozenset({
    "conditions", "containerStatuses", "ephemeralContainerStatuses", "hostIP", "hostIPs",
    "initContainerStatuses", "message", "nominatedNodeName", "observedGeneration", "phase",
    "podIP", "podIPs", "qosClass", "reason", "resize", "resourceClaimStatuses", "startTime",
})
_TOP_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
_NS_SPEC_FIELDS = frozenset({"finalizers"})
_NS_STATUS_FIELDS = frozenset({"conditions", "phase"})
_NP_SPEC_FIELDS = frozenset({"podSelector", "policyTypes", "ingress", "egress"})
_NP_INGRESS_FIELDS = frozenset({"from", "ports"})
_NP_EGRESS_FIELDS = frozenset({"to", "ports"})
_NP_PEER_FIELDS = frozenset({"podSelector", "namespaceSelector", "ipBlock"})
_NP_IPBLOCK_FIELDS = frozenset({"cidr", "except"})
_NP_PORT_FIELDS = frozenset({"protocol", "port", "endPort"})

_KINDS = {("v1", "Namespace"), ("v1", "Pod"), ("networking.k8s.io/v1", "NetworkPolicy")}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_SVC_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


def _fields(data: object, allowed: frozenset[str], path: str) -> Mapping[str, Any]:
    """Check ``data`` is a map whose keys are all in ``allowed``; return it."""
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise InvalidInput(f"expected a map, got {type(data).__name__}", field=path or None)
    for key in data:
        if key not in allowed:
            raise InvalidInput(f"unknown field {key!r}", field=f"{path}.{key}" if path else key)
    return data


def _list(data: object, path: str) -> list[Any]:
    if data is None:
        return []
    if not isinstance(data, list):
        raise InvalidInput(f"expected a list, got {type(data).__name__}", field=path)
    return data


def _int(data: object, path: str, low: int = 1, high: int = 65535) -> int:
    if isinstance(data, bool) or not isinstance(data, int):
        raise InvalidInput(f"expected an integer, got {data!r}", field=path)
    if not low <= data <= high:
        raise InvalidInput(f"{data} is out of range {low}-{high}", field=path)
    return data


def _port_name(data: object, path: str) -> str:
    """An IANA service name, as Kubernetes wants for named ports."""
    if (
        not isinstance(data, str)
        or not 1 <= len(data) <= 15
        or not _SVC_NAME.match(data)
        or "--" in data
        or not any(c.isalpha() for c in data)
    ):
        raise InvalidInput(
            f"invalid port name {data!r}: 1-15 lowercase alphanumerics or '-', with at least "
            "one letter, no leading, trailing or doubled '-'",
            field=path,
        )
    return data


def _network(data: object, path: str) -> IPNetwork:
    if not isinstance(data, str) or "/" not in data:
        raise InvalidInput(f"invalid CIDR {data!r}", field=path)
    try:
        return ipaddress.ip_network(data, strict=False)
    except ValueError:
        raise InvalidInput(f"invalid CIDR {data!r}", field=path) from None


def _ip(data: object, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(data)  # type: ignore[arg-type]
    except ValueError:
        raise InvalidInput(f"invalid IP address {data!r}", field=path) from None


class _Where:
    """Prefix for messages: ``file: document N (Kind ns/name)``."""

    def __init__(self, source: str, doc: int, item: int | None) -> None:
        self.text = f"{source}: document {doc}" + (f" items[{item}]" if item is not None else "")

    def named(self, kind: str, name: str) -> None:
        self.text += f" ({kind} {name})"

    def error(self, err: InvalidInput) -> InvalidInput:
        path = f"{self.text}: {err.field}" if err.field else self.text
        return InvalidInput(err.message, field=path)


def _meta(data: object, kind: str, namespaced: bool) -> tuple[str, str, dict[str, str]]:
    meta = _fields(data, _META_FIELDS, "metadata")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidInput("a name is required", field="metadata.name")
    namespace = meta.get("namespace", "default") if namespaced else ""
    if namespaced and (not isinstance(namespace, str) or not _DNS_LABEL.match(namespace)):
        raise InvalidInput(f"invalid namespace {namespace!r}", field="metadata.namespace")
    if kind == "Namespace" and not _DNS_LABEL.match(name):
        raise InvalidInput(f"invalid namespace name {name!r}", field="metadata.name")
    return namespace, name, parse_labels(meta.get("labels"), "metadata.labels")


def _decode_namespace(doc: Mapping[str, Any]) -> Namespace:
    _, name, labels = _meta(doc.get("metadata"), "Namespace", namespaced=False)
    _fields(doc.get("spec"), _NS_SPEC_FIELDS, "spec")
    _fields(doc.get("status"), _NS_STATUS_FIELDS, "status")
    return Namespace(name, labels)


def _decode_pod(doc: Mapping[str, Any], namespace: str, name: str, labels: dict[str, str]) -> Pod:
    spec = _fields(doc.get("spec"), _POD_SPEC_FIELDS, "spec")
    ports: list[ContainerPort] = []
    for ci, container in enumerate(_list(spec.get("containers"), "spec.containers")):
        cpath = f"spec.containers[{ci}]"
        cmap = _fields(container, _CONTAINER_FIELDS, cpath)
        for pi, raw in enumerate(_list(cmap.get("ports"), f"{cpath}.ports")):
            ppath = f"{cpath}.ports[{pi}]"
            pmap = _fields(raw, _CONTAINER_PORT_FIELDS, ppath)
            number = _int(pmap.get("containerPort"), f"{ppath}.containerPort")
            pname = pmap.get("name")
            if pname is not None:
                _port_name(pname, f"{ppath}.name")
            proto = parse_protocol(pmap.get("protocol", "TCP"), f"{ppath}.protocol")
            ports.append(ContainerPort(number, proto, pname))
    for ci, container in enumerate(_list(spec.get("initContainers"), "spec.initContainers")):
        _fields(container, _CONTAINER_FIELDS, f"spec.initContainers[{ci}]")
    status = _fields(doc.get("status"), _POD_STATUS_FIELDS, "status")
    ips: list[IPAddress] = []
    if status.get("podIP") is not None:
        ips.append(_ip(status["podIP"], "status.podIP"))
    for i, entry in enumerate(_list(status.get("podIPs"), "status.podIPs")):
        emap = _fields(entry, frozenset({"ip"}), f"status.podIPs[{i}]")
        ip = _ip(emap.get("ip"), f"status.podIPs[{i}].ip")
        if ip not in ips:
            ips.append(ip)
    return Pod(namespace, name, labels, tuple(ports), tuple(ips))


def _decode_ip_block(data: object, path: str) -> IPBlock:
    block = _fields(data, _NP_IPBLOCK_FIELDS, path)
    if "cidr" not in block:
        raise InvalidInput("cidr is required", field=f"{path}.cidr")
    cidr = _network(block["cidr"], f"{path}.cidr")
    excepts: list[IPNetwork] = []
    for i, raw in enumerate(_list(block.get("except"), f"{path}.except")):
        epath = f"{path}.except[{i}]"
        ex = _network(raw, epath)
        if (
            ex.version != cidr.version
            or not ex.subnet_of(cidr)  # type: ignore[arg-type]
            or ex.prefixlen <= cidr.prefixlen
        ):
            raise InvalidInput(f"except {raw!r} is not strictly inside cidr {cidr}", field=epath)
        excepts.append(ex)
    return IPBlock(cidr, tuple(excepts))


def _decode_peer(data: object, path: str) -> Peer:
    peer = _fields(data, _NP_PEER_FIELDS, path)
    if not peer:
        raise InvalidInput(
            "a peer needs podSelector, namespaceSelector or ipBlock", field=path
        )
    if "ipBlock" in peer:
        if len(peer) > 1:
            raise InvalidInput(
                "ipBlock cannot be combined with podSelector or namespaceSelector", field=path
            )
        return Peer(ip_block=_decode_ip_block(peer["ipBlock"], f"{path}.ipBlock"))
    pod_sel = (
        parse_label_selector(peer["podSelector"], f"{path}.podSelector")
        if "podSelector" in peer
        else None
    )
    ns_sel = (
        parse_label_selector(peer["namespaceSelector"], f"{path}.namespaceSelector")
        if "namespaceSelector" in peer
        else None
    )
    return Peer(pod_selector=pod_sel, namespace_selector=ns_sel)


def _decode_port(data: object, path: str) -> PortSpec:
    spec = _fields(data, _NP_PORT_FIELDS, path)
    proto = parse_protocol(spec.get("protocol", "TCP"), f"{path}.protocol")
    raw_port = spec.get("port")
    port: int | str | None
    if raw_port is None:
        port = None
    elif isinstance(raw_port, str):
        port = _port_name(raw_port, f"{path}.port")
    else:
        port = _int(raw_port, f"{path}.port")
    end_port = None
    if spec.get("endPort") is not None:
        end_port = _int(spec["endPort"], f"{path}.endPort")
        if port is None:
            raise InvalidInput("endPort requires port to be set", field=f"{path}.endPort")
        if isinstance(port, str):
            raise InvalidInput(
                f"endPort cannot be used with the named port {port!r}", field=f"{path}.endPort"
            )
        if end_port < port:
            raise InvalidInput(
                f"endPort {end_port} must be greater than or equal to port {port}",
                field=f"{path}.endPort",
            )
    return PortSpec(proto, port, end_port)


def _decode_rules(data: object, path: str, peers_key: str, allowed: frozenset[str]) -> list[Rule]:
    rules = []
    for i, raw in enumerate(_list(data, path)):
        rpath = f"{path}[{i}]"
        rule = _fields(raw, allowed, rpath)
        peers = tuple(
            _decode_peer(p, f"{rpath}.{peers_key}[{j}]")
            for j, p in enumerate(_list(rule.get(peers_key), f"{rpath}.{peers_key}"))
        )
        ports = tuple(
            _decode_port(p, f"{rpath}.ports[{j}]")
            for j, p in enumerate(_list(rule.get("ports"), f"{rpath}.ports"))
        )
        rules.append(Rule(peers, ports))
    return rules


def _decode_policy(
    doc: Mapping[str, Any], namespace: str, name: str
) -> NetworkPolicy:
    if "status" in doc:
        raise InvalidInput("unknown field 'status'", field="status")
    spec = _fields(doc.get("spec"), _NP_SPEC_FIELDS, "spec")
    if "podSelector" not in spec:
        raise InvalidInput("podSelector is required (use {} to select every pod)",
                           field="spec.podSelector")
    selector = parse_label_selector(spec["podSelector"], "spec.podSelector")
    ingress = _decode_rules(spec.get("ingress"), "spec.ingress", "from", _NP_INGRESS_FIELDS)
    egress = _decode_rules(spec.get("egress"), "spec.egress", "to", _NP_EGRESS_FIELDS)
    if spec.get("policyTypes") is not None:
        types: set[PolicyType] = set()
        for i, raw in enumerate(_list(spec["policyTypes"], "spec.policyTypes")):
            try:
                types.add(PolicyType(raw))
            except ValueError:
                raise InvalidInput(
                    f"unknown policy type {raw!r} (expected Ingress or Egress)",
                    field=f"spec.policyTypes[{i}]",
                ) from None
        if not types:
            raise InvalidInput("policyTypes must not be empty", field="spec.policyTypes")
    else:
        # The API server's default: Ingress always, Egress when egress rules are present.
        types = {PolicyType.INGRESS}
        if spec.get("egress") is not None:
            types.add(PolicyType.EGRESS)
    return NetworkPolicy(
        namespace, name, selector, frozenset(types), tuple(ingress), tuple(egress)
    )


def _decode_object(
    doc: object, where: _Where, out: dict[str, list[Any]], seen: set[tuple[str, str, str]]
) -> None:
    if not isinstance(doc, Mapping):
        raise where.error(InvalidInput(f"expected a Kubernetes object, got {doc!r:.40}"))
    raw_kind, api = doc.get("kind"), doc.get("apiVersion")
    if (api, raw_kind) not in _KINDS:
        raise where.error(InvalidInput(
            f"unsupported kind {raw_kind!r} with apiVersion {api!r} (expected v1 Namespace, "
            "v1 Pod, networking.k8s.io/v1 NetworkPolicy or a v1 List of them)",
            field="kind",
        ))
    kind = str(raw_kind)
    try:
        _fields(doc, _TOP_FIELDS, "")
        namespace, name, labels = _meta(doc.get("metadata"), kind, namespaced=kind != "Namespace")
        where.named(kind, f"{namespace}/{name}" if namespace else name)
        ident = (kind, namespace, name)
        if ident in seen:
            raise InvalidInput(f"duplicate {kind} {namespace + '/' if namespace else ''}{name}")
        seen.add(ident)
        if kind == "Namespace":
            out["ns"].append(_decode_namespace(doc))
        elif kind == "Pod":
            out["pod"].append(_decode_pod(doc, namespace, name, labels))
        else:
            out["np"].append(_decode_policy(doc, namespace, name))
    except InvalidInput as err:
        raise where.error(err) from None


def load_cluster(sources: Sequence[tuple[str, str]]) -> Cluster:
    """Decode YAML texts (``(name, text)`` pairs, name used in messages) into a Cluster.

    Raises InvalidInput whose ``field`` names the source, the document and the
    path of the offending field.
    """
    out: dict[str, list[Any]] = {"ns": [], "pod": [], "np": []}
    seen: set[tuple[str, str, str]] = set()
    for source, text in sources:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as err:
            raise InvalidInput(f"not valid YAML: {err}", field=source) from None
        number = 0
        for doc in docs:
            if doc is None:
                continue
            number += 1
            if isinstance(doc, Mapping) and doc.get("kind") == "List":
                where = _Where(source, number, None)
                try:
                    lst = _fields(doc, frozenset({"apiVersion", "kind", "items", "metadata"}), "")
                    items = _list(lst.get("items"), "items")
                except InvalidInput as err:
                    raise where.error(err) from None
                for i, item in enumerate(items):
                    _decode_object(item, _Where(source, number, i), out, seen)
            else:
                _decode_object(doc, _Where(source, number, None), out, seen)
    return Cluster.build(out["ns"], out["pod"], out["np"])

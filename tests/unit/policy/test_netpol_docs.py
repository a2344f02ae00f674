"""The examples of the Kubernetes NetworkPolicy concept page and of the EKS best practices.

Each policy is the documented manifest; the pods around it are ours, chosen so
that every clause of the example is exercised (inside and outside each
selector, cidr and except, on and off the port).
"""

from __future__ import annotations

import ipaddress

import pytest

from trustmesh.policy.netpol import (
    Cluster,
    IndexedEvaluator,
    Protocol,
    explain,
    load_cluster,
    naive_matrix,
)

WORLD = """
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: mine, labels: {project: myproject}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
---
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: db, namespace: default, labels: {role: db}},
   status: {podIP: 10.0.0.10}}
- {apiVersion: v1, kind: Pod, metadata: {name: frontend, namespace: default,
   labels: {role: frontend}}, status: {podIP: 172.17.1.20}}
- {apiVersion: v1, kind: Pod, metadata: {name: batch, namespace: default, labels: {role: batch}},
   status: {podIP: 10.0.0.30}}
- {apiVersion: v1, kind: Pod, metadata: {name: tool, namespace: mine, labels: {role: tool}},
   status: {podIP: 10.1.0.10}}
- {apiVersion: v1, kind: Pod, metadata: {name: stranger, namespace: other,
   labels: {role: frontend}}, status: {podIP: 172.17.0.5}}
- {apiVersion: v1, kind: Pod, metadata: {name: outsider, namespace: other, labels: {role: x}},
   status: {podIP: 172.17.1.5}}
- apiVersion: v1
  kind: Pod
  metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
  spec:
    containers:
    - name: coredns
      image: coredns
      ports:
      - {name: dns, containerPort: 53, protocol: UDP}
      - {name: dns-tcp, containerPort: 53, protocol: TCP}
  status: {podIP: 10.2.0.53}
"""

# The concept page's test-network-policy.
TEST_NETWORK_POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: test-network-policy
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
    - Ingress
    - Egress
  ingress:
    - from:
        - ipBlock:
            cidr: 172.17.0.0/16
            except:
              - 172.17.1.0/24
        - namespaceSelector:
            matchLabels:
              project: myproject
        - podSelector:
            matchLabels:
              role: frontend
      ports:
        - protocol: TCP
          port: 6379
  egress:
    - to:
        - ipBlock:
            cidr: 10.0.0.0/24
      ports:
        - protocol: TCP
          port: 5978
"""


def cluster(policies: str) -> Cluster:
    return load_cluster([("world.yaml", WORLD), ("policies.yaml", policies)])


def can(c: Cluster, src: str, dst: str, port: int, proto: Protocol = Protocol.TCP) -> bool:
    def ep(text: str) -> object:
        try:
            return ipaddress.ip_address(text)
        except ValueError:
            return c.pod(text)
    verdict = explain(c, ep(src), ep(dst), port, proto)  # type: ignore[arg-type]
    if "/" in src and "/" in dst:
        # the matrix of both evaluators must say the same as explain
        for m in (IndexedEvaluator(c).matrix(port, proto), naive_matrix(c, port, proto)):
            assert m.allowed_by_key(src, dst) == verdict.allowed
    return verdict.allowed


def test_test_network_policy_ingress() -> None:
    c = cluster(TEST_NETWORK_POLICY)
    # podSelector role=frontend: same namespace only
    assert can(c, "default/frontend", "default/db", 6379)
    assert not can(c, "default/frontend", "default/db", 6380)
    assert not can(c, "default/batch", "default/db", 6379)
    # namespaceSelector project=myproject: every pod of that namespace
    assert can(c, "mine/tool", "default/db", 6379)
    # ipBlock 172.17.0.0/16 except 172.17.1.0/24, by IP (pods and outside addresses)
    assert can(c, "other/stranger", "default/db", 6379)
    assert not can(c, "other/outsider", "default/db", 6379)
    assert can(c, "172.17.200.1", "default/db", 6379)
    assert not can(c, "172.17.1.99", "default/db", 6379)
    assert not can(c, "172.17.0.5", "default/db", 6379, Protocol.UDP)


def test_test_network_policy_egress() -> None:
    c = cluster(TEST_NETWORK_POLICY)
    assert can(c, "default/db", "10.0.0.99", 5978)
    assert can(c, "default/db", "default/batch", 5978)  # 10.0.0.30 is in 10.0.0.0/24
    assert not can(c, "default/db", "default/batch", 80)
    assert not can(c, "default/db", "8.8.8.8", 5978)
    assert not can(c, "default/db", "kube-system/coredns", 53, Protocol.UDP)
    # other pods are untouched
    assert can(c, "default/batch", "8.8.8.8", 443)
    assert can(c, "default/batch", "default/frontend", 80)


DEFAULT_DENY_INGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-ingress
  namespace: default
spec:
  podSelector: {}
  policyTypes:
  - Ingress
"""

ALLOW_ALL_INGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-ingress
  namespace: default
spec:
  podSelector: {}
  ingress:
  - {}
  policyTypes:
  - Ingress
"""

DEFAULT_DENY_EGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-egress
  namespace: default
spec:
  podSelector: {}
  policyTypes:
  - Egress
"""

ALLOW_ALL_EGRESS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-all-egress
  namespace: default
spec:
  podSelector: {}
  egress:
  - {}
  policyTypes:
  - Egress
"""

DEFAULT_DENY_ALL = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: default-deny-all
  namespace: default
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  - Egress
"""

END_PORT = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: multi-port-egress
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
    - Egress
  egress:
    - to:
        - ipBlock:
            cidr: 10.0.0.0/24
      ports:
        - protocol: TCP
          port: 32000
          endPort: 32768
"""


def test_default_deny_ingress() -> None:
    c = cluster(DEFAULT_DENY_INGRESS)
    assert not can(c, "default/frontend", "default/db", 80)
    assert not can(c, "mine/tool", "default/batch", 80)
    assert not can(c, "8.8.8.8", "default/db", 80)
    assert can(c, "default/db", "mine/tool", 80)  # egress untouched
    assert can(c, "default/db", "8.8.8.8", 80)


def test_allow_all_ingress_overrides_default_deny() -> None:
    c = cluster(DEFAULT_DENY_INGRESS + "---" + ALLOW_ALL_INGRESS)
    assert can(c, "other/outsider", "default/db", 12345)
    assert can(c, "8.8.8.8", "default/db", 80)


def test_default_deny_egress() -> None:
    c = cluster(DEFAULT_DENY_EGRESS)
    assert not can(c, "default/db", "default/frontend", 80)
    assert not can(c, "default/db", "8.8.8.8", 443)
    assert can(c, "mine/tool", "default/db", 80)  # ingress untouched


def test_allow_all_egress_overrides_default_deny() -> None:
    c = cluster(DEFAULT_DENY_EGRESS + "---" + ALLOW_ALL_EGRESS)
    assert can(c, "default/db", "8.8.8.8", 443)
    assert can(c, "default/db", "other/outsider", 80)


def test_default_deny_all() -> None:
    c = cluster(DEFAULT_DENY_ALL)
    assert not can(c, "default/db", "default/frontend", 80)
    assert not can(c, "mine/tool", "default/db", 80)
    assert not can(c, "default/db", "mine/tool", 80)
    assert can(c, "mine/tool", "other/outsider", 80)


@pytest.mark.parametrize(("port", "allowed"), [(31999, False), (32000, True), (32500, True),
                                                (32768, True), (32769, False)])
def test_end_port_range(port: int, allowed: bool) -> None:
    c = cluster(END_PORT)
    assert can(c, "default/db", "10.0.0.99", port) is allowed
    assert not can(c, "default/db", "10.0.1.1", 32000)
    assert not can(c, "default/db", "10.0.0.99", 32000, Protocol.UDP)


AND_PEER = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: and-peer, namespace: default}
spec:
  podSelector: {matchLabels: {role: db}}
  ingress:
  - from:
    - namespaceSelector:
        matchLabels:
          project: myproject
      podSelector:
        matchLabels:
          role: tool
"""
OR_PEERS = AND_PEER.replace("      podSelector:", "    - podSelector:").replace(
    "name: and-peer", "name: or-peers")


def test_namespace_and_pod_selector_in_one_entry_is_and() -> None:
    c = cluster(AND_PEER)
    assert can(c, "mine/tool", "default/db", 80)
    assert not can(c, "default/frontend", "default/db", 80)


def test_namespace_and_pod_selector_in_two_entries_is_or() -> None:
    c = cluster(OR_PEERS)
    assert can(c, "mine/tool", "default/db", 80)
    # role=tool in the policy's own namespace: no such pod; role=frontend is not tool
    assert not can(c, "default/frontend", "default/db", 80)


# EKS best practices: default deny everything, then allow DNS, then allow client -> app.
EKS_DEFAULT_DENY = """
kind: NetworkPolicy
apiVersion: networking.k8s.io/v1
metadata:
  name: default-deny
  namespace: default
spec:
  podSelector: {}
  policyTypes:
  - Ingress
  - Egress
"""

EKS_ALLOW_DNS = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-dns-access
  namespace: default
spec:
  podSelector:
    matchLabels: {}
  policyTypes:
  - Egress
  egress:
  - to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
    ports:
    - protocol: UDP
      port: 53
"""

EKS_ALLOW_FROM_CLIENT = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-ingress-from-frontend
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: db
  policyTypes:
  - Ingress
  ingress:
  - from:
    - podSelector:
        matchLabels:
          role: frontend
    ports:
    - protocol: TCP
      port: 6379
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-egress-to-db
  namespace: default
spec:
  podSelector:
    matchLabels:
      role: frontend
  policyTypes:
  - Egress
  egress:
  - to:
    - podSelector:
        matchLabels:
          role: db
    ports:
    - protocol: TCP
      port: 6379
"""


def test_eks_default_deny_blocks_dns() -> None:
    c = cluster(EKS_DEFAULT_DENY)
    assert not can(c, "default/db", "kube-system/coredns", 53, Protocol.UDP)


def test_eks_allow_dns() -> None:
    c = cluster(EKS_DEFAULT_DENY + "---" + EKS_ALLOW_DNS)
    assert can(c, "default/db", "kube-system/coredns", 53, Protocol.UDP)
    assert not can(c, "default/db", "kube-system/coredns", 53, Protocol.TCP)
    assert not can(c, "default/db", "8.8.8.8", 53, Protocol.UDP)
    assert not can(c, "default/frontend", "default/db", 6379)


def test_eks_allow_from_client() -> None:
    c = cluster(EKS_DEFAULT_DENY + "---" + EKS_ALLOW_DNS + "---" + EKS_ALLOW_FROM_CLIENT)
    assert can(c, "default/frontend", "default/db", 6379)
    assert not can(c, "default/frontend", "default/db", 80)
    assert not can(c, "default/batch", "default/db", 6379)
    assert not can(c, "default/db", "default/frontend", 6379)  # one way only
    assert can(c, "default/frontend", "kube-system/coredns", 53, Protocol.UDP)

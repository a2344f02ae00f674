"""Decoding the cluster model: what is accepted, and what is refused with which path."""

from __future__ import annotations

import pytest

from trustmesh.errors import InvalidInput, NotFound
from trustmesh.policy.labels import LabelSelector, parse_label_selector
from trustmesh.policy.netpol import (
    NAMESPACE_NAME_LABEL,
    PolicyType,
    Protocol,
    load_cluster,
)

NP_HEAD = """apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p, namespace: x}
"""


def load_policy(spec: str) -> None:
    load_cluster([("np.yaml", NP_HEAD + spec)])


def refused(spec: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        load_policy(spec)
    assert info.value.field
    return info.value


def test_error_names_file_document_object_and_field() -> None:
    text = """
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  ingress:
  - from:
    - podSelector: {}
    - ipBlock: {cidr: 10.0.0.0/33}
"""
    with pytest.raises(InvalidInput) as info:
        load_cluster([("cluster.yaml", text)])
    assert str(info.value) == (
        "cluster.yaml: document 3 (NetworkPolicy x/deny): "
        "spec.ingress[0].from[1].ipBlock.cidr: invalid CIDR '10.0.0.0/33'"
    )
    assert info.value.field is not None and info.value.field.endswith("ipBlock.cidr")


@pytest.mark.parametrize(("spec", "field", "words"), [
    ("spec: {podSelector: {}, ingres: []}", "spec.ingres", "unknown field"),
    ("spec: {podSelector: {}, ingress: [{from: [{podSelecter: {}}]}]}",
     "spec.ingress[0].from[0].podSelecter", "unknown field"),
    ("spec: {podSelector: {matchLabels: {'bad key!': a}}}",
     "spec.podSelector.matchLabels.bad key!", "invalid label key"),
    ("spec: {podSelector: {matchLabels: {app: 'has space'}}}",
     "spec.podSelector.matchLabels.app", "invalid label value"),
    ("spec: {podSelector: {matchLabels: {app: " + "a" * 64 + "}}}",
     "spec.podSelector.matchLabels.app", "invalid label value"),
    ("spec: {podSelector: {matchExpressions: [{key: app, operator: In}]}}",
     "spec.podSelector.matchExpressions[0].values", "needs a non-empty values"),
    ("spec: {podSelector: {matchExpressions: [{key: app, operator: NotIn, values: []}]}}",
     "spec.podSelector.matchExpressions[0].values", "needs a non-empty values"),
    ("spec: {podSelector: {matchExpressions: [{key: app, operator: Exists, values: [a]}]}}",
     "spec.podSelector.matchExpressions[0].values", "must not have values"),
    ("spec: {podSelector: {matchExpressions: [{key: app, operator: DoesNotExist, values: [a]}]}}",
     "spec.podSelector.matchExpressions[0].values", "must not have values"),
    ("spec: {podSelector: {matchExpressions: [{key: app, operator: Equals, values: [a]}]}}",
     "spec.podSelector.matchExpressions[0].operator", "unknown operator"),
    ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
     "spec.ingress[0].from[0].ipBlock.cidr", "invalid CIDR"),
    ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.1}}]}]}",
     "spec.ingress[0].from[0].ipBlock.cidr", "invalid CIDR"),
    ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, "
     "except: [192.168.0.0/16]}}]}]}",
     "spec.ingress[0].from[0].ipBlock.except[0]", "not strictly inside"),
    ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, "
     "except: [10.0.0.0/8]}}]}]}",
     "spec.ingress[0].from[0].ipBlock.except[0]", "not strictly inside"),
    ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8, "
     "except: ['::/64']}}]}]}",
     "spec.ingress[0].from[0].ipBlock.except[0]", "not strictly inside"),
    ("spec: {podSelector: {}, ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, "
     "podSelector: {}}]}]}",
     "spec.ingress[0].from[0]", "cannot be combined"),
    ("spec: {podSelector: {}, ingress: [{from: [{}]}]}",
     "spec.ingress[0].from[0]", "needs podSelector"),
    ("spec: {podSelector: {}, ingress: [{ports: [{port: 0}]}]}",
     "spec.ingress[0].ports[0].port", "out of range 1-65535"),
    ("spec: {podSelector: {}, ingress: [{ports: [{port: 65536}]}]}",
     "spec.ingress[0].ports[0].port", "out of range 1-65535"),
    ("spec: {podSelector: {}, egress: [{ports: [{endPort: 90}]}]}",
     "spec.egress[0].ports[0].endPort", "requires port"),
    ("spec: {podSelector: {}, egress: [{ports: [{port: 90, endPort: 80}]}]}",
     "spec.egress[0].ports[0].endPort", "greater than or equal"),
    ("spec: {podSelector: {}, egress: [{ports: [{port: http, endPort: 80}]}]}",
     "spec.egress[0].ports[0].endPort", "named port"),
    ("spec: {podSelector: {}, egress: [{ports: [{port: 80, endPort: 70000}]}]}",
     "spec.egress[0].ports[0].endPort", "out of range"),
    ("spec: {podSelector: {}, egress: [{ports: [{port: 80, protocol: ICMP}]}]}",
     "spec.egress[0].ports[0].protocol", "unknown protocol"),
    ("spec: {podSelector: {}, egress: [{ports: [{port: 80, protocol: tcp}]}]}",
     "spec.egress[0].ports[0].protocol", "unknown protocol"),
    ("spec: {podSelector: {}, egress: [{ports: [{port: Not_A_Name}]}]}",
     "spec.egress[0].ports[0].port", "invalid port name"),
    ("spec: {podSelector: {}, policyTypes: [Both]}", "spec.policyTypes[0]",
     "unknown policy type"),
    ("spec: {ingress: []}", "spec.podSelector", "required"),
])
def test_bad_policy_is_refused_with_path(spec: str, field: str, words: str) -> None:
    err = refused(spec)
    assert err.field is not None
    assert err.field.endswith(field), err.field
    assert err.field.startswith("np.yaml: document 1 (NetworkPolicy x/p): ")
    assert words in err.message


@pytest.mark.parametrize(("text", "field", "words"), [
    ("apiVersion: v1\nkind: Service\nmetadata: {name: s}\n", "kind", "unsupported kind"),
    ("apiVersion: apps/v1\nkind: Pod\nmetadata: {name: s}\n", "kind", "unsupported kind"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containerz: []}\n",
     "spec.containerz", "unknown field"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, "
     "ports: [{containerPort: 99999}]}]}\n", "spec.containers[0].ports[0].containerPort",
     "out of range"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [{name: c, "
     "ports: [{containerPort: 80, protocol: HTTP}]}]}\n",
     "spec.containers[0].ports[0].protocol", "unknown protocol"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nstatus: {podIP: 300.1.1.1}\n",
     "status.podIP", "invalid IP"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {v: 2}}\n",
     "metadata.labels.v", "must be a string"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: x}\n", "metadata.name", "required"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: Bad_NS}\n", "metadata.name",
     "invalid namespace"),
    ("apiVersion: v1\nkind: Namespace\nmetadata: {name: x, colour: red}\n",
     "metadata.colour", "unknown field"),
    ("apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n"
     "- {apiVersion: v1, kind: Pod, metadata: {name: a}}\n", "items[1] (Pod default/a)",
     "duplicate"),
    ("- just\n- a list\n", "document 1", "expected a Kubernetes object"),
])
def test_bad_objects_are_refused(text: str, field: str, words: str) -> None:
    with pytest.raises(InvalidInput) as info:
        load_cluster([("in.yaml", text)])
    assert info.value.field is not None and info.value.field.endswith(field), info.value.field
    assert words in info.value.message


def test_invalid_yaml() -> None:
    with pytest.raises(InvalidInput, match="not valid YAML"):
        load_cluster([("in.yaml", "a: [b\n")])


def test_policy_types_default_from_presence_of_egress() -> None:
    c = load_cluster([("a.yaml", NP_HEAD + "spec: {podSelector: {}}\n"),
                      ("b.yaml", NP_HEAD.replace("name: p", "name: q")
                       + "spec: {podSelector: {}, egress: []}\n"),
                      ("c.yaml", NP_HEAD.replace("name: p", "name: r")
                       + "spec: {podSelector: {}, egress: [{}], policyTypes: [Egress]}\n")])
    types = {p.name: p.policy_types for p in c.policies}
    assert types["p"] == {PolicyType.INGRESS}
    assert types["q"] == {PolicyType.INGRESS, PolicyType.EGRESS}
    assert types["r"] == {PolicyType.EGRESS}


def test_real_world_pod_manifest_fields_are_accepted_and_namespaces_implied() -> None:
    text = """
apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: shop
  labels: {app.kubernetes.io/name: web, tier: ""}
  annotations: {note: anything}
  uid: 1234
spec:
  serviceAccountName: web
  nodeName: n1
  containers:
  - name: web
    image: nginx:1.27
    resources: {limits: {cpu: 1}}
    ports:
    - {name: http, containerPort: 8080}
    - {name: metrics, containerPort: 9090, protocol: TCP}
    - {containerPort: 5353, protocol: UDP}
status:
  phase: Running
  podIP: 10.9.0.1
  podIPs: [{ip: 10.9.0.1}, {ip: "fd00::1"}]
"""
    c = load_cluster([("pod.yaml", text)])
    (pod,) = c.pods
    assert pod.key == "shop/web"
    assert pod.resolve_named_port("http", Protocol.TCP) == (8080,)
    assert pod.resolve_named_port("http", Protocol.UDP) == ()
    assert [str(ip) for ip in pod.ips] == ["10.9.0.1", "fd00::1"]
    assert c.namespace("shop").labels == {NAMESPACE_NAME_LABEL: "shop"}
    with pytest.raises(NotFound):
        c.pod("shop/nope")
    with pytest.raises(InvalidInput):
        c.pod("nope")


def test_namespace_name_label_is_automatic() -> None:
    c = load_cluster([("ns.yaml", "apiVersion: v1\nkind: Namespace\n"
                      "metadata: {name: x, labels: {team: a}}\n")])
    assert c.namespace("x").labels == {"team": "a", NAMESPACE_NAME_LABEL: "x"}


def test_label_selector_semantics() -> None:
    s = parse_label_selector({
        "matchLabels": {"app": "web"},
        "matchExpressions": [
            {"key": "env", "operator": "In", "values": ["prod", "stage"]},
            {"key": "tier", "operator": "NotIn", "values": ["db"]},
            {"key": "team", "operator": "Exists"},
            {"key": "legacy", "operator": "DoesNotExist"},
        ],
    }, "sel")
    base = {"app": "web", "env": "prod", "team": "t"}
    assert s.matches(base)
    assert s.matches({**base, "tier": "front"})
    assert not s.matches({**base, "tier": "db"})
    assert not s.matches({**base, "legacy": "yes"})
    assert not s.matches({**base, "env": "dev"})
    assert not s.matches({"env": "prod", "team": "t"})
    assert not s.matches({"app": "web", "env": "prod"})
    # NotIn matches a pod without the key at all
    notin = parse_label_selector(
        {"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["db"]}]}, "s")
    assert notin.matches({})
    assert parse_label_selector({}, "s") == LabelSelector()
    assert LabelSelector().matches({"anything": "x"})
    assert "env in (prod,stage)" in s.describe()

"""Mesh resource decoding: every refusal names the source, the document, the resource and
the exact field; the registry kinds' defaults; canonical dumps that load back."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import InvalidInput
from trustmesh.policy.mesh_model import (
    AuthorizationPolicy,
    PeerAuthentication,
    Service,
    Workload,
    dump_resource,
    load_mesh_resources,
    resource_from_dict,
    resource_key,
    workload_spiffe_id,
)

OK = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ok, namespace: foo}
spec: {}
"""


def ap(spec: str, meta: str = "{name: bar, namespace: foo}") -> str:
    return f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {meta}\n" \
           f"spec: {spec}\n"


def pa(spec: str) -> str:
    return f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n" \
           f"metadata: {{name: bar, namespace: foo}}\nspec: {spec}\n"


def wl(spec: str) -> str:
    return f"apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\n" \
           f"metadata: {{name: bar, namespace: foo}}\nspec: {spec}\n"


def svc(spec: str) -> str:
    return f"apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\n" \
           f"metadata: {{name: bar, namespace: foo}}\nspec: {spec}\n"


def refusal(text: str) -> str:
    """The error for ``text`` as the second document of policy.yaml."""
    with pytest.raises(InvalidInput) as err:
        load_mesh_resources(OK + "---\n" + text, source="policy.yaml")
    return str(err.value)


AP = "policy.yaml: document 2 (AuthorizationPolicy foo/bar): "
PA = "policy.yaml: document 2 (PeerAuthentication foo/bar): "
WL = "policy.yaml: document 2 (Workload foo/bar): "
SVC = "policy.yaml: document 2 (Service foo/bar): "


@pytest.mark.parametrize(("text", "expected"), [
    # the example of the issue, word for word
    (ap("{rules: [{to: [{operation: {ports: ['80', 70000]}}]}]}"),
     AP + "spec.rules[0].to[0].operation.ports[1]: port 70000 is out of range 1..65535"),
    (ap("{rules: [{to: [{operation: {notPorts: ['http']}}]}]}"),
     AP + "spec.rules[0].to[0].operation.notPorts[0]: 'http' is not a port number"),
    (ap("{rules: [{to: [{operation: {ports: ['0']}}]}]}"),
     AP + "spec.rules[0].to[0].operation.ports[0]: port 0 is out of range 1..65535"),
    # unknown fields at every level
    (ap("{}", "{name: bar, namespace: foo, owner: me}"), AP + "metadata.owner: unknown field"),
    (ap("{actions: DENY}"), AP + "spec.actions: unknown field"),
    (ap("{rules: [{form: [{source: {principals: [a]}}]}]}"),
     AP + "spec.rules[0].form: unknown field"),
    (ap("{rules: [{from: [{sources: {principals: [a]}}]}]}"),
     AP + "spec.rules[0].from[0].sources: unknown field"),
    (ap("{rules: [{from: [{source: {principal: [a]}}]}]}"),
     AP + "spec.rules[0].from[0].source.principal: unknown field"),
    (ap("{rules: [{to: [{operation: {path: [/a]}}]}]}"),
     AP + "spec.rules[0].to[0].operation.path: unknown field"),
    (ap("{rules: [{when: [{key: source.ip, value: [1.2.3.4]}]}]}"),
     AP + "spec.rules[0].when[0].value: unknown field"),
    (ap("{selector: {labels: {app: a}}}"), AP + "spec.selector.labels: unknown field"),
    # enums and unsupported features
    (ap("{action: deny}"), AP + "spec.action: unknown action 'deny'; expected one of ALLOW, "
                                "DENY, AUDIT"),
    (ap("{action: CUSTOM, provider: {name: ext}, rules: [{}]}"),
     AP + "spec.action: CUSTOM (external authorization) is not supported yet"),
    (ap("{provider: {name: ext}}"), AP + "spec.provider: only valid with action CUSTOM"),
    (ap("{targetRef: {kind: Gateway, name: gw}}"), AP + "spec.targetRef: target references "
                                                        "are not supported; use a selector"),
    (ap("{rules: [{from: [{source: {requestPrincipals: ['*']}}]}]}"),
     AP + "spec.rules[0].from[0].source.requestPrincipals: needs JWT request authentication, "
          "which trustmesh does not support yet"),
    (ap("{rules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]}"),
     AP + "spec.rules[0].from[0].source.notRequestPrincipals: needs JWT"),
    (ap("{rules: [{when: [{key: 'request.auth.claims[groups]', values: [a]}]}]}"),
     AP + "spec.rules[0].when[0].key: 'request.auth.claims[groups]' needs JWT request "
          "authentication"),
    (ap("{rules: [{when: [{key: request.auth.principal, values: [a]}]}]}"),
     AP + "spec.rules[0].when[0].key: 'request.auth.principal' needs JWT"),
    (ap("{rules: [{when: [{key: source.user, values: [a]}]}]}"),
     AP + "spec.rules[0].when[0].key: unknown condition key 'source.user'"),
    (ap("{rules: [{when: [{key: 'request.headers[]', values: [a]}]}]}"),
     AP + "spec.rules[0].when[0].key: unknown condition key 'request.headers[]'"),
    # invalid values
    (ap("{rules: [{from: [{source: {ipBlocks: ['1.2.3.4', '10.0.0.0/33']}}]}]}"),
     AP + "spec.rules[0].from[0].source.ipBlocks[1]: '10.0.0.0/33' is not an IP address or "
          "CIDR"),
    (ap("{rules: [{from: [{source: {notRemoteIpBlocks: [nope]}}]}]}"),
     AP + "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: 'nope' is not an IP address"),
    (ap("{rules: [{when: [{key: destination.ip, values: [999.1.1.1]}]}]}"),
     AP + "spec.rules[0].when[0].values[0]: '999.1.1.1' is not an IP address or CIDR"),
    (ap("{rules: [{when: [{key: destination.port, notValues: ['65536']}]}]}"),
     AP + "spec.rules[0].when[0].notValues[0]: port 65536 is out of range 1..65535"),
    (ap("{rules: [{to: [{operation: {paths: ['/a/*/b']}}]}]}"),
     AP + "spec.rules[0].to[0].operation.paths[0]: '/a/*/b': '*' may only start or end a "
          "value"),
    (ap("{rules: [{to: [{operation: {paths: ['*a*']}}]}]}"),
     AP + "spec.rules[0].to[0].operation.paths[0]: '*a*': use a prefix or a suffix match"),
    (ap("{rules: [{to: [{operation: {paths: [api]}}]}]}"),
     AP + "spec.rules[0].to[0].operation.paths[0]: 'api' must start with '/'"),
    (ap("{rules: [{to: [{operation: {paths: ['/a?b=1']}}]}]}"),
     AP + "spec.rules[0].to[0].operation.paths[0]: '/a?b=1': paths are matched without the "
          "query"),
    (ap("{rules: [{to: [{operation: {methods: [GET, post]}}]}]}"),
     AP + "spec.rules[0].to[0].operation.methods[1]: 'post' is not an HTTP method"),
    # empty things Istio refuses
    (ap("{rules: [{from: []}]}"), AP + "spec.rules[0].from: must not be empty"),
    (ap("{rules: [{to: []}]}"), AP + "spec.rules[0].to: must not be empty"),
    (ap("{rules: [{when: []}]}"), AP + "spec.rules[0].when: must not be empty"),
    (ap("{rules: [{from: [{source: {}}]}]}"),
     AP + "spec.rules[0].from[0].source: must name at least one field"),
    (ap("{rules: [{from: [{}]}]}"), AP + "spec.rules[0].from[0].source: must name at least"),
    (ap("{rules: [{to: [{operation: {}}]}]}"),
     AP + "spec.rules[0].to[0].operation: must name at least one field"),
    (ap("{rules: [{to: [{operation: {methods: []}}]}]}"),
     AP + "spec.rules[0].to[0].operation.methods: must not be empty"),
    (ap("{rules: [{from: [{source: {principals: ['']}}]}]}"),
     AP + "spec.rules[0].from[0].source.principals[0]: must not be an empty string"),
    (ap("{rules: [{when: [{key: source.ip}]}]}"),
     AP + "spec.rules[0].when[0]: a condition needs values or notValues"),
    (ap("{action: DENY}"), AP + "spec.rules: a DENY policy without rules would never match"),
    (ap("{action: DENY, rules: []}"), AP + "spec.rules: a DENY policy without rules"),
    # metadata
    (ap("{}", "{name: Bar, namespace: foo}"), "policy.yaml: document 2 (AuthorizationPolicy "
                                              "foo/Bar): metadata.name: 'Bar' is not a valid"),
    (ap("{}", "{name: bar, namespace: Foo_1}"), "policy.yaml: document 2 (AuthorizationPolicy "
                                                "Foo_1/bar): metadata.namespace: 'Foo_1' is "
                                                "not a valid namespace name"),
    (ap("{}", "{namespace: foo}"), "policy.yaml: document 2: metadata.name: must be a "
                                   "non-empty string"),
    (ap("{}", "{name: bar, namespace: foo, annotations: {istio.io/dry-run: true}}"),
     AP + "metadata.annotations.istio.io/dry-run: annotation value must be a string (quote "
          "it: istio.io/dry-run: \"true\")"),
    (ap("{}", "{name: bar, namespace: foo, annotations: {istio.io/dry-run: 'yes'}}"),
     AP + "metadata.annotations.istio.io/dry-run: must be \"true\" or \"false\", not 'yes'"),
    # PeerAuthentication
    (pa("{mtls: {mode: MUTUAL}}"), PA + "spec.mtls.mode: unknown mode 'MUTUAL'; expected one "
                                        "of UNSET, DISABLE, PERMISSIVE, STRICT"),
    (pa("{portLevelMtls: {8080: {mode: DISABLE}}}"),
     PA + "spec.portLevelMtls: needs a workload selector"),
    (pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {}}"),
     PA + "spec.portLevelMtls: must be a non-empty mapping"),
    (pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: DISABLE}}}"),
     PA + "spec.portLevelMtls.0: port 0 is out of range 1..65535"),
    (pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {80: {mode: strict}}}"),
     PA + "spec.portLevelMtls.80.mode: unknown mode 'strict'"),
    (pa("{mtls: {mode: STRICT, level: 2}}"), PA + "spec.mtls.level: unknown field"),
    # Workload and Service
    (wl("{ports: [{port: 8080}]}"), WL + "spec.ports[0].sidecarPort: is required"),
    (wl("{ports: [{port: 8080, sidecarPort: 8080}]}"),
     WL + "spec.ports[0].sidecarPort: must differ from the application's port"),
    (wl("{ports: [{port: 8080, sidecarPort: 18080, protocol: UDP}]}"),
     WL + "spec.ports[0].protocol: unknown protocol 'UDP'; expected one of HTTP, HTTP2, GRPC, "
          "TCP"),
    (wl("{ports: [{port: 8080, sidecarPort: 18080, targetPort: 1}]}"),
     WL + "spec.ports[0].targetPort: unknown field"),
    (wl("{address: localhost}"), WL + "spec.address: 'localhost' is not an IP address"),
    (wl("{serviceAccount: Web_SA}"), WL + "spec.serviceAccount: 'Web_SA' is not a valid"),
    (wl("{spiffeId: 'https://example.org/x'}"), WL + "spec.spiffeId: "),
    (wl("{upstreams: [{service: db, port: 5432}]}"),
     WL + "spec.upstreams[0].localPort: None is not a port number"),
    (wl("{upstreams: [{service: 'a/b/c', port: 5432, localPort: 15432}]}"),
     WL + "spec.upstreams[0].service: 'a/b/c' is not a Service name"),
    (wl("{upstreams: [{service: db, port: 1, localPort: 9}, {service: x, port: 2, "
        "localPort: 9}]}"), WL + "spec.upstreams: two upstreams use the same localPort"),
    (svc("{ports: [{port: 80}]}"), SVC + "spec.selector: is required"),
    (svc("{selector: {app: a}}"), SVC + "spec.ports: a Service needs at least one port"),
    (svc("{selector: {app: a}, ports: [{port: 80, targetPort: 99999}]}"),
     SVC + "spec.ports[0].targetPort: port 99999 is out of range 1..65535"),
    # kinds, versions, documents
    ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: v}\n",
     "policy.yaml: document 2: kind: unknown kind 'VirtualService'"),
    ("apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: v}\n",
     "policy.yaml: document 2: apiVersion: AuthorizationPolicy needs apiVersion "
     "security.istio.io/v1 or security.istio.io/v1beta1, not 'security.istio.io/v1alpha1'"),
    ("apiVersion: security.istio.io/v1\nkind: Workload\nmetadata: {name: v}\n",
     "policy.yaml: document 2: apiVersion: Workload needs apiVersion "
     "mesh.trustmesh.io/v1alpha1"),
    ("- just\n- a list\n", "policy.yaml: document 2: a resource must be a mapping"),
    (OK, "policy.yaml: document 2: AuthorizationPolicy foo/ok is also document 1"),
    ("key: [unclosed\n", "policy.yaml: not valid YAML (line"),
])
def test_refusals_name_the_field(text: str, expected: str) -> None:
    assert refusal(text).startswith(expected), refusal(text)


def test_nothing_is_half_loaded() -> None:
    """A bad document anywhere refuses the whole input, however many good ones precede it."""
    good = [ap("{}", f"{{name: p{i}, namespace: foo}}") for i in range(5)]
    with pytest.raises(InvalidInput, match="document 6"):
        load_mesh_resources("---\n".join([*good, ap("{action: NOPE}")]))
    assert len(load_mesh_resources("---\n".join(good))) == 5


def test_same_name_in_other_kinds_or_namespaces_is_fine() -> None:
    text = "---\n".join([ap("{}"), ap("{}", "{name: bar, namespace: baz}"),
                         pa("{mtls: {mode: STRICT}}")])
    assert [resource_key(r) for r in load_mesh_resources(text)] == [
        ("AuthorizationPolicy", "foo", "bar"), ("AuthorizationPolicy", "baz", "bar"),
        ("PeerAuthentication", "foo", "bar")]


def test_v1beta1_and_lists_and_empty_documents_load() -> None:
    text = ("---\n" + ap("{}").replace("/v1\n", "/v1beta1\n") + "---\n---\n"
            "apiVersion: v1\nkind: List\nitems:\n"
            "- {apiVersion: security.istio.io/v1, kind: PeerAuthentication, "
            "metadata: {name: x, namespace: foo}, spec: {mtls: {mode: STRICT}}}\n")
    loaded = load_mesh_resources(text)
    assert [type(r) for r in loaded] == [AuthorizationPolicy, PeerAuthentication]


def test_principals_are_spiffe_ids_whichever_way_they_are_written() -> None:
    [p] = load_mesh_resources(ap(
        "{rules: [{from: [{source: {principals: ['cluster.local/ns/a/sa/b', "
        "'spiffe://cluster.local/ns/c/sa/d', '*', '*/sa/e', 'cluster.local/ns/f/*'], "
        "notPrincipals: ['cluster.local/ns/x/sa/y']}}], "
        "when: [{key: source.principal, values: ['cluster.local/ns/g/sa/h']}]}]}"))
    assert isinstance(p, AuthorizationPolicy)
    [rule] = p.rules
    assert rule.sources is not None
    assert rule.sources[0].principals == (
        "spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/c/sa/d", "*", "*/sa/e",
        "spiffe://cluster.local/ns/f/*")
    assert rule.sources[0].not_principals == ("spiffe://cluster.local/ns/x/sa/y",)
    assert rule.conditions[0].values == ("spiffe://cluster.local/ns/g/sa/h",)


def test_ports_may_be_strings_or_numbers() -> None:
    [p] = load_mesh_resources(ap("{rules: [{to: [{operation: {ports: ['8080', 9090]}}]}]}"))
    assert isinstance(p, AuthorizationPolicy) and p.rules[0].operations is not None
    assert p.rules[0].operations[0].ports == (8080, 9090)


def test_registry_defaults() -> None:
    w, s = load_mesh_resources(
        "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: web}\n"
        "spec: {ports: [{port: 8080, sidecarPort: 18080}]}\n---\n"
        "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\nmetadata: {name: web}\n"
        "spec: {selector: {app: web}, ports: [{port: 80}]}\n")
    assert isinstance(w, Workload) and isinstance(s, Service)
    assert (w.meta.namespace, w.service_account, w.address) == ("default", "default",
                                                                "127.0.0.1")
    assert (w.ports[0].protocol, w.ports[0].port, w.ports[0].sidecar_port) == (
        "HTTP", 8080, 18080)
    assert workload_spiffe_id(w, "example.org") == "spiffe://example.org/ns/default/sa/default"
    assert (s.ports[0].port, s.ports[0].target_port, s.ports[0].protocol) == (80, 80, "HTTP")
    [explicit] = load_mesh_resources(wl("{serviceAccount: api, spiffeId: "
                                        "'spiffe://other.org/custom'}"))
    assert isinstance(explicit, Workload)
    assert workload_spiffe_id(explicit, "example.org") == "spiffe://other.org/custom"


def test_dumps_are_copies() -> None:
    [p] = load_mesh_resources(ap("{rules: [{}]}"))
    dumped = dump_resource(p)
    dumped["spec"]["rules"].append({"to": []})
    assert resource_from_dict(dump_resource(p)) == p


# -- round trip of generated policies --------------------------------------------------------
_names = st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9]", fullmatch=True)
_values = st.lists(st.sampled_from(["a", "b*", "*c", "*", "cluster.local/ns/x/sa/y"]),
                   min_size=1, max_size=3, unique=True)
_cidrs = st.lists(st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1/128", "192.168.1.0/24"]),
                  min_size=1, max_size=2, unique=True)
_source = st.fixed_dictionaries({}, optional={
    "principals": _values, "notPrincipals": _values, "namespaces": _values,
    "notNamespaces": _values, "ipBlocks": _cidrs, "notIpBlocks": _cidrs,
    "remoteIpBlocks": _cidrs, "notRemoteIpBlocks": _cidrs}).filter(bool)
_operation = st.fixed_dictionaries({}, optional={
    "hosts": _values, "notHosts": _values,
    "ports": st.lists(st.integers(1, 65535).map(str), min_size=1, max_size=2),
    "methods": st.lists(st.sampled_from(["GET", "POST", "*"]), min_size=1, max_size=2),
    "paths": st.lists(st.sampled_from(["/a", "/b*", "*/c", "*"]), min_size=1, max_size=2),
    }).filter(bool)
_condition = st.one_of(
    st.fixed_dictionaries({"key": st.just("request.headers[x-a]"), "values": _values}),
    st.fixed_dictionaries({"key": st.just("source.ip"), "notValues": _cidrs}),
    st.fixed_dictionaries({"key": st.just("destination.port"),
                           "values": st.lists(st.integers(1, 65535).map(str), min_size=1)}))
_rule = st.fixed_dictionaries({}, optional={
    "from": st.lists(st.fixed_dictionaries({"source": _source}), min_size=1, max_size=2),
    "to": st.lists(st.fixed_dictionaries({"operation": _operation}), min_size=1, max_size=2),
    "when": st.lists(_condition, min_size=1, max_size=2)})
_policy = st.fixed_dictionaries({
    "apiVersion": st.sampled_from(["security.istio.io/v1", "security.istio.io/v1beta1"]),
    "kind": st.just("AuthorizationPolicy"),
    "metadata": st.fixed_dictionaries({"name": _names, "namespace": _names}),
    "spec": st.fixed_dictionaries({
        "action": st.sampled_from(["ALLOW", "DENY", "AUDIT"]),
        "rules": st.lists(_rule, min_size=1, max_size=3)},
        optional={"selector": st.fixed_dictionaries({"matchLabels": st.dictionaries(
            _names, _names, min_size=1, max_size=2)})})})


@settings(max_examples=150, deadline=None)
@given(_policy)
def test_generated_policies_round_trip(doc: dict[str, Any]) -> None:
    [p] = load_mesh_resources(yaml.safe_dump(doc))
    again = resource_from_dict(dump_resource(p))
    assert again == p
    [from_yaml] = load_mesh_resources(yaml.safe_dump(dump_resource(p)))
    assert from_yaml == p
    assert resource_key(p) == ("AuthorizationPolicy", doc["metadata"]["namespace"],
                               doc["metadata"]["name"])

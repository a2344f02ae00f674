"""Edge cases of the Kubernetes RBAC authorizer: one test per rule."""

from __future__ import annotations

import pytest

from trustmesh.errors import InvalidInput, PermissionDenied
from trustmesh.policy.rbac import (
    Authorizer,
    Request,
    default_policy,
    effective_groups,
    load_rbac,
    resolve_role_rules,
    service_account_username,
)

RB = "rbac.authorization.k8s.io"


def authz(text: str) -> Authorizer:
    return Authorizer(load_rbac([("t.yaml", text)]))


def cluster_role(name: str, rules: str, labels: str = "{}") -> str:
    return f"""
apiVersion: {RB}/v1
kind: ClusterRole
metadata: {{name: {name}, labels: {labels}}}
rules: {rules}
---
"""


def crb(name: str, role: str, subjects: str) -> str:
    return f"""
apiVersion: {RB}/v1
kind: ClusterRoleBinding
metadata: {{name: {name}}}
roleRef: {{kind: ClusterRole, name: {role}, apiGroup: {RB}}}
subjects: {subjects}
---
"""


def rb(name: str, ns: str, kind: str, role: str, subjects: str) -> str:
    return f"""
apiVersion: {RB}/v1
kind: RoleBinding
metadata: {{name: {name}, namespace: {ns}}}
roleRef: {{kind: {kind}, name: {role}, apiGroup: {RB}}}
subjects: {subjects}
---
"""


USER_U = "[{kind: User, name: u}]"


def test_resource_names_never_match_create() -> None:
    a = authz(cluster_role("c", '[{apiGroups: [""], resources: [pods], resourceNames: [p], '
                           "verbs: [create, get]}]") + crb("b", "c", USER_U))
    assert not a.allowed(Request("u", "create", "pods", namespace="x"))
    assert a.allowed(Request("u", "get", "pods", namespace="x", name="p"))


def test_resource_names_match_list_only_with_a_name() -> None:
    a = authz(cluster_role("c", '[{apiGroups: [""], resources: [pods], resourceNames: [p], '
                           "verbs: [list, watch]}]") + crb("b", "c", USER_U))
    assert not a.allowed(Request("u", "list", "pods", namespace="x"))
    # kubectl with --field-selector metadata.name=p sends the name along
    assert a.allowed(Request("u", "watch", "pods", namespace="x", name="p"))


def test_star_resource_covers_subresources() -> None:
    a = authz(cluster_role("c", '[{apiGroups: [""], resources: ["*"], verbs: [get]}]')
              + crb("b", "c", USER_U))
    assert a.allowed(Request("u", "get", "pods", "log", namespace="x"))


def test_star_slash_subresource_matches_that_subresource_of_any_resource() -> None:
    a = authz(cluster_role("c", '[{apiGroups: ["*"], resources: ["*/scale"], '
                           "verbs: [update]}]") + crb("b", "c", USER_U))
    assert a.allowed(Request("u", "update", "deployments", "scale", "apps", namespace="x"))
    assert a.allowed(Request("u", "update", "replicasets", "scale", "apps", namespace="x"))
    assert not a.allowed(Request("u", "update", "deployments", "status", "apps",
                                 namespace="x"))
    assert not a.allowed(Request("u", "update", "deployments", api_group="apps",
                                 namespace="x"))


def test_resource_slash_star_is_no_wildcard() -> None:
    a = authz(cluster_role("c", '[{apiGroups: [""], resources: ["pods/*"], verbs: [get]}]')
              + crb("b", "c", USER_U))
    assert not a.allowed(Request("u", "get", "pods", "log", namespace="x"))
    assert not a.allowed(Request("u", "get", "pods", namespace="x"))


def test_plain_resource_does_not_cover_its_subresources() -> None:
    a = authz(cluster_role("c", '[{apiGroups: [""], resources: [pods], verbs: ["*"]}]')
              + crb("b", "c", USER_U))
    assert a.allowed(Request("u", "anything", "pods", namespace="x"))
    assert not a.allowed(Request("u", "create", "pods", "exec", namespace="x"))


def test_api_group_star_and_core_group() -> None:
    a = authz(cluster_role("c", '[{apiGroups: ["*"], resources: [things], verbs: [get]}]')
              + crb("b", "c", USER_U))
    assert a.allowed(Request("u", "get", "things", api_group="x.io"))
    assert a.allowed(Request("u", "get", "things"))


def test_non_resource_star_and_prefix() -> None:
    a = authz(cluster_role("c", '[{nonResourceURLs: ["/api/*", "/version"], verbs: [get]}]')
              + crb("b", "c", USER_U))
    assert a.allowed(Request("u", "get", path="/api/v1"))
    assert a.allowed(Request("u", "get", path="/version"))
    assert not a.allowed(Request("u", "get", path="/api"))
    assert not a.allowed(Request("u", "get", path="/version/x"))


def test_resource_rule_never_matches_non_resource_request_and_back() -> None:
    a = authz(cluster_role("c", '[{apiGroups: ["*"], resources: ["*"], verbs: ["*"]}]')
              + crb("b", "c", USER_U))
    assert not a.allowed(Request("u", "get", path="/healthz"))


def test_cross_namespace_rolebinding_does_not_grant() -> None:
    a = authz(cluster_role("c", '[{apiGroups: [""], resources: [pods], verbs: [get]}]')
              + rb("b", "team-a", "ClusterRole", "c", USER_U))
    assert a.allowed(Request("u", "get", "pods", namespace="team-a"))
    assert not a.allowed(Request("u", "get", "pods", namespace="team-b"))
    assert not a.allowed(Request("u", "get", "pods"))


def test_rolebinding_to_clusterrole_with_non_resource_urls_grants_nothing_there() -> None:
    a = authz(cluster_role("c", '[{nonResourceURLs: ["*"], verbs: ["*"]}]')
              + rb("b", "team-a", "ClusterRole", "c", USER_U))
    assert not a.allowed(Request("u", "get", path="/healthz"))


def test_role_ref_to_role_looks_in_binding_namespace() -> None:
    text = f"""
apiVersion: {RB}/v1
kind: Role
metadata: {{name: r, namespace: a}}
rules: [{{apiGroups: [""], resources: [pods], verbs: [get]}}]
---
""" + rb("b", "b", "Role", "r", USER_U)
    a = authz(text)
    d = a.authorize(Request("u", "get", "pods", namespace="b"))
    assert not d.allowed
    assert [m.describe() for m in d.missing_roles] == ["RoleBinding b/b"]
    assert not a.allowed(Request("u", "get", "pods", namespace="a"))


def test_missing_role_is_reported_and_grants_nothing() -> None:
    a = authz(crb("b", "nope", USER_U))
    assert [m.describe() for m in a.missing_role_bindings] == ["ClusterRoleBinding b"]
    d = a.authorize(Request("u", "get", "pods"))
    assert not d.allowed and d.missing_roles
    assert "does not exist" in d.render_text()


def test_system_masters_may_do_everything() -> None:
    a = authz("")
    d = a.authorize(Request("root", "delete", "nodes", groups=("system:masters",)))
    assert d.allowed and d.binding is None and "system:masters" in d.reason
    assert a.allowed(Request("root", "get", path="/anything", groups=("system:masters",)))


def test_implied_groups() -> None:
    assert effective_groups("bob") == ("system:authenticated",)
    assert effective_groups("system:anonymous") == ("system:unauthenticated",)
    assert effective_groups("system:serviceaccount:ns:sa", ["x"]) == (
        "x", "system:serviceaccounts", "system:serviceaccounts:ns", "system:authenticated")
    # not a well-formed service account user name: only authenticated
    assert effective_groups("system:serviceaccount:ns") == ("system:authenticated",)
    assert service_account_username("a", "b") == "system:serviceaccount:a:b"


def test_first_clusterrolebinding_by_name_decides_then_rolebindings() -> None:
    rules = '[{apiGroups: [""], resources: [pods], verbs: [get]}]'
    a = authz(cluster_role("c", rules) + rb("a-rb", "x", "ClusterRole", "c", USER_U)
              + crb("z-crb", "c", USER_U) + crb("m-crb", "c", "[{kind: Group, name: g}]"))
    d = a.authorize(Request("u", "get", "pods", namespace="x", groups=("g",)))
    assert d.binding is not None and d.binding.name == "m-crb"
    assert d.subject is not None and d.subject.describe() == "Group g"
    d = a.authorize(Request("u", "get", "pods", namespace="x"))
    assert d.binding is not None and d.binding.name == "z-crb"


def test_nested_aggregation_reaches_fixed_point() -> None:
    text = (cluster_role("top", "[]", "{}").replace(
        "rules: []", "aggregationRule: {clusterRoleSelectors: [{matchLabels: {l: mid}}]}")
        + cluster_role("mid", "[]", "{l: mid}").replace(
        "rules: []", "aggregationRule: {clusterRoleSelectors: [{matchLabels: {l: leaf}}]}")
        + cluster_role("leaf", '[{apiGroups: [""], resources: [pods], verbs: [get]}]',
                       "{l: leaf}")
        + crb("b", "top", USER_U))
    a = authz(text)
    d = a.authorize(Request("u", "get", "pods", namespace="x"))
    assert d.allowed and d.rule_source is not None and d.rule_source.name == "leaf"


def test_aggregation_selects_nothing_with_no_selectors_and_everything_with_empty() -> None:
    leaf = cluster_role("leaf", '[{apiGroups: [""], resources: [pods], verbs: [get]}]',
                        "{a: b}")
    none = cluster_role("agg", "[]").replace("rules: []",
                                             "aggregationRule: {clusterRoleSelectors: []}")
    every = cluster_role("agg", "[]").replace("rules: []",
                                              "aggregationRule: {clusterRoleSelectors: [{}]}")
    assert not authz(leaf + none + crb("b", "agg", USER_U)).allowed(
        Request("u", "get", "pods"))
    assert authz(leaf + every + crb("b", "agg", USER_U)).allowed(Request("u", "get", "pods"))


def test_aggregation_replaces_written_rules_and_dedups() -> None:
    text = (cluster_role("agg", '[{apiGroups: [""], resources: [secrets], verbs: [get]}]')
            .replace("rules:", "aggregationRule: {clusterRoleSelectors: [{matchLabels: {x: y}}]}"
                     "\nrules:")
            + cluster_role("a", '[{apiGroups: [""], resources: [pods], verbs: [get]}]', "{x: y}")
            + cluster_role("b", '[{apiGroups: [""], resources: [pods], verbs: [get]}]', "{x: y}"))
    objs = load_rbac([("t", text)])
    rules = {k.name: v for k, v in resolve_role_rules(objs).items()}
    assert [src.name for _, src in rules["agg"]] == ["a"]


def test_who_can_lists_subjects_and_bindings() -> None:
    rules = '[{apiGroups: [""], resources: [pods], verbs: [get]}]'
    a = authz(cluster_role("c", rules) + rb("r", "x", "ClusterRole", "c",
                                            "[{kind: ServiceAccount, name: sa}]")
              + crb("g", "c", "[{kind: Group, name: ops}]"))
    answer = a.who_can("get", "pods", namespace="x")
    assert [s.describe() for s in answer.subjects] == [
        "Group system:masters", "Group ops", "ServiceAccount x/sa"]
    assert [s.describe() for s in a.who_can("get", "pods", namespace="y").subjects] == [
        "Group system:masters", "Group ops"]
    assert "ClusterRoleBinding g" in answer.render_text()
    assert answer.to_dict()["grants"][1]["binding"]["name"] == "g"


def test_require_raises_permission_denied() -> None:
    a = authz("")
    with pytest.raises(PermissionDenied):
        a.require(Request("spiffe://td/ns/x/sa/y", "delete", "entries", api_group="trustmesh.io"))


@pytest.mark.parametrize("kwargs", [
    {"user": "", "verb": "get", "resource": "pods"},
    {"user": "u", "verb": "", "resource": "pods"},
    {"user": "u", "verb": "get"},
    {"user": "u", "verb": "get", "resource": "pods/log"},
    {"user": "u", "verb": "get", "path": "healthz"},
    {"user": "u", "verb": "get", "path": "/healthz", "namespace": "x"},
    {"user": "u", "verb": "get", "path": "/healthz", "resource": "pods"},
])
def test_bad_requests_are_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        Request(**kwargs)  # type: ignore[arg-type]


def test_default_policy() -> None:
    a = Authorizer(default_policy())
    assert a.missing_role_bindings == ()
    admin = ("trustmesh:admins",)
    tm = "trustmesh.io"
    assert a.allowed(Request("alice", "delete", "entries", api_group=tm, groups=admin))
    assert a.allowed(Request("spiffe://example.org/admin", "create", "tokens", api_group=tm,
                             groups=admin))
    assert not a.allowed(Request("alice", "delete", "entries", api_group=tm))
    assert not a.allowed(Request("alice", "delete", "pods", groups=admin))
    names = {r.name for r in default_policy().roles}
    assert names == {"trustmesh:admin", "trustmesh:viewer", "trustmesh:agent"}
    # viewer and agent exist to be bound by the operator
    text = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: v}
roleRef: {kind: ClusterRole, name: "trustmesh:viewer"}
subjects: [{kind: User, name: v}, {kind: User, name: "spiffe://td/agent/n1"}]
"""
    extra = default_policy().merged(load_rbac([("x", text)]))
    b = Authorizer(extra)
    assert b.allowed(Request("v", "list", "entries", api_group=tm))
    assert not b.allowed(Request("v", "list", "tokens", api_group=tm))
    assert not b.allowed(Request("v", "delete", "entries", api_group=tm, name="e"))

"""Strict decoding of RBAC manifests: what is refused, and with which field path."""

from __future__ import annotations

import pytest

from trustmesh.errors import InvalidInput
from trustmesh.policy.rbac import (
    BindingKind,
    RoleKind,
    SubjectKind,
    decode_rbac_documents,
    default_policy,
    load_rbac,
)

HEAD = "apiVersion: rbac.authorization.k8s.io/v1\n"
ROLE = HEAD + """kind: Role
metadata: {name: r, namespace: ns}
rules:
- apiGroups: [""]
  resources: [pods]
  verbs: [get]
"""
CRB = HEAD + """kind: ClusterRoleBinding
metadata: {name: b}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: c}
subjects:
- {kind: User, name: u, apiGroup: rbac.authorization.k8s.io}
"""


def refused(text: str) -> InvalidInput:
    with pytest.raises(InvalidInput) as info:
        load_rbac([("f.yaml", text)])
    return info.value


def test_loads_multi_document_and_list() -> None:
    text = ROLE + "---\n" + """apiVersion: v1
kind: List
items:
- """ + CRB.replace("\n", "\n  ").rstrip() + "\n"
    objs = load_rbac([("f.yaml", text)])
    assert [r.kind for r in objs.roles] == [RoleKind.ROLE]
    assert [b.kind for b in objs.bindings] == [BindingKind.CLUSTER_ROLE_BINDING]
    assert objs.bindings[0].subjects[0].kind is SubjectKind.USER


def test_defaults_namespace_role_ref_group_and_subject_group() -> None:
    objs = load_rbac([("f", HEAD + """kind: RoleBinding
metadata: {name: b}
roleRef: {kind: Role, name: r}
subjects: [{kind: Group, name: g}, {kind: ServiceAccount, name: sa}]
""")])
    b = objs.bindings[0]
    assert b.namespace == "default"
    assert b.subjects[1].namespace == "default"


def test_round_trip_through_manifest_form() -> None:
    objs = default_policy()
    again = decode_rbac_documents(objs.to_dicts())
    assert again == objs


@pytest.mark.parametrize(("text", "field", "message"), [
    (ROLE.replace("verbs: [get]", "verbs: [get]\n  verb: [list]"),
     "f.yaml: document 1 (Role ns/r): rules[0].verb", "unknown field"),
    (ROLE.replace("kind: Role", "kind: Rol"), "f.yaml: document 1: kind", "unsupported kind"),
    (ROLE.replace("rbac.authorization.k8s.io/v1", "rbac.authorization.k8s.io/v1beta1"),
     "f.yaml: document 1: apiVersion", "unsupported apiVersion"),
    (ROLE.replace("metadata:", "spec: {}\nmetadata:"), "f.yaml: document 1: spec",
     "unknown field"),
    (ROLE.replace("verbs: [get]", "verbs: []"), "rules[0].verbs", "at least one"),
    (ROLE.replace('apiGroups: [""]', "apiGroups: []"), "rules[0].apiGroups", "api group"),
    (ROLE.replace("resources: [pods]", "resources: []"), "rules[0].resources", "resource"),
    (ROLE.replace("resources: [pods]", "nonResourceURLs: [/x]\n  resources: [pods]"),
     "rules[0].nonResourceURLs", "namespaced"),
    (ROLE.replace("kind: Role", "kind: ClusterRole").replace(", namespace: ns", "")
     .replace("resources: [pods]", "nonResourceURLs: [/x]\n  resources: [pods]"),
     "rules[0].nonResourceURLs", "both"),
    (ROLE.replace("kind: Role", "kind: ClusterRole").replace("namespace: ns", "namespace: 1"),
     "metadata.namespace", "expected a string"),
    (ROLE.replace("kind: Role", "kind: ClusterRole").replace(", namespace: ns", "")
     .replace("rules:", "aggregationRule: {selectors: []}\nrules:"),
     "aggregationRule.selectors", "unknown field"),
    (ROLE.replace("aggregation", "x").replace("kind: Role", "kind: Role\naggregationRule: {}"),
     "aggregationRule", "unknown field"),
    (ROLE.replace("verbs: [get]", "verbs: [get, 1]"), "rules[0].verbs[1]", "quote"),
    (ROLE.replace("name: r,", "name: a/b,"), "metadata.name", "invalid name"),
    (ROLE.replace("namespace: ns", "namespace: Not_A_Label"), "metadata.namespace",
     "DNS label"),
    (CRB.replace("apiGroup: rbac.authorization.k8s.io, kind", "apiGroup: example.com, kind"),
     "roleRef.apiGroup", "rbac.authorization.k8s.io"),
    (CRB.replace("kind: ClusterRole,", "kind: Role,"), "roleRef.kind", "ClusterRole"),
    (CRB.replace("roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: c}\n",
                 ""), "roleRef", "required"),
    (CRB.replace("name: c}", "name: c, namespace: x}"), "roleRef.namespace", "unknown field"),
    (CRB.replace("kind: User", "kind: Robot"), "subjects[0].kind", "unsupported subject"),
    (CRB.replace("name: u, apiGroup: rbac.authorization.k8s.io",
                 "name: u, apiGroup: example.com"), "subjects[0].apiGroup", "apiGroup"),
    (CRB.replace("kind: User, name: u, apiGroup: rbac.authorization.k8s.io",
                 "kind: ServiceAccount, name: sa"), "subjects[0].namespace", "needs a namespace"),
    (CRB.replace("kind: User, name: u, apiGroup: rbac.authorization.k8s.io",
                 "kind: ServiceAccount, name: sa, namespace: x, "
                 "apiGroup: rbac.authorization.k8s.io"),
     "subjects[0].apiGroup", '""'),
    (CRB.replace("kind: User, name: u,", "kind: ServiceAccount, name: Bad_Name, namespace: x,"),
     "subjects[0].", ""),
    (CRB.replace("name: u,", "name: '',"), "subjects[0].name", "empty"),
    (CRB.replace("name: u,", "name: u, uid: x,"), "subjects[0].uid", "unknown field"),
    (ROLE + "---\n" + ROLE, "f.yaml: document 2 (Role ns/r)", "duplicate Role ns/r"),
    ("a: [", "f.yaml", "not valid YAML"),
    ("- 1\n- 2\n", "f.yaml: document 1", "expected a Kubernetes object"),
    ("apiVersion: v1\nkind: List\nitems:\n- {kind: Pod, apiVersion: v1}\n",
     "f.yaml: document 1 items[0]: kind", "unsupported kind"),
    ("apiVersion: v2\nkind: List\nitems: []\n", "f.yaml: document 1: apiVersion", "List"),
])
def test_bad_input_is_refused_with_its_path(text: str, field: str, message: str) -> None:
    err = refused(text)
    assert err.field is not None and field in err.field, (err.field, err.message)
    assert message in err.message


def test_label_errors_carry_the_path() -> None:
    text = ROLE.replace("kind: Role", "kind: ClusterRole").replace(
        ", namespace: ns}", ", labels: {a: 1}}")
    err = refused(text)
    assert err.field is not None and "metadata.labels.a" in err.field


def test_namespace_on_cluster_scoped_object_is_dropped_as_kubectl_does() -> None:
    objs = load_rbac([("f", ROLE.replace("kind: Role", "kind: ClusterRole")),
                      ("g", CRB.replace("name: b}", "name: b, namespace: ns}"))])
    assert objs.roles[0].namespace == "" and objs.bindings[0].namespace == ""


def test_public_api_names_exist() -> None:
    from trustmesh.policy import rbac, rbac_lint, rbac_model

    for module in (rbac, rbac_model, rbac_lint):
        assert all(hasattr(module, name) for name in module.__all__)
    assert set(rbac_model.__all__) <= set(rbac.__all__)


def test_binding_to_missing_role_loads() -> None:
    objs = load_rbac([("f", CRB)])
    assert objs.bindings[0].role_ref.name == "c"

"""rbac lint: each finding, and a clean policy with none."""

from __future__ import annotations

from trustmesh.policy.rbac import default_policy, load_rbac
from trustmesh.policy.rbac_lint import lint

RB = "rbac.authorization.k8s.io/v1"


def codes(text: str) -> dict[str, str]:
    return {f.code: f.severity for f in lint(load_rbac([("t", text)]))}


def test_default_policy_is_clean_of_warnings() -> None:
    assert all(f.severity == "info" for f in lint(default_policy()))


def test_findings() -> None:
    text = f"""
apiVersion: {RB}
kind: ClusterRole
metadata: {{name: odd}}
rules:
- {{apiGroups: [""], resources: ["pods/*"], verbs: [get]}}
- {{apiGroups: [""], resources: [configmaps], resourceNames: [c, ""], verbs: [create, get]}}
- {{nonResourceURLs: ["healthz", "/a*b"], verbs: [GET]}}
---
apiVersion: {RB}
kind: ClusterRole
metadata: {{name: agg}}
aggregationRule: {{clusterRoleSelectors: [{{matchLabels: {{x: y}}}}]}}
rules: [{{apiGroups: [""], resources: [pods], verbs: [get]}}]
---
apiVersion: {RB}
kind: Role
metadata: {{name: lonely, namespace: a}}
rules: []
---
apiVersion: {RB}
kind: ClusterRoleBinding
metadata: {{name: to-nothing}}
roleRef: {{kind: ClusterRole, name: nope}}
subjects: [{{kind: User, name: u}}]
---
apiVersion: {RB}
kind: RoleBinding
metadata: {{name: rb, namespace: a}}
roleRef: {{kind: ClusterRole, name: odd}}
subjects: [{{kind: Group, name: g, namespace: a}}]
---
apiVersion: {RB}
kind: RoleBinding
metadata: {{name: empty, namespace: a}}
roleRef: {{kind: ClusterRole, name: agg}}
"""
    found = codes(text)
    assert found == {
        "missing-role": "warning",
        "subresource-wildcard": "warning",
        "resource-names-unnamed-verb": "warning",
        "empty-resource-name": "info",
        "nonresource-url-pattern": "warning",
        "unusual-verb": "info",
        "aggregated-rules-replaced": "warning",
        "unused-role": "info",
        "nonresource-via-rolebinding": "warning",
        "subject-namespace-ignored": "info",
        "no-subjects": "warning",
    }
    findings = lint(load_rbac([("t", text)]))
    missing = next(f for f in findings if f.code == "missing-role")
    assert missing.object == "ClusterRoleBinding to-nothing" and "nope" in missing.message
    assert findings[0].severity == "warning" and findings[-1].severity == "info"

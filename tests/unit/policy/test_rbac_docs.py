"""Every example of the Kubernetes "Using RBAC Authorization" page, as can-i verdicts."""

from __future__ import annotations

from trustmesh.policy.rbac import Authorizer, Request, load_rbac


def authz(*texts: str) -> Authorizer:
    return Authorizer(load_rbac([(f"doc{i}", t) for i, t in enumerate(texts)]))


def can(a: Authorizer, user: str, verb: str, resource: str = "", *, ns: str = "",
        name: str = "", sub: str = "", group: str = "", groups: tuple[str, ...] = (),
        path: str | None = None) -> bool:
    return a.authorize(Request(user, verb, resource, sub, group, name, ns, path,
                               groups)).allowed


POD_READER = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  namespace: default
  name: pod-reader
rules:
- apiGroups: [""] # "" indicates the core API group
  resources: ["pods"]
  verbs: ["get", "watch", "list"]
"""
SECRET_READER = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  # "namespace" omitted since ClusterRoles are not namespaced
  name: secret-reader
rules:
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "watch", "list"]
"""
READ_PODS = """
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: read-pods
  namespace: default
subjects:
- kind: User
  name: jane # "name" is case sensitive
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: Role
  name: pod-reader
  apiGroup: rbac.authorization.k8s.io
"""
READ_SECRETS = """
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: read-secrets
  namespace: development
subjects:
- kind: User
  name: dave
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: ClusterRole
  name: secret-reader
  apiGroup: rbac.authorization.k8s.io
"""
READ_SECRETS_GLOBAL = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: read-secrets-global
subjects:
- kind: Group
  name: manager
  apiGroup: rbac.authorization.k8s.io
roleRef:
  kind: ClusterRole
  name: secret-reader
  apiGroup: rbac.authorization.k8s.io
"""


def test_role_and_rolebinding_pod_reader_for_jane() -> None:
    a = authz(POD_READER, READ_PODS)
    for verb in ("get", "watch", "list"):
        assert can(a, "jane", verb, "pods", ns="default")
    assert can(a, "jane", "get", "pods", ns="default", name="web")
    assert not can(a, "jane", "delete", "pods", ns="default")
    assert not can(a, "jane", "get", "pods", ns="kube-system")
    assert not can(a, "jane", "list", "pods")  # across all namespaces
    assert not can(a, "Jane", "get", "pods", ns="default")  # names are case sensitive
    assert not can(a, "jane", "get", "pods", ns="default", sub="log")
    assert not can(a, "jane", "get", "pods", ns="default", group="apps")


def test_rolebinding_to_clusterrole_grants_only_in_its_namespace() -> None:
    a = authz(SECRET_READER, READ_SECRETS)
    d = a.authorize(Request("dave", "get", "secrets", namespace="development"))
    assert d.allowed and d.binding is not None and d.role is not None
    assert (d.binding.kind, d.binding.namespace, d.binding.name) == (
        "RoleBinding", "development", "read-secrets")
    assert (d.role.kind, d.role.name) == ("ClusterRole", "secret-reader")
    assert not can(a, "dave", "get", "secrets", ns="default")
    assert not can(a, "dave", "list", "secrets")  # cluster-wide list needs a ClusterRoleBinding


def test_clusterrolebinding_read_secrets_global_for_group_manager() -> None:
    a = authz(SECRET_READER, READ_SECRETS_GLOBAL)
    for ns in ("default", "development", "kube-system", ""):
        assert can(a, "anyone", "list", "secrets", ns=ns, groups=("manager",))
    assert not can(a, "anyone", "list", "secrets", ns="default")
    assert not can(a, "anyone", "delete", "secrets", ns="default", groups=("manager",))


MONITORING = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: monitoring
aggregationRule:
  clusterRoleSelectors:
  - matchLabels:
      rbac.example.com/aggregate-to-monitoring: "true"
rules: [] # The control plane automatically fills in the rules
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: monitoring-endpointslices
  labels:
    rbac.example.com/aggregate-to-monitoring: "true"
# When you create the "monitoring-endpointslices" ClusterRole,
# the rules below will be added to the "monitoring" ClusterRole.
rules:
- apiGroups: [""]
  resources: ["services", "pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["discovery.k8s.io"]
  resources: ["endpointslices"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: monitoring}
subjects: [{kind: Group, name: monitors, apiGroup: rbac.authorization.k8s.io}]
roleRef: {kind: ClusterRole, name: monitoring, apiGroup: rbac.authorization.k8s.io}
"""


def test_aggregated_monitoring_clusterrole() -> None:
    a = authz(MONITORING)
    g = ("monitors",)
    assert can(a, "m", "list", "pods", ns="x", groups=g)
    assert can(a, "m", "watch", "services", groups=g)
    d = a.authorize(Request("m", "get", "endpointslices", api_group="discovery.k8s.io",
                            groups=g))
    assert d.allowed and d.rule_index == 1
    assert d.rule_source is not None and d.rule_source.name == "monitoring-endpointslices"
    assert not can(a, "m", "delete", "pods", ns="x", groups=g)
    assert not can(a, "m", "get", "secrets", ns="x", groups=g)


CRONTAB_AGGREGATION = """
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: aggregate-cron-tabs-edit
  labels:
    # Add these permissions to the "admin" and "edit" default roles.
    rbac.authorization.k8s.io/aggregate-to-admin: "true"
    rbac.authorization.k8s.io/aggregate-to-edit: "true"
rules:
- apiGroups: ["stable.example.com"]
  resources: ["crontabs"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
---
kind: ClusterRole
apiVersion: rbac.authorization.k8s.io/v1
metadata:
  name: aggregate-cron-tabs-view
  labels:
    # Add these permissions to the "view" default role.
    rbac.authorization.k8s.io/aggregate-to-view: "true"
rules:
- apiGroups: ["stable.example.com"]
  resources: ["crontabs"]
  verbs: ["get", "list", "watch"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: view}
aggregationRule:
  clusterRoleSelectors:
  - matchLabels: {rbac.authorization.k8s.io/aggregate-to-view: "true"}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: edit}
aggregationRule:
  clusterRoleSelectors:
  - matchExpressions:
    - {key: rbac.authorization.k8s.io/aggregate-to-edit, operator: In, values: ["true"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: team}
subjects: [{kind: User, name: v, apiGroup: rbac.authorization.k8s.io}]
roleRef: {kind: ClusterRole, name: view, apiGroup: rbac.authorization.k8s.io}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: editors, namespace: team}
subjects: [{kind: User, name: e, apiGroup: rbac.authorization.k8s.io}]
roleRef: {kind: ClusterRole, name: edit, apiGroup: rbac.authorization.k8s.io}
"""


def test_aggregation_into_default_roles_crontabs() -> None:
    a = authz(CRONTAB_AGGREGATION)
    grp = "stable.example.com"
    assert can(a, "v", "list", "crontabs", ns="team", group=grp)
    assert not can(a, "v", "create", "crontabs", ns="team", group=grp)
    assert can(a, "e", "create", "crontabs", ns="team", group=grp)
    assert not can(a, "e", "create", "crontabs", ns="other", group=grp)


def role(rules: str, kind: str = "Role", name: str = "r") -> str:
    meta = f"{{name: {name}, namespace: default}}" if kind == "Role" else f"{{name: {name}}}"
    binding = "RoleBinding" if kind == "Role" else "ClusterRoleBinding"
    bmeta = "{name: b, namespace: default}" if kind == "Role" else "{name: b}"
    return f"""
apiVersion: rbac.authorization.k8s.io/v1
kind: {kind}
metadata: {meta}
rules:
{rules}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: {binding}
metadata: {bmeta}
subjects: [{{kind: User, name: u, apiGroup: rbac.authorization.k8s.io}}]
roleRef: {{kind: {kind}, name: {name}, apiGroup: rbac.authorization.k8s.io}}
"""


def test_subresource_pods_log() -> None:
    a = authz(role("""
- apiGroups: [""]
  resources: ["pods", "pods/log"]
  verbs: ["get", "list"]
"""))
    assert can(a, "u", "get", "pods", ns="default", name="p")
    assert can(a, "u", "get", "pods", ns="default", name="p", sub="log")
    assert not can(a, "u", "get", "pods", ns="default", name="p", sub="exec")
    assert not can(a, "u", "create", "pods", ns="default", name="p", sub="log")


def test_resource_names_my_configmap() -> None:
    a = authz(role("""
- apiGroups: [""]
  # At the HTTP level, the name of the resource for accessing ConfigMap
  # objects is "configmaps"
  resources: ["configmaps"]
  resourceNames: ["my-configmap"]
  verbs: ["update", "get"]
"""))
    assert can(a, "u", "get", "configmaps", ns="default", name="my-configmap")
    assert can(a, "u", "update", "configmaps", ns="default", name="my-configmap")
    assert not can(a, "u", "get", "configmaps", ns="default", name="other")
    assert not can(a, "u", "get", "configmaps", ns="default")  # no name: not restricted-away
    assert not can(a, "u", "list", "configmaps", ns="default")


def test_role_examples_deployments_jobs_my_config() -> None:
    a = authz(role("""
- apiGroups: ["apps"]
  # at the HTTP level, the name of the resource for accessing Deployment
  # objects is "deployments"
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "update", "patch", "delete"]
- apiGroups: [""]
  resources: ["configmaps"]
  resourceNames: ["my-config"]
  verbs: ["get"]
"""))
    assert can(a, "u", "create", "deployments", ns="default", group="apps")
    assert not can(a, "u", "create", "deployments", ns="default")  # wrong (core) group
    assert can(a, "u", "list", "pods", ns="default")
    assert not can(a, "u", "delete", "pods", ns="default", name="x")
    assert can(a, "u", "delete", "jobs", ns="default", name="x", group="batch")
    assert can(a, "u", "get", "configmaps", ns="default", name="my-config")
    assert not can(a, "u", "get", "configmaps", ns="default", name="your-config")


def test_cluster_role_nodes() -> None:
    a = authz(role("""
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
""", kind="ClusterRole"))
    assert can(a, "u", "list", "nodes")
    assert can(a, "u", "get", "nodes", name="node-1")
    assert not can(a, "u", "delete", "nodes", name="node-1")


def test_non_resource_urls_healthz() -> None:
    a = authz(role("""
- nonResourceURLs: ["/healthz", "/healthz/*"] # '*' in a nonResourceURL is a suffix glob match
  verbs: ["get", "post"]
""", kind="ClusterRole"))
    assert can(a, "u", "get", path="/healthz")
    assert can(a, "u", "post", path="/healthz/etcd")
    assert can(a, "u", "get", path="/healthz/")
    assert not can(a, "u", "get", path="/healthzz")
    assert not can(a, "u", "delete", path="/healthz")
    assert not can(a, "u", "get", path="/metrics")


def test_wildcard_example_all_in_group() -> None:
    a = authz(role("""
- apiGroups: ["example.com"]
  resources: ["*"]
  # Omit resourceNames to allow binding to any name
  verbs: ["*"]
"""))
    assert can(a, "u", "frobnicate", "widgets", ns="default", group="example.com")
    assert can(a, "u", "get", "widgets", ns="default", group="example.com", sub="status")
    assert not can(a, "u", "get", "widgets", ns="default", group="other.com")


def binding_with(subjects: str, ns: str = "default", kind: str = "RoleBinding") -> Authorizer:
    meta = f"{{name: b, namespace: {ns}}}" if kind == "RoleBinding" else "{name: b}"
    return authz("""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: reader}
rules: [{apiGroups: [""], resources: [pods], verbs: [get]}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: """ + kind + """
metadata: """ + meta + """
roleRef: {kind: ClusterRole, name: reader, apiGroup: rbac.authorization.k8s.io}
subjects:
""" + subjects)


def test_subject_user_alice_at_example_com() -> None:
    a = binding_with("""
- kind: User
  name: "alice@example.com"
  apiGroup: rbac.authorization.k8s.io
""")
    assert can(a, "alice@example.com", "get", "pods", ns="default")
    assert not can(a, "alice", "get", "pods", ns="default")


def test_subject_group_frontend_admins() -> None:
    a = binding_with("""
- kind: Group
  name: "frontend-admins"
  apiGroup: rbac.authorization.k8s.io
""")
    assert can(a, "x", "get", "pods", ns="default", groups=("frontend-admins",))
    assert not can(a, "frontend-admins", "get", "pods", ns="default")  # a user of that name


def test_subject_default_service_account_in_kube_system() -> None:
    a = binding_with("""
- kind: ServiceAccount
  name: default
  namespace: kube-system
""")
    assert can(a, "system:serviceaccount:kube-system:default", "get", "pods", ns="default")
    assert not can(a, "system:serviceaccount:default:default", "get", "pods", ns="default")


def test_subject_service_account_defaults_to_binding_namespace() -> None:
    a = binding_with("""
- kind: ServiceAccount
  name: my-sa
""", ns="my-namespace")
    assert can(a, "system:serviceaccount:my-namespace:my-sa", "get", "pods", ns="my-namespace")
    assert not can(a, "system:serviceaccount:other:my-sa", "get", "pods", ns="my-namespace")


def test_subject_all_service_accounts_in_qa() -> None:
    a = binding_with("""
- kind: Group
  name: system:serviceaccounts:qa
  apiGroup: rbac.authorization.k8s.io
""", kind="ClusterRoleBinding")
    assert can(a, "system:serviceaccount:qa:builder", "get", "pods", ns="prod")
    assert not can(a, "system:serviceaccount:dev:builder", "get", "pods", ns="prod")
    assert not can(a, "qa-person", "get", "pods", ns="prod")


def test_subject_all_service_accounts_in_dev_with_ignored_namespace() -> None:
    a = binding_with("""
- kind: Group
  name: system:serviceaccounts:dev
  apiGroup: rbac.authorization.k8s.io
  namespace: development
""", ns="development")
    assert can(a, "system:serviceaccount:dev:x", "get", "pods", ns="development")


def test_subject_all_service_accounts_anywhere() -> None:
    a = binding_with("""
- kind: Group
  name: system:serviceaccounts
  apiGroup: rbac.authorization.k8s.io
""", kind="ClusterRoleBinding")
    assert can(a, "system:serviceaccount:any:thing", "get", "pods", ns="x")
    assert not can(a, "bob", "get", "pods", ns="x")


def test_subject_all_authenticated_users() -> None:
    a = binding_with("""
- kind: Group
  name: system:authenticated
  apiGroup: rbac.authorization.k8s.io
""", kind="ClusterRoleBinding")
    assert can(a, "bob", "get", "pods", ns="x")
    assert can(a, "system:serviceaccount:a:b", "get", "pods", ns="x")
    assert not can(a, "system:anonymous", "get", "pods", ns="x")


def test_subject_all_unauthenticated_users() -> None:
    a = binding_with("""
- kind: Group
  name: system:unauthenticated
  apiGroup: rbac.authorization.k8s.io
""", kind="ClusterRoleBinding")
    assert can(a, "system:anonymous", "get", "pods", ns="x")
    assert not can(a, "bob", "get", "pods", ns="x")


def test_subject_all_users() -> None:
    a = binding_with("""
- kind: Group
  name: system:authenticated
  apiGroup: rbac.authorization.k8s.io
- kind: Group
  name: system:unauthenticated
  apiGroup: rbac.authorization.k8s.io
""", kind="ClusterRoleBinding")
    assert can(a, "system:anonymous", "get", "pods", ns="x")
    assert can(a, "bob", "get", "pods", ns="x")


def test_super_user_for_all_service_accounts_cluster_wide() -> None:
    a = authz("""
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: cluster-admin}
rules:
- {apiGroups: ["*"], resources: ["*"], verbs: ["*"]}
- {nonResourceURLs: ["*"], verbs: ["*"]}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: serviceaccounts-cluster-admin}
roleRef: {kind: ClusterRole, name: cluster-admin, apiGroup: rbac.authorization.k8s.io}
subjects: [{kind: Group, name: system:serviceaccounts, apiGroup: rbac.authorization.k8s.io}]
""")
    sa = "system:serviceaccount:ns1:x"
    assert can(a, sa, "delete", "nodes", name="n1")
    assert can(a, sa, "get", "deployments", ns="y", group="apps", sub="scale")
    assert can(a, sa, "get", path="/metrics")
    assert not can(a, "human", "get", "pods", ns="y")

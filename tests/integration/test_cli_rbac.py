"""``trustmesh rbac`` as a real process: text, json, stdin and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

TRUSTMESH = str(Path(sys.executable).with_name("trustmesh"))
if not Path(TRUSTMESH).exists():
    TRUSTMESH = "/work/main/.venv/bin/trustmesh"

POLICY = """
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata: {namespace: default, name: pod-reader}
rules:
- apiGroups: [""]
  resources: ["pods", "pods/log"]
  verbs: ["get", "watch", "list"]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: read-pods, namespace: default}
subjects: [{kind: User, name: jane, apiGroup: rbac.authorization.k8s.io}]
roleRef: {kind: Role, name: pod-reader, apiGroup: rbac.authorization.k8s.io}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: deployer}
rules:
- {apiGroups: [apps], resources: [deployments, deployments/scale], verbs: [get, update]}
- {apiGroups: [""], resources: [configmaps], resourceNames: [my-configmap], verbs: [get]}
- {nonResourceURLs: ["/healthz", "/healthz/*"], verbs: [get]}
"""
MORE = """
apiVersion: v1
kind: List
items:
- apiVersion: rbac.authorization.k8s.io/v1
  kind: ClusterRoleBinding
  metadata: {name: deployers}
  subjects:
  - {kind: Group, name: ci, apiGroup: rbac.authorization.k8s.io}
  - {kind: ServiceAccount, name: builder, namespace: build}
  roleRef: {kind: ClusterRole, name: deployer, apiGroup: rbac.authorization.k8s.io}
- apiVersion: rbac.authorization.k8s.io/v1
  kind: RoleBinding
  metadata: {name: dangling, namespace: default}
  subjects: [{kind: User, name: bob, apiGroup: rbac.authorization.k8s.io}]
  roleRef: {kind: Role, name: gone, apiGroup: rbac.authorization.k8s.io}
"""


def tm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRUSTMESH, "rbac", *args], capture_output=True, text=True,
                          input=stdin, timeout=60)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("rbac")
    (d / "rbac.yaml").write_text(POLICY)
    (d / "more.yaml").write_text(MORE)
    return str(d / "rbac.yaml"), str(d / "more.yaml")


def test_can_i_yes_names_binding_and_rule(files: tuple[str, str]) -> None:
    p = tm("can-i", "get", "pods", "-f", files[0], "--as", "jane")
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[0] == "yes"
    assert "RoleBinding default/read-pods" in p.stdout and "rule 0" in p.stdout


def test_can_i_no_exits_1(files: tuple[str, str]) -> None:
    p = tm("can-i", "delete", "pods", "-f", files[0], "--as", "jane")
    assert p.returncode == 1 and p.stdout.splitlines()[0] == "no"
    p = tm("can-i", "get", "pods", "-n", "kube-system", "-f", files[0], "--as", "jane")
    assert p.returncode == 1
    p = tm("can-i", "get", "pods", "-f", files[0], "--as", "jane", "-q")
    assert p.returncode == 0 and p.stdout == ""


def test_can_i_subresource_group_and_name_forms(files: tuple[str, str]) -> None:
    f = ["-f", files[0], "-f", files[1]]
    sa = "system:serviceaccount:build:builder"
    cases = [
        (0, ["get", "pods/log", "--as", "jane"]),
        (0, ["get", "pods", "--subresource", "log", "--as", "jane"]),
        (1, ["get", "pods/exec", "--as", "jane"]),
        (0, ["update", "deployments.apps/scale", "--as", "x", "--as-group", "ci"]),
        (1, ["update", "deployments", "--api-group", "apps", "--as", "x"]),
        (1, ["update", "deployments", "--as", "x", "--as-group", "ci"]),  # core group
        (0, ["get", "configmaps", "my-configmap", "-A", "--as", sa]),
        (1, ["get", "configmaps", "other", "--as", sa]),
    ]
    with ThreadPoolExecutor(len(cases)) as pool:  # separate processes; run them side by side
        codes = list(pool.map(lambda c: tm("can-i", *c[1], *f).returncode, cases))
    assert codes == [want for want, _ in cases]


def test_can_i_non_resource_url_and_json(files: tuple[str, str]) -> None:
    f = ["-f", files[0], "-f", files[1]]
    p = tm("can-i", "get", "/healthz/etcd", *f, "--as", "u", "--as-group", "ci", "-o", "json")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["allowed"] is True and out["answer"] == "yes"
    assert out["binding"] == {"kind": "ClusterRoleBinding", "name": "deployers", "namespace": ""}
    assert out["ruleIndex"] == 2 and out["rule"]["nonResourceURLs"] == ["/healthz", "/healthz/*"]
    assert out["request"]["effectiveGroups"] == ["ci", "system:authenticated"]
    p = tm("can-i", "get", "/metrics", *f, "--as", "u", "--as-group", "ci", "-o", "json")
    assert p.returncode == 1 and json.loads(p.stdout)["allowed"] is False


def test_can_i_reports_dangling_binding(files: tuple[str, str]) -> None:
    p = tm("can-i", "get", "pods", "-f", files[0], "-f", files[1], "--as", "bob")
    assert p.returncode == 1
    assert "RoleBinding default/dangling" in p.stdout and "does not exist" in p.stdout


def test_system_masters(files: tuple[str, str]) -> None:
    p = tm("can-i", "delete", "nodes", "-A", "-f", files[0], "--as", "root",
           "--as-group", "system:masters")
    assert p.returncode == 0 and "system:masters" in p.stdout


def test_stdin() -> None:
    p = tm("can-i", "list", "pods", "-f", "-", "--as", "jane", stdin=POLICY)
    assert p.returncode == 0 and p.stdout.startswith("yes")


def test_who_can_text_and_json(files: tuple[str, str]) -> None:
    f = ["-f", files[0], "-f", files[1]]
    p = tm("who-can", "get", "pods/log", *f)
    assert p.returncode == 0, p.stderr
    assert "User jane" in p.stdout and "Group system:masters" in p.stdout
    p = tm("who-can", "update", "deployments.apps", *f, "-o", "json")
    out = json.loads(p.stdout)
    names = [s["name"] for s in out["subjects"]]
    assert names == ["system:masters", "ci", "builder"]
    assert out["grants"][1]["binding"]["name"] == "deployers"


def test_lint_exit_codes(files: tuple[str, str]) -> None:
    p = tm("lint", "-f", files[0])
    assert p.returncode == 0, p.stdout + p.stderr
    p = tm("lint", "-f", files[0], "-f", files[1])
    assert p.returncode == 1
    assert "missing-role" in p.stdout and "RoleBinding default/dangling" in p.stdout
    p = tm("lint", "-f", files[0], "-f", files[1], "-o", "json")
    out = json.loads(p.stdout)
    assert out["warnings"] >= 1
    assert any(f["code"] == "missing-role" for f in out["findings"])


def test_bad_input_goes_to_stderr_with_non_zero_exit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY.replace('verbs: ["get", "watch", "list"]', "verbz: [get]"))
    p = tm("can-i", "get", "pods", "-f", str(bad), "--as", "jane")
    assert p.returncode == 2 and p.stdout == ""
    assert "rules[0].verbz" in p.stderr and "unknown field" in p.stderr
    p = tm("can-i", "get", "pods", "-f", str(bad), "--as", "jane", "-o", "json")
    assert p.returncode == 2
    assert json.loads(p.stderr)["error"]["code"] == "invalid_input"
    p = tm("who-can", "get", "pods", "-f", str(tmp_path / "missing.yaml"))
    assert p.returncode == 2 and "cannot read" in p.stderr
    p = tm("can-i", "get", "/healthz", "x", "-f", str(bad), "--as", "u")
    assert p.returncode == 2 and "NAME" in p.stderr
    p = tm("can-i", "get", "pods", "-f", str(bad))  # --as missing: click usage error
    assert p.returncode == 2 and "--as" in p.stderr


def test_defaults_prints_loadable_policy(tmp_path: Path) -> None:
    p = tm("defaults")
    assert p.returncode == 0 and "trustmesh:admin" in p.stdout
    (tmp_path / "d.yaml").write_text(p.stdout)
    q = tm("can-i", "create", "tokens.trustmesh.io", "-A", "-f", str(tmp_path / "d.yaml"),
           "--as", "spiffe://example.org/admin", "--as-group", "trustmesh:admins")
    assert q.returncode == 0, q.stdout + q.stderr


def test_directory_input(files: tuple[str, str]) -> None:
    d = str(Path(files[0]).parent)
    p = tm("can-i", "get", "/healthz", "-f", d, "--as", "system:serviceaccount:build:builder")
    assert p.returncode == 0, p.stdout + p.stderr

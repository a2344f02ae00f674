"""``trustmesh netpol`` as a real process: text, json, stdin and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TRUSTMESH = str(Path(sys.executable).with_name("trustmesh"))
if not Path(TRUSTMESH).exists():
    TRUSTMESH = "/work/main/.venv/bin/trustmesh"

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: x}
---
apiVersion: v1
kind: Namespace
metadata: {name: y, labels: {team: blue}}
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: x, labels: {pod: a, app: payments}}
  spec:
    containers:
    - name: c
      image: nginx
      ports: [{name: http, containerPort: 80}]
  status: {podIP: 10.0.0.1}
- apiVersion: v1
  kind: Pod
  metadata: {name: b, namespace: x, labels: {pod: b}}
  status: {podIP: 10.0.0.2}
- apiVersion: v1
  kind: Pod
  metadata: {name: a, namespace: y, labels: {pod: a}}
  status: {podIP: 10.0.1.1}
"""

POLICIES = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-from-blue, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{namespaceSelector: {matchLabels: {team: blue}}}]
    ports: [{port: http}]
"""


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TRUSTMESH, "netpol", *args], input=stdin, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def files(tmp_path: Path) -> tuple[str, str]:
    c = tmp_path / "cluster.yaml"
    c.write_text(CLUSTER)
    p = tmp_path / "policies.yaml"
    p.write_text(POLICIES)
    return str(c), str(p)


def test_matrix_text(files: tuple[str, str]) -> None:
    proc = run("matrix", "-f", files[0], "-f", files[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "-\tx/a\tx/b\ty/a",
        "x/a\tX\tX\tX",
        "x/b\tX\tX\tX",
        "y/a\t.\tX\t.",
    ]


def test_matrix_json_and_port(files: tuple[str, str]) -> None:
    proc = run("matrix", "-f", files[0], "-f", files[1], "--output", "json")
    assert proc.returncode == 0, proc.stderr
    table = json.loads(proc.stdout)
    assert table["y/a"] == {"x/a": True, "x/b": False, "y/a": True}
    assert table["x/a"]["y/a"] is False
    proc = run("matrix", "-f", files[0], "-f", files[1], "--port", "81", "-o", "json")
    assert json.loads(proc.stdout)["y/a"]["x/a"] is False
    proc = run("matrix", "-f", files[0], "-f", files[1], "--port", "80", "--protocol", "UDP",
               "-o", "json")
    assert json.loads(proc.stdout)["y/a"]["x/a"] is False


def test_matrix_from_stdin(files: tuple[str, str]) -> None:
    proc = run("matrix", "-f", "-", stdin=CLUSTER + "---\n" + POLICIES)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[3] == "y/a\t.\tX\t."


def test_explain_text_and_json(files: tuple[str, str]) -> None:
    proc = run("explain", "-f", files[0], "-f", files[1], "--from", "y/a", "--to", "x/a",
               "--port", "80")
    assert proc.returncode == 0, proc.stderr
    assert "allowed by x/a-from-blue ingress[0]" in proc.stdout
    assert "not isolated for egress" in proc.stdout
    assert proc.stdout.rstrip().endswith("verdict: ALLOWED")
    proc = run("explain", "-f", files[0], "-f", files[1], "--from", "x/b", "--to", "x/a",
               "--port", "80", "--output", "json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["allowed"] is False
    assert verdict["egress"]["selected_by"] == ["x/deny"]
    assert verdict["egress"]["allowed_by"] == []
    assert verdict["ingress"]["selected_by"] == ["x/a-from-blue", "x/deny"]


def test_explain_external_ip(files: tuple[str, str]) -> None:
    proc = run("explain", "-f", files[0], "-f", files[1], "--from", "y/a", "--to-ip", "8.8.8.8",
               "--port", "53", "--protocol", "UDP", "-o", "json")
    assert proc.returncode == 0, proc.stderr
    verdict = json.loads(proc.stdout)
    assert verdict["allowed"] is True and verdict["ingress"]["in_cluster"] is False


def test_explain_unknown_pod_and_missing_endpoint(files: tuple[str, str]) -> None:
    proc = run("explain", "-f", files[0], "--from", "y/zz", "--to", "x/a", "--port", "80")
    assert proc.returncode != 0
    assert "no pod 'y/zz'" in proc.stderr
    proc = run("explain", "-f", files[0], "--to", "x/a", "--port", "80")
    assert proc.returncode == 2
    assert "--from" in proc.stderr
    proc = run("explain", "-f", files[0], "--from", "x/a", "--to-ip", "dns.google", "--port", "53")
    assert proc.returncode == 2
    assert "to-ip: invalid IP address 'dns.google'" in proc.stderr


def test_lint_exit_codes(files: tuple[str, str]) -> None:
    proc = run("lint", "-f", files[0], "-f", files[1])
    # x/deny isolates egress and nothing allows DNS: an error
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "NP004" in proc.stdout and "NetworkPolicy x/deny" in proc.stdout
    proc = run("lint", "-f", files[0], "--require-policy-for", "app=payments", "-o", "json")
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert {"severity": "error", "code": "NP006", "object": "Pod x/a",
            "message": report["findings"][0]["message"]} == report["findings"][0]
    # only warnings: exit 0
    proc = run("lint", "-f", files[0], "-o", "json")
    assert proc.returncode == 0, proc.stdout
    assert json.loads(proc.stdout)["errors"] == 0


def test_bad_input_goes_to_stderr_with_nonzero_exit(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER + "---\n" + POLICIES.replace("port: http", "port: 70000"))
    proc = run("matrix", "-f", str(bad))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip() == (
        f"Error: {bad}: document 5 (NetworkPolicy x/a-from-blue): "
        "spec.ingress[0].ports[0].port: 70000 is out of range 1-65535"
    )
    proc = run("lint", "-f", str(bad), "-o", "json")
    assert proc.returncode == 2
    assert json.loads(proc.stderr)["error"]["code"] == "invalid_input"
    proc = run("matrix", "-f", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "cannot read" in proc.stderr
    proc = run("matrix", "-f", "-", "--port", "0", stdin=CLUSTER)
    assert proc.returncode == 2 and "port: 0 is out of range 1-65535" in proc.stderr
    proc = run("matrix", "-f", "-", "--protocol", "ICMP", stdin=CLUSTER)
    assert proc.returncode == 2 and "unknown protocol 'ICMP'" in proc.stderr

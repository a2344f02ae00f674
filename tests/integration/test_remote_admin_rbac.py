"""The remote admin API: HTTPS with client certificates, every call checked by RBAC."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness import TRUSTMESH, ServerProcess, make_csr, run, split_chain


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "memory", "--signing-workers", "0")


def client_cert(srv: ServerProcess, tmp: Path, name: str, groups: tuple[str, ...] = ()
                ) -> tuple[Path, Path]:
    subj = "".join(f"/O={g}" for g in groups) + f"/CN={name}"
    csr = make_csr(tmp, name, subj=subj)
    chain = srv.cli_json("ca", "issue", "--csr", str(csr), "--template", "end-entity-client",
                         "--validity", "1h")
    cert = tmp / f"{name}-chain.pem"
    cert.write_text("".join(split_chain(str(chain["chain_pem"]))[:2]))
    return cert, tmp / f"{name}.key"


def remote(srv: ServerProcess, tmp: Path, creds: tuple[Path, Path] | None, *args: str):  # type: ignore[no-untyped-def]
    bundle = tmp / "bundle.pem"
    if not bundle.exists():
        bundle.write_text(srv.cli("bundle", "show", check=True).stdout)
    extra = ["--server", f"https://127.0.0.1:{srv.admin_port}", "--ca-bundle", str(bundle)]
    if creds is not None:
        extra += ["--client-cert", str(creds[0]), "--client-key", str(creds[1])]
    return run([TRUSTMESH, *args, *extra])


def test_rbac_decides_what_remote_callers_may_do(srv: ServerProcess, tmp_path: Path) -> None:
    alice = client_cert(srv, tmp_path, "alice", ("trustmesh:admins",))
    bob = client_cert(srv, tmp_path, "bob")

    ok = remote(srv, tmp_path, alice, "token", "create", "--output", "json")
    assert ok.returncode == 0, ok.stderr
    assert remote(srv, tmp_path, alice, "entry", "list").returncode == 0

    denied = remote(srv, tmp_path, bob, "entry", "list")
    assert denied.returncode == 5
    assert "bob may not list entries.trustmesh.io" in denied.stderr

    # The default policy is in place and can be read locally.
    policy = srv.cli("rbac", "policy", "show", check=True).stdout
    assert "trustmesh:admins" in policy and "trustmesh:viewer" in policy
    viewer_binding = (tmp_path / "bob.yaml")
    viewer_binding.write_text(policy + "---\n" +
                              "apiVersion: rbac.authorization.k8s.io/v1\n"
                              "kind: ClusterRoleBinding\n"
                              "metadata: {name: bob-views}\n"
                              "roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole,"
                              " name: trustmesh:viewer}\n"
                              "subjects: [{apiGroup: rbac.authorization.k8s.io, kind: User,"
                              " name: bob}]\n")
    srv.cli("rbac", "policy", "apply", "-f", str(viewer_binding), check=True)
    assert remote(srv, tmp_path, bob, "entry", "list").returncode == 0
    secret = remote(srv, tmp_path, bob, "token", "create")
    assert secret.returncode == 5 and "bob may not create tokens" in secret.stderr

    # An invalid policy is refused and the old one stays.
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: rbac.authorization.k8s.io/v1\nkind: ClusterRole\n"
                   "metadata: {name: x}\nrules: [{verbz: [get]}]\n")
    res = srv.cli("rbac", "policy", "apply", "-f", str(bad))
    assert res.returncode == 2 and "verbz" in res.stderr
    assert remote(srv, tmp_path, bob, "entry", "list").returncode == 0

    # A revoked client certificate is refused at once.
    serial = run(["openssl", "x509", "-in", str(alice[0]), "-noout", "-serial"],
                 check=True).stdout.strip().split("=")[1]
    srv.cli("ca", "revoke", "--serial", serial, check=True)
    gone = remote(srv, tmp_path, alice, "entry", "list")
    assert gone.returncode == 5 and "revoked" in gone.stderr


def test_no_client_certificate_no_entry(srv: ServerProcess, tmp_path: Path) -> None:
    res = remote(srv, tmp_path, None, "entry", "list")
    assert res.returncode == 2 and "--client-cert" in res.stderr
    # A certificate from another CA fails the TLS handshake.
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(tmp_path / "mallory.key"), "-subj",
         "/O=trustmesh:admins/CN=mallory", "-days", "1", "-out",
         str(tmp_path / "mallory.pem")], check=True)
    res = remote(srv, tmp_path, (tmp_path / "mallory.pem", tmp_path / "mallory.key"),
                 "entry", "list")
    assert res.returncode == 69

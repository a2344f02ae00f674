"""The CA with its keys in an HSM (SoftHSM2 over PKCS#11), checked by openssl."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from harness import ServerProcess, issue, make_csr, openssl
from softhsm import create_softhsm_token


@pytest.mark.softhsm
def test_pkcs11_ca_issues_and_revokes_and_survives_restart(
        start_server: Callable[..., ServerProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    token = create_softhsm_token(tmp_path / "hsm", monkeypatch, "trustmesh-ca", "4321")
    pin_file = tmp_path / "pin"
    pin_file.write_text("4321\n")
    pin_file.chmod(0o600)
    args = ("--key-manager", "pkcs11", "--pkcs11-module", str(token.module),
            "--pkcs11-token-label", token.label, "--pkcs11-pin-file", str(pin_file))
    srv = start_server(*args)
    info = srv.cli_json("ca", "show")
    assert info["key_manager"] == "pkcs11"
    assert not (srv.data_dir / "keys").exists()  # no CA key ever touched the disk
    out = issue(srv, tmp_path, make_csr(tmp_path, "hsm", key="rsa:2048"), "--template",
                "end-entity", "--dns-name", "hsm.internal")
    res = openssl("verify", "-CAfile", str(out["root"]), "-untrusted", str(out["inter"]),
                  str(out["leaf"]))
    assert res.stdout.strip().endswith(": OK")
    srv.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "key-compromise")
    status = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]),
                     "-CAfile", str(out["root"]), "-url", f"{srv.base_url}/ocsp")
    assert ": revoked" in status.stdout and "Response verify OK" in status.stderr
    srv.stop()

    again = ServerProcess(srv.data_dir, list(args), port=srv.port).start()
    try:
        assert again.cli_json("ca", "show")["chain"][0]["fingerprint_sha256"] == (
            info["chain"][0]["fingerprint_sha256"])
        out2 = issue(again, tmp_path, make_csr(tmp_path, "hsm2"), "--template", "end-entity",
                     "--dns-name", "hsm2.internal")
        res = openssl("verify", "-CAfile", str(out2["root"]), "-untrusted", str(out2["inter"]),
                      str(out2["leaf"]))
        assert res.stdout.strip().endswith(": OK")
    finally:
        again.stop()


@pytest.mark.softhsm
def test_wrong_pin_is_a_clear_startup_error(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from harness import TRUSTMESH, free_port

    token = create_softhsm_token(tmp_path / "hsm", monkeypatch, "tm", "1111")
    monkeypatch.setenv("TM_PIN", "2222")
    proc = subprocess.run(
        [TRUSTMESH, "server", "run", "--data-dir", str(tmp_path / "d"), "--http-address",
         f"127.0.0.1:{free_port()}", "--bind-address", f"127.0.0.1:{free_port()}",
         "--attest-address", f"127.0.0.1:{free_port()}",
         "--admin-address", f"127.0.0.1:{free_port()}",
         "--key-manager", "pkcs11", "--pkcs11-module",
         str(token.module), "--pkcs11-token-label", "tm", "--pkcs11-pin-env", "TM_PIN"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr
    assert "PIN" in proc.stderr
    assert "2222" not in proc.stderr  # the secret is never echoed

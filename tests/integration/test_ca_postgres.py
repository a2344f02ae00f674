"""The CA on PostgreSQL: restart, and two server replicas sharing one database."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from harness import ServerProcess, issue, make_csr, openssl
from pg import PostgresServer


@pytest.mark.postgres
def test_postgres_datastore_and_two_replicas(start_server: Callable[..., ServerProcess],
                                             postgres_server: PostgresServer,
                                             tmp_path: Path) -> None:
    url = postgres_server.new_database("ca_replicas")
    a = start_server("--datastore", url, name="a")
    out = issue(a, tmp_path, make_csr(tmp_path, "pg"), "--template", "end-entity")
    ca_a = a.cli_json("ca", "show")
    # A second replica with the same keys (disk key manager: copy the key directory) and
    # the same database serves the same CA.
    b_dir = tmp_path / "b"
    b_dir.mkdir(mode=0o700)
    import shutil

    shutil.copytree(a.data_dir / "keys", b_dir / "keys")
    b = start_server("--datastore", url, name="b")
    assert b.cli_json("ca", "show")["ca_id"] == ca_a["ca_id"]

    # A revocation through replica a shows at once in replica b's OCSP answer and CRL.
    a.cli_json("ca", "revoke", "--serial", str(out["serial"]), "--reason", "superseded")
    res = openssl("ocsp", "-issuer", str(out["inter"]), "-cert", str(out["leaf"]), "-CAfile",
                  str(out["root"]), "-url", f"{b.base_url}/ocsp")
    assert ": revoked" in res.stdout
    numbers = []
    for srv in (a, b):
        crl = x509.load_der_x509_crl(httpx.get(
            f"{srv.base_url}/crl/{ca_a['ca_id']}.crl").content)
        numbers.append(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
        assert crl.get_revoked_certificate_by_serial_number(int(str(out["serial"]), 16))
    other = issue(b, tmp_path, make_csr(tmp_path, "pg2"), "--template", "end-entity")
    b.cli_json("ca", "revoke", "--serial", str(other["serial"]))
    crl = x509.load_der_x509_crl(httpx.get(f"{a.base_url}/crl/{ca_a['ca_id']}.crl").content)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > max(numbers)
    assert len(a.cli_json("ca", "audit")) == 4  # both replicas write one audit log

    a.stop()
    again = ServerProcess(a.data_dir, ["--datastore", url], port=a.port).start()
    try:
        assert again.cli_json("ca", "show")["ca_id"] == ca_a["ca_id"]
    finally:
        again.stop()

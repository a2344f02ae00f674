"""Federation between two trust domains, end to end: two real servers (a.test and b.test),
an agent on each, `trustmesh bundle set|list|show|delete`, and the real py-spiffe client.

a.test's workloads get b.test's bundle only when their entry federates with b.test, and
only while a.test's server holds it; a JWT-SVID minted in b.test validates in a.test then.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from spiffe import TrustDomain, WorkloadApiClient

from harness import AgentProcess, ServerProcess, run


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # noqa: BLE001 - retried until the deadline
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


@pytest.fixture
def two(start_server: Callable[..., ServerProcess]
        ) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    a = start_server("--trust-domain", "a.test", "--key-manager", "memory",
                     "--signing-workers", "0", name="a")
    b = start_server("--trust-domain", "b.test", "--key-manager", "memory",
                     "--signing-workers", "0", name="b")
    base = Path(tempfile.mkdtemp(prefix="tm-fed-"))  # traversable by other users
    os.chmod(base, 0o755)
    try:
        yield a, b, base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _agent(srv: ServerProcess, base: Path, td: str) -> AgentProcess:
    (base / td).mkdir(mode=0o755)
    tok = srv.cli_json("token", "create", "--spiffe-id", f"spiffe://{td}/node")["token"]
    return AgentProcess(srv, base / td, tok)


def _entry(srv: ServerProcess, td: str, name: str, *extra: str) -> dict[str, Any]:
    [created] = srv.cli_json("entry", "create", "--parent-id", f"spiffe://{td}/node",
                             "--spiffe-id", f"spiffe://{td}/{name}", *extra)
    return dict(created)


def _trust_domains(client: WorkloadApiClient) -> set[str]:
    ctx = client.fetch_x509_context()
    return {b.trust_domain.name for b in ctx.x509_bundle_set.bundles}


_AS_NOBODY = textwrap.dedent("""
    import json, sys
    from spiffe import WorkloadApiClient
    ctx = WorkloadApiClient(socket_path=sys.argv[1]).fetch_x509_context()
    print(json.dumps(sorted(b.trust_domain.name for b in ctx.x509_bundle_set.bundles)))
""")


def test_bundles_reach_only_the_entries_that_federate(
        two: tuple[ServerProcess, ServerProcess, Path]) -> None:
    a, b, base = two
    # -- bad input first: each refused with its reason, nothing stored ------------------
    b_doc = b.cli("bundle", "show", "--format", "spiffe", check=True).stdout
    (base / "b.json").write_text(b_doc)
    (base / "own.json").write_text(a.cli("bundle", "show", "--format", "spiffe",
                                         check=True).stdout)
    (base / "broken.json").write_text(b_doc[: len(b_doc) // 2])
    refusals = {
        "own": (["--trust-domain", "a.test", "-f", str(base / "own.json")],
                "own trust domain"),
        "bad td": (["--trust-domain", "spiffe://B_TEST", "-f", str(base / "b.json")],
                   "is not a trust domain"),
        "broken": (["--trust-domain", "b.test", "-f", str(base / "broken.json")],
                   "not valid JSON"),
        "missing file": (["--trust-domain", "b.test", "-f", str(base / "nope.json")],
                         "cannot read"),
    }
    for what, (args, message) in refusals.items():
        res = a.cli("bundle", "set", *args, "--output", "json")
        assert res.returncode != 0, what
        assert message in json.loads(res.stderr)["error"]["message"], (what, res.stderr)
    assert a.cli_json("bundle", "list") == []

    # -- set b.test's bundle on a.test ------------------------------------------------------
    stored = a.cli_json("bundle", "set", "--trust-domain", "b.test", "-f", str(base / "b.json"))
    assert stored["changed"] is True and stored["trust_domain"] == "b.test"
    again = a.cli_json("bundle", "set", "--trust-domain", "spiffe://b.test", "-f",
                       str(base / "b.json"))
    assert again["changed"] is False and again["revision"] == stored["revision"]
    [listed] = a.cli_json("bundle", "list")
    assert listed["trust_domain"] == "b.test" and len(listed["x509_authorities"]) == 1
    assert listed["jwt_authorities"], "b.test's JWT authority travels with its bundle"
    b_roots = x509.load_pem_x509_certificates(b.cli("bundle", "show", check=True).stdout.encode())
    shown = a.cli("bundle", "show", "--trust-domain", "b.test", check=True).stdout
    assert x509.load_pem_x509_certificates(shown.encode()) == b_roots

    # -- entries: one federates, one (another uid) does not -------------------------------
    agent_a, agent_b = _agent(a, base, "a.test"), _agent(b, base, "b.test")  # tokens first
    fed = _entry(a, "a.test", "fed", "--selector", f"unix:uid:{os.getuid()}",
                 "--federates-with", "b.test")
    _entry(a, "a.test", "plain", "--selector", "unix:uid:65534")
    _entry(b, "b.test", "client", "--selector", f"unix:uid:{os.getuid()}")
    try:
        agent_a.start()
        agent_b.start()
        client = WorkloadApiClient(socket_path=f"unix://{agent_a.socket}")
        wait_for("b.test's bundle for the federating entry",
                 lambda: _trust_domains(client) == {"a.test", "b.test"})
        ctx = client.fetch_x509_context()
        bundle_b = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain("b.test"))
        assert bundle_b is not None and list(bundle_b.x509_authorities) == b_roots
        jwt_tds = {b.trust_domain.name for b in client.fetch_jwt_bundles().bundles}
        assert jwt_tds == {"a.test", "b.test"}

        nobody = run([sys.executable, "-c", _AS_NOBODY, f"unix://{agent_a.socket}"],
                     user="nobody", timeout=60, check=True)
        assert json.loads(nobody.stdout) == ["a.test"], "an entry that does not federate "\
            "must not get b.test's bundle"

        # a JWT-SVID minted in b.test validates in a.test (the federated JWT authority)
        client_b = WorkloadApiClient(socket_path=f"unix://{agent_b.socket}")
        token = wait_for("a JWT-SVID from b.test", lambda: client_b.fetch_jwt_svid(
            audience={"a-api"})).token
        validated = client.validate_jwt_svid(token, "a-api")
        assert str(validated.spiffe_id) == "spiffe://b.test/client"
        # ...for its audience only
        with pytest.raises(Exception, match="(?i)audience"):
            client.validate_jwt_svid(token, "someone-else")

        # -- forget b.test: the bundle leaves the workload, its JWT-SVIDs are refused ----
        a.cli_json("bundle", "delete", "--trust-domain", "b.test")
        wait_for("b.test's bundle to leave", lambda: _trust_domains(client) == {"a.test"})
        with pytest.raises(Exception, match="no bundle for trust domain b.test"):
            client.validate_jwt_svid(token, "a-api")
        res = a.cli("bundle", "delete", "--trust-domain", "b.test", "--output", "json")
        assert res.returncode != 0
        assert "no federated bundle for trust domain b.test" in res.stderr

        # setting it again and un-federating the entry: also gone for that workload
        a.cli_json("bundle", "set", "--trust-domain", "b.test", "-f", str(base / "b.json"))
        wait_for("b.test's bundle back", lambda: "b.test" in _trust_domains(client))
        a.cli_json("entry", "update", fed["id"], "--clear", "federates-with")
        wait_for("an entry that stopped federating loses the bundle",
                 lambda: _trust_domains(client) == {"a.test"})
    finally:
        agent_a.stop()
        agent_b.stop()

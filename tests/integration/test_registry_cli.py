"""Registration entries, join tokens and agents through the real CLI and server."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from harness import ServerProcess
from trustmesh.errors import PermissionDenied
from trustmesh.server.registry import Registry
from trustmesh.spiffe.ids import TrustDomain
from trustmesh.store.datastore import Datastore


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "memory", "--signing-workers", "0")


def test_entry_lifecycle(srv: ServerProcess, tmp_path: Path) -> None:
    tok = srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/node1")
    assert tok["spiffe_id"] == "spiffe://example.org/node1" and len(tok["token"]) >= 40
    created = srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1",
                           "--spiffe-id", "spiffe://example.org/ns/web/sa/frontend",
                           "--selector", "unix:uid:1000", "--selector", "unix:gid:1000",
                           "--x509-svid-ttl", "30m", "--label", "team=web")
    assert len(created) == 1
    e = created[0]
    assert e["selectors"] == ["unix:gid:1000", "unix:uid:1000"]
    assert e["x509_svid_ttl"] == 1800 and e["labels"] == {"team": "web"}
    assert e["created_by"].startswith("unix:uid:0")
    shown = srv.cli_json("entry", "show", e["id"])
    assert shown == e
    text = srv.cli("entry", "show", e["id"], check=True).stdout
    assert "Selector      : unix:uid:1000" in text
    updated = srv.cli_json("entry", "update", e["id"], "--selector", "unix:uid:1001")
    assert updated["selectors"] == ["unix:uid:1001"] and updated["revision"] > e["revision"]
    assert updated["x509_svid_ttl"] == 1800  # untouched fields stay
    listed = srv.cli_json("entry", "list", "--parent-id", "spiffe://example.org/node1")
    assert [x["id"] for x in listed] == [e["id"]]
    srv.cli_json("entry", "delete", e["id"])
    assert srv.cli_json("entry", "list") == []
    gone = srv.cli("entry", "show", e["id"])
    assert gone.returncode == 3 and "no entry" in gone.stderr


def test_bulk_create_is_all_or_nothing(srv: ServerProcess, tmp_path: Path) -> None:
    srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/node1")
    good = tmp_path / "entries.yaml"
    good.write_text(
        "- spiffe_id: spiffe://example.org/a\n  parent_id: spiffe://example.org/node1\n"
        "  selectors: [unix:uid:1]\n"
        "---\n"
        "entries:\n"
        "- spiffe-id: spiffe://example.org/b\n  parent-id: spiffe://example.org/a\n"
        "  selectors: [unix:uid:2]\n  dns_names: [b.internal]\n")
    made = srv.cli_json("entry", "create", "-f", str(good))
    assert [m["spiffe_id"] for m in made] == ["spiffe://example.org/a", "spiffe://example.org/b"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "- spiffe_id: spiffe://example.org/c\n  parent_id: spiffe://example.org/node1\n"
        "  selectors: [unix:uid:3]\n"
        "- spiffe_id: spiffe://example.org/d\n  parent_id: spiffe://example.org/node1\n"
        "  selectors: [uid3]\n")
    proc = srv.cli("entry", "create", "-f", str(bad), "--output", "json")
    assert proc.returncode == 2
    err = json.loads(proc.stderr)["error"]
    assert err["field"] == "entries[1].selectors[0]" and "no type" in err["message"]
    assert len(srv.cli_json("entry", "list")) == 2  # c was not stored either
    yaml_err = tmp_path / "broken.yaml"
    yaml_err.write_text("- spiffe_id: [\n")
    proc = srv.cli("entry", "create", "-f", str(yaml_err))
    assert proc.returncode == 2 and "not valid YAML" in proc.stderr


@pytest.mark.parametrize("args,code,match", [
    (["--spiffe-id", "spiffe://example.org/x", "--parent-id", "spiffe://example.org/nowhere",
      "--selector", "unix:uid:1"], 3, "parent spiffe://example.org/nowhere does not exist"),
    (["--spiffe-id", "spiffe://example.org/x/../y", "--parent-id", "spiffe://example.org/n",
      "--selector", "unix:uid:1"], 2, "spiffe_id"),
    (["--spiffe-id", "spiffe://example.org/x", "--parent-id", "spiffe://example.org/n",
      "--selector", "1000"], 2, "has no type"),
])
def test_bad_entries_are_refused(srv: ServerProcess, args: list[str], code: int,
                                 match: str) -> None:
    proc = srv.cli("entry", "create", *args)
    assert proc.returncode == code, proc.stderr
    assert match in proc.stderr
    assert srv.cli_json("entry", "list") == []


def test_duplicate_entries_conflict(srv: ServerProcess) -> None:
    srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/n")
    args = ("entry", "create", "--spiffe-id", "spiffe://example.org/x", "--parent-id",
            "spiffe://example.org/n", "--selector", "unix:uid:1")
    srv.cli_json(*args)
    proc = srv.cli(*args)
    assert proc.returncode == 4 and "same SPIFFE ID, parent and selectors" in proc.stderr


def test_bad_token_requests(srv: ServerProcess) -> None:
    proc = srv.cli("token", "create", "--ttl", "90d")
    assert proc.returncode == 2 and "30 days" in proc.stderr
    proc = srv.cli("token", "create", "--spiffe-id", "spiffe://other.org/n")
    assert proc.returncode == 2 and "not in trust domain" in proc.stderr


def test_join_token_is_consumed_exactly_once_under_concurrency(tmp_path: Path) -> None:
    from trustmesh.clock import FixedClock

    store = Datastore(f"sqlite:///{tmp_path / 'r.sqlite3'}")
    store.migrate()
    clock = FixedClock()
    registries = [Registry(Datastore(store.url), TrustDomain.parse("example.org"), clock)
                  for _ in range(8)]
    tok = registries[0].create_join_token(None, None, "tester")
    wins: list[str] = []
    losses: list[str] = []

    def attempt(reg: Registry) -> None:
        try:
            wins.append(str(reg.consume_join_token(tok.token)))
        except PermissionDenied as exc:
            losses.append(exc.message)

    threads = [threading.Thread(target=attempt, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins == [str(tok.spiffe_id)]
    assert losses == ["this join token was already used"] * 7
    with pytest.raises(PermissionDenied, match="unknown join token"):
        registries[0].consume_join_token("not-a-token")
    late = registries[0].create_join_token(None, None, "tester")
    from datetime import timedelta

    clock.advance(timedelta(minutes=11))
    with pytest.raises(PermissionDenied, match="expired"):
        registries[0].consume_join_token(late.token)
    assert "join_token/" in str(tok.spiffe_id) and tok.token not in str(tok.spiffe_id)

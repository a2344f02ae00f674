"""Our bundle and JWT-SVIDs, read by the real py-spiffe library."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from spiffe import JwtBundle, JwtSvid, TrustDomain, X509Bundle
from test_agent_api import Node, token

from harness import ServerProcess
from trustmesh.proto import agent_pb2


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "memory", "--signing-workers", "0")


def test_bundle_formats_and_py_spiffe_validates_our_jwt_svid(srv: ServerProcess) -> None:
    pem = srv.cli("bundle", "show", check=True).stdout
    x509_bundle = X509Bundle.parse(TrustDomain("example.org"), pem.encode())
    info = srv.cli_json("ca", "show")
    assert len(x509_bundle.x509_authorities) == 1
    spiffe = json.loads(srv.cli("bundle", "show", "--format", "spiffe", check=True).stdout)
    assert spiffe["spiffe_sequence"] >= 1 and spiffe["spiffe_refresh_hint"] > 0
    uses = sorted(k["use"] for k in spiffe["keys"])
    assert uses == ["jwt-svid", "x509-svid"]
    x5c = next(k for k in spiffe["keys"] if k["use"] == "x509-svid")["x5c"]
    assert len(x5c) == 1
    again = json.loads(srv.cli("bundle", "show", "--format", "spiffe", check=True).stdout)
    assert again["spiffe_sequence"] == spiffe["spiffe_sequence"]  # unchanged content
    assert info["trust_anchors_pem"] == pem

    # What the Workload API hands out as the JWT bundle: the jwt-svid keys only.
    jwt_only = {"keys": [k for k in spiffe["keys"] if k["use"] == "jwt-svid"]}
    jwt_bundle = JwtBundle.parse(TrustDomain("example.org"), json.dumps(jwt_only).encode())
    assert len(jwt_bundle.jwt_authorities) == 1

    node = Node(srv)
    node.attest_join_token(token(srv, "spiffe://example.org/node1"))
    entry = srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1",
                         "--spiffe-id", "spiffe://example.org/api", "--selector",
                         "unix:uid:1")[0]
    resp = node.stub().NewJWTSVID(agent_pb2.NewJWTSVIDRequest(
        entry_id=entry["id"], audience=["billing", "audit"]), timeout=10)
    svid = JwtSvid.parse_and_validate(resp.token, jwt_bundle, {"billing"})
    assert str(svid.spiffe_id) == "spiffe://example.org/api"
    assert set(svid.audience) == {"billing", "audit"}
    fetched = node.stub().FetchBundles(agent_pb2.FetchBundlesRequest(), timeout=10)
    assert json.loads(fetched.bundle)["keys"] == spiffe["keys"]

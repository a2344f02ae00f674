"""PeerAuthentication precedence as Istio documents it: workload selector over namespace
over mesh (root namespace), UNSET inheriting from the level above, portLevelMtls for
single ports, the oldest policy winning within a level; trustmesh's default is STRICT."""

from __future__ import annotations

import pytest

from trustmesh.policy.mesh_model import PeerAuthentication, load_mesh_resources
from trustmesh.policy.peerauthn import DEFAULT_MODE, effective_mtls

ROOT = "istio-system"
LABELS = {"app": "reviews", "version": "v1"}


def pa(name: str, ns: str, spec: str) -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
            f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n---\n")


MESH_STRICT = pa("default", ROOT, "{mtls: {mode: STRICT}}")
MESH_PERMISSIVE = pa("default", ROOT, "{mtls: {mode: PERMISSIVE}}")
NS_PERMISSIVE = pa("default", "foo", "{mtls: {mode: PERMISSIVE}}")
NS_DISABLE = pa("default", "foo", "{mtls: {mode: DISABLE}}")
NS_UNSET = pa("default", "foo", "{mtls: {mode: UNSET}}")
WL_DISABLE = pa("reviews", "foo", "{selector: {matchLabels: {app: reviews}}, "
                                  "mtls: {mode: DISABLE}}")
WL_UNSET_PORT = pa("reviews", "foo", "{selector: {matchLabels: {app: reviews}}, "
                                     "portLevelMtls: {9080: {mode: DISABLE}}}")
WL_STRICT_PORT = pa("reviews", "foo", "{selector: {matchLabels: {app: reviews}}, "
                                      "mtls: {mode: STRICT}, portLevelMtls: "
                                      "{'9080': {mode: PERMISSIVE}, '9090': {mode: UNSET}}}")


def mtls(text: str, port: int = 8080, ns: str = "foo", **kw: object) -> tuple[str, str | None]:
    policies = [r for r in load_mesh_resources(text) if isinstance(r, PeerAuthentication)]
    return effective_mtls(policies, ns, LABELS, port, ROOT, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "port", "expected"), [
    # nothing at all: trustmesh's default
    ("", 8080, ("STRICT", None)),
    # one level each
    (MESH_PERMISSIVE, 8080, ("PERMISSIVE", "istio-system/default")),
    (NS_DISABLE, 8080, ("DISABLE", "foo/default")),
    (WL_DISABLE, 8080, ("DISABLE", "foo/reviews")),
    # the most specific level wins
    (MESH_STRICT + NS_PERMISSIVE, 8080, ("PERMISSIVE", "foo/default")),
    (MESH_PERMISSIVE + NS_PERMISSIVE + WL_DISABLE, 8080, ("DISABLE", "foo/reviews")),
    (MESH_STRICT + WL_DISABLE, 8080, ("DISABLE", "foo/reviews")),
    # UNSET inherits from the level above
    (MESH_PERMISSIVE + NS_UNSET, 8080, ("PERMISSIVE", "istio-system/default")),
    (NS_UNSET, 8080, ("STRICT", None)),
    (NS_DISABLE + WL_UNSET_PORT, 8080, ("DISABLE", "foo/default")),
    # portLevelMtls: for that port only; UNSET there inherits the workload's mode
    (NS_DISABLE + WL_UNSET_PORT, 9080, ("DISABLE", "foo/reviews (port 9080)")),
    (MESH_PERMISSIVE + WL_UNSET_PORT, 9080, ("DISABLE", "foo/reviews (port 9080)")),
    (WL_STRICT_PORT, 9080, ("PERMISSIVE", "foo/reviews (port 9080)")),
    (WL_STRICT_PORT, 9090, ("STRICT", "foo/reviews")),
    (WL_STRICT_PORT, 8080, ("STRICT", "foo/reviews")),
    # a namespace policy of another namespace, a selector that does not match
    (pa("default", "bar", "{mtls: {mode: DISABLE}}"), 8080, ("STRICT", None)),
    (pa("other", "foo", "{selector: {matchLabels: {app: ratings}}, mtls: {mode: DISABLE}}"),
     8080, ("STRICT", None)),
    # a selector policy in the root namespace is a workload policy there, not mesh-wide
    (pa("sel", ROOT, "{selector: {matchLabels: {app: reviews}}, mtls: {mode: DISABLE}}"),
     8080, ("STRICT", None)),
    # an empty selector is no selector (namespace-wide)
    (pa("empty", "foo", "{selector: {matchLabels: {}}, mtls: {mode: DISABLE}}"), 8080,
     ("DISABLE", "foo/empty")),
])
def test_precedence(text: str, port: int, expected: tuple[str, str | None]) -> None:
    assert mtls(text, port) == expected


def test_workloads_in_the_root_namespace_take_its_policies() -> None:
    text = MESH_PERMISSIVE + pa("sel", ROOT, "{selector: {matchLabels: {app: reviews}}, "
                                             "mtls: {mode: DISABLE}}")
    assert mtls(text, ns=ROOT) == ("DISABLE", "istio-system/sel")
    assert mtls(MESH_PERMISSIVE, ns=ROOT) == ("PERMISSIVE", "istio-system/default")


def test_within_a_level_the_oldest_policy_wins() -> None:
    first = pa("a-first", "foo", "{mtls: {mode: PERMISSIVE}}")
    second = pa("b-second", "foo", "{mtls: {mode: DISABLE}}")
    # without creation times: the order given is oldest first
    assert mtls(second + first) == ("DISABLE", "foo/b-second")
    assert mtls(first + second) == ("PERMISSIVE", "foo/a-first")
    # with creation times: those decide, whatever the order; equal times go by name
    created = {("foo", "a-first"): 20.0, ("foo", "b-second"): 10.0}
    assert mtls(first + second, created=created) == ("DISABLE", "foo/b-second")
    same = {("foo", "a-first"): 5.0, ("foo", "b-second"): 5.0}
    assert mtls(second + first, created=same) == ("PERMISSIVE", "foo/a-first")
    # a policy whose time is unknown counts as the newest
    assert mtls(first + second, created={("foo", "b-second"): 1.0}) == (
        "DISABLE", "foo/b-second")


def test_the_default_can_be_istios() -> None:
    assert DEFAULT_MODE == "STRICT"
    assert mtls("", default="PERMISSIVE") == ("PERMISSIVE", None)
    assert mtls(NS_UNSET, default="PERMISSIVE") == ("PERMISSIVE", None)
    with pytest.raises(ValueError, match="default mTLS mode"):
        mtls("", default="UNSET")

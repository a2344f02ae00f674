"""The indexed Authorizer agrees with the naive reference on random policies and requests."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.policy.labels import LabelSelector
from trustmesh.policy.rbac import (
    Authorizer,
    Binding,
    BindingKind,
    NaiveAuthorizer,
    PolicyRule,
    RbacObjects,
    Request,
    Role,
    RoleKind,
    RoleRef,
    Subject,
    SubjectKind,
    decode_rbac_documents,
)

USERS = ["u0", "u1", "system:serviceaccount:n0:sa", "system:anonymous"]
GROUPS = ["g0", "g1", "system:authenticated", "system:serviceaccounts:n0", "system:masters"]
NAMESPACES = ["n0", "n1"]
VERBS = ["get", "list", "create", "*"]
API_GROUPS = ["", "apps", "*"]
RESOURCES = ["pods", "pods/log", "*/log", "*", "deployments", "pods/*"]
NAMES = ["a", "b"]
URLS = ["/healthz", "/healthz/*", "*", "/api"]



def _tuple(options: list[str], min_size: int = 1) -> st.SearchStrategy[tuple[str, ...]]:
    return st.lists(st.sampled_from(options), min_size=min_size, max_size=3,
                    unique=True).map(tuple)


resource_rule = st.builds(PolicyRule, verbs=_tuple(VERBS), api_groups=_tuple(API_GROUPS),
                          resources=_tuple(RESOURCES), resource_names=_tuple(NAMES, 0))
url_rule = st.builds(PolicyRule, verbs=_tuple(VERBS), non_resource_urls=_tuple(URLS))
subject = st.one_of(
    st.builds(Subject, st.just(SubjectKind.USER), st.sampled_from(["u0", "u1"])),
    st.builds(Subject, st.just(SubjectKind.GROUP), st.sampled_from(GROUPS[:-1])),
    st.builds(Subject, st.just(SubjectKind.SERVICE_ACCOUNT), st.sampled_from(["sa", "x"]),
              st.sampled_from(NAMESPACES)),
)
label = st.sampled_from([(), (("agg", "yes"),)])


@st.composite
def policies(draw: st.DrawFn) -> RbacObjects:
    roles: list[Role] = []
    for i in range(draw(st.integers(0, 3))):
        aggregated = i == 0 and draw(st.booleans())
        roles.append(Role(
            RoleKind.CLUSTER_ROLE, f"c{i}", "",
            () if aggregated else tuple(draw(st.lists(st.one_of(resource_rule, url_rule),
                                                      max_size=3))),
            draw(label),
            (LabelSelector((("agg", "yes"),)),) if aggregated else None,
        ))
    for ns in NAMESPACES:
        if draw(st.booleans()):
            roles.append(Role(RoleKind.ROLE, "r", ns,
                              tuple(draw(st.lists(resource_rule, max_size=3)))))
    bindings: list[Binding] = []
    for i in range(draw(st.integers(0, 6))):
        ns = draw(st.sampled_from(["", *NAMESPACES]))
        kind = BindingKind.ROLE_BINDING if ns else BindingKind.CLUSTER_ROLE_BINDING
        ref_kind = (draw(st.sampled_from([RoleKind.ROLE, RoleKind.CLUSTER_ROLE])) if ns
                    else RoleKind.CLUSTER_ROLE)
        ref_name = "r" if ref_kind is RoleKind.ROLE else draw(st.sampled_from(
            ["c0", "c1", "c2", "missing"]))
        bindings.append(Binding(kind, f"b{i}", RoleRef(ref_kind, ref_name),
                                tuple(draw(st.lists(subject, max_size=3))), ns))
    return RbacObjects(tuple(roles), tuple(bindings))


@st.composite
def requests(draw: st.DrawFn) -> Request:
    user = draw(st.sampled_from(USERS))
    groups = tuple(draw(st.lists(st.sampled_from(GROUPS[:2] + GROUPS[-1:]), max_size=2,
                                 unique=True)))
    verb = draw(st.sampled_from(["get", "list", "create", "delete"]))
    if draw(st.integers(0, 4)) == 0:
        return Request(user, verb, path=draw(st.sampled_from(
            ["/healthz", "/healthz/etcd", "/api", "/apis"])), groups=groups)
    return Request(
        user, verb,
        resource=draw(st.sampled_from(["pods", "deployments", "secrets"])),
        subresource=draw(st.sampled_from(["", "", "log", "scale"])),
        api_group=draw(st.sampled_from(["", "apps"])),
        name=draw(st.sampled_from(["", "a", "b", "c"])),
        namespace=draw(st.sampled_from(["", *NAMESPACES])),
        groups=groups,
    )


@settings(max_examples=200, deadline=None)
@given(policies(), st.lists(requests(), min_size=1, max_size=8))
def test_indexed_agrees_with_naive(objs: RbacObjects, reqs: list[Request]) -> None:
    fast, slow = Authorizer(objs), NaiveAuthorizer(objs)
    for req in reqs:
        assert fast.authorize(req).to_dict() == slow.authorize(req).to_dict()


@settings(max_examples=100, deadline=None)
@given(policies(), requests())
def test_who_can_agrees_with_can_i(objs: RbacObjects, req: Request) -> None:
    """Every subject who-can names is allowed by can-i when it asks as that subject."""
    authz = Authorizer(objs)
    answer = authz.who_can(req.verb, req.resource, subresource=req.subresource,
                           api_group=req.api_group, name=req.name, namespace=req.namespace,
                           path=req.path)
    for grant in answer.grants:
        s = grant.subject
        if s.kind is SubjectKind.USER:
            asking = Request(s.name, req.verb, req.resource, req.subresource, req.api_group,
                             req.name, req.namespace, req.path)
        elif s.kind is SubjectKind.GROUP:
            asking = Request("someone", req.verb, req.resource, req.subresource, req.api_group,
                             req.name, req.namespace, req.path, (s.name,))
        else:
            asking = Request(f"system:serviceaccount:{s.namespace}:{s.name}", req.verb,
                             req.resource, req.subresource, req.api_group, req.name,
                             req.namespace, req.path)
        assert authz.allowed(asking), (grant, asking)


@settings(max_examples=100, deadline=None)
@given(policies())
def test_manifest_round_trip(objs: RbacObjects) -> None:
    assert decode_rbac_documents(objs.to_dicts()) == objs

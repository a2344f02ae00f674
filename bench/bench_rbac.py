"""RBAC can-i latency: the subject-indexed Authorizer vs a naive scan of every binding.

Generates a synthetic policy with a fixed seed (default 10,000 bindings: 9,000
RoleBindings over 100 namespaces and 1,000 ClusterRoleBindings, to 30
ClusterRoles, one of them aggregated, and 5 Roles per namespace; subjects are
users, team groups and service accounts, plus a few bindings for everyone in
``system:authenticated``). Then it times single ``authorize`` calls on random
requests (users with their groups, service accounts, resource and non-resource
requests, a mix of yes and no) for the indexed Authorizer and, on a subset of
the same requests, for the naive reference that scans every binding; the two
must give the same decisions. Also timed: building the index, and who-can.

Run:    .venv/bin/python bench/bench_rbac.py [--bindings 10000] [--requests 20000]
        [--naive-requests 1000] [--output json]
Smoke:  .venv/bin/python bench/bench_rbac.py --smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trustmesh.policy.labels import LabelSelector  # noqa: E402
from trustmesh.policy.rbac import (  # noqa: E402
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
)

RESOURCES = [("", "pods"), ("", "services"), ("", "configmaps"), ("", "secrets"),
             ("apps", "deployments"), ("apps", "statefulsets"), ("batch", "jobs"),
             ("trustmesh.io", "entries"), ("trustmesh.io", "agents")]
VERB_SETS = [("get", "list", "watch"), ("get", "list", "watch", "create", "update", "delete"),
             ("*",), ("get",)]
VERBS = ["get", "list", "watch", "create", "update", "delete", "patch"]


def _rule(rnd: random.Random) -> PolicyRule:
    picks = rnd.sample(RESOURCES, rnd.randint(1, 3))
    groups = tuple(dict.fromkeys(g for g, _ in picks))
    resources = tuple(dict.fromkeys(r for _, r in picks))
    if rnd.random() < 0.15:
        resources += tuple(f"{r}/status" for r in resources)
    names: tuple[str, ...] = ()
    if rnd.random() < 0.1:
        names = tuple(f"obj{i}" for i in rnd.sample(range(20), 2))
    return PolicyRule(rnd.choice(VERB_SETS), groups, resources, names)


def generate(bindings: int, namespaces: int, seed: int = 11) -> RbacObjects:
    """A reproducible synthetic policy with about ``bindings`` bindings."""
    rnd = random.Random(seed)
    ns_names = [f"ns{i}" for i in range(namespaces)]
    roles: list[Role] = []
    for i in range(30):
        labels = (("aggregate", "view"),) if i % 5 == 0 else ()
        roles.append(Role(RoleKind.CLUSTER_ROLE, f"cr{i}", "",
                          tuple(_rule(rnd) for _ in range(rnd.randint(1, 4))), labels))
    roles.append(Role(RoleKind.CLUSTER_ROLE, "aggregated-view", "", (), (),
                      (LabelSelector((("aggregate", "view"),)),)))
    roles.append(Role(RoleKind.CLUSTER_ROLE, "health", "",
                      (PolicyRule(("get",), non_resource_urls=("/healthz", "/healthz/*")),)))
    for ns in ns_names:
        for j in range(5):
            roles.append(Role(RoleKind.ROLE, f"role{j}", ns,
                              tuple(_rule(rnd) for _ in range(rnd.randint(1, 3)))))
    users = max(10, bindings * 3 // 10)
    teams = max(5, bindings // 100)

    def subjects(ns: str) -> tuple[Subject, ...]:
        out = []
        for _ in range(rnd.randint(1, 3)):
            x = rnd.random()
            if x < 0.6:
                out.append(Subject(SubjectKind.USER, f"user{rnd.randrange(users)}"))
            elif x < 0.85:
                out.append(Subject(SubjectKind.GROUP, f"team{rnd.randrange(teams)}"))
            else:
                out.append(Subject(SubjectKind.SERVICE_ACCOUNT, f"sa{rnd.randrange(10)}",
                                   ns or rnd.choice(ns_names)))
        return tuple(out)

    out: list[Binding] = [
        Binding(BindingKind.CLUSTER_ROLE_BINDING, "health", RoleRef(RoleKind.CLUSTER_ROLE,
                "health"), (Subject(SubjectKind.GROUP, "system:authenticated"),)),
        Binding(BindingKind.CLUSTER_ROLE_BINDING, "everyone-view-entries",
                RoleRef(RoleKind.CLUSTER_ROLE, "cr1"),
                (Subject(SubjectKind.GROUP, "system:authenticated"),)),
    ]
    cluster = bindings // 10
    for i in range(cluster - len(out)):
        role = "aggregated-view" if i % 50 == 0 else f"cr{rnd.randrange(30)}"
        out.append(Binding(BindingKind.CLUSTER_ROLE_BINDING, f"crb{i}",
                           RoleRef(RoleKind.CLUSTER_ROLE, role), subjects("")))
    for i in range(bindings - cluster):
        ns = ns_names[i % namespaces]
        if rnd.random() < 0.5:
            ref = RoleRef(RoleKind.ROLE, f"role{rnd.randrange(5)}")
        else:
            ref = RoleRef(RoleKind.CLUSTER_ROLE, f"cr{rnd.randrange(30)}")
        if i % 500 == 7:
            ref = RoleRef(RoleKind.ROLE, "no-such-role")  # reported, grants nothing
        out.append(Binding(BindingKind.ROLE_BINDING, f"rb{i}", ref, subjects(ns), ns))
    return RbacObjects(tuple(roles), tuple(out))


def make_requests(count: int, bindings: int, namespaces: int, seed: int = 5) -> list[Request]:
    rnd = random.Random(seed)
    users = max(10, bindings * 3 // 10)
    teams = max(5, bindings // 100)
    out = []
    for _ in range(count):
        if rnd.random() < 0.8:
            user = f"user{rnd.randrange(users)}"
            groups = tuple(f"team{rnd.randrange(teams)}" for _ in range(rnd.randint(0, 2)))
        else:
            user = f"system:serviceaccount:ns{rnd.randrange(namespaces)}:sa{rnd.randrange(10)}"
            groups = ()
        if rnd.random() < 0.05:
            out.append(Request(user, "get", path=rnd.choice(["/healthz", "/healthz/etcd",
                                                             "/metrics"]), groups=groups))
            continue
        group, resource = rnd.choice(RESOURCES)
        ns = "" if rnd.random() < 0.1 else f"ns{rnd.randrange(namespaces)}"
        name = f"obj{rnd.randrange(20)}" if rnd.random() < 0.5 else ""
        sub = "status" if rnd.random() < 0.1 else ""
        out.append(Request(user, rnd.choice(VERBS), resource, sub, group, name, ns,
                           groups=groups))
    return out


def _time_each(fn: Any, reqs: list[Request]) -> list[float]:
    """Microseconds per call."""
    out = []
    clock = time.perf_counter_ns
    for req in reqs:
        t0 = clock()
        fn(req)
        out.append((clock() - t0) / 1000)
    return out


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))]

    return {"p50_us": round(pct(0.50), 2), "p99_us": round(pct(0.99), 2),
            "mean_us": round(statistics.fmean(ordered), 2), "max_us": round(ordered[-1], 2),
            "count": len(ordered)}


def run(bindings: int, namespaces: int, requests: int, naive_requests: int) -> dict[str, Any]:
    objs = generate(bindings, namespaces)
    reqs = make_requests(requests, bindings, namespaces)
    t0 = time.perf_counter()
    authz = Authorizer(objs)
    build_s = time.perf_counter() - t0
    naive = NaiveAuthorizer(objs)
    # Warm up both, then check they agree on the naive subset.
    subset = reqs[:naive_requests]
    for req in subset:
        a, b = authz.authorize(req), naive.authorize(req)
        if a.to_dict() != b.to_dict():
            raise SystemExit(f"indexed and naive disagree on {req}: {a} vs {b}")
    indexed = _summary(_time_each(authz.authorize, reqs))
    slow = _summary(_time_each(naive.authorize, subset))
    allowed = sum(1 for r in reqs if authz.allowed(r))
    who = reqs[: min(20, len(reqs))]
    who_samples = _time_each(lambda r: authz.who_can(
        r.verb, r.resource, subresource=r.subresource, api_group=r.api_group, name=r.name,
        namespace=r.namespace, path=r.path), who)
    return {
        "bindings": len(objs.bindings),
        "roles": len(objs.roles),
        "namespaces": namespaces,
        "requests": len(reqs),
        "allowed_fraction": round(allowed / len(reqs), 3),
        "build_ms": round(build_s * 1000, 1),
        "indexed": indexed,
        "naive": slow,
        "naive_over_indexed_p50": round(slow["p50_us"] / indexed["p50_us"], 1),
        "who_can": _summary(who_samples),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bindings", type=int, default=10_000)
    parser.add_argument("--namespaces", type=int, default=100)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--naive-requests", type=int, default=1_000)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; finishes in seconds")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    args = parser.parse_args()
    if args.smoke:
        args.bindings, args.namespaces, args.requests, args.naive_requests = 300, 10, 500, 100
    result = run(args.bindings, args.namespaces, args.requests, args.naive_requests)
    result["smoke"] = bool(args.smoke)
    result["python"] = platform.python_version()
    if args.output == "json":
        print(json.dumps(result, indent=2))
        return
    tag = " [smoke]" if args.smoke else ""
    ix, nv = result["indexed"], result["naive"]
    print(f"RBAC can-i{tag}: {result['bindings']} bindings, {result['roles']} roles, "
          f"{result['namespaces']} namespaces; {result['allowed_fraction']:.0%} of requests "
          "allowed")
    print(f"index build          {result['build_ms']:>10.1f} ms")
    print(f"indexed can-i        p50 {ix['p50_us']:>9.2f} us  p99 {ix['p99_us']:>9.2f} us  "
          f"mean {ix['mean_us']:>9.2f} us  ({ix['count']} requests)")
    print(f"naive scan can-i     p50 {nv['p50_us']:>9.2f} us  p99 {nv['p99_us']:>9.2f} us  "
          f"mean {nv['mean_us']:>9.2f} us  ({nv['count']} requests)")
    print(f"naive/indexed p50    {result['naive_over_indexed_p50']:>10.1f} x")
    wc = result["who_can"]
    print(f"who-can              p50 {wc['p50_us']:>9.2f} us  p99 {wc['p99_us']:>9.2f} us  "
          f"({wc['count']} requests)")


if __name__ == "__main__":
    main()

"""Control plane: compile 1,000 AuthorizationPolicies, and time apply -> enforced on N Envoys.

Part 1 (in process): load 1,000 AuthorizationPolicies (plus the registry) and
compile every sidecar's listeners, routes and clusters, next to compiling the
same mesh with a single policy in the same run (the ratio shows how cost grows
with policy count).

Part 2 (real processes): a server, an agent and N Envoy sidecars connected
over ADS (each its own workload and SPIFFE ID; as root each sidecar runs as
its own uid). A policy is applied with ``trustmesh apply``; the figure is the
time from the apply call until every Envoy has accepted the new route
configurations that carry HTTP RBAC (its admin ``rds.*.update_success``
counters moved), then until calls through one sidecar are actually refused.
Listener updates during that change are counted too: a policy change should
cause none.

Run:  .venv/bin/python bench/bench_mesh_control.py [--policies 1000 --sidecars 50]
Smoke (CI): .venv/bin/python bench/bench_mesh_control.py --smoke --output json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from trustmesh.mesh import plan as mesh_plan  # noqa: E402
from trustmesh.mesh.demo import MeshLab, free_loopback_port  # noqa: E402
from trustmesh.mesh.envoy.compile import (  # noqa: E402
    compile_clusters,
    compile_listeners,
    compile_routes,
)
from trustmesh.policy import mesh_model  # noqa: E402


def registry_yaml(n: int, base_port: int) -> str:
    docs = []
    for i in range(n):
        docs.append(f"""\
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: w{i}, namespace: ns{i % 10}, labels: {{app: w{i}, tier: t{i % 5}}}}}
spec:
  serviceAccount: w{i}
  ports: [{{name: http, port: {base_port + 2 * i}, protocol: HTTP,
            sidecarPort: {base_port + 2 * i + 1}}}]
""")
    return "---\n".join(docs)


def policies_yaml(n: int) -> str:
    docs = []
    for i in range(n):
        action = "DENY" if i % 7 == 0 else "ALLOW"
        docs.append(f"""\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: p{i}, namespace: ns{i % 10}}}
spec:
  selector: {{matchLabels: {{tier: t{i % 5}}}}}
  action: {action}
  rules:
  - from: [{{source: {{principals: ["example.org/ns/ns{i % 10}/sa/w{i % 50}"]}}}}]
    to: [{{operation: {{methods: ["GET", "POST"], paths: ["/api/v{i}/*"]}}}}]
""")
    return "---\n".join(docs)


def compile_all(text: str, workloads: int) -> tuple[float, int]:
    start = time.perf_counter()
    resources = mesh_model.load_mesh_resources(text)
    size = 0
    for i in range(workloads):
        w = mesh_plan.find_workload(resources, f"ns{i % 10}/w{i}")
        assert w is not None
        p = mesh_plan.plan_sidecar(resources, w, "example.org", "istio-system")
        for msg in (*compile_listeners(p), *compile_routes(p), *compile_clusters(p)):
            size += msg.ByteSize()
    return time.perf_counter() - start, size


def part1(policies: int, workloads: int) -> dict[str, object]:
    reg = registry_yaml(workloads, 20000)
    one, _ = compile_all(reg + "---\n" + policies_yaml(1), workloads)
    many, size = compile_all(reg + "---\n" + policies_yaml(policies), workloads)
    return {"policies": policies, "sidecars_compiled": workloads,
            "compile_1_policy_s": round(one, 4), "compile_s": round(many, 4),
            "ratio_vs_1_policy": round(many / one, 1), "config_bytes": size}


def _counter_sum(admin_port: int, pattern: str) -> int:
    query = urllib.parse.urlencode({"filter": pattern})
    url = f"http://127.0.0.1:{admin_port}/stats?{query}"
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
        lines = resp.read().decode().splitlines()
    return sum(int(line.rsplit(":", 1)[1]) for line in lines if line.strip())


def lds_successes(admin_port: int) -> int:
    return _counter_sum(admin_port, r"^listener_manager\.lds\.update_success$")


def rds_successes(admin_port: int) -> int:
    """Accepted route updates over all of the sidecar's connection managers."""
    return _counter_sum(admin_port, r"\.rds\..*\.update_success$")


def part2(sidecars: int, policies: int) -> dict[str, object]:
    lab = MeshLab()
    extra: list[tuple[str, int]] = []
    try:
        lab.start()
        # more sidecars: workloads x0..xN with their own identities
        base = Path(lab.base)
        reg = []
        node = f"spiffe://{lab.trust_domain}/node/demo"
        for i in range(sidecars - 2):
            name = f"x{i}"
            uid = 62000 + i
            sel = (["--selector", f"unix:uid:{uid}"] if lab.as_root else
                   ["--selector", f"unix:uid:{os.geteuid()}"])
            lab.cli("entry", "create", "--spiffe-id", lab.spiffe_id(name), "--parent-id", node,
                    *sel)
            app, side = free_loopback_port(), free_loopback_port()
            reg.append(f"""\
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}
spec:
  serviceAccount: {name}
  ports: [{{name: http, port: {app}, protocol: HTTP, sidecarPort: {side}}}]
""")
            extra.append((name, uid))
        if reg:
            lab.apply("---\n".join(reg))
        admin_ports = [lab.ports["echo_admin"], lab.ports["client_admin"]]
        for name, uid in extra:
            port = free_loopback_port()
            lab.ports[f"{name}_admin"] = port
            work = base / f"sidecar-{name}"
            work.mkdir(exist_ok=True)
            if lab.as_root:
                os.chown(work, uid, uid)
            cmd = [sys.executable, "-m", "trustmesh.cli.main", "sidecar", "run", "--workload",
                   f"default/{name}", "--server-address", f"127.0.0.1:{lab.ports['agent_api']}",
                   "--agent-socket", str(lab.agent_socket), "--admin-address",
                   f"127.0.0.1:{port}", "--work-dir", str(work), "--concurrency", "1"]
            if not lab.as_root:
                cmd += ["--svid", lab.spiffe_id(name)]
            lab._spawn(f"sidecar-{name}", cmd, uid=uid if lab.as_root else None)
            admin_ports.append(port)
        deadline = time.monotonic() + 180
        client = lab.ports["client_admin"]
        while time.monotonic() < deadline:
            try:  # every sidecar with an inbound port also has its routes
                if all(lds_successes(p) >= 1 and (p == client or rds_successes(p) >= 1)
                       for p in admin_ports):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise SystemExit("not every sidecar got its listeners and routes")
        # the client sidecar has no inbound port: the new policies do not change its config
        admin_ports.remove(client)
        before = {p: rds_successes(p) for p in admin_ports}
        lds_before = {p: lds_successes(p) for p in [*admin_ports, client]}
        text = policies_yaml(policies).replace("namespace: ns", "namespace: other")
        text += "---\n" + """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: default}
spec: {}
"""
        start = time.perf_counter()
        lab.apply(text)
        applied = time.perf_counter() - start
        pending = set(admin_ports)
        while pending and time.perf_counter() - start < 120:
            pending = {p for p in pending if rds_successes(p) <= before[p]}
            time.sleep(0.01)
        all_updated = time.perf_counter() - start
        denied, took = lab.wait_status("GET", "/", 403, timeout=30)
        listener_updates = sum(lds_successes(p) - n for p, n in lds_before.items())
        return {"sidecars": len(admin_ports) + 1, "sidecars_to_update": len(admin_ports),
                "policies_applied": policies + 1,
                "apply_call_s": round(applied, 3),
                "apply_to_all_envoys_updated_s": round(all_updated, 3),
                "not_updated": len(pending),
                "listener_updates": listener_updates,
                "apply_to_enforced_s": round(applied + took, 3),
                "enforced_status": denied.status}
    except BaseException:
        print(f"logs kept in {lab.base}", file=sys.stderr)
        lab.keep = True
        raise
    finally:
        lab.stop()
        if not getattr(lab, "keep", False):
            shutil.rmtree(lab.base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--policies", type=int, default=1000)
    parser.add_argument("--sidecars", type=int, default=50)
    parser.add_argument("--compile-workloads", type=int, default=50)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--output", choices=["text", "json"], default="text")
    args = parser.parse_args()
    if args.smoke:
        args.policies, args.sidecars, args.compile_workloads = 20, 3, 5
    result = {"smoke": args.smoke, "compile": part1(args.policies, args.compile_workloads),
              "push": part2(args.sidecars, args.policies)}
    if args.output == "json":
        print(json.dumps(result, indent=2))
    else:
        c, p = result["compile"], result["push"]
        print(f"compile {c['policies']} policies for {c['sidecars_compiled']} sidecars: "  # type: ignore[index]
              f"{c['compile_s']:.3f} s ({c['ratio_vs_1_policy']}x one policy)")  # type: ignore[index]
        print(f"apply -> all {p['sidecars']} Envoys updated: "  # type: ignore[index]
              f"{p['apply_to_all_envoys_updated_s']:.3f} s; enforced after "  # type: ignore[index]
              f"{p['apply_to_enforced_s']:.3f} s; listener updates: "  # type: ignore[index]
              f"{p['listener_updates']}")  # type: ignore[index]


if __name__ == "__main__":
    main()

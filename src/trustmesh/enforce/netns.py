"""Run a cluster's pods as Linux network namespaces on one host and enforce its policies.

The lab (needs root, ``ip`` from iproute2 and ``nft``):

* ``tmnp-<lab>-host``: a namespace holding only the bridge ``br0`` and the
  host ends of the veth pairs; it has no address and no route, so the
  machine's own network is never part of the lab;
* ``tmnp-<lab>-<hash>``: one namespace per pod, ``eth0`` (the pod end of a
  veth pair) carrying the pod's ``status.podIP`` as a /32 with a default
  route out of ``eth0``, so every pod reaches every other over the bridge
  whatever subnets their addresses are in;
* in each pod namespace the table compiled by :mod:`trustmesh.enforce.nft`.

Nothing is created in the root namespace: links are created from inside the
host namespace, addresses and routes from inside the pod namespaces.
:func:`lab_down` finds everything by its name prefix, so it also cleans up
after a crash. Deciding (:func:`plan_lab`, :func:`compare`) is pure; the rest
runs commands.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from trustmesh.enforce.nft import compile_pod
from trustmesh.errors import (
    ConfigError,
    Conflict,
    InternalError,
    InvalidInput,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from trustmesh.policy.netpol import IndexedEvaluator, Reachability
from trustmesh.policy.netpol_model import Cluster, Pod, Protocol

__all__ = [
    "DEFAULT_SUBNET",
    "PREFIX",
    "CheckResult",
    "Difference",
    "Lab",
    "LabPod",
    "apply_policies",
    "check",
    "compare",
    "declared_ports",
    "lab_down",
    "lab_netns",
    "lab_up",
    "listeners",
    "plan_lab",
    "probe",
    "require_tools",
]

PREFIX = "tmnp-"
DEFAULT_SUBNET = ipaddress.IPv4Network("10.0.0.0/8")
BRIDGE = "br0"
_LAB_NAME = re.compile(r"^[a-z0-9]{1,12}$")
_PROBE_SCRIPT = Path(__file__).with_name("_probe.py")
_CMD_TIMEOUT = 20.0
_MAX_PARALLEL = 32  # prober processes at once
_MAX_PROBES = 20_000  # connections per check, all pairs and ports together


# ---------------------------------------------------------------------------
# The plan (pure)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class LabPod:
    pod: Pod
    netns: str
    veth: str  # host end, in the host namespace
    ip: ipaddress.IPv4Address


@dataclass(frozen=True)
class Lab:
    name: str
    host_netns: str
    pods: tuple[LabPod, ...]

    def by_key(self, key: str) -> LabPod:
        for lp in self.pods:
            if lp.pod.key == key:
                return lp
        raise NotFound(f"pod {key!r} is not part of lab {self.name!r}")


def _check_lab_name(name: str) -> str:
    if not _LAB_NAME.match(name):
        raise InvalidInput(f"lab name {name!r}: 1-12 lowercase letters or digits", field="lab")
    return name


def plan_lab(
    cluster: Cluster, name: str = "dev", subnet: ipaddress.IPv4Network = DEFAULT_SUBNET
) -> Lab:
    """Namespace and link names for every pod; refuses addresses the lab may not use.

    Each pod needs exactly one IPv4 ``status.podIP`` inside ``subnet``, which
    must itself be a private range, and no two pods may share an address.
    """
    _check_lab_name(name)
    if not subnet.is_private or subnet.prefixlen < 8:
        raise InvalidInput(
            f"{subnet} is not a private test range (use part of 10.0.0.0/8, 172.16.0.0/12 "
            "or 192.168.0.0/16)",
            field="subnet",
        )
    if not cluster.pods:
        raise InvalidInput("the cluster model has no pods")
    seen: dict[ipaddress.IPv4Address, str] = {}
    pods = []
    for pod in cluster.pods:
        if len(pod.ips) != 1 or not isinstance(pod.ips[0], ipaddress.IPv4Address):
            raise InvalidInput(
                f"pod {pod.key} needs exactly one IPv4 status.podIP for the lab, has "
                f"{', '.join(map(str, pod.ips)) or 'none'}",
                field="status.podIP",
            )
        ip = pod.ips[0]
        if ip not in subnet or ip in (subnet.network_address, subnet.broadcast_address):
            raise InvalidInput(f"pod {pod.key}: {ip} is not a host address in {subnet}",
                               field="status.podIP")
        if ip in seen:
            raise InvalidInput(f"pods {seen[ip]} and {pod.key} both have {ip}",
                               field="status.podIP")
        seen[ip] = pod.key
        digest = hashlib.sha256(pod.key.encode()).hexdigest()[:10]
        pods.append(LabPod(pod, f"{PREFIX}{name}-{digest}", f"v{digest}", ip))
    return Lab(name, f"{PREFIX}{name}-host", tuple(pods))


def declared_ports(cluster: Cluster) -> list[tuple[int, Protocol]]:
    """Every (port, protocol) some container of the cluster declares, sorted."""
    return sorted({(cp.number, cp.protocol) for pod in cluster.pods for cp in pod.ports},
                  key=lambda pp: (pp[1].value, pp[0]))


@dataclass(frozen=True)
class Difference:
    source: str
    destination: str
    port: int
    protocol: Protocol
    expected: bool
    observed: bool

    def describe(self) -> str:
        def word(ok: bool) -> str:
            return "connects" if ok else "blocked"
        return (f"{self.source} -> {self.destination} {self.protocol.value}/{self.port}: "
                f"policy says {word(self.expected)}, kernel {word(self.observed)}")


@dataclass(frozen=True)
class CheckResult:
    expected: tuple[Reachability, ...]
    observed: tuple[Reachability, ...]
    differences: tuple[Difference, ...]
    probes: int
    seconds: float

    @property
    def ok(self) -> bool:
        return not self.differences

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "probes": self.probes,
            "seconds": round(self.seconds, 3),
            "differences": [
                {"source": d.source, "destination": d.destination, "port": d.port,
                 "protocol": d.protocol.value, "expected": d.expected, "observed": d.observed}
                for d in self.differences
            ],
            "observed": {f"{r.protocol.value}/{r.port}": r.to_dict() for r in self.observed},
        }


def compare(expected: Reachability, observed: Reachability) -> list[Difference]:
    """Pairs on which the evaluator and the kernel disagree."""
    keys = [p.key for p in expected.pods]
    if [p.key for p in observed.pods] != keys:
        raise InternalError("matrices over different pods cannot be compared")
    out = []
    for i, (want, got) in enumerate(zip(expected.rows, observed.rows, strict=True)):
        for j in range(len(keys)):
            if (want >> j & 1) != (got >> j & 1):
                out.append(Difference(keys[i], keys[j], expected.port, expected.protocol,
                                      bool(want >> j & 1), bool(got >> j & 1)))
    return out


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def require_tools() -> None:
    """Fail clearly unless we are root and ``ip`` and ``nft`` are installed."""
    if os.geteuid() != 0:
        raise PermissionDenied(
            "the NetworkPolicy lab needs root (it creates network namespaces and "
            "loads nftables rules)"
        )
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("conntrack", "conntrack")):
        if _find_tool(tool) is None:
            raise ConfigError(f"{tool} not found: install {package} (apt-get install {package})")


def _find_tool(name: str) -> str | None:
    # root's PATH usually has /usr/sbin, sudo'ed or service environments may not
    found = shutil.which(name)
    if found is None and Path(f"/usr/sbin/{name}").exists():
        found = f"/usr/sbin/{name}"
    return found


def _tool(name: str) -> str:
    return _find_tool(name) or name


def _run(argv: Sequence[str], stdin: str | None = None, timeout: float = _CMD_TIMEOUT) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - fixed tools, arguments we built
            list(argv), input=stdin, capture_output=True, text=True, timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{' '.join(argv)} did not finish in {timeout:.0f}s") from None
    if done.returncode != 0:
        raise InternalError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.returncode}")
    return done.stdout


def _in_netns(netns: str, *argv: str) -> list[str]:
    return [_tool("ip"), "netns", "exec", netns, *argv]


def lab_netns(name: str | None = None) -> list[str]:
    """Namespaces of lab ``name`` (every trustmesh lab when None)."""
    if name is not None:
        _check_lab_name(name)
    prefix = PREFIX if name is None else f"{PREFIX}{name}-"
    out = _run([_tool("ip"), "netns", "list"])
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix))


def lab_down(name: str | None = None) -> list[str]:
    """Delete the namespaces of lab ``name`` (all labs when None), and what runs in them.

    Deleting a namespace deletes its links (veth pairs, bridge) and its
    nftables tables; processes still inside (listeners of an interrupted
    check) are killed first so the namespaces really go away.
    """
    removed = []
    for netns in lab_netns(name):
        try:
            pids = _run([_tool("ip"), "netns", "pids", netns]).split()
        except InternalError:
            pids = []
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        _run([_tool("ip"), "netns", "delete", netns])
        removed.append(netns)
    return removed


def apply_policies(lab: Lab, cluster: Cluster) -> None:
    """Load (or atomically replace) every pod's ruleset in its namespace."""
    for lp in lab.pods:
        _run(_in_netns(lp.netns, _tool("nft"), "-f", "-"), stdin=compile_pod(cluster, lp.pod).text)
        # Flows the old rules admitted must not outlive them: "established" replies are
        # only allowed for connections the current policy allows.
        _run(_in_netns(lp.netns, _tool("conntrack"), "-F"))


def lab_up(lab: Lab, cluster: Cluster) -> None:
    """Create the namespaces, bridge and veth pairs, address the pods, load the policies.

    On any failure everything created so far is removed again.
    """
    require_tools()
    existing = lab_netns(lab.name)
    if existing:
        raise Conflict(f"lab {lab.name!r} already exists ({len(existing)} namespaces); "
                       f"run `trustmesh netlab down --lab {lab.name}` first")
    ip = _tool("ip")
    try:
        _run([ip, "netns", "add", lab.host_netns])
        for lp in lab.pods:
            _run([ip, "netns", "add", lp.netns])
        host_batch = [f"link add {BRIDGE} type bridge", f"link set {BRIDGE} up"]
        for lp in lab.pods:
            host_batch += [
                f"link add {lp.veth} type veth peer name eth0 netns {lp.netns}",
                f"link set {lp.veth} master {BRIDGE}",
                f"link set {lp.veth} up",
            ]
        _run([ip, "-n", lab.host_netns, "-batch", "-"], stdin="\n".join(host_batch) + "\n")
        for lp in lab.pods:
            pod_batch = [
                "link set lo up",
                f"addr add {lp.ip}/32 dev eth0",
                "link set eth0 up",
                "route add default dev eth0",
            ]
            _run([ip, "-n", lp.netns, "-batch", "-"], stdin="\n".join(pod_batch) + "\n")
        apply_policies(lab, cluster)
    except BaseException:
        lab_down(lab.name)
        raise


# ---------------------------------------------------------------------------
# Listeners and probes
# ---------------------------------------------------------------------------


@contextmanager
def listeners(lab: Lab, ports: Sequence[tuple[int, Protocol]],
              ready_timeout: float = 10.0) -> Iterator[None]:
    """Run an echo listener for every (port, protocol) in every pod namespace."""
    for _, proto in ports:
        if proto is Protocol.SCTP:
            raise InvalidInput("the lab probes TCP and UDP; SCTP is compiled but not probed",
                               field="protocol")
    specs = [f"{proto.value}/{port}" for port, proto in ports]
    procs: list[subprocess.Popen[str]] = []
    try:
        for lp in lab.pods:
            procs.append(subprocess.Popen(  # noqa: S603
                _in_netns(lp.netns, sys.executable, str(_PROBE_SCRIPT), "serve", lp.pod.key,
                          *specs),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            ))
        deadline = time.monotonic() + ready_timeout
        for lp, proc in zip(lab.pods, procs, strict=True):
            if proc.stdout is None:
                raise InternalError("listener started without a stdout pipe")
            wait = max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([proc.stdout], [], [], wait)
            line = proc.stdout.readline() if ready else ""
            if line.strip() != "ready":
                proc.kill()
                err = proc.stderr.read() if proc.stderr and proc.poll() is not None else ""
                raise Unavailable(f"listener in {lp.netns} ({lp.pod.key}) did not start: "
                                  f"{err.strip()[-300:] or 'timed out'}")
        yield
    finally:
        for proc in procs:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()  # the listener exits when stdin closes
                except OSError:
                    pass
        for proc in procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def probe(lab: Lab, ports: Sequence[tuple[int, Protocol]],
          timeout: float = 1.0) -> list[Reachability]:
    """Try every (source, destination, port) for real; listeners must be running.

    One prober process per source pod tries all its targets in parallel, and
    the probers themselves run in parallel, so a check costs about one
    ``timeout`` per round of at most 64 targets per source.
    """
    n = len(lab.pods)
    total = n * n * len(ports)
    if total > _MAX_PROBES:
        raise InvalidInput(f"{total} probes is more than the limit of {_MAX_PROBES}; "
                           "give --port/--protocol or fewer pods")
    targets = [(j, port, proto) for j in range(n) for port, proto in ports]
    request = json.dumps({
        "timeout": timeout,
        "targets": [[str(lab.pods[j].ip), proto.value, port, lab.pods[j].pod.key]
                    for j, port, proto in targets],
    })
    limit = -(-len(targets) // 64) * (timeout + 1) + 15  # 64 targets at once per prober

    def talk(proc: subprocess.Popen[str]) -> tuple[str, str]:
        try:
            return proc.communicate(request, timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()

    results: list[list[bool]] = []
    for start in range(0, n, _MAX_PARALLEL):
        batch = lab.pods[start:start + _MAX_PARALLEL]
        procs = [
            subprocess.Popen(  # noqa: S603
                _in_netns(lp.netns, sys.executable, str(_PROBE_SCRIPT), "probe"),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True,
            )
            for lp in batch
        ]
        try:
            # every prober waits for its request on stdin: feed them all at once
            with ThreadPoolExecutor(max_workers=len(procs)) as pool:
                answers = list(pool.map(talk, procs))
            for lp, proc, (out, err) in zip(batch, procs, answers, strict=True):
                if proc.returncode != 0:
                    raise Unavailable(
                        f"prober in {lp.netns} failed or timed out: {err.strip()[-300:]}"
                    )
                results.append([bool(x) for x in json.loads(out)])
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    pods = tuple(lp.pod for lp in lab.pods)
    matrices = []
    for port, proto in ports:
        rows = []
        for src in range(n):
            mask = 0
            for k, (j, tport, tproto) in enumerate(targets):
                if tport == port and tproto == proto and results[src][k]:
                    mask |= 1 << j
            rows.append(mask)
        matrices.append(Reachability(pods, port, proto, tuple(rows)))
    return matrices


def check(lab: Lab, cluster: Cluster, ports: Sequence[tuple[int, Protocol]],
          timeout: float = 1.0) -> CheckResult:
    """Probe real connectivity in a running lab and compare it with the evaluator."""
    missing = sorted(set(p.netns for p in lab.pods) - set(lab_netns(lab.name)))
    if missing:
        raise NotFound(f"lab {lab.name!r} is not up ({len(missing)} pod namespaces missing); "
                       "run `trustmesh netlab up` first")
    if [p.pod.key for p in lab.pods] != [p.key for p in cluster.pods]:
        raise InternalError("the lab was planned from another cluster model")
    if not ports:
        raise InvalidInput("no container declares a port; give --port", field="port")
    started = time.monotonic()
    with listeners(lab, ports):
        observed = probe(lab, ports, timeout)
    evaluator = IndexedEvaluator(cluster)
    expected = [evaluator.matrix(port, proto) for port, proto in ports]
    diffs = [d for want, got in zip(expected, observed, strict=True) for d in compare(want, got)]
    return CheckResult(tuple(expected), tuple(observed), tuple(diffs),
                       len(lab.pods) ** 2 * len(ports), time.monotonic() - started)

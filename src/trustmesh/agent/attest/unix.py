"""The unix workload attestor: selectors from the kernel's word, not the caller's.

The Workload API reads the caller's pid/uid/gid with ``SO_PEERCRED``; this
module turns them into selectors from /proc: ``unix:uid:N``, ``unix:gid:N``
(primary and supplementary groups), ``unix:user:NAME``, ``unix:group:NAME``,
``unix:path:EXE``, ``unix:sha256:DIGEST`` and, for processes in a container,
``unix:container-id:ID``. A pid can be reused between the ``SO_PEERCRED`` read
and the /proc reads; the process start time is read before and after, and a
change (or a vanished process) refuses the attestation.
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trustmesh.errors import PermissionDenied

__all__ = ["PeerCredentials", "attest_unix", "container_id_from_cgroup", "parse_status",
           "start_time_from_stat"]

_CONTAINER_ID = re.compile(r"([0-9a-f]{64})")


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def start_time_from_stat(stat: str) -> int:
    """Field 22 of /proc/<pid>/stat (start time in clock ticks); the comm field may hold
    spaces and parentheses, so split after its last ')'."""
    rest = stat.rsplit(")", 1)[1].split()
    return int(rest[19])


def parse_status(status: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(uids, gids + supplementary groups) from /proc/<pid>/status."""
    uids: tuple[int, ...] = ()
    gids: list[int] = []
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uids = tuple(int(v) for v in value.split())
        elif key == "Gid":
            gids += [int(v) for v in value.split()[:1]]
        elif key == "Groups":
            gids += [int(v) for v in value.split()]
    return uids, tuple(dict.fromkeys(gids))


def container_id_from_cgroup(cgroup: str) -> str | None:
    """The 64-hex container id docker, containerd, CRI-O and podman put in cgroup paths."""
    for line in cgroup.splitlines():
        path = line.rsplit(":", 1)[-1]
        for part in reversed(path.split("/")):
            m = _CONTAINER_ID.search(part)
            if m:
                return m.group(1)
    return None


_NAME_TTL = 30.0
_names: dict[tuple[str, int], tuple[float, str | None]] = {}


def _name_of(kind: str, ident: int) -> str | None:
    """User or group name, remembered for a short while (NSS lookups are not free)."""
    now = time.monotonic()
    hit = _names.get((kind, ident))
    if hit is not None and now - hit[0] < _NAME_TTL:
        return hit[1]
    try:
        name: str | None = (pwd.getpwuid(ident).pw_name if kind == "user"
                            else grp.getgrgid(ident).gr_name)
    except KeyError:
        name = None
    if len(_names) > 4096:
        _names.clear()
    _names[(kind, ident)] = (now, name)
    return name


_digests: dict[tuple[int, int, int, int], str] = {}
_digest_lock = threading.Lock()


def _exe_digest(exe: str, proc_exe: Path) -> str | None:
    """SHA-256 of the executable, cached by (device, inode, mtime, size)."""
    try:
        st = os.stat(proc_exe)
    except OSError:
        return None
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    with _digest_lock:
        cached = _digests.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    try:
        with open(proc_exe, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    except OSError:
        return None
    digest = h.hexdigest()
    with _digest_lock:
        if len(_digests) > 4096:
            _digests.clear()
        _digests[key] = digest
    return digest


def attest_unix(peer: PeerCredentials, proc: Path = Path("/proc")) -> frozenset[str]:
    """Selectors for the process behind a socket peer; PermissionDenied if it changed."""
    base = proc / str(peer.pid)
    try:
        before = start_time_from_stat((base / "stat").read_text())
    except (OSError, ValueError, IndexError):
        raise PermissionDenied(f"the calling process {peer.pid} is gone") from None
    selectors = {f"unix:uid:{peer.uid}", f"unix:gid:{peer.gid}"}
    try:
        _, gids = parse_status((base / "status").read_text())
    except OSError:
        gids = ()
    for gid in gids:
        selectors.add(f"unix:gid:{gid}")
    user = _name_of("user", peer.uid)
    if user:
        selectors.add(f"unix:user:{user}")
    for gid in {peer.gid, *gids}:
        group = _name_of("group", gid)
        if group:
            selectors.add(f"unix:group:{group}")
    try:
        exe = os.readlink(base / "exe")
    except OSError:
        exe = ""
    if exe:
        selectors.add(f"unix:path:{exe}")
        digest = _exe_digest(exe, base / "exe")
        if digest:
            selectors.add(f"unix:sha256:{digest}")
    try:
        cid = container_id_from_cgroup((base / "cgroup").read_text())
    except OSError:
        cid = None
    if cid:
        selectors.add(f"unix:container-id:{cid}")
    try:
        after = start_time_from_stat((base / "stat").read_text())
    except (OSError, ValueError, IndexError):
        raise PermissionDenied(f"the calling process {peer.pid} exited during "
                               "attestation") from None
    if after != before:
        raise PermissionDenied(f"pid {peer.pid} was reused during attestation")
    return frozenset(selectors)

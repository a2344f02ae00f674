"""The unix attestor: /proc parsing, selectors from the kernel, pid reuse refused."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from trustmesh.agent.attest import unix
from trustmesh.agent.attest.unix import (
    PeerCredentials,
    attest_unix,
    container_id_from_cgroup,
    parse_status,
    start_time_from_stat,
)
from trustmesh.errors import PermissionDenied

CID = "3f0a" * 16


def test_start_time_survives_odd_process_names() -> None:
    stat = "4242 (my ) (weird) proc) S 1 4242 4242 0 -1 4194560 " + " ".join(
        str(i) for i in range(10, 60))
    # fields after ')' : state=S is field 3; start time is field 22 -> index 19 after ')'
    assert start_time_from_stat(stat) == int(stat.rsplit(")", 1)[1].split()[19])


def test_status_gives_primary_and_supplementary_groups() -> None:
    status = "Name:\tx\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t100\t100\t100\nGroups:\t4 24 100\n"
    uids, gids = parse_status(status)
    assert uids[0] == 1000 and gids == (100, 4, 24)


@pytest.mark.parametrize("cgroup", [
    f"0::/system.slice/docker-{CID}.scope\n",
    f"0::/kubepods/besteffort/pod1234/{CID}\n",
    f"12:pids:/docker/{CID}\n",
    f"0::/machine.slice/libpod-{CID}.scope/container\n",
])
def test_container_ids_from_common_runtimes(cgroup: str) -> None:
    assert container_id_from_cgroup(cgroup) == CID


def test_no_container_id_on_the_host() -> None:
    assert container_id_from_cgroup("0::/user.slice/user-0.slice/session-1.scope\n") is None


def test_attesting_this_process() -> None:
    sel = attest_unix(PeerCredentials(os.getpid(), os.getuid(), os.getgid()))
    assert f"unix:uid:{os.getuid()}" in sel and f"unix:gid:{os.getgid()}" in sel
    exe = os.path.realpath(sys.executable)
    assert f"unix:path:{exe}" in sel
    assert any(s.startswith("unix:sha256:") and len(s) == len("unix:sha256:") + 64
               for s in sel)
    assert "unix:user:root" in sel if os.getuid() == 0 else True


def test_a_vanished_process_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied, match="gone"):
        attest_unix(PeerCredentials(999999, 0, 0), proc=tmp_path)


def test_pid_reuse_during_attestation_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    times = iter([100, 200])
    monkeypatch.setattr(unix, "start_time_from_stat", lambda _stat: next(times))
    with pytest.raises(PermissionDenied, match="reused"):
        attest_unix(PeerCredentials(os.getpid(), os.getuid(), os.getgid()))

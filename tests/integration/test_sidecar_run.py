"""``trustmesh sidecar run`` becomes a real Envoy with the worker count it was asked for.

No server or agent is needed for this: Envoy starts, serves its admin port and
keeps retrying ADS and SDS, which is enough to read its options. (Envoy starts
its worker threads only once its first configuration is in; the end-to-end
test counts them on sidecars that have one.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import free_port, stop_process
from trustmesh.mesh.sidecar import SidecarOptions

pytestmark = pytest.mark.slow


class _Sidecar:
    def __init__(self, work: Path, *flags: str) -> None:
        self.admin_port = free_port()
        self.log = work / "sidecar.log"
        self._out = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trustmesh.cli.main", "sidecar", "run",
             "--workload", "default/echo", "--server-address", f"127.0.0.1:{free_port()}",
             "--agent-socket", str(work / "no-agent.sock"),
             "--admin-address", f"127.0.0.1:{self.admin_port}", "--work-dir", str(work),
             "--log-level", "error", *flags], stdout=self._out, stderr=self._out)

    def server_info(self) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(  # noqa: S310 - loopback admin port
                        f"http://127.0.0.1:{self.admin_port}/server_info", timeout=2) as r:
                    info: dict[str, Any] = json.loads(r.read())
                    return info
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(self.log.read_text(errors="replace")) from None
                time.sleep(0.1)

    def is_envoy(self) -> bool:
        """The sidecar command execs Envoy: the process started is Envoy itself."""
        return Path(f"/proc/{self.proc.pid}/exe").resolve().name == "envoy"

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)
        self._out.close()


@pytest.fixture
def start_sidecar(tmp_path: Path) -> Iterator[Callable[..., _Sidecar]]:
    started: list[_Sidecar] = []

    def start(*flags: str) -> _Sidecar:
        work = tmp_path / f"sidecar-{len(started)}"
        work.mkdir()
        sidecar = _Sidecar(work, *flags)
        started.append(sidecar)
        return sidecar

    try:
        yield start
    finally:
        for s in started:
            s.stop()


@pytest.mark.parametrize("workers", [1, 3])
def test_concurrency_sets_the_envoy_workers(start_sidecar: Callable[..., _Sidecar],
                                            workers: int) -> None:
    sidecar = start_sidecar("--concurrency", str(workers))
    info = sidecar.server_info()
    assert info["command_line_options"]["concurrency"] == workers
    assert sidecar.is_envoy()


def test_without_the_flag_the_sidecar_runs_the_default_workers(
        start_sidecar: Callable[..., _Sidecar]) -> None:
    sidecar = start_sidecar()
    info = sidecar.server_info()
    default = SidecarOptions.concurrency
    assert info["command_line_options"]["concurrency"] == default

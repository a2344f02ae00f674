"""Shared fixtures: real processes on loopback, always cleaned up."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness import ServerProcess


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start ``trustmesh server run`` processes; every one is stopped at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, name: str = "server", env: dict[str, str] | None = None,
              port: int | None = None) -> ServerProcess:
        srv = ServerProcess(tmp_path / name, args, env=env, port=port)
        started.append(srv)
        return srv.start()

    try:
        yield start
    finally:
        for srv in started:
            srv.stop()


from pg import postgres_server  # noqa: E402,F401 - a fixture shared by the suite

"""A real, private PostgreSQL server for tests (Debian's postgresql package).

``postgres_server`` (session scope) runs initdb in a temporary directory,
starts postgres on a free loopback port (as the ``postgres`` user when the
tests run as root, since PostgreSQL refuses to run as root), and always stops
it. ``new_database(name)`` gives each test an empty database of its own.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

__all__ = ["PostgresServer", "postgres_server"]


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                   key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if found:
        return Path(found[-1]).parent
    exe = shutil.which("postgres")
    if exe:
        return Path(exe).parent
    pytest.fail("no PostgreSQL server binary found: run scripts/setup.sh --test "
                "(Debian package postgresql)", pytrace=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.bindir = _bindir()
        self.data = base / "data"
        self.sockdir = base / "sock"
        self.port = _free_port()
        self.user = "postgres"
        self._run_as: list[str] = []
        if os.getuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                pw = pwd.getpwnam("nobody")
            self._run_as = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}",
                            "--clear-groups", "--"]
            self._owner = (pw.pw_uid, pw.pw_gid)
        else:
            self._owner = (os.getuid(), os.getgid())
        self._log = base / "postgres.log"

    def _cmd(self, *args: str) -> list[str]:
        return [*self._run_as, *args]

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for d in (self.base, self.sockdir):
            d.mkdir(exist_ok=True)
            os.chown(d, *self._owner)
        os.chmod(self.base, 0o755)
        init = subprocess.run(
            self._cmd(str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user, "-A",
                      "trust", "--no-sync", "-E", "UTF8"),
            capture_output=True, text=True, timeout=120)
        if init.returncode != 0:
            pytest.fail(f"initdb failed: {init.stderr or init.stdout}", pytrace=False)
        log = open(self._log, "wb")  # noqa: SIM115 - closed in stop()
        self._logf = log
        os.chown(self._log, *self._owner)
        self.proc = subprocess.Popen(
            self._cmd(str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
                      "-c", "listen_addresses=127.0.0.1", "-k", str(self.sockdir),
                      "-c", "fsync=off", "-c", "synchronous_commit=off",
                      "-c", "full_page_writes=off", "-c", "max_connections=200"),
            stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with psycopg.connect(self.dsn("postgres"), connect_timeout=1):
                    return
            except psycopg.OperationalError:
                time.sleep(0.1)
        tail = self._log.read_text(errors="replace")[-3000:]
        self.stop()
        pytest.fail(f"PostgreSQL did not start:\n{tail}", pytrace=False)

    def dsn(self, db: str) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.user} dbname={db}"

    def url(self, db: str) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{db}"

    def new_database(self, name: str) -> str:
        with psycopg.connect(self.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "stop",
                                     "-m", "fast", "-w"), capture_output=True, timeout=60)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        logf = getattr(self, "_logf", None)
        if logf is not None:
            logf.close()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    # Not under pytest's tmp dir: that one is root-only, and postgres runs as its own user.
    base = Path(tempfile.mkdtemp(prefix="trustmesh-pg-"))
    server = PostgresServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)

"""A real, private PostgreSQL server for the tests.

``postgres_server`` (session scope) runs ``initdb`` in a temporary directory,
starts ``postgres`` on a free port on 127.0.0.1 (plus a Unix socket in a private
directory), waits until it accepts connections and always stops it again, so no
server process outlives the test session. ``new_database(name)`` creates an
empty database and returns its URL, so each test or module can have its own.

The server binaries come from Debian's ``postgresql`` package (the newest
``/usr/lib/postgresql/N/bin``), else ``pg_config --bindir``, else ``PATH``. When
none is found the fixture fails and says to run ``scripts/setup.sh --test``.

PostgreSQL refuses to run as root: under root, initdb and postgres run as the
``postgres`` account (``nobody`` if there is none) through ``setpriv`` (or
``runuser``), in a directory owned by that account.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from trustmesh.mesh.demo import free_loopback_port

__all__ = [
    "PostgresServer",
    "PostgresTools",
    "find_tools",
    "postgres_server",
    "require_tools",
    "running_postgres",
]

SETUP_HINT = "run scripts/setup.sh --test (it installs the Debian postgresql package)"
HOST = "127.0.0.1"
SUPERUSER = "postgres"
START_TIMEOUT = 30.0  # seconds until the server must accept connections
STOP_TIMEOUT = 15.0  # seconds for a fast shutdown before the server is killed
_PORT_ATTEMPTS = 3  # the free port can be taken between picking it and binding it
_DB_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes, with the ".s.PGSQL.NNNNN" file name
_SETTINGS = {
    "listen_addresses": HOST,
    # A throwaway server: durability buys nothing and costs time.
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",
}


# -- finding the binaries ------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresTools:
    postgres: Path
    initdb: Path
    pg_ctl: Path | None  # optional: without it the server is stopped with SIGINT


def _tools_in(bindir: Path) -> PostgresTools | None:
    postgres, initdb, pg_ctl = (bindir / name for name in ("postgres", "initdb", "pg_ctl"))
    if not (os.access(postgres, os.X_OK) and os.access(initdb, os.X_OK)):
        return None
    return PostgresTools(postgres, initdb, pg_ctl if os.access(pg_ctl, os.X_OK) else None)


def _version_key(bindir: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin -> (version, ...)
    return tuple(int(n) for n in re.findall(r"\d+", Path(bindir).parent.name))


def find_tools(lib_root: str = "/usr/lib/postgresql",
               path: str | None = None) -> PostgresTools | None:
    """The newest Debian server binaries, else ``pg_config --bindir``'s, else ``PATH``'s.

    ``path`` replaces ``$PATH`` for the last two look-ups (for tests of this function).
    """
    bindirs = glob.glob(os.path.join(glob.escape(lib_root), "*", "bin"))
    for bindir in sorted(bindirs, key=_version_key, reverse=True):
        if tools := _tools_in(Path(bindir)):
            return tools
    pg_config = shutil.which("pg_config", path=path)
    if pg_config:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.strip()
            if out and (tools := _tools_in(Path(out))):
                return tools
    postgres = shutil.which("postgres", path=path)
    initdb = shutil.which("initdb", path=path)
    if postgres and initdb:
        pg_ctl = shutil.which("pg_ctl", path=path)
        return PostgresTools(Path(postgres), Path(initdb), Path(pg_ctl) if pg_ctl else None)
    return None


def require_tools(lib_root: str = "/usr/lib/postgresql",
                  path: str | None = None) -> PostgresTools:
    """Like `find_tools`, but a missing server fails the test (it does not skip it)."""
    tools = find_tools(lib_root, path)
    if tools is None:
        pytest.fail(f"no PostgreSQL server binaries (postgres, initdb) in {lib_root}/*/bin, "
                    f"pg_config --bindir or PATH: {SETUP_HINT}", pytrace=False)
    return tools


# -- running as an unprivileged account ----------------------------------------------------


@dataclass(frozen=True)
class _Account:
    name: str
    uid: int
    gid: int


def _server_account() -> _Account | None:
    """The account to run the server as, or None to run it as ourselves (not root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        return _Account(name, pw.pw_uid, pw.pw_gid)
    pytest.fail("running as root, but there is neither a 'postgres' nor a 'nobody' account "
                "to run PostgreSQL as (it refuses to run as root)", pytrace=False)


def _launcher(account: _Account | None, *, die_with_parent: bool) -> list[str]:
    """The command prefix that runs a program as ``account``.

    With ``die_with_parent``, the program gets SIGINT (a fast shutdown for postgres) if
    this process dies without running its teardown (SIGKILL, SIGTERM).
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        cmd = [setpriv]
        if account is not None:
            cmd += [f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups"]
        if die_with_parent:
            cmd.append("--pdeathsig=SIGINT")
        return [*cmd, "--"]
    if account is None:
        return []
    runuser = shutil.which("runuser")
    if runuser:
        return [runuser, "-u", account.name, "--"]
    pytest.fail("running as root needs setpriv or runuser (Debian package util-linux) to "
                "start PostgreSQL as an unprivileged account", pytrace=False)


def _child_env() -> dict[str, str]:
    # No PG* variables from the caller's environment; C messages so the log can be matched.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


# -- the server ----------------------------------------------------------------------------


class PostgresServer:
    """One private PostgreSQL server; see `running_postgres` for the usual way to get one.

    ``url`` / ``dsn`` point at the ``postgres`` database as the ``postgres`` superuser,
    over TCP on 127.0.0.1 (``socket_dir`` holds the Unix socket too).
    """

    def __init__(self, base: Path, tools: PostgresTools, account: _Account | None,
                 socket_dir: Path | None = None) -> None:
        self.base = base
        self.tools = tools
        self.account = account
        self.data_dir = base / "data"
        self.socket_dir = socket_dir or base / "sock"
        self.log_path = base / "postgres.log"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    # connection strings

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``postgres`` database."""
        return self.url_for("postgres")

    @property
    def dsn(self) -> str:
        """psycopg connection string of the ``postgres`` database."""
        return self.dsn_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql+psycopg://{SUPERUSER}@{HOST}:{self.port}/{database}"

    def dsn_for(self, database: str) -> str:
        return f"host={HOST} port={self.port} user={SUPERUSER} dbname={database}"

    def new_database(self, name: str) -> str:
        """Create an empty database ``name`` and return its SQLAlchemy URL.

        Names are plain identifiers (letters, digits, ``_``; at most 63); an existing
        name raises ``psycopg.errors.DuplicateDatabase``.
        """
        if not _DB_NAME.fullmatch(name):
            raise ValueError(f"database name must be a plain identifier, not {name!r}")
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    # lifecycle

    @property
    def pid(self) -> int | None:
        """Process id of the postmaster while it runs (None before start / after stop)."""
        return self._proc.pid if self._proc is not None else None

    def _owned(self, path: Path) -> Path:
        if self.account is not None:
            os.chown(path, self.account.uid, self.account.gid)
        return path

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"

    def _initdb(self) -> None:
        self._owned(self.base)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._owned(self.socket_dir)
        cmd = [*_launcher(self.account, die_with_parent=False), str(self.tools.initdb),
               "-D", str(self.data_dir), "-U", SUPERUSER, "--auth=trust", "--encoding=UTF8",
               "--locale=C", "--no-sync"]
        res = subprocess.run(cmd, capture_output=True, text=True, env=_child_env(),
                             timeout=120, check=False)
        if res.returncode != 0:
            pytest.fail(f"initdb failed ({res.returncode}): {' '.join(cmd)}\n"
                        f"{res.stdout}{res.stderr}", pytrace=False)
        # Trust, but only for local connections (the server listens on 127.0.0.1 only).
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("# written by tests/pg.py\n"
                       "local all all trust\n"
                       f"host  all all {HOST}/32 trust\n")

    def _spawn(self) -> subprocess.Popen[bytes]:
        self.port = free_loopback_port()
        cmd = [*_launcher(self.account, die_with_parent=True), str(self.tools.postgres),
               "-D", str(self.data_dir), "-p", str(self.port), "-k", str(self.socket_dir)]
        for key, value in _SETTINGS.items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log:
            self._owned(self.log_path)
            # A session of its own: the teardown can kill the postmaster with its backends.
            return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=_child_env(),
                                    start_new_session=True)

    def _wait_ready(self, proc: subprocess.Popen[bytes], deadline: float) -> str | None:
        """None once the server accepts connections, else why it will not."""
        last = "no connection attempt"
        while True:
            if proc.poll() is not None:
                return f"postgres exited with status {proc.returncode}"
            try:
                with psycopg.connect(self.dsn, connect_timeout=2) as conn:
                    conn.execute("SELECT 1")
                return None
            except psycopg.OperationalError as exc:
                last = str(exc).strip()
            if time.monotonic() > deadline:
                return (f"postgres did not accept connections within {START_TIMEOUT:.0f} s "
                        f"(last error: {last})")
            time.sleep(0.05)

    def start(self) -> PostgresServer:
        """initdb, start postgres and wait until it accepts connections (or fail)."""
        if self._proc is not None:
            raise RuntimeError("PostgreSQL server already started")
        self._initdb()
        deadline = time.monotonic() + START_TIMEOUT
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            self._proc = self._spawn()
            problem = self._wait_ready(self._proc, deadline)
            if problem is None:
                return self
            tail = self._log_tail()
            self.stop()
            port_taken = "could not bind" in tail or "Address already in use" in tail
            if not (port_taken and attempt < _PORT_ATTEMPTS and time.monotonic() < deadline):
                pytest.fail(f"PostgreSQL ({self.tools.postgres}) did not start on "
                            f"{HOST}:{self.port}: {problem}\n--- server log "
                            f"({self.log_path}), last lines ---\n{tail}", pytrace=False)
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Fast shutdown (pg_ctl stop -m fast), then SIGKILL to the server's process group.

        Idempotent; safe to call whether or not the server ever came up.
        """
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                self._request_fast_shutdown(proc)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=STOP_TIMEOUT)
        finally:
            if proc.poll() is None:
                # Still running and not reaped, so its process group id is still its own.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)

    def _request_fast_shutdown(self, proc: subprocess.Popen[bytes]) -> None:
        if self.tools.pg_ctl is not None:
            cmd = [*_launcher(self.account, die_with_parent=False), str(self.tools.pg_ctl),
                   "stop", "-D", str(self.data_dir), "-m", "fast", "-w",
                   "-t", str(int(STOP_TIMEOUT))]
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                res = subprocess.run(cmd, capture_output=True, env=_child_env(),
                                     timeout=STOP_TIMEOUT + 5, check=False)
                if res.returncode == 0:
                    return
        # No pg_ctl, or it could not do it: SIGINT is the postmaster's fast shutdown.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)


def _make_dirs(factory: pytest.TempPathFactory,
               account: _Account | None) -> tuple[Path, Path | None, list[Path]]:
    """(base dir, socket dir if not under base, dirs to remove at the end)."""
    if account is None:
        base = factory.mktemp("postgres")
    else:
        # pytest's temporary root is private to root (0700), where the server account
        # cannot reach it: use a directory of the server account's own instead.
        base = Path(tempfile.mkdtemp(prefix="trustmesh-pg-"))
    cleanup = [base]
    socket_dir = None
    if len(str(base / "sock")) > _SOCKET_PATH_MAX - len("/.s.PGSQL.65535"):
        socket_dir = Path(tempfile.mkdtemp(prefix="tm-pg-", dir="/tmp"))
        if account is not None:
            os.chown(socket_dir, account.uid, account.gid)
        cleanup.append(socket_dir)
    return base, socket_dir, cleanup


@contextlib.contextmanager
def running_postgres(factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A started `PostgresServer`; stopped and its files removed on leaving the block."""
    tools = require_tools()
    account = _server_account()
    base, socket_dir, cleanup = _make_dirs(factory, account)
    server = PostgresServer(base, tools, account, socket_dir)
    try:
        yield server.start()
    finally:
        try:
            server.stop()
        finally:
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """A private PostgreSQL server for the whole session (see the module docstring)."""
    with running_postgres(tmp_path_factory) as server:
        yield server

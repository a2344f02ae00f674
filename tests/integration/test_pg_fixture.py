"""Self-test of the ``postgres_server`` fixture (tests/pg.py): a real, private server."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pg import HOST, PostgresServer, find_tools, require_tools, running_postgres

pytestmark = pytest.mark.postgres

_names = (f"pgfixture{n}" for n in itertools.count())

_metadata = sa.MetaData()
_items = sa.Table(
    "items", _metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
)


@pytest.fixture
def engine(postgres_server: PostgresServer) -> Iterator[sa.Engine]:
    eng = sa.create_engine(postgres_server.new_database(next(_names)))
    try:
        yield eng
    finally:
        eng.dispose()


def test_urls_point_at_a_private_loopback_server(postgres_server: PostgresServer) -> None:
    url = sa.make_url(postgres_server.url)
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.username) == (HOST, postgres_server.port, "postgres")
    with psycopg.connect(postgres_server.dsn) as conn:
        settings = dict(conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN "
            "('listen_addresses', 'fsync', 'unix_socket_directories')").fetchall())
    assert settings == {"listen_addresses": HOST, "fsync": "off",
                        "unix_socket_directories": str(postgres_server.socket_dir)}
    # Never as root: PostgreSQL refuses, so the fixture drops to another account.
    assert Path(f"/proc/{postgres_server.pid}").stat().st_uid != 0 or os.geteuid() != 0


def test_sqlalchemy_create_insert_read_back(engine: sa.Engine) -> None:
    _metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.insert(_items), [{"name": "alpha"}, {"name": "beta"}])
    with engine.connect() as conn:
        rows = conn.execute(sa.select(_items.c.name).order_by(_items.c.id)).scalars().all()
    assert rows == ["alpha", "beta"]


def test_new_databases_are_isolated(postgres_server: PostgresServer) -> None:
    url_a = postgres_server.new_database(next(_names))
    url_b = postgres_server.new_database(next(_names))
    assert url_a != url_b
    a, b = sa.create_engine(url_a), sa.create_engine(url_b)
    try:
        assert sa.inspect(a).get_table_names() == []
        _metadata.create_all(a)
        with a.begin() as conn:
            conn.execute(sa.insert(_items), {"name": "only in a"})
        assert sa.inspect(a).get_table_names() == ["items"]
        assert sa.inspect(b).get_table_names() == []
        _metadata.create_all(b)
        with b.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(_items)).scalar() == 0
    finally:
        a.dispose()
        b.dispose()


def test_new_database_rejects_duplicates_and_odd_names(postgres_server: PostgresServer) -> None:
    name = next(_names)
    postgres_server.new_database(name)
    with pytest.raises(psycopg.errors.DuplicateDatabase):
        postgres_server.new_database(name)
    with pytest.raises(ValueError, match="plain identifier"):
        postgres_server.new_database('x"; DROP DATABASE postgres; --')


def test_rolled_back_transaction_leaves_nothing(engine: sa.Engine) -> None:
    _metadata.create_all(engine)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), engine.begin() as conn:
        conn.execute(sa.insert(_items), {"name": "never"})
        assert conn.execute(sa.select(sa.func.count()).select_from(_items)).scalar() == 1
        raise Boom
    with engine.connect() as conn:
        trans = conn.begin()
        conn.execute(sa.insert(_items), {"name": "also never"})
        trans.rollback()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(_items)).scalar() == 0


def test_missing_server_binaries_fail_not_skip(tmp_path: Path) -> None:
    assert find_tools(lib_root=str(tmp_path / "none"), path=str(tmp_path)) is None
    with pytest.raises(pytest.fail.Exception, match=r"scripts/setup\.sh --test"):
        require_tools(lib_root=str(tmp_path / "none"), path=str(tmp_path))


def test_stop_leaves_no_server_process(tmp_path_factory: pytest.TempPathFactory) -> None:
    with running_postgres(tmp_path_factory) as server:
        pid = server.pid
        assert pid is not None
        conn = psycopg.connect(server.dsn)
        backend = conn.info.backend_pid
        base = server.base
    try:
        for gone in (pid, backend):
            with pytest.raises(ProcessLookupError):
                os.kill(gone, 0)
        assert not base.exists()
        server.stop()  # idempotent
    finally:
        conn.close()

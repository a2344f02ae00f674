"""The agent's core loop against a real server: attest, sync, sign, rotate, survive outages."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from harness import ServerProcess
from trustmesh.agent.app import Agent
from trustmesh.config import AgentConfig
from trustmesh.errors import ConfigError, PermissionDenied


@pytest.fixture
def srv(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--key-manager", "disk", "--signing-workers", "0")


def agent_config(srv: ServerProcess, tmp_path: Path, token: str | None) -> AgentConfig:
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(httpx.get(f"{srv.base_url}/ca/bundle.pem").content)
    return AgentConfig(data_dir=tmp_path / "agent", trust_bundle=bundle,
                       server_address=f"127.0.0.1:{srv.agent_port}",
                       attest_address=f"127.0.0.1:{srv.attest_port}", join_token=token,
                       socket=tmp_path / "agent" / "api.sock")


def test_agent_attests_syncs_and_signs(srv: ServerProcess, tmp_path: Path) -> None:
    tok = srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/node1")["token"]
    srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1", "--spiffe-id",
                 "spiffe://example.org/web", "--selector", "unix:uid:1000",
                 "--x509-svid-ttl", "10m")

    async def scenario() -> None:
        agent = Agent(agent_config(srv, tmp_path, tok))
        node = await agent.establish_node()
        assert node.spiffe_id == "spiffe://example.org/node1"
        key_file = tmp_path / "agent" / "node.key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        await agent.sync_once()
        matched = agent.cache.svids_for(["unix:uid:1000", "unix:gid:5"], time.time())
        assert [s.spiffe_id for s in matched] == ["spiffe://example.org/web"]
        assert agent.cache.svids_for(["unix:uid:1001"], time.time()) == []
        first = matched[0]
        # nothing to do on the next round: no re-download, no re-signing
        gen = agent.cache.generation
        await agent.sync_once()
        assert agent.cache.generation == gen
        assert agent.cache.svids_for(["unix:uid:1000"], time.time())[0] is first
        # half-way through the SVID's life it is renewed with a fresh key
        agent.clock = lambda: first.not_before + 7 * 60  # notBefore is backdated 60 s
        await agent.sync_once()
        renewed = agent.cache.svids_for(["unix:uid:1000"], agent.clock())[0]
        assert renewed.chain[0].serial_number != first.chain[0].serial_number
        assert renewed.key.public_key() != first.key.public_key()
        await agent.client.close()

    asyncio.run(scenario())


def test_restarted_agent_needs_no_token(srv: ServerProcess, tmp_path: Path) -> None:
    tok = srv.cli_json("token", "create")["token"]

    async def scenario() -> None:
        first = Agent(agent_config(srv, tmp_path, tok))
        node = await first.establish_node()
        await first.client.close()
        again = Agent(agent_config(srv, tmp_path, None))  # no token this time
        renewed = await again.establish_node()
        assert renewed.spiffe_id == node.spiffe_id
        assert renewed.chain[0].serial_number != node.chain[0].serial_number
        await again.client.close()

    asyncio.run(scenario())


def test_first_start_without_token_is_a_clear_error(srv: ServerProcess, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--join-token"):
        asyncio.run(Agent(agent_config(srv, tmp_path, None)).establish_node())


def test_agent_keeps_serving_while_the_server_is_down(srv: ServerProcess,
                                                      tmp_path: Path) -> None:
    tok = srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/node1")["token"]
    srv.cli_json("entry", "create", "--parent-id", "spiffe://example.org/node1", "--spiffe-id",
                 "spiffe://example.org/web", "--selector", "unix:uid:1000")

    async def scenario() -> None:
        agent = Agent(agent_config(srv, tmp_path, tok))
        await agent.establish_node()
        await agent.sync_once()
        srv.stop()
        stop = asyncio.Event()
        task = asyncio.create_task(agent.run(stop))
        await asyncio.sleep(1.5)
        assert not agent.server_reachable
        assert agent.cache.svids_for(["unix:uid:1000"], time.time())  # still served
        stop.set()
        await task
        await agent.client.close()

    asyncio.run(scenario())


def test_evicted_agent_is_refused(srv: ServerProcess, tmp_path: Path) -> None:
    tok = srv.cli_json("token", "create", "--spiffe-id", "spiffe://example.org/node1")["token"]

    async def attest() -> None:
        agent = Agent(agent_config(srv, tmp_path, tok))
        await agent.establish_node()
        await agent.client.close()

    asyncio.run(attest())
    srv.cli_json("agent", "evict", "spiffe://example.org/node1")

    async def restart() -> None:
        agent = Agent(agent_config(srv, tmp_path, None))
        with pytest.raises(PermissionDenied, match="evicted"):
            await agent.establish_node()
        await agent.client.close()

    asyncio.run(restart())

"""Who is on the other end of an agent socket: the kernel's word (SO_PEERCRED), never
the caller's. Shared by the Workload API and SDS; free of generated protobuf modules so
either service can import it without registering the other's descriptors."""

from __future__ import annotations

import socket
import struct
from typing import Any

from grpclib import GRPCError
from grpclib.const import Status
from grpclib.server import Stream

from trustmesh.agent.attest.unix import PeerCredentials

__all__ = ["peer_credentials"]

_UCRED = struct.Struct("3i")


def peer_credentials(stream: Stream[Any, Any]) -> PeerCredentials:
    """pid, uid and gid of the process that opened this stream's Unix socket connection."""
    transport = getattr(stream.peer, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        raise GRPCError(Status.PERMISSION_DENIED, "the caller's credentials are unknown")
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid, uid, gid)

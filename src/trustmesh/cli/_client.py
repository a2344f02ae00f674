"""A thin client of the server's local admin API (JSON over the admin Unix socket)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import httpx

from trustmesh.config import default_home
from trustmesh.errors import PermissionDenied, Unavailable, error_from_code

__all__ = ["AdminClient", "socket_option"]


def socket_option(fn: Any) -> Any:
    return click.option(
        "--socket",
        "socket_path",
        type=click.Path(dir_okay=False, path_type=Path, readable=False),
        envvar="TRUSTMESH_ADMIN_SOCKET",
        default=None,
        help="Admin socket of the server  [default: $TRUSTMESH_HOME/server/admin.sock]",
    )(fn)


class AdminClient:
    def __init__(self, socket_path: Path | None, timeout: float = 30.0) -> None:
        self.socket_path = socket_path or default_home() / "server" / "admin.sock"
        self._client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket_path)),
            base_url="http://trustmesh-admin",
            timeout=timeout,
        )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            present = self.socket_path.exists()
        except PermissionError:
            raise PermissionDenied(
                f"cannot reach {self.socket_path}: permission denied (the admin socket is "
                "for root and the server's user only)") from None
        if not present:
            raise Unavailable(
                f"no admin socket at {self.socket_path}: is `trustmesh server run` running "
                "with this data directory? (set --socket or TRUSTMESH_ADMIN_SOCKET)"
            )
        try:
            resp = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            cause = exc.__cause__ or exc
            if isinstance(cause, PermissionError) or "Permission denied" in str(cause):
                raise PermissionDenied(
                    f"cannot open {self.socket_path}: permission denied (the admin socket "
                    "is for root and the server's user only)"
                ) from None
            raise Unavailable(f"cannot reach the server at {self.socket_path}: {exc}") from None
        try:
            body = resp.json()
        except ValueError:
            raise Unavailable(f"the server answered HTTP {resp.status_code} without JSON"
                              ) from None
        if resp.status_code >= 400:
            err = body.get("error", {}) if isinstance(body, dict) else {}
            raise error_from_code(err.get("code", "internal"),
                                  err.get("message", f"HTTP {resp.status_code}"),
                                  err.get("field"))
        return body

    def close(self) -> None:
        self._client.close()

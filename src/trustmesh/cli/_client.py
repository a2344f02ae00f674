"""A thin client of the server's local admin API (JSON over the admin Unix socket)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import click
import httpx

from trustmesh.config import default_home
from trustmesh.errors import InvalidInput, PermissionDenied, Unavailable, error_from_code

__all__ = ["AdminClient", "socket_option"]


_REMOTE = "trustmesh.remote"


def _remember(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    ctx.meta.setdefault(_REMOTE, {})[param.name] = value
    return value


def _is_server_svid(der: bytes) -> bool:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return len(uris) == 1 and uris[0].startswith("spiffe://") and uris[0].endswith(
        "/trustmesh/server") and uris[0].count("/") == 4


def socket_option(fn: Any) -> Any:
    """How a command reaches the server: the local admin socket (default), or the
    remote admin API over HTTPS with a client certificate (--server)."""
    options = [
        click.option(
            "--socket", "socket_path",
            type=click.Path(dir_okay=False, path_type=Path, readable=False),
            envvar="TRUSTMESH_ADMIN_SOCKET", default=None,
            help="Admin socket of a local server  [default: $TRUSTMESH_HOME/server/admin.sock]"),
        click.option("--server", "server_url", envvar="TRUSTMESH_SERVER", default=None,
                     expose_value=False, callback=_remember,
                     help="Remote admin API, e.g. https://127.0.0.1:8443 (needs --client-cert, "
                          "--client-key and --ca-bundle); RBAC decides what you may do."),
        click.option("--client-cert", envvar="TRUSTMESH_CLIENT_CERT", default=None,
                     expose_value=False, callback=_remember,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="PEM client certificate (chain) for --server."),
        click.option("--client-key", envvar="TRUSTMESH_CLIENT_KEY", default=None,
                     expose_value=False, callback=_remember,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="PEM key of --client-cert."),
        click.option("--ca-bundle", envvar="TRUSTMESH_CA_BUNDLE", default=None,
                     expose_value=False, callback=_remember,
                     type=click.Path(dir_okay=False, path_type=Path),
                     help="Trust bundle (PEM) that the server's certificate chains to."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _remote_settings() -> dict[str, Any]:
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(_REMOTE, {})) if ctx is not None else {}


class AdminClient:
    def __init__(self, socket_path: Path | None, timeout: float = 30.0) -> None:
        self.socket_path = socket_path or default_home() / "server" / "admin.sock"
        remote = _remote_settings()
        self.server_url: str | None = remote.get("server_url")
        if self.server_url:
            cert, key, ca = (remote.get("client_cert"), remote.get("client_key"),
                             remote.get("ca_bundle"))
            if not (cert and key and ca):
                raise InvalidInput("--server needs --client-cert, --client-key and --ca-bundle")
            try:
                ctx = ssl.create_default_context(cafile=str(ca))
                # The server's certificate is an X509-SVID: its chain is checked against
                # the bundle, and its SPIFFE ID (not a host name) says it is the server.
                ctx.check_hostname = False
                ctx.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                raise InvalidInput(f"cannot load the client certificate, key or CA bundle: "
                                   f"{exc}") from None
            self._client = httpx.Client(base_url=self.server_url, verify=ctx, timeout=timeout)
        else:
            self._client = httpx.Client(
                transport=httpx.HTTPTransport(uds=str(self.socket_path)),
                base_url="http://trustmesh-admin",
                timeout=timeout,
            )

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.server_url:
            return self._remote_request(method, path, **kwargs)
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
        return self._decode(resp)

    def _remote_request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = self._client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach {self.server_url}: {exc}") from None
        stream = resp.extensions.get("network_stream")
        ssl_object = stream.get_extra_info("ssl_object") if stream is not None else None
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        if not der or not _is_server_svid(der):
            raise PermissionDenied(f"{self.server_url} did not present the trustmesh server's "
                                   "X509-SVID (spiffe://<trust domain>/trustmesh/server)")
        return self._decode(resp)

    @staticmethod
    def _decode(resp: httpx.Response) -> Any:
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

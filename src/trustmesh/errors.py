"""The exceptions trustmesh users see, and how each maps to gRPC, HTTP and exit codes.

    TrustmeshError                   base of everything below
    ├── LocalError                   our side is at fault
    │   ├── ConfigError              bad configuration (flags, file, env)
    │   └── InternalError            a bug or broken invariant
    └── RemoteError                  the caller or a peer is at fault
        ├── InvalidInput             malformed or unacceptable input (CSR, SPIFFE ID, YAML...)
        ├── NotFound                 the named thing does not exist
        ├── Conflict                 the thing exists, or the state forbids the change
        ├── PermissionDenied         the caller may not do this
        ├── Unauthenticated          the caller could not be identified
        └── Unavailable              a dependency (server, database) cannot be reached

Every error carries a message meant for a person and, where it helps, the
``field`` (a dotted path such as ``spec.rules[0].from``) that was wrong.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "Conflict",
    "InternalError",
    "InvalidInput",
    "LocalError",
    "NotFound",
    "PermissionDenied",
    "RemoteError",
    "TrustmeshError",
    "Unauthenticated",
    "Unavailable",
    "error_from_code",
]


class TrustmeshError(Exception):
    """Base class of every error trustmesh raises on purpose."""

    code: str = "internal"
    http_status: int = 500
    grpc_code: str = "INTERNAL"
    exit_code: int = 1

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        if self.field:
            return f"{self.field}: {self.message}"
        return self.message

    def to_dict(self) -> dict[str, str]:
        out = {"code": self.code, "message": self.message}
        if self.field:
            out["field"] = self.field
        return out


class LocalError(TrustmeshError):
    """Our side is at fault: configuration or a bug."""


class ConfigError(LocalError):
    code = "config"
    http_status = 500
    grpc_code = "FAILED_PRECONDITION"
    exit_code = 78  # EX_CONFIG


class InternalError(LocalError):
    code = "internal"


class RemoteError(TrustmeshError):
    """The caller or a peer is at fault."""


class InvalidInput(RemoteError):
    code = "invalid_input"
    http_status = 400
    grpc_code = "INVALID_ARGUMENT"
    exit_code = 2


class NotFound(RemoteError):
    code = "not_found"
    http_status = 404
    grpc_code = "NOT_FOUND"
    exit_code = 3


class Conflict(RemoteError):
    code = "conflict"
    http_status = 409
    grpc_code = "ALREADY_EXISTS"
    exit_code = 4


class PermissionDenied(RemoteError):
    code = "permission_denied"
    http_status = 403
    grpc_code = "PERMISSION_DENIED"
    exit_code = 5


class Unauthenticated(RemoteError):
    code = "unauthenticated"
    http_status = 401
    grpc_code = "UNAUTHENTICATED"
    exit_code = 5


class Unavailable(RemoteError):
    code = "unavailable"
    http_status = 503
    grpc_code = "UNAVAILABLE"
    exit_code = 69  # EX_UNAVAILABLE


_BY_CODE: dict[str, type[TrustmeshError]] = {
    cls.code: cls
    for cls in (
        ConfigError,
        InternalError,
        InvalidInput,
        NotFound,
        Conflict,
        PermissionDenied,
        Unauthenticated,
        Unavailable,
    )
}


def error_from_code(code: str, message: str, field: str | None = None) -> TrustmeshError:
    """Rebuild an error received over the wire (admin API JSON) as the matching exception."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message, field=field)

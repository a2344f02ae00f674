from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttestStart(_message.Message):
    __slots__ = ("attestation_type", "payload", "csr")
    ATTESTATION_TYPE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    attestation_type: str
    payload: bytes
    csr: bytes
    def __init__(self, attestation_type: _Optional[str] = ..., payload: _Optional[bytes] = ..., csr: _Optional[bytes] = ...) -> None: ...

class AttestRequest(_message.Message):
    __slots__ = ("start", "challenge_response")
    START_FIELD_NUMBER: _ClassVar[int]
    CHALLENGE_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    start: AttestStart
    challenge_response: bytes
    def __init__(self, start: _Optional[_Union[AttestStart, _Mapping]] = ..., challenge_response: _Optional[bytes] = ...) -> None: ...

class AttestResult(_message.Message):
    __slots__ = ("spiffe_id", "svid_chain", "expires_at")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SVID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    svid_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    def __init__(self, spiffe_id: _Optional[str] = ..., svid_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ...) -> None: ...

class AttestResponse(_message.Message):
    __slots__ = ("challenge", "result")
    CHALLENGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    challenge: bytes
    result: AttestResult
    def __init__(self, challenge: _Optional[bytes] = ..., result: _Optional[_Union[AttestResult, _Mapping]] = ...) -> None: ...

class RenewAgentRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class RenewAgentResponse(_message.Message):
    __slots__ = ("svid_chain", "expires_at")
    SVID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    svid_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    def __init__(self, svid_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ...) -> None: ...

class Entry(_message.Message):
    __slots__ = ("id", "spiffe_id", "parent_id", "selectors", "x509_svid_ttl", "jwt_svid_ttl", "dns_names", "federates_with", "admin", "downstream", "hint", "revision")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SELECTORS_FIELD_NUMBER: _ClassVar[int]
    X509_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    JWT_SVID_TTL_FIELD_NUMBER: _ClassVar[int]
    DNS_NAMES_FIELD_NUMBER: _ClassVar[int]
    FEDERATES_WITH_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    DOWNSTREAM_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    id: str
    spiffe_id: str
    parent_id: str
    selectors: _containers.RepeatedScalarFieldContainer[str]
    x509_svid_ttl: int
    jwt_svid_ttl: int
    dns_names: _containers.RepeatedScalarFieldContainer[str]
    federates_with: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    downstream: bool
    hint: str
    revision: int
    def __init__(self, id: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., parent_id: _Optional[str] = ..., selectors: _Optional[_Iterable[str]] = ..., x509_svid_ttl: _Optional[int] = ..., jwt_svid_ttl: _Optional[int] = ..., dns_names: _Optional[_Iterable[str]] = ..., federates_with: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., downstream: _Optional[bool] = ..., hint: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class EntryChange(_message.Message):
    __slots__ = ("id", "removed", "entry")
    ID_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    id: str
    removed: bool
    entry: Entry
    def __init__(self, id: _Optional[str] = ..., removed: _Optional[bool] = ..., entry: _Optional[_Union[Entry, _Mapping]] = ...) -> None: ...

class SyncEntriesRequest(_message.Message):
    __slots__ = ("since_revision", "page_size")
    SINCE_REVISION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    since_revision: int
    page_size: int
    def __init__(self, since_revision: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class SyncEntriesResponse(_message.Message):
    __slots__ = ("changes", "revision", "more")
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    changes: _containers.RepeatedCompositeFieldContainer[EntryChange]
    revision: int
    more: bool
    def __init__(self, changes: _Optional[_Iterable[_Union[EntryChange, _Mapping]]] = ..., revision: _Optional[int] = ..., more: _Optional[bool] = ...) -> None: ...

class SvidParams(_message.Message):
    __slots__ = ("entry_id", "csr")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    csr: bytes
    def __init__(self, entry_id: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class SvidResult(_message.Message):
    __slots__ = ("entry_id", "svid_chain", "expires_at", "error_code", "error_message")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    SVID_CHAIN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    svid_chain: _containers.RepeatedScalarFieldContainer[bytes]
    expires_at: int
    error_code: str
    error_message: str
    def __init__(self, entry_id: _Optional[str] = ..., svid_chain: _Optional[_Iterable[bytes]] = ..., expires_at: _Optional[int] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ...) -> None: ...

class BatchNewX509SVIDRequest(_message.Message):
    __slots__ = ("params",)
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[SvidParams]
    def __init__(self, params: _Optional[_Iterable[_Union[SvidParams, _Mapping]]] = ...) -> None: ...

class BatchNewX509SVIDResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[SvidResult]
    def __init__(self, results: _Optional[_Iterable[_Union[SvidResult, _Mapping]]] = ...) -> None: ...

class NewJWTSVIDRequest(_message.Message):
    __slots__ = ("entry_id", "audience")
    ENTRY_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    entry_id: str
    audience: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, entry_id: _Optional[str] = ..., audience: _Optional[_Iterable[str]] = ...) -> None: ...

class NewJWTSVIDResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class FetchBundlesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FetchBundlesResponse(_message.Message):
    __slots__ = ("bundle", "federated", "crls")
    class FederatedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    FEDERATED_FIELD_NUMBER: _ClassVar[int]
    CRLS_FIELD_NUMBER: _ClassVar[int]
    bundle: bytes
    federated: _containers.ScalarMap[str, bytes]
    crls: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, bundle: _Optional[bytes] = ..., federated: _Optional[_Mapping[str, bytes]] = ..., crls: _Optional[_Iterable[bytes]] = ...) -> None: ...

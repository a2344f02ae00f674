"""Batched issuance: CSR checks and signing on every core, one datastore write per batch.

Signing and CSR verification hold the GIL in ``cryptography``, so one Python
process signs on one core. The server therefore keeps a pool of signing
processes, each holding the signing CA (certificate and key, sent once at
start), and a batcher that gathers concurrent requests, fans them out to
the pool in chunks, and records each batch in a single transaction.

``sign_requests`` is the pure part: the same function runs in the workers and,
when there is no pool, in the server process itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from trustmesh.errors import InternalError, InvalidInput, TrustmeshError, error_from_code
from trustmesh.log import get_logger
from trustmesh.pki.ca import (
    IssuancePolicy,
    IssuanceRequest,
    SigningAuthority,
    parse_subject,
    plan_certificate,
    signature_hash_for,
)
from trustmesh.pki.csr import RequestedNames, load_csr_and_key, validate_dns_name, validate_uri
from trustmesh.pki.templates import get_template

__all__ = [
    "AsyncIssuer",
    "IssuanceBatcher",
    "SignItem",
    "SignOutcome",
    "SigningPool",
    "sign_requests",
]

log = get_logger("trustmesh.server.issuance")

_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class SignItem:
    """One request as the signer needs it (picklable)."""

    csr: bytes
    template: str
    validity_seconds: float
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    path_length: int | None
    serial: int
    # X509-SVIDs: the names and subject come from the registration entry, not the CSR
    subject: str | None = None
    names_from_csr: bool = True


@dataclass(frozen=True)
class SignOutcome:
    """The signed certificate (DER) and what the audit log records of it, or the error
    that refused it (picklable)."""

    der: bytes | None = None
    error: dict[str, str] | None = None
    subject: str = ""
    sans: tuple[str, ...] = ()
    not_before: int = 0
    not_after: int = 0
    ca_id: str = ""  # the CA that signed it (the active one may change while it is signed)

    def raise_error(self) -> None:
        if self.error is not None:
            raise error_from_code(self.error["code"], self.error["message"],
                                  self.error.get("field"))


def sign_requests(authority: SigningAuthority, policy: IssuancePolicy,
                  items: Sequence[SignItem], now: datetime) -> list[SignOutcome]:
    """Validate and sign each item; a refused item does not affect the others.

    The batch goes through in phases (check every CSR, prepare every request, build
    every certificate, sign them, describe every outcome) rather than item by item.
    Each phase runs one stretch of code for the whole batch, which stays in the
    processor's caches; item by item, the interpreter, the library's certificate
    code and OpenSSL's signature code push one another out, and a batch costs about
    a fifth more CPU (docs/BENCHMARKS.md).
    """
    out: list[SignOutcome | None] = [None] * len(items)

    def phase(work: Iterable[tuple[int, _In]], step: Callable[[SignItem, _In], _Out]
              ) -> list[tuple[int, _Out]]:
        """``step`` for every item still in the batch; a refusal takes the item out."""
        done: list[tuple[int, _Out]] = []
        for i, value in work:
            try:
                done.append((i, step(items[i], value)))
            except Exception as exc:
                out[i] = _refusal(items[i], exc)
        return done

    key, digest = authority.key, signature_hash_for(authority.key)
    checked = phase(enumerate(items), lambda item, _: load_csr_and_key(item.csr))
    prepared = phase(checked, lambda item, csr_key: _prepare(item, *csr_key))
    planned = phase(prepared, lambda item, request: (
        request, plan_certificate(authority, request, now, item.serial, policy)))
    signed = phase(planned, lambda item, built: (
        built[0], built[1].sign(key, digest)))  # type: ignore[arg-type]
    for i, outcome in phase(signed, lambda item, done: _outcome(item, *done, authority.ca_id)):
        out[i] = outcome
    return [o if o is not None else SignOutcome(error=InternalError(
        "internal error while signing; see the server log").to_dict()) for o in out]


def _prepare(item: SignItem, csr: x509.CertificateSigningRequest,
             public_key: object) -> IssuanceRequest:
    """The request to sign: template, names (checked) and subject of one item."""
    template = get_template(item.template)
    if item.names_from_csr:
        names = RequestedNames.collect(csr, item.dns_names, item.uris, item.ip_addresses)
    else:
        names = RequestedNames(dns_names=tuple(validate_dns_name(d) for d in item.dns_names),
                               uris=tuple(validate_uri(u) for u in item.uris))
    # the subject: the entry's for SVIDs, else the CSR's (decoded once, here)
    subject = parse_subject(item.subject) if item.subject is not None else csr.subject
    return IssuanceRequest(csr, template, timedelta(seconds=item.validity_seconds), names,
                           item.path_length, public_key, subject)


def _outcome(item: SignItem, request: IssuanceRequest, cert: x509.Certificate,
             ca_id: str) -> SignOutcome:
    assert request.subject is not None
    return SignOutcome(
        der=cert.public_bytes(serialization.Encoding.DER),
        subject=(_subject_text_of(item.subject) if item.subject is not None
                 else subject_text(request.subject)),
        # the names asked for, or those the certificate carries (the CN fallback)
        sans=san_strings(request.names if not request.names.empty else _cert_names(cert)),
        not_before=int(cert.not_valid_before_utc.timestamp()),
        not_after=int(cert.not_valid_after_utc.timestamp()),
        ca_id=ca_id,
    )


def _refusal(item: SignItem, exc: Exception) -> SignOutcome:
    """The outcome of an item refused by ``exc``; called in its ``except`` block."""
    if isinstance(exc, TrustmeshError):
        return SignOutcome(error=exc.to_dict())
    if isinstance(exc, ValueError | TypeError):
        # cryptography refusing a value that passed our checks: still the request's fault
        return SignOutcome(error=InvalidInput(f"cannot issue for this request: {exc}").to_dict())
    log.exception("signing failed", extra={"serial": format(item.serial, "x")})  # our bug
    return SignOutcome(error=InternalError(
        "internal error while signing; see the server log").to_dict())


_SUBJECT_TEXT: dict[bytes, str] = {}


def subject_text(name: x509.Name) -> str:
    """RFC 4514 text of a name, remembered per distinct name (the library call is slow)."""
    der = name.public_bytes()
    text = _SUBJECT_TEXT.get(der)
    if text is None:
        text = name.rfc4514_string()
        if len(_SUBJECT_TEXT) > 4096:
            _SUBJECT_TEXT.clear()
        _SUBJECT_TEXT[der] = text
    return text


@functools.lru_cache(maxsize=1024)
def _subject_text_of(text: str) -> str:
    """RFC 4514 text of a subject given as ``O=trustmesh,CN=...`` text."""
    return parse_subject(text).rfc4514_string()


def san_strings(names: RequestedNames) -> tuple[str, ...]:
    return (*(f"URI:{u}" for u in names.uris), *(f"DNS:{d}" for d in names.dns_names),
            *(f"IP:{a}" for a in names.ip_addresses), *(f"email:{e}" for e in names.emails))


def _cert_names(cert: x509.Certificate) -> RequestedNames:
    """Names a certificate carries (the CN fallback adds one the request did not list)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return RequestedNames()
    return RequestedNames(
        dns_names=tuple(san.get_values_for_type(x509.DNSName)),
        uris=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)),
        ip_addresses=tuple(str(a) for a in san.get_values_for_type(x509.IPAddress)),
        emails=tuple(san.get_values_for_type(x509.RFC822Name)),
    )


# -- worker processes -----------------------------------------------------------

_WORKER: tuple[SigningAuthority, IssuancePolicy] | None = None


def _exit_with_parent(parent_pid: int) -> None:
    """A signing worker must not outlive its server (even one killed with SIGKILL)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(1.0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker_init(material: dict[str, Any]) -> None:
    global _WORKER
    _exit_with_parent(material["parent_pid"])
    key = serialization.load_der_private_key(material["key_der"], None)
    chain = tuple(x509.load_der_x509_certificate(d) for d in material["chain_der"])
    authority = SigningAuthority(
        certificate=x509.load_der_x509_certificate(material["cert_der"]),
        key=key,  # type: ignore[arg-type]
        chain=chain,
        urls=material["urls"],
        permitted_uri_domains=material["uri_domains"],
        permitted_dns_domains=material["dns_domains"],
        ca_id=material["ca_id"],
    )
    _WORKER = (authority, material["policy"])


def _worker_sign(items: list[SignItem], now: datetime) -> list[SignOutcome]:
    assert _WORKER is not None, "signing worker used before initialisation"
    authority, policy = _WORKER
    return sign_requests(authority, policy, items, now)


def _worker_ping() -> bool:
    return _WORKER is not None


class SigningPool:
    """Processes that hold a copy of the signing CA and sign chunks of requests.

    Only software keys (memory, disk) can be shared this way; an HSM key stays
    in the HSM and the server signs in-process.
    """

    def __init__(self, authority: SigningAuthority, policy: IssuancePolicy,
                 workers: int) -> None:
        self.ca_id = authority.ca_id
        key_der = authority.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption())
        material = {
            "cert_der": authority.certificate.public_bytes(serialization.Encoding.DER),
            "chain_der": [c.public_bytes(serialization.Encoding.DER) for c in authority.chain],
            "key_der": key_der,
            "urls": authority.urls,
            "uri_domains": authority.permitted_uri_domains,
            "dns_domains": authority.permitted_dns_domains,
            "ca_id": authority.ca_id,
            "policy": policy,
            "parent_pid": os.getpid(),
        }
        # spawn, not fork: the server has threads (event loop, executors) that fork would
        # copy in an arbitrary state.
        self.workers = workers
        self._executor = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init, initargs=(material,))

    def warm_up(self) -> None:
        """Start every worker now rather than on the first request."""
        futures = [self._executor.submit(_worker_ping) for _ in range(self.workers * 2)]
        for f in futures:
            f.result(timeout=120)

    async def sign(self, items: list[SignItem], now: datetime) -> list[SignOutcome]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, _worker_sign, items, now)

    def close(self, *, cancel_pending: bool = True) -> None:
        self._executor.shutdown(wait=True, cancel_futures=cancel_pending)


def default_worker_count() -> int:
    """One signing process per core, none on a single core (sign in-process)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return cores if cores > 1 else 0


# -- batcher ---------------------------------------------------------------------


@dataclass
class _Pending:
    item: SignItem
    context: Any
    future: asyncio.Future[Any]


class IssuanceBatcher:
    """Gathers concurrent issuance requests and processes them in batches.

    ``sign`` turns a list of items into outcomes (the pool, or in-process);
    ``record`` stores a batch and returns one result per item, in order.
    """

    def __init__(self, sign: Any, record: Any, *, max_batch: int = 256,
                 chunks: int = 1, linger: float = 0.0005) -> None:
        self._sign = sign
        self._record = record
        self._max_batch = max_batch
        self._chunks = max(1, chunks)
        self._linger = linger
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, item: SignItem, context: Any) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(item, context, fut))
        return await fut

    async def submit_many(self, requests: Sequence[tuple[SignItem, Any]]) -> list[Any]:
        """Submit several requests at once; one result (or exception) per request, in order."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = []
        for item, context in requests:
            fut: asyncio.Future[Any] = loop.create_future()
            self._queue.put_nowait(_Pending(item, context, fut))  # the queue is unbounded
            futures.append(fut)
        return list(await asyncio.gather(*futures, return_exceptions=True))

    async def _run(self) -> None:
        # Batches are pipelined: while one is being recorded, the next ones sign.
        inflight = asyncio.Semaphore(self._chunks + 1)
        tasks: set[asyncio.Task[None]] = set()
        per_batch = max(1, self._max_batch // self._chunks)
        while True:
            first = await self._queue.get()
            batch = [first]
            if self._linger:
                await asyncio.sleep(self._linger)
            while len(batch) < per_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            await inflight.acquire()
            task = asyncio.create_task(self._guarded(batch, inflight))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _guarded(self, batch: list[_Pending], inflight: asyncio.Semaphore) -> None:
        try:
            await self._process(batch)
        except Exception as exc:  # never leave a caller waiting forever
            log.exception("issuance batch failed")
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
        finally:
            inflight.release()

    async def _process(self, batch: list[_Pending]) -> None:
        outcomes = await self._sign([p.item for p in batch])
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(
            None, self._record, [(p.item, p.context, o) for p, o in zip(batch, outcomes,
                                                                           strict=True)])
        for p, result in zip(batch, results, strict=True):
            if p.future.done():
                continue
            if isinstance(result, BaseException):
                p.future.set_exception(result)
            else:
                p.future.set_result(result)


class _Authority(Protocol):
    """What the async issuer needs of the certificate authority."""

    @property
    def authority(self) -> SigningAuthority: ...

    policy: IssuancePolicy

    def now(self) -> datetime: ...

    def check_idempotency(self, params: Any) -> Any: ...

    def make_item(self, params: Any) -> SignItem: ...

    def record_signed(self, entries: Any) -> list[Any]: ...


class AsyncIssuer:
    """The issuance path of the server's APIs: idempotency, batching, pool, datastore.

    The pool holds a copy of the signing CA; when the CA rotates, a new pool is
    started for the new CA and the server signs in-process until it is ready.
    """

    def __init__(self, ca: _Authority, workers: int, *, pool_allowed: bool = True) -> None:
        self._ca = ca
        self._workers = workers if pool_allowed else 0
        self.pool = SigningPool(ca.authority, ca.policy, workers) if self._workers > 0 else None
        self._replacing: asyncio.Task[None] | None = None
        sign = self._sign_pool if self.pool else self._sign_local
        self.batcher = IssuanceBatcher(sign, ca.record_signed,
                                       chunks=self.pool.workers if self.pool else 1)

    async def start(self) -> None:
        self.batcher.start()
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.warm_up)

    async def close(self) -> None:
        await self.batcher.stop()
        if self._replacing is not None:
            self._replacing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replacing
        if self.pool is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.pool.close)

    async def _sign_local(self, items: list[SignItem]) -> list[SignOutcome]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, sign_requests, self._ca.authority,
                                          self._ca.policy, items, self._ca.now())

    async def _sign_pool(self, items: list[SignItem]) -> list[SignOutcome]:
        assert self.pool is not None
        authority = self._ca.authority
        if self.pool.ca_id != authority.ca_id:
            if self._replacing is None:
                self._replacing = asyncio.create_task(self._replace_pool(authority))
            return await self._sign_local(items)
        return await self.pool.sign(items, self._ca.now())

    async def _replace_pool(self, authority: SigningAuthority) -> None:
        """Start and warm a pool for the new CA, then retire the old pool."""
        loop = asyncio.get_running_loop()
        try:
            fresh = await loop.run_in_executor(
                None, SigningPool, authority, self._ca.policy, self._workers)
            await loop.run_in_executor(None, fresh.warm_up)
            old, self.pool = self.pool, fresh
            log.info("signing pool follows the new CA", extra={"ca_id": authority.ca_id})
            if old is not None:  # batches already sent to it finish there
                await loop.run_in_executor(None, functools.partial(old.close,
                                                                   cancel_pending=False))
        except Exception:
            log.exception("could not start a signing pool for the new CA; signing in-process")
        finally:
            self._replacing = None

    async def issue(self, params: Any, actor: str) -> Any:
        if params.idempotency_key:
            loop = asyncio.get_running_loop()
            earlier = await loop.run_in_executor(None, self._ca.check_idempotency, params)
            if earlier is not None:
                return earlier
        item = self._ca.make_item(params)
        return await self.batcher.submit(item, (params, actor))

"""OCSP responder processes that share the public HTTP port with the server.

One Python process signs on one core (``cryptography`` holds the GIL while it
signs), and aiohttp's request machinery costs more per new connection than
signing does. So, unless ``ocsp_workers`` is 0, the server binds the public
port itself and hands the one listening socket to every responder process. They
all take connections from its single accept queue, so the next connection goes
to whichever worker is free (``SO_REUSEPORT`` would spread them by a hash of the
address, and a connection could wait behind a busy worker while another idled).
A worker:

- answers a one-shot ``POST /ocsp`` or ``GET /ocsp/<base64>`` (what OCSP
  clients send) in its answering thread, which blocks in ``accept()`` and then
  reads, answers, writes and closes with no event loop in between
  (``TCP_DEFER_ACCEPT``: the kernel hands over a connection once it has data);
  the kernel wakes one waiting thread per connection;
- passes every other connection (a request not complete in its first read,
  keep-alive, pipelining, other routes) to its event loop, which reads requests
  with the same lean parser of ``ocsp_http`` and answers OCSP the same way;
- forwards every other request (``/healthz``, ``/metrics``, ``/crl``, ``/ca``)
  unchanged to the server's aiohttp app, which listens on a Unix socket in the
  data directory, so those routes have one implementation;
- looks statuses up in the datastore (its own SQLite WAL reader or PostgreSQL
  connection); on SQLite it keeps what it read while the datastore's status
  generation stays put (``status_lookup``), on PostgreSQL it reads for every
  request: either way a revocation, written durably before ``ca revoke``
  returns, shows in every worker at once;
- signs with the delegated responder certificate and key the server sends it
  (never a CA key), and gets the new ones whenever the server's responder
  changes (responder renewal, CA rotation);
- counts responses in shared memory (a row per thread), which ``/metrics`` adds up;
- exits when the server goes away (its control pipe closes, even when the
  server is killed with SIGKILL). The server restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

from trustmesh.errors import ConfigError, Unavailable
from trustmesh.log import configure_logging, get_logger
from trustmesh.pki.ocsp import (
    OcspAnswer,
    OcspResponder,
    ResponderIdentity,
)
from trustmesh.server.certificate_status import status_lookup
from trustmesh.server.http_cache import ocsp_cache_headers
from trustmesh.server.metrics import ServerMetrics
from trustmesh.server.ocsp_http import (
    NEED_MORE,
    Forward,
    OcspCall,
    Refusal,
    ocsp_response_bytes,
    read_request,
    refusal_bytes,
)
from trustmesh.store.datastore import Datastore

__all__ = ["OcspWorkers", "default_ocsp_workers"]

log = get_logger("trustmesh.server.ocsp")

_REQUEST_TIMEOUT = 10.0  # a request must arrive whole within this (slow clients are cut off)
_IDLE_TIMEOUT = 10.0  # a kept-alive connection may stay silent this long
_FORWARD_TIMEOUT = 30.0
_MAX_PENDING = 4096  # connections with an incomplete request, per worker
# accept() errors that mean "out of resources": wait a little before trying again
_ACCEPT_BACKOFF = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_READY_TIMEOUT = 60.0
_SUPERVISE_INTERVAL = 0.25

# Shared counters, one row per thread of a worker (the answering thread and the event
# loop both answer, and ``+=`` on shared memory is not atomic): responses by outcome,
# then the latency histogram.
_OUTCOMES = ("good", "revoked", "unknown", "malformedRequest", "unauthorized", "internalError",
             "tryLater", "other")
_OUTCOME_INDEX = {name: i for i, name in enumerate(_OUTCOMES)}
_OTHER = _OUTCOME_INDEX["other"]
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_BUCKET_BASE = len(_OUTCOMES)
_SUM_US = _BUCKET_BASE + len(_BUCKETS) + 1  # total latency in microseconds
_ROW = _SUM_US + 1
_ROWS_PER_WORKER = 2


# -- what the server sends its workers ---------------------------------------------


@dataclass(frozen=True)
class _Material:
    """The responders as bytes (picklable): (ca_id, CA cert, responder cert, responder key)."""

    responders: tuple[tuple[str, bytes, bytes, bytes], ...]
    validity_seconds: float

    @classmethod
    def of(cls, responder: OcspResponder) -> _Material:
        der = serialization.Encoding.DER
        return cls(tuple(
            (i.ca_id, i.ca_certificate.public_bytes(der), i.responder_certificate.public_bytes(der),
             i.responder_key.private_bytes(der, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
            for i in responder.identities), responder.validity.total_seconds())

    def responder(self) -> OcspResponder:
        identities = []
        for ca_id, ca_der, cert_der, key_der in self.responders:
            key = serialization.load_der_private_key(key_der, None)
            identities.append(ResponderIdentity(
                ca_id, x509.load_der_x509_certificate(ca_der),
                x509.load_der_x509_certificate(cert_der), key))  # type: ignore[arg-type]
        return OcspResponder(identities, timedelta(seconds=self.validity_seconds))


@dataclass(frozen=True)
class _WorkerSpec:
    index: int
    datastore_url: str
    upstream: str  # the server's HTTP app on a Unix socket
    parent_pid: int
    log_level: str
    log_format: str


# -- the worker process ------------------------------------------------------------


def _worker_main(spec: _WorkerSpec, listener: socket.socket, control: Connection,
                 counters: Any) -> None:
    # Ctrl-C in a terminal reaches the whole process group; the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging(spec.log_level, spec.log_format)
    _exit_with_parent(spec.parent_pid)
    store = Datastore(spec.datastore_url)

    async def serve() -> None:
        await _Worker(spec, listener, control, counters, store).run()

    try:
        asyncio.run(serve())
    finally:
        store.close()


def _exit_with_parent(parent_pid: int) -> None:
    """Belt and braces next to the control pipe: never outlive the server."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


class _Conn:
    __slots__ = ("fd", "buf", "timer")

    def __init__(self, fd: int) -> None:
        self.fd = fd  # a bare descriptor: a socket object per request costs more than it gives
        self.buf = b""
        self.timer: asyncio.TimerHandle | None = None


_UNSUCCESSFUL = {
    name: ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(
        serialization.Encoding.DER)
    for name, status in (("internalError", ocsp.OCSPResponseStatus.INTERNAL_ERROR),
                         ("tryLater", ocsp.OCSPResponseStatus.TRY_LATER))
}


class _Worker:
    def __init__(self, spec: _WorkerSpec, listener: socket.socket, control: Connection,
                 counters: Any, store: Datastore) -> None:
        self._spec = spec
        self._listener = listener
        self._control = control
        self._counters = counters
        self._row = spec.index * _ROWS_PER_WORKER * _ROW  # the event loop's row
        self._lookup = status_lookup(store)
        self._responder = OcspResponder([], timedelta(hours=1))
        self._pending: dict[int, _Conn] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._answering: threading.Thread | None = None
        # Held by the answering thread while it serves a connection; taken for good at
        # stop, so that the datastore is not closed under a request.
        self._busy = threading.Lock()

    async def run(self) -> None:
        self._loop.add_reader(self._control.fileno(), self._on_control)
        self._control.send(("ready", os.getpid()))
        try:
            await self._stopped.wait()
        finally:
            # The answering thread finishes the connection it has (at most one) and
            # stays blocked in accept() until the process exits; connections still in
            # the queue go to the other workers.
            await self._loop.run_in_executor(None, self._busy.acquire)
            self._loop.remove_reader(self._control.fileno())
            for conn in list(self._pending.values()):
                self._close(conn)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    # control pipe: new responders, or stop
    def _on_control(self) -> None:
        try:
            message = self._control.recv()
        except (EOFError, OSError):
            self._stopped.set()  # the server is gone
            return
        kind = message[0]
        if kind == "responders":
            generation, material = message[1], message[2]
            self._responder = material.responder()
            self._control.send(("loaded", generation))
        elif kind == "serve" and self._answering is None:
            self._answering = threading.Thread(target=self._answer_connections,
                                               name="ocsp-answering", daemon=True)
            self._answering.start()
        elif kind == "stop":
            self._stopped.set()

    # the answering thread
    def _answer_connections(self) -> None:
        """Accept, read, answer, write, close; a connection that needs more than one read
        and one answer goes to the event loop (``_adopt``)."""
        listener = self._listener
        listener.setblocking(True)  # the queue is shared: every worker waits in accept()
        # accept() without building a socket object (and converting its family and type
        # to enums) per connection; the descriptor is all the fast path needs.
        accept: Callable[[], tuple[int, Any]] = listener._accept  # type: ignore[attr-defined]
        read, write, close, set_blocking = os.read, os.write, os.close, os.set_blocking
        busy, row = self._busy, self._row + _ROW
        reply, handoff = self._reply, self._loop.call_soon_threadsafe
        while True:
            try:
                fd, _ = accept()
            except BlockingIOError:  # someone made the shared socket non-blocking
                listener.setblocking(True)
                continue
            except InterruptedError:
                continue
            except OSError as exc:
                if exc.errno != errno.ECONNABORTED:
                    log.warning("accept failed", extra={"error": str(exc)})
                if exc.errno in _ACCEPT_BACKOFF:
                    time.sleep(0.1)
                continue
            with busy:
                set_blocking(fd, False)
                try:
                    data = read(fd, 65536)
                except (BlockingIOError, InterruptedError):
                    data = None  # connected without sending (yet): the loop waits for it
                except OSError:
                    close(fd)
                    continue
                if data == b"":
                    close(fd)
                    continue
                if data is not None:
                    decision = read_request(data)
                    if (type(decision) is OcspCall and not decision.keep_alive
                            and decision.consumed == len(data)):
                        try:
                            write(fd, reply(decision, row))
                        except OSError:
                            pass
                        close(fd)
                        continue
                try:
                    handoff(self._adopt, fd, data or b"")
                except RuntimeError:  # the loop is closed: the worker is stopping
                    close(fd)

    # connections in the event loop
    def _adopt(self, fd: int, data: bytes) -> None:
        """Take over a connection from the answering thread, with what it read."""
        # it may answer and wait for more: answers must not wait for a close to be sent
        sock = socket.socket(self._listener.family, socket.SOCK_STREAM, 0, fd)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        except OSError:
            pass  # the connection is gone; reading it says so
        finally:
            sock.detach()
        conn = _Conn(fd)
        if not data:
            self._wait(conn, _IDLE_TIMEOUT)
            return
        conn.buf = data
        self._process(conn)

    def _on_readable(self, conn: _Conn) -> None:
        try:
            data = os.read(conn.fd, 65536)
        except (BlockingIOError, InterruptedError):
            self._wait(conn, _REQUEST_TIMEOUT if conn.buf else _IDLE_TIMEOUT)
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._process(conn)

    def _process(self, conn: _Conn) -> None:
        """Answer, refuse or forward the requests in ``conn.buf``; wait for the rest."""
        while True:
            decision = read_request(conn.buf)
            if decision is NEED_MORE:
                self._wait(conn, _REQUEST_TIMEOUT)
                return
            if isinstance(decision, OcspCall):
                keep = decision.keep_alive
                if not self._send(conn, self._reply(decision, self._row)) or not keep:
                    self._close(conn)
                    return
                conn.buf = conn.buf[decision.consumed:]
                if not conn.buf:
                    self._wait(conn, _IDLE_TIMEOUT)
                    return
                continue  # a pipelined request follows
            if isinstance(decision, Refusal):
                self._send(conn, refusal_bytes(decision))
                self._close(conn)
                return
            assert isinstance(decision, Forward)
            self._unwatch(conn)
            sock = socket.socket(fileno=conn.fd)
            sock.setblocking(False)
            task = asyncio.create_task(self._forward(sock, decision.request))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return

    def _wait(self, conn: _Conn, timeout: float) -> None:
        """Wait for more bytes (the deadline is not moved by a trickle of them)."""
        fd = conn.fd
        if fd not in self._pending:
            if len(self._pending) >= _MAX_PENDING:
                self._send(conn, refusal_bytes(Refusal(503, "too many open connections")))
                os.close(fd)
                return
            self._pending[fd] = conn
            self._loop.add_reader(fd, self._on_readable, conn)
        if conn.timer is None or not conn.buf:
            if conn.timer is not None:
                conn.timer.cancel()
            conn.timer = self._loop.call_later(timeout, self._expire, conn)

    def _expire(self, conn: _Conn) -> None:
        conn.timer = None
        if conn.buf:
            self._send(conn, refusal_bytes(Refusal(408, "request not received in time")))
        self._close(conn)

    def _unwatch(self, conn: _Conn) -> None:
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        fd = conn.fd
        if self._pending.pop(fd, None) is not None:
            self._loop.remove_reader(fd)

    def _close(self, conn: _Conn) -> None:
        self._unwatch(conn)
        os.close(conn.fd)

    @staticmethod
    def _send(conn: _Conn, data: bytes) -> bool:
        """Send a whole (small) response; False when the client is gone or not reading."""
        try:
            sent = os.write(conn.fd, data)
        except OSError:
            return False
        # A fresh socket's send buffer holds a response many times over; a client that
        # leaves one unread is not served further.
        return sent == len(data)

    def _reply(self, call: OcspCall, row: int) -> bytes:
        """The HTTP response to an OCSP request, counted in the counter row ``row``."""
        answer = self._answer(call.der, row)
        headers = ocsp_cache_headers(answer, time.time()) if call.get else ()
        return ocsp_response_bytes(answer.der, keep_alive=call.keep_alive, headers=headers)

    def _answer(self, der: bytes, row: int) -> OcspAnswer:
        """The answer to an OCSP request, counted in the counter row ``row``."""
        start = time.perf_counter()
        try:
            answer = self._responder.respond(der, self._lookup, datetime.now(UTC))
        except Unavailable:
            log.warning("datastore unavailable; answering tryLater")
            answer = OcspAnswer(_UNSUCCESSFUL["tryLater"], "tryLater")
        except Exception:
            log.exception("OCSP request failed")
            answer = OcspAnswer(_UNSUCCESSFUL["internalError"], "internalError")
        elapsed = time.perf_counter() - start
        counters = self._counters
        counters[row + _OUTCOME_INDEX.get(answer.outcome, _OTHER)] += 1
        # the first bucket whose bound is >= elapsed (the last one is +Inf)
        counters[row + _BUCKET_BASE + bisect.bisect_left(_BUCKETS, elapsed)] += 1
        counters[row + _SUM_US] += int(elapsed * 1e6)
        return answer

    async def _forward(self, sock: socket.socket, request: bytes) -> None:
        """Relay one request to the server's HTTP app and its response back."""
        sent_any = False
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(_FORWARD_TIMEOUT):
                reader, writer = await asyncio.open_unix_connection(self._spec.upstream)
                writer.write(request)
                await writer.drain()
                while chunk := await reader.read(65536):
                    await self._loop.sock_sendall(sock, chunk)
                    sent_any = True
        except (OSError, TimeoutError) as exc:
            if not sent_any:
                with contextlib.suppress(OSError):
                    sock.send(refusal_bytes(Refusal(502, "the server did not answer")))
            log.debug("forwarding failed", extra={"error": str(exc)})
        finally:
            if writer is not None:
                writer.close()
            sock.close()


# -- the server side -----------------------------------------------------------------


def _listener(address: str) -> socket.socket:
    """The public socket, bound here so that a port in use is a clean configuration
    error and queued connections survive a worker. It listens once the server is ready
    (``OcspWorkers.open``); every worker accepts from it."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}",
                          field="http_address") from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accept() only once the request's first bytes are there (one wakeup per request)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 5)
        # Accepted connections start corked (they inherit it): the answer of a one-shot
        # request leaves with the FIN of the close() that follows it, one segment and one
        # wakeup of the client instead of two. The event loop uncorks what it adopts.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}",
                          field="http_address") from None
    return sock


class _WorkerCollector(Collector):
    """Latency of the OCSP answers the workers gave, read from shared memory at scrape."""

    def __init__(self, workers: OcspWorkers) -> None:
        self._workers = workers

    def collect(self) -> Iterable[HistogramMetricFamily]:
        totals = self._workers.totals()
        cumulative, buckets = 0, []
        for i, bound in enumerate((*_BUCKETS, float("inf"))):
            cumulative += totals[_BUCKET_BASE + i]
            buckets.append((str(bound) if bound != float("inf") else "+Inf", cumulative))
        yield HistogramMetricFamily(
            "trustmesh_ocsp_worker_request_duration_seconds",
            "Time OCSP responder processes took to answer a request (parse, status lookup, "
            "signing), without the network.",
            buckets=buckets, sum_value=totals[_SUM_US] / 1e6)


class OcspWorkers:
    """The responder processes of one server: started, kept running, told of new
    responders, counted, and stopped with the server."""

    def __init__(self, count: int, *, address: str, datastore_url: str, data_dir: Path,
                 metrics: ServerMetrics, log_level: str = "info",
                 log_format: str = "json") -> None:
        if count < 1:
            raise ValueError("at least one OCSP worker")
        self.count = count
        self._address = address
        self._datastore_url = datastore_url
        self.upstream = data_dir / "http.sock"
        self._metrics = metrics
        self._log = (log_level, log_format)
        self._ctx = multiprocessing.get_context("spawn")  # the server has threads: no fork
        self._counters: Any = self._ctx.RawArray("Q", count * _ROWS_PER_WORKER * _ROW)
        self._seen = [0] * len(_OUTCOMES)
        self._socket: socket.socket | None = None
        self._procs: list[BaseProcess | None] = [None] * count
        self._pipes: list[Connection | None] = [None] * count
        self._loaded: list[int] = [0] * count  # responder generation each worker has
        self._generation = 0
        self._responder: OcspResponder | None = None
        self._material: _Material | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._open = False
        self._site: web.UnixSite | None = None
        self._closing = False
        metrics.registry.register(_WorkerCollector(self))

    # -- lifecycle
    async def start(self, public: web.AppRunner,
                    responder: Callable[[], OcspResponder]) -> None:
        """Bind the public port, serve ``public`` to the workers on a Unix socket, start
        the workers and wait until each one signs with ``responder()``; from then on
        follow ``responder()`` and restart workers that die, until ``close``."""
        try:
            self._socket = _listener(self._address)
            with contextlib.suppress(FileNotFoundError):
                self.upstream.unlink()  # left over from a crash (the port is ours now)
            old_umask = os.umask(0o177)  # born 0600, like the admin socket
            try:
                self._site = web.UnixSite(public, str(self.upstream))
                await self._site.start()
            finally:
                os.umask(old_umask)
            self.update(responder())
            await asyncio.get_running_loop().run_in_executor(None, self._start_all)
        except BaseException:
            await self.close()
            raise
        self._supervisor = asyncio.create_task(self._supervise(responder))

    def _start_all(self) -> None:
        for i in range(self.count):
            self._spawn(i)
        deadline = time.monotonic() + _READY_TIMEOUT
        for i in range(self.count):
            self._await_loaded(i, deadline)

    def _spawn(self, index: int) -> None:
        ours, theirs = self._ctx.Pipe(duplex=True)
        spec = _WorkerSpec(index, self._datastore_url, str(self.upstream), os.getpid(),
                           *self._log)
        proc = self._ctx.Process(target=_worker_main, name=f"trustmesh-ocsp-{index}",
                                 args=(spec, self._socket, theirs, self._counters),
                                 daemon=True)
        proc.start()
        theirs.close()
        self._procs[index] = proc
        self._pipes[index] = ours
        self._loaded[index] = 0
        self._push(index)
        if self._open:
            self._tell(index, ("serve",))

    def _push(self, index: int) -> None:
        if self._material is not None:
            self._tell(index, ("responders", self._generation, self._material))

    def _tell(self, index: int, message: tuple[Any, ...]) -> None:
        pipe = self._pipes[index]
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.send(message)

    def open(self) -> None:
        """Start accepting connections on the public port (once the server is ready)."""
        assert self._socket is not None
        self._socket.listen(1024)
        self._open = True
        for i in range(self.count):
            self._tell(i, ("serve",))

    def _await_loaded(self, index: int, deadline: float) -> None:
        """Block until worker ``index`` signs with the current responders."""
        pipe, proc = self._pipes[index], self._procs[index]
        assert pipe is not None and proc is not None
        while self._loaded[index] != self._generation:
            left = deadline - time.monotonic()
            if left <= 0 or not proc.is_alive():
                raise ConfigError(f"OCSP worker {index} did not start (exit code "
                                  f"{proc.exitcode}); see the log above")
            if pipe.poll(min(left, 0.5)) and not self._receive(index, pipe):
                time.sleep(0.05)  # the worker is gone; is_alive() tells on the next turn

    def _receive(self, index: int, pipe: Connection) -> bool:
        """Read one message; False when the worker's end is closed (it died)."""
        try:
            message = pipe.recv()
        except (EOFError, OSError):
            return False
        if message[0] == "loaded":
            self._loaded[index] = message[1]
        return True

    def update(self, responder: OcspResponder) -> bool:
        """Send the workers ``responder``'s certificates and keys if it is a new one."""
        if responder is self._responder:
            return False
        self._responder = responder
        self._material = _Material.of(responder)
        self._generation += 1
        for i in range(self.count):
            self._push(i)
        return True

    def _drain(self) -> None:
        for i, pipe in enumerate(self._pipes):
            with contextlib.suppress(OSError):
                while pipe is not None and pipe.poll() and self._receive(i, pipe):
                    pass

    async def _supervise(self, responder: Callable[[], OcspResponder]) -> None:
        while True:
            await asyncio.sleep(_SUPERVISE_INTERVAL)
            try:
                self.update(responder())
                self._drain()
                for i, proc in enumerate(self._procs):
                    if proc is not None and not proc.is_alive() and not self._closing:
                        log.warning("OCSP worker exited; starting it again",
                                    extra={"worker": i, "exit_code": proc.exitcode})
                        pipe = self._pipes[i]
                        if pipe is not None:
                            pipe.close()
                        self._spawn(i)
            except Exception:
                log.exception("supervising the OCSP workers failed; retrying")

    async def close(self) -> None:
        self._closing = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        for i in range(self.count):
            self._tell(i, ("stop",))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._join_all)
        for pipe in self._pipes:
            if pipe is not None:
                pipe.close()
        if self._socket is not None:
            self._socket.close()
        if self._site is not None:
            await self._site.stop()
        with contextlib.suppress(FileNotFoundError):
            self.upstream.unlink()

    def _join_all(self) -> None:
        deadline = time.monotonic() + 5
        for proc in self._procs:
            if proc is None:
                continue
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)

    # -- metrics
    def totals(self) -> list[int]:
        """The shared counters summed over the workers."""
        counters = self._counters
        rows = range(self.count * _ROWS_PER_WORKER)
        return [sum(counters[r * _ROW + i] for r in rows) for i in range(_ROW)]

    def collect(self) -> None:
        """Add what the workers answered since the last scrape to the OCSP counter."""
        totals = self.totals()
        for i, name in enumerate(_OUTCOMES):
            delta = totals[i] - self._seen[i]
            if delta > 0:
                self._metrics.ocsp_responses.labels(name).inc(delta)
                self._seen[i] = totals[i]


def default_ocsp_workers() -> int:
    """One responder process per core, none (answer in the server) on a single core."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    return cores if cores > 1 else 0

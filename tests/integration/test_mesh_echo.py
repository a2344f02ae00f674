"""The echo application behind the sidecars answers each request in one TCP segment.

Two writes (head, then body) leave as two segments with Nagle off, and each
proxy on the path then reads, encrypts and forwards twice; the mesh latency
benchmark measures that cost. The kernel's count of data segments received on
the caller's socket (``TCP_INFO``) tells one write from two.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer

import pytest

from trustmesh.mesh.echo import EchoHandler

_TCPI_DATA_SEGS_IN = 152  # offset of tcpi_data_segs_in in Linux's struct tcp_info


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _data_segments_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return int(struct.unpack_from("I", info, _TCPI_DATA_SEGS_IN)[0])


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_each_answer_leaves_in_one_segment_on_a_keep_alive_connection(echo_port: int) -> None:
    with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
        for i in range(5):
            before = _data_segments_in(sock)
            sock.sendall(f"GET /n/{i} HTTP/1.1\r\nhost: echo\r\n\r\n".encode())
            answer = _read_response(sock)
            time.sleep(0.05)  # a second segment, were there one, has arrived by now
            assert _data_segments_in(sock) - before == 1, answer
            assert answer.startswith(b"HTTP/1.1 200 ")
            body = answer.partition(b"\r\n\r\n")[2]
            assert json.loads(body)["path"] == f"/n/{i}"


def test_a_request_body_is_read_and_counted(echo_port: int) -> None:
    with socket.create_connection(("127.0.0.1", echo_port), timeout=5) as sock:
        sock.sendall(b"POST /api/payment HTTP/1.1\r\nhost: echo\r\ncontent-length: 5\r\n\r\nhello")
        body = _read_response(sock).partition(b"\r\n\r\n")[2]
    seen = json.loads(body)
    assert (seen["method"], seen["body_length"]) == ("POST", 5)

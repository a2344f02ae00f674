"""Echo listener and connection prober run inside the lab's pod namespaces.

Run as a script (``python _probe.py serve|probe``) by ``ip netns exec``; it
imports nothing but the standard library so it starts fast.

``serve TOKEN PROTO/PORT...``: listen on 0.0.0.0 for each TCP and UDP port,
answer every TCP connection and every UDP datagram with TOKEN, print
``ready`` once every socket is bound, and exit when stdin closes (so it
never outlives the process that started it).

``probe``: read ``{"timeout": s, "targets": [[ip, proto, port, token], ...]}``
as JSON on stdin, try every target at once (bounded by a thread pool), and
print a JSON list of booleans: whether TOKEN came back.
"""

from __future__ import annotations

import json
import selectors
import socket
import sys
from concurrent.futures import ThreadPoolExecutor

_MAX_THREADS = 64


def _serve(token: bytes, specs: list[str]) -> int:
    sel = selectors.DefaultSelector()
    for spec in specs:
        proto, _, port = spec.partition("/")
        if proto == "TCP":
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", int(port)))  # noqa: S104 - inside a lab namespace
            sock.listen(128)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("0.0.0.0", int(port)))  # noqa: S104 - inside a lab namespace
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, proto)
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            if key.data == "stdin":
                if not sys.stdin.readline():
                    return 0
                continue
            sock = key.fileobj  # type: ignore[assignment]
            try:
                if key.data == "TCP":
                    conn, _ = sock.accept()
                    conn.setblocking(True)
                    conn.settimeout(1.0)
                    conn.sendall(token)
                    conn.close()
                else:
                    _, addr = sock.recvfrom(2048)
                    sock.sendto(token, addr)
            except OSError:
                continue


def _try(ip: str, proto: str, port: int, token: bytes, timeout: float) -> bool:
    try:
        if proto == "TCP":
            with socket.create_connection((ip, port), timeout=timeout) as conn:
                data = b""
                while len(data) < len(token):
                    chunk = conn.recv(len(token) - len(data))
                    if not chunk:
                        break
                    data += chunk
                return data == token
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(timeout)
            sock.sendto(b"probe", (ip, port))
            data, _ = sock.recvfrom(2048)
            return data == token
    except OSError:  # refused, timed out, or EPERM from our own egress chain
        return False


def _probe() -> int:
    request = json.load(sys.stdin)
    timeout = float(request["timeout"])
    targets = request["targets"]
    if not targets:
        print("[]")
        return 0
    with ThreadPoolExecutor(max_workers=min(_MAX_THREADS, len(targets))) as pool:
        results = list(pool.map(
            lambda t: _try(str(t[0]), str(t[1]), int(t[2]), str(t[3]).encode(), timeout),
            targets,
        ))
    print(json.dumps(results))
    return 0


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "serve":
        return _serve(argv[1].encode(), argv[2:])
    if argv == ["probe"]:
        return _probe()
    print("usage: _probe.py serve TOKEN PROTO/PORT... | probe", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A tiny HTTP echo application for demos and tests: it answers every request with
JSON describing what it received (method, path, headers, body length).

Run it as ``python -m trustmesh.mesh.echo --port 18080``.
"""

from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["EchoHandler", "serve"]


class EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as services behind a sidecar see it
    server_version = "trustmesh-echo"
    disable_nagle_algorithm = True
    # Buffered: the status line, headers and body leave in one write (handle_one_request
    # flushes after each request). Written unbuffered, the head and the body went out as
    # two segments, and every proxy on the way forwarded them as two, each hop woken twice.
    wbufsize = -1

    def _answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        payload = json.dumps({
            "method": self.command, "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body_length": len(body),
        }).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer  # noqa: N815

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        return  # quiet: the sidecar's access log is the record


def serve(host: str, port: int) -> None:
    server = ThreadingHTTPServer((host, port), EchoHandler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    finally:
        server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    serve(args.host, args.port)


if __name__ == "__main__":
    main()

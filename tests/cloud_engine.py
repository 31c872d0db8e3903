"""A plain-command engine for the control plane's own tests: an HTTP server on a unix socket.

The reconcile loop, the sandboxes and the gateway treat an engine as a process that listens on
`--uds PATH` and answers `/ready`; this one does that with the standard library alone (it
starts in well under a second, unlike `kcloud serve`, which the end-to-end test uses). Its
completions echo the prompt, so a test can tell which engine answered.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socketserver
import sys
from http.server import BaseHTTPRequestHandler


class Handler(BaseHTTPRequestHandler):
    name = "engine"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, code: int, obj: object) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path in ("/ready", "/health"):
            self._json(200, {"ok": True, "pid": os.getpid()})
        else:
            self._json(404, {"error": "no such path"})

    def do_POST(self) -> None:
        n = int(self.headers.get("content-length") or 0)
        req = json.loads(self.rfile.read(n) or b"{}")
        text = f"{self.name}:{req.get('prompt', '')}"
        if req.get("stream"):
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.end_headers()
            for ch in text:
                chunk = {"choices": [{"index": 0, "text": ch}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        self._json(200, {"object": "text_completion", "model": req.get("model"),
                         "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": len(text),
                                   "total_tokens": len(text) + 1}})


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uds", required=True)
    ap.add_argument("--name", default="engine")
    a = ap.parse_args()
    Handler.name = a.name
    srv = Server(a.uds, Handler)
    signal.signal(signal.SIGTERM, lambda *_: (srv.server_close(), sys.exit(0)))
    srv.serve_forever()


if __name__ == "__main__":
    main()

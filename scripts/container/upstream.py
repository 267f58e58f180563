#!/usr/bin/env python3
"""The upstream of the container checks: a counting HTTP/1.1 server on 127.0.0.1.

POST /pay      -> 201 "run N: BODY" (N counts executions, so a re-execution shows)
POST /slow     -> like /pay, answered after 2 s (a request in flight while the proxy drains)
GET  /started  -> "N": POSTs that have arrived (answered or not)

Usage: upstream.py PORT
"""
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

lock = threading.Lock()
runs = 0
started = 0


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/started":
            with lock:
                self.answer(200, str(started))
        else:
            self.answer(404, "not found")

    def do_POST(self):
        global runs, started
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length).decode()
        with lock:
            started += 1
        if self.path == "/slow":
            time.sleep(2)
        with lock:
            runs += 1
            n = runs
        self.answer(201, f"run {n}: {body}")


ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()

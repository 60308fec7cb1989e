"""A local stand-in for the vendors' HTTP APIs: canned responses queued per test, and a record
of the requests it received. The real SDK-based providers are pointed at it."""

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict


@dataclass
class StandIn:
    url: str
    queue: list[tuple[int, dict, float]] = field(default_factory=list)
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def respond(self, body: dict, *, status: int = 200, delay: float = 0.0) -> None:
        """Queue the answer to the next request."""
        self.queue.append((status, body, delay))


class _Handler(BaseHTTPRequestHandler):
    stand_in: StandIn

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        with self.stand_in.lock:
            self.stand_in.requests.append(
                Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
            )
            queued = self.stand_in.queue.pop(0) if self.stand_in.queue else None
        status, answer, delay = queued or (599, {"error": "nothing queued"}, 0.0)
        time.sleep(delay)
        payload = json.dumps(answer).encode()
        try:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
            pass

    def log_message(self, format: str, *args) -> None:
        pass


@pytest.fixture
def stand_in():
    fake = StandIn(url="")
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Handler,), {"stand_in": fake}))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)

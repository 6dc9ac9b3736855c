"""A real HTTP server on loopback that speaks the OpenAI chat-completions API, for judge tests.

It answers ``POST /v1/chat/completions`` like an LLM judge would, from a deterministic oracle
that reads the task's JSON payload (see ``rewards.prompts``): an event is "entailment" when all
its content tokens occur in the description, else "neutral"; extraction returns sentences;
ratings come from token overlap. Each request is answered according to a behaviour, taken from a
fixed ``script`` first, then drawn at random from ``faults`` (rates per behaviour), else "ok":

* ``ok`` — a valid answer (after ``latency_s``);
* ``http_500`` / ``http_429`` (with ``Retry-After: 0``) / ``http_400`` / ``http_401``;
* ``malformed`` — a 200 whose message content is not JSON;
* ``invalid`` — a 200 whose content is JSON that breaks the task's contract;
* ``hang`` — never answers (until ``hang_s`` or ``stop()``), so the client times out;
* ``disconnect`` — closes the connection without answering;
* ``html`` — a 200 with an HTML page instead of a chat completion (a misconfigured proxy).

Requests that do not ask for ``response_format`` of type ``json_schema`` are rejected with 400,
so a client that forgets structured output fails its tests; ``require_schema=False`` accepts
free-form requests (the benchmark protocols' judges). An ``answer`` callable may return a dict
(sent as JSON) or a string (sent verbatim as the message content).
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from megatron_vcap.rewards.prompts import read_payload
from megatron_vcap.rewards.similarity import content_tokens

BEHAVIOURS = (
    "ok",
    "http_500",
    "http_429",
    "http_400",
    "http_401",
    "malformed",
    "invalid",
    "hang",
    "disconnect",
    "html",
)


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def oracle_answer(body: dict[str, Any]) -> dict[str, Any]:
    """A correct, deterministic answer to one of the judge tasks (keyed by the schema name)."""
    fmt = body["response_format"]["json_schema"]
    payload = read_payload(body["messages"])
    name = fmt["name"]
    if name == "event_entailment":
        premise = set(content_tokens(payload["description"]))
        verdicts = []
        for i, event in enumerate(payload["events"]):
            entailed = set(content_tokens(event)) <= premise
            verdicts.append({"index": i, "verdict": "entailment" if entailed else "neutral"})
        return {"verdicts": verdicts}
    if name == "event_extraction":
        limit = fmt["schema"]["properties"]["events"].get("maxItems", 10)
        return {"events": _sentences(payload["description"])[:limit]}
    if name == "caption_rating":
        ref, cand = content_tokens(payload["reference"]), content_tokens(payload["candidate"])
        coverage = round(10 * sum((ref & cand).values()) / max(1, sum(ref.values())))
        return {"coverage": coverage, "naturalness": 7}
    if name == "video_structure":
        subjects = []
        for sentence in _sentences(payload["description"]):
            words = sentence.rstrip(".!?").split()
            subjects.append(
                {
                    "description": " ".join(words[:2]),
                    "attributes": [],
                    "actions": [" ".join(words[2:]) or "is present"],
                }
            )
        return {"subjects": subjects}
    raise KeyError(f"unknown task {name!r}")


class FakeOpenAIServer:
    """Threaded loopback server; use as a context manager. ``base_url`` ends in ``/v1``."""

    def __init__(
        self,
        *,
        latency_s: float = 0.0,
        script: list[str] | None = None,
        faults: dict[str, float] | None = None,
        seed: int = 0,
        answer: Callable[[dict[str, Any]], dict[str, Any]] = oracle_answer,
        hang_s: float = 30.0,
        require_schema: bool = True,
        port: int = 0,
    ):
        for b in [*(script or []), *(faults or {})]:
            if b not in BEHAVIOURS:
                raise ValueError(f"unknown behaviour {b!r}; expected one of {BEHAVIOURS}")
        if sum((faults or {}).values()) > 1:
            raise ValueError("fault rates sum to more than 1")
        self.latency_s = latency_s
        self.script = list(script or [])
        self.faults = dict(faults or {})
        self.answer = answer
        self.hang_s = hang_s
        self.require_schema = require_schema
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.stats: Counter = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.auth_headers: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being answered at the same moment
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        # 0 picks a free port; after the first start the port is kept, so stop() then start()
        # is a server restart at the same address (the judge-outage tests).
        self.port = port
        self._connections: set[socket.socket] = set()  # open client connections (keep-alive)

    @property
    def base_url(self) -> str:
        assert self.port, "server not started"
        return f"http://127.0.0.1:{self.port}/v1"

    def next_behaviour(self) -> str:
        with self._lock:
            if self.script:
                return self.script.pop(0)
            draw, acc = self._rng.random(), 0.0
            for behaviour, rate in self.faults.items():
                acc += rate
                if draw < acc:
                    return behaviour
            return "ok"

    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(_Handler):
            owner = server

        self._stop.clear()
        httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler, bind_and_activate=False)
        httpd.daemon_threads = True

        def handle_error(request, client_address) -> None:
            if not server._stop.is_set():  # a connection cut by stop() is not worth a traceback
                ThreadingHTTPServer.handle_error(httpd, request, client_address)

        httpd.handle_error = handle_error
        httpd.request_queue_size = 256  # a burst of 64+ connects must not hit the listen backlog
        httpd.server_bind()
        httpd.server_activate()
        self.port = httpd.server_address[1]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-openai",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()  # wake hanging handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            # A stopped server must not keep answering on kept-alive connections.
            with self._lock:
                connections = list(self._connections)
            for conn in connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._thread.join(timeout=10)
            self._httpd = None

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    owner: FakeOpenAIServer
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers do
    # Headers and body go out in two writes; with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms per answer), which would distort every latency measurement.
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        with self.owner._lock:
            self.owner._connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def _send(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        self._send(
            status, {"error": {"message": message, "type": "fake_error", "code": status}}, headers
        )

    def do_POST(self) -> None:
        owner = self.owner
        length = int(self.headers.get("Content-Length", 0))
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            return self._error(400, "request body is not JSON")
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(404, f"no route {self.path}")
        fmt = body.get("response_format") or {}
        spec = fmt.get("json_schema")
        bad_fmt = (
            fmt.get("type") != "json_schema" or not isinstance(spec, dict) or "schema" not in spec
        )
        if owner.require_schema and bad_fmt:
            return self._error(400, "response_format of type json_schema is required")
        behaviour = owner.next_behaviour()
        with owner._lock:
            owner.stats["requests"] += 1
            owner.stats[behaviour] += 1
            owner.bodies.append(body)
            owner.auth_headers.add(self.headers.get("Authorization", ""))
            owner.in_flight += 1
            owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
        try:
            # The client may have given up (timeout) before we answer.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._respond(behaviour, body)
        finally:
            with owner._lock:
                owner.in_flight -= 1

    def _respond(self, behaviour: str, body: dict[str, Any]) -> None:
        owner = self.owner
        if behaviour == "hang":
            owner._stop.wait(owner.hang_s)
            self.close_connection = True
            return
        if behaviour == "disconnect":
            self.close_connection = True
            return
        if owner.latency_s:
            time.sleep(owner.latency_s)
        if behaviour.startswith("http_"):
            status = int(behaviour[5:])
            headers = {"Retry-After": "0"} if status == 429 else None
            return self._error(status, f"injected {behaviour}", headers)
        if behaviour == "html":
            data = b"<html><body>502 Bad Gateway</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        if behaviour == "malformed":
            content = '{"verdicts": [{"index": 0, "verdict": "entail'  # cut off mid-answer
        elif behaviour == "invalid":
            content = json.dumps({"verdicts": "all of them", "events": 3, "coverage": 99})
        else:
            answer = owner.answer(body)
            content = answer if isinstance(answer, str) else json.dumps(answer)
        self._send(
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": content},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            },
        )

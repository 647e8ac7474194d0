"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for tests and benchmarks.

It answers canned completions derived from the prompt, counts requests, and misbehaves on purpose
when told to: ``server.faults`` is a queue of modes applied to the next requests, one each:
``429`` (with retry-after), ``500``, ``timeout`` (answers after the client gave up), ``empty``,
``garbage``, ``refusal``, ``401_echo_key`` (an error body that quotes the Authorization header),
``malformed`` (a 200 whose body is not JSON), ``huge`` (a 5 MB answer), ``answer_key`` (an answer
that repeats the Authorization header).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def prompt_kind(text: str) -> tuple[str, tuple[str, ...]]:
    """(kind, class names) of a prompt written by coder_index.textgen.prompts or .released (the
    cvpr24 preset's), the last question winning."""
    if m := re.search(r"different visual features between a (.+?) and a (.+?) in a photo", text):
        return "one_to_one", (m.group(1), m.group(2))
    if m := list(re.finditer(r"different visual features between the (.+?) and the (.+?) in a photo", text)):
        return "one_to_one", (m[-1].group(1), m[-1].group(2))
    if m := list(re.finditer(r"visually similar to (.+?)\. Give me the class name", text)):
        return "analogous_more", (m[-1].group(1),)
    if m := list(re.finditer(r"What other objects are (.+?) visually similar to\?", text)):
        return "analogous", (m[-1].group(1),)
    if m := list(re.finditer(r"What are the synonyms for (.+?)\?", text)):
        return "synonym", (m[-1].group(1),)
    if m := list(re.finditer(r"distinguishing a (.+?) in a photo\?", text)):
        return "attribute", (m[-1].group(1),)
    if m := list(re.finditer(r"What other categories are a (.+?) visually similar to\?", text)):
        return ("analogous_more" if "Do not list" in text else "analogous"), (m[-1].group(1),)
    if m := re.search(r"other names \(synonyms\) for a (.+?),", text):
        return "synonym", (m.group(1),)
    return "unknown", ()


def released_style(text: str) -> bool:
    """The released generator's prompts end with the '_' bullet the answer continues."""
    return text.endswith("\n_")


def default_released_answer(kind: str, names: tuple[str, ...]) -> str:
    """An answer in the released prompts' format ('_' bullets, the first one given by the prompt)."""
    if kind == "one_to_one":
        a, b = names
        return f"{a} trait one\n_{a} trait two\nFor {b}:\n_{b} trait one"
    c = names[0] if names else "?"
    return {"attribute": f"{c} shape\n_{c} colour\n_{c} texture", "synonym": f"{c} alias"}.get(
        kind, f"{c} lookalike\n_{c} cousin")


def default_answer(kind: str, names: tuple[str, ...]) -> str:
    if kind == "attribute":
        c = names[0]
        return f"- {c} shape\n- {c} colour\n- {c} texture"
    if kind in ("analogous", "analogous_more"):
        return f"- {names[0]} lookalike\n- {names[0]} cousin"
    if kind == "synonym":
        return f"- {names[0]} alias"
    if kind == "one_to_one":
        a, b = names
        return f"{a}:\n- {a} trait one\n- {a} trait two\n{b}:\n- {b} trait one"
    return "- ?"


class FakeLLMServer:
    def __init__(self, latency: float = 0.0, answer: Callable[[str, tuple[str, ...]], str] | None = None) -> None:
        self.latency = latency
        self.answer = answer or default_answer
        self.overrides: dict[tuple[str, str], str] = {}  # (kind, class) -> answer
        self.faults: list[str] = []
        self.retry_after = "0.3"
        self.timeout_sleep = 2.0
        self.requests = 0
        self.by_kind: Counter[str] = Counter()
        self.prompts: list[str] = []
        self.messages: list[list[dict[str, str]]] = []  # every request's messages, as sent
        self.params: list[dict[str, Any]] = []  # every request's other fields (model, temperature, max_tokens...)
        self.queues: dict[tuple[str, str], list[str]] = {}  # (kind, class) -> answers, one per request
        self.auth_headers: set[str] = set()
        self.usage_total = [0, 0]
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeLLMServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self) -> None:  # noqa: N802 - http.server API
                length = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server._lock:
                    server.requests += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fault = server.faults.pop(0) if server.faults else None
                    server.auth_headers.add(self.headers.get("Authorization", ""))
                try:
                    self._serve(body, fault)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _serve(self, body: dict[str, Any], fault: str | None) -> None:
                if server.latency:
                    time.sleep(server.latency)
                text = "\n".join(m.get("content", "") for m in body.get("messages", []))
                kind, names = prompt_kind(text)
                with server._lock:
                    server.prompts.append(text)
                    server.messages.append(list(body.get("messages", [])))
                    server.params.append({k: v for k, v in body.items() if k != "messages"})
                    server.by_kind[kind] += 1
                    queue = server.queues.get((kind, names[0] if names else ""))
                    queued = queue.pop(0) if queue else None
                if fault == "429":
                    return self._send(429, {"error": {"message": "rate limited", "type": "rate_limit"}},
                                      {"retry-after": server.retry_after})
                if fault == "500":
                    return self._send(500, {"error": {"message": "upstream broke", "type": "server_error"}})
                if fault == "401_echo_key":
                    key = self.headers.get("Authorization", "")
                    return self._send(401, {"error": {"message": f"Incorrect API key provided: {key}",
                                                      "type": "invalid_request_error"}})
                if fault == "timeout":
                    time.sleep(server.timeout_sleep)
                if fault == "malformed":
                    data = b"<html>502 Bad Gateway</html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                answer = queued if queued is not None else server.overrides.get((kind, names[0] if names else ""))
                if answer is None and released_style(text) and server.answer is default_answer:
                    answer = default_released_answer(kind, names)
                if answer is None:
                    answer = server.answer(kind, names)
                if fault == "empty":
                    answer = ""
                elif fault == "garbage":
                    answer = "}}}{{{ ###"
                elif fault == "refusal":
                    answer = "I'm sorry, but I can't help with that."
                elif fault == "huge":
                    answer = answer + "\n" + "x" * 5_000_000
                elif fault == "answer_key":
                    answer = answer + "\n- your key is " + self.headers.get("Authorization", "")
                usage = (len(text) // 4, len(answer) // 4)
                with server._lock:
                    server.usage_total[0] += usage[0]
                    server.usage_total[1] += usage[1]
                self._send(200, {
                    "id": f"chatcmpl-{server.requests}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "fake"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                              "total_tokens": usage[0] + usage[1]},
                })

        return Handler

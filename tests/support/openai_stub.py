"""A real OpenAI-compatible HTTP server on 127.0.0.1 whose behaviour a test scripts.

The stub serves ``GET /v1/models`` and ``POST /v1/chat/completions`` from a stdlib
``ThreadingHTTPServer`` in a daemon thread. Each chat request consumes the next
:class:`Reply` of the script (the last one repeats) and is recorded, so a test can
count requests and inspect every body the LLM client sent.

Examples
--------
>>> with OpenAIStub() as stub:  # doctest: +SKIP
...     stub.script(Reply(status=500), Reply(content='{"weights": []}'))
...     policy = LLMPolicy("openai/stub", api_base=stub.api_base, ...)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Reply:
    """What the stub answers to one chat request.

    Parameters
    ----------
    content : str
        The assistant message's text (status 200 only).
    status : int
        HTTP status; anything but 200 sends an OpenAI-style error body.
    delay_s : float
        Seconds to wait before answering (cut short when the stub stops).
    tool_call : bool
        Answer ``content`` as the arguments of a tool call instead of as text.
    usage : tuple of int
        Reported prompt and completion tokens.
    """

    content: str = "{}"
    status: int = 200
    delay_s: float = 0.0
    tool_call: bool = False
    usage: tuple[int, int] = (100, 20)


Script = Reply | Callable[[dict[str, Any]], Reply]


def _completion(reply: Reply, model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content}
    finish = "stop"
    if reply.tool_call:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "decide", "arguments": reply.content},
                }
            ],
        }
        finish = "tool_calls"
    p, c = reply.usage
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c},
    }


def _error(status: int) -> dict[str, Any]:
    kinds = {
        401: ("invalid_api_key", "Incorrect API key provided"),
        404: ("model_not_found", "The model does not exist"),
        429: ("rate_limit_exceeded", "Rate limit reached"),
    }
    code, message = kinds.get(status, ("server_error", f"stub error {status}"))
    return {"error": {"message": message, "type": code, "code": code, "param": None}}


class OpenAIStub:
    """A scripted OpenAI-compatible server; use as a context manager."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.raw_bodies: list[bytes] = []
        self._script: list[Script] = [Reply()]
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """Return the port the stub listens on."""
        return int(self._server.server_address[1])

    @property
    def api_base(self) -> str:
        """Return the base URL to give litellm."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def count(self) -> int:
        """Return how many chat requests arrived."""
        with self._lock:
            return len(self.requests)

    def script(self, *replies: Script) -> None:
        """Answer the next requests with ``replies`` in order; the last one repeats."""
        if not replies:
            raise ValueError("script needs at least one reply")
        with self._lock:
            self._script = list(replies)

    def _next(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            self.requests.append(body)
            item = self._script.pop(0) if len(self._script) > 1 else self._script[0]
        return item(body) if callable(item) else item

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/").endswith("/models"):
                    models = [{"id": "stub", "object": "model", "owned_by": "stub"}]
                    self._send(200, {"object": "list", "data": models})
                else:
                    self._send(404, _error(404))

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with stub._lock:
                    stub.raw_bodies.append(raw)
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    self._send(400, _error(400))
                    return
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, _error(404))
                    return
                reply = stub._next(body)
                if reply.delay_s > 0 and stub._stopping.wait(reply.delay_s):
                    return
                if reply.status != 200:
                    self._send(reply.status, _error(reply.status))
                else:
                    self._send(200, _completion(reply, str(body.get("model", ""))))

        return Handler

    def start(self) -> OpenAIStub:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="openai-stub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket (idempotent)."""
        self._stopping.set()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OpenAIStub:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

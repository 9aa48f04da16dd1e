"""The ASGI layer in front of every route: API key, request-body limit, request metrics.

It sits outside FastAPI so a refused request (401, 413) costs no parsing, and so
every response, error or not, is counted with its status code and latency.
"""
from __future__ import annotations

import hmac
import json
import time

PROTECTED = ("/v1/", "/metrics")
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions",
          "/v1/embeddings")


def error_body(message: str, type_: str, code: str | None = None, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "code": code, "param": param}}).encode()


async def send_error(send, status: int, message: str, type_: str, code: str, headers=()) -> None:
    body = error_body(message, type_, code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


def route_label(path: str) -> str:
    """A bounded set of metric labels, whatever paths clients invent."""
    if path in ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/static/"):
        return "/static"
    return "other"


class Gate:
    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, metrics=None):
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_body = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._handle(scope, receive, counting_send)
        finally:
            if self.metrics is not None:
                route = route_label(scope["path"])
                self.metrics.requests.labels(route, str(status[0])).inc()
                self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, scope) -> bool:
        if self.api_key is None or not scope["path"].startswith(PROTECTED):
            return True
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)

    async def _handle(self, scope, receive, send):
        if not self._authorized(scope):
            return await send_error(send, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')",
                                    "authentication_error", "invalid_api_key",
                                    [(b"www-authenticate", b"Bearer")])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_body
            except ValueError:
                return await send_error(send, 400, "invalid Content-Length header",
                                        "invalid_request_error", "invalid_header")
            if too_big:
                return await self._too_large(send)
        # Read the whole body here (bounded), then replay it: chunked uploads obey the limit too.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await self._too_large(send)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # afterwards: the real channel, which reports disconnects

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        await send_error(send, 413, f"request body exceeds the limit of {self.max_body} bytes",
                         "invalid_request_error", "request_too_large")

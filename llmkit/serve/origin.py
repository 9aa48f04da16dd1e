"""Who may talk to the server from a browser: CORS (opt-in) and the Host check.

A server bound to loopback is still reachable from any web page the user opens: a page
on evil.example can make its own name resolve to 127.0.0.1 (DNS rebinding) and then read
the answers, since to the browser that is same-origin. Such requests carry that name in
their Host header, so a loopback server answers only Host names that mean this machine.
CORS is off unless origins are named: then Starlette's CORSMiddleware answers preflights
and marks responses readable by exactly those origins.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from llmkit.errors import LlmkitError
from llmkit.serve.gate import send_error

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def check_origins(origins: list[str]) -> list[str]:
    """`--cors-origin` values: '*' or scheme://host[:port], as browsers send them in Origin."""
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
            raise LlmkitError(f"--cors-origin {origin!r} is not an origin: give scheme://host[:port] "
                              "(as http://localhost:5173) or '*'")
    return [o.rstrip("/") for o in origins]


def host_name(header: bytes) -> str:
    """The name in a Host header, without its port; IPv6 literals without their brackets."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class HostCheck:
    """Answer 403 to any request whose Host is not one of `allowed` (names, any port)."""

    def __init__(self, app, *, allowed: list[str]):
        self.app = app
        self.allowed = {name.lower().strip("[]") for name in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = dict(scope["headers"]).get(b"host")
            name = host_name(host) if host is not None else ""
            if name not in self.allowed:
                if scope["type"] == "websocket":
                    return await send({"type": "websocket.close", "code": 1008})
                shown = repr(name) if host is not None else "(none)"
                return await send_error(send, 403, f"Host {shown} is not served here: this server answers only "
                                        f"{sorted(self.allowed)} (add names with --allowed-host)",
                                        "permission_error", "host_not_allowed")
        await self.app(scope, receive, send)


def guard(app, *, cors_origins: list[str] | None = None, allowed_hosts: list[str] | None = None) -> None:
    """Add CORS (if origins are given) and the Host check (if hosts are given) around `app`."""
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=check_origins(cors_origins),
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)  # outermost: a rebound name gets nothing

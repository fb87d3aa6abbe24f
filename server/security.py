"""Request guards: API keys for /v1, a separate admin token for /admin, a body-size limit.

Keys are compared in constant time and never logged or exported as metrics.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qserve.server.errors import APIError, error_response


@dataclass(frozen=True)
class SecuritySettings:
    api_keys: tuple[str, ...] = ()
    admin_token: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    protect_metrics: bool = False


def _parse_bearer(header: str | None) -> str | None:
    if not header or header[:7].lower() != "bearer ":
        return None
    return header[7:].strip()


def _matches(token: str | None, keys: tuple[str, ...]) -> bool:
    if token is None:
        return False
    ok = False
    for key in keys:  # no early exit: timing does not reveal which key matched
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


def check_api_key(settings: SecuritySettings, authorization: str | None) -> None:
    if settings.api_keys and not _matches(_parse_bearer(authorization), settings.api_keys):
        raise APIError(401, "Incorrect or missing API key (Authorization: Bearer ...)", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})


def check_admin(settings: SecuritySettings, authorization: str | None) -> None:
    if not settings.admin_token:
        raise APIError(403, "admin endpoints are disabled: start the server with --admin-token", code="admin_disabled")
    if not _matches(_parse_bearer(authorization), (settings.admin_token,)):
        raise APIError(401, "a valid admin token is required (Authorization: Bearer ...)", code="invalid_admin_token")


class BodyLimitMiddleware:
    """Pure ASGI middleware (it must see streaming bodies, so not BaseHTTPMiddleware)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await error_response(413, f"request body exceeds {limit} bytes", code="body_too_large")(scope, receive, send)
            return
        seen = 0
        rejected = False

        async def limited_receive() -> Message:
            # A chunked body has no content-length: count it, and past the limit answer 413
            # ourselves and tell the app the client left, so it stops reading.
            nonlocal seen, rejected
            msg = await receive()
            if msg["type"] == "http.request" and not rejected:
                seen += len(msg.get("body", b""))
                if seen > limit:
                    rejected = True
                    await error_response(413, f"request body exceeds {limit} bytes",
                                         code="body_too_large")(scope, receive, send)
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg: Message) -> None:
            if not rejected:
                await send(msg)

        await self.app(scope, limited_receive, guarded_send)

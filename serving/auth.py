"""Bearer-token authentication and the request-header cap, ahead of every route."""

from __future__ import annotations

import hmac

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.errors import error_response


class Authenticate:
    """With a ``token``, every route but /healthz needs ``Authorization: Bearer <token>``; headers larger
    than ``max_header_bytes`` get 431 (before authentication and before the body is read). A plain ASGI
    middleware: Starlette's ``@app.middleware("http")`` wraps every request and response body in extra
    tasks and streams."""

    def __init__(self, app: ASGIApp, token: str | None = None, max_header_bytes: int | None = None):
        self.app, self.token, self.max_header_bytes = app, token, max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            refused = self._refusal(scope)
            if refused is not None:
                return await refused(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> JSONResponse | None:
        limit = self.max_header_bytes
        if limit is not None and sum(len(k) + len(v) for k, v in scope["headers"]) > limit:
            return error_response(431, "headers_too_large", f"request headers exceed {limit // 1024} KiB")
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root):]
        if self.token is None or path == "/healthz":
            return None
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), b"").decode("latin-1")
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return error_response(401, "unauthorized", "missing or wrong bearer token")
        return None

"""One error shape for every failure: ``{"error": {"code", "message"}}`` with the status, whether the
request was refused by the server's own checks (``ApiError``), by Starlette (404, 405), by FastAPI's
validation (422) or failed inside (500, the details stay in the replica's log)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from serving.limits import ApiError


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def no_adapter(adapter_id: str) -> ApiError:
    return ApiError(404, "adapter_not_found", f"adapter {adapter_id[:64]!r} does not exist or has expired")


async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
    response = error_response(exc.status, exc.code, exc.message)
    response.headers.update(exc.headers)
    return response


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    return error_response(422, "invalid_request", f"{where}: {first.get('msg', 'invalid request')}")


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(500, "internal_error", f"{exc.__class__.__name__} (see the replica's log)")


def add_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` in the one shape."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal_error)

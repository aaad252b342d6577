"""What stands in front of the API: an API key, a body size limit, and OpenAI's error object for every
failure (a malformed body, a wrong route, a refused request, a crash), so that a client always gets
JSON it can read, never an HTML page or a bare status.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from smallgpt.api import ErrorBody, ErrorResponse
from smallgpt.errors import SmallGPTError

log = logging.getLogger("smallgpt.serve")


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers=None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class RequireApiKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>`, checked in constant time."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = error_response(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


class BodySizeLimit:
    """ASGI middleware: read at most `max_bytes` of a request body, else answer 413 (chunked bodies too)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending its body
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                limit = f"request body is larger than {self.max_bytes} bytes"
                return await error_response(413, limit, code="body_too_large")(scope, receive, send)
        replayed = False

        async def replay_then_receive():  # hand the app the body once, then the connection's events
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay_then_receive, send)


async def _invalid_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"malformed JSON: {first['ctx']['error']}", code="json_invalid")
    where = [str(part) for part in first["loc"] if part != "body"]
    if not where:  # the body as a whole: missing, not JSON, not an object
        message = f"request body: {first['msg']} (send a JSON object as application/json)"
        return error_response(400, message, code=first["type"])
    return error_response(400, f"{where[0]}: {first['msg']}", param=where[0], code=first["type"])


async def _http_error(request: Request, exc: StarletteHTTPException):
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = str(exc.detail).lower().replace(" ", "_")
    return error_response(exc.status_code, message, code=code, headers=exc.headers)  # 405: Allow


async def _bad_request(request: Request, exc: SmallGPTError):
    return error_response(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))


async def _server_error(request: Request, exc: Exception):
    log.exception("unexpected error")
    return error_response(500, f"internal error: {type(exc).__name__}")


ERROR_HANDLERS = {
    RequestValidationError: _invalid_request,
    StarletteHTTPException: _http_error,
    SmallGPTError: _bad_request,
    Exception: _server_error,
}

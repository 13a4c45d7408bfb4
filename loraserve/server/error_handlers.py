"""Every error the server answers with, in OpenAI's shape, and the record it leaves: a count by reason in
/metrics (loraserve_requests_refused / loraserve_requests_failed) and one log line per refused or failed
request. A 500 carries an id that matches its log line, never the exception's text."""
from __future__ import annotations

import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from loraserve.errors import AdapterSourceError, EngineDeadError, LoRAError, ParamError, RequestFailedError
from loraserve.server.metrics import ServerMetrics
from loraserve.server.protocol import APIError, bad_request, param_error

logger = logging.getLogger(__name__)
request_log = logging.getLogger("loraserve.requests")


class ClientGone(Exception):
    """The client closed the connection before its response was ready."""


def internal_error(exc: BaseException, context: str) -> APIError:
    """A 500 with an id; the exception goes to the log under that id only."""
    error_id = uuid.uuid4().hex[:16]
    logger.error("%s [error id %s]", context, error_id, exc_info=exc)
    error = APIError(500, f"internal error (id {error_id}); the server's log has the details under this id",
                     reason="internal_error")
    error.error_id = error_id
    return error


def engine_error(exc: EngineDeadError | RequestFailedError) -> APIError:
    """What a client is told when the engine could not finish its request: a 503 when the engine stopped
    (shut down, or dead: a supervisor restarts it), a 500 when this request's computation failed."""
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"generation stopped: {exc}; retry on a healthy server", reason="engine_stopped")
    return APIError(500, str(exc), reason=exc.reason)


class ErrorReporter:
    """Counts and logs each refused or failed request once."""

    def __init__(self, metrics: ServerMetrics) -> None:
        self.metrics = metrics

    def __call__(self, error: APIError, tenant: str, method: str, path: str) -> None:
        counter = self.metrics.refused if error.refusal else self.metrics.failed
        counter.labels(error.reason).inc()
        fields = {"event": "request_refused" if error.refusal else "request_failed", "status": error.status,
                  "reason": error.reason, "tenant": tenant, "method": method, "path": path}
        if error.error_id is not None:
            fields["error_id"] = error.error_id
        text = " ".join(f"{key}={value}" for key, value in fields.items())
        (request_log.info if error.refusal else request_log.warning)(text, extra={"fields": fields})

    def scope(self, scope: dict, error: APIError) -> None:
        """Report an error met while handling the ASGI `scope`."""
        principal = scope.get("state", {}).get("principal")
        self(error, principal.tenant if principal is not None else "-", scope.get("method", ""),
             scope.get("path", ""))


def validation_error(exc: RequestValidationError) -> APIError:
    """The first problem, with the parameter it concerns (a dotted path such as messages.0.content)."""
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
    param = (error.get("ctx") or {}).get("param")
    if param is not None:
        return bad_request(error["msg"], param)
    loc = [str(part) for part in error["loc"] if part != "body"]
    param = ".".join(loc) or None
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown parameter; loraserve does not accept it (see the OpenAI API reference for the names)"
    elif error["type"] == "missing":
        message = "this parameter is required"
    return bad_request(f"{param}: {message}" if param else f"the request body is invalid: {message}", param)


def as_api_error(exc: Exception) -> APIError | None:
    """The answer for an error the client can act on, or None for a bug."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestValidationError):
        return validation_error(exc)
    if isinstance(exc, ParamError):  # a parameter the client can fix; any other ValueError is a bug (500)
        return param_error(exc)
    if isinstance(exc, AdapterSourceError):
        return APIError(403, str(exc), "lora_path", "forbidden", reason="adapter_source")
    if isinstance(exc, LoRAError):
        return bad_request(str(exc), "model")
    if isinstance(exc, HTTPException):
        return APIError(exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    if isinstance(exc, (EngineDeadError, RequestFailedError)):
        return engine_error(exc)
    return None


def install_error_handlers(app: FastAPI, report: ErrorReporter) -> None:
    async def handle(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientGone):
            return Response(status_code=499)
        error = as_api_error(exc) or internal_error(exc, f"{request.method} {request.url.path} failed")
        report.scope(request.scope, error)
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    for kind in (APIError, RequestValidationError, ParamError, LoRAError, HTTPException, EngineDeadError,
                 RequestFailedError, ClientGone, Exception):
        app.add_exception_handler(kind, handle)

"""Every error a client can see, defined once; ``app.py`` maps them to HTTP in one handler.

Messages say what to fix. Nothing here carries request text or internal exception strings.
"""


class ApiError(Exception):
    """An error with an HTTP status and an OpenAI-shaped body: {"error": {message, type, param, code}}."""

    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    @property
    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(ApiError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class EmptyInput(InvalidRequest):
    """A request with an empty list of inputs (TEI's routes answer it apart: 400, ``Empty``)."""


class TooManyInputs(InvalidRequest):
    """A request with more inputs than ``EMBEDSERVE_MAX_INPUTS_PER_REQUEST`` (TEI's routes: 413)."""


class Unauthorized(ApiError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status_code = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFound(ApiError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ApiError):
    status_code = 409
    error_type = "invalid_request_error"
    code = "conflict"


class Overloaded(ApiError):
    """The gateway is at capacity; the client should retry after ``retry_after_s`` seconds."""

    status_code = 429
    error_type = "rate_limit_error"
    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class InferenceFailed(ApiError):
    """The backend could not compute a batch for a reason that is no client's (a model that fails on its
    input); logged with its cause where it happened."""

    status_code = 500
    error_type = "server_error"
    code = "inference_failed"


class ServiceUnavailable(ApiError):
    """A dependency this route needs (inference backend, vector store) is not available."""

    status_code = 503
    error_type = "server_error"
    code = "service_unavailable"

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class DeadlineExceeded(ApiError):
    status_code = 504
    error_type = "server_error"
    code = "timeout"

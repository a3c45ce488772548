"""ASGI middleware: a request body over ``max_bytes`` is refused with 413 before it is all in memory.

Checked against Content-Length up front and counted as a chunked body arrives. The refusal is raised
as an HTTPException from the app's own reading of the body, so it gets the one error mapping every
other error gets (OpenAI's shape), the access log and the request metrics.
"""

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.edge.access import header_value


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(header_value(scope, b"content-length"))
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if declared is not None and declared > self.max_bytes:
                raise self._too_large(f"{declared} bytes")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large(f"more than {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)

    def _too_large(self, size: str) -> HTTPException:
        return HTTPException(
            413,
            f"The request body has {size}, over the limit of {self.max_bytes}; split it into several requests "
            "(EMBEDSERVE_MAX_REQUEST_BYTES sets the limit).",
        )


def _content_length(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None

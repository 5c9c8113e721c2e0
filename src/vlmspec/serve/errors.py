"""HTTP errors in the OpenAI shape: `{"error": {"message", "type", "param", "code"}}`, so OpenAI clients raise
their usual exceptions (BadRequestError, AuthenticationError, NotFoundError, …) with our message."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from pydantic import ValidationError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class APIError(Exception):
    """A request the server refuses: `status` (4xx/5xx), a message that names the problem, and the request
    field at fault (`param`) when there is one."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# Union branches appear in pydantic's error locations as type names; they are not request fields.
TYPE_STEPS = {"str", "int", "float", "bool", "none", "dict", "list"}


def field_name(location: tuple) -> str:
    """pydantic's error location → the request field as a client wrote it: `messages[0].content`."""
    name = ""
    for part in location:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in TYPE_STEPS or "[" in part or part[:1].isupper():
            continue
        else:
            name += f".{part}" if name else part
    return name or "body"


def from_validation(error: ValidationError) -> APIError:
    """One schema problem as a 400 naming its field: of a union's failed branches, the one that got furthest into
    the request (a list of parts with a bad part says more than "not a string")."""
    errors = error.errors(include_url=False)
    deepest = max(errors, key=lambda e: len(field_name(tuple(e["loc"]))))
    field = field_name(tuple(deepest["loc"]))
    message = deepest["msg"].removeprefix("Value error, ")
    if deepest["type"] == "extra_forbidden":
        message = "this field is not supported by this server"
    return APIError(400, f"{field}: {message}", param=field)

"""Request errors the engine raises; `status`, `type`, `param`, `code` map onto OpenAI's error body."""

from __future__ import annotations

from loraforge.errors import LoraforgeError


class RequestError(LoraforgeError):
    """A request the engine refuses; `status`, `type`, `param` and `code` map onto OpenAI's error body."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class UnknownModelError(RequestError):
    status = 404
    code = "model_not_found"

    def __init__(self, name: str, served: list[str]):
        super().__init__(f"The model '{name}' does not exist. Served models: {', '.join(served)}", "model")
        self.name = name


class ContextLengthError(RequestError):
    code = "context_length_exceeded"


class InvalidParameterError(RequestError):
    code = "invalid_value"



"""OpenAI-compatible HTTP API over an engine: POST /v1/completions, GET /v1/models, GET /health.

`build_app(engine)` works on any object with `models()` and `complete(...)`, so the app is tested
with FastAPI's TestClient without Ray; the Ray Serve deployment serves the very same app.
Every error, FastAPI's own included, is returned in OpenAI's shape:
`{"error": {"message", "type", "param", "code"}}`; malformed bodies get 400, not FastAPI's 422.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from loraforge.serve.engine import Completion, RequestError, UnknownModelError

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


class CompletionEngine(Protocol):
    def models(self) -> list[str]: ...

    def complete(
        self,
        prompt: str,
        model: str,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: list[str] | None,
        seed: int | None,
    ) -> Completion: ...


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request this server honours; other fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    # Accepted only at the values that mean "off", so common clients that send them still work.
    stream: Literal[False] = False
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"only one prompt per request is supported, got a list of {len(v)}")
        return v

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(v)}")
        return v

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt

    def stop_list(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type_, param, code))


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    """One readable line per problem, and the first offending field as OpenAI's `param`."""
    parts: list[str] = []
    params: list[str] = []
    for e in err.errors():
        if e.get("type") == "json_invalid":  # its loc is a character offset, not a field
            part = f"the body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
        else:
            loc = [str(p) for p in e.get("loc", ()) if p != "body"]
            # Union members add a location part ("prompt.str"); the field name alone is what users sent.
            field = loc[0] if loc else None
            if field and field not in params:
                params.append(field)
            part = f"{field}: {e.get('msg')}" if field else str(e.get("msg"))
        if part not in parts:
            parts.append(part)
    return "Invalid request: " + "; ".join(parts), (params[0] if params else None)


def completion_response(model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": c.text, "index": 0, "finish_reason": c.finish_reason, "logprobs": None}],
        "usage": {
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens,
        },
    }


def build_app(engine: CompletionEngine, owned_by: str = "loraforge") -> FastAPI:
    app = FastAPI(title="loraforge", summary="OpenAI-compatible completions for a base model and its adapters")
    created = int(time.time())

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": owned_by}

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error_response(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception) -> JSONResponse:
        log.exception("completion failed")
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(name) for name in engine.models()]}

    @app.get("/v1/models/{name}")
    def get_model(name: str) -> dict[str, Any]:
        served = engine.models()
        if name not in served:
            raise UnknownModelError(name, served)
        return model_card(name)

    # A plain `def`: FastAPI runs it in a worker thread, so generation never blocks the event loop.
    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict[str, Any]:
        result = engine.complete(
            prompt=req.prompt_text(),
            model=req.model,
            max_tokens=16 if req.max_tokens is None else req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop_list(),
            seed=req.seed,
        )
        return completion_response(req.model, result)

    return app

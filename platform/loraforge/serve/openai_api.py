"""OpenAI-compatible HTTP API over a streaming engine.

Routes: GET /v1/models[/{name}], POST /v1/completions, POST /v1/chat/completions (`stream: true` sends
server-sent events in OpenAI's chunk format), the adapter admin routes under /v1/admin/adapters, and
GET /health. `build_app(engine, ...)` needs no Ray, so it is tested with FastAPI's TestClient; the Ray
Serve deployment serves the very same app.

Every error, FastAPI's own included, is returned in OpenAI's shape `{"error": {"message", "type",
"param", "code"}}`; malformed bodies get 400, not FastAPI's 422. An error after a stream has started
is sent as one SSE event carrying that body (the openai client raises it), then `[DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraforge.errors import LoraforgeError
from loraforge.serve.auth import ApiKeyRule, KeyRing, check_admin, check_model_access
from loraforge.serve.engine import (
    BASE_ALIAS,
    Completion,
    InvalidParameterError,
    RequestError,
    SamplingParams,
    UnknownModelError,
)
from loraforge.spec import ADAPTER_NAME_PATTERN

log = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4  # OpenAI's limit
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions; chat uses it too, so answers have a known bound
REPLICA_HEADER = "X-Loraforge-Replica"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# ---------------------------------------------------------------- what the app needs from its parts
class StreamingEngine(Protocol):
    base_name: str

    def models(self) -> list[str]: ...

    def model_info(self) -> list[Any]: ...  # ModelInfo

    def submit(self, prompt: str, model: str, params: SamplingParams) -> Any: ...  # RequestStream

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...

    def add_adapter(self, name: str, folder: str | Path, *, pin: bool = False) -> Any: ...

    def remove_adapter(self, name: str) -> None: ...


class AdapterAdmin(Protocol):
    """Where added and removed adapters are recorded: this engine only, or a registry all replicas follow."""

    failed: dict[str, str]

    def add(self, name: str, source: str, pin: bool) -> None: ...

    def remove(self, name: str) -> None: ...

    def sync(self, rescan: bool = False) -> bool: ...


class LocalAdapterAdmin:
    """Admin backend for a single engine without Ray: sources resolve to folders and go straight in."""

    def __init__(self, engine: StreamingEngine, resolve: Callable[[str], Path]):
        self.engine, self.resolve = engine, resolve
        self.failed: dict[str, str] = {}

    def add(self, name: str, source: str, pin: bool) -> None:
        self.engine.add_adapter(name, self.resolve(source), pin=pin)

    def remove(self, name: str) -> None:
        self.engine.remove_adapter(name)

    def sync(self, rescan: bool = False) -> bool:
        return False


class InvalidAdapterError(RequestError):
    code = "invalid_adapter"


# ---------------------------------------------------------------- request bodies
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _SamplingFields(BaseModel):
    """Fields shared by both generation routes; others are refused, or accepted only at their 'off' value
    so that common clients which send them still work."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0] = 0
    frequency_penalty: Literal[0] = 0
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(v)}")
        return v

    @model_validator(mode="after")
    def _options_need_stream(self) -> _SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    def params(self, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return SamplingParams(
            max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=self.temperature, top_p=self.top_p, stop=tuple(s for s in stop if s), seed=self.seed,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    best_of: Literal[1] | None = None
    suffix: None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError(f"only one prompt per request is supported, got a list of {len(v)}")
        return v

    def prompt_text(self) -> str:
        return self.prompt[0] if isinstance(self.prompt, list) else self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_message(self) -> dict[str, str]:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        # "developer" is OpenAI's newer name for the system role; chat templates know "system".
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: Literal[False] | None = None

    @model_validator(mode="after")
    def _one_limit(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give max_tokens or max_completion_tokens, not both")
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class AddAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=ADAPTER_NAME_PATTERN)
    source: str = Field(min_length=1, description="adapter folder, or runs:/... / models:/... in MLflow")
    pin: bool = False


# ---------------------------------------------------------------- response bodies
def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _error_response(status: int, message: str, type_: str, param: str | None = None,
                    code: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, type_, param, code))


def _request_error_body(err: Exception) -> dict[str, Any]:
    if isinstance(err, RequestError):
        return error_body(err.message, err.type, err.param, err.code)
    return error_body(f"internal error: {type(err).__name__}: {err}", "server_error")


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
            msg = str(e.get("msg"))
            # A model-level check names its field first ("stream_options: ..."), pydantic puts "Value error, ".
            head = msg.removeprefix("Value error, ").split(":", 1)[0]
            if field is None and head.isidentifier() and head != msg:
                field, msg = head, msg.removeprefix("Value error, ")
            if field and field not in params:
                params.append(field)
            part = msg if msg.startswith(f"{field}:") else (f"{field}: {msg}" if field else msg)
        if part not in parts:
            parts.append(part)
    return "Invalid request: " + "; ".join(parts), (params[0] if params else None)


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": c.text, "index": 0, "finish_reason": c.finish_reason, "logprobs": None}],
        "usage": _usage(c.prompt_tokens, c.completion_tokens),
    }


def chat_response(model: str, c: Completion) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "finish_reason": c.finish_reason, "logprobs": None}],
        "usage": _usage(c.prompt_tokens, c.completion_tokens),
    }


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _ChunkWriter:
    """OpenAI stream chunks for one request: text_completion, or chat.completion.chunk with the role first."""

    def __init__(self, chat: bool, model: str, include_usage: bool):
        self.chat, self.model, self.include_usage = chat, model, include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, text: str | None, finish_reason: str | None, role: bool = False) -> str:
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
        body: dict[str, Any] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                                "created": self.created, "model": self.model, "choices": [choice]}
        if self.include_usage:
            body["usage"] = None
        return _sse(body)

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        return _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.model, "choices": [],
                     "usage": _usage(prompt_tokens, completion_tokens)})


async def _collect(stream: Any) -> Completion:
    """Drain a RequestStream without holding a thread."""
    parts: list[str] = []
    last = None
    async for delta in stream:
        parts.append(delta.text)
        last = delta
    if last is None or last.finish_reason is None:
        raise LoraforgeError(f"request {stream.id} ended without a final delta")
    return Completion("".join(parts), last.prompt_tokens, last.completion_tokens, last.finish_reason)


async def _event_stream(stream: Any, writer: _ChunkWriter) -> AsyncIterator[str]:
    prompt_tokens, completion_tokens = stream.prompt_tokens, 0
    try:
        if writer.chat:
            yield writer.chunk("", None, role=True)
        async for delta in stream:
            completion_tokens = delta.completion_tokens
            if writer.chat:
                if delta.text:
                    yield writer.chunk(delta.text, None)
                if delta.finish_reason is not None:
                    yield writer.chunk(None, delta.finish_reason)
            elif delta.text or delta.finish_reason is not None:
                yield writer.chunk(delta.text, delta.finish_reason)
        if writer.include_usage:
            yield writer.usage(prompt_tokens, completion_tokens)
    except Exception as err:  # the status line is sent already: report the error in the stream
        if not isinstance(err, RequestError):
            log.exception("streamed request %s failed", stream.id)
        yield _sse(_request_error_body(err))
    finally:
        stream.cancel()  # a no-op once finished; frees the slot when the client went away
    yield _sse("[DONE]")


class _ReplicaHeader:
    """ASGI middleware naming the replica that answered, so tests and operators can tell replicas apart."""

    def __init__(self, app: ASGIApp, replica_id: str):
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), replica_id.encode())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), self.header]
            await send(message)

        await self.app(scope, receive, send_with_header if scope["type"] == "http" else send)


# ---------------------------------------------------------------- the app
def _caller(request: Request) -> ApiKeyRule | None:
    """The caller's API key rule (None when the app has no keys); 401 without a valid key."""
    return request.app.state.keys.authenticate(request.headers.get("authorization"))


Caller = Annotated[ApiKeyRule | None, Depends(_caller)]


def build_app(
    engine: StreamingEngine,
    *,
    keys: KeyRing | None = None,
    admin: AdapterAdmin | None = None,
    replica_id: str | None = None,
    owned_by: str = "loraforge",
) -> FastAPI:
    """The FastAPI app. `keys`: API keys (none: open). `admin`: enables /v1/admin/adapters and is asked to
    catch up with the registry before a request for an unknown model is refused."""
    keys = keys or KeyRing()
    docs = {} if not keys.enabled else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="loraforge", summary="OpenAI-compatible API for a base model and its LoRA adapters", **docs)
    if replica_id:
        app.add_middleware(_ReplicaHeader, replica_id=replica_id)
    app.state.keys = keys
    created = int(time.time())
    base_names = (engine.base_name, BASE_ALIAS)

    def model_cards(rule: ApiKeyRule | None) -> list[dict[str, Any]]:
        served = [(info.name, {"kind": info.kind, "state": info.state, "content_hash": info.content_hash,
                               "rank": info.rank, "pinned": info.pinned}) for info in engine.model_info()]
        failed = [(name, {"kind": "adapter", "state": "failed", "content_hash": None, "rank": None,
                          "pinned": False, "error": error})
                  for name, error in sorted((admin.failed if admin else {}).items())]
        return [{"id": name, "object": "model", "created": created, "owned_by": owned_by, **fields}
                for name, fields in served + failed if rule is None or rule.may_use(name, base_names)]

    async def submit(model: str, prompt: str, params: SamplingParams, rule: ApiKeyRule | None) -> Any:
        check_model_access(rule, model, base_names)
        try:
            return await run_in_threadpool(engine.submit, prompt, model, params)
        except UnknownModelError:
            # Another replica may have just added it: catch up with the registry (and the adapter folder) once.
            if admin is None or not await run_in_threadpool(admin.sync, True):
                raise
            return await run_in_threadpool(engine.submit, prompt, model, params)

    async def respond(req: _SamplingFields, stream: Any, chat: bool) -> Any:
        if req.stream:
            writer = _ChunkWriter(chat, req.model, req.include_usage)
            return StreamingResponse(_event_stream(stream, writer), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        try:
            result = await _collect(stream)
        finally:
            stream.cancel()  # no-op when finished; frees the slot if this handler was cancelled
        return (chat_response if chat else completion_response)(req.model, result)

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
        log.exception("request failed")
        return _error_response(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    def health(_: Caller) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models(rule: Caller) -> dict[str, Any]:
        return {"object": "list", "data": model_cards(rule)}

    @app.get("/v1/models/{name}")
    async def get_model(name: str, rule: Caller) -> dict[str, Any]:
        check_model_access(rule, name, base_names)
        for _ in range(2):
            card = next((c for c in model_cards(rule) if c["id"] == name or
                         (name == BASE_ALIAS and c["kind"] == "base")), None)
            if card is not None:
                return card
            if admin is None or not await run_in_threadpool(admin.sync, True):
                break
        raise UnknownModelError(name, engine.models())

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, rule: Caller) -> Any:
        stream = await submit(req.model, req.prompt_text(), req.params(req.max_tokens), rule)
        return await respond(req, stream, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, rule: Caller) -> Any:
        check_model_access(rule, req.model, base_names)
        messages = [m.as_template_message() for m in req.messages]
        try:
            prompt = await run_in_threadpool(engine.render_chat, messages)
        except RequestError:
            raise
        except (ValueError, LoraforgeError) as err:  # a template may refuse e.g. two system messages
            raise InvalidParameterError(f"messages: the chat template refused them: {err}", "messages") from None
        stream = await submit(req.model, prompt, req.params(req.token_limit), rule)
        return await respond(req, stream, chat=True)

    # -- adapter administration
    def require_admin(rule: ApiKeyRule | None) -> AdapterAdmin:
        check_admin(rule, keys)
        if admin is None:
            raise StarletteHTTPException(404, "adapter administration is not enabled on this server")
        return admin

    def adapter_cards(rule: ApiKeyRule | None) -> list[dict[str, Any]]:
        return [c for c in model_cards(rule) if c["kind"] == "adapter"]

    @app.get("/v1/admin/adapters")
    def list_adapters(rule: Caller) -> dict[str, Any]:
        require_admin(rule)
        return {"object": "list", "data": adapter_cards(rule)}

    @app.post("/v1/admin/adapters", status_code=201)
    async def add_adapter(body: AddAdapterRequest, rule: Caller) -> dict[str, Any]:
        backend = require_admin(rule)
        if body.name in base_names:
            raise InvalidAdapterError(f"the name '{body.name}' is the base model's", "name")
        try:
            await run_in_threadpool(backend.add, body.name, body.source, body.pin)
        except RequestError:
            raise
        except LoraforgeError as err:  # a source that does not resolve, or a folder that is no adapter
            raise InvalidAdapterError(str(err), "source") from None
        return next(c for c in adapter_cards(rule) if c["id"] == body.name)

    @app.delete("/v1/admin/adapters/{name}")
    async def remove_adapter(name: str, rule: Caller) -> dict[str, Any]:
        backend = require_admin(rule)
        await run_in_threadpool(backend.remove, name)
        return {"id": name, "object": "model", "deleted": True}

    return app

"""The FastAPI app: OpenAI chat completions (plain and SSE-streamed) over a started `Engine`, plus /v1/models,
/health, /metrics and the one-page web client at /.

Every refusal is an `APIError` raised before the request reaches the engine, except the two checks that need the
encoded prompt (the target's own input checks, and prompt + max_tokens against the context), which the engine's
synchronous `submit` makes. A client that goes away cancels its request, which frees its engine slots."""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from vlmspec import GenerationResult
from vlmspec.serve.config import ServeConfig
from vlmspec.serve.errors import APIError, from_validation
from vlmspec.serve.images import load_images
from vlmspec.serve.metrics import ServerMetrics
from vlmspec.serve.pieces import TokenPieces
from vlmspec.serve.responses import Reply, answer_stats, finish_reason
from vlmspec.serve.schema import ChatRequest

if TYPE_CHECKING:
    from vlmspec import Engine
    from vlmspec.request import Request as Handle

logger = logging.getLogger("vlmspec.serve")

# The page runs only its own inline script and talks only to this server.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
               "connect-src 'self'; base-uri 'none'; form-action 'none'")


def create_app(engine: Engine, config: ServeConfig, draining: Callable[[], bool] = lambda: False) -> FastAPI:
    """`engine`: a `vlmspec.Engine` (started and stopped with the app). `draining()` is true once the server has
    been told to stop (SIGTERM): new requests then get 503 while running ones finish."""
    metrics = ServerMetrics(lambda: engine.num_running, lambda: engine.num_waiting)
    tokenizer = engine.target.tokenizer
    submit_lock = threading.Lock()
    page = resources.files("vlmspec.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop, True)

    app = FastAPI(title="vlmspec", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        return APIError(error.status_code, f"{error.detail}: {request.method} {request.url.path}").response()

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest takes the same time wherever the strings differ: the key cannot be guessed bytewise.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")

    api = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    @api.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlmspec", "context_length": engine.context_length}]}

    @api.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.perf_counter()
        try:
            chat, handle = await admit(request)
        except APIError as error:
            metrics.requests.labels(status=str(error.status)).inc()
            raise
        reply = Reply(config.model_name)
        if chat.stream:
            return EventSourceResponse(stream(handle, chat, reply, arrived), sep="\n",
                                       shutdown_grace_period=config.shutdown_grace_seconds)
        return await complete(request, handle, reply, arrived)

    def submit(**kwargs: Any) -> Handle:
        # One encode at a time: a HF fast tokenizer used from several threads at once can fail ("Already
        # borrowed"), and the encodes are short beside the decoding they queue for.
        with submit_lock:
            return engine.submit(**kwargs)

    async def admit(request: Request) -> tuple[ChatRequest, Handle]:
        """Parse and check the request, decode its images, submit it to the engine."""
        if draining():
            raise APIError(503, "the server is shutting down and admits no new requests")
        chat = parse_request(await read_body(request, config.max_body_bytes))
        if chat.model != config.model_name:
            raise APIError(404, f"model {chat.model!r} not found: this server serves {config.model_name!r}",
                           param="model")
        context, budget = engine.context_length, chat.budget
        if budget is not None and budget >= context:
            raise APIError(400, f"max_tokens {budget} does not fit the model's context of {context} tokens "
                                f"(the prompt counts too)", param="max_tokens")
        if engine.num_waiting >= config.max_waiting:
            raise APIError(503, f"the server is busy ({engine.num_waiting} requests waiting); retry later")
        images = await run_in_threadpool(load_images, chat.image_urls(), config.images)
        try:
            handle = await run_in_threadpool(
                submit, images=images, messages=chat.hf_messages(),
                max_new_tokens=context if budget is None else budget, temperature=chat.temperature,
                top_p=chat.top_p, top_k=chat.top_k, seed=chat.seed, stop=chat.stop_strings)
        except ValueError as error:
            raise APIError(400, str(error), param="messages") from None
        except RuntimeError as error:                  # the engine is stopping
            raise APIError(503, str(error)) from None
        if budget is not None and handle.prompt_tokens + budget > context:
            engine.cancel(handle)
            raise APIError(400, f"the prompt is {handle.prompt_tokens} tokens and max_tokens is {budget}: "
                                f"{handle.prompt_tokens + budget} tokens do not fit the model's context of "
                                f"{context}", param="max_tokens")
        return chat, handle

    async def complete(request: Request, handle: Handle, reply: Reply, arrived: float) -> Response:
        """A non-streamed answer; a client that disconnects meanwhile cancels the request."""
        result = None

        async def cancel_on_disconnect(scope: anyio.CancelScope) -> None:
            while not await request.is_disconnected():
                await anyio.sleep(0.25)
            scope.cancel()

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(cancel_on_disconnect, group.cancel_scope)
                first = True
                async for event in handle.aevents():
                    if isinstance(event, GenerationResult):
                        result = event
                    elif first and event.token_ids:
                        metrics.time_to_first_token.observe(time.perf_counter() - arrived)
                        first = False
                group.cancel_scope.cancel()
        finally:
            if result is None:        # the client went away, or the handler was cancelled: free the slots now
                engine.cancel(handle)
        if result is None or result.finish_reason in UNFINISHED:
            error = unfinished(handle, result)
            metrics.requests.labels(status="499" if result is None else str(error.status)).inc()
            return error.response()
        finished(result, arrived)
        return JSONResponse(reply.completion(result, handle.prompt_tokens))

    async def stream(handle: Handle, chat: ChatRequest, reply: Reply, arrived: float) -> AsyncIterator[dict[str, str]]:
        """SSE events: a role chunk, one chunk per engine chunk (its text, and per token its id, text piece and
        source), a chunk with the finish reason and the answer's τ, the usage chunk if asked, then [DONE]."""
        usage = chat.include_usage
        pieces = TokenPieces(tokenizer)
        first, sent, result, failed = True, "", None, False
        try:
            yield event(reply.chunk({"role": "assistant", "content": ""}, with_usage=usage))
            async for item in handle.aevents():
                if isinstance(item, GenerationResult):
                    result = item
                    continue
                if first and item.token_ids:
                    metrics.time_to_first_token.observe(time.perf_counter() - arrived)
                    first = False
                tokens = {"token_ids": item.token_ids, "sources": item.sources, "pieces": pieces.add(item.token_ids)}
                sent += item.text
                yield event(reply.chunk({"content": item.text}, extension=tokens, with_usage=usage))
            if result is None or result.finish_reason in UNFINISHED:
                error = unfinished(handle, result)
                metrics.requests.labels(status=str(error.status)).inc()
                yield event(error.body())            # the stream has started: the client hears it in-band
                return
            finished(result, arrived)
            # Text held back at the end (a token that ends inside a character) comes with the finish reason.
            rest = {"content": result.text[len(sent):]} if result.text != sent and result.text.startswith(sent) else {}
            yield event(reply.chunk(rest, finish=finish_reason(result), with_usage=usage,
                                    extension={"answer": answer_stats(result), "rest": pieces.rest()}))
            if usage:
                yield event(reply.usage_chunk(result, handle.prompt_tokens))
            yield {"data": "[DONE]"}
        except Exception as error:  # noqa: BLE001 - the stream has started: the client can only hear it in-band
            logger.exception("streaming failed")
            failed = True
            metrics.requests.labels(status="500").inc()
            yield event(APIError(500, f"streaming failed: {error}").body())
        finally:
            if result is None:        # the client went away, the server is stopping, or generation failed
                engine.cancel(handle)
                if not failed:
                    metrics.requests.labels(status="499").inc()

    def finished(result: GenerationResult, arrived: float) -> None:
        metrics.requests.labels(status="200").inc()
        metrics.request_seconds.observe(time.perf_counter() - arrived)
        metrics.finished(result.stats)

    app.include_router(api)

    @app.get("/health")
    async def health() -> JSONResponse:
        if draining():
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok", "model": config.model_name, "running": engine.num_running,
                             "waiting": engine.num_waiting})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def web_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY})

    return app


UNFINISHED = ("cancelled", "error")


def unfinished(handle: Handle, result: GenerationResult | None) -> APIError:
    """Why a request has no answer: the engine failed it (500), or it was cancelled (the server is stopping)."""
    if result is not None and result.finish_reason == "error":
        return APIError(500, f"generation failed in the engine: {handle.error}")
    return APIError(503, "the request was cancelled before it finished")


def event(payload: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(payload, separators=(",", ":"))}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (the declared length is checked first)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body of {declared} bytes is over the limit of {limit} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body is over the limit of {limit} bytes")
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request body") from None
    return bytes(body)


def parse_request(body: bytes) -> ChatRequest:
    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    if not body.strip():
        raise APIError(400, "the request body is empty: send a JSON chat completion request")
    try:
        payload = json.loads(body, parse_constant=refuse_constant)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON: {error}") from None
    if not isinstance(payload, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(payload).__name__}")
    try:
        return ChatRequest.model_validate(payload)
    except ValidationError as error:
        raise from_validation(error) from None

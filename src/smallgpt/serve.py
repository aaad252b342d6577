"""Serving: an OpenAI-compatible completions API and a browser playground over one model.

    POST /v1/completions   OpenAI's completions API: prompt (string or list), max_tokens, temperature,
                           top_p, top_k (an extension), n, stop, seed, stream (server-sent events)
    GET  /v1/models        the one model served          GET /health   liveness, limits, load
    GET  /                 the playground (static/playground.html)
    GET  /openapi.json     the schema (and /docs to browse it)

How requests share the model: one worker thread, one token at a time, round-robin.
Every completion choice is a `Generator.stream` iterator. An asyncio task per choice hands the
iterator's next step to a single-thread executor and waits. The executor runs its queue first in,
first out, so the torch work never blocks the event loop, two forward passes never fight over the same
cores, and the active choices advance in turn: a long generation cannot starve a short one. A choice
passes its text deltas to its response through a small bounded queue, so a client that reads slowly
pauses only its own choices (backpressure) and never the others. Between tokens the response checks
that its client is still connected; when it has gone, the choice tasks are cancelled and their
iterators closed on the worker thread, so no more tokens are spent on it. (Batched decoding across
requests would raise throughput on a GPU; on a CPU with one small model, taking turns keeps the code
small and latency fair.)

Bad input gets OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with status
400 for any invalid request (malformed JSON, wrong types, out-of-range values, max_tokens above the
configured cap, unsupported OpenAI fields), 404 for unknown routes, 405 for wrong methods and 413 for
bodies over the size limit. A prompt longer than the model's context is not an error: the model sees
its last `block_size` tokens (truncated from the left), and `usage.prompt_tokens` counts the whole prompt.
"""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import replace
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from smallgpt.checkpoint import WEIGHTS_NAME
from smallgpt.errors import SmallGPTError
from smallgpt.generate import Completion, Generator, SamplingParams
from smallgpt.model import GPT

log = logging.getLogger("smallgpt.serve")

DEFAULT_MAX_TOKENS_CAP = 2048
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more text than any context holds
MAX_CHOICES = 16  # prompts x n per request
MAX_STOP_STRINGS = 4  # as OpenAI
SEED_RANGE = 2**64  # torch.Generator.manual_seed takes any integer in [-2**63, 2**64)

# --- request and response bodies (they are also the OpenAPI schema) ---


class CompletionRequest(BaseModel):
    """A completions request. Unknown fields (OpenAI's echo, logprobs, best_of, suffix, penalties,
    logit_bias) are refused rather than silently ignored; `model` may name any model (one is served)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)] = Field(
        description="Text to continue, or a list of texts. Longer than the context: the last tokens are kept."
    )
    max_tokens: int = Field(16, ge=1)  # the cap is added per app, see `request_model`
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, description="Extension: sample among the k most likely tokens.")
    n: int = Field(
        1, ge=1, le=MAX_CHOICES, description=f"Completions per prompt (prompts x n <= {MAX_CHOICES})."
    )
    stop: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=MAX_STOP_STRINGS)]
        | None
    ) = None
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63, description="Same seed, same text. Choice i uses seed+i."
    )
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    user: str | None = None


def request_model(max_tokens_cap: int) -> type[CompletionRequest]:
    """The request schema of one app: max_tokens limited to the configured cap, so the schema tells."""
    max_tokens = Field(min(16, max_tokens_cap), ge=1, le=max_tokens_cap)
    return create_model("CompletionRequest", __base__=CompletionRequest, max_tokens=(int, max_tokens))


class Choice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    """A whole response, or (stream=true) one server-sent chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "smallgpt"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers=None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


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


# --- the engine: choices take turns on one worker thread ---


class Engine:
    """Runs completion choices on the worker thread, one step each in turn (see the module docstring)."""

    def __init__(self, generator: Generator):
        self.generator = generator
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smallgpt-generate")
        self.active_choices = 0
        self.closed = False

    async def _run_choice(self, index: int, prompt: str, params: SamplingParams, events: asyncio.Queue):
        loop = asyncio.get_running_loop()
        stream = self.generator.stream(prompt, params)
        self.active_choices += 1
        try:
            # next(stream, None): the next text delta, or None at the end (no StopIteration in a future)
            while (delta := await loop.run_in_executor(self.worker, next, stream, None)) is not None:
                await events.put((index, delta))
            await events.put((index, stream.completion))
        except Exception as exc:  # reported to the client by the response, never a crashed server
            log.exception("generation failed")
            await events.put((index, exc))
        finally:
            self.active_choices -= 1
            if not self.closed:  # (at shutdown, the process ends: nothing to free)
                self.worker.submit(stream.close)  # on the worker thread: it may be mid-step there

    async def run(
        self, request: Request, prompts: list[str], params: SamplingParams, n: int
    ) -> AsyncIterator[tuple[int, str | Completion]]:
        """(choice index, text delta or final Completion) as produced; choice i is prompts[i // n].

        Stops early, cancelling the remaining work, when the client disconnects.
        """
        events: asyncio.Queue = asyncio.Queue(maxsize=len(prompts) * n)
        tasks = []
        for index in range(len(prompts) * n):
            seed = None if params.seed is None else (params.seed + index) % SEED_RANGE
            choice = self._run_choice(index, prompts[index // n], replace(params, seed=seed), events)
            tasks.append(asyncio.create_task(choice))
        try:
            unfinished = len(tasks)
            while unfinished:
                index, item = await events.get()
                if isinstance(item, Exception):
                    raise item
                unfinished -= isinstance(item, Completion)
                yield index, item
                if await request.is_disconnected():
                    log.info("client disconnected: stopped its generation")
                    return
        finally:
            for task in tasks:
                task.cancel()

    def close(self) -> None:
        """Stop the worker once its current step is done (the server is shutting down)."""
        self.closed = True
        self.worker.shutdown(wait=True, cancel_futures=True)


# --- the app ---


def create_app(
    model: GPT,
    *,
    model_name: str = "smallgpt",
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The HTTP app serving `model` (on the device its weights are on)."""
    if max_tokens_cap < 1:
        raise SmallGPTError(f"max_tokens cap must be at least 1, got {max_tokens_cap}")
    engine = Engine(Generator(model.eval()))
    created = int(time.time())
    playground = (resources.files("smallgpt") / "static" / "playground.html").read_text(encoding="utf-8")
    RequestBody = request_model(max_tokens_cap)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        engine.close()

    app = FastAPI(
        title="SmallGPT", summary="OpenAI-compatible completions from a SmallGPT model.", lifespan=lifespan
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(400, f"malformed JSON: {first['ctx']['error']}", code="json_invalid")
        where = [str(part) for part in first["loc"] if part != "body"]
        if not where:  # the body as a whole: missing, not JSON, not an object
            message = f"request body: {first['msg']} (send a JSON object as application/json)"
            return error_response(400, message, code=first["type"])
        return error_response(400, f"{where[0]}: {first['msg']}", param=where[0], code=first["type"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = str(exc.detail).lower().replace(" ", "_")
        return error_response(exc.status_code, message, code=code, headers=exc.headers)  # 405: Allow

    @app.exception_handler(SmallGPTError)
    async def bad_request(request: Request, exc: SmallGPTError):
        return error_response(400, str(exc))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.get("/", include_in_schema=False)
    async def playground_page() -> HTMLResponse:
        return HTMLResponse(playground)

    @app.get("/health")
    async def health() -> dict:
        """Liveness, the limits the playground needs, and how many choices are generating now."""
        return {
            "status": "ok",
            "model": model_name,
            "context_length": model.config.block_size,
            "max_tokens_cap": max_tokens_cap,
            "active_choices": engine.active_choices,
        }

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=model_name, created=created)])

    @app.post(
        "/v1/completions",
        response_model=CompletionResponse,
        responses={
            200: {"content": {"text/event-stream": {}}},
            "4XX": {"model": ErrorResponse, "description": "OpenAI's error object"},
        },
    )
    async def completions(body: RequestBody, request: Request):
        """Continue the prompt(s). With `stream`, server-sent events of chunks, then `data: [DONE]`."""
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) * body.n > MAX_CHOICES:
            message = f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts) * body.n}"
            return error_response(400, message, param="n", code="too_many_choices")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        params = SamplingParams(body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed, stop)
        reply = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=model_name)
        events = engine.run(request, prompts, params, body.n)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(
                sse_chunks(events, reply, body.n, include_usage), media_type="text/event-stream"
            )
        texts, finished = [""] * (len(prompts) * body.n), {}
        async for index, item in events:
            if isinstance(item, Completion):
                finished[index] = item
            else:
                texts[index] += item
        if len(finished) < len(texts):  # the client disconnected: nobody is left to answer
            return error_response(499, "client closed the request", code="client_closed")
        choices = [
            Choice(text=t, index=i, finish_reason=finished[i].finish_reason) for i, t in enumerate(texts)
        ]
        return CompletionResponse(**reply, choices=choices, usage=usage(finished, body.n))

    return app


def usage(finished: dict[int, Completion], n: int) -> Usage:
    """Token counts: each prompt once (however many choices it has), every generated token."""
    prompt_tokens = sum(c.prompt_tokens for i, c in finished.items() if i % n == 0)
    completion_tokens = sum(len(c.token_ids) for c in finished.values())
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


async def sse_chunks(events, reply: dict, n: int, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream format: `data: <chunk JSON>` per delta, a last chunk per choice with its
    finish_reason, optionally a usage chunk, then `data: [DONE]`."""

    def event(choices: list[Choice], usage_: Usage | None = None) -> str:
        chunk = CompletionResponse(**reply, choices=choices, usage=usage_)
        return f"data: {chunk.model_dump_json(exclude=None if usage_ else {'usage'})}\n\n"

    finished: dict[int, Completion] = {}
    try:
        async for index, item in events:
            if isinstance(item, Completion):
                finished[index] = item
                yield event([Choice(text="", index=index, finish_reason=item.finish_reason)])
            else:
                yield event([Choice(text=item, index=index, finish_reason=None)])
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        log.exception("generation failed mid-stream")
        problem = ErrorResponse(error=ErrorBody(message=f"generation failed: {exc}", type="server_error"))
        yield f"data: {problem.model_dump_json()}\n\n"
    if include_usage and finished:
        yield event([], usage(finished, n))
    yield "data: [DONE]\n\n"


def model_name(checkpoint: str | Path) -> str:
    """What /v1/models calls a checkpoint: the run or checkpoint directory's name, else the file's stem."""
    path = Path(checkpoint).resolve()
    if path.name == WEIGHTS_NAME:
        path = path.parent
    return path.stem if path.is_file() else path.name


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_tokens_cap: int = DEFAULT_MAX_TOKENS_CAP,
    device: str = "auto",
) -> None:
    """Load a checkpoint and serve it with uvicorn until interrupted (localhost unless told otherwise)."""
    import uvicorn

    from smallgpt.checkpoint import load_model
    from smallgpt.distributed import pick_device

    model, name = load_model(checkpoint, pick_device(device)), model_name(checkpoint)
    app = create_app(model, model_name=name, max_tokens_cap=max_tokens_cap)
    print(f"serving {name} at http://{host}:{port}/  (API: /v1/completions, schema: /openapi.json)")
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)

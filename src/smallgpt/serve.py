"""Serving: an OpenAI-compatible completions API and a browser playground over one model.

    POST /v1/completions   OpenAI's (legacy) completions API, see `smallgpt.api`: prompts as text or
                           token ids, logprobs, echo, max_tokens 0 to score, n, stop, seed, stream
    GET  /v1/models        the one model served          GET /health   liveness, limits, load
    GET  /                 the playground (static/playground.html)
    GET  /openapi.json     the schema (and /docs to browse it)

How requests share the model: continuous batching (`smallgpt.engine`). One worker thread runs engine
steps for as long as any sequence is waiting or active; every choice of every request is one sequence. A
step moves every active sequence by one token in one batched forward pass, so 16 concurrent requests
cost about what one costs, and one request alone costs a one-row step (--batch-invariant: a whole pool's
step, so that a seeded text never depends on what else runs; see `DecodeStep`). The event loop never
runs torch: it submits sequences and receives each step's text through a queue per request. Admission
control: at most --max-batch sequences decode at once and --max-queue more wait; a request that would go
beyond is refused with 429 and Retry-After rather than queued without bound. Each request has a time
limit (--request-timeout: it ends with what it has, finish_reason "length", as llama.cpp's time limit
does). A client that disconnects has its sequences cancelled; the worker frees their rows at its next
step.

With --api-key (or SMALLGPT_API_KEY), the /v1 routes require `Authorization: Bearer KEY` (401
otherwise, compared in constant time); /health, the playground page and the schema stay open.

Bad input gets OpenAI's error object, `{"error": {"message", "type", "param", "code"}}`, with status
400 for any invalid request (malformed JSON, wrong types, out-of-range values, max_tokens above the
configured cap, unsupported OpenAI fields, a prompt longer than the context unless
truncate_prompt_tokens is set), 401 for a missing or wrong key, 404 for unknown routes, 405 for wrong
methods, 413 for bodies over the size limit and 429 when the server is full.
"""

import asyncio
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib import resources
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, StreamingResponse

from smallgpt import api
from smallgpt.api import (
    ERROR_HANDLERS,
    BodySizeLimit,
    Choice,
    CompletionRequest,
    CompletionResponse,
    ErrorBody,
    ErrorResponse,
    RequireApiKey,
    error_response,
)
from smallgpt.checkpoint import WEIGHTS_NAME
from smallgpt.engine import Completion, Engine, Sequence
from smallgpt.engine import Request as EngineRequest
from smallgpt.errors import SmallGPTError
from smallgpt.limits import Limits
from smallgpt.model import GPT

log = logging.getLogger("smallgpt.serve")

# --- the engine on its worker thread ---


class Overloaded(Exception):
    """More sequences than the pool and the queue hold: the client should retry later (429)."""


class EngineWorker:
    """Runs `Engine.step` on one thread while there is work; hands each step's text to the event loop
    as soon as it is sampled, before the step's decode forward (see `Engine.step`'s `report`)."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.in_flight = 0  # sequences admitted and not yet answered (event loop thread only)
        # Who to tell about each sequence's text: (event loop, its request's queue, choice index, whether
        # it wants deltas). Added before the engine sees a sequence, removed when its request ends.
        self.listeners: dict[Sequence, tuple[asyncio.AbstractEventLoop, asyncio.Queue, int, bool]] = {}
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="smallgpt-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.closed:
            if not self.engine.busy:
                self.wake.wait()
                self.wake.clear()
                continue
            try:
                self.engine.step(report=self._hand_out)
            except Exception as exc:  # reported to every client in flight, never a dead worker
                log.exception("generation failed")
                self._hand_out(self.engine.abandon(), failure=exc)

    def _hand_out(self, sequences: list[Sequence], failure: Exception | None = None) -> None:
        """Queue each sequence's new text, and its completion once done, for its request."""
        for sequence in sequences:
            listener = self.listeners.get(sequence)
            if listener is None:  # its request has ended (the client left)
                continue
            loop, queue, index, wants_deltas = listener
            result = failure or (sequence.completion() if sequence.done else None)
            if wants_deltas or result is not None:  # a plain request waits for the end only
                delta = "" if failure else sequence.delta
                loop.call_soon_threadsafe(queue.put_nowait, (index, delta, result))

    async def run(
        self, http: Request, requests: list[EngineRequest], deltas: bool = True
    ) -> AsyncIterator[tuple[int, str, Completion | None]]:
        """(choice index, text delta, final Completion or None) as produced, choice i = requests[i];
        without `deltas`, only the final (index, "", Completion) of each choice.

        Refuses with `Overloaded` when the pool and queue are full. Stops early when the client
        disconnects; the worker then drops the request's sequences at its next step.
        """
        if self.in_flight + len(requests) > self.limits.max_batch + self.limits.max_queue:
            raise Overloaded()
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        sequences: list[Sequence] = []
        self.in_flight += len(requests)
        try:
            for index, request in enumerate(requests):
                sequences.append(self.engine.prepare(request))
                self.listeners[sequences[-1]] = (loop, queue, index, deltas)
            self.engine.enqueue(sequences)
            self.wake.set()
            unfinished = len(sequences)
            while unfinished:
                try:
                    index, delta, result = await asyncio.wait_for(queue.get(), timeout=1.0)
                except TimeoutError:  # nothing yet (queued, or a long step): is anyone still there?
                    if await http.is_disconnected():
                        return
                    continue
                if isinstance(result, Exception):
                    raise result
                unfinished -= result is not None
                yield index, delta, result
                if await http.is_disconnected():
                    log.info("client disconnected: stopped its generation")
                    return
        finally:
            self.in_flight -= len(requests)
            for sequence in sequences:
                self.listeners.pop(sequence, None)
                sequence.cancelled = True  # (finished ones are gone already: no effect)

    def close(self) -> None:
        """Stop the worker once its current step is done (the server is shutting down)."""
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=30)


# --- the app ---


class Server:
    """What the routes share: the model's name and context, the limits, the engine worker."""

    def __init__(self, model: GPT, model_name: str, limits: Limits, batch_invariant: bool = False):
        self.model_name, self.limits = model_name, limits
        self.context = model.config.block_size
        engine = Engine(model.eval(), max_batch=limits.max_batch, batch_invariant=batch_invariant)
        self.worker = EngineWorker(engine, limits)
        self.created = int(time.time())

    async def complete(self, body: CompletionRequest, http: Request):
        """Continue the prompt(s). With `stream`, server-sent events of chunks, then `data: [DONE]`."""
        deadline = time.monotonic() + self.limits.request_timeout
        prompts, requests = api.engine_requests(body, self.worker.engine, deadline)
        reply = dict(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.model_name)
        events = self.worker.run(http, requests, deltas=body.stream)
        try:
            first = await anext(events, None)  # admission (429) is decided before any header is sent
        except Overloaded:
            message = "the server is at capacity: retry shortly"
            return error_response(429, message, code="server_busy", headers={"Retry-After": "1"})
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            chunks = sse_chunks(_chain(first, events), reply, body.n, include_usage)
            return StreamingResponse(chunks, media_type="text/event-stream")
        finished: dict[int, Completion] = {}
        async for index, _, result in _chain(first, events):
            if result is not None:
                finished[index] = result
        if len(finished) < len(prompts) * body.n:  # the client disconnected: nobody is left to answer
            return error_response(499, "client closed the request", code="client_closed")
        choices = [api.choice(i, prompts[i // body.n], finished[i], body) for i in range(len(finished))]
        return CompletionResponse(**reply, choices=choices, usage=api.usage(finished, body.n))

    def health(self) -> dict:
        """Liveness, the limits the playground needs, and the load."""
        return {
            "status": "ok",
            "model": self.model_name,
            "context_length": self.context,
            "max_tokens_cap": self.limits.max_tokens_cap,
            "max_batch": self.limits.max_batch,
            "active_choices": self.worker.in_flight,
        }


async def _chain(first, events: AsyncIterator) -> AsyncIterator:
    if first is not None:
        yield first
    async for event in events:
        yield event


async def sse_chunks(events, reply: dict, n: int, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream format: `data: <chunk JSON>` per delta, a last chunk per choice with its
    finish_reason, optionally a usage chunk, then `data: [DONE]`."""

    def event(choices: list[Choice], usage_=None) -> str:
        chunk = CompletionResponse(**reply, choices=choices, usage=usage_)
        return f"data: {chunk.model_dump_json(exclude=None if usage_ else {'usage'})}\n\n"

    finished: dict[int, Completion] = {}
    try:
        async for index, delta, result in events:
            if delta:
                yield event([Choice(text=delta, index=index, finish_reason=None)])
            if result is not None:
                finished[index] = result
                yield event([Choice(text="", index=index, finish_reason=result.finish_reason)])
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does
        log.exception("generation failed mid-stream")
        problem = ErrorResponse(error=ErrorBody(message=f"generation failed: {exc}", type="server_error"))
        yield f"data: {problem.model_dump_json()}\n\n"
    if include_usage and finished:
        yield event([], api.usage(finished, n))
    yield "data: [DONE]\n\n"


def create_app(
    model: GPT,
    *,
    model_name: str = "smallgpt",
    limits: Limits | None = None,
    api_key: str | None = None,
    batch_invariant: bool = False,
) -> FastAPI:
    """The HTTP app serving `model` (on the device its weights are on); `batch_invariant`: see `Engine`."""
    limits = limits or Limits()
    server = Server(model, model_name, limits, batch_invariant)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        server.worker.close()

    app = FastAPI(
        title="SmallGPT", summary="OpenAI-compatible completions from a SmallGPT model.", lifespan=lifespan
    )
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
    for kind, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(kind, handler)
    playground = (resources.files("smallgpt") / "static" / "playground.html").read_text(encoding="utf-8")
    app.add_api_route("/", lambda: HTMLResponse(playground), include_in_schema=False)
    app.add_api_route("/health", server.health, methods=["GET"])
    models = lambda: api.ModelList(data=[api.ModelCard(id=model_name, created=server.created)])  # noqa: E731
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=api.ModelList)
    RequestBody = api.request_model(limits.max_tokens_cap)

    async def completions(body: RequestBody, request: Request):  # type: ignore[valid-type]
        return await server.complete(body, request)

    completions.__doc__ = Server.complete.__doc__
    app.add_api_route(
        "/v1/completions", completions, methods=["POST"], response_model=CompletionResponse,
        responses={
            200: {"content": {"text/event-stream": {}}},
            "4XX": {"model": ErrorResponse, "description": "OpenAI's error object"},
        },
    )  # fmt: skip
    return app


def model_name(checkpoint: str | Path) -> str:
    """What /v1/models calls a checkpoint: the run or checkpoint directory's name, else the file's stem."""
    path = Path(checkpoint).resolve()
    if path.name == WEIGHTS_NAME:
        path = path.parent
    return path.stem if path.is_file() else path.name


def bound_socket(host: str, port: int) -> socket.socket:
    """Bind host:port now, so that a bad or busy address is a one-line error before "serving at".

    Bound but not listening yet: uvicorn listens once the app is loaded, so no client connects to a
    server that cannot answer.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: restart over TIME_WAIT
        sock.bind((host, port))
        return sock
    except OSError as exc:
        raise SmallGPTError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def serve(
    checkpoint: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    limits: Limits | None = None,
    api_key: str | None = None,
    batch_invariant: bool = False,
) -> None:
    """Load a checkpoint and serve it with uvicorn until interrupted (localhost unless told otherwise)."""
    import uvicorn

    from smallgpt.checkpoint import load_model
    from smallgpt.distributed import pick_device

    limits = limits or Limits()
    if not 1 <= port <= 65535:
        raise SmallGPTError(f"port must be in 1..65535, got {port}")
    model, name = load_model(checkpoint, pick_device(device)), model_name(checkpoint)
    sock = bound_socket(host, port)
    app = create_app(model, model_name=name, limits=limits, api_key=api_key, batch_invariant=batch_invariant)
    print(f"serving {name} at http://{host}:{port}/  (API: /v1/completions, schema: /openapi.json)")
    config = uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])

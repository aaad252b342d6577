"""OpenAI's legacy completions API over HTTP: request and response bodies (also the OpenAPI schema),
their translation to and from the engine's requests and completions, and the guards in front
(body size limit, API key, OpenAI's error object for every failure).

    prompt        a string, a list of strings, a list of token ids, or a list of such lists
    logprobs 0-5  each token's log-probability and the most probable alternatives, with the tokens'
                  text and their character offsets in the returned text
    echo          the prompt is returned before the completion, its tokens scored too (the first one
                  has nothing to be predicted from: null); with max_tokens 0 this scores a text
                  without generating, which is how evaluation harnesses compute perplexity

Scores are the model's own log-softmax at temperature 1, whatever temperature the request samples at.
"""

from __future__ import annotations

import codecs
import hmac
import logging
from typing import Annotated, Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from smallgpt.engine import Completion, Engine, TokenScore, prompt_ids
from smallgpt.engine import Request as EngineRequest
from smallgpt.errors import SmallGPTError
from smallgpt.generate import SamplingParams
from smallgpt.tokenizer import EOT_ID, decode, get_tokenizer

log = logging.getLogger("smallgpt.serve")

MAX_CHOICES = 16  # prompts x n per request
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_LENGTH = 256  # characters per stop string
MAX_LOGPROBS = 5  # as OpenAI
VOCAB_SIZE = EOT_ID + 1  # GPT-2's tokens, <|endoftext|> the last

TokenId = Annotated[int, Field(ge=0, lt=VOCAB_SIZE)]
Tokens = Annotated[list[TokenId], Field(min_length=1)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_LENGTH)]


class CompletionRequest(BaseModel):
    """A completions request. Fields OpenAI has and we do not (best_of, suffix, penalties, logit_bias)
    are refused rather than silently ignored; `model` may name any model (one is served)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=MAX_CHOICES)]
        | Tokens
        | Annotated[list[Tokens], Field(min_length=1, max_length=MAX_CHOICES)]
    ) = Field(description="Text or token ids to continue, or a list of either (one choice set each).")
    max_tokens: int = Field(16, ge=0)  # the cap is added per app, see `request_model`
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, description="0 = greedy.")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=1, description="Extension: sample among the k most likely tokens.")
    n: int = Field(
        1, ge=1, le=MAX_CHOICES, description=f"Completions per prompt (prompts x n <= {MAX_CHOICES})."
    )
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63, description="Same seed, same text. Choice i uses seed+i."
    )
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Score each token, with this many top alternatives."
    )
    echo: bool = Field(False, description="Return (and with logprobs, score) the prompt too.")
    truncate_prompt_tokens: int | None = Field(
        None, ge=1, description="Keep only the last k tokens of a prompt (as vLLM); else too long = 400."
    )
    stream: bool = False
    stream_options: dict[Literal["include_usage"], bool] | None = None
    user: str | None = None

    # A value that fits none of a union's forms gets pydantic's message for the first form ("Input
    # should be a valid string" for token ids out of the vocabulary): these say what is wrong instead.
    # Values they pass are then checked against the declared types as usual.
    @field_validator("prompt", mode="before")
    @classmethod
    def explain_prompt(cls, value: Any) -> Any:
        return _explain_prompt(value)

    @field_validator("stop", mode="before")
    @classmethod
    def explain_stop(cls, value: Any) -> Any:
        return _explain_stop(value)


def _refuse(message: str) -> PydanticCustomError:
    return PydanticCustomError("invalid_value", message)


def _json_kind(value: Any) -> str:
    kinds = {
        bool: "true/false",
        int: "a whole number",
        float: "a decimal number",
        str: "a string",
        list: "a list",
    }
    return "null" if value is None else kinds.get(type(value), "an object")


def _is_token_id(value: Any) -> bool:
    return type(value) is int


def _explain_prompt(value: Any) -> Any:
    forms = "a string, a list of strings, a list of token ids or a list of token-id lists"
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _refuse(f"must be {forms}, not {_json_kind(value)}")
    if not value:
        raise _refuse("is an empty list: give at least one prompt")
    if all(_is_token_id(x) for x in value):
        _check_token_ids(value, "")
    elif all(isinstance(x, str | list) for x in value) and len({type(x) for x in value}) == 1:
        if len(value) > MAX_CHOICES:
            raise _refuse(f"holds {len(value)} prompts; a request may hold at most {MAX_CHOICES}")
        for i, ids in enumerate(x for x in value if isinstance(x, list)):
            if not ids:
                raise _refuse(f"prompt {i} is an empty list of token ids")
            if not all(_is_token_id(x) for x in ids):
                raise _refuse(f"prompt {i}: a token-id list holds only whole numbers")
            _check_token_ids(ids, f"prompt {i}: ")
    else:
        kinds = ", ".join(sorted({_json_kind(x) for x in value}))
        raise _refuse(f"must be {forms}; this list holds {kinds}")
    return value


def _check_token_ids(ids: list[int], where: str) -> None:
    for position, token in enumerate(ids):
        if not 0 <= token < VOCAB_SIZE:
            message = (
                f"token id {token} (position {position}) is not in the vocabulary (0 to {VOCAB_SIZE - 1})"
            )
            raise _refuse(where + message)


def _explain_stop(value: Any) -> Any:
    strings = [value] if isinstance(value, str) else value
    if value is None:
        return value
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        raise _refuse("must be a string or a list of strings")
    if len(strings) > MAX_STOP_STRINGS:
        raise _refuse(f"holds {len(strings)} stop strings; at most {MAX_STOP_STRINGS} are allowed")
    for text in strings:
        if not text:
            raise _refuse("an empty stop string would stop before the first token: leave it out")
        if len(text) > MAX_STOP_LENGTH:
            raise _refuse(f"a stop string of {len(text)} characters; at most {MAX_STOP_LENGTH} are allowed")
    return value


def request_model(max_tokens_cap: int) -> type[CompletionRequest]:
    """The request schema of one app: max_tokens limited to the configured cap, so the schema tells."""
    max_tokens = Field(min(16, max_tokens_cap), ge=0, le=max_tokens_cap)
    return create_model("CompletionRequest", __base__=CompletionRequest, max_tokens=(int, max_tokens))


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class Choice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
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


# --- from a request to token prompts, from completions to choices ---


class RequestError(SmallGPTError):
    """A request the server refuses (400), naming the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class Prompt:
    """A prompt as the engine takes it (token ids) and as echo returns it (text)."""

    def __init__(self, ids: list[int], text: str):
        self.ids, self.text = ids, text


def prompts_of(body: CompletionRequest, context: int) -> list[Prompt]:
    """The request's prompts as token ids, each within what the model can see.

    To generate, the model must see the whole prompt: at most `context` tokens. To only score it
    (max_tokens 0), the last token predicts nothing, so one more fits. Longer prompts are refused
    unless the request asks to keep their last `truncate_prompt_tokens` tokens.
    """
    limit = context + 1 if body.max_tokens == 0 else context
    keep = body.truncate_prompt_tokens
    if keep is not None and keep > limit:
        raise RequestError(
            f"truncate_prompt_tokens must be at most {limit}, got {keep}", "truncate_prompt_tokens"
        )
    single = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    prompts = []
    for prompt in [body.prompt] if single else body.prompt:
        ids = prompt_ids(prompt) if isinstance(prompt, str) else list(prompt)
        text = prompt if isinstance(prompt, str) else decode(ids)
        if keep is not None and len(ids) > keep:
            ids = ids[-keep:]
            text = decode(ids)
        elif len(ids) > limit:
            raise RequestError(
                f"prompt of {len(ids)} tokens does not fit the model's context of {context} tokens "
                f"(set truncate_prompt_tokens to keep its end)",
                "prompt",
                "context_length_exceeded",
            )
        prompts.append(Prompt(ids, text))
    return prompts


def engine_requests(
    body: CompletionRequest, engine: Engine, deadline: float
) -> tuple[list[Prompt], list[EngineRequest]]:
    """The request in the engine's terms: its prompts, and one engine request per choice (choice i
    continues prompts[i // n] with seed + i, see `Engine.requests`). Refuses what the engine cannot do."""
    prompts = prompts_of(body, engine.capacity)
    if len(prompts) * body.n > MAX_CHOICES:
        message = f"prompts x n must be at most {MAX_CHOICES}, got {len(prompts) * body.n}"
        raise RequestError(message, "n", "too_many_choices")
    if body.stream and (body.logprobs is not None or body.echo):
        param = "logprobs" if body.logprobs is not None else "echo"
        raise RequestError(f"{param} is not supported with stream", param)
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(body.max_tokens, body.temperature, body.top_k, body.top_p, body.seed, stop)
    ids = [prompt.ids for prompt in prompts]
    fields = dict(logprobs=body.logprobs, echo=body.echo, deadline=deadline)
    return prompts, engine.requests(ids, params, body.n, **fields)


def choice(index: int, prompt: Prompt, done: Completion, body: CompletionRequest) -> Choice:
    """One finished choice in OpenAI's shape: the text (after the prompt, with echo) and its scores."""
    text = prompt.text + done.text if body.echo else done.text
    logprobs = None
    if body.logprobs is not None:
        if body.echo:
            prompt_scores = done.prompt_scores or [None] * len(prompt.ids)
            logprobs = _logprobs(prompt.ids + done.token_ids, prompt_scores + (done.scores or []))
        else:
            logprobs = _logprobs(done.token_ids, done.scores or [])
    return Choice(text=text, index=index, logprobs=logprobs, finish_reason=done.finish_reason)


def _logprobs(ids: list[int], scores: list[TokenScore | None]) -> Logprobs:
    """OpenAI's logprobs object for tokens `ids` and their scores (None: a prompt's first token)."""
    piece = get_tokenizer().decode_single_token_bytes
    # A token's offset: characters of the returned text before it (a token that ends inside a UTF-8
    # character sits before that character, like the token starting it).
    decoder, offsets, length = codecs.getincrementaldecoder("utf-8")(errors="replace"), [], 0
    for token in ids:
        offsets.append(length)
        length += len(decoder.decode(piece(token)))
    return Logprobs(
        tokens=[_text(piece(t)) for t in ids],
        token_logprobs=[None if s is None else s[1] for s in scores],
        top_logprobs=[None if s is None else {_text(piece(i)): lp for i, lp in s[2]} for s in scores],
        text_offset=offsets,
    )


def _text(token_bytes: bytes) -> str:
    return token_bytes.decode("utf-8", errors="replace")


def usage(finished: dict[int, Completion], n: int) -> Usage:
    """Token counts: each prompt once (however many choices it has), every generated token."""
    prompt_tokens = sum(c.prompt_tokens for i, c in finished.items() if i % n == 0)
    completion_tokens = sum(len(c.token_ids) for c in finished.values())
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


# --- the guards and OpenAI's error object for every failure ---


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None, headers=None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = ErrorResponse(error=ErrorBody(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


class RequireApiKey:
    """ASGI middleware: /v1 routes need `Authorization: Bearer <key>`, checked in constant time."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                refusal = error_response(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)",
                    code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


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


async def _invalid_request(request: Request, exc: RequestValidationError):
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(400, f"malformed JSON: {first['ctx']['error']}", code="json_invalid")
    where = [str(part) for part in first["loc"] if part != "body"]
    if not where:  # the body as a whole: missing, not JSON, not an object
        message = f"request body: {first['msg']} (send a JSON object as application/json)"
        return error_response(400, message, code=first["type"])
    return error_response(400, f"{where[0]}: {first['msg']}", param=where[0], code=first["type"])


async def _http_error(request: Request, exc: StarletteHTTPException):
    message = f"{request.method} {request.url.path}: {exc.detail}"
    code = str(exc.detail).lower().replace(" ", "_")
    return error_response(exc.status_code, message, code=code, headers=exc.headers)  # 405: Allow


async def _bad_request(request: Request, exc: SmallGPTError):
    return error_response(400, str(exc), param=getattr(exc, "param", None), code=getattr(exc, "code", None))


async def _server_error(request: Request, exc: Exception):
    log.exception("unexpected error")
    return error_response(500, f"internal error: {type(exc).__name__}")


ERROR_HANDLERS = {
    RequestValidationError: _invalid_request,
    StarletteHTTPException: _http_error,
    SmallGPTError: _bad_request,
    Exception: _server_error,
}

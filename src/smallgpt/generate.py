"""Text generation: prompts in, sampled continuations out, one cached decode step per token.

    encode prompts -> left-pad into one batch -> prefill the KV cache (one forward over the prompts)
      -> repeat: sample a token per row (temperature, top-k, top-p) -> decode it into text
                 -> forward only that token through the cache
    until every row hits <|endoftext|>, a stop string, or max_new_tokens.

The context window: GPT-2's positions are learned absolute embeddings, so every cached key depends on
where its token sat in the window. A prompt longer than the context keeps its last `block_size` tokens;
once prompt + output fill the window, each further token is predicted from the last `block_size` tokens
by recomputing that window (`_prefill`) -- exactly what the model saw in training, never a shifted cache
with stale positions. Within the window a step costs one position's work.
"""

from __future__ import annotations

import codecs
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from smallgpt.errors import SmallGPTError
from smallgpt.model import GPT, KVCache
from smallgpt.tokenizer import EOT_ID, encode, get_tokenizer


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Same seed, same prompt, same model -> same text.

    Row i of a batch samples with seed + i from its own random stream, so its text is the text that
    prompt gets alone with seed + i, whatever else is in the batch (as the server's choice i and the
    CLI's sample i).
    """

    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy (always the most probable token)
    top_k: int | None = None  # sample only among the k most probable tokens
    top_p: float | None = None  # ... only among the smallest set whose probability mass reaches p
    seed: int | None = None  # None = a fresh random seed per call; row i of a batch uses seed + i
    stop: tuple[str, ...] = ()  # end when the text contains one of these (not included in the text)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # accept a list too
        checks = [
            (self.max_new_tokens >= 1, f"max_new_tokens must be at least 1, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty text"),
        ]
        for ok, message in checks:
            if not ok:
                raise SmallGPTError(message)


@dataclass
class Completion:
    """One prompt's result.

    `text` is the new text only, cut before a stop string. `token_ids` are all sampled tokens,
    including a final <|endoftext|> or the tokens of a matched stop string, so `len(token_ids)` is
    the number of tokens generated. `prompt_tokens` counts the prompt's tokens (an empty prompt
    counts the one <|endoftext|> it starts from). `finish_reason` is "stop" (<|endoftext|> or a stop
    string) or "length" (max_new_tokens reached).
    """

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | list | None = None
) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab) under temperature, top-k and top-p.

    `generator` is one random stream for all rows, or a list of one per row.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # Shift the best score to 0 before dividing: a tiny temperature then gives -inf, never inf - inf.
    logits = (logits.float() - logits.max(dim=-1, keepdim=True).values) / params.temperature
    candidates = None  # when set, column j of the scores belongs to token candidates[:, j]
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        logits, candidates = logits.topk(params.top_k, dim=-1)  # sorted, most probable first
    probs = logits.softmax(dim=-1)
    if params.top_p is not None and params.top_p < 1:
        if candidates is None:
            probs, candidates = _sorted_prefix_holding_mass(probs, params.top_p)
        # Keep the smallest most-probable-first prefix whose mass reaches p: a token stays while the
        # mass strictly before it is still short of p (so the most probable token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= params.top_p
        drop[:, 0] = False  # explicitly: a p below float32's smallest number would drop it otherwise
        probs = probs.masked_fill(drop, 0.0)
    choice = _draw(probs, generator)
    return choice[:, 0] if candidates is None else candidates.gather(1, choice)[:, 0]


def _sorted_prefix_holding_mass(probs: torch.Tensor, mass: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The most probable tokens, sorted, enough of them to hold `mass` in every row.

    Sorting all 50,257 probabilities costs milliseconds on a CPU; a top-k of a few hundred is cheap and
    usually holds the nucleus of a trained model. Grow k until it does (at worst the whole vocabulary).
    """
    k = min(256, probs.shape[-1])
    while True:
        top, ids = probs.topk(k, dim=-1)
        if k == probs.shape[-1] or bool((top.sum(dim=-1) >= mass).all()):
            return top, ids
        k = min(4 * k, probs.shape[-1])


def _draw(probs: torch.Tensor, generator: torch.Generator | list | None) -> torch.Tensor:
    """Sample a column per row in proportion to the (unnormalised) `probs`, shape (B, 1).

    Inverse-CDF sampling: one uniform number per row, located in the running sum of the
    probabilities. (torch.multinomial does the same job ~20x slower on a CPU for a 50k vocabulary.)
    A zero-probability column can never be hit: the draw stays strictly below the total, and it lands
    on the first column whose running sum exceeds it, which is a column that added mass.
    """
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    if isinstance(generator, list):  # one stream per row
        u = torch.cat([torch.rand(1, 1, generator=g, device=probs.device) for g in generator]) * total
    else:
        u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)


class TextStream(Iterator[str]):
    """The text of one completion, delta by delta, as tokens are produced.

    Iterate it for the deltas; once it is exhausted, `.completion` holds the final `Completion` (it
    is also the `StopIteration` value, so `completion = yield from stream` works).
    """

    def __init__(self, steps: Iterator[list[str]]):
        self._steps = steps
        self.completion: Completion | None = None

    def __next__(self) -> str:
        while self.completion is None:
            try:
                delta = next(self._steps)[0]
            except StopIteration as done:
                self.completion = done.value[0]
                break
            if delta:
                return delta
        raise StopIteration(self.completion)

    def close(self) -> None:
        """Abandon the completion early (a server's client left): no more tokens are computed."""
        self._steps.close()


class _RowText:
    """Turns one row's tokens into text deltas: whole UTF-8 characters only, stop strings held back."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # decoded so far, cut at a stop string once one matches
        self.emitted = 0  # how much of `text` has been handed out
        self.stopped = False

    def add(self, token_bytes: bytes, final: bool = False) -> str:
        """Append a token's bytes (the decoder holds back an unfinished character) and return the delta."""
        searched_up_to = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += self.utf8.decode(token_bytes, final=final)
        hits = [i for i in (self.text.find(s, searched_up_to) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            safe = len(self.text)
        else:  # hold back a tail that could still grow into a stop string
            safe = len(self.text) - (0 if final else self._stop_prefix_length())
        delta, self.emitted = self.text[self.emitted : safe], max(self.emitted, safe)
        return delta

    def _stop_prefix_length(self) -> int:
        """Length of the longest end of `text` that is the start of some stop string."""
        for size in range(min(max((len(s) for s in self.stop), default=1) - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-size:]) for s in self.stop):
                return size
        return 0


class Generator:
    """Samples continuations of prompts from a GPT, with a KV cache. The CLI and server sit on this.

    `generate` takes a batch of prompts of any lengths; `stream` yields one prompt's text as it
    is produced. Forward passes run in eval mode (no dropout); a model in training mode is put back.
    """

    def __init__(self, model: GPT, device: str | torch.device | None = None):
        self.tokenizer = get_tokenizer()
        if model.config.vocab_size != self.tokenizer.n_vocab:
            raise SmallGPTError(
                f"model has a {model.config.vocab_size}-token vocabulary; generation needs GPT-2's "
                f"{self.tokenizer.n_vocab} (incompatible checkpoint)"
            )
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)

    def generate(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        """Complete every prompt; row i of the result belongs to prompts[i]."""
        steps = self._steps(prompts, params)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def stream(self, prompt: str, params: SamplingParams) -> TextStream:
        """Text deltas of one completion as produced; `.completion` of the stream once exhausted."""
        return TextStream(self._steps([prompt], params))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The prompt's tokens; an empty prompt starts from <|endoftext|>, as GPT-2 documents begin."""
        if not isinstance(prompt, str):
            raise SmallGPTError(f"prompt must be a string, not {type(prompt).__name__}")
        return encode(prompt) or [EOT_ID]

    def _steps(self, prompts: list[str], params: SamplingParams):
        """Yield each step's text delta per row; return the list of `Completion`s.

        Nothing is held across a `yield` (no inference mode, no eval mode), so several of these can be
        advanced in turn on one thread, as the server does, and closed at any point.
        """
        if not prompts:
            raise SmallGPTError("no prompts to complete")
        histories = [self.prompt_ids(p) for p in prompts]
        prompt_lengths = [len(h) for h in histories]
        rows = [_RowText(params.stop) for _ in prompts]
        token_ids: list[list[int]] = [[] for _ in prompts]
        finish: list[str | None] = [None] * len(prompts)
        seed = params.seed if params.seed is not None else torch.Generator().seed()
        rngs = [
            torch.Generator(device=self.device).manual_seed((seed + i) % 2**64) for i in range(len(prompts))
        ]
        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.config, len(prompts), self.device, dtype)
        logits, filled = self._prefill(cache, histories)
        decode_step = None  # built at the first step: a CUDA graph on a GPU
        for step in range(params.max_new_tokens):
            with torch.inference_mode():
                next_tokens = sample_next_token(logits, params, rngs)
            last = step == params.max_new_tokens - 1
            deltas = []
            for i, token in enumerate(next_tokens.tolist()):
                if finish[i] is not None:
                    deltas.append("")
                    continue
                token_ids[i].append(token)
                histories[i].append(token)
                if token == EOT_ID:
                    deltas.append(rows[i].add(b"", final=True))
                    finish[i] = "stop"
                else:
                    deltas.append(rows[i].add(self.tokenizer.decode_single_token_bytes(token), final=last))
                    finish[i] = "stop" if rows[i].stopped else "length" if last else None
            yield deltas
            if all(reason is not None for reason in finish):
                break
            if filled == cache.capacity:  # window full: recompute it from the last block_size tokens
                logits, filled = self._prefill(cache, histories)
            else:
                decode_step = decode_step or self._decode_step(cache)
                logits, filled = decode_step(next_tokens[:, None]), filled + 1
        return [
            Completion(row.text, ids, n, reason)
            for row, ids, n, reason in zip(rows, token_ids, prompt_lengths, finish, strict=True)
        ]

    def _prefill(self, cache: KVCache, histories: list[list[int]]) -> tuple[torch.Tensor, int]:
        """Fill an emptied cache with each row's last block_size tokens, left-padded to end together.

        Returns the next-token logits and the number of slots now filled.
        """
        windows = [h[-cache.capacity :] for h in histories]
        width = max(len(w) for w in windows)
        idx = torch.zeros(len(windows), width, dtype=torch.long)
        valid = torch.zeros(len(windows), width, dtype=torch.bool)
        for row, window in enumerate(windows):
            idx[row, width - len(window) :] = torch.tensor(window)
            valid[row, width - len(window) :] = True
        cache.reset()
        valid_arg = None if bool(valid.all()) else valid.to(self.device)
        return self._forward(idx.to(self.device), cache, valid_arg), width

    def _forward(self, idx: torch.Tensor, cache: KVCache, valid: torch.Tensor | None = None) -> torch.Tensor:
        with self._inference():
            return self.model.forward_cached(idx, cache, valid)

    def _decode_step(self, cache: KVCache):
        """A function from next tokens (B, 1) to logits: plain on a CPU, a replayed CUDA graph on CUDA."""
        if self.device.type != "cuda":
            return lambda tokens: self._forward(tokens, cache)
        with self._inference():
            return CudaGraphStep(self.model, cache)

    @contextmanager
    def _inference(self):
        """Inference mode and eval mode (no dropout) for one forward pass; a training model is put back."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()


class CudaGraphStep:
    """One decode step recorded as a CUDA graph, replayed for every token (CUDA only).

    A small model on a GPU is bound by launching ~100 tiny kernels per token, not by arithmetic. The
    cache's storage never moves and a decode step has fixed shapes (one token, attention over all
    block_size slots under a mask), so the whole step can be recorded once and replayed with a single
    launch; a window rebuild (prefill) refills the same storage, so the graph stays valid.
    """

    def __init__(self, model: GPT, cache: KVCache):
        self.tokens = cache.next_position.new_zeros(cache.next_position.shape[0], 1)  # token ids (B, 1)
        bookkeeping = (cache.key_valid, cache.next_position, cache.cursor)
        saved = [t.clone() for t in bookkeeping]
        side = torch.cuda.Stream()  # warm up off the main stream before capturing, as CUDA graphs need
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            model.forward_cached(self.tokens, cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels; nothing runs
            self.logits = model.forward_cached(self.tokens, cache)
        for tensor, value in zip(bookkeeping, saved, strict=True):
            tensor.copy_(value)  # undo the warm-up step (its keys/values sit in the slot the next step fills)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens.copy_(tokens)
        self.graph.replay()
        return self.logits


class Int8Linear(nn.Module):
    """A Linear layer that stores its weight as int8 with one scale per output row (CPU inference).

    Decoding one sequence on a CPU is bound by reading the weights from memory for every token
    (~120 MB for smallgpt-10m in fp32, 60% of it the tied head); int8 reads a quarter of that. Row w
    is stored as round(w / s) with s = max|w| / 127 (error at most s/2 per weight); inputs pass through
    bfloat16, the input type of PyTorch's int8 weight-only matmul kernel.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-12) / 127
        self.register_buffer("weight", torch.round(weight / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale)
        y = y.to(x.dtype).view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize_int8(model: GPT) -> GPT:
    """A copy of `model` for CPU generation with every matmul weight in int8 (embeddings stay fp32).

    About twice as fast at batch 1 on a CPU; logits move by about 1% of their spread, so samples are
    as good but not bit-identical to fp32 (greedy text can differ where two tokens nearly tie).
    """
    if next(model.parameters()).device.type != "cpu":
        raise SmallGPTError("int8 weights are for CPU generation; on a GPU use the fp32/bf16 model")
    quantized = copy.deepcopy(model).eval()
    for block in quantized.transformer.h:
        for layer, name in [
            (block.attn, "c_attn"),
            (block.attn, "c_proj"),
            (block.mlp, "c_fc"),
            (block.mlp, "c_proj"),
        ]:
            setattr(layer, name, Int8Linear(getattr(layer, name)))
    quantized.lm_head = Int8Linear(quantized.lm_head)  # unties it: lookups keep the fp32 embedding
    return quantized

"""The inference engine: many sequences decoded together over one KV-cache pool (continuous batching).

    submit(request) -> waiting queue
    step():  sequences whose client left are dropped
             waiting requests join while the pool has free rows, each in a row of its own: a short
               prompt is fed by the decode steps; a long one is prefilled (beside others, but for its
               last token, which the decode steps feed: `FEED_UP_TO`); one to score, prefilled whole
             every active sequence past its prompt samples one token (from its own random stream)
               and turns it into text
             finished sequences leave at once: <|endoftext|>, a stop string, max_new_tokens, deadline
             one batched decode step feeds every remaining sequence its new (or next prompt) token,
               at a bucket of 1, 2, 4, 8, ... rows (`DecodeStep`: what that means for "same seed,
               same text")

`Engine.requests` turns prompts into n choices each (choice i samples with seed + i), for
`smallgpt sample`, training's sample and the server alike. `smallgpt sample` calls `step` until its
samples are done; the server runs it on a worker thread and hands each sequence's text to its HTTP
response (`smallgpt.serve`).

The context window. A prompt longer than the context keeps its last `block_size` tokens. Once prompt +
output fill a row, what happens depends on how the model encodes positions:
- GPT-2's positions are learned absolute embeddings, so every cached key depends on where its token sat
  in the window: the next token is predicted from the last `block_size` tokens by recomputing that
  window -- exactly what the model saw in training, never a shifted cache with stale positions.
- With rotary positions (Qwen3) attention sees only distances, so the row rolls: the newest token
  overwrites the oldest slot and decoding continues at cached speed. Each token then attends to the
  keys and values of its last `block_size` tokens as they were computed when those tokens were new:
  sliding-window attention, as Mistral-style models decode. For a one-layer model this equals
  recomputing the window; deeper layers' cached keys also remember tokens that have since left it.
Within the window a token costs one position's work either way.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from smallgpt.errors import SmallGPTError
from smallgpt.generate import RowText, SamplingParams, sample_next_token
from smallgpt.kvcache import DecodeStep, KVPool
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, encode, get_tokenizer

# Prompts up to this many tokens are not prefilled on their own but fed through the batched decode
# steps, one token per step beside everyone else's: a separate prefill forward costs about as much as
# a whole decode step for a small model, and batching prefills together would make a row's arithmetic
# depend on its batch-mates (see `DecodeStep`). Longer prompts are prefilled. Beside other sequences,
# a prefill stops short of the last token and of the head (its 50k-row matmul is most of a small
# model's prefill): that token's logits come from the next decode step, which reads the head's
# weights once for all its rows anyway. Alone, the prefill gives them at once (a step costs more).
FEED_UP_TO = 16

# A token's score: (token id, log-probability, [(id, log-probability) of the most probable tokens]).
TokenScore = tuple[int, float, list[tuple[int, float]]]


def prompt_ids(prompt: str) -> list[int]:
    """The prompt's tokens; an empty prompt starts from <|endoftext|>, as GPT-2 documents begin."""
    return encode(prompt) or [EOT_ID]


@dataclass(frozen=True)
class Request:
    """What to generate. `logprobs`: score each token, with that many top alternatives (None = no
    scores); `echo`: score the prompt's tokens too (the first has nothing to be predicted from)."""

    prompt: list[int]
    params: SamplingParams
    logprobs: int | None = None
    echo: bool = False
    deadline: float | None = None  # time.monotonic() after which generation ends ("length")


@dataclass
class Completion:
    """A finished sequence. `text` is the new text only, cut before a stop string; `token_ids` are all
    sampled tokens, a final <|endoftext|> or the tokens of a matched stop string included. Scores are
    log-softmax at temperature 1, whatever the sampling temperature: the model's own probabilities."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (<|endoftext|> or a stop string) or "length"
    prompt_scores: list[TokenScore | None] | None = None
    scores: list[TokenScore] | None = None


class Sequence:
    """One request's progress. `delta` is the text it added in the last step; `cancelled` may be set
    from another thread (the client left): the engine drops it at its next step."""

    def __init__(self, request: Request, device: torch.device):
        self.request = request
        seed = request.params.seed if request.params.seed is not None else torch.Generator().seed()
        self.rng = torch.Generator(device=device).manual_seed(seed % 2**64)
        self.history = list(request.prompt)  # prompt + generated tokens
        self.text = RowText(request.params.stop)
        self.token_ids: list[int] = []
        self.scores: list[TokenScore] | None = [] if request.logprobs is not None else None
        self.prompt_scores: list[TokenScore | None] | None = None
        self.finish_reason: str | None = None
        self.delta = ""
        self.cancelled = False
        self.logits: torch.Tensor | None = None  # next-token scores (vocab,)
        self.decoded_row: int | None = None  # which row of the last decode step's output they are
        self.cached = 0  # tokens in its KV-cache row
        self.feed: list[int] = []  # prompt tokens still to go through decode steps (short prompts)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def output(self) -> str:
        """The text handed out so far (the end of it may be held back while it could start a stop string)."""
        return self.text.text[: self.text.emitted]

    def add(self, token: int, token_bytes: bytes, now: float) -> None:
        """Append a sampled token: its text delta, and whether the sequence is now finished."""
        self.token_ids.append(token)
        self.history.append(token)
        params, deadline = self.request.params, self.request.deadline
        out_of_room = len(self.token_ids) >= params.max_new_tokens or (
            deadline is not None and now > deadline
        )
        ending = token == EOT_ID or out_of_room
        self.delta = self.text.add(b"" if token == EOT_ID else token_bytes, final=ending)
        if token == EOT_ID or self.text.stopped:
            self.finish_reason = "stop"
        elif out_of_room:
            self.finish_reason = "length"

    def completion(self) -> Completion:
        prompt_tokens = len(self.request.prompt)
        return Completion(
            self.text.text, self.token_ids, prompt_tokens, self.finish_reason, self.prompt_scores, self.scores
        )


class Engine:
    """Schedules sequences over a pool of `max_batch` KV-cache rows; see the module docstring.

    Forward passes run in eval mode (no dropout); a model in training mode is put back after each step.
    One thread runs `step`; others may `enqueue` and set `cancelled`. `batch_invariant`: every decode
    step computes the whole pool, so a seeded text never depends on what else runs (see `DecodeStep`).
    """

    def __init__(
        self,
        model: GPT,
        max_batch: int = 16,
        device: str | torch.device | None = None,
        batch_invariant: bool = False,
    ):
        self.tokenizer = get_tokenizer()
        if model.config.vocab_size != self.tokenizer.n_vocab:
            raise SmallGPTError(
                f"model has a {model.config.vocab_size}-token vocabulary; generation needs GPT-2's "
                f"{self.tokenizer.n_vocab} (incompatible checkpoint)"
            )
        if max_batch < 1:
            raise SmallGPTError(f"max_batch must be at least 1, got {max_batch}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device)
        dtype = next(model.parameters()).dtype
        self.pool = KVPool(model.config, max_batch, self.device, dtype)
        graphs = self.device.type == "cuda"
        self.batch_invariant = batch_invariant
        self.decode = DecodeStep(self.model, self.pool, graphs=graphs, every_row=batch_invariant)
        self.waiting: deque[Sequence] = deque()
        self.active: list[Sequence] = []  # active[i] holds pool row i
        self.decoded: torch.Tensor | None = None  # the last decode step's logits (rows, vocab)

    @property
    def capacity(self) -> int:
        """The context: the most tokens a sequence's next token is predicted from."""
        return self.pool.capacity

    def requests(
        self, prompts: list[str] | list[list[int]], params: SamplingParams, n: int = 1, **fields
    ) -> list[Request]:
        """n choices of each prompt: choice i continues prompts[i // n] and samples with seed + i (from
        one fresh random seed if `params` has none), so a seeded set of choices comes out the same
        again. Text prompts are tokenized (`prompt_ids`); `fields` are the rest of every `Request`."""
        seed = params.seed if params.seed is not None else torch.Generator().seed()
        ids = [prompt_ids(p) if isinstance(p, str) else p for p in prompts]
        return [Request(ids[i // n], replace(params, seed=seed + i), **fields) for i in range(len(ids) * n)]

    def submit(self, request: Request) -> Sequence:
        """Queue a request; it joins the batch at the next step with a free row."""
        sequence = self.prepare(request)
        self.enqueue([sequence])
        return sequence

    def prepare(self, request: Request) -> Sequence:
        if not request.prompt:
            raise SmallGPTError("empty prompt: give at least one token")
        return Sequence(request, self.device)

    def enqueue(self, sequences: list[Sequence]) -> None:
        """Add to the waiting queue; safe from another thread than `step`'s (deque appends are atomic)."""
        self.waiting.extend(sequences)

    def abandon(self) -> list[Sequence]:
        """Drop every sequence, waiting or active (after a failed step), and return them."""
        dropped = list(self.waiting) + self.active
        self.waiting.clear()
        self.active.clear()
        self.pool.lengths.zero_()
        return dropped

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.active)

    def step(self, report: Callable[[list[Sequence]], None] | None = None) -> list[Sequence]:
        """Advance every sequence by one token; returns those that changed (new text or finished).

        `report`, if given, gets them as soon as they are known, before the batched decode step that
        feeds the new tokens: a server answers finished requests while the batch computes, and the
        clients' next requests can join at the very next step instead of a step later.
        """
        with self._inference():
            for sequence in [s for s in self.active if s.cancelled]:
                self._leave(sequence)
            changed = []
            while self.waiting and len(self.active) < self.pool.rows:
                sequence = self.waiting.popleft()
                if not sequence.cancelled:
                    self._join(sequence)
                    changed += [sequence] if sequence.done else []
            if self.active:
                self._sample()
                changed += self.active
                for sequence in [s for s in self.active if s.done]:
                    self._leave(sequence)
            if report is not None:
                report(changed)
            self._advance()
            return changed

    def generate(self, prompts: list[str], params: SamplingParams, n: int = 1) -> list[Completion]:
        """n completions of every prompt, all in one batch (see `requests`)."""
        sequences = [self.submit(request) for request in self.requests(prompts, params, n)]
        while not all(s.done for s in sequences):
            self.step()
        return [s.completion() for s in sequences]

    # --- the steps ---

    def _join(self, sequence: Sequence) -> None:
        """Give a waiting sequence the next free row: its prompt is fed, prefilled, or scored."""
        row, request = len(self.active), sequence.request
        self.active.append(sequence)
        scoring_only = request.params.max_new_tokens == 0
        if not (scoring_only or request.echo):
            window = request.prompt[-self.capacity :]
            if len(window) <= FEED_UP_TO:
                sequence.feed = list(window)  # through the shared decode steps, one token a step
            elif self._alone():  # no step to share: the logits at once
                sequence.logits, sequence.cached = self.pool.prefill(self.model, row, window), len(window)
            else:  # only the cache: the last token's logits come from the next decode step
                self.pool.prefill(self.model, row, window[:-1], logits="none")
                sequence.cached, sequence.feed = len(window) - 1, window[-1:]
            return
        # Scored (echo): each prompt token from the ones before it. Only scoring (max_new_tokens 0): the
        # last prompt token predicts nothing, so the model need not see it, nor any token without echo.
        if request.echo:
            window = (request.prompt[:-1] if scoring_only else request.prompt)[-self.capacity :]
            if window:
                logits = self.pool.prefill(self.model, row, window, "all")
                sequence.cached, sequence.logits = len(window), logits[-1]
                scored = request.prompt[-len(window) :] if scoring_only else window[1:]
                scores = self._scores(logits[: len(scored)], scored, request.logprobs or 0)
                sequence.prompt_scores = [None] * (len(request.prompt) - len(scores)) + scores
            else:
                sequence.prompt_scores = [None]
        if scoring_only:
            sequence.finish_reason = "length"
            self._leave(sequence)

    def _alone(self) -> bool:
        """Whether the newest active sequence will step alone: nobody else active or waiting, and
        steps that compute only the busy rows (batch-invariant steps compute the whole pool anyway)."""
        return len(self.active) == 1 and not self.waiting and not self.batch_invariant

    def _sample(self) -> None:
        """One token per active sequence; sequences with the same sampler settings share one call."""
        groups = defaultdict(list)
        for sequence in self.active:
            if not sequence.feed:  # (a sequence still feeding its prompt has nothing to sample from)
                groups[sequence.request.params.sampler].append(sequence)
        now = time.monotonic()
        for group in groups.values():
            logits = self._logits_of(group)
            tokens = sample_next_token(logits, group[0].request.params, [s.rng for s in group]).tolist()
            wanted = [(i, s) for i, s in enumerate(group) if s.scores is not None]
            if wanted:
                rows = [i for i, _ in wanted]
                k = max(s.request.logprobs for _, s in wanted)
                scores = self._scores(logits[rows], [tokens[i] for i in rows], k)
                for (_, s), score in zip(wanted, scores, strict=True):
                    s.scores.append((score[0], score[1], score[2][: s.request.logprobs]))
            for sequence, token in zip(group, tokens, strict=True):
                sequence.add(token, self.tokenizer.decode_single_token_bytes(token), now)

    def _logits_of(self, group: list[Sequence]) -> torch.Tensor:
        """The group's next-token scores (len(group), vocab). Usually every sequence samples alike and
        they are consecutive rows of the last decode step's output: a view, no copy."""
        rows = [s.decoded_row for s in group]
        if rows[0] is not None and rows == list(range(rows[0], rows[0] + len(rows))):
            return self.decoded[rows[0] : rows[0] + len(rows)]
        return torch.stack([s.logits for s in group])

    def _advance(self) -> None:
        """Feed every active sequence its newest token (or its prompt's next one): one batched decode
        step for all rows."""
        if not self.active:
            return
        for row, sequence in enumerate(self.active):
            if sequence.cached == self.capacity and not self.pool.rolling:  # full: recompute the window
                window = sequence.history[-self.capacity : -1]  # (but the newest token: the step feeds it)
                self.pool.prefill(self.model, row, window, logits="none")
                sequence.cached = self.capacity - 1
        fed = [s.feed.pop(0) if s.feed else s.history[-1] for s in self.active]
        tokens = torch.tensor(fed, device=self.device)
        self.decoded = self.decode(tokens)
        for row, sequence in enumerate(self.active):
            sequence.logits, sequence.decoded_row = self.decoded[row], row
            sequence.cached = min(sequence.cached + 1, self.capacity)

    def _leave(self, sequence: Sequence) -> None:
        """Free a sequence's row; the last active sequence moves into it, so rows stay packed."""
        row, last = self.active.index(sequence), len(self.active) - 1
        if row != last:
            self.pool.move_row(last, row)
            self.active[row] = self.active[last]
        else:
            self.pool.clear_row(row)
        self.active.pop()
        sequence.logits = sequence.decoded_row = None

    @staticmethod
    def _scores(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenScore]:
        """log_softmax of each row of `logits` (T, vocab) at tokens[t], with the k most probable."""
        logprobs = logits.float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
        if k == 0:
            return [(t, lp, []) for t, lp in zip(tokens, chosen, strict=True)]
        top_values, top_ids = (x.tolist() for x in logprobs.topk(k, dim=-1))
        return [
            (t, lp, list(zip(ids, values, strict=True)))
            for t, lp, ids, values in zip(tokens, chosen, top_ids, top_values, strict=True)
        ]

    @contextmanager
    def _inference(self):
        """Inference mode and eval mode (no dropout); a model in training mode is put back."""
        was_training = self.model.training
        if was_training:
            self.model.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.model.train()

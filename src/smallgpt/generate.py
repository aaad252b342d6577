"""Sampling: how one next token is picked from the model's scores, and how tokens become text.

    logits (rows, vocab) -> temperature -> top-k -> top-p -> one draw per row from its own random stream
    token bytes -> whole UTF-8 characters -> text deltas, cut at a stop string (`RowText`)

The engine (`smallgpt.engine`) runs the model and calls these once per decode step. Also here, for
faster CPU decoding: int8 weights (`quantize_int8`) and weights packed for batched steps
(`packed_for_decoding`).
"""

from __future__ import annotations

import codecs
import copy
from dataclasses import dataclass, field, fields

import torch
import torch.nn as nn

from smallgpt.errors import SmallGPTError
from smallgpt.model import GPT

# Below float32's smallest normal number a temperature rounds to 0 or a denormal in the logits' dtype:
# dividing by it gives nan or inf, so such temperatures sample greedily (the limit they tend to).
GREEDY_BELOW = torch.finfo(torch.float32).tiny


# Marks a field that only its own sequence reads; every other field shapes the distribution a token is
# drawn from, and sequences are sampled together only where all of those agree (`SamplingParams.sampler`).
PER_SEQUENCE = {"per_sequence": True}


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Same seed, same prompt, same model -> same text.

    A sequence samples from its own random stream, seeded with `seed`, so the tokens drawn do not depend
    on what else shares its batch (the logits may, in their last digits: see `DecodeStep`). The CLI's
    sample i and the server's choice i use seed + i (`Engine.requests`).
    """

    max_new_tokens: int = field(default=100, metadata=PER_SEQUENCE)  # 0: only score the prompt
    temperature: float = 1.0  # 0 = greedy (always the most probable token)
    top_k: int | None = None  # sample only among the k most probable tokens
    top_p: float | None = None  # ... only among the smallest set whose probability mass reaches p
    seed: int | None = field(default=None, metadata=PER_SEQUENCE)  # None = a fresh random seed
    # End when the text contains one of these (not included in the text).
    stop: tuple[str, ...] = field(default=(), metadata=PER_SEQUENCE)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))  # accept a list too
        checks = [
            (self.max_new_tokens >= 0, f"max_new_tokens must be at least 0, got {self.max_new_tokens}"),
            (self.temperature >= 0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (self.top_k is None or self.top_k >= 1, f"top_k must be at least 1, got {self.top_k}"),
            (self.top_p is None or 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty text"),
        ]
        for ok, message in checks:
            if not ok:
                raise SmallGPTError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def sampler(self) -> tuple:
        """What decides the distribution: sequences with equal samplers are sampled as one batch. Every
        field not marked PER_SEQUENCE, so a new field is in it unless someone says otherwise."""
        return tuple(getattr(self, f.name) for f in fields(self) if not f.metadata.get("per_sequence"))


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | list | None = None
) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab) under temperature, top-k and top-p.

    `generator` is one random stream for all rows, or a list of one per row.
    """
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = logits.float()
    candidates = None  # when set, column j of the scores belongs to token candidates[:, j]
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        logits, candidates = logits.topk(params.top_k, dim=-1)  # sorted, most probable first
    # softmax(l / T) is proportional to exp((l - max l) / T): the best token weighs 1, no score
    # overflows and a tiny T underflows to 0, never to nan. Drawing needs no normalising.
    weights = logits - logits.amax(dim=-1, keepdim=True)
    if params.temperature != 1:
        weights /= params.temperature
    weights.exp_()
    if params.top_p is not None and params.top_p < 1:
        probs = weights / weights.sum(dim=-1, keepdim=True)
        if candidates is None:
            probs, candidates = _sorted_prefix_holding_mass(probs, params.top_p)
        # Keep the smallest most-probable-first prefix whose mass reaches p: a token stays while the
        # mass strictly before it is still short of p (so the most probable token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        drop = mass_before >= params.top_p
        drop[:, 0] = False  # explicitly: a p below float32's smallest number would drop it otherwise
        weights = probs.masked_fill(drop, 0.0)
    choice = inverse_cdf(weights, _uniforms(weights, generator))
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


def _uniforms(weights: torch.Tensor, generator: torch.Generator | list | None) -> torch.Tensor:
    """One uniform number in [0, 1) per row, (B, 1), from the row's own stream if given a list."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, 1, generator=g, device=weights.device) for g in generator])
    return torch.rand(weights.shape[0], 1, generator=generator, device=weights.device)


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor, block: int = 256) -> torch.Tensor:
    """The column (B, 1) where u (B, 1) in [0, 1) falls in each row's running sum of `weights` (B, V)
    scaled to its total: a draw in proportion to the (unnormalised, non-negative) weights.

    It is the column a full running sum would give (torch.multinomial does the same job ~20x slower
    on a CPU for a 50k vocabulary), found in two levels, since a running sum over 50,257 columns costs
    as much as the softmax: the total of each block of `block` columns, the block where u falls in
    their running sum, then the running sum inside that block only. A zero-weight column is never
    hit: u stays strictly below the total, and lands on the first column whose running sum exceeds
    it, a column that added weight (the same holds for the block, then inside it).
    """
    rows, width = weights.shape
    block = min(block, width)
    whole = width - width % block
    block_mass = weights[:, :whole].reshape(rows, -1, block).sum(dim=-1)
    if whole < width:  # the last, shorter block
        block_mass = torch.cat([block_mass, weights[:, whole:].sum(dim=-1, keepdim=True)], dim=1)
    cdf = block_mass.cumsum(dim=-1)
    u = _below(u * cdf[:, -1:], cdf[:, -1:])
    chosen = torch.searchsorted(cdf, u, right=True)  # the first block whose running sum exceeds u
    before = torch.cat([cdf.new_zeros(rows, 1), cdf], dim=1).gather(1, chosen)  # <= u
    columns = chosen * block + torch.arange(block, device=weights.device)  # (B, block)
    inside = weights.gather(1, columns.clamp(max=width - 1)).masked_fill(columns >= width, 0.0)
    inside = inside.cumsum(dim=-1)
    # Summed in another order, the block's running sum may end an ulp off its total: stay inside it.
    offset = torch.searchsorted(inside, _below(u - before, inside[:, -1:]), right=True)
    return chosen * block + offset


def _below(value: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """`value`, moved strictly below `limit` where it is not already (float rounding can reach it)."""
    return torch.minimum(value, torch.nextafter(limit, torch.zeros_like(limit)))


class RowText:
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


class Int8Linear(nn.Module):
    """A Linear layer that stores its weight as int8 with one scale per output row (CPU inference).

    Decoding one sequence on a CPU is bound by reading the weights for every token (~120 MB for
    smallgpt-10m in fp32, 60% of it the head); int8 reads a quarter of that. Row w is stored as
    round(w / s) with s = max|w| / 127 (error at most s/2 per weight). The matmul is PyTorch's int8
    weight-only kernel, `_weight_int8pack_mm`, which widens the weights inside its loop; its vector
    path takes bfloat16 inputs (fp32 ones run ~10x slower), so inputs pass through bfloat16.

    Why not torchao's `Int8WeightOnlyConfig` (the same per-row scheme): in eager mode, as the engine
    runs, its matmul first converts the whole weight to fp32, which made generation 7-11x slower than
    this layer (slower than fp32 itself); compiled with bfloat16 inputs it becomes this very kernel
    (benchmarks/RESULTS.md).
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
        y = torch._weight_int8pack_mm(rows, self.weight, self.scale).to(x.dtype)
        y = y.view(x.shape[:-1] + (-1,))
        return y if self.bias is None else y + self.bias


def _replace_linears(model: nn.Module, make) -> None:
    """Replace every nn.Linear in `model` by make(linear), whatever the architecture calls its layers."""
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in linears:
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, make(linear))


def quantize_int8(model: GPT) -> GPT:
    """A copy of `model` for CPU generation with every matmul weight in int8 (embeddings stay fp32).

    1.7-2.1x as fast at batch 1 on a 2-core CPU; logits move by 1-2% of their spread, so samples are
    as good but not bit-identical to fp32 (greedy text can differ where two tokens nearly tie).
    """
    if next(model.parameters()).device.type != "cpu":
        raise SmallGPTError("int8 weights are for CPU generation; on a GPU use the fp32/bf16 model")
    quantized = copy.deepcopy(model).eval()
    _replace_linears(quantized, Int8Linear)
    return quantized  # a tied head is untied: lookups keep the fp32 embedding


# Below this many rows MKL's plain sgemm is as fast as its packed GEMM (measured on 2-core Xeons).
PACK_FROM_ROWS = 4


class PackedLinear(nn.Module):
    """An nn.Linear whose weight is laid out once per row count for MKL's packed GEMM.

    A batched decode step multiplies every weight by a thin (rows, K) matrix. MKL's ordinary sgemm
    rearranges the weight into its kernel's layout as it goes, on every call (26 MB for `tiny`'s
    head, each step); packed GEMM (`cblas_sgemm_pack` once, then compute; PyTorch's
    `mkl::_mkl_linear`, which torch.compile's weight freezing emits on CPUs) does it once per row
    count: 1.2-3.8x faster for 4-16 rows here. A packing serves exactly the row count it was made
    for, so each count met (the decode buckets: 4, 8, 16) keeps its own copy of the weight. A
    packing follows the weight: it is made again when the weight changes in place.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self._packings: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, rows = self.linear.weight, x.numel() // x.shape[-1]
        if rows < PACK_FROM_ROWS:
            return self.linear(x)
        made_from, packed = self._packings.get(rows, (None, None))
        if made_from != (weight.data_ptr(), weight._version):
            packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), rows)
            self._packings[rows] = ((weight.data_ptr(), weight._version), packed)
        return torch.ops.mkl._mkl_linear(x, packed, weight, self.linear.bias, rows)


def packed_for_decoding(model: GPT, rows: int) -> GPT | None:
    """A twin of `model` for decode steps of up to `rows` rows: the same parameters (shared, not
    copied), every matmul a `PackedLinear`; None where it would not be used (fewer rows than
    PACK_FROM_ROWS; not an fp32 model on a CPU with MKL; no nn.Linear left, as after `quantize_int8`)."""
    weight = next(model.parameters())
    cpu_fp32 = weight.device.type == "cpu" and weight.dtype == torch.float32
    has_linears = any(isinstance(m, nn.Linear) for m in model.modules())
    if rows < PACK_FROM_ROWS or not cpu_fp32 or not has_linears or not torch.backends.mkl.is_available():
        return None
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    twin = copy.deepcopy(model, shared).eval()  # (deepcopy reuses what `shared` already holds)
    _replace_linears(twin, PackedLinear)
    return twin

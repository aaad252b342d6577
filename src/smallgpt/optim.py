"""Optimizers and learning-rate schedules: which rule moves each parameter, and how far per update.

Two recipes, picked by `TrainConfig.optimizer`:
  adamw   the seed's: AdamW everywhere, weight decay on matrices only.
  muon    the modern one: Muon (`torch.optim.Muon`'s step, Newton-Schulz in the dtype this machine
          runs fastest) for the 2-D matrices inside the blocks, AdamW for the rest (token embedding,
          output head, norm gains, biases). Muon replaces each update matrix by the nearest orthogonal
          one (Newton-Schulz iterations), so every direction of a hidden layer learns at the same
          rate; embeddings and the head are lookups and per-token scores, for which that geometry is
          wrong, so they keep AdamW.
Muon's peak rate is `muon_lr`, AdamW's `learning_rate` (the embedding's `embedding_lr` and an untied
head's `head_lr` where given); the schedule scales all alike, and moves Muon's momentum too
(`muon_momentum_at`: lower while the weights are far from home, lower again as the steps shrink):
  cosine  linear warm-up, cosine decay to min_lr (the seed's)
  wsd     linear warm-up, constant, then a linear decay to min_lr over the last `decay_fraction` of
          the run ("warmup-stable-decay": the constant phase makes fast progress, the decay cashes it in)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # recipe.py imports this module's names at runtime, so these are annotations only
    from smallgpt.model import GPT
    from smallgpt.recipe import TrainConfig

SCHEDULES = ("cosine", "wsd")


class Muon(torch.optim.Muon):
    """`torch.optim.Muon` with its Newton-Schulz iterations in `ns_dtype`, batched over same-shape matrices.

    torch's iterates in bf16, which GPUs and CPUs with AMX or AVX-512 BF16 multiply fast; a CPU
    without them emulates bf16 and is faster in fp32 (`smallgpt.precision` measures which). The step
    is torch's (`_single_tensor_muon`), written out so the iteration's dtype can change, and so that the
    matrices of one shape (a model has a few shapes, each in every layer) are orthogonalised together
    in batched matmuls: one call per shape instead of one per matrix, which on a CPU halves the step's
    cost for small models. It matches torch.optim.Muon to rounding (tests/test_optim.py).
    """

    def __init__(self, params, *, ns_dtype: torch.dtype = torch.bfloat16, **settings):
        super().__init__(params, **settings)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape: dict[torch.Size, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for param in (p for p in group["params"] if p.grad is not None):
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(param.grad)
                buffer = state["momentum_buffer"]
                buffer.lerp_(param.grad, 1 - momentum)
                update = param.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                by_shape.setdefault(param.shape, []).append((param, update))
            for shape, pairs in by_shape.items():
                stacked = torch.stack([update for _, update in pairs])
                ns = group["ns_coefficients"], group["ns_steps"], group["eps"]
                updates = orthogonalise(stacked, *ns, self.ns_dtype)
                for (param, _), update in zip(pairs, updates, strict=True):
                    param.mul_(1 - lr * group["weight_decay"])
                    param.add_(update, alpha=-lr * lr_ratio(group["adjust_lr_fn"], shape))
        return loss


def orthogonalise(matrices: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype):
    """Newton-Schulz: X <- a X + (b A + c A^2) X with A = X X^T, from X = M / |M|_F, in `dtype`.

    The quintic's coefficients (a, b, c) push every singular value of X towards ~1 in a few steps,
    so the result is close to U V^T of M = U S V^T: the nearest orthogonal matrix. Iterating on the
    wide orientation keeps A = X X^T the small side. `matrices`: a stack (batch, m, n).
    """
    a, b, c = coefficients
    x = matrices.to(dtype)
    tall = matrices.size(-2) > matrices.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.mT if tall else x


def lr_ratio(adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """Muon's per-matrix rate multiplier: match AdamW's update RMS (0.2 sqrt(max side)), or Keller
    Jordan's original sqrt(max(1, rows / columns))."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    return math.sqrt(max(1, rows / columns))


class Optimizers:
    """Several optimizers over disjoint parameters, stepped, zeroed and saved as one.

    Exposes what the training loop and `torch.amp.GradScaler` use: `param_groups`, `step`, `zero_grad`,
    `state_dict` / `load_state_dict` (tensors and plain containers only, so checkpoints stay
    loadable with `weights_only=True`).
    """

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict) -> None:
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)


def muon_parameters(model: GPT) -> list[torch.nn.Parameter]:
    """The matrices Muon trains: every 2-D weight inside the transformer blocks."""
    return [p for p in model.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]


@dataclass(frozen=True)
class Kernels:
    """How this machine runs the optimizers: fused AdamW or not, and Muon's Newton-Schulz dtype."""

    fused: bool | None
    ns_dtype: torch.dtype


def make_optimizer(
    model: GPT, cfg: TrainConfig, device: torch.device, ns_dtype: torch.dtype = torch.bfloat16
) -> torch.optim.Optimizer | Optimizers:
    """The recipe's optimizer (`TrainConfig.optimizer` names a row of `OPTIMIZERS`); Muon's
    Newton-Schulz in `ns_dtype` (`smallgpt.precision` measures which one this machine runs faster)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied head appears once
    # One fused AdamW kernel over all its parameters: on GPUs, and on CPUs (3x faster than the
    # loop-per-tensor version for smallgpt-10m here); MPS keeps the default.
    fused = True if device.type in ("cuda", "cpu") else None
    return OPTIMIZERS[cfg.optimizer](model, params, cfg, Kernels(fused, ns_dtype))


def _adamw(model: GPT, params: list, cfg: TrainConfig, kernels: Kernels) -> torch.optim.AdamW:
    """The seed's: AdamW everywhere, weight decay on matrices (matmul weights, embeddings) only."""
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    betas = (cfg.beta1, cfg.beta2)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps, fused=kernels.fused)


def _muon(model: GPT, params: list, cfg: TrainConfig, kernels: Kernels) -> Optimizers:
    """The modern one: Muon for the blocks' matrices, AdamW for the rest, stepped as one."""
    matrices = muon_parameters(model)
    embedding = model.transformer.wte.weight
    head = [] if model.config.architecture.tied_head else [model.lm_head.weight]
    taken = {id(p) for p in (*matrices, embedding, *head)}
    rest = [p for p in params if id(p) not in taken]
    # "match_rms_adamw" scales each matrix's step so its RMS matches a typical AdamW step (0.2 lr),
    # whatever its shape: one learning rate fits the square attention and the wide MLP matrices.
    muon = Muon(
        matrices, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, ns_steps=cfg.muon_ns_steps,
        adjust_lr_fn="match_rms_adamw", ns_dtype=kernels.ns_dtype, momentum=muon_momentum_at(cfg, 0),
    )  # fmt: skip
    # The embedding has a group of its own: each update touches only the rows of the tokens seen,
    # and (as in modded-nanogpt) those rows want a larger step than the head and the norm gains,
    # and a longer memory of their squared gradients (a rare token's row is rarely updated). An
    # untied head has a group (and a rate) of its own too, as in nanochat.
    embedding_betas = (cfg.beta1, cfg.embedding_beta2 if cfg.embedding_beta2 is not None else cfg.beta2)
    groups = [
        {"params": [embedding], "role": "embedding", "betas": embedding_betas},
        {"params": head, "role": "head"},
        {"params": rest},
    ]
    groups = [group for group in groups if group["params"]]
    betas = (cfg.beta1, cfg.beta2)
    adamw = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps, weight_decay=0.0, fused=kernels.fused
    )
    return Optimizers(muon, adamw)


OPTIMIZERS = {"adamw": _adamw, "muon": _muon}  # TrainConfig.optimizer -> its builder


def set_learning_rates(optimizer: torch.optim.Optimizer | Optimizers, cfg: TrainConfig, step: int) -> None:
    """Every group at its optimizer's peak rate times the schedule's factor for update `step`.

    The peaks come from `cfg`, not from the optimizer's saved state, so a resumed run may change them.
    """
    factor = lr_factor(cfg, step)
    for part in getattr(optimizer, "optimizers", [optimizer]):
        for group in part.param_groups:
            group["lr"] = peak_learning_rate(cfg, part, group) * factor
            if isinstance(part, torch.optim.Muon):
                group["momentum"] = muon_momentum_at(cfg, step)


def peak_learning_rate(cfg: TrainConfig, optimizer: torch.optim.Optimizer, group: dict) -> float:
    """A parameter group's peak rate: Muon's, the embedding's (muon recipe), or AdamW's."""
    if isinstance(optimizer, torch.optim.Muon):
        return cfg.muon_lr
    if group.get("role") == "embedding" and cfg.embedding_lr is not None:
        return cfg.embedding_lr
    if group.get("role") == "head" and cfg.head_lr is not None:
        return cfg.head_lr
    return cfg.learning_rate


def muon_momentum_at(cfg: TrainConfig, step: int) -> float:
    """Muon's momentum for update `step`: from `muon_momentum_start` up to `muon_momentum` over
    `muon_momentum_warmup` updates (early gradients are noisy and the weights far from home: a short
    memory), held, then down to `muon_momentum_end` over the schedule's decay (as the steps shrink)."""
    peak = cfg.muon_momentum
    if step < cfg.muon_momentum_warmup:
        return cfg.muon_momentum_start + (peak - cfg.muon_momentum_start) * step / cfg.muon_momentum_warmup
    decay_start, decay_iters = wsd_decay(cfg)
    if cfg.schedule != "wsd" or step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start) / max(decay_iters - decay_start, 1))
    return peak + (cfg.muon_momentum_end - peak) * progress


def wsd_decay(cfg: TrainConfig) -> tuple[int, int]:
    """The updates where the wsd schedule's linear decay starts and where it reaches the floor."""
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    return decay_iters - round(cfg.decay_fraction * decay_iters), decay_iters


def learning_rate_at(cfg: TrainConfig, step: int) -> float:
    """The (AdamW) learning rate of update `step` (0-based), as logged."""
    return cfg.learning_rate * lr_factor(cfg, step)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The schedule: a fraction of the peak rate for update `step` (0-based), in [0, 1]."""
    floor = cfg.min_lr / cfg.learning_rate
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if step >= decay_iters:
        return floor
    if cfg.schedule == "wsd":
        decay_start, _ = wsd_decay(cfg)
        if step < decay_start:
            return 1.0
        return floor + (1 - floor) * (decay_iters - step) / (decay_iters - decay_start)
    progress = (step - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return floor + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - floor)

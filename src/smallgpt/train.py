"""Training: one loop for both recipes, which you can read, stop, resume exactly, and spread over GPUs.

    for each update (one optimizer step: AdamW for the seed's recipe, Muon + AdamW for the modern one):
        lr <- warm-up, then cosine decay to a floor (seed), or constant then linear decay to zero (modern)
        for each micro-batch of the update:        (under DDP: gradients all-reduced on the last one only)
            loss = model(x, y) / accumulation_steps;  loss.backward()
        clip the gradient norm (grad_clip, 1.0 in the seed's recipe);  optimizer step (`smallgpt.optim`)
        every log_interval: progress bar, metrics.jsonl;  every eval_interval: val loss, checkpoint, plot
    finally: a full pass over the validation split, and a sample of generated text

Exact resume: every random choice is a pure function of (seed, update, rank). The data sampler is
counter-based (`smallgpt.loader`) and the dropout RNG is reseeded from (seed, update, rank) before each
update, so a checkpoint needs no RNG snapshot: weights + optimizer state + sampler position + step say
everything, and a resumed run computes bit for bit what an uninterrupted one computes (on CPU).
The loop never waits for the device except at log/eval steps (`.item()`), so a GPU runs ahead freely.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from smallgpt import distributed
from smallgpt.checkpoint import (
    STATE_NAME,
    WEIGHTS_NAME,
    RunStart,
    check_memory,
    check_run_dir,
    load_weights_into,
    prune_checkpoints,
    read_model_config,
    save_checkpoint,
    save_weights,
    saved_best_loss,
    step_checkpoints,
)
from smallgpt.config import GPT2_VOCAB_SIZE
from smallgpt.distributed import Runtime, StopSignal, autocast, keep_freed_memory
from smallgpt.errors import SmallGPTError, first_line
from smallgpt.evaluate import estimate_loss, full_pass_loss, perplexity
from smallgpt.files import WriteError, atomic_write_dir, atomic_write_text, remove_temporaries
from smallgpt.loader import SAMPLERS, DeviceBatches, data_identity, same_data, training_data
from smallgpt.model import GPT
from smallgpt.monitor import RunMonitor, datasheet_peak, measure_matmul_peak, trim_metrics
from smallgpt.optim import learning_rate_at, make_optimizer, set_learning_rates
from smallgpt.precision import name, resolve_precision
from smallgpt.recipe import RunConfig, require_same_shape
from smallgpt.sample import print_training_sample

NEW_RUN = RunStart()  # a run that starts from freshly initialised weights


@dataclass
class TrainResult:
    step: int
    final_val_loss: float | None  # None when the run was interrupted before the end
    interrupted: bool


class Trainer:
    """One process's share of a run: model, optimizer, data stream, and the loop over updates."""

    def __init__(self, run: RunConfig, data_dir: Path, out_dir: Path, runtime: Runtime, console: Console,
                 *, start: RunStart = NEW_RUN, allow_different_data: bool = False) -> None:  # fmt: skip
        self.run, self.cfg, self.rt, self.out_dir, self.console = run, run.train, runtime, out_dir, console
        cfg, device = self.cfg, runtime.device
        per_update = cfg.micro_batch_size * runtime.world_size
        if cfg.batch_size % per_update:
            raise SmallGPTError(
                f"batch_size {cfg.batch_size} is not a multiple of micro_batch_size x processes "
                f"= {per_update}"
            )
        self.accumulation = cfg.batch_size // per_update
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self.train_tokens, self.val_tokens = training_data(
            data_dir, run.model.block_size, run.model.vocab_size
        )
        self.data = data_identity(data_dir)
        check_memory(run.model, cfg.micro_batch_size, device)
        # auto on a CPU: bf16 autocast where this CPU multiplies bf16 fast enough (smallgpt.precision)
        rows = cfg.micro_batch_size * run.model.block_size
        self.precision = resolve_precision(cfg.dtype, device, run.model, rows)
        self.dtype = self.precision.dtype
        torch.manual_seed(cfg.seed)
        keep_freed_memory(device)
        self.model = GPT(run.model).to(device)
        self.model.train_attention_in(self.precision.attention_dtype)
        checkpoint_bytes = 16 * sum(p.numel() for p in self.model.parameters())  # weights + 2 moments
        if runtime.is_main:
            check_run_dir(out_dir, checkpoint_bytes)
            remove_temporaries(out_dir)  # and put back a best/ a kill left moved aside
            remove_temporaries(out_dir / "checkpoints")
            if step_checkpoints(out_dir) and not start.resumes:
                raise SmallGPTError(
                    f"{out_dir} already holds a run: continue it with --resume or pick another --out"
                )
        self.optimizer = make_optimizer(self.model, cfg, device, self.precision.ns_dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype == torch.float16)
        block, micro, rank, world = (
            run.model.block_size,
            cfg.micro_batch_size,
            runtime.rank,
            runtime.world_size,
        )
        sampler = SAMPLERS[cfg.sampling](self.train_tokens, block, micro, cfg.seed, rank, world)
        self.batches = DeviceBatches(sampler, device)
        self.step, self.best_val_loss = 0, math.inf
        if start.resumes:
            self._resume(start, allow_different_data)
        elif start.weights is not None:
            require_same_shape(read_model_config(start.weights), run.model, start.weights)
            load_weights_into(self.model, start.weights)
        self.model.train()
        self.train_model = self.model
        if cfg.compile or (cfg.compile is None and device.type == "cuda"):
            self.train_model = torch.compile(self.model)  # CPUs: inductor, which needs a C++ compiler
        if runtime.distributed:
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.train_model, device_ids=ids)
        if runtime.is_main:
            try:
                atomic_write_text(out_dir / "config.json", json_dump(run.to_dict()))
            except WriteError as failure:
                raise self._stopped_by(failure) from None

    def _resume(self, start: RunStart, allow_different_data: bool) -> None:
        checkpoint, state = start.checkpoint, start.state
        require_same_shape(RunConfig.from_dict(state["config"]).model, self.run.model, checkpoint)
        recorded = state.get("data")
        if isinstance(recorded, dict) and not same_data(recorded, self.data) and not allow_different_data:
            raise SmallGPTError(
                f"{self.out_dir} trained on {recorded.get('path')}, not on {self.data['path']} (other "
                "tokenizer or token counts): to continue on other data anyway, add --allow-different-data"
            )
        load_weights_into(self.model, checkpoint / WEIGHTS_NAME)
        try:
            self.optimizer.load_state_dict(start.trainer_state["optimizer"])
            if start.trainer_state["scaler"] or not self.scaler.is_enabled():  # from fp32/bf16: fresh scale
                self.scaler.load_state_dict(start.trainer_state["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as exc:  # a damaged or foreign trainer.pt
            raise SmallGPTError(
                f"checkpoint {checkpoint} has a damaged optimizer state ({first_line(exc)})"
            ) from None
        self.batches.load_state_dict(state["sampler"])
        self.step = state["step"]
        self.best_val_loss = math.inf if state["best_val_loss"] is None else state["best_val_loss"]
        # A kill between writing best/ and the next checkpoint leaves best/ ahead of the checkpoint:
        # count what best/ holds, so best/ is only ever replaced by a better model.
        self.best_val_loss = min(self.best_val_loss, saved_best_loss(self.out_dir))
        if self.rt.is_main:
            trim_metrics(self.out_dir, self.step)
            self.console.print(f"resuming {checkpoint} at step {self.step}", highlight=False)
            saved_dtype = state.get("dtype", name(self.dtype))
            if saved_dtype != name(self.dtype):  # master weights and optimizer state are fp32 in both
                self.console.print(
                    f"precision: the checkpoint trained in {saved_dtype}, this run continues in "
                    f"{name(self.dtype)} (weights and optimizer state are fp32 either way)",
                    highlight=False,
                )

    @property
    def tokens_per_update(self) -> int:
        return self.cfg.batch_size * self.run.model.block_size

    def update(self) -> torch.Tensor:
        """One optimizer step at the current step's learning rate; returns the mean loss (on device)."""
        cfg = self.cfg
        set_learning_rates(self.optimizer, cfg, self.step)
        torch.manual_seed(
            int(np.random.SeedSequence([cfg.seed, self.step, self.rt.rank]).generate_state(1)[0])
        )
        loss_sum = torch.zeros((), device=self.rt.device)
        for micro_step in range(self.accumulation):
            x, y = self.batches.next()
            last = micro_step == self.accumulation - 1
            # DDP all-reduces gradients in backward(); accumulate locally until the last micro-batch.
            sync = nullcontext() if last or not self.rt.distributed else self.train_model.no_sync()
            with sync:
                with autocast(self.rt.device, self.dtype):
                    loss = self._loss(x, y)
                self.scaler.scale(loss / self.accumulation).backward()
            loss_sum += loss.detach()
        if cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum / self.accumulation

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.cfg.fused_loss:
            return self.train_model(x, y)
        logits = self.train_model(x)  # (B, T, vocab): the full logits, as most implementations do
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def fit(self) -> TrainResult:
        """Update until max_iters (or a stop signal), evaluating and checkpointing on the way."""
        cfg, rt = self.cfg, self.rt
        self._print_header()
        self.monitor = RunMonitor(
            self.out_dir, self.console, start_step=self.step, max_steps=cfg.max_iters,
            tokens_per_step=self.tokens_per_update, flops_per_token=self.model.flops_per_token(),
            measure_peak=lambda: measure_matmul_peak(rt.device, self.dtype), enabled=rt.is_main,
            devices=rt.world_size, datasheet_peak=datasheet_peak(rt.device, self.dtype),
        )  # fmt: skip
        stop = StopSignal()
        try:
            while self.step < cfg.max_iters:
                loss = self.update()
                evaluate = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
                synced = evaluate or self.step % cfg.log_interval == 0
                if synced:
                    self._check_finite(value := rt.all_reduce_mean(loss).item(), "training loss")
                    self.monitor.log_train(self.step, value, learning_rate_at(cfg, self.step - 1))
                if evaluate:
                    self._evaluate_and_save()
                    self.monitor.resume_clock()
                if (synced or not rt.distributed) and rt.any(stop.requested):
                    if not evaluate:
                        self._check_finite(rt.all_reduce_mean(loss).item(), "training loss")
                        self._save()
                    self.console.print(
                        f"stopped at step {self.step}; checkpoint saved, continue with --resume"
                    )
                    return TrainResult(self.step, None, interrupted=True)
            final = self._final_pass()
            return TrainResult(self.step, final, interrupted=False)
        except WriteError as failure:
            raise self._stopped_by(failure) from None
        finally:
            stop.restore()
            self.monitor.close()

    def _final_pass(self) -> float | None:
        """Score every block of the validation split once (its first `final_eval_tokens`; 0 = skip)."""
        cap = self.cfg.final_eval_tokens
        if cap == 0:
            return None
        what = f"final validation pass in {name(self.dtype)}"
        what += "" if cap is None else f" (first {cap:,} tokens)"
        final = full_pass_loss(
            self.model, self.val_tokens, self.cfg.micro_batch_size, self.rt, self.dtype,
            max_tokens=cap, progress=self.monitor.pass_progress(what),
        )  # fmt: skip
        self.monitor.log_eval(self.step, final, final=True)
        return final

    def _print_header(self) -> None:
        cfg, m = self.cfg, self.run.model
        total = cfg.max_iters * self.tokens_per_update
        self.console.print(
            f"model: {m.n_layer} layers x {m.n_embd} dim x {m.n_head} heads, context {m.block_size}: "
            f"{self.model.num_params() / 1e6:.2f}M non-embedding parameters "
            f"({self.model.num_params(non_embedding=False) / 1e6:.2f}M in all)\n"
            f"data: {len(self.train_tokens):,} train / {len(self.val_tokens):,} val tokens\n"
            f"budget: {cfg.max_iters:,} updates x {self.tokens_per_update:,} tokens = "
            f"{total / 1e6:.2f}M tokens "
            f"(micro-batch {cfg.micro_batch_size} x {self.accumulation} accumulation x {self.rt.world_size} "
            f"process(es) x {m.block_size} tokens; {total / max(len(self.train_tokens), 1):.2f} epochs)\n"
            f"device: {self.rt.device}, {self.precision.describe()}; run dir: {self.out_dir}",
            highlight=False,
        )
        if cfg.warmup_iters > cfg.max_iters:
            self.console.print(
                f"warning: warmup_iters={cfg.warmup_iters} > max_iters={cfg.max_iters}: the learning rate "
                f"never reaches learning_rate={cfg.learning_rate:g} (lower warmup_iters)",
                highlight=False,
            )

    def _check_finite(self, value: float, what: str) -> None:
        if not math.isfinite(value):
            raise SmallGPTError(
                f"{what} became {value} at step {self.step}: stopped; {self._last_good()} "
                "(try a lower learning_rate)"
            )

    def _checkpoint_dir(self) -> Path:
        """Where the checkpoint of the current step goes."""
        return self.out_dir / "checkpoints" / f"step-{self.step:07d}"

    def _last_good(self) -> str:
        newest = step_checkpoints(self.out_dir)[-1:]
        return f"the last good checkpoint is {newest[0]}" if newest else "no checkpoint was written"

    def _stopped_by(self, failure: WriteError) -> WriteError:
        """A write that failed (full disk, read-only or deleted run dir) ends the run. The updates since
        the last checkpoint are saved first unless that checkpoint was what failed; the one line then
        says what could not be written and which checkpoint `--resume` continues from."""
        saved = self.step == 0 or self._checkpoint_dir().is_dir()
        if not saved and not failure.path.is_relative_to(self.out_dir / "checkpoints"):
            with contextlib.suppress(WriteError):
                self._save()
        resumable = step_checkpoints(self.out_dir)
        then = f"continue with `smallgpt train --resume {self.out_dir}`" if resumable else "start it again"
        return WriteError(
            failure.path,
            f"{failure}; stopped at step {self.step}, {self._last_good()} ({then} once {self.out_dir} "
            "can be written)",
        )

    def _evaluate_and_save(self) -> None:
        cfg = self.cfg
        val_loss = estimate_loss(
            self.model, self.val_tokens, cfg.micro_batch_size, cfg.eval_iters, cfg.seed, self.rt, self.dtype
        )
        self._check_finite(val_loss, "validation loss")
        # best/ first, then the checkpoint that counts it: a kill in between leaves a checkpoint whose
        # best_val_loss best/ matches or beats (see _resume), never one claiming a best/ not written.
        if val_loss < self.best_val_loss and self.rt.is_main:
            best = {"step": self.step, "val_loss": val_loss, "val_perplexity": perplexity(val_loss)}
            atomic_write_dir(self.out_dir / "best", lambda tmp: self._write_weights(tmp, best))
        self.best_val_loss = min(val_loss, self.best_val_loss)
        self._save()
        self.monitor.log_eval(self.step, val_loss)

    def _write_weights(self, directory: Path, state: dict) -> None:
        save_weights(self.model, directory / WEIGHTS_NAME)
        (directory / STATE_NAME).write_text(json_dump({**state, "config": self.run.to_dict()}))

    def _save(self) -> None:
        if not self.rt.is_main:
            return
        state = {
            "step": self.step,
            "tokens": self.step * self.tokens_per_update,
            "best_val_loss": None if math.isinf(self.best_val_loss) else self.best_val_loss,
            "sampler": self.batches.state_dict(),
            "config": self.run.to_dict(),
            "data": self.data,
            "dtype": name(self.dtype),
        }
        trainer_state = {"optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict()}
        directory = self._checkpoint_dir()
        try:
            save_checkpoint(directory, self.model, trainer_state, state)
        except WriteError as failure:
            # A full disk: make now the room the prune below makes after a save (the newest checkpoint
            # is never touched) and try once more.
            keep = max(self.cfg.keep_last - 1, 1)
            if failure.errno != errno.ENOSPC or not prune_checkpoints(self.out_dir, keep):
                raise
            save_checkpoint(directory, self.model, trainer_state, state)
        prune_checkpoints(self.out_dir, self.cfg.keep_last)


def json_dump(values: dict) -> str:
    return json.dumps(values, indent=2) + "\n"


def train(
    run: RunConfig,
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    start: RunStart = NEW_RUN,
    console: Console | None = None,
    allow_different_data: bool = False,
    fit_micro_batch: bool = False,
) -> TrainResult:
    """Train `run` on a prepared data dir into `out_dir`; under torchrun, this process's share of it.

    `fit_micro_batch`: the micro-batch was not chosen by the user, so pick one that fits the world size.
    """
    runtime = distributed.start(run.train.device)
    console = console if runtime.is_main and console is not None else Console(quiet=not runtime.is_main)
    trainer = None
    try:
        if fit_micro_batch:
            run = micro_batch_for_world(run, runtime.world_size, console)
        trainer = Trainer(
            run, Path(data_dir), Path(out_dir), runtime, console, start=start,
            allow_different_data=allow_different_data,
        )  # fmt: skip
        result = trainer.fit()
        speaks_gpt2 = run.model.vocab_size == GPT2_VOCAB_SIZE  # the sample is decoded with GPT-2's BPE
        if runtime.is_main and not result.interrupted and run.train.sample_tokens and speaks_gpt2:
            print_training_sample(trainer.model, run.train, console)
        if not result.interrupted:
            console.print(
                f"\nrun saved in {out_dir} (best weights in best/, loss curve in loss.png); next: "
                f"smallgpt sample {out_dir} --prompt 'Once upon a time'",
                highlight=False,
            )
        return result
    finally:
        if trainer is not None:
            trainer.train_model = trainer.model  # drop the DDP wrapper: it holds the process group
        distributed.stop(runtime)


def micro_batch_for_world(run: RunConfig, world_size: int, console: Console) -> RunConfig:
    """`run` with the largest micro-batch (at most its own) that shares batch_size evenly over the
    processes, said once; unchanged when its own already does or when none can."""
    cfg = run.train
    if cfg.batch_size % (cfg.micro_batch_size * world_size) == 0 or cfg.batch_size % world_size:
        return run
    per_process = cfg.batch_size // world_size
    micro = next(m for m in range(min(cfg.micro_batch_size, per_process), 0, -1) if per_process % m == 0)
    console.print(
        f"micro_batch_size {cfg.micro_batch_size} -> {micro}: {world_size} processes share each update's "
        f"{cfg.batch_size} sequences (set micro_batch_size to choose)",
        highlight=False,
    )
    return dataclasses.replace(run, train=dataclasses.replace(cfg, micro_batch_size=micro))

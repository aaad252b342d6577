"""Training throughput and MFU of one configuration, through the real training step (`Trainer.update`).

    .venv/bin/python benchmarks/train_throughput.py                      (seed config; ~2 min on 2 cores)
    .venv/bin/python benchmarks/train_throughput.py --micro-batch 32 --no-compile --plain-loss --json
    .venv/bin/python benchmarks/train_throughput.py --preset tiny-modern --batch 8 --updates 5 \
        --against ../base/src --rounds 2            (side by side with another checkout, A/B/A/B)
    .venv/bin/python benchmarks/train_throughput.py --against nanogpt:NANOGPT/model.py   (nanoGPT's own)
    ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI .venv/bin/python benchmarks/train_throughput.py ...
                    (as on a Xeon without native bf16: oneDNN's bf16 kernels capped to a Cascade Lake's
                    instruction set, bf16 matmuls then ~5x slower than fp32; `dtype=auto` measures anew)

Builds the `Trainer` that `smallgpt train` builds (model, AdamW, data stream from a prepared data dir,
default: the bundled corpus), runs a few warm-up updates (compilation happens there), then times
`--updates` updates and synchronises once at the end, as training does between log steps. On a CPU it
also reports the process's CPU time per update: on a machine shared with other jobs, wall time
overstates the cost several-fold, and tokens per CPU-second x threads estimates what quiet cores would
give (optimistic where a thread sleeps in serial sections, pessimistic where contended threads spin).

`--against` runs this benchmark and each peer in turn, in fresh processes, `--rounds` times (A/B/A/B),
and prints the median tokens/s of each and their ratios: a peer is another checkout's `src` directory
(its own train_throughput.py, default settings: e.g. today's main) or `nanogpt:PATH/model.py`
(benchmarks/nanogpt_peer.py, nanoGPT's own model at the same shape, fp32).

MFU = GPT.flops_per_token() (forward + backward, head and attention included) x tokens/s / the peak of
a large square matmul in the training dtype, timed in this same process on this same device. Every
variant keeps the seed's update (`--batch` sequences x 256 tokens = 8,192 tokens); `--micro-batch`
only changes how it is split into accumulation steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console

from smallgpt.distributed import Runtime, pick_device
from smallgpt.monitor import measure_matmul_peak, synchronize
from smallgpt.recipe import resolve_config
from smallgpt.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smallgpt-10m")
    parser.add_argument("--data", help="prepared data dir (default: the bundled corpus)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per update (x 256 tokens)")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--no-compile", action="store_true", help="eager (default: compile on CUDA only)")
    parser.add_argument("--plain-loss", action="store_true", help="full logits + F.cross_entropy")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=None, help="untimed updates (default 1 CPU, 15 GPU)")
    parser.add_argument("--updates", type=int, default=None, help="timed updates (default 2 CPU, 50 GPU)")
    parser.add_argument("--json", action="store_true", help="print one JSON line")
    parser.add_argument("--against", nargs="*", default=[], help="peers: SRC_DIR or nanogpt:MODEL_PY")
    parser.add_argument("--rounds", type=int, default=2, help="alternations with --against")
    parser.add_argument("--profile", action="store_true", help="the loss's shares of the timed updates")
    args = parser.parse_args()
    if args.against:
        side_by_side(args)
        return

    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    warmup = args.warmup if args.warmup is not None else (15 if on_gpu else 1)
    updates = args.updates if args.updates is not None else (50 if on_gpu else 2)
    overrides = {
        "batch_size": args.batch,
        "micro_batch_size": args.micro_batch,
        "compile": False if args.no_compile else None,  # None: the training default
        "fused_loss": not args.plain_loss,
        "dtype": args.dtype,
        "device": str(device),
        "max_iters": warmup + updates,
        "warmup_iters": 1,
    }
    run = resolve_config(args.preset, overrides=overrides)
    if args.data is None:
        from smallgpt.prepare import default_data_dir

        args.data = default_data_dir()
    with tempfile.TemporaryDirectory() as out:
        runtime = Runtime(0, 0, 1, device)
        trainer = Trainer(run, Path(args.data), Path(out), runtime, Console(quiet=True))
        peak = measure_matmul_peak(device, trainer.dtype)
        for _ in range(warmup):
            trainer.update()
        synchronize(device)
        profiler = torch.profiler.profile() if args.profile else contextlib.nullcontext()
        with profiler:
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(updates):
                loss = trainer.update()
            loss_value = loss.item()  # the one sync, after the last update
            seconds = (time.perf_counter() - started) / updates
            cpu_seconds = (time.process_time() - cpu_started) / updates
    tokens_per_s = trainer.tokens_per_update / seconds
    mfu = trainer.model.flops_per_token() * tokens_per_s / peak
    result = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu, {torch.get_num_threads()} threads",
        "dtype": str(trainer.dtype).removeprefix("torch."),
        "micro_batch": args.micro_batch,
        "accumulation": trainer.accumulation,
        "tokens_per_update": trainer.tokens_per_update,
        "compile": trainer.train_model is not trainer.model,
        "loss": "plain" if args.plain_loss else "fused",
        "ms_per_update": seconds * 1e3,
        "tokens_per_s": tokens_per_s,
        "matmul_peak_tflops": peak / 1e12,
        "mfu": mfu,
        "last_loss": loss_value,
    }
    if not on_gpu:  # on a shared machine, CPU time estimates what a quiet one would do
        result["cpu_s_per_update"] = cpu_seconds
        result["quiet_tokens_per_s"] = trainer.tokens_per_update / cpu_seconds * torch.get_num_threads()
    if args.profile:
        result["loss_shares"] = loss_shares(profiler)
    if args.json:
        print(json.dumps(result))
        return
    print(
        f"{args.preset} on {result['device']}, {result['dtype']}: micro-batch {args.micro_batch} x "
        f"{trainer.accumulation} accumulation = {trainer.tokens_per_update:,} tokens/update, "
        f"compile {'on' if result['compile'] else 'off'}, {result['loss']} loss"
    )
    print(f"  {seconds * 1e3:,.1f} ms/update   {tokens_per_s:,.0f} tokens/s")
    print(f"  MFU {mfu:.1%} of a measured {peak / 1e12:.3f} TFLOP/s matmul peak")
    if args.profile:
        shares = result["loss_shares"]
        print(
            f"  profile: the fused loss {shares['loss']:.0%} of operator time; its matmuls "
            f"{shares['loss_matmul']:.0%}, its elementwise work {shares['loss_elementwise']:.0%}"
        )
    if not on_gpu:
        print(
            f"  CPU time {cpu_seconds:,.1f} s/update over {torch.get_num_threads()} threads: ~"
            f"{result['quiet_tokens_per_s']:,.0f} tokens/s on as many quiet cores"
        )


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def loss_shares(profiler: torch.profiler.profile) -> dict[str, float]:
    """Shares of all operators' self time spent inside the fused loss (forward and backward, found by
    its autograd.Function's name), in its matmuls and in its elementwise work (everything else)."""
    total, inside = 0.0, {"matmul": 0.0, "elementwise": 0.0}
    for event in profiler.events():
        if not event.name.startswith("aten::"):
            continue
        total += event.self_cpu_time_total
        parent = event.cpu_parent
        while parent is not None and "LinearCrossEntropy" not in parent.name:
            parent = parent.cpu_parent
        if parent is not None:
            inside["matmul" if event.name in MATMULS else "elementwise"] += event.self_cpu_time_total
    return {"loss": sum(inside.values()) / total, **{f"loss_{k}": v / total for k, v in inside.items()}}


def side_by_side(args: argparse.Namespace) -> None:
    """This benchmark and each peer, alternated in fresh processes; medians and ratios."""
    here = Path(__file__).resolve()
    shared = ["--preset", args.preset, "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
              "--json", *(["--data", args.data] if args.data else []),
              *(["--warmup", str(args.warmup)] if args.warmup is not None else []),
              *(["--updates", str(args.updates)] if args.updates is not None else [])]  # fmt: skip
    own = [*shared, "--dtype", args.dtype, *(["--no-compile"] if args.no_compile else []),
           *(["--plain-loss"] if args.plain_loss else [])]  # fmt: skip
    runs = {"this checkout": (here, own, here.parents[1] / "src")}
    for peer in args.against:
        if peer.startswith("nanogpt:"):
            script = here.with_name("nanogpt_peer.py")
            runs["nanoGPT"] = (
                script,
                [*shared, "--model-py", peer.removeprefix("nanogpt:")],
                runs["this checkout"][2],
            )
        else:
            src = Path(peer).resolve()
            runs[str(src)] = (src.parent / "benchmarks" / here.name, [*shared, "--dtype", "auto"], src)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        for name, (script, options, src) in runs.items():
            env = {**os.environ, "PYTHONPATH": str(src)}
            done = subprocess.run([sys.executable, str(script), *options], env=env, capture_output=True,
                                  text=True, check=True)  # fmt: skip
            result = json.loads(done.stdout.strip().splitlines()[-1])
            rates[name].append(result["tokens_per_s"])
            print(f"round {round_ + 1}  {name}: {result['tokens_per_s']:,.0f} tokens/s "
                  f"({result.get('dtype', '?')})", flush=True)  # fmt: skip
    mine = statistics.median(rates["this checkout"])
    for name, values in rates.items():
        ratio = (
            "" if name == "this checkout" else f"   this checkout: {mine / statistics.median(values):.2f}x"
        )
        print(f"{name}: median {statistics.median(values):,.0f} tokens/s over {len(values)}{ratio}")


if __name__ == "__main__":
    main()

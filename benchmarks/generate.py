"""Generation speed: tokens/s of `Generator` with the `smallgpt-10m` shape (random weights), and peers.

    .venv/bin/python benchmarks/generate.py              (about 2 minutes on 2 quiet cores)
    .venv/bin/python benchmarks/generate.py --threads 1  (fewer threads help on a busy machine)
    .venv/bin/python benchmarks/generate.py --device cuda

Prints, each the best of --repeats runs, sampling at temperature 1 from <|endoftext|>:
  - batch 1, 256 new tokens: the figure of issue 5 (target >= 150 tokens/s on the 2-core CPU);
  - batch 8, 256 new tokens per row (tokens/s counts all rows);
  - past the context: a 256-token prompt and 32 new tokens, so every token recomputes the whole window
    (positions are learned absolute embeddings; this is the price of sliding exactly);
  - (CPU) batch 1 with int8 weights (`quantize_int8`): a quarter of the bytes to stream per token;
  - peers on the same shape and machine, in the same process: a no-cache sampler that reruns the last
    block_size tokens per new token (nanoGPT's `generate`, head on the last position only), and
    Hugging Face `GPT2LMHeadModel.generate` with its KV cache (if transformers is installed; 255 new
    tokens, as its 256 positions must also hold the prompt). The ratios are steadier than raw rates
    when other jobs share the machine.
CPU ms/token is the process's CPU time per token: with --threads 1 it is what a quiet core would take.
"""

from __future__ import annotations

import argparse
import time

import torch

from smallgpt.config import get_preset
from smallgpt.generate import Generator, SamplingParams, quantize_int8, sample_next_token
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID


def timed(run, repeats: int) -> tuple[float, float]:
    """(best tokens/s, CPU ms per token of that run) of `run()`, which returns a token count."""
    best = (0.0, 0.0)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        tokens = run()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if tokens / wall > best[0]:
            best = (tokens / wall, 1000 * cpu / tokens)
    return best


def ours(generator: Generator, batch: int, new_tokens: int, prompt: str = "") -> int:
    params = SamplingParams(new_tokens, temperature=1.0, seed=0)
    return sum(len(c.token_ids) for c in generator.generate([prompt] * batch, params))


@torch.inference_mode()
def no_cache(model: GPT, new_tokens: int, device: torch.device) -> int:
    """nanoGPT's sampler: the whole (cropped) context through the model for every new token."""
    ids = torch.tensor([[EOT_ID]], device=device)
    rng = torch.Generator(device=device).manual_seed(0)
    for _ in range(new_tokens):
        hidden = model.hidden_states(ids[:, -model.config.block_size :])[:, -1]
        logits = model.lm_head(hidden)[:, : model.config.vocab_size]
        ids = torch.cat([ids, sample_next_token(logits, SamplingParams(), rng)[:, None]], dim=1)
    return new_tokens


def hf_model(model: GPT, device: torch.device):
    """Hugging Face GPT-2 with the same shape (random weights too), or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    cfg = model.config
    hf_config = transformers.GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_layer=cfg.n_layer, n_head=cfg.n_head,
        n_embd=cfg.n_embd, bos_token_id=EOT_ID, eos_token_id=EOT_ID,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(hf_config).to(device).eval()


@torch.inference_mode()
def hf_generate(hf, new_tokens: int, device: torch.device) -> int:
    start = torch.tensor([[EOT_ID]], device=device)
    out = hf.generate(
        start, do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens, top_k=0,
        pad_token_id=EOT_ID, attention_mask=torch.ones_like(start),
    )  # fmt: skip
    return out.shape[1] - 1


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-peers", action="store_true", help="skip the no-cache and HF baselines")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPT(get_preset("smallgpt-10m")).to(device).eval()
    generator = Generator(model)
    ours(generator, 1, 8)  # warm-up: allocator, kernels, (CUDA) graph capture path
    n = args.new_tokens
    threads = torch.get_num_threads()
    print(f"smallgpt-10m shape, random weights, {device}, {threads} CPU threads, torch {torch.__version__}")
    cases = [  # (name, run returning a token count, repeats)
        (f"smallgpt Generator, batch 1, {n} new tokens", lambda: ours(generator, 1, n), args.repeats),
        (f"smallgpt Generator, batch 8, {n} new tokens each", lambda: ours(generator, 8, n), args.repeats),
        (
            "smallgpt Generator, batch 1, past the context (256-token prompt + 32)",
            lambda: ours(generator, 1, 32, prompt=" the" * 256),
            args.repeats,
        ),
    ]
    if device.type == "cpu":
        int8 = Generator(quantize_int8(model))
        cases.append(
            (f"smallgpt Generator, int8 weights, batch 1, {n}", lambda: ours(int8, 1, n), args.repeats)
        )
    peers = []
    if not args.no_peers:
        peers.append(
            (f"no-cache sampler (nanoGPT style), batch 1, {n}", lambda: no_cache(model, n, device), 1)
        )
        hf = hf_model(model, device)
        if hf is not None:
            hf_generate(hf, 8, device)  # warm-up
            peers.append(
                (f"HF transformers generate, batch 1, {n - 1}", lambda: hf_generate(hf, n - 1, device), 1)
            )
    rows = [(name, *timed(run, repeats)) for name, run, repeats in cases + peers]
    for name, rate, cpu_ms in rows:
        print(f"{name:<72} {rate:8.1f} tokens/s   {cpu_ms:6.2f} CPU ms/token")
    for name, rate, _ in rows[len(cases) :]:
        print(f"batch-1 speed-up over the {name.split(',')[0]}: {rows[0][1] / rate:.1f}x")


if __name__ == "__main__":
    main()

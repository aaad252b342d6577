"""nanoGPT's own model trained like `train_throughput.py` trains ours: the peer for side-by-side figures.

    .venv/bin/python benchmarks/nanogpt_peer.py --model-py NANOGPT/model.py --json

NANOGPT is a checkout of github.com/karpathy/nanoGPT (nothing of it is copied here). Its `GPT` is built
at the shape of a SmallGPT preset (default the seed's, smallgpt-10m: 6 x 384, context 256, biases,
dropout 0.1, vocabulary 50,304) and trained as nanoGPT's train.py does on a CPU: fp32, its
`configure_optimizers` AdamW, `loss / accumulation` backward per micro-batch, gradient clipping at 1.0,
on windows of the bundled corpus drawn by SmallGPT's sampler. Prints tokens/s like train_throughput.py.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import time

import torch

from smallgpt.loader import RandomBatches, load_split
from smallgpt.recipe import resolve_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-py", required=True, help="nanoGPT's model.py")
    parser.add_argument("--preset", default="smallgpt-10m")
    parser.add_argument("--data", help="prepared data dir (default: the bundled corpus)")
    parser.add_argument("--batch", type=int, default=32, help="sequences per update")
    parser.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--updates", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("nanogpt_model", args.model_py)
    nanogpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(nanogpt)
    shape = resolve_config(args.preset).model
    config = nanogpt.GPTConfig(
        block_size=shape.block_size, vocab_size=shape.padded_vocab_size, n_layer=shape.n_layer,
        n_head=shape.n_head, n_embd=shape.n_embd, dropout=shape.dropout, bias=shape.bias,
    )  # fmt: skip
    torch.manual_seed(1337)
    with contextlib.redirect_stdout(io.StringIO()):  # its parameter counts
        model = nanogpt.GPT(config)
        optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    if args.data is None:
        from smallgpt.prepare import default_data_dir

        args.data = default_data_dir()
    tokens = load_split(args.data, "train", shape.vocab_size)
    batches = RandomBatches(tokens, shape.block_size, args.micro_batch, seed=1337)
    accumulation = args.batch // args.micro_batch

    def update() -> torch.Tensor:
        for _ in range(accumulation):
            x, y = batches.next_batch()
            _, loss = model(x, y)
            (loss / accumulation).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        update()
    started = time.perf_counter()
    for _ in range(args.updates):
        loss = update()
    seconds = (time.perf_counter() - started) / args.updates
    tokens_per_update = args.batch * shape.block_size
    result = {"peer": "nanoGPT", "preset": args.preset, "dtype": "float32", "ms_per_update": seconds * 1e3,
              "tokens_per_s": tokens_per_update / seconds, "last_loss": loss.item()}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"nanoGPT at {args.preset}'s shape, fp32: {result['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    main()

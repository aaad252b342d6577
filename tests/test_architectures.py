"""Every user-facing feature on every architecture: one matrix over `smallgpt.architectures.ARCHITECTURES`.

Each test below runs once per architecture, and a new architecture joins the matrix by existing in that
table (with a preset of its layout: the model's biases and the training recipe are that preset's, so
GPT-2 trains with AdamW and Qwen3 with Muon, as users train them). Each architecture trains one tiny
model once (the `trained` fixture: 2 layers, 32 wide, a 32-token context, 60 updates on conftest's
97-token stream, GPT-2's vocabulary so that it can generate text); every feature is checked on that run,
against an independent reference where one exists:

  train, --resume, --init-from     loss falls; resume repeats the uninterrupted run bit for bit; a
                                   fine-tune starts at the checkpoint's loss, not at ln(vocab)
  eval                             = logits + F.cross_entropy over every block (prepared split, raw .jsonl)
  plot                             the loss curve, redrawn from metrics.jsonl
  sample                           greedy past the context = a cache-free reference (a long prompt too,
                                   alone and beside another); int8 logits close to fp32; top-p, stop
                                   strings, prompts x --num-samples, --interactive
  export / import                  transformers loads the export with our logits; import gives them back;
                                   the GGUF file reads back with our weights
  serve                            one live server: completion, streaming, logprobs + echo, token ids
  torchrun                         2 processes train what one process trains
  bf16 autocast (CPU)              training tracks fp32
"""

import dataclasses
import io
import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from conftest import ONE_THREAD_ENV, REPO, write_data
from rich.console import Console
from safetensors.torch import load_file
from test_engine import SlidingWindow
from test_evaluate import reference_loss
from test_serve import running_server
from training_helpers import final_weights, metrics

from smallgpt.architectures import ARCHITECTURES
from smallgpt.checkpoint import load_model
from smallgpt.config import PRESETS
from smallgpt.engine import FEED_UP_TO, Engine, Request
from smallgpt.evaluate import evaluate_checkpoint
from smallgpt.generate import SamplingParams, quantize_int8
from smallgpt.limits import Limits
from smallgpt.loader import load_split
from smallgpt.recipe import resolve_config
from smallgpt.runs import train_command
from smallgpt.tokenizer import EOT_ID, decode, encode

transformers = pytest.importorskip("transformers")

# Tiny shapes; the vocabulary stays GPT-2's (generation, export and serving need it). 60 updates teach
# both layouts that each token follows the previous one by 1-3 (greedy text then depends on the context
# and on positions). The torchrun and bf16 runs retrace only the first updates, which lr_decay_iters
# keeps on the full run's learning rates.
SHAPE = {"block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0}
UPDATES, PREFIX = 60, 20
RECIPE = {
    "max_iters": UPDATES,
    "lr_decay_iters": UPDATES,
    "batch_size": 4,
    "micro_batch_size": 2,
    "learning_rate": 1e-2,
    "eval_interval": PREFIX,
    "eval_iters": 2,
    "log_interval": 1,
    "sample_tokens": 8,
    "device": "cpu",
    "dtype": "float32",
}
SEPARATOR = "-" * 40 + "\n"  # between the samples `smallgpt sample` prints
# Prompts in the data's alphabet (each character one of the 97 tokens the models trained on), so that
# they continue with tokens they learned: an untied head keeps the rows of never-seen tokens exactly
# tied, and a tie makes "the most likely token" ambiguous.
PROMPTS = ["!#%(", '"$&)', "+-/2"]


def preset_of(arch: str) -> str:
    """The first preset of the architecture's layout (its export format), whose biases and recipe it
    trains with; `train_args(arch)` then names the row itself (a variant such as `qwen3-embnorm`)."""
    layout = ARCHITECTURES[arch].hf_model_type
    return next(name for name, config in PRESETS.items() if config.architecture.hf_model_type == layout)


def train_args(arch: str, **changes) -> list[str]:
    return [f"{key}={value}" for key, value in {**SHAPE, **RECIPE, "arch": arch, **changes}.items()]


@contextmanager
def one_thread():
    """One torch thread, like every test and subprocess (see conftest): the same arithmetic everywhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclasses.dataclass
class Trained:
    arch: str
    data: Path
    run: Path
    printed: str  # what `smallgpt train` printed

    def model(self):
        return load_model(self.run)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def trained(request, tmp_path_factory) -> Trained:
    """One tiny training run per architecture, as `smallgpt train` runs it (in this process)."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    data, run = write_data(root / "data"), root / "run"
    console = Console(file=io.StringIO(), width=200)
    with one_thread():
        result = train_command(
            train_args(arch), preset=preset_of(arch), data=str(data), out=str(run), console=console
        )
    assert result.step == RECIPE["max_iters"] and not result.interrupted
    return Trained(arch, data, run, console.file.getvalue())


def train_losses(run: Path) -> list[float]:
    return [record["loss"] for record in metrics(run, "train")]


# --- training -----------------------------------------------------------------------------------------


def test_train_learns_and_writes_a_complete_run(trained):
    losses = train_losses(trained.run)
    assert len(losses) == UPDATES
    assert losses[0] == pytest.approx(np.log(50257), abs=0.1)  # starts at a uniform guess...
    assert losses[-1] < np.log(97)  # ...and learns more than which 97 tokens the data uses
    assert [p.name for p in sorted((trained.run / "checkpoints").glob("step-*"))] == [
        "step-0000020",
        "step-0000040",
        "step-0000060",
    ]
    assert (trained.run / "best" / "model.safetensors").is_file()
    assert json.loads((trained.run / "config.json").read_text())["model"]["arch"] == trained.arch
    assert trained.model().config.arch == trained.arch
    assert "sample (temperature 0.8, top-k 200)" in trained.printed  # training ends with a sample
    assert metrics(trained.run, "final")[0]["val_loss"] < np.log(97)


def test_resume_continues_the_step_count_and_the_loss(trained, tmp_path, cli):
    """Killed after step 40's checkpoint (the step-60 one removed), the run resumes and computes the
    uninterrupted run's steps 41-60 bit for bit."""
    run = tmp_path / "run"
    shutil.copytree(trained.run, run)
    shutil.rmtree(run / "checkpoints" / "step-0000060")
    code, out, err = cli("train", "--resume", str(run))
    assert code == 0, err
    assert "at step 40" in out
    assert [r["step"] for r in metrics(run, "train")] == list(range(1, UPDATES + 1))
    assert train_losses(run) == train_losses(trained.run)
    expected, got = final_weights(trained.run), final_weights(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_init_from_starts_from_the_checkpoint_weights(trained, tmp_path, cli):
    out = tmp_path / "finetune"
    args = train_args(trained.arch, max_iters=2, eval_interval=2, sample_tokens=0)
    code, _, err = cli(
        "train", "--init-from", str(trained.run), "--data", str(trained.data), "--out", str(out), *args
    )
    assert code == 0, err
    assert load_model(out / "checkpoints" / "step-0000002").config == trained.model().config
    # Its first update's loss is the checkpoint's, far below a fresh model's ln(50257).
    trained_to = metrics(trained.run, "final")[0]["val_loss"]
    assert train_losses(out)[0] == pytest.approx(trained_to, abs=0.5)


def test_bf16_autocast_training_tracks_fp32(trained, tmp_path):
    """The warm-up's updates again under bf16 autocast on the CPU: each update's loss is fp32's to
    bf16's precision (8 mantissa bits). Only the warm-up: later, GPT-2's recipe takes an update that
    sends the loss far up and back (fp32 too), which magnifies any difference."""
    out, console = tmp_path / "bf16", Console(file=io.StringIO(), width=200)
    updates = resolve_config(preset_of(trained.arch)).train.warmup_iters
    with one_thread():
        train_command(
            train_args(trained.arch, max_iters=updates, eval_interval=updates, dtype="bfloat16",
                       sample_tokens=0),
            preset=preset_of(trained.arch), data=str(trained.data), out=str(out), console=console,
        )  # fmt: skip
    assert "device: cpu, bfloat16" in console.file.getvalue()
    # bf16's unit roundoff: the trajectories part by rounding, not by any one update's error
    assert train_losses(out) == pytest.approx(train_losses(trained.run)[:updates], rel=2**-9)


def test_torchrun_with_two_processes_trains_what_one_process_does(trained, tmp_path):
    """2 gloo processes, one micro-batch each, against the fixture's one process accumulating two:
    the same samples per update and the gradients averaged, so the same losses and weights; the final
    validation pass, split over the ranks, scores the whole split. Then the DDP run's step-10
    checkpoint, resumed by one process, arrives where the single-process run did."""
    ddp = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "smallgpt", "train", "--preset", preset_of(trained.arch), "--data", str(trained.data)]
    command += ["--out", str(ddp)]
    command += train_args(trained.arch, max_iters=PREFIX, eval_interval=PREFIX // 2, sample_tokens=0)
    result = subprocess.run(
        command, capture_output=True, text=True, cwd=REPO, env=ONE_THREAD_ENV, timeout=240
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("budget:") == 1  # rank 0 speaks
    # Muon orthogonalises each update, amplifying rounding differences of the all-reduce (see test_train).
    losses, single_losses = torch.tensor(train_losses(ddp)), torch.tensor(train_losses(trained.run))
    torch.testing.assert_close(losses, single_losses[:PREFIX], atol=1e-4, rtol=1e-4)
    single = checkpoint_weights(trained.run, PREFIX)
    assert_weights_close(checkpoint_weights(ddp, PREFIX), single)
    # The ranks' shares of the final pass add up to one process's pass over the whole split, on the same
    # weights and in the run's dtype (`auto` may pick bf16 for these shapes: 0.006 apart here).
    checkpoint = ddp / "checkpoints" / f"step-{PREFIX:07d}"
    whole_split = evaluate_checkpoint(checkpoint, trained.data, dtype="float32")
    assert metrics(ddp, "final")[0]["val_loss"] == pytest.approx(whole_split["loss"], abs=1e-5)

    shutil.rmtree(ddp / "checkpoints" / f"step-{PREFIX:07d}")  # resume across world sizes
    with one_thread():
        train_command([], resume=True, out=str(ddp), console=Console(quiet=True))
    assert_weights_close(checkpoint_weights(ddp, PREFIX), single)


def checkpoint_weights(run: Path, step: int) -> dict:
    return load_file(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors")


def assert_weights_close(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=2e-4, rtol=1e-4, msg=name)


# --- evaluation and plots -----------------------------------------------------------------------------


def test_eval_on_a_prepared_split_and_on_raw_text_matches_the_reference(trained, tmp_path, cli):
    model = trained.model()
    # float32, the reference's: on a CPU with fast bf16, dtype=auto may pick bf16 for these shapes
    fp32 = ("--dtype", "float32", "--json")
    code, out, err = cli("eval", str(trained.run), "--data", str(trained.data), *fp32)
    assert code == 0, err
    result = json.loads(out)
    val = np.asarray(load_split(trained.data, "val"))
    assert result["tokens"] == (len(val) - 1) // 32 * 32
    assert result["loss"] == pytest.approx(reference_loss(model, val), abs=1e-5)

    documents = ["The quick brown fox jumps over the lazy dog. " * 4, "   ", "Call me Ishmael. " * 6]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    code, out, err = cli("eval", str(trained.run), "--data", str(corpus), *fp32)
    assert code == 0, err
    tokens = np.array([t for d in documents if d.strip() for t in encode(d) + [EOT_ID]])  # blank: skipped
    assert json.loads(out)["loss"] == pytest.approx(reference_loss(model, tokens), abs=1e-5)


def test_plot_redraws_the_loss_curve(trained, tmp_path, cli):
    shutil.copy(trained.run / "metrics.jsonl", tmp_path / "metrics.jsonl")
    code, out, err = cli("plot", str(tmp_path))
    assert code == 0, err
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "loss.png" in out


# --- sampling ------------------------------------------------------------------------------------------


def cache_free_logits(model, history: list[int], prompt_length: int) -> torch.Tensor:
    """The next-token logits after each prefix of `history` longer than the prompt, computed without a
    KV cache as the engine's cache must behave past the context: learned positions see the last
    block_size tokens, recomputed; relative (rotary) positions attend over a sliding window of
    block_size keys, each computed when its token was new (see `smallgpt.engine` and test_engine)."""
    block = model.config.block_size
    with torch.no_grad():
        if not model.config.architecture.relative_positions:
            windows = [history[:t][-block:] for t in range(prompt_length, len(history))]
            return torch.stack([model(torch.tensor([window]))[0, -1] for window in windows])
        sequence = torch.tensor([history[:-1]])
        window = SlidingWindow(model.config.n_layer, block)
        logits = model.forward_cached(sequence, torch.arange(sequence.shape[1])[None], window, logits="all")
        return logits[0, prompt_length - 1 :]


def check_greedy_sample(cli, run: Path, model, *options: str) -> None:
    """`smallgpt sample RUN --temperature 0 OPTIONS`, 40 tokens past the 32-token context, prints what
    the engine generates with `model`, and each token is the cache-free reference's most likely one."""
    prompt = PROMPTS[0]
    command = ["sample", str(run), f"--prompt={prompt}", "--temperature=0", "--max-new-tokens=40"]
    code, out, err = cli(*command, *options)
    assert code == 0, err
    assert "[40 tokens" in err and "finish: length" in err
    [completion] = Engine(model).generate([prompt], SamplingParams(40, temperature=0))
    assert out == prompt + completion.text + "\n"
    assert_most_likely(model, encode(prompt), completion.token_ids)


def assert_most_likely(model, prompt: list[int], generated: list[int]) -> None:
    """Each generated token is the cache-free reference's most likely one after what came before."""
    reference = cache_free_logits(model, prompt + generated, len(prompt))
    chosen = reference.gather(1, torch.tensor(generated)[:, None])[:, 0]
    # The most likely, to rounding (two paths of float arithmetic; a near-tie may go either way).
    assert (chosen >= reference.max(dim=1).values - 1e-4).all()


def test_greedy_sampling_past_the_context_equals_the_cache_free_reference(trained, cli):
    check_greedy_sample(cli, trained.run, trained.model())


def test_a_long_prompt_alone_and_beside_another_continues_as_the_reference(trained):
    """A prompt over FEED_UP_TO tokens is prefilled whole when alone, and beside another sequence
    without its last token and the head (that token fed by a decode step, `Engine._join`); either
    way greedy tokens past the context are the cache-free reference's."""
    model, ids = trained.model(), np.asarray(load_split(trained.data, "val"))[:24].tolist()
    assert FEED_UP_TO < len(ids) < model.config.block_size
    for prompts in ([ids], [ids, encode(PROMPTS[1])]):
        completion = Engine(model).generate(prompts, SamplingParams(20, temperature=0))[0]
        assert len(completion.token_ids) == 20
        assert_most_likely(model, ids, completion.token_ids)


def test_int8_logits_stay_close_to_fp32_and_sample_past_the_context(trained, cli):
    model = trained.model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    quantized = quantize_int8(model)
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    if model.config.architecture.tied_head:  # the original keeps its tie (the copy's head is int8)
        assert model.lm_head.weight is model.transformer.wte.weight
    val = np.asarray(load_split(trained.data, "val"))[: 4 * 32].astype(np.int64)
    with torch.no_grad():
        idx = torch.from_numpy(val).view(4, 32)
        exact, approx = model(idx).log_softmax(-1), quantized(idx).log_softmax(-1)
    kl = (exact.exp() * (exact - approx)).sum(-1)
    assert kl.max() < 0.01
    assert (exact.argmax(-1) == approx.argmax(-1)).float().mean() >= 0.9
    check_greedy_sample(cli, trained.run, quantized, "--int8")


def test_top_p_stop_strings_and_several_prompts_times_num_samples(trained, cli):
    prompts, model = PROMPTS[:2], trained.model()
    shown = [p for p in prompts for _ in range(2)]  # --num-samples 2: each prompt twice, sample i seed 9 + i
    free = Engine(model, max_batch=4).generate(shown, SamplingParams(16, temperature=1, top_p=0.9, seed=9))
    stop = free[0].text[6:8]  # two characters the first sample will write
    assert stop.strip()
    params = SamplingParams(16, temperature=1, top_p=0.9, seed=9, stop=(stop,))
    want = Engine(model, max_batch=4).generate(shown, params)
    options = ["--seed=9", "--num-samples=2", "--max-new-tokens=16", "--temperature=1", "--top-p=0.9"]
    code, out, err = cli(
        "sample", str(trained.run), *options, f"--stop={stop}", *(f"--prompt={p}" for p in prompts)
    )
    assert code == 0, err
    assert out.split(SEPARATOR) == [f"{p}{c.text}\n" for p, c in zip(shown, want, strict=True)]
    assert [line.split("finish: ")[1] for line in err.splitlines()] == [f"{c.finish_reason}]" for c in want]
    assert want[0].text == free[0].text[: free[0].text.index(stop)] and want[0].finish_reason == "stop"
    assert all(stop not in c.text for c in want)
    # A vanishing nucleus holds only the most likely token: sampling it is greedy decoding.
    greedy = Engine(model).generate([PROMPTS[2]], SamplingParams(16, temperature=0))[0]
    options = ["--top-p=1e-9", "--temperature=1", "--max-new-tokens=16"]
    code, out, _ = cli("sample", str(trained.run), f"--prompt={PROMPTS[2]}", *options)
    assert out == PROMPTS[2] + greedy.text + "\n"


def test_interactive_sampling_answers_each_line(trained, cli, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{PROMPTS[0]}\n{PROMPTS[1]}\n"))
    code, out, err = cli("sample", str(trained.run), "--interactive", "--temperature=0", "--max-new-tokens=5")
    assert code == 0, err
    engine = Engine(trained.model())
    for prompt in PROMPTS[:2]:
        text = engine.generate([prompt], SamplingParams(5, temperature=0))[0].text
        assert f"prompt> {prompt}{text}\n" in out
    assert err.count("[5 tokens,") == 2


# --- export and import ---------------------------------------------------------------------------------


def test_hugging_face_export_loads_in_transformers_and_imports_back_identically(trained, tmp_path, cli):
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    assert cli("export", str(trained.run), "--out", str(hf_dir))[0] == 0
    model = trained.model()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    assert hf.config.model_type == model.config.architecture.hf_model_type
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(idx)
        assert (hf(idx).logits - logits).abs().max() <= 1e-4  # an independent implementation agrees
        assert cli("import", str(hf_dir), "--out", str(back))[0] == 0
        assert torch.equal(load_model(back)(idx), logits)  # and the round trip is exact


def test_gguf_export_reads_back_with_our_weights(trained, tmp_path, cli):
    """The file for llama.cpp, read by the `gguf` package's own reader. (transformers' GGUF loader
    assumes shapes this tiny model lacks, and llama.cpp is opt-in: both are in test_gguf.)"""
    gguf = pytest.importorskip("gguf")
    command = [
        "export",
        str(trained.run),
        "--format",
        "gguf",
        "--type",
        "f32",
        "--out",
        str(tmp_path / "m.gguf"),
    ]
    code, _, err = cli(*command)
    assert code == 0, err
    model = trained.model()
    config, name = model.config, model.config.architecture.gguf_arch
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {key: field.contents() for key, field in reader.fields.items()}
    assert fields["general.architecture"] == name and fields[f"{name}.context_length"] == config.block_size
    assert fields[f"{name}.block_count"] == config.n_layer and len(fields["tokenizer.ggml.tokens"]) == 50257
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    assert len(tensors) == len(model.state_dict()) - config.architecture.tied_head
    # The table as exported: a row with an embedding norm (`qwen3-embnorm`) writes it folded in.
    embedding = model.standard_state_dict()["transformer.wte.weight"][:50257].detach().numpy()
    assert np.array_equal(np.asarray(tensors["token_embd.weight"].data).reshape(embedding.shape), embedding)


# --- serving -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(trained):
    """One live `smallgpt serve` per architecture, its openai client, and the engine it must agree with."""
    with running_server(trained.run, "--device", "cpu") as base:
        reference = Engine(trained.model(), max_batch=Limits().max_batch)  # the server's arithmetic
        yield openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=60), reference


def test_served_completion_and_token_id_prompts(served):
    client, reference = served
    want = reference.generate([PROMPTS[1]], SamplingParams(12, temperature=0))[0]
    for prompt in (PROMPTS[1], encode(PROMPTS[1])):
        result = client.completions.create(model="run", prompt=prompt, max_tokens=12, temperature=0)
        assert result.choices[0].text == want.text and result.usage.completion_tokens == 12
        assert result.usage.prompt_tokens == len(encode(PROMPTS[1]))


def test_streamed_chunks_add_up_to_the_plain_completion(served):
    client, _ = served
    options = dict(model="run", prompt=PROMPTS[2], max_tokens=16, seed=5, temperature=1.0)
    plain = client.completions.create(**options).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **options) if c.choices]
    assert len(chunks) > 2 and "".join(chunks) == plain


def test_served_logprobs_with_echo_score_every_token(served, trained):
    """A token-id prompt (the data's own tokens), echoed and scored, then 3 greedy tokens: every
    position gets the model's own log-probability (the first has nothing to be predicted from) and
    its 2 most likely alternatives."""
    client, reference = served
    ids = [int(i) for i in load_split(trained.data, "val")[:12]]
    result = client.completions.create(
        model="run", prompt=ids, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    sequence = reference.submit(Request(ids, SamplingParams(3, temperature=0)))
    while not sequence.done:
        reference.step()
    history = ids + sequence.token_ids
    logprobs = result.choices[0].logprobs
    assert logprobs.tokens == [decode([i]) for i in history]
    assert len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == len(ids) + 3
    assert logprobs.token_logprobs[0] is None and all(len(top) == 2 for top in logprobs.top_logprobs[1:])
    with torch.no_grad():
        want = reference.model(torch.tensor([history[:-1]]))[0].log_softmax(-1)
    scores = [want[t - 1, history[t]].item() for t in range(1, len(history))]
    assert logprobs.token_logprobs[1:] == pytest.approx(scores, abs=1e-4)

"""GGUF export, read back by independent readers: transformers' GGUF loader and the `gguf` package's own.

transformers' reader takes two facts from its own defaults rather than the file: GPT-2's context (it
reads `context_length` into `n_ctx`, leaving the positions table at 1024 rows) and Qwen3's head width
(128; it ignores `attention.key_length`). The models it loads here have those shapes; llama.cpp reads
both from the file (benchmarks/gguf_llama_cpp.py and the llama_cpp test below check it).
"""

import numpy as np
import pytest
import torch

from smallgpt.checkpoint import save_weights
from smallgpt.config import ModelConfig
from smallgpt.engine import Engine
from smallgpt.generate import SamplingParams
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, encode

gguf = pytest.importorskip("gguf")

PROMPT = "The meaning of life is"
# One shape per architecture; see the module docstring for the context and head width.
SHAPES = {
    "gpt2": dict(block_size=1024, n_layer=2, n_head=4, n_embd=64),
    "qwen3": dict(block_size=64, n_layer=2, n_head=2, n_embd=256, bias=False),
    # The embedding norm of `arch=qwen3-embnorm` is folded into the file's table (plain qwen3).
    "qwen3-embnorm": dict(block_size=64, n_layer=2, n_head=2, n_embd=256, bias=False),
}


def random_run(directory, arch: str) -> GPT:
    """A SmallGPT of `arch` with large random weights (varied greedy text), saved in `directory`."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=50257, dropout=0.0, arch=arch, **SHAPES[arch])).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:  # norm gains near 1 and biases near 0, each channel its own
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0, 0.3)
    save_weights(model, directory / "model.safetensors")
    return model


def greedy(model: GPT, tokens: int = 30) -> list[int]:
    return Engine(model).generate([PROMPT], SamplingParams(tokens, temperature=0))[0].token_ids


@pytest.mark.slow
@pytest.mark.parametrize("arch", SHAPES)
def test_transformers_loads_the_f32_file_and_continues_as_we_do(tmp_path, cli, arch):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    model = random_run(tmp_path, arch)
    code, out, err = cli(
        "export", str(tmp_path), "--format", "gguf", "--type", "f32", "--out", str(tmp_path / "m.gguf")
    )
    assert code == 0, err
    assert "llama-completion -m" in out

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    assert hf.config.model_type == model.config.architecture.hf_model_type
    prompt = torch.tensor([encode(PROMPT)])
    hf_ids = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30, do_sample=False)
    ours = greedy(model)
    assert len(set(ours)) > 10  # varied text, not one token repeated
    assert hf_ids[0, prompt.shape[1] :].tolist() == ours


@pytest.mark.parametrize("arch, type_name", [("gpt2", "f16"), ("qwen3", "q8_0")])
def test_file_reads_back_with_metadata_tokenizer_and_close_weights(tmp_path, arch, type_name):
    from smallgpt.interop_gguf import export_to_gguf

    model = random_run(tmp_path, arch)
    config = model.config
    reader = gguf.GGUFReader(export_to_gguf(tmp_path, tmp_path / "m.gguf", type_name=type_name))
    fields = {name: field.contents() for name, field in reader.fields.items()}
    expected = {
        "general.architecture": arch,
        f"{arch}.context_length": config.block_size,
        f"{arch}.embedding_length": config.n_embd,
        f"{arch}.feed_forward_length": config.ffn_hidden,
        f"{arch}.block_count": config.n_layer,
        f"{arch}.attention.head_count": config.n_head,
        f"{arch}.attention.head_count_kv": config.n_head,
        f"{arch}.attention.key_length": config.head_dim,
        "general.file_type": {"f16": 1, "q8_0": 7}[type_name],
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": EOT_ID,
        "tokenizer.ggml.eos_token_id": EOT_ID,
    }
    if arch == "qwen3":
        expected |= {"qwen3.rope.freq_base": 10_000.0, "qwen3.attention.layer_norm_rms_epsilon": 1e-6}
    else:
        expected |= {"gpt2.attention.layer_norm_epsilon": 1e-5}
    for key, value in expected.items():
        assert fields[key] == pytest.approx(value) if isinstance(value, float) else fields[key] == value, key
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 50257 and tokens[EOT_ID] == "<|endoftext|>" and tokens[262] == "Ġthe"
    assert (
        fields["tokenizer.ggml.merges"][:2] == ["Ġ t", "Ġ a"]
        and len(fields["tokenizer.ggml.merges"]) == 50000
    )
    assert fields["tokenizer.ggml.token_type"][EOT_ID] == gguf.TokenType.CONTROL

    tensors = {t.name: t for t in reader.tensors}
    assert ("output.weight" in tensors) == (not config.architecture.tied_head)
    assert len(tensors) == len(model.state_dict()) - config.architecture.tied_head
    wte = tensors["token_embd.weight"]
    assert tuple(int(n) for n in wte.shape) == (config.n_embd, 50257)  # ggml order: innermost first
    matrix_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[type_name]
    for t in reader.tensors:
        vector = len(t.shape) == 1 or t.name.startswith("position_embd")
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if vector else matrix_type), t.name
    # Dequantised, each weight is within its type's rounding of ours: q8_0 keeps 8 bits per block of 32.
    tolerance = {"f16": 1e-3, "q8_0": 1 / 127}[type_name]
    first_ffn = "transformer.h.0.mlp.c_fc.weight"
    for gguf_name, ours in (
        ("token_embd.weight", "transformer.wte.weight"),
        ("blk.0.ffn_up.weight", first_ffn),
    ):
        weight = model.state_dict()[ours][:50257].numpy()
        back = gguf.quants.dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type)
        assert np.abs(back.reshape(weight.shape) - weight).max() <= tolerance * np.abs(weight).max()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--out", "{tmp}/model.bin"], "must name a .gguf file (e.g. --out model.gguf)"),
        (["--out", "{tmp}/dir.gguf"], "is a directory; name the .gguf file to write inside it"),
        (["--out", "{tmp}/taken.gguf"], "taken.gguf already exists (use --force to replace it)"),
        (
            ["--out", "{tmp}/m.gguf", "--type", "q4_0"],
            "unknown GGUF type 'q4_0'; choose one of: f32, f16, q8_0",
        ),
        (["--out", "{tmp}/m.gguf", "--format", "onnx"], "unknown --format 'onnx'; choose hf or gguf"),
        (["--out", "{tmp}/hf", "--format", "hf", "--type", "f32"], "--type sets the weights of a GGUF file"),
        (["--out", "/dev/null/x/m.gguf"], "cannot create output directory /dev/null/x"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(tmp_path, cli, args, message):
    save_weights(
        GPT(ModelConfig(vocab_size=50257, dropout=0.0, **SHAPES["gpt2"])), tmp_path / "model.safetensors"
    )
    (tmp_path / "dir.gguf").mkdir()
    (tmp_path / "taken.gguf").write_text("the user's")
    before = sorted(p.name for p in tmp_path.iterdir())
    uses_format = "--format" in args
    code, _, err = cli(
        "export",
        str(tmp_path),
        *(a.format(tmp=tmp_path) for a in args),
        *([] if uses_format else ["--format", "gguf"]),
    )
    assert code == 1 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "taken.gguf").read_text() == "the user's"


def test_force_replaces_the_file_atomically(tmp_path, cli):
    random_run(tmp_path, "qwen3")
    (tmp_path / "m.gguf").write_text("an old export")
    code, _, err = cli(
        "export", str(tmp_path), "--format", "gguf", "--out", str(tmp_path / "m.gguf"), "--force"
    )
    assert code == 0, err
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"  # the format's magic number
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model.safetensors"]  # no temporaries


def test_llama_cpp_runs_the_file_as_we_do(tmp_path):
    """Opt-in: llama.cpp itself (llama-cpp-python builds it from source) continues greedily as we do."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from smallgpt.interop_gguf import export_to_gguf

    for arch in SHAPES:
        model = random_run(tmp_path, arch)
        path = export_to_gguf(tmp_path, tmp_path / f"{arch}.gguf", type_name="f32")
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, verbose=False)
        prompt = llm.tokenize(PROMPT.encode(), add_bos=False, special=False)
        assert prompt == encode(PROMPT)
        continuation = []
        for token in llm.generate(prompt, top_k=1, temp=0.0):
            continuation.append(token)
            if len(continuation) == 20:
                break
        assert continuation == greedy(model, 20), arch

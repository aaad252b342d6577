"""Hugging Face interop, checked against transformers itself: exports load there, imports reproduce GPT-2."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import no_space, smallgpt
from safetensors.torch import load_file, save_file
from test_model import SMALL, hf_gpt2

from smallgpt.architectures import ARCHITECTURES
from smallgpt.checkpoint import load_model, save_weights
from smallgpt.config import ModelConfig
from smallgpt.engine import Engine
from smallgpt.errors import SmallGPTError
from smallgpt.generate import SamplingParams
from smallgpt.interop import EXPORT_FILES, export_to_hf, import_from_hf, mapping_for
from smallgpt.interop_gpt2 import state_dict_to_hf
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, encode

transformers = pytest.importorskip("transformers")

PROMPT = "The meaning of life is"


def random_smallgpt(**overrides) -> GPT:
    """A SmallGPT with every parameter random (biases and LayerNorms start constant otherwise)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def write_hf_dir(hf_model, directory, layout: str) -> None:
    """Save a GPT2LMHeadModel as users get them: transformers' own files, OpenAI's, or sharded."""
    if layout == "save_pretrained":
        hf_model.save_pretrained(directory)
    elif layout == "sharded":
        hf_model.save_pretrained(directory, max_shard_size="4MB")
        assert (directory / "model.safetensors.index.json").is_file()
    elif layout == "openai_bin":
        # OpenAI's gpt2 files: a pickled state dict of the bare GPT2Model (no `transformer.` prefix),
        # with the causal-mask buffers included and no separate head.
        directory.mkdir()
        hf_model.config.to_json_file(directory / "config.json")
        state = {k.removeprefix("transformer."): v for k, v in hf_model.state_dict().items()}
        del state["lm_head.weight"]
        T = SMALL["block_size"]
        state.update(
            {f"h.{i}.attn.bias": torch.ones(T, T).tril().view(1, 1, T, T) for i in range(SMALL["n_layer"])}
        )
        torch.save(state, directory / "pytorch_model.bin")


def test_smallgpt_to_hf_to_smallgpt_round_trip_is_exact(tmp_path):
    model = random_smallgpt()
    save_weights(model, tmp_path / "model.safetensors")
    export_to_hf(tmp_path, tmp_path / "hf")
    exported = load_file(tmp_path / "hf" / "model.safetensors")
    assert exported["transformer.wte.weight"].shape == (50257, SMALL["n_embd"])  # padding stripped
    assert "lm_head.weight" not in exported  # tied: stored once, as transformers stores it

    back = load_model(import_from_hf(tmp_path / "hf", tmp_path / "back"))
    assert back.config == model.config
    original, restored = model.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for name, tensor in original.items():
        if name in ("transformer.wte.weight", "lm_head.weight"):
            # The padding rows are never read (their logits are sliced off); import refills them with zeros.
            assert torch.equal(restored[name][:50257], tensor[:50257]), name
            assert not restored[name][50257:].any()
        else:
            assert torch.equal(restored[name], tensor), name
    assert back.lm_head.weight is back.transformer.wte.weight


@pytest.mark.parametrize("layout", ["save_pretrained", "sharded", "openai_bin"])
def test_hf_to_smallgpt_keeps_weights_and_logits(tmp_path, layout):
    hf = hf_gpt2()
    write_hf_dir(hf, tmp_path / "hf", layout)
    ours = load_model(import_from_hf(tmp_path / "hf", tmp_path / "run"))
    for name, tensor in state_dict_to_hf(ours.state_dict(), ours.config).items():
        assert torch.equal(tensor, hf.state_dict()[name]), name
    idx = torch.randint(0, 50257, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (ours(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_export_loads_cleanly_in_transformers(tmp_path):
    model = random_smallgpt()
    save_weights(model, tmp_path / "model.safetensors")
    out = export_to_hf(tmp_path / "model.safetensors", tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "vocab.json",
        "merges.txt",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    idx = torch.randint(0, 50257, (2, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (hf(idx).logits - model(idx)).abs().max().item() <= 1e-4

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = "Héllo wörld!  It's 2026 — naïve café 🤖\n\tdone"
    assert tokenizer(text)["input_ids"] == encode(text)
    assert tokenizer.decode(encode(text)) == text
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == EOT_ID
    generator = transformers.pipeline("text-generation", model=str(out))
    result = generator(PROMPT, max_new_tokens=5, do_sample=False)
    assert result[0]["generated_text"].startswith(PROMPT)


def test_greedy_text_of_export_equals_smallgpt_sample(tmp_path, cli):
    # A random GPT-2 with large weights: its greedy text varies, unlike the repetition small init gives.
    hf = hf_gpt2(seed=3)
    with torch.no_grad():
        for param in hf.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.3)
    write_hf_dir(hf, tmp_path / "original", "save_pretrained")
    code, out, _ = cli("import", str(tmp_path / "original"), "--out", str(tmp_path / "run"))
    assert code == 0 and "smallgpt sample" in out
    code, out, _ = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "export"))
    assert code == 0 and "from_pretrained" in out

    sample = smallgpt(
        "sample", str(tmp_path / "run"), "--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "50"
    )
    assert sample.returncode == 0 and "[50 tokens" in sample.stderr, sample.stderr
    generator = transformers.pipeline("text-generation", model=str(tmp_path / "export"))
    greedy = generator(PROMPT, max_new_tokens=50, do_sample=False, return_full_text=False)
    expected = greedy[0]["generated_text"]
    assert len(set(expected.split())) > 10  # a real test: varied text, not one token repeated
    assert sample.stdout == PROMPT + expected + "\n"

    # The same at the level of token ids: transformers' generate against SmallGPT's Generator.
    prompt_ids = torch.tensor([encode(PROMPT)])
    hf_ids = generator.model.generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=50, do_sample=False
    )
    ours = Engine(load_model(tmp_path / "run")).generate([PROMPT], SamplingParams(50, temperature=0))
    assert hf_ids[0, prompt_ids.shape[1] :].tolist() == ours[0].token_ids


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_export_refuses_what_no_mapping_can_express(arch):
    """The guards are the same for every architecture: a config field no mapping was taught, and a
    vocabulary other than the BPE every export ships."""

    @dataclasses.dataclass(frozen=True)
    class FutureConfig(ModelConfig):
        rotary_embeddings: bool = True

    with pytest.raises(SmallGPTError, match="rotary_embeddings have no Hugging Face equivalent"):
        mapping_for(FutureConfig(**{**SMALL, "arch": arch}))
    with pytest.raises(SmallGPTError, match="vocab_size 1000"):
        mapping_for(ModelConfig(**{**SMALL, "arch": arch, "vocab_size": 1000}))


def edited_copy(source, target, config_changes=None, drop_weight=None) -> None:
    """A copy of an HF directory with config.json fields changed or one weight removed."""
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, **(config_changes or {})}))
    state = load_file(source / "model.safetensors")
    save_file({k: v for k, v in state.items() if k != drop_weight}, target / "model.safetensors")


class Payload:
    """Unpickling this would run code."""

    def __reduce__(self):
        return (print, ("this ran",))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    """A directory holding one input of each kind the commands must refuse."""
    root = tmp_path_factory.mktemp("bad")
    write_hf_dir(hf_gpt2(), root / "gpt2", "save_pretrained")
    edited_copy(root / "gpt2", root / "llama", config_changes={"model_type": "llama"})
    edited_copy(root / "gpt2", root / "wider", config_changes={"n_embd": 128})
    edited_copy(root / "gpt2", root / "relu", config_changes={"activation_function": "relu"})
    edited_copy(root / "gpt2", root / "partial", drop_weight="transformer.h.1.mlp.c_fc.weight")
    for name in ("no_weights", "evil"):
        (root / name).mkdir()
        (root / name / "config.json").write_bytes((root / "gpt2" / "config.json").read_bytes())
    torch.save({"transformer.wte.weight": Payload()}, root / "evil" / "pytorch_model.bin")
    save_weights(random_smallgpt(bias=False), root / "nobias.safetensors")
    save_weights(random_smallgpt(), root / "model.safetensors")
    (root / "taken").mkdir()
    (root / "taken" / "notes.txt").write_text("keep me")
    return root


@pytest.mark.parametrize(
    "args, message",
    [
        (["import", "llama"], "config.json has model_type 'llama'; SmallGPT imports gpt2, qwen3"),
        (
            ["import", "wider"],
            "shape mismatch: transformer.wte.weight is (50257, 64) but config.json implies (50257, 128)",
        ),
        (["import", "partial"], "missing weights: transformer.h.1.mlp.c_fc.weight"),
        (["import", "relu"], "cannot run this GPT-2 variant: activation_function='relu'"),
        (["import", "no_weights"], "no weights in"),
        (["import", "nowhere"], "Hugging Face model directory not found"),
        (["import", "evil"], "cannot read weights from"),
        (["import", "model.safetensors"], "is a file; give the Hugging Face model directory that holds it"),
        (["import", "gpt2", "--out", "gpt2", "--force"], "is the directory being imported: pick another"),
        (["export", "nobias.safetensors"], "cannot export to GPT-2: bias=False"),
        (["export", "model.safetensors", "--out", "taken"], "taken already exists (use --force"),
        (["import", "gpt2", "--out", "taken"], "taken already exists (use --force"),
        (
            ["export", "model.safetensors", "--out", "taken/notes.txt", "--force"],
            "is a file, not a directory",
        ),
        (["import", "gpt2", "--out", "taken/notes.txt", "--force"], "is a file, not a directory"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(bad_inputs, tmp_path, cli, args, message):
    command, source, *rest = args
    out = [str(bad_inputs / rest[1])] if rest else [str(tmp_path / "out")]
    code, stdout, err = cli(command, str(bad_inputs / source), "--out", *out, *rest[2:])
    assert code == 1 and "this ran" not in stdout
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in (bad_inputs / "taken").iterdir()] == ["notes.txt"]


def test_hub_model_id_offline_is_refused_with_the_reason(tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)  # the id is then no local path; conftest keeps the Hub offline
    code, _, err = cli("import", "smallgpt-tests/no-such-model", "--out", "run")
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert (
        "smallgpt-tests/no-such-model is not a local directory, and the Hugging Face Hub lookup failed" in err
    )
    assert not (tmp_path / "run").exists()


def test_refusal_in_a_real_process_has_no_traceback(bad_inputs, tmp_path):
    result = smallgpt("import", str(bad_inputs / "llama"), "--out", str(tmp_path / "run"))
    assert result.returncode == 1
    assert (
        result.stderr.startswith("error: config.json has model_type") and len(result.stderr.splitlines()) == 1
    )


def test_force_replaces_only_the_files_the_command_writes(tmp_path, monkeypatch):
    save_weights(random_smallgpt(), tmp_path / "model.safetensors")
    export_to_hf(tmp_path / "model.safetensors", tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == sorted(EXPORT_FILES)
    (tmp_path / "hf" / "notes.txt").write_text("the user's")
    (tmp_path / "hf" / "config.json").write_text("{}")  # ours: replaced
    export_to_hf(tmp_path / "model.safetensors", tmp_path / "hf", force=True)
    assert (tmp_path / "hf" / "notes.txt").read_text() == "the user's"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "model.safetensors"]  # no temporaries left
    # `--out .` into a working directory: everything that was there stays, byte for byte.
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "a.py").write_text("print(1)")
    (work / "notes.txt").write_text("keep")
    monkeypatch.chdir(work)
    export_to_hf(tmp_path / "model.safetensors", ".", force=True)
    import_from_hf(".", "imported", force=True)
    import_from_hf(".", "imported", force=True)
    assert (work / "src" / "a.py").read_text() == "print(1)" and (work / "notes.txt").read_text() == "keep"
    assert sorted(p.name for p in work.iterdir()) == sorted([*EXPORT_FILES, "imported", "notes.txt", "src"])
    assert [p.name for p in (work / "imported").iterdir()] == ["model.safetensors"]
    # Never over a SmallGPT checkpoint, nor into a training run, whose weights it would hide.
    with pytest.raises(SmallGPTError, match="holds a SmallGPT checkpoint, which export would overwrite"):
        export_to_hf(work / "imported", work / "imported", force=True)
    (work / "run" / "best").mkdir(parents=True)
    for convert in (export_to_hf, import_from_hf):
        with pytest.raises(SmallGPTError, match="is a training run: a model.safetensors there would hide"):
            convert(
                work if convert is import_from_hf else tmp_path / "model.safetensors",
                work / "run",
                force=True,
            )


def test_a_full_disk_leaves_the_previous_export_whole(tmp_path, monkeypatch, cli):
    """The files are all written before any replaces its old version: config.json, written last,
    refused by a full disk, and the directory still holds the first export, byte for byte."""
    save_weights(random_smallgpt(), tmp_path / "first.safetensors")
    save_weights(random_smallgpt(n_layer=1), tmp_path / "second.safetensors")
    export_to_hf(tmp_path / "first.safetensors", tmp_path / "hf")
    first = {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()}
    real_write_bytes = Path.write_bytes

    def write_bytes(path, data):
        return no_space() if path.name.startswith(".config.tmp-") else real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    code, _, err = cli(
        "export", str(tmp_path / "second.safetensors"), "--out", str(tmp_path / "hf"), "--force"
    )
    assert code == 1 and err == f"error: cannot write {tmp_path}/hf/config.json: No space left on device\n"
    assert {p.name: p.read_bytes() for p in (tmp_path / "hf").iterdir()} == first

"""Hugging Face interop: GPT-2's exact weight mapping, and export / import of whole model directories.

The two models are the same architecture with the same parameter names (SmallGPT's live under the
same `transformer.*` prefix). The differences are bookkeeping:
  - GPT-2 uses `Conv1D` layers whose weight is stored (in, out); our `nn.Linear` stores (out, in).
  - SmallGPT may pad the vocabulary rows of the embedding; GPT-2 has exactly `vocab_size` rows.
  - GPT-2 checkpoints carry non-parameter buffers (`attn.bias` causal masks) that we do not need.

`export_to_hf` writes the directory `transformers` loads with `from_pretrained` (config, weights,
generation config, tokenizer); `import_from_hf` reads such a directory into a SmallGPT checkpoint.
Neither needs `transformers` itself: the files are plain JSON and safetensors. An option one side
cannot express is refused with a reason, never silently dropped, so a converted model computes
exactly what the original did. Models of `arch="qwen3"` travel as `Qwen3ForCausalLM` through the same
two functions; their mapping lives in `smallgpt.interop_qwen3`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smallgpt import interop_qwen3 as qwen3
from smallgpt.checkpoint import WEIGHTS_NAME, load_model, read_model_config, save_weights
from smallgpt.config import GPT2_VOCAB_SIZE, ModelConfig
from smallgpt.errors import SmallGPTError, first_line
from smallgpt.files import atomic_write_files, make_dir
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, EOT_TOKEN, verified_bytes

# Weights stored transposed by GPT-2's Conv1D layers.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Causal-mask buffers some GPT-2 files carry; they are constants, not weights.
MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")

# GPT-2 options that SmallGPT's architecture fixes: written on export, required on import. Each value
# is also GPT2Config's default, so an option missing from a config.json means the same thing.
GPT2_FIXED_OPTIONS = {
    "activation_function": "gelu_new",  # GELU, tanh approximation
    "n_inner": None,  # MLP width 4 * n_embd
    "layer_norm_epsilon": 1e-5,
    "scale_attn_weights": True,  # attention scores divided by sqrt(head_dim)
    "scale_attn_by_inverse_layer_idx": False,
    "add_cross_attention": False,
    "tie_word_embeddings": True,  # the output head is the token embedding
}
# The ModelConfig fields export knows how to express. A field added to ModelConfig later must be
# taught here; until then checkpoints are refused rather than exported as something they are not.
EXPORTABLE_FIELDS = {
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "bias",
    "vocab_multiple",
    "arch",
}

SPECIAL_TOKENS = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
# Hugging Face tokenizer file -> the packaged GPT-2 BPE file with the same content.
TOKENIZER_FILES = {"vocab.json": "encoder.json", "merges.txt": "vocab.bpe"}
# Where a Hugging Face directory keeps its weights, by preference: safetensors (one file, or shards
# listed in an index), else pickled PyTorch weights. The shard patterns select what a Hub download fetches.
WEIGHT_LAYOUTS = (
    ("model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"),
    ("pytorch_model.bin", "pytorch_model.bin.index.json", "pytorch_model-*-of-*.bin"),
)
WEIGHT_FILES = tuple(name for layout in WEIGHT_LAYOUTS for name in layout[:2])
# What `export` writes, and all it ever replaces in its output directory.
EXPORT_FILES = (
    "model.safetensors", "generation_config.json", *TOKENIZER_FILES, "tokenizer_config.json",
    "special_tokens_map.json", "config.json",
)  # fmt: skip


# --- the mapping -------------------------------------------------------------------------------------


def config_from_hf(hf_config: dict, vocab_multiple: int = 64) -> ModelConfig:
    """A SmallGPT config for a GPT-2 `config.json` (as a dict); refuses GPT-2 variants we cannot run."""
    model_type = hf_config.get("model_type")
    if model_type != "gpt2":
        raise SmallGPTError(f"not a GPT-2 or Qwen3 model: config.json has model_type {model_type!r}")
    defaults = {
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": 1024,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
    }
    shape = {key: hf_config.get(key, default) for key, default in defaults.items()}
    for key, value in shape.items():
        if type(value) is not int:
            raise SmallGPTError(f"config.json has {key}={value!r}, expected a whole number")
    for key, fixed in GPT2_FIXED_OPTIONS.items():
        value = hf_config.get(key, fixed)
        same = (
            value == fixed
            or (key == "activation_function" and value == "gelu_pytorch_tanh")  # the same function
            or (key == "n_inner" and value == 4 * shape["n_embd"])
        )
        if not same:
            raise SmallGPTError(
                f"SmallGPT cannot run this GPT-2 variant: {key}={value!r} (it needs {fixed!r})"
            )
    if shape["vocab_size"] != GPT2_VOCAB_SIZE:
        raise SmallGPTError(
            f"vocab_size {shape['vocab_size']} is not GPT-2's {GPT2_VOCAB_SIZE}: our tokenizer would not fit"
        )
    return ModelConfig(
        vocab_size=shape["vocab_size"],
        block_size=shape["n_positions"],
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_embd"],
        dropout=0.0,
        vocab_multiple=vocab_multiple,
    )


def hf_config_from(config: ModelConfig) -> dict:
    """The `config.json` of the `GPT2LMHeadModel` equal to `config`; refuses what GPT-2 cannot express."""
    unknown = sorted(set(config.to_dict()) - EXPORTABLE_FIELDS)
    if unknown:
        raise SmallGPTError(
            f"cannot export to GPT-2: config field(s) {', '.join(unknown)} have no GPT-2 equivalent"
        )
    if config.arch != "gpt2":
        raise SmallGPTError(f"cannot export to GPT-2: arch={config.arch!r} is another architecture")
    if not config.bias:
        raise SmallGPTError(
            "cannot export to GPT-2: bias=False, but GPT-2 has biases in every Linear and LayerNorm"
        )
    if config.vocab_size != GPT2_VOCAB_SIZE:
        raise SmallGPTError(
            f"cannot export to GPT-2: vocab_size {config.vocab_size} is not its {GPT2_VOCAB_SIZE}-token BPE"
        )
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        **GPT2_FIXED_OPTIONS,
        # Our one dropout rate sits where GPT-2 has three: embeddings, attention weights, residuals.
        "embd_pdrop": config.dropout,
        "attn_pdrop": config.dropout,
        "resid_pdrop": config.dropout,
        "initializer_range": 0.02,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "use_cache": True,
        "dtype": "float32",
    }


def state_dict_from_hf(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Map a GPT-2 state dict onto SmallGPT parameter names, shapes and vocabulary padding."""
    state = {}
    for name, tensor in hf_state.items():
        if name.endswith(MASK_BUFFERS) or name == "lm_head.weight":
            continue  # the head is tied to wte
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        state[name] = tensor.contiguous()
    wte = state["transformer.wte.weight"]
    padding = config.padded_vocab_size - wte.shape[0]
    if padding:
        state["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(padding, wte.shape[1])])
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def state_dict_to_hf(state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Inverse of `state_dict_from_hf`: GPT-2 names, Conv1D layout, padding stripped, head untied."""
    hf_state = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        hf_state[name] = tensor.contiguous()
    hf_state["transformer.wte.weight"] = hf_state["transformer.wte.weight"][: config.vocab_size].contiguous()
    hf_state["lm_head.weight"] = hf_state["transformer.wte.weight"]
    return hf_state


# --- export ------------------------------------------------------------------------------------------


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write a SmallGPT checkpoint as a Hugging Face GPT-2 or Qwen3 directory: weights, configs, tokenizer."""
    out = _claim_output_dir(out_dir, force, EXPORT_FILES)
    if (out / WEIGHTS_NAME).is_file() and _is_smallgpt_checkpoint(out / WEIGHTS_NAME):
        raise SmallGPTError(f"--out {out} holds a SmallGPT checkpoint, which export would overwrite")
    model = load_model(checkpoint)
    if model.config.arch == "qwen3":
        hf_config = qwen3.hf_config_from(model.config)
        hf_state = qwen3.state_dict_to_hf(model.state_dict(), model.config)
    else:
        hf_config = hf_config_from(model.config)
        hf_state = state_dict_to_hf(model.state_dict(), model.config)
        # Stored once, as transformers' own save_pretrained does: tie_word_embeddings re-ties it on load.
        del hf_state["lm_head.weight"]
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model.config.block_size,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode must invert encode exactly, as tiktoken's does
        **SPECIAL_TOKENS,
    }

    writers = {
        "model.safetensors": lambda path: save_file(hf_state, str(path), metadata={"format": "pt"}),
        "generation_config.json": _json_writer({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}),
        **{name: _bytes_writer(verified_bytes(packaged)) for name, packaged in TOKENIZER_FILES.items()},
        "tokenizer_config.json": _json_writer(tokenizer_config),
        "special_tokens_map.json": _json_writer(SPECIAL_TOKENS),
        "config.json": _json_writer(hf_config),  # last: it is what marks a model directory
    }
    _write_outputs(out, writers)
    return out


# --- import ------------------------------------------------------------------------------------------


def import_from_hf(hf_dir: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Read a Hugging Face GPT-2 or Qwen3 directory (or Hub model id) into `out_dir/model.safetensors`."""
    out = _claim_output_dir(out_dir, force, (WEIGHTS_NAME,))
    hf_dir = find_model_dir(hf_dir)
    if out == hf_dir.resolve():
        raise SmallGPTError(f"--out {out_dir} is the directory being imported: pick another")
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise SmallGPTError(f"no config.json in {hf_dir} (not a Hugging Face model directory)")
    hf_config = _read_json(config_file)
    if hf_config.get("model_type") == "qwen3":
        config = qwen3.config_from_hf(hf_config)
        state = qwen3.state_dict_from_hf(_checked_hf_state(read_hf_weights(hf_dir), config), config)
    else:
        config = config_from_hf(hf_config)
        state = state_dict_from_hf(_checked_hf_state(read_hf_weights(hf_dir), config), config)
    model = GPT(config)
    model.load_state_dict(state)  # casts fp16/bf16 files to fp32
    _write_outputs(out, {WEIGHTS_NAME: lambda path: save_weights(model, path)})
    return out / WEIGHTS_NAME


def find_model_dir(source: str | Path) -> Path:
    """`source` if it is a local directory; otherwise a Hub model id, downloaded (config and weights only)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise SmallGPTError(f"{path} is a file; give the Hugging Face model directory that holds it")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(str(source))
    except HFValidationError:
        raise SmallGPTError(f"Hugging Face model directory not found: {source}") from None
    try:
        local = Path(snapshot_download(str(source), allow_patterns=["config.json", *WEIGHT_LAYOUTS[0]]))
        if not any((local / name).is_file() for name in WEIGHT_FILES):  # an older repo: pickled weights
            local = Path(snapshot_download(str(source), allow_patterns=["config.json", *WEIGHT_LAYOUTS[1]]))
    except Exception as exc:  # offline, no such repo, network down: the user's fix is the same
        raise SmallGPTError(
            f"{source} is not a local directory, and the Hugging Face Hub lookup failed: {first_line(exc)}"
        ) from None
    return local


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: one safetensors/bin file, or the shards of an index."""
    found = next((hf_dir / name for name in WEIGHT_FILES if (hf_dir / name).is_file()), None)
    if found is None:
        raise SmallGPTError(f"no weights in {hf_dir} (expected model.safetensors or pytorch_model.bin)")
    files = [found]
    if found.name.endswith(".index.json"):
        weight_map = _read_json(found).get("weight_map") or {}
        # Shard names are file names inside hf_dir; `.name` keeps a crafted index from reaching outside.
        files = [hf_dir / Path(shard).name for shard in sorted(set(weight_map.values()))]
    state = {}
    for file in files:
        state.update(_load_weights_file(file))
    return state


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise SmallGPTError(f"missing weights file: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        # weights_only: tensors and plain containers only, so a malicious pickle cannot run code.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, pickle.UnpicklingError) as exc:
        raise SmallGPTError(f"cannot read weights from {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise SmallGPTError(f"{path} does not hold a state dict of tensors")
    return state


def _checked_hf_state(hf_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The Hugging Face weights, checked against the names and shapes `config` implies.

    GPT-2: OpenAI's `gpt2` files were saved from the bare `GPT2Model`, so their names lack the
    `transformer.` prefix; `transformers` adds it on load and so do we. The tied head may be absent.
    """
    to_hf = qwen3.state_dict_to_hf if config.arch == "qwen3" else state_dict_to_hf
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {name: t.shape for name, t in to_hf(GPT(config).state_dict(), config).items()}
    state, head = dict(hf_state), None
    if config.tied_head:
        del expected["lm_head.weight"]
        state = {}
        for name, tensor in hf_state.items():
            if name.endswith(MASK_BUFFERS):
                continue
            if name != "lm_head.weight" and not name.startswith("transformer."):
                name = f"transformer.{name}"
            state[name] = tensor
        head = state.pop("lm_head.weight", None)
    missing = [name for name in expected if name not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise SmallGPTError(f"missing weights: {missing[0]}{more} not found in the {config.arch} weights")
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        raise SmallGPTError(
            f"unexpected weight {unexpected[0]}: not a {config.arch} language model SmallGPT can run"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise SmallGPTError(
                f"shape mismatch: {name} is {tuple(state[name].shape)} but config.json implies {tuple(shape)}"
            )
    if head is not None and not torch.equal(head, state["transformer.wte.weight"]):
        raise SmallGPTError("lm_head.weight differs from the token embedding, but SmallGPT ties the two")
    return state


# --- files -------------------------------------------------------------------------------------------


def _claim_output_dir(out_dir: str | Path, force: bool, names: tuple[str, ...]) -> Path:
    """Where to write `names`. A directory that holds anything is refused unless forced; forced, only
    the files named `names` are ever replaced, each atomically: `--out .` cannot lose other files."""
    out = Path(out_dir).resolve()
    if out.exists() and not out.is_dir():
        raise SmallGPTError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise SmallGPTError(
            f"{out} already exists (use --force to write into it; only the files written are replaced)"
        )
    if (out / "checkpoints").is_dir() or (out / "best").is_dir():
        raise SmallGPTError(
            f"--out {out} is a training run: a model.safetensors there would hide its weights"
        )
    in_the_way = [name for name in names if (out / name).is_dir()]
    if in_the_way:
        raise SmallGPTError(f"cannot write {out / in_the_way[0]}: a directory of that name is in the way")
    return out


def _is_smallgpt_checkpoint(path: Path) -> bool:
    try:
        read_model_config(path)
    except SmallGPTError:
        return False
    return True


def _write_outputs(out: Path, writers: dict) -> None:
    """Create `out` and write each file via `writers[name](path)`, touching nothing else: all of them are
    on disk before any replaces an old one, so a full disk leaves a previous export whole."""
    make_dir(out, "--out directory")
    atomic_write_files(out, writers)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SmallGPTError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SmallGPTError(f"{path} does not hold a JSON object")
    return data


def _json_writer(data: dict):
    return _bytes_writer((json.dumps(data, indent=2) + "\n").encode("utf-8"))


def _bytes_writer(content: bytes):
    return lambda path: path.write_bytes(content)

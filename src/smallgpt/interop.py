"""Hugging Face interop: export / import of whole model directories, for every architecture.

Each architecture's exact mapping (config fields, parameter names, layouts) is a module of the same
few functions, picked by the architecture's `hf_model_type`: `smallgpt.interop_gpt2` for
`GPT2LMHeadModel`, `smallgpt.interop_qwen3` for `Qwen3ForCausalLM`. This module holds what they share:
the guard against config fields no mapping knows, the vocabulary check, the name and shape check of
imported weights, the tokenizer files, and the output directory's handling.

`export_to_hf` writes the directory `transformers` loads with `from_pretrained` (config, weights,
generation config, tokenizer); `import_from_hf` reads such a directory into a SmallGPT checkpoint.
Neither needs `transformers` itself: the files are plain JSON and safetensors. An option one side
cannot express is refused with a reason, never silently dropped, so a converted model computes
exactly what the original did. `smallgpt.interop_gguf` writes llama.cpp's GGUF from the same mappings.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from smallgpt import interop_gpt2, interop_qwen3
from smallgpt.architectures import FOLDED_AT_EXPORT
from smallgpt.checkpoint import WEIGHTS_NAME, is_smallgpt_checkpoint, load_model, save_weights
from smallgpt.config import GPT2_VOCAB_SIZE, ModelConfig
from smallgpt.errors import SmallGPTError, first_line
from smallgpt.files import atomic_write_files, make_dir
from smallgpt.model import GPT
from smallgpt.tokenizer import EOT_ID, EOT_TOKEN, verified_bytes

# Hugging Face `model_type` -> the module that maps it (`Architecture.hf_model_type` names the key).
MAPPINGS = {mapping.ARCH.hf_model_type: mapping for mapping in (interop_gpt2, interop_qwen3)}

# The ModelConfig fields the mappings know how to express. A field added to ModelConfig later must be
# taught to every mapping; until then checkpoints are refused rather than exported as something they are not.
EXPORTABLE_FIELDS = {"vocab_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias",
                     "vocab_multiple", "arch"}  # fmt: skip

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


# --- what every mapping shares ------------------------------------------------------------------


def mapping_for(config: ModelConfig):
    """The interop module of `config`'s architecture, once the config is known to be expressible."""
    unknown = sorted(set(config.to_dict()) - EXPORTABLE_FIELDS)
    if unknown:
        raise SmallGPTError(
            f"cannot export: config field(s) {', '.join(unknown)} have no Hugging Face equivalent yet"
        )
    _check_vocabulary(config.vocab_size, "cannot export: vocab_size")
    mapping, arch = MAPPINGS[config.architecture.hf_model_type], config.architecture
    # A row may differ from the mapping's only in what export folds away or never writes.
    if dataclasses.replace(arch, **{f: getattr(mapping.ARCH, f) for f in FOLDED_AT_EXPORT}) != mapping.ARCH:
        raise SmallGPTError(f"cannot export: arch {arch.name} has features {mapping.ARCH.name} cannot hold")
    return mapping


def config_from_hf(hf_config: dict, vocab_multiple: int = 64) -> ModelConfig:
    """A SmallGPT config for a Hugging Face `config.json` (as a dict) of any architecture we map."""
    model_type = hf_config.get("model_type")
    if model_type not in MAPPINGS:
        raise SmallGPTError(
            f"config.json has model_type {model_type!r}; SmallGPT imports {', '.join(MAPPINGS)}"
        )
    config = MAPPINGS[model_type].config_from_hf(hf_config, vocab_multiple)
    _check_vocabulary(config.vocab_size, "vocab_size")
    return config


def _check_vocabulary(vocab_size: int, what: str) -> None:
    """Every format ships (and every import runs under) the packaged GPT-2 BPE: 50,257 tokens."""
    if vocab_size != GPT2_VOCAB_SIZE:
        raise SmallGPTError(f"{what} {vocab_size} is not the {GPT2_VOCAB_SIZE}-token GPT-2 BPE we ship")


# --- export ------------------------------------------------------------------------------------------


def export_to_hf(checkpoint: str | Path, out_dir: str | Path, *, force: bool = False) -> Path:
    """Write a SmallGPT checkpoint as a Hugging Face GPT-2 or Qwen3 directory: weights, configs, tokenizer."""
    out = _claim_output_dir(out_dir, force, EXPORT_FILES)
    if (out / WEIGHTS_NAME).is_file() and is_smallgpt_checkpoint(out / WEIGHTS_NAME):
        raise SmallGPTError(f"--out {out} holds a SmallGPT checkpoint, which export would overwrite")
    model = load_model(checkpoint)
    mapping = mapping_for(model.config)
    hf_config = mapping.hf_config_from(model.config)
    hf_state = mapping.state_dict_to_hf(model.standard_state_dict(), model.config)
    if model.config.architecture.tied_head:
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
    config = config_from_hf(_read_json(config_file))
    mapping = MAPPINGS[config.architecture.hf_model_type]
    state = mapping.state_dict_from_hf(_checked_hf_state(read_hf_weights(hf_dir), config), config)
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

    A tied head may be absent from the file (transformers re-ties it); if present it must equal the
    embedding, since a model that ties the two cannot run one that does not.
    """
    mapping = MAPPINGS[config.architecture.hf_model_type]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        expected = {
            name: t.shape for name, t in mapping.state_dict_to_hf(GPT(config).state_dict(), config).items()
        }
    state, head = mapping.canonical_hf_state(hf_state), None
    if config.architecture.tied_head:
        del expected["lm_head.weight"]
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

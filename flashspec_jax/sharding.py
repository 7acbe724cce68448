"""Tensor parallelism with JAX's own sharding: a `tp` mesh axis, Megatron's layout.

Attention heads and the MLP's intermediate columns are split over the devices
of the `tp` axis: the fused qkv and gate_up weights by columns, the output and
down projections by rows, so each layer needs one all-reduce after attention
and one after the MLP, which XLA's partitioner inserts from the weights'
shardings alone. The KV cache is split by KV heads. The embedding, the head,
the norms, the drafters' own weights and everything the loop carries besides
the caches are replicated, so the verify step, the bandit and the sequence
state run whole on every device.

A device's block of the fused weights must hold whole heads of q, k and v (or
matching columns of gate and up), so those weights are laid out shard-major:
the loaders read each device's block in that order (loading/params.py),
`shard_major` re-lays a tree already in memory, and the model, told by
`LlamaConfig.tp_shards`, splits them back per block (models/llama.py's
`split_fused`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from flashspec_jax.models.config import LlamaConfig

AXIS = "tp"


def parse_mesh(text: str) -> int:
  """The tensor-parallel degree of a mesh spec: "" is 1, "tp:<n>" is n."""
  if not text:
    return 1
  axis, _, size = text.partition(":")
  if axis != AXIS or not size.isdigit() or int(size) < 1:
    raise ValueError(f"mesh {text!r}: expected '' or 'tp:<n>' with n >= 1")
  return int(size)


def degree(mesh: Mesh | None) -> int:
  """The tensor-parallel degree of a mesh; 1 without one."""
  return 1 if mesh is None else mesh.shape[AXIS]


def sharded_config(config: LlamaConfig, tp: int) -> LlamaConfig:
  """config with its fused weights laid out for tp devices; raises, naming the field, if
  its heads or columns do not split that way."""
  return dataclasses.replace(config, tp_shards=tp)


def weight_bytes(config: LlamaConfig, itemsize: int, tp: int = 1) -> int:
  """Bytes of the model's weights on each of tp devices: the layers' matrices split,
  the embeddings and norms whole on every device."""
  c = config
  attention = c.hidden_size * (2 * c.num_heads + 2 * c.num_kv_heads) * c.head_dim
  split = c.num_layers * (attention + 3 * c.hidden_size * c.intermediate_size)
  embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_word_embeddings else 2)
  whole = embeddings + (2 * c.num_layers + 1) * c.hidden_size
  return itemsize * (split // tp + whole)


def device_memory() -> int | None:
  """Bytes one device may hold, or None where the runtime does not say (the CPU)."""
  stats = jax.devices()[0].memory_stats()
  return stats.get("bytes_limit") if stats else None


def check_fits(config: LlamaConfig, tp: int, itemsize: int, limit: int | None) -> None:
  """Raises before anything loads if a device's share of the weights exceeds its memory
  (limit bytes; None skips the check), naming the degree that would fit with a tenth
  of the device left for the KV cache and activations."""
  share = weight_bytes(config, itemsize, tp)
  if limit is None or share <= limit:
    return
  fits = next((n for n in range(tp + 1, config.num_kv_heads + 1)
               if config.num_kv_heads % n == 0 and config.intermediate_size % n == 0
               and weight_bytes(config, itemsize, n) <= 0.9 * limit), None)
  advice = (f"use --config.mesh=tp:{fits} (or more devices)" if fits
            else "no tensor-parallel degree up to its KV heads fits")
  raise ValueError(f"{config.name}: its weights take {weight_bytes(config, itemsize) / 1e9:.0f} "
                   f"GB at {itemsize} bytes per value, {share / 1e9:.0f} GB per device at "
                   f"tp:{tp}, and a device holds {limit / 1e9:.0f} GB: {advice}")


def mesh_for(spec: str) -> Mesh | None:
  """The mesh a spec asks for over the default backend's devices; None for one device."""
  tp = parse_mesh(spec)
  return make_mesh(tp) if tp > 1 else None


def make_mesh(tp: int, devices: list | None = None) -> Mesh:
  """A `tp` axis over the first tp of devices (None: the default backend's); the caller
  has checked that there are that many (pipeline.load_target)."""
  devices = devices or jax.devices()
  return Mesh(np.asarray(devices[:tp]), (AXIS,))


def shard_major(params: dict[str, Any], config: LlamaConfig, tp: int) -> dict[str, Any]:
  """An in-memory params tree in the checkpoint's layout, with each fused weight's columns
  reordered into tp blocks, block s holding shard s of each part in turn: [q_s k_s v_s]
  or [gate_s up_s]. (The loaders read each device's block in this order directly.)"""
  q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
  parts = {"qkv": (q, kv, kv), "gate_up": (config.intermediate_size,) * 2}

  def reorder(path, weight):
    if path[-1].key not in parts:
      return weight
    pieces = np.split(np.arange(weight.shape[-1]), np.cumsum(parts[path[-1].key])[:-1])
    return weight[..., np.concatenate([np.split(piece, tp)[s] for s in range(tp)
                                       for piece in pieces])]

  return jax.tree_util.tree_map_with_path(reorder, params)


def param_spec(name: str) -> P:
  """Megatron's split of the target parameter called name; the rest is replicated."""
  if name in ("qkv", "gate_up"):
    return P(None, AXIS)
  if name in ("out", "down"):
    return P(AXIS, None)
  return P()


def param_shardings(params: dict[str, Any], mesh: Mesh) -> dict[str, Any]:
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, param_spec(path[-1].key)), params)


def mesh_of(tree) -> Mesh | None:
  """The mesh tree's arrays are sharded over, or None for arrays on one device."""
  found = {leaf.sharding.mesh for leaf in jax.tree.leaves(tree)
           if isinstance(getattr(leaf, "sharding", None), NamedSharding)}
  return found.pop() if found else None


def replicated(tree, mesh: Mesh | None):
  """tree on every device of the mesh (on the default device without one)."""
  return jax.device_put(tree, None if mesh is None else NamedSharding(mesh, P()))

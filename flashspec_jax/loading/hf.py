"""Hugging Face checkpoint directories: `config.json` plus `*.safetensors`.

Sharded checkpoints are read through `model.safetensors.index.json`. Tensors are
read with safetensors' numpy API, so loading needs no torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
from typing import Any

import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open

from flashspec_jax import sharding
from flashspec_jax.loading.params import CheckpointError, check_tensor_names, params_from_hf
from flashspec_jax.models.config import LlamaConfig

INDEX_FILE = "model.safetensors.index.json"


def read_json_object(path: pathlib.Path) -> dict[str, Any]:
  try:
    data = json.loads(path.read_text())
  except ValueError as error:  # invalid JSON, or bytes that are not text
    raise CheckpointError(f"{path} is not valid JSON: {error}") from error
  if not isinstance(data, dict):
    raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, not an object")
  return data


def open_safetensors(path: pathlib.Path) -> safe_open:
  try:
    return safe_open(path, framework="np")
  except SafetensorError as error:
    raise CheckpointError(f"{path} is truncated or corrupt: {error}") from error


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """A tensor in an open safetensors file, read on indexing: only the block asked for."""

  handle: Any
  name: str

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.handle.get_slice(self.name).get_shape())

  def __getitem__(self, index) -> np.ndarray:
    return self.handle.get_slice(self.name)[index]


def tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
  """Maps each tensor name to the safetensors file holding it."""
  index = directory / INDEX_FILE
  if index.exists():
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index} has no weight_map object")
    files = {name: directory / shard for name, shard in weight_map.items()}
    absent = sorted({str(f.name) for f in files.values() if not f.exists()})
    if absent:
      raise CheckpointError(f"{index} names shards that are not in {directory}: {absent}")
    return files
  shards = sorted(directory.glob("*.safetensors"))
  if not shards:
    raise CheckpointError(f"no *.safetensors files (and no {INDEX_FILE}) in {directory}")
  files = {}
  for shard in shards:
    with open_safetensors(shard) as f:
      files |= {name: shard for name in f.keys()}
  return files


def load_hf_config(directory: str | pathlib.Path) -> LlamaConfig:
  directory = pathlib.Path(directory)
  config_file = directory / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"no config.json in {directory}")
  hf = read_json_object(config_file)
  try:
    return LlamaConfig.from_hf_dict(hf, name=directory.name)
  except ValueError as error:  # a missing, invalid or unsupported field
    raise CheckpointError(f"{config_file}: {error}") from error


def load_hf_checkpoint(directory: str | pathlib.Path, dtype: Any = jnp.bfloat16,
                       mesh=None) -> tuple[LlamaConfig, dict[str, Any]]:
  """Loads (config, params) from an HF Llama checkpoint directory; with a mesh, into
  tensor-parallel shards over its tp axis (loading.params.params_from_hf)."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"checkpoint directory {directory} does not exist")
  config = sharding.sharded_config(load_hf_config(directory), sharding.degree(mesh))
  files = tensor_files(directory)
  check_tensor_names(config, files, where=str(directory))
  with contextlib.ExitStack() as stack:
    handles = {path: stack.enter_context(open_safetensors(path))
               for path in set(files.values())}
    params = params_from_hf(config, lambda name: StoredTensor(handles[files[name]], name), dtype,
                            where=str(directory), mesh=mesh)
  return config, params

"""Feature-drafter weights: one safetensors file per drafter, checked against its target.

Tensors are named by their path in the parameter tree ("block.attn.qkv", ...);
the header's metadata names the target shape the drafter was trained for and,
for a drafter of fused features, the target layers it reads ("feature_layers",
a JSON list; absent or empty, the final-normed state). A drafter restricted to
a vocabulary (models/eagle.py) also holds its token ids, int32
"vocabulary.ids"; the head rows are the target's, taken at load time.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import traverse_util

from flashspec_jax.loading.params import CheckpointError
from flashspec_jax.models.config import LlamaConfig
from flashspec_jax.models.eagle import init_params, restrict_vocabulary, valid_feature_layers

VOCABULARY_IDS = "vocabulary.ids"
WEIGHTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "weights"


def shipped_path(name: str) -> pathlib.Path:
  """Where the shipped drafter `eagle:<name>` lives (inside the package)."""
  return WEIGHTS_DIR / f"eagle_{name}" / "model.safetensors"


def save_drafter(path: str | pathlib.Path, params: dict, target: str,
                 metadata: dict[str, str] | None = None,
                 feature_layers: tuple[int, ...] = ()) -> pathlib.Path:
  """Writes {"params": ...} as bf16 safetensors; metadata adds to the header."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = traverse_util.flatten_dict(params["params"], sep=".")
  tensors = {name: np.asarray(jnp.asarray(value, jnp.bfloat16).view(jnp.uint16))
             for name, value in flat.items()}
  if "vocabulary" in params:
    tensors[VOCABULARY_IDS] = np.asarray(params["vocabulary"]["ids"], np.int32)
  header = ({"target": target, "dtype": "bfloat16", "feature_layers": json.dumps(feature_layers)}
            | (metadata or {}))
  temporary = path.with_name(path.name + ".partial")
  safetensors.numpy.save_file(tensors, temporary, metadata=header)
  temporary.replace(path)
  return path


def _open(path: pathlib.Path, config: LlamaConfig,
          with_tensors: bool) -> tuple[dict[str, str], dict[str, np.ndarray]]:
  """The file's header and (with_tensors) its tensors, once its target is config's."""
  if not path.is_file():
    raise CheckpointError(f"no feature-drafter weights at {path}")
  try:
    with safetensors.safe_open(str(path), "numpy") as file:
      metadata = file.metadata() or {}
      tensors = {name: file.get_tensor(name) for name in file.keys()} if with_tensors else {}
  except Exception as error:  # safetensors raises its own error types for broken files
    raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
  if metadata.get("target") != config.name:
    raise CheckpointError(f"{path} holds a drafter for {metadata.get('target')!r}, not for the "
                          f"target {config.name!r}")
  return metadata, tensors


def _layers(path: pathlib.Path, metadata: dict[str, str], config: LlamaConfig) -> tuple[int, ...]:
  text = metadata.get("feature_layers", "[]")
  try:
    layers = json.loads(text)
  except ValueError:
    layers = None
  if not isinstance(layers, list) or not valid_feature_layers(layers, config.num_layers):
    raise CheckpointError(f"{path}: feature_layers must be a JSON list of distinct integers in "
                          f"[0, {config.num_layers}], got {text!r}")
  return tuple(layers)


def feature_layers(path: str | pathlib.Path, config: LlamaConfig) -> tuple[int, ...]:
  """The target layers the drafter in `path` reads (FeatureDrafter.feature_layers).

  Raises:
    CheckpointError: naming the file if it is missing, unreadable, made for another
      target, or its layers are not distinct integers in [0, config.num_layers].
  """
  path = pathlib.Path(path)
  return _layers(path, _open(path, config, with_tensors=False)[0], config)


def load_drafter(path: str | pathlib.Path, config: LlamaConfig, dtype: Any,
                 target_params: dict) -> dict:
  """The drafter's params for a target of `config` whose params are `target_params`
  (a restricted drafter's head rows are taken from them), from `path`; the layers it
  reads are `feature_layers(path, config)`.

  Raises:
    CheckpointError: naming the file if it is missing, unreadable, made for
      another target, names bad feature layers, or holds missing or misshapen
      tensors.
  """
  path = pathlib.Path(path)
  metadata, tensors = _open(path, config, with_tensors=True)
  layers = _layers(path, metadata, config)
  ids = tensors.pop(VOCABULARY_IDS, None)
  not_bf16 = sorted(name for name, value in tensors.items() if value.dtype != np.uint16)
  if metadata.get("dtype") != "bfloat16" or not_bf16:
    raise CheckpointError(f"{path} does not hold bf16 drafter tensors (as save_drafter writes "
                          f"them): {not_bf16[:3] or metadata.get('dtype')}")
  expected = traverse_util.flatten_dict(
      jax.eval_shape(lambda: init_params(config, jax.random.key(0), dtype, len(layers)))["params"],
      sep=".")
  wrong = sorted(set(expected) ^ set(tensors)) + [
      f"{name} {tensors[name].shape} != {expected[name].shape}"
      for name in sorted(set(expected) & set(tensors))
      if tensors[name].shape != expected[name].shape]
  if wrong:
    raise CheckpointError(f"{path} does not hold the drafter for {config.name}: "
                          f"{', '.join(wrong[:5])}")
  params = {name: jnp.asarray(value.view(jnp.bfloat16), dtype) for name, value in tensors.items()}
  params = {"params": traverse_util.unflatten_dict(params, sep=".")}
  if ids is None:
    return params
  if (ids.dtype != np.int32 or ids.ndim != 1 or not ids.size or np.any(np.diff(ids) <= 0)
      or ids[0] < 0 or ids[-1] >= config.vocab_size):
    raise CheckpointError(f"{path}: {VOCABULARY_IDS} must be sorted distinct int32 token ids "
                          f"in [0, {config.vocab_size}), got {ids.dtype} {ids.shape}")
  return restrict_vocabulary(params, target_params, ids)

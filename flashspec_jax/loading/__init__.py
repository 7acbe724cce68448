"""Finding and loading weights and tokenizers for a configured model."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from flashspec_jax import sharding
from flashspec_jax.environment import REPO
from flashspec_jax.loading.gguf import config_from_gguf, load_gguf_checkpoint, smollm2_path
from flashspec_jax.loading.hf import load_hf_checkpoint, load_hf_config
from flashspec_jax.loading.params import CheckpointError
from flashspec_jax.loading.tokenizer import load_tokenizer
from flashspec_jax.models.config import CONFIGS_DIR, LlamaConfig, model_config
from flashspec_jax.models.llama import init_params

CHECKPOINTS_DIR = REPO / "checkpoints"
EMBEDDED_MODEL = "smollm2_135m"
TARGET_FLAG = "--config.checkpoint_dir"
# What must agree between a checkpoint and the shape it is loaded as: the tensor shapes.
SHAPE_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                "head_dim", "vocab_size")


@dataclasses.dataclass
class LoadedModel:
  config: LlamaConfig
  params: Any
  tokenizer: Any  # None for synthetic weights and draft models
  synthetic: bool
  source: str

  @property
  def dtype(self) -> jnp.dtype:
    return jax.tree.leaves(self.params)[0].dtype


def default_checkpoint(name: str) -> pathlib.Path:
  """Where weights for the shipped shape `name` are looked for when none are given."""
  return smollm2_path() if name == EMBEDDED_MODEL else CHECKPOINTS_DIR / name


def check_checkpoint(name: str, checkpoint: str = "", flag: str = TARGET_FLAG) -> pathlib.Path:
  """The checkpoint for the shape `name` (`checkpoint`, else its default place), checked to
  exist and to have that shape.

  Reads only config.json or the GGUF header (whose parse load_model then reuses), so it
  can vet the target and every draft model before any weights are loaded. `flag` is the
  setting that names `checkpoint`, for the error messages.
  """
  expected = model_config(name)
  path = pathlib.Path(checkpoint) if checkpoint else default_checkpoint(name)
  if not path.exists():
    hub_name = json.loads((CONFIGS_DIR / f"{name}.json").read_text()).get("_name_or_path", name)
    # The flag's own prefix (run.py's --config. or the API's FlashSpecConfig.) names the
    # setting that does without weights.
    synthetic = f"{flag.rpartition('.')[0]}.synthetic_weights=True"
    raise CheckpointError(
        f"no weights for {name!r}: looked in {path}. Put the Hugging Face checkpoint of "
        f"{hub_name} there (config.json, *.safetensors, and for a target tokenizer.json), "
        f"or pass {flag}=/path/to/it.\nTo measure speed without weights, set {synthetic}.")
  if path.suffix == ".gguf":
    found, source = config_from_gguf(path), path
  else:
    found, source = load_hf_config(path), path / "config.json"
  differences = [f"{field} {getattr(found, field)} != {getattr(expected, field)}"
                 for field in SHAPE_FIELDS if getattr(found, field) != getattr(expected, field)]
  if differences:
    raise CheckpointError(
        f"checkpoint {source} does not match the shape {name}: {', '.join(differences)} "
        f"(point {flag} at weights of that shape, or choose the configs/ shape these have)")
  return path


def load_model(name: str, checkpoint: str = "", synthetic: bool = False,
               dtype: Any = jnp.bfloat16, seed: int = 0, mesh: Mesh | None = None,
               with_tokenizer: bool = True) -> LoadedModel:
  """Loads the model `name` (a shape in configs/) from `checkpoint` or its default place,
  after `check_checkpoint(name, checkpoint)`; front ends that name their own flag in
  its errors check first (pipeline.check_checkpoints).

  With `synthetic`, the weights are random (for speed measurements only). With a
  tensor-parallel mesh, the weights land in their shards (sharding.py). Without
  `with_tokenizer` (a draft model, which reads the target's token ids), its tokenizer
  is None and its checkpoint needs none.
  """
  if synthetic:
    config = sharding.sharded_config(model_config(name), sharding.degree(mesh))
    params = init_params(config, jax.random.key(seed), dtype, mesh)
    return LoadedModel(config, params, None, True, f"synthetic random weights, {name} shape")
  path = check_checkpoint(name, checkpoint)
  logging.info("loading %s from %s", name, path)
  load = load_gguf_checkpoint if path.suffix == ".gguf" else load_hf_checkpoint
  config, params = load(path, dtype, mesh)
  tokenizer = load_tokenizer(path) if with_tokenizer else None
  return LoadedModel(dataclasses.replace(config, name=name), params, tokenizer, False, str(path))


__all__ = ["CheckpointError", "LoadedModel", "check_checkpoint", "load_model",
           "default_checkpoint"]

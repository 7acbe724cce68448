"""Finding and loading weights and tokenizers for a configured model."""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from flashspec_jax.environment import REPO
from flashspec_jax.loading.gguf import load_gguf_checkpoint, read_gguf, smollm2_path
from flashspec_jax.loading.hf import load_hf_checkpoint
from flashspec_jax.loading.params import CheckpointError
from flashspec_jax.loading.tokenizer import load_tokenizer
from flashspec_jax.models.config import CONFIGS_DIR, LlamaConfig, model_config
from flashspec_jax.models.llama import init_params

CHECKPOINTS_DIR = REPO / "checkpoints"
EMBEDDED_MODEL = "smollm2_135m"


@dataclasses.dataclass
class LoadedModel:
  config: LlamaConfig
  params: Any
  tokenizer: Any  # None for synthetic weights
  synthetic: bool
  source: str

  @property
  def dtype(self) -> jnp.dtype:
    return jax.tree.leaves(self.params)[0].dtype


def default_checkpoint(name: str) -> pathlib.Path:
  """Where weights for the shipped shape `name` are looked for when none are given."""
  return smollm2_path() if name == EMBEDDED_MODEL else CHECKPOINTS_DIR / name


def load_model(name: str, checkpoint: str = "", synthetic: bool = False,
               dtype: Any = jnp.bfloat16, seed: int = 0) -> LoadedModel:
  """Loads the model `name` (a shape in configs/) from `checkpoint` or its default place.

  With `synthetic`, the weights are random (for speed measurements only).
  """
  if synthetic:
    config = model_config(name)
    params = init_params(config, jax.random.key(seed), dtype)
    return LoadedModel(config, params, None, True, f"synthetic random weights, {name} shape")
  path = pathlib.Path(checkpoint) if checkpoint else default_checkpoint(name)
  if not path.exists():
    hub_name = json.loads((CONFIGS_DIR / f"{name}.json").read_text()).get("_name_or_path", name)
    raise CheckpointError(
        f"no weights for {name!r}: looked in {path}.\n"
        f"Put the Hugging Face checkpoint of {hub_name} there (config.json, *.safetensors, "
        f"tokenizer.json), or pass --config.checkpoint_dir=/path/to/it.\n"
        f"To measure speed without weights, add --config.synthetic_weights=True.")
  logging.info("loading %s from %s", name, path)
  if path.suffix == ".gguf":
    reader = read_gguf(path)
    config, params = load_gguf_checkpoint(path, dtype, reader)
    tokenizer = load_tokenizer(path, reader)
  else:
    config, params = load_hf_checkpoint(path, dtype)
    tokenizer = load_tokenizer(path)
  return LoadedModel(dataclasses.replace(config, name=name), params, tokenizer, False, str(path))


__all__ = ["CheckpointError", "LoadedModel", "load_model", "default_checkpoint"]

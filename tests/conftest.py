"""Shared fixtures. Everything runs on the CPU in f32 unless a test says otherwise."""

import logging
import os
import pathlib

# Tests, both xdist workers and the processes tests start (run.py, notebook
# kernels) compile many identical programs, since the runner clears JAX's
# in-memory caches after each method; a shared on-disk cache compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
# On a GPU every xdist worker (and every process a test starts) would otherwise take 75%
# of the device's memory up front, and the later ones fail. Growing on demand is not
# enough alone: XLA keeps what it has grown to, so each worker is also capped at its
# share, leaving a tenth of the device for the CUDA contexts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                      f"{0.9 / int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')):.3f}")

import jax  # noqa: E402 (after the variables above are set)
import jax.numpy as jnp
import pytest

from flashspec_jax.models.config import LlamaConfig
from flashspec_jax.models.llama import init_params

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_config(**overrides) -> LlamaConfig:
  fields = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                num_kv_heads=2, head_dim=8, max_position_embeddings=256, eos_token_ids=())
  return LlamaConfig(**(fields | overrides))


def spread_params(config: LlamaConfig, seed: int, scale: float = 4.0):
  """Random f32 weights scaled up so that a tiny model's next-token distribution is not flat."""
  params = init_params(config, jax.random.key(seed), jnp.float32)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if "norm" in jax.tree_util.keystr(path) else x * scale, params)


def pytest_collection_modifyitems(items):
  """The longest tests (experiments and notebooks, runs of the real SmolLM2) first:
  pytest-xdist hands tests out in this order, so on two workers they overlap the many
  short ones instead of trailing after them."""
  def long_first(item):
    return not (item.path.name == "test_experiments.py"
                or "smollm2" in getattr(item, "fixturenames", ()))
  items.sort(key=long_first)


@pytest.fixture(scope="session")
def smollm2():
  """(config, f32 params, tokenizer) of the real SmolLM2-135M-Instruct GGUF."""
  from flashspec_jax.loading import load_model
  model = load_model("smollm2_135m", dtype=jnp.float32)
  return model.config, model.params, model.tokenizer


def run_as_one_program(caplog, fn, *args, **kwargs):
  """Runs fn from a cold cache with host transfers disallowed; asserts one compilation."""
  jax.clear_caches()
  with caplog.at_level(logging.WARNING), jax.log_compiles(), jax.transfer_guard("disallow"):
    out = jax.block_until_ready(fn(*args, **kwargs))
  compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert len(compiles) == 1 and fn.__name__ in compiles[0], compiles
  return out

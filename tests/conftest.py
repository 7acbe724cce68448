"""Shared fixtures. Everything runs on the CPU in f32 unless a test says otherwise."""

import importlib.metadata
import logging
import os
import pathlib

# Tests, both xdist workers and the processes tests start (run.py, notebook
# kernels), compile many identical programs, each in its own process; a shared
# on-disk cache compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"))
# Every program, not only those that took a second to compile (JAX's default): compiling
# is most of the suite's time on two cores, and the workers compile many of the same
# short programs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# On a GPU every xdist worker (and every process a test starts) would otherwise take 75%
# of the device's memory up front, and the later ones fail. Growing on demand is not
# enough alone: XLA keeps what it has grown to, so each worker is also capped at its
# share, leaving a tenth of the device for the CUDA contexts.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                      f"{0.9 / int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1')):.3f}")

# Eight CPU devices for the tensor-parallel tests (tests/test_tensor_parallel.py); every
# other test runs on the first, as it would alone. CPU programs compile without XLA's
# MLIR fusion emitters, where perf found the largest part of a chooser program's compile: the
# older emitter's code runs the real-model tests slower, but the time it saves
# compiling is more. GPU programs compile as before.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"] +
    # jaxlib 0.11 no longer has the option, and exits at the first use of XLA if asked for it.
    (["--xla_cpu_use_fusion_emitters=false"]
     if importlib.metadata.version("jaxlib").startswith("0.10.") else [])).strip()

import jax  # noqa: E402 (after the variables above are set)
import jax.numpy as jnp
import pytest
from absl import flags

from flashspec_jax.models.config import LlamaConfig
from flashspec_jax.models.llama import init_params

jax.config.update("jax_default_matmul_precision", "highest")

# On a CPU most of the suite's time goes to XLA compiling hundreds of programs, each run
# once or twice, and most of that to LLVM optimising their code. The tests check what
# the programs compute, which that optimisation leaves alone (XLA's CPU code keeps IEEE
# arithmetic: no fast math), not how fast they run, and the suite passes either way.
# The variable carries the setting to the processes tests start (run.py, notebook
# kernels). On a GPU everything compiles as users' runs do.
if jax.default_backend() == "cpu":
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  jax.config.update("jax_disable_most_optimizations", True)


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


@pytest.fixture(autouse=True)
def forget_flags_the_test_defined():
  """The bench modules define absl flags on import, some of the same name (--out,
  --batch), so a test that imports one would make another test in the same xdist
  worker fail to import the next."""
  before = set(flags.FLAGS)
  yield
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)


@pytest.fixture(scope="session")
def smollm2():
  """(config, f32 params, tokenizer) of the real SmolLM2-135M-Instruct GGUF."""
  from flashspec_jax.loading import load_model
  model = load_model("smollm2_135m", dtype=jnp.float32)
  return model.config, model.params, model.tokenizer


@pytest.fixture(scope="session")
def smollm2_heldout(smollm2):
  """Five held-out prompts (three chat, two code) as token ids, and SmolLM2's greedy f32
  answers of 128 tokens [5, 128]: the AR reference the exactness tests on real text
  share, computed once per worker."""
  from flashspec_jax.generate import Decoder, run_generate
  from flashspec_jax.loading.tokenizer import encode_chat
  from flashspec_jax.models.llama import Llama
  from flashspec_jax.prompts import load_prompts
  from flashspec_jax.sampling import Greedy
  config, params, tokenizer = smollm2
  ids = encode_chat(tokenizer, [p.conversation for kind in ("chat", "code")
                                for p in load_prompts(kind, 3, "heldout")][:5])
  ar = run_generate(params, Decoder(Llama(config, param_dtype=jnp.float32), 128, eos_ids=()),
                    ids, jax.random.key(0), Greedy())
  return ids, ar.tokens


def run_as_one_program(caplog, fn, *args, **kwargs):
  """Runs fn from a cold cache with host transfers disallowed; asserts one compilation."""
  jax.clear_caches()
  with caplog.at_level(logging.WARNING), jax.log_compiles(), jax.transfer_guard("disallow"):
    out = jax.block_until_ready(fn(*args, **kwargs))
  compiles = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
  assert len(compiles) == 1 and fn.__name__ in compiles[0], compiles
  return out

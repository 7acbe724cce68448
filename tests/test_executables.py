"""The program store: a stored program loads without tracing and runs as compiled, and
its key tells apart everything that changes the program."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import with_fields

from flashspec_jax import config as config_lib
from flashspec_jax import executables, pipeline, runner, sharding
from flashspec_jax.loading import load_model


@pytest.fixture
def store(tmp_path):
  """JAX's cache, and so the store beside it, in a fresh folder for the test."""
  saved = jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(tmp_path))
  yield tmp_path / "flashspec_programs"
  jax.config.update("jax_enable_compilation_cache", saved[0])
  jax.config.update("jax_compilation_cache_dir", saved[1])


def tiny(methods="ngram:2,layer_skip:2", **overrides):
  """A bandit method's pieces on the tiny shape: (method, a Setup maker, the requests)."""
  config = with_fields(config_lib.base_config(), target="tiny_llama", synthetic_weights=True,
                       methods="bandit:ucb1", arms=methods, **overrides)
  config.bandit.costs = ",".join("1" for _ in config_lib.split_list(methods))
  config.sampling.max_new_tokens = 6
  model = load_model(config.target, synthetic=True, dtype=jnp.float32, seed=config.seed,
                     mesh=sharding.mesh_for(config.mesh))
  (method,), params = pipeline.build_methods(config, model, jnp.float32)
  return method, (lambda: pipeline.make_setup(config, model, params, jnp.float32)), \
      runner.build_requests(config, model)


# A process that builds the tiny programs (one device, and tp 2), runs them through the
# pipeline and prints what it saw; "untraced" makes tracing fail, "ahead" too and loads
# through compile_ahead first, "twice" runs each program from two fresh Setups.
PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flashspec_jax import config as config_lib, engine, pipeline, runner, sharding
from flashspec_jax.loading import load_model
if sys.argv[1] in ("untraced", "ahead"):
  def never_traced(*args):
    raise AssertionError("a stored program was traced again")
  engine.SpeculativeDecoder.lower = never_traced
out = {}
for mesh in ("", "tp:2"):
  config = config_lib.base_config()
  config.target, config.synthetic_weights, config.mesh = "tiny_llama", True, mesh
  config.methods, config.arms, config.bandit.costs = "bandit:ucb1", "ngram:2,layer_skip:2", "1,1"
  config.sampling.max_new_tokens = 6
  model = load_model(config.target, synthetic=True, dtype=jnp.float32, seed=0,
                     mesh=sharding.mesh_for(mesh))
  (method,), params = pipeline.build_methods(config, model, jnp.float32)
  requests = runner.build_requests(config, model)
  for _ in range(2 if sys.argv[1] == "twice" else 1):  # the second: JAX's copy in memory
    setup = pipeline.make_setup(config, model, params, jnp.float32)
    if sys.argv[1] == "ahead":
      pipeline.compile_ahead([(method, requests)], setup, threads=2)
    run = pipeline.compile_and_run(method, setup, requests, jax.random.key(0))
  # The next call takes the bandit's state donated, from a loaded program too.
  handed = run.output.bandit
  pipeline.compile_and_run(method, setup, requests, jax.random.key(1), handed)
  out[mesh] = dict(lower_seconds=run.lower_seconds, tokens=np.asarray(run.output.tokens).tolist(),
                   donated=all(leaf.is_deleted() for leaf in jax.tree.leaves(handed)))
print(json.dumps(out))
"""


def probe(cache_dir, mode="run"):
  # JAX writes every program to its cache, however fast it compiled, as a run does.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache_dir), JAX_PLATFORMS="cpu",
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  run = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True,
                       text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  return json.loads(run.stdout.splitlines()[-1]), run.stderr


def test_a_stored_program_loads_untraced_in_a_new_process_and_runs_as_compiled(tmp_path):
  """Each process has a fresh JAX: a program compiled in the first is stored; the next
  two load it without tracing (through compile_and_run, then compile_ahead), and it
  takes the bandit's state donated as the compiled program does; the last finds the
  files damaged, says so, removes them and compiles again, twice, and stores
  nothing: JAX now gives it the programs from its own cache, and the second time from
  memory, whose executables would not run once serialized again."""
  store = tmp_path / "flashspec_programs"
  compiled, _ = probe(tmp_path)
  assert all(run["lower_seconds"] > 0 and run["donated"] for run in compiled.values())
  assert len(list(store.iterdir())) == 2

  for mode in ("untraced", "ahead"):
    loaded, _ = probe(tmp_path, mode)
    for mesh in compiled:
      assert loaded[mesh]["lower_seconds"] == 0 and loaded[mesh]["donated"]
      assert loaded[mesh]["tokens"] == compiled[mesh]["tokens"]

  for path in store.iterdir():
    path.write_bytes(b"not a program")
  again, log = probe(tmp_path, "twice")
  assert log.count("is unreadable") == 2 and not list(store.iterdir())
  for mesh in compiled:
    assert again[mesh]["lower_seconds"] > 0
    assert again[mesh]["tokens"] == compiled[mesh]["tokens"]


def test_the_key_is_the_program(store):
  method, new_setup, batch = tiny()

  def key(method=method, setup=None, batch=batch, options=None):
    decoder, inputs, _ = pipeline._program(method, setup or new_setup(), batch,
                                           jax.random.key(0))
    return executables.program_key(decoder, inputs, options)

  same = key()
  assert key() == same  # new objects at new addresses, one program
  longer = dataclasses.replace(batch[0], token_ids=batch[0].token_ids * 4)
  changed = [key(batch=[longer]), key(batch=batch * 2),
             key(options={"xla_backend_optimization_level": 1}),
             key(method=dataclasses.replace(method, arms=method.arms[:1])),
             key(setup=dataclasses.replace(new_setup(), max_new_tokens=7)),
             key(setup=dataclasses.replace(new_setup(), pass_width=5))]
  partitionable = jax.config.jax_threefry_partitionable
  jax.config.update("jax_threefry_partitionable", not partitionable)  # other random bits
  try:
    changed.append(key())
  finally:
    jax.config.update("jax_threefry_partitionable", partitionable)
  assert same not in changed and len(set(changed)) == len(changed)


def test_nothing_is_stored_with_the_cache_off(store):
  jax.config.update("jax_enable_compilation_cache", False)
  method, new_setup, batch = tiny("ngram:2")
  pipeline.compile_and_run(method, new_setup(), batch, jax.random.key(0))
  assert not store.exists()


def test_the_compile_time_bench_loads_each_program_untraced_and_profiles_its_compile(tmp_path):
  """bench.compile_time, profiled, on the tiny shape: a second process loads each of the
  three programs from the store and generates the first's tokens; each call's host
  spans are summed by name, the cold compile's naming XLA's own."""
  run = subprocess.run(
      [sys.executable, "-m", "flashspec_jax.bench.compile_time", "--target=tiny_llama",
       "--arms=ngram:2,ar", "--prompt_length=10", "--max_new_tokens=6", "--profile",
       "--variants=default", f"--out={tmp_path}"], capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr
  (path,) = (tmp_path / "compile_time").glob("*.json")
  result = json.loads(path.read_text())
  assert result["profiled"]
  assert [row["method"] for row in result["rows"]] == ["ar", "ngram:2", "bandit:ucb1"]
  for row in result["rows"]:
    assert row["cached_untraced"] and row["cached_same_tokens"], row["method"]
    assert row["compiles_with_warm_cache"] == 0, row["method"]
    cold = row["cold_host_profile"]
    # XLA's compile spans are named by backend (the CPU's PjRtCpuClient::Compile, the
    # GPU's PjRtStreamExecutorClient::CompileInternal and CompileModuleToLlvmIr).
    assert cold["threads"] >= 1 and any("Compile" in span for span in cold["inclusive_seconds"])
    assert all(seconds >= 0 for seconds in cold["self_seconds"].values())
    assert row["cached_host_profile"]["threads"] >= 1
    # Profiled, the lowering is timed with the compile, not as 0 s of its own.
    assert row["cold_lower_seconds"] is None and row["cold_compile_seconds"] > 0

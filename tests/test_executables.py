"""The program store: a stored program loads without tracing and runs as compiled, and
its key tells apart everything that changes the program."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import with_fields

from flashspec_jax import config as config_lib
from flashspec_jax import engine, executables, pipeline, runner, sharding
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
  config = with_fields(config_lib.base_config(), target="tiny_llama", synthetic_weights=True,
                       methods="bandit:ucb1", arms=methods, **overrides)
  config.bandit.costs = ",".join("1" for _ in config_lib.split_list(methods))
  config.sampling.max_new_tokens = 6
  model = load_model(config.target, synthetic=True, dtype=jnp.float32, seed=config.seed,
                     mesh=sharding.mesh_for(config.mesh))
  (method,), params = pipeline.build_methods(config, model, jnp.float32)
  return method, (lambda: pipeline.make_setup(config, model, params, jnp.float32)), \
      runner.build_requests(config, model)


def never_traced(*args):
  raise AssertionError("a stored program was traced again")


@pytest.mark.parametrize("mesh", ["", "tp:2"])
def test_a_stored_program_runs_as_compiled_without_tracing(store, monkeypatch, mesh):
  method, new_setup, batch = tiny(mesh=mesh)
  compiled = pipeline.compile_and_run(method, new_setup(), batch, jax.random.key(0))
  assert compiled.lower_seconds > 0 and len(list(store.iterdir())) == 1
  monkeypatch.setattr(engine.SpeculativeDecoder, "lower", never_traced)
  loaded = pipeline.compile_and_run(method, new_setup(), batch, jax.random.key(0))
  assert loaded.lower_seconds == 0
  np.testing.assert_array_equal(loaded.output.tokens, compiled.output.tokens)
  np.testing.assert_array_equal(loaded.output.metrics.accepted,
                                compiled.output.metrics.accepted)
  # compile_ahead reads the store too.
  ahead = new_setup()
  pipeline.compile_ahead([(method, batch)], ahead, threads=1)
  assert len(ahead.programs) == 1


def test_the_key_is_the_program(store):
  method, new_setup, batch = tiny()

  def key(method=method, setup=None, batch=batch, options=None):
    decoder, inputs, _ = pipeline._program(method, setup or new_setup(), batch,
                                           jax.random.key(0))
    return executables.program_key(decoder, inputs, options)

  same = key()
  assert key() == same  # new objects at new addresses, one program
  longer = dataclasses.replace(batch[0], token_ids=batch[0].token_ids * 4)
  changed = [key(batch=[longer]), key(batch=batch * 2), key(options={"xla_backend_optimization_level": 1}),
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


def test_a_damaged_file_is_compiled_again(store, caplog):
  method, new_setup, batch = tiny()
  first = pipeline.compile_and_run(method, new_setup(), batch, jax.random.key(0))
  (path,) = store.iterdir()
  path.write_bytes(b"not a program")
  with caplog.at_level(logging.WARNING):
    again = pipeline.compile_and_run(method, new_setup(), batch, jax.random.key(0))
  assert again.lower_seconds > 0 and "did not load" in caplog.text
  np.testing.assert_array_equal(again.output.tokens, first.output.tokens)
  assert pipeline.compile_and_run(method, new_setup(), batch,
                                  jax.random.key(0)).lower_seconds == 0


def test_nothing_is_stored_with_the_cache_off(store):
  jax.config.update("jax_enable_compilation_cache", False)
  method, new_setup, batch = tiny("ngram:2")
  pipeline.compile_and_run(method, new_setup(), batch, jax.random.key(0))
  assert not store.exists()

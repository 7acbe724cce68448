"""AR generation: correctness against a full recompute, EOS, budgets, one program."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_as_one_program, spread_params, tiny_config

from flashspec_jax import generate as gen
from flashspec_jax.bench import numerics
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Greedy, Temperature, TopP
from flashspec_jax.sequences import PAD_ID, prepare_prompts

CONFIG = tiny_config()
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [1]]


@pytest.fixture(scope="module")
def params():
  return spread_params(CONFIG, seed=0)


def assert_greedy(params, config, prompt, generated):
  """Each generated token is the argmax after its prefix, checked by one uncached forward."""
  model = Llama(config, param_dtype=jnp.float32)
  seq = list(prompt) + list(generated)
  logits, _ = model.apply(params, jnp.asarray([seq]), KVCache.init(config, 1, len(seq),
                                                                  jnp.float32))
  expected = jnp.argmax(logits[0, len(prompt) - 1:-1], axis=-1)
  assert list(generated) == expected.tolist()


def run(params, prompts=PROMPTS, config=CONFIG, sampler=Greedy(), max_new_tokens=12,
        rng=jax.random.key(0), eos_ids=None, cache_capacity=None):
  decoder = gen.Decoder(Llama(config, param_dtype=jnp.float32), max_new_tokens, eos_ids,
                        cache_capacity)
  return gen.run_generate(params, decoder, prompts, rng, sampler)


def test_greedy_matches_full_recompute_for_ragged_batch(params):
  out = run(params)
  assert out.tokens.shape == (3, 12)
  np.testing.assert_array_equal(out.num_tokens, [12, 12, 12])
  for row, prompt in enumerate(PROMPTS):
    assert_greedy(params, CONFIG, prompt, out.tokens[row].tolist())


def test_rows_do_not_depend_on_their_batch_mates(params):
  batched = run(params)
  for row, prompt in enumerate(PROMPTS):
    assert run(params, [prompt]).tokens[0].tolist() == batched.tokens[row].tolist()


def test_per_row_eos_stops_only_that_row(params):
  free = run(params).tokens
  eos = int(free[1, 4])
  first_hit = [int(np.argmax(row == eos)) + 1 if (row == eos).any() else 12 for row in free]
  out = run(params, eos_ids=(eos,))
  np.testing.assert_array_equal(out.num_tokens, first_hit)
  for row, n in enumerate(first_hit):
    assert out.tokens[row, :n].tolist() == free[row, :n].tolist()
    assert (out.tokens[row, n:] == PAD_ID).all()


@pytest.mark.parametrize("max_new_tokens", [1, 2, 7])
def test_exact_max_new_tokens(params, max_new_tokens):
  out = run(params, max_new_tokens=max_new_tokens)
  assert out.tokens.shape == (3, max_new_tokens)
  np.testing.assert_array_equal(out.num_tokens, max_new_tokens)


def test_stream_yields_the_same_tokens_as_generate(params):
  out = run(params, max_new_tokens=6, sampler=TopP(0.9), rng=jax.random.key(3))
  decoder = gen.Decoder(Llama(CONFIG, param_dtype=jnp.float32), 6)
  steps = list(gen.stream(params, decoder, PROMPTS, jax.random.key(3), TopP(0.9)))
  np.testing.assert_array_equal(np.stack(steps, axis=1), out.tokens)


def test_generate_is_one_program_without_host_transfers(params, caplog):
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  args = jax.device_put((params, tokens, lengths, jax.random.key(0), Temperature(0.7)))
  decoder = gen.Decoder(Llama(CONFIG, param_dtype=jnp.float32), 9, eos_ids=(3,),
                        capacity=tokens.shape[1] + 9)

  hlo = decoder.lower(*args).compile().as_text()
  assert re.search(r"= .* while\(", hlo), "the decode loop should be an XLA while loop"
  for host_op in (r"\boutfeed\(", r"\binfeed\(", r"\bsend\(", r"\brecv\(", "callback"):
    assert not re.search(host_op, hlo), host_op

  out = run_as_one_program(caplog, decoder.generate, *args)
  assert int(out.steps) <= 9


def test_nan_logits_are_reported_not_sampled(params):
  poisoned = jax.tree.map(lambda x: x, params)
  poisoned["params"]["final_norm"]["scale"] = jnp.full_like(
      params["params"]["final_norm"]["scale"], jnp.nan)
  with pytest.raises(FloatingPointError, match="NaN logits for rows \\[0, 1, 2\\]"):
    run(poisoned)


@pytest.mark.parametrize("prompts, match", [
    ([[1, 2], []], "prompts \\[1\\] are empty"),
    ([], "no prompts"),
    ([[1, 64]], "outside the vocabulary"),
    ([[-1, 3]], "outside the vocabulary"),
])
def test_bad_prompts_are_rejected(params, prompts, match):
  with pytest.raises(ValueError, match=match):
    run(params, prompts)


def test_budget_beyond_cache_is_rejected(params):
  with pytest.raises(ValueError, match="exceeds the KV cache capacity of 16"):
    run(params, max_new_tokens=12, cache_capacity=16)
  with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
    run(params, max_new_tokens=250)
  with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
    run(params, max_new_tokens=0)


def test_numerics_bench_finds_decode_and_verify_paths_equal_in_float32():
  """bench.numerics compares decode steps and verify passes with the f32 model; run in
  f32 itself, both paths agree with it: the bench measures precision, not its own error."""
  result = numerics.bench("tiny_llama", False, jnp.float32, 3, (8, 4))
  for path in ("decode", "verify", "decode_vs_verify"):
    assert result[path]["max_abs_error"] < 1e-3 and result[path]["argmax_flips"] == 0, result
  low = numerics.bench("tiny_llama", False, jnp.bfloat16, 3, (8, 4))
  assert low["decode"]["max_abs_error"] > 0  # bf16 does differ: the comparison sees it

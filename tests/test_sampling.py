"""Samplers: the processed distributions they define, and the settings they refuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flashspec_jax.sampling import Greedy, Samplers, Temperature, TopK, TopP, make_sampler

LOGITS = jnp.log(jnp.array([[0.5, 0.2, 0.15, 0.1, 0.05]]))


def probs(sampler):
  return np.exp(np.asarray(sampler.log_probs(LOGITS)))[0]


def test_greedy_is_the_point_mass_at_the_argmax():
  np.testing.assert_array_equal(probs(Greedy()), [1, 0, 0, 0, 0])
  assert int(Greedy().get_next_tokens(LOGITS, None)[0]) == 0


def test_temperature_rescales_the_logits():
  np.testing.assert_allclose(probs(Temperature(1.0)), [0.5, 0.2, 0.15, 0.1, 0.05], rtol=1e-6)
  hot = np.array([0.5, 0.2, 0.15, 0.1, 0.05]) ** 0.5
  np.testing.assert_allclose(probs(Temperature(2.0)), hot / hot.sum(), rtol=1e-6)


def test_top_k_keeps_the_k_most_likely_renormalised():
  np.testing.assert_allclose(probs(TopK(2)), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0], rtol=1e-6)


def test_top_p_keeps_the_smallest_set_that_reaches_p():
  # 0.5 + 0.2 = 0.7 < 0.8, so the third token is needed too.
  np.testing.assert_allclose(probs(TopP(0.8)), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0],
                             rtol=1e-6)
  np.testing.assert_allclose(probs(TopP(0.5)), [1, 0, 0, 0, 0], rtol=1e-6)


def test_stochastic_samplers_draw_from_their_distribution():
  keys = jax.random.split(jax.random.key(0), 20_000)
  draws = jax.vmap(lambda key: TopK(3).get_next_tokens(LOGITS, key)[0])(keys)
  counts = np.bincount(np.asarray(draws), minlength=5) / len(keys)
  np.testing.assert_allclose(counts, probs(TopK(3)), atol=0.015)


def test_samplers_are_pytrees_so_a_new_temperature_does_not_retrace():
  traces = []

  @jax.jit
  def log_probs(samplers, logits):
    traces.append(1)
    return samplers.target.log_probs(logits)

  log_probs(Samplers.same(Temperature(1.0)), LOGITS)
  log_probs(Samplers.same(Temperature(0.5)), LOGITS)
  assert len(traces) == 1


@pytest.mark.parametrize("build, match", [
    (lambda: make_sampler(temperature=-0.5), "temperature must be >= 0"),
    (lambda: make_sampler(temperature=1.0, top_p=0.0), "top_p must be in \\(0, 1\\]"),
    (lambda: make_sampler(temperature=1.0, top_p=1.5), "top_p must be in \\(0, 1\\]"),
    (lambda: TopP(1.2), "top-p must be in \\(0, 1\\]"),
    (lambda: Temperature(0.0), "use Greedy\\(\\) for temperature 0"),
    (lambda: TopK(0), "top-k needs k >= 1"),
])
def test_bad_sampling_settings_are_rejected(build, match):
  with pytest.raises(ValueError, match=match):
    build()

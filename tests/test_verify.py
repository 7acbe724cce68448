"""One suite for every verify implementation: the jnp reference, the Pallas kernel in
interpret mode (CPU) and the Pallas kernel on a GPU (skipped without one).

Given the same seeds every implementation must return exactly what the
reference returns; Pallas outputs start poisoned, so an unwritten element
shows. The engine's exactness tests then run with the kernel in the loop.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from exactness import exact_probs, params, program_pvalues  # noqa: F401 (fixtures)

from flashspec_jax.kernels.verify import (PALLAS_GPU_AVAILABLE, VerifyTiling, get_verify_fn,
                                          uniform_from_bits, uniform_from_hash,
                                          verify_kernel_call, verify_pallas, verify_reference,
                                          verify_where_lowered)
from flashspec_jax.sampling import Temperature, TopK, TopP

POISON = -7


@functools.cache
def jitted(fn, **static):
  """fn jitted with its static arguments bound. Run eagerly, each of its many small ops
  compiles on its own, which made these tests several times slower on CPU."""
  return jax.jit(functools.partial(fn, **static))


reference = jitted(verify_reference)


def random_inputs(seed, batch, gamma, vocab, scale=3.0, drafts_from="q"):
  k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
  logp = jax.nn.log_softmax(scale * jax.random.normal(k1, (batch, gamma + 1, vocab)), axis=-1)
  logq = jax.nn.log_softmax(scale * jax.random.normal(k2, (batch, gamma, vocab)), axis=-1)
  source = logq if drafts_from == "q" else logp[:, :gamma]
  tokens = jax.random.categorical(k3, source).astype(jnp.int32)
  return logp, logq, tokens, jax.random.bits(k4, (batch,), jnp.uint32)


class TestReference:
  """The suite; subclasses swap the implementation."""

  IMPL = "reference"
  # Small tiles and several programs per row, so that tests cross tiles and shares.
  TILING = VerifyTiling(block_v=16, splits=3)

  def verify(self, *args):
    if self.IMPL == "reference":
      return reference(*args)
    return jitted(verify_pallas, tiling=self.TILING,
                  interpret=self.IMPL == "pallas_interpret")(*args)

  def check_matches_reference(self, *args):
    if self.IMPL != "reference":
      raw = jitted(verify_kernel_call, tiling=self.TILING,
                   interpret=self.IMPL == "pallas_interpret", poison=POISON)(args)
      for output in raw:
        assert (np.asarray(output) != POISON).all(), "the kernel left an output unwritten"
    num_accepted, next_token = map(np.asarray, self.verify(*args))
    expected_accepted, expected_next = map(np.asarray, reference(*args))
    np.testing.assert_array_equal(num_accepted, expected_accepted)
    np.testing.assert_array_equal(next_token, expected_next)
    return num_accepted, next_token

  @pytest.mark.parametrize("batch, gamma, vocab", [
      (1, 4, 128), (3, 1, 37), (4, 16, 100), (2, 8, 64), (5, 2, 257)])
  def test_matches_reference_on_fresh_inputs(self, batch, gamma, vocab):
    for seed in range(3):
      self.check_matches_reference(*random_inputs(seed * 100 + vocab, batch, gamma, vocab))

  @pytest.mark.parametrize("vocab", [33, 95])  # tiles of 32: ragged last tile
  def test_vocab_not_a_multiple_of_the_tile(self, vocab):
    self.check_matches_reference(*random_inputs(vocab, 4, 3, vocab))

  @pytest.mark.parametrize("gamma", [1, 16])
  def test_extreme_gammas(self, gamma):
    self.check_matches_reference(*random_inputs(gamma, 6, gamma, 50))

  def test_p_equal_q_accepts_everything(self):
    logp, _, _, seeds = random_inputs(0, 8, 4, 40)
    tokens = jax.random.categorical(jax.random.key(1), logp[:, :4]).astype(jnp.int32)
    num_accepted, _ = self.check_matches_reference(logp, logp[:, :4], tokens, seeds)
    np.testing.assert_array_equal(num_accepted, 4)

  def test_zero_probabilities(self):
    logp, logq, tokens, seeds = random_inputs(2, 6, 3, 40)
    rows = jnp.arange(6)
    # p(x) = 0 at the first draft of rows 0-2: rejected there, whatever u is.
    logp = logp.at[rows[:3], 0, tokens[:3, 0]].set(-jnp.inf)
    # q(x) = 0 < p(x) at the first draft of rows 3-5: accepted there.
    logq = logq.at[rows[3:], 0, tokens[3:, 0]].set(-jnp.inf)
    num_accepted, _ = self.check_matches_reference(logp, logq, tokens, seeds)
    np.testing.assert_array_equal(num_accepted[:3], 0)
    assert (num_accepted[3:] >= 1).all()

  @pytest.mark.parametrize("sampler", [TopK(3, 1e-3), TopP(0.5, 0.01), TopK(5, 1.0),
                                       Temperature(1e-4)])
  def test_masked_and_near_greedy_distributions(self, sampler):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(7), 4)
    logp = sampler.log_probs(3 * jax.random.normal(k1, (8, 5, 60)))
    logq = TopK(6, 1.0).log_probs(3 * jax.random.normal(k2, (8, 4, 60)))
    tokens = jax.random.categorical(k3, logq).astype(jnp.int32)
    seeds = jax.random.bits(k4, (8,), jnp.uint32)
    num_accepted, next_token = self.check_matches_reference(logp, logq, tokens, seeds)
    # The emitted token lies in the target's support.
    assert np.isfinite(np.asarray(logp)[np.arange(8), num_accepted, next_token]).all()

  @pytest.mark.parametrize("batch", [1, 256])
  def test_batch_extremes(self, batch):
    self.check_matches_reference(*random_inputs(batch, batch, 4, 64))

  def test_single_step_distribution(self):
    """Accepted prefix plus next token, over many seeds, follows p at the first position."""
    logp, logq, _, _ = random_inputs(11, 1, 1, 6, scale=1.0)
    n = 20_000
    logp, logq = jnp.repeat(logp, n, 0), jnp.repeat(logq, n, 0)
    tokens = jax.random.categorical(jax.random.key(12), logq).astype(jnp.int32)
    seeds = jax.random.bits(jax.random.key(13), (n,), jnp.uint32)
    num_accepted, next_token = map(np.asarray, self.verify(logp, logq, tokens, seeds))
    first = np.where(num_accepted >= 1, np.asarray(tokens[:, 0]), next_token)
    expected = np.exp(np.asarray(logp[0, 0], np.float64))
    observed = np.bincount(first, minlength=6) / n
    np.testing.assert_allclose(observed, expected, atol=4 * np.sqrt(0.25 / n))


class TestPallasInterpret(TestReference):
  IMPL = "pallas_interpret"

  # Rejections with top-k masking, nucleus masking at gamma 1, and everything accepted.
  @pytest.mark.parametrize("program", [("small", 4, "top_k", 1), ("small", 1, "top_p", 1),
                                       ("self", 4, "plain", 1)])
  def test_exact_with_the_kernel_in_the_loop(self, params, exact_probs, program):
    """The engine's exactness test with this implementation doing the verification."""
    verify_fn = functools.partial(verify_pallas, tiling=self.TILING,
                                  interpret=self.IMPL == "pallas_interpret")
    # One temperature: the grid covers the others, and the interpreted kernel runs slowly.
    pvalues = program_pvalues(params, exact_probs, program, temperatures=(1.0,),
                              verify_fn=verify_fn)
    for point, p in pvalues.items():
      # Bonferroni over this test's points and both tests.
      assert min(p.values()) > 0.01 / (2 * len(pvalues)), (point, p)


@pytest.mark.skipif(not PALLAS_GPU_AVAILABLE, reason="needs a CUDA GPU for Pallas' Triton lowering")
class TestPallasGpu(TestPallasInterpret):
  IMPL = "pallas"


def test_uniforms_stay_strictly_inside_the_unit_interval():
  u = uniform_from_bits(jnp.array([0, 1, 0x1FF, 0xFFFFFE00, 0xFFFFFFFF], jnp.uint32))
  assert (u > 0).all() and (u < 1).all() and (-jnp.log(u) > 0).all()


def test_hashed_uniforms_look_uniform_and_independent():
  u = np.asarray(uniform_from_hash(jnp.arange(64, dtype=jnp.uint32)[:, None],
                                   jnp.arange(4096, dtype=jnp.uint32)[None, :])).ravel()
  assert stats.chisquare(np.histogram(u, bins=64, range=(0, 1))[0]).pvalue > 1e-3
  assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_tiling_is_validated():
  with pytest.raises(ValueError, match="self.block_v=100 must be a power of two"):
    VerifyTiling(block_v=100)
  with pytest.raises(ValueError, match="self.num_warps=3 must be a power of two"):
    VerifyTiling(num_warps=3)
  with pytest.raises(ValueError, match="self.splits=0 must be >= 1"):
    VerifyTiling(splits=0)


def test_splits_fill_the_gpu_at_small_batch():
  tiling = VerifyTiling(block_v=1024)
  assert tiling.num_splits(batch=1, vocab=128256) == 126  # one tile per program
  assert tiling.num_splits(batch=8, vocab=128256) == 33
  assert tiling.num_splits(batch=256, vocab=32000) == 2
  assert VerifyTiling(splits=4).num_splits(batch=1, vocab=1000) == 1


def test_auto_falls_back_to_the_reference_without_a_gpu():
  expected = "pallas" if PALLAS_GPU_AVAILABLE else "reference"
  fn = get_verify_fn("auto")
  assert (fn is verify_reference) == (expected == "reference")
  with pytest.raises(ValueError, match="unknown verify implementation"):
    get_verify_fn("cuda")


def test_auto_on_a_gpu_host_runs_the_reference_in_a_program_for_the_cpu(monkeypatch):
  """On a GPU host, a program lowered for CPU devices (a mesh of them, say) must not lower
  the Triton kernel: "Only interpret mode is supported on CPU backend", seen on the H200."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  fn = get_verify_fn("auto")
  assert fn is verify_where_lowered
  args = jax.device_put(random_inputs(0, batch=3, gamma=2, vocab=20), jax.devices("cpu")[0])
  for got, want in zip(jax.jit(fn)(*args), reference(*args)):
    np.testing.assert_array_equal(got, want)


def test_auto_follows_the_device_an_engine_is_placed_on(monkeypatch):
  """An engine built for the CPU of a GPU host ran the Triton kernel on CPU arrays
  ("Only interpret mode is supported on CPU backend", seen on the H200)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert get_verify_fn("auto") is not verify_reference
  with jax.default_device(jax.devices("cpu")[0]):
    assert get_verify_fn("auto") is verify_reference
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
      get_verify_fn("pallas")

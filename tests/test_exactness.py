"""The speculative engine samples exactly from the processed target distribution.

Grid: gamma in {1, 2, 4, 8} x temperature in {0.5, 1, 1.5} x {plain, top-k 4,
top-p 0.8} x batch in {1, 8}, with a separate random drafter (p != q), plus
gamma 4 with the drafter equal to the target; 10,000 three-token sequences per
point, over a 12-token vocabulary.

Seeds: target weights from seed 0, drafter weights from seed 1; the point
(drafter, gamma, temperature, sampler, batch) draws its samples with
`point_key`, a fold-in of key 20231130. With these fixed, each p-value is a
fixed number, and the Holm-corrected family at alpha = 0.01 must not reject.
The power tests run the same code on three broken samplers, which it must
reject at p < 1e-6.
"""

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from conftest import spread_params, tiny_config
from exactness import chi2_test, continuation_logits, fit_pvalues, sequence_probs

from flashspec_jax.bandit import BanditState, Fixed, Thompson, UCB1
from flashspec_jax.drafters import ModelDrafter, NgramDrafter
from flashspec_jax.engine import Arm, speculative_generate
from flashspec_jax.generate import prepare_prompts
from flashspec_jax.kernels import verify
from flashspec_jax.kernels.verify import verify_reference
from flashspec_jax.models.llama import Llama
from flashspec_jax.sampling import Greedy, Temperature, TopK, TopP

VOCAB, NUM_TOKENS, NUM_SAMPLES, ALPHA = 12, 3, 10_000, 0.01
TARGET_CONFIG = tiny_config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
DRAFT_CONFIG = tiny_config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
PROMPTS = {1: [[3, 7, 1]], 8: [list(range(1, n + 1)) for n in range(1, 9)]}
SAMPLERS = {"plain": Temperature, "top_k": functools.partial(TopK, 4),
            "top_p": functools.partial(TopP, 0.8)}
TEMPERATURES = (0.5, 1.0, 1.5)
GAMMAS = (1, 2, 4, 8)
# One compiled program per (drafter, gamma, sampler kind, batch) draws all temperatures.
PROGRAMS = [("small", g, kind, b) for g in GAMMAS for kind in SAMPLERS for b in (1, 8)]
PROGRAMS += [("self", 4, kind, 1) for kind in SAMPLERS]

TARGET = Llama(TARGET_CONFIG, param_dtype=jnp.float32)
# One loop body for the draft steps: the same program, compiled several times faster on CPU.
DRAFTERS = {"small": ModelDrafter(Llama(DRAFT_CONFIG, param_dtype=jnp.float32), "small",
                                  unroll=False),
            "self": ModelDrafter(TARGET, "target", unroll=False)}


@pytest.fixture(scope="module")
def params():
  return {"target": spread_params(TARGET_CONFIG, seed=0, scale=6.0),
          "drafters": {"small": spread_params(DRAFT_CONFIG, seed=1, scale=6.0)}}


@pytest.fixture(scope="module")
def exact_probs(params):
  """exact_probs(temperature, kind, batch) -> [B, V**K] each row's exact distribution."""
  logits = {batch: continuation_logits(params["target"], TARGET_CONFIG, prompts, NUM_TOKENS)
            for batch, prompts in PROMPTS.items()}
  return lambda temperature, kind, batch: sequence_probs(
      logits[batch], SAMPLERS[kind](temperature=temperature))


def point_key(point) -> jax.Array:
  """The documented seed of one grid point (drafter, gamma, temperature, kind, batch)."""
  return jax.random.fold_in(jax.random.key(20231130), zlib.crc32(repr(point).encode()))


def draw(params, arms, samplers, batch, keys, *, strategy=Fixed(0), draft_sampler=None,
         verify_fn=verify_reference, initial_bandit=None):
  """[S, runs, B, K] samples for S stacked samplers: NUM_SAMPLES sequences per sampler.

  initial_bandit(key) -> BanditState, if given, starts each run's bandit from
  its own state instead of a fresh one.
  """
  tokens, lengths = prepare_prompts(PROMPTS[batch], VOCAB)
  max_gamma = max(arm.gamma for arm in arms)
  run = functools.partial(
      speculative_generate, params, jnp.asarray(tokens), jnp.asarray(lengths), target=TARGET,
      arms=arms, strategy=strategy, max_new_tokens=NUM_TOKENS, eos_ids=(),
      capacity=tokens.shape[1] + NUM_TOKENS + max_gamma + 1, verify_fn=verify_fn)

  def one_run(sampler, key):
    bandit = None if initial_bandit is None else initial_bandit(jax.random.fold_in(key, 1))
    return run(key, sampler, draft_sampler or sampler, bandit).tokens

  def one_sampler(sampler, key):
    return jax.vmap(lambda k: one_run(sampler, k))(jax.random.split(key, NUM_SAMPLES // batch))

  # Samplers one after another: vmapping them as well makes the interpreted Pallas kernel
  # about three times slower on CPU.
  return np.asarray(jax.jit(lambda samplers, keys: jax.lax.map(
      lambda sampler_and_key: one_sampler(*sampler_and_key), (samplers, keys)))(samplers, keys))


def program_pvalues(params, exact_probs, program, temperatures=TEMPERATURES, arms=None,
                    **kwargs) -> dict:
  """p-values of one program's points; arms default to the program's drafter and gamma."""
  drafter_name, gamma, kind, batch = program
  arms = arms or (Arm(DRAFTERS[drafter_name], gamma),)
  samplers = jax.tree.map(lambda *x: jnp.stack(x),
                          *[SAMPLERS[kind](temperature=t) for t in temperatures])
  points = [(drafter_name, gamma, t, kind, batch) for t in temperatures]
  keys = jnp.stack([point_key(p) for p in points])
  samples = draw(params, arms, samplers, batch, keys, **kwargs)
  return {point: fit_pvalues(samples[i], exact_probs(point[2], kind, batch), VOCAB)
          for i, point in enumerate(points)}


def test_target_distributions_are_far_from_the_drafter(params, exact_probs):
  """The test has something to detect: p and q differ, and are not near one-hot."""
  probs = exact_probs(1.0, "plain", 1)[0]
  draft = sequence_probs(continuation_logits(params["drafters"]["small"], DRAFT_CONFIG, PROMPTS[1],
                                             NUM_TOKENS), Temperature(1.0))[0]
  assert 0.5 * np.abs(probs - draft).sum() > 0.3
  assert probs.max() < 0.5


def test_chi_squared_keeps_its_degrees_of_freedom_with_fewer_samples_than_sequences():
  """B=8 points draw 1,250 sequences per row over 1,728 (T=1.5 makes them near-flat)."""
  probs = np.full(VOCAB**NUM_TOKENS, 1 / VOCAB**NUM_TOKENS)
  indices = np.random.default_rng(0).choice(len(probs), NUM_SAMPLES // 8, p=probs)
  statistic, dof = chi2_test(indices, probs)
  assert dof > 200 and np.isfinite(statistic)


# Holm's step-down procedure over the whole family rejects nothing exactly when no
# p-value is below alpha / len(family) (its first step), so each program's points are
# checked against that threshold on their own, and the programs can run in parallel.
FAMILY_SIZE = len(PROGRAMS) * len(TEMPERATURES)  # 81 points, for chi2 and KS each


@pytest.mark.parametrize("program", PROGRAMS, ids=["-".join(map(str, p)) for p in PROGRAMS])
def test_sequence_distribution_is_exact(params, exact_probs, program):
  for point, p in program_pvalues(params, exact_probs, program).items():
    assert min(p.values()) > ALPHA / FAMILY_SIZE, f"Holm rejects {point}: {p}"


def residual_is_p(target_logp, draft_logq, draft_tokens, seeds):
  """Broken: on a rejection, resample from p instead of norm(max(0, p - q))."""
  num_accepted = verify.accepted_counts(target_logp, draft_logq, draft_tokens, seeds)
  p = jnp.exp(target_logp[jnp.arange(len(seeds)), num_accepted])
  return num_accepted, verify.race_sample(p, seeds)


def always_accept(target_logp, draft_logq, draft_tokens, seeds):
  """Broken: accept every draft, then sample the bonus token from p."""
  gamma = draft_tokens.shape[1]
  return (jnp.full_like(seeds, gamma, dtype=jnp.int32),
          verify.race_sample(jnp.exp(target_logp[:, gamma]), seeds))


@struct.dataclass
class ArgmaxDraftsSoftQ(Temperature):
  """Broken drafter: proposes its argmax but reports its softmax as the q it sampled from."""

  def get_next_tokens(self, logits, rng):
    return Greedy().get_next_tokens(logits, rng)


BROKEN = {
    "residual_is_p": dict(verify_fn=residual_is_p),
    "always_accept": dict(verify_fn=always_accept),
    "argmax_drafts_as_q": dict(draft_sampler=ArgmaxDraftsSoftQ(1.0)),
}


POWER_PROGRAM = ("small", 4, "plain", 1)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_samplers_are_rejected(params, exact_probs, name):
  (p,) = program_pvalues(params, exact_probs, POWER_PROGRAM, temperatures=(1.0,), **BROKEN[name]).values()
  assert p["chi2"] < 1e-6, p


def test_correct_sampler_passes_at_the_power_test_point(params, exact_probs):
  (p,) = program_pvalues(params, exact_probs, POWER_PROGRAM, temperatures=(1.0,)).values()
  assert p["chi2"] > ALPHA, p


def random_bandit_state(num_arms):
  """A bandit that has already pulled every arm a random number of times."""
  def init(key):
    counts = jax.random.randint(key, (num_arms,), 1, 6).astype(jnp.float32)
    sums = counts * jax.random.uniform(jax.random.fold_in(key, 1), (num_arms,))
    return BanditState(counts=counts, sums=sums, pulls=counts.sum().astype(jnp.int32))
  return init


# One sampler kind per strategy: the grid covers the kinds, this test the choice of arm.
@pytest.mark.parametrize("strategy, sampler_kind", [(UCB1(), "plain"), (Thompson(), "top_p")],
                         ids=["ucb1-plain", "thompson-top_p"])
def test_exact_with_a_bandit_choosing_among_arms(params, exact_probs, strategy, sampler_kind):
  """Four arms (a small model, the target itself, n-gram lookup, plain AR), chosen at
  every step from a bandit state that differs from run to run and learns from rewards."""
  arms = (Arm(DRAFTERS["small"], 2), Arm(DRAFTERS["self"], 3),
          Arm(NgramDrafter(VOCAB, 2), 2), Arm())
  pvalues = program_pvalues(params, exact_probs, ("bandit", 3, sampler_kind, 1), arms=arms,
                            strategy=strategy, initial_bandit=random_bandit_state(len(arms)))
  for point, p in pvalues.items():
    assert min(p.values()) > ALPHA / (2 * len(pvalues)), (point, p)  # Bonferroni, both tests

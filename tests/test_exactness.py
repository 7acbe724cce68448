"""The speculative engine samples exactly from the processed target distribution.

Grid: gamma in {1, 2, 4, 8} x temperature in {0.5, 1, 1.5} x {plain, top-k 4,
top-p 0.8} x batch in {1, 8}, with a separate random drafter (p != q), plus
gamma 4 with the drafter equal to the target, plus gamma 3 with an untrained
feature drafter (eagle) at every temperature and sampler, batches 8, 1 and 8
for plain, top-k and top-p, plus the same drafter restricted to 5 of the 12
tokens (plain, batch 8), whose q is zero on the rest; 10,000
three-token sequences per point, over a 12-token vocabulary. Beside the grid,
each with its own Bonferroni correction: bandits choosing among arms, and an arm
stepped in a step body shared with a wider arm.

Seeds: target weights from seed 0, drafter weights from seed 1 (the feature
drafter's from seed 2); the point
(drafter, gamma, temperature, sampler, batch) draws its samples with
`point_key`, a fold-in of key 20231130. With these fixed, each p-value is a
fixed number, and the Holm-corrected family at alpha = 0.01 must not reject.
The power tests run the same code on three broken samplers, which it must
reject at p < 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct
from exactness import (DRAFT_CONFIG, DRAFTERS, NUM_SAMPLES, NUM_TOKENS, PROMPTS, SAMPLERS,
                       TARGET, TEMPERATURES, VOCAB, chi2_test, continuation_logits,
                       program_pvalues, sequence_probs)
from exactness import exact_probs, params  # noqa: F401 (fixtures)

from flashspec_jax.bandit import (AcceptanceKLUCB, AcceptanceState, AcceptanceThompson,
                                  BanditState, Hedge, Thompson, UCB1)
from flashspec_jax.drafters import ModelDrafter, NgramDrafter
from flashspec_jax.engine import Arm
from flashspec_jax.kernels import verify
from flashspec_jax.sampling import Greedy, Temperature

ALPHA = 0.01
GAMMAS = (1, 2, 4, 8)
# One compiled program per (drafter, gamma, sampler kind, batch) draws all temperatures.
PROGRAMS = [("small", g, kind, b) for g in GAMMAS for kind in SAMPLERS for b in (1, 8)]
PROGRAMS += [("self", 4, kind, 1) for kind in SAMPLERS]
# Every sampler and both batch sizes, not every pair of them: each program costs a compile.
PROGRAMS += [("eagle", 3, "plain", 8), ("eagle", 3, "top_k", 1), ("eagle", 3, "top_p", 8),
             ("eagle_vocab", 3, "plain", 8)]


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
FAMILY_SIZE = len(PROGRAMS) * len(TEMPERATURES)  # 93 points, for chi2 and KS each


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


def random_acceptance_state(num_arms, num_contexts=1):
  """A chooser that has already seen a random number of drafts of every arm (in every
  context)."""
  def init(key):
    keys = jax.random.split(key, 3)
    shape = (num_arms, num_contexts)
    tested = jax.random.randint(keys[0], shape, 1, 12).astype(jnp.float32)
    counts = jnp.ones((num_arms,))
    return AcceptanceState(accepted=tested * jax.random.uniform(keys[1], shape),
                           tested=tested, gains=jax.random.normal(keys[2], (num_arms,)),
                           counts=counts, sums=counts / 2, pulls=jnp.int32(num_arms),
                           last_arm=jax.random.randint(keys[2], (), -1, num_arms))
  return init


def random_contextual_state(num_arms):
  """random_acceptance_state in each context of the n-gram arms (max_n 2: 3 contexts)."""
  return random_acceptance_state(num_arms, 3)


# One sampler kind per strategy: the grid covers the kinds, this test the choice of arm.
# The acceptance choosers also learn from the n-gram arm scored for free at every step.
CHOOSERS = [(UCB1(), "plain", random_bandit_state), (Thompson(), "top_p", random_bandit_state),
            (AcceptanceThompson(wait_cost=0.5), "top_k", random_acceptance_state),
            (Hedge(), "plain", random_acceptance_state),
            (AcceptanceKLUCB(contextual=True, step_context=True), "top_p",
             random_contextual_state)]


@pytest.mark.parametrize("strategy, sampler_kind, initial_state", CHOOSERS,
                         ids=["ucb1-plain", "thompson-top_p", "acceptance_thompson_wait_cost-top_k",
                              "hedge-plain", "contextual_kl_ucb_step_context-top_p"])
def test_exact_with_a_bandit_choosing_among_arms(params, exact_probs, strategy, sampler_kind,
                                                 initial_state):
  """Five arms (a small model, the target itself, n-gram lookup at two gammas in one
  step body, plain AR), chosen at every step from a chooser state that differs from
  run to run and learns as it goes."""
  ngram = NgramDrafter(VOCAB, 2)
  arms = (Arm(DRAFTERS["small"], 2), Arm(DRAFTERS["self"], 3), Arm(ngram, 2), Arm(ngram, 1),
          Arm())
  pvalues = program_pvalues(params, exact_probs, ("bandit", 3, sampler_kind, 1), arms=arms,
                            strategy=strategy, initial_bandit=initial_state(len(arms)))
  for point, p in pvalues.items():
    assert min(p.values()) > ALPHA / (2 * len(pvalues)), (point, p)  # Bonferroni, both tests


class SelfDraftingInASharedBody(ModelDrafter):
  """The target drafting for itself, its arms sharing one step body as n-gram arms do
  (drafters.step_bodies; its drafts keep the prefix contract, as autoregressive samples
  do). The target accepts all it drafts, so a gamma-1 arm in a body of width 3 ends
  every step on the bonus token that the shared body samples after the arm's last
  draft, and the later drafts' tests, all passed, must leave no trace. Keeping the
  kernel's token instead of the bonus fails this test at p = 0 (checked by hand)."""

  shares_step_body = True


def test_exact_in_a_step_body_shared_with_a_wider_arm(params, exact_probs):
  drafter = SelfDraftingInASharedBody(TARGET, "target", unroll=False)
  pvalues = program_pvalues(params, exact_probs, ("self_shared", 1, "top_k", 8),
                            arms=(Arm(drafter, 1), Arm(drafter, 3)))
  for point, p in pvalues.items():
    assert min(p.values()) > ALPHA / (2 * len(pvalues)), (point, p)  # Bonferroni, both tests

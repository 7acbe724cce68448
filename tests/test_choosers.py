"""Choosers that model acceptance (bandit/acceptance.py), the engine's free feedback, the
stream comparison (streams.py) and a chooser's state carried from one run to the next."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from conftest import spread_params, tiny_config
from helpers import latest_longest_match

from flashspec_jax import config as config_lib
from flashspec_jax import drafters, engine, environment, pipeline, runner, streams
from flashspec_jax.bench import (drafter_contexts, hlo, ngram_contexts, program_switch,
                                 step_kernels, stream_goals, trace_calls)
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.bandit import (AcceptanceKLUCB, AcceptanceThompson, Feedback, Hedge, UCB1,
                                  expected_tokens)
from flashspec_jax.bandit.acceptance import by_context
from flashspec_jax.config import base_config
from flashspec_jax.drafters import ModelDrafter, NgramDrafter
from flashspec_jax.generate import Decoder, run_generate
from flashspec_jax.models.llama import Llama
from flashspec_jax.pipeline import Method
from flashspec_jax.sampling import Greedy, Samplers, Temperature
from flashspec_jax.sequences import Sequences

CONFIG = tiny_config(num_layers=4)
TARGET = Llama(CONFIG, param_dtype=jnp.float32)
NGRAM = NgramDrafter(CONFIG.vocab_size, 2)
SELF = ModelDrafter(TARGET, unroll=False)  # drafts what the target samples greedily
PROMPTS = [[5, 6, 7, 5, 6], list(range(8, 20)), [1, 2, 1, 2, 1], [3, 3, 3, 3], [9, 2],
           list(range(30, 39)), [4] * 6, [60, 61, 62, 63, 0]]
CHOOSERS = {"acceptance_thompson": AcceptanceThompson(), "kl_ucb": AcceptanceKLUCB(),
            "hedge": Hedge(), "contextual_thompson": AcceptanceThompson(contextual=True),
            "contextual_kl_ucb": AcceptanceKLUCB(contextual=True)}


@pytest.fixture(scope="module")
def params():
  return {"target": spread_params(CONFIG, seed=0), "drafters": {}}


def test_expected_tokens_is_the_mean_accepted_chain_plus_one():
  gamma, alpha = 4, 0.6
  # P(accepted >= k) = alpha^k for k <= gamma; tau = 1 + sum_k P(accepted >= k).
  assert expected_tokens(gamma, alpha) == pytest.approx(1 + sum(alpha**k for k in range(1, 5)))
  assert expected_tokens(0, 0.9) == pytest.approx(1.0)
  assert expected_tokens(4, 1.0) == pytest.approx(5.0, rel=1e-4)


@pytest.mark.parametrize("field", ["discount", "request_carry"])
@pytest.mark.parametrize("value", [0.0, 1.5])
def test_a_bad_discount_or_request_carry_is_refused(field, value):
  with pytest.raises(ValueError, match=f"{field} must be in"):
    AcceptanceThompson(**{field: value})


@pytest.mark.parametrize("strategy", [AcceptanceKLUCB, Hedge])
def test_a_new_request_fades_the_carried_evidence_before_adding_its_prompts(strategy):
  """observe, at each request: what earlier requests taught, times request_carry, plus
  the prompt's drafts; the posterior's mean is kept and its weight cut, and Hedge's
  gains shrink alike. With request_carry 1 nothing fades."""
  carried = strategy(request_carry=0.25).init(3).replace(
      accepted=jnp.array([[80.0], [40.0], [0.0]]), tested=jnp.array([[100.0], [100.0], [0.0]]),
      gains=jnp.array([2.0, -4.0, 0.0]), pulls=jnp.int32(50))
  prompt_accepted, prompt_tested = jnp.array([[8.0], [0.0], [0.0]]), jnp.array([[10.0], [0], [0]])
  state = strategy(request_carry=0.25).observe(carried, prompt_accepted, prompt_tested)
  np.testing.assert_allclose(state.accepted[:, 0], [28.0, 10.0, 0.0])
  np.testing.assert_allclose(state.tested[:, 0], [35.0, 25.0, 0.0])
  np.testing.assert_allclose(state.gains, [0.5, -1.0, 0.0])
  assert int(state.pulls) == 50
  whole = strategy().observe(carried, prompt_accepted, prompt_tested)
  np.testing.assert_allclose(whole.tested[:, 0], [110.0, 100.0, 0.0])
  np.testing.assert_allclose(whole.gains, carried.gains)


def test_free_scores_are_what_the_arm_would_have_accepted(params):
  """Greedy, with the target drafting for itself (every draft accepted), the n-gram
  arm scored for free counts exactly what its own step accepts and tests."""
  arms = (engine.Arm(SELF, 4), engine.Arm(NGRAM, 3))
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=AcceptanceThompson())
  tokens, lengths = decoder.ar_decoder.prepare(PROMPTS)
  samplers = Samplers.same(Greedy())
  state = decoder.init(params, tokens, lengths, jax.random.key(0), samplers.target)
  arm_step = jax.jit(decoder.arm_step, static_argnums=2)
  for _ in range(3):
    # The drafts the n-gram arm's step and its free scoring read, kept from the choice.
    np.testing.assert_array_equal(state.drafts[1], NGRAM.drafts(state.seqs, 3))
    next_state, scored = arm_step(params, state, 0, samplers)
    _, own = arm_step(params, state, 1, samplers)
    assert scored["arm_tested"][1] == own["arm_tested"][1] > 0
    assert scored["arm_accepted"][1] == own["arm_accepted"][1]
    state, _ = decoder.select(next_state)


def test_free_score_at_temperature_is_the_targets_probability_of_the_draft(params):
  """After an AR step only the first draft position was verified: the n-gram arm's
  score there is p(its first draft), its acceptance probability as a point mass."""
  arms = (engine.Arm(), engine.Arm(NGRAM, 3))
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=Hedge())
  tokens, lengths = decoder.ar_decoder.prepare(PROMPTS)
  samplers = Samplers.same(Temperature(1.0))
  state = decoder.init(params, tokens, lengths, jax.random.key(0), samplers.target)
  _, stats = jax.jit(decoder.arm_step, static_argnums=2)(params, state, 0, samplers)
  _, drafts, _ = NGRAM.propose(params, (), state.seqs, 3, None, None)
  logits, _ = TARGET.apply(params["target"], state.seqs.last_tokens[:, None], state.target_cache)
  p = jax.nn.softmax(logits[:, 0])[jnp.arange(len(PROMPTS)), drafts[:, 0]]
  np.testing.assert_allclose(stats["arm_accepted"][1], p.sum(), rtol=1e-5)
  assert stats["arm_tested"][1] == len(PROMPTS)


def test_a_shared_step_body_credits_the_arm_chosen_at_run_time(params):
  """The n-gram arms at gammas 1 and 4 share one step body, the arm known only at run
  time: the step's drafts count for that arm alone, as its own step alone counts them,
  and the other free-scored arm, of another drafter, is scored as it would be anyway."""
  other = NgramDrafter(CONFIG.vocab_size, 1)
  arms = (engine.Arm(NGRAM, 1), engine.Arm(NGRAM, 4), engine.Arm(other, 2))
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=AcceptanceThompson())
  alone = engine.SpeculativeDecoder(TARGET, (arms[0], arms[2]), 16,
                                    strategy=AcceptanceThompson())
  tokens, lengths = decoder.ar_decoder.prepare(PROMPTS)
  samplers = Samplers.same(Greedy())
  state = decoder.init(params, tokens, lengths, jax.random.key(0), samplers.target)
  shared = jax.jit(lambda state, arm: decoder.arm_step(params, state, arm, samplers, (0, 1)))
  _, stats = shared(state, jnp.int32(0))
  own_state = alone.init(params, tokens, lengths, jax.random.key(0), samplers.target)
  _, own = jax.jit(alone.arm_step, static_argnums=2)(params, own_state, 0, samplers)
  np.testing.assert_array_equal(stats["arm_tested"][:, 0], [own["arm_tested"][0, 0], 0,
                                                            own["arm_tested"][1, 0]])
  np.testing.assert_array_equal(stats["arm_accepted"][:, 0], [own["arm_accepted"][0, 0], 0,
                                                              own["arm_accepted"][1, 0]])
  assert own["arm_tested"][0, 0] > 0 and own["arm_tested"][1, 0] > 0


@pytest.mark.parametrize("name", sorted(CHOOSERS))
def test_greedy_speculation_with_each_chooser_equals_greedy_ar(params, name):
  arms = (engine.Arm(NGRAM, 2), engine.Arm(NGRAM, 4), engine.Arm())
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=CHOOSERS[name])
  out = engine.run_speculative(params, decoder, PROMPTS, jax.random.key(0),
                               Samplers.same(Greedy()))
  ar = run_generate(params["target"], Decoder(TARGET, 16), PROMPTS, jax.random.key(0), Greedy())
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  # Both n-gram arms choose with one drafter's evidence, whichever of them ran.
  grouped = decoder.chooser.pooled(out.bandit.tested)
  np.testing.assert_array_equal(grouped[0], grouped[1])
  assert grouped[0].sum() == out.bandit.tested[:2].sum() > 0


# Simulated arms: (gamma, cost per step, per-draft acceptance). tau / cost: a cheap drafter
# that is rarely right (1.35), a good but dear one (0.58), AR (1.0), and a good cheap one
# (1.62), the best; UCB1 on a [0, 1] goodput reward cannot tell them apart in tens of steps.
SIMULATED = ((4, 1.05, 0.3), (4, 4.0, 0.6), (0, 1.0, 0.0), (4, 1.3, 0.55))


class _Drafter:
  scored_free = shares_step_body = False


class _Arm:
  def __init__(self, gamma, cost):
    self.gamma, self.cost, self.drafter = gamma, cost, (None if gamma == 0 else _Drafter())


def simulated_steps(strategy, steps: int, runs: int) -> np.ndarray:
  """[runs, steps] the arms a chooser picks in independent runs of one row, each
  draft accepted with its arm's probability until the first rejection."""
  gammas = jnp.asarray([g for g, _, _ in SIMULATED])
  alphas = jnp.asarray([a for _, _, a in SIMULATED])
  costs = jnp.asarray([c for _, c, _ in SIMULATED])
  chooser = strategy.bind([_Arm(g, c) for g, c, _ in SIMULATED])

  def step(state, key):
    select_key, accept_key = jax.random.split(key)
    arm = chooser.select(state, select_key)
    gamma = gammas[arm]
    chain = jnp.cumprod(jax.random.uniform(accept_key, (4,)) < alphas[arm])
    accepted = jnp.sum(chain * (jnp.arange(4) < gamma))
    tested = jnp.minimum(accepted + 1, gamma)
    chosen = jnp.arange(len(SIMULATED)) == arm
    best = jnp.max((gammas + 1) / costs)
    feedback = Feedback(reward=(accepted + 1) / costs[arm] / best,
                        accepted=(chosen * accepted.astype(jnp.float32))[:, None],
                        tested=(chosen * tested.astype(jnp.float32))[:, None],
                        rows=jnp.float32(1))
    return chooser.learn(state, arm, feedback), arm

  def run(key):
    return jax.lax.scan(step, chooser.init(len(SIMULATED)), jax.random.split(key, steps))[1]

  return np.asarray(jax.jit(jax.vmap(run))(jax.random.split(jax.random.key(0), runs)))


@pytest.mark.parametrize("name", ["acceptance_thompson", "kl_ucb"])
def test_acceptance_choosers_find_the_best_arm_in_tens_of_steps(name):
  """Over 20 runs of 60 steps (a 128-token reply), the acceptance choosers spend most of
  the second half on the best arm, and more than UCB1 on a goodput reward does."""
  def share(picks):
    return np.mean(picks[:, 30:] == 3)

  picks, ucb = simulated_steps(CHOOSERS[name], 60, 20), simulated_steps(UCB1(), 60, 20)
  assert share(picks) > 0.6 and share(picks) > share(ucb) + 0.2, (share(picks), share(ucb))


def test_stream_comparison_against_fixed_arms_and_the_per_set_oracle():
  """Two sets; AR is best on chat and n-gram on code. The chooser matches the best arm
  on code, loses half its speed on chat, and settles on code's best arm after 2 steps."""
  def record(method, kind, seconds, tokens):
    return dict(method=method, kind=kind, batch_seconds=seconds, batch_rows=1, new_tokens=tokens)
  records = [record("ar", "chat", 1.0, 10), record("ar", "code", 1.0, 10),
             record("ngram:3", "chat", 2.0, 10), record("ngram:3", "code", 0.5, 10),
             record("bandit:x", "chat", 2.0, 10), record("bandit:x", "code", 0.5, 10)]
  steps = [("chat", 1)] * 4 + [("code", 0), ("code", 1)] + [("code", 1)] * 5
  history = dict(arms=["ar", "ngram_3:g4"], steps=steps)
  out = streams.compare(records, {"bandit:x": history}, {"ar": "ar", "ngram:3": "ngram_3:g4"})
  result = out["bandit:x"]
  assert result["by_set"]["chat"]["best_fixed"] == "ar"
  assert result["by_set"]["chat"]["vs_best_fixed"] == pytest.approx(0.5)
  assert result["by_set"]["code"]["vs_best_fixed"] == pytest.approx(1.0)
  # The oracle: 20 tokens in 1.5 s; the chooser: 20 tokens in 2.5 s.
  assert result["vs_oracle"] == pytest.approx(1.5 / 2.5)
  assert result["off_best_share"] == pytest.approx(5 / 11)
  assert result["settle_steps"] == [1]


def test_ngram_context_is_the_length_of_the_match_it_follows():
  tokens = jnp.array([[7, 1, 2, 3, 4, 9, 1, 2, 0, 0],   # "1 2" seen before: 2
                      [5, 6, 7, 8, 0, 0, 0, 0, 0, 0],   # nothing seen before: 0
                      [4, 9, 3, 5, 9, 0, 0, 0, 0, 0]])  # only "9": 1
  seq_lens = jnp.array([8, 4, 5])
  seqs = Sequences(tokens=tokens, seq_lens=seq_lens, prompt_lens=seq_lens, done=jnp.zeros(3, bool),
                   nan_rows=jnp.zeros(3, bool), rng=jax.random.key(0))
  assert NgramDrafter(10, max_n=3).num_contexts == 4
  assert NgramDrafter(10, max_n=3).context(seqs).tolist() == [2, 0, 1]
  assert NgramDrafter(10, max_n=1).context(seqs).tolist() == [1, 0, 1]


def test_ngram_contexts_bench_counts_the_drafts_the_text_confirms():
  """bench/ngram_contexts.py at each position t >= 6 of a made-up text: as "1 2 3 4"
  recurs, the lookup follows ever longer matches and copies what followed them, which
  the text confirms until it parts (7 where 5 was); with no match (5, 7 unseen
  before) it repeats the last token."""
  text = jnp.array([9, 1, 2, 3, 4, 5, 1, 2, 3, 4, 7, 5], jnp.int32)
  context, confirmed = ngram_contexts.drafts_confirmed(NgramDrafter(10, 3), 3, text, 6, 12)
  assert context[6:].tolist() == [0, 1, 2, 3, 3, 0]
  # At t = 8, after "1 2": drafts 3 4 5 against the text's 3 4 7.
  assert confirmed[6:].tolist() == [0, 3, 2, 1, 0, 0]


def test_drafter_contexts_bench_pairs_each_step_with_the_context_it_began_in():
  """bench/drafter_contexts.py: after the prompt "5 6 7 5 6" and a first token 7, the
  first step begins after "6 7", seen before (context 2), and emits one token; the
  second begins after "7 1", never seen (context 0), and emits two."""
  prompt, answer = [5, 6, 7, 5, 6], [7, 1, 5, 6]
  steps = drafter_contexts.step_contexts(NgramDrafter(10, 2), prompt, answer, [1, 2], width=12)
  assert steps == [(2, 1), (0, 2)]
  full = prompt + answer
  assert [latest_longest_match(full, t, 2)[1] for t in (6, 7)] == [2, 0]


@pytest.mark.parametrize("name", ["contextual_thompson", "contextual_kl_ucb"])
def test_contextual_choosers_are_configured_like_the_others(name):
  config = base_config()
  config.bandit.request_carry = 0.5
  strategy = pipeline.strategy_for(name, config)
  assert strategy.contextual and strategy.request_carry == 0.5
  assert not pipeline.strategy_for(name.replace("contextual_", "").replace(
      "thompson", "acceptance_thompson"), config).contextual


@pytest.mark.parametrize("strategy", [AcceptanceKLUCB, AcceptanceThompson])
def test_a_contextual_chooser_runs_ngram_only_where_its_context_pays(strategy):
  """n-gram is right 95% of the time after a 2-token match and never after none; the
  model drafter 60% of the time. Pooled, n-gram's mean (0.38) loses to the drafter
  whatever the context; per context, n-gram wins where rows have a long match, and a
  batch whose rows are mostly there runs it."""
  arms = (engine.Arm(NGRAM, 4), engine.Arm(SELF, 4))
  chooser = strategy(contextual=True).bind(arms)
  plain = strategy().bind(arms)
  assert chooser.num_contexts == 3 and plain.num_contexts == 1
  tested = jnp.array([[600.0, 0.0, 400.0], [1000.0, 0.0, 0.0]])
  accepted = tested * jnp.array([[0.0, 0.0, 0.95], [0.6, 0.0, 0.0]])
  state = chooser.init(2).replace(accepted=accepted, tested=tested, pulls=jnp.int32(200))
  pooled = plain.init(2).replace(accepted=accepted.sum(1, keepdims=True),
                                 tested=tested.sum(1, keepdims=True), pulls=jnp.int32(200))

  def picks(context_of_rows):
    contexts = jnp.stack([jnp.asarray(context_of_rows), jnp.zeros(len(context_of_rows), int)], 1)
    weights = by_context(jnp.ones((len(context_of_rows), 1)), contexts, 3)
    return {int(chooser.select(state, jax.random.key(k), weights)) for k in range(5)}

  assert picks([2]) == {0} and picks([0]) == {1} and picks([2, 2, 0]) == {0}
  assert {int(plain.select(pooled, jax.random.key(k))) for k in range(5)} == {1}


@pytest.mark.parametrize("strategy", [AcceptanceThompson, AcceptanceKLUCB])
def test_a_request_commits_to_an_arm_only_where_its_bounds_beat_every_other_arms(strategy):
  """The drafter is right 60% of the time in 1,000 drafts. Where n-gram lookup is right
  95% of the time after a 2-token match, the contextual chooser would run it there and
  commits to nothing; where it is right 20% of the time, the drafter beats it in every
  context seen, and a request commits to the drafter. Pooled, n-gram's 38% loses either
  way. Nothing commits on little evidence, before any, to a drafter learnt per
  context, or for Hedge; an arm never tried is a rival at its best case."""
  arms = (engine.Arm(NGRAM, 4), engine.Arm(SELF, 4))
  chooser, plain = strategy(contextual=True).bind(arms), strategy().bind(arms)
  tested = jnp.array([[600.0, 0.0, 400.0], [1000.0, 0.0, 0.0]])

  def committed(chooser, long_match_alpha, scale=1.0, pooled=False):
    accepted = tested * jnp.array([[0.0, 0.0, long_match_alpha], [0.6, 0.0, 0.0]])
    tested_ = tested
    if pooled:
      accepted, tested_ = accepted.sum(1, keepdims=True), tested.sum(1, keepdims=True)
    state = chooser.init(2).replace(accepted=scale * accepted, tested=scale * tested_,
                                    pulls=jnp.int32(200))
    return int(chooser.committed_arm(state, 0.9))

  assert committed(chooser, 0.95) == -1 and committed(chooser, 0.2) == 1
  assert committed(plain, 0.95, pooled=True) == committed(plain, 0.2, pooled=True) == 1
  assert committed(chooser, 0.2, scale=0.002) == -1  # 2 drafts of the drafter tell little
  assert int(chooser.committed_arm(chooser.init(2), 0.9)) == -1
  # n-gram lookup wins everywhere, but it learns per context: its program alone tells none.
  state = chooser.init(2).replace(accepted=tested * jnp.array([[0.9], [0.1]]), tested=tested,
                                  pulls=jnp.int32(200))
  assert int(chooser.committed_arm(state, 0.9)) == -1
  hedge = Hedge().bind(arms)
  state = hedge.init(2).replace(accepted=jnp.array([[0.0], [600.0]]),
                                tested=jnp.array([[600.0], [1000.0]]), pulls=jnp.int32(200))
  assert int(hedge.committed_arm(state, 0.5)) == -1
  # A third arm, the drafter at gamma 8, never tried: at its best it beats the drafter at 4.
  wide = plain.bind(arms + (engine.Arm(SELF, 8),))
  wide = dataclasses.replace(wide, groups=(0, 1, 2))
  state = wide.init(3).replace(accepted=jnp.array([[76.0], [600.0], [0.0]]),
                               tested=jnp.array([[200.0], [1000.0], [0.0]]))
  assert int(wide.committed_arm(state, 0.9)) == -1


def test_a_committed_requests_evidence_is_faded_as_its_steps_would_have_faded_it():
  arms = (engine.Arm(NGRAM, 4), engine.Arm(SELF, 4))
  chooser = AcceptanceKLUCB(discount=0.9, request_carry=0.5).bind(arms)
  state = chooser.init(2).replace(accepted=jnp.array([[8.0], [6.0]]),
                                  tested=jnp.array([[10.0], [10.0]]), pulls=jnp.int32(7))
  learned = chooser.learn_committed(state, 1, 3, 6.0, 9.0)
  # Three steps of 2 accepted of 3 tested each, learnt one by one after the new request.
  stepped = chooser.observe(state, jnp.zeros((2, 1)), jnp.zeros((2, 1)))
  for _ in range(3):
    stepped = chooser.learn(stepped, 1, Feedback(
        reward=jnp.float32(0), accepted=jnp.array([[0.0], [2.0]]),
        tested=jnp.array([[0.0], [3.0]]), rows=jnp.float32(1)))
  np.testing.assert_allclose(learned.accepted, stepped.accepted, rtol=1e-6)
  np.testing.assert_allclose(learned.tested, stepped.tested, rtol=1e-6)
  np.testing.assert_array_equal(learned.counts, stepped.counts)
  assert int(learned.pulls) == int(stepped.pulls) == 10 and int(learned.last_arm) == 1


def _sure_of_ngram(chooser):
  """A state of KL-UCB over n-gram lookup and AR whose evidence (90 of 100 drafts
  accepted) says n-gram lookup beats AR."""
  return chooser.init(2).replace(accepted=jnp.array([[90.0], [0.0]]),
                                 tested=jnp.array([[100.0], [0.0]]), pulls=jnp.int32(50))


def test_a_committed_request_runs_the_arms_own_program_and_the_chooser_learns_from_it():
  """Through the pipeline, greedy: a chooser whose evidence says n-gram lookup beats AR
  commits the batch to it. The tokens are the fixed n-gram program's, every step is
  n-gram's in the history, and the chooser's state has the batch's drafts and steps.
  With commit off, the same state runs the chooser's own program."""
  config = base_config()
  config.target, config.synthetic_weights = "tiny_llama", True
  config.methods, config.arms, config.bandit.costs = "bandit:kl_ucb", "ngram:2,ar", "1,1"
  config.bandit.acceptance_discount = 1.0  # evidence adds up without fading
  config.sampling.max_new_tokens = 8
  model = runner.load_target(config, jnp.float32)
  (method,), params = pipeline.build_methods(config, model, jnp.float32)
  setup = pipeline.make_setup(config, model, params, jnp.float32)
  batch = runner.build_requests(config, model)
  chooser = method.strategy.bind(method.arms)

  def evidence():  # a fresh copy each call: the chooser's program takes its state donated
    return _sure_of_ngram(chooser)

  key = jax.random.key(3)
  run = pipeline.compile_and_run(method, setup, batch, key, evidence(), commit=0.5)
  alone = pipeline.compile_and_run(pipeline.committed_methods(method)[0], setup, batch, key)
  np.testing.assert_array_equal(run.output.tokens, alone.output.tokens)
  assert run.committed_arm == 0
  steps = int(run.output.steps)
  np.testing.assert_array_equal(run.output.history.arm[:steps], 0)
  assert (np.asarray(run.output.history.arm[steps:]) == -1).all()
  bandit = run.output.bandit
  assert float(bandit.tested[0, 0]) == 100 + int(alone.output.metrics.tested.sum())
  assert float(bandit.counts[0]) == steps and int(bandit.pulls) == 50 + steps
  # The chooser's own steps record their rewards; a committed request's are not known.
  held = pipeline.compile_and_run(method, setup, batch, key, evidence())
  assert float(held.output.bandit.sums.sum()) > 0 == float(bandit.sums.sum())
  # A state the evidence is not sure of runs the chooser's program, from the host too.
  unsure = jax.device_put(chooser.init(2), pipeline._host_device())
  again = pipeline.compile_and_run(method, setup, batch, key, unsure, commit=0.5)
  assert float(again.output.bandit.sums.sum()) > 0
  assert again.committed_arm == -1


def _committing_config(tmp_path, sure: bool):
  """run.py's config for KL-UCB over n-gram lookup and AR with commit on, starting from
  an earlier run's state (config.bandit.initial_state) that is sure n-gram lookup beats
  AR, or (not sure) from a fresh state, whose first request cannot commit."""
  config = base_config()
  config.experiment, config.results_dir = "test_commit", str(tmp_path / "results")
  config.target, config.synthetic_weights = "tiny_llama", True
  config.methods, config.arms, config.bandit.costs = "bandit:kl_ucb", "ngram:2,ar", "1,1"
  config.prompts.sets, config.sampling.max_new_tokens, config.print_text = "chat", 4, False
  config.bandit.commit = 0.5
  if sure:
    saved = jax.tree.map(lambda x: np.asarray(x).tolist(),
                         dataclasses.asdict(_sure_of_ngram(AcceptanceKLUCB())))
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps({"bandit_states": {"bandit:kl_ucb": saved}}))
    config.bandit.initial_state = str(earlier)
  return config


def test_a_runs_records_say_which_requests_ran_committed(tmp_path):
  records = runner.run(_committing_config(tmp_path, sure=True))["records"]
  assert records and all(record["committed"] for record in records)
  records = runner.run(_committing_config(tmp_path, sure=False))["records"]
  assert records[0]["committed"] is False


def test_traced_calls_tell_committed_calls_apart(tmp_path):
  """bench/trace_calls, on the CPU: a bandit's committed calls under a name of their own."""
  calls = trace_calls.traced_calls(_committing_config(tmp_path, sure=True),
                                   environment.describe(), tmp_path / "trace")
  assert calls and {call["method"] for call in calls} == {"bandit:kl_ucb (committed)"}
  calls = trace_calls.traced_calls(_committing_config(tmp_path, sure=False),
                                   environment.describe(), tmp_path / "trace")
  assert calls[0]["method"] == "bandit:kl_ucb"


def test_a_program_switch_is_timed_on_the_same_steps(tmp_path):
  """bench/program_switch, on the CPU: the fixed method's call after itself and after the
  bandit's, on each prompt with the same steps, and a summary over those prompts."""
  config = _committing_config(tmp_path, sure=False)
  config.methods = "ngram:2,bandit:kl_ucb"
  calls = program_switch.switch_times(config, environment.describe())
  assert len(calls) == config.prompts.num_per_set
  for call in calls:
    assert call["after_itself_ms"] > 0
    assert call["after"]["bandit:kl_ucb"]["steps"] == call["steps"] > 0
  summary = program_switch.summarise(calls)["bandit:kl_ucb"]
  assert summary["prompts"] == len(calls)
  assert summary["extra_ms_min"] <= summary["extra_ms_median"] <= summary["extra_ms_max"]
  config.methods = "bandit:kl_ucb,ngram:2"
  with pytest.raises(app.UsageError, match="a fixed method first"):
    program_switch.switch_times(config, environment.describe())


def test_commit_is_refused_where_no_evidence_fades():
  """A committed request teaches only its arm; with no fading, the first commit would
  last for good."""
  config = base_config()
  config.bandit.commit, config.bandit.acceptance_discount = 0.9, 1.0
  with pytest.raises(ValueError, match="commit.*acceptance_discount or request_carry"):
    config_lib.validate(config)
  config.bandit.request_carry = 0.5
  config_lib.validate(config)


def test_host_waits_follow_the_loops_between_two_step_bodies():
  """Three bodies in one outer loop: forward passes the loops between, back goes round
  through the outer loop's predicate too."""
  waits = [[int(drafters.host_waits(i, j, 3)) for j in range(3)] for i in range(3)]
  assert waits == [[0, 1, 2], [3, 0, 1], [2, 3, 0]]
  np.testing.assert_array_equal(drafters.host_waits(jnp.int32(1), jnp.arange(3), 3), [3, 0, 1])


@pytest.mark.parametrize("strategy", [AcceptanceKLUCB, AcceptanceThompson])
def test_priced_waits_keep_a_close_choice_in_the_last_body(strategy):
  """n-gram at gamma 2 and 4 share a step body; the model drafter and AR have their own.
  The drafter yields 3% more tokens per cost: it wins from a fresh start, from its own
  body, and when waits are free. With a wait priced at 5% of a step, one wait to reach
  it from n-gram's body keeps the chooser on n-gram, at either gamma; a clear winner
  still pays for it."""
  arms = (engine.Arm(NGRAM, 2), engine.Arm(NGRAM, 4), engine.Arm(SELF, 4), engine.Arm())
  # tau(4, 0.5) = 1.9375 for both drafters; AR's one token at cost 3 never wins.
  priced = dataclasses.replace(strategy(wait_cost=0.05).bind(arms), costs=(1.0, 1.0, 0.97, 3.0))
  assert priced.bodies == (0, 0, 1, 2)
  free = dataclasses.replace(priced, wait_cost=0.0)
  tested = jnp.array([[1e6], [0.0], [1e6], [0.0]])
  state = priced.init(4).replace(accepted=tested / 2, tested=tested, pulls=jnp.int32(10**6))

  def pick(chooser, last_arm):
    return {int(chooser.select(state.replace(last_arm=jnp.int32(last_arm)), jax.random.key(k)))
            for k in range(5)}

  assert pick(free, 1) == pick(priced, -1) == pick(priced, 2) == {2}
  assert pick(priced, 0) == pick(priced, 1) == {1}
  np.testing.assert_allclose(priced.step_costs(state.replace(last_arm=jnp.int32(0))),
                             [1.0, 1.0, 1.02, 3.1])
  np.testing.assert_allclose(priced.step_costs(state.replace(last_arm=jnp.int32(2))),
                             [1.15, 1.15, 0.97, 3.05])
  assert pick(dataclasses.replace(priced, costs=(1.0, 1.0, 0.8, 3.0)), 1) == {2}
  learned = priced.learn(state, jnp.int32(2), Feedback(
      reward=1.0, accepted=jnp.zeros((4, 1)), tested=jnp.zeros((4, 1)), rows=1.0))
  assert int(learned.last_arm) == 2


def test_a_wait_cost_is_refused_where_it_cannot_be_priced():
  with pytest.raises(ValueError, match="wait_cost must be >= 0"):
    AcceptanceKLUCB(wait_cost=-1.0)
  with pytest.raises(ValueError, match="Hedge .* prices no wait"):
    Hedge(wait_cost=1e-4)


def test_the_wait_cost_and_step_context_reach_every_chooser_that_uses_them():
  config = base_config()
  config.bandit.wait_cost = 1.2e-4
  config.bandit.step_context = True
  for name in CHOOSERS:
    strategy = pipeline.strategy_for(name, config)
    assert strategy.wait_cost == (0 if name == "hedge" else 1.2e-4)
    assert strategy.step_context == name.startswith("contextual_")


def test_free_scores_of_a_contextual_chooser_land_in_each_rows_context(params):
  """The n-gram arm scored for free after a step of the model drafter: per context, the
  rows that were in it, summing to what a chooser without contexts counts."""
  arms = (engine.Arm(SELF, 4), engine.Arm(NGRAM, 3))
  samplers = Samplers.same(Greedy())
  counts = {}
  for contextual in (False, True):
    decoder = engine.SpeculativeDecoder(TARGET, arms, 16,
                                        strategy=AcceptanceKLUCB(contextual=contextual))
    tokens, lengths = decoder.ar_decoder.prepare(PROMPTS)
    state, _ = decoder.select(decoder.init(params, tokens, lengths, jax.random.key(0),
                                           samplers.target))
    _, stats = jax.jit(decoder.arm_step, static_argnums=2)(params, state, 0, samplers)
    counts[contextual] = np.asarray(stats["arm_tested"][1]), state
  (plain, _), (by_context, state) = counts[False], counts[True]
  assert plain.shape == (1,) and by_context.shape == (NGRAM.max_n + 1,)
  assert by_context.sum() == plain[0] > 0
  contexts = np.asarray(state.contexts[:, 1])
  np.testing.assert_array_equal(contexts, NGRAM.context(state.seqs))
  assert set(np.flatnonzero(by_context)) <= set(contexts.tolist())


def test_a_contextual_choosers_own_step_lands_in_each_rows_context(params):
  """The n-gram arm's own step: drafts tested per row (accepted + 1, at most gamma,
  for live rows), summed within the context each row was in when the step began."""
  gamma = 3
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(SELF, 4), engine.Arm(NGRAM, gamma)),
                                      16, strategy=AcceptanceKLUCB(contextual=True))
  samplers = Samplers.same(Greedy())
  state = decoder.init(params, *decoder.ar_decoder.prepare(PROMPTS), jax.random.key(0),
                       samplers.target)
  np.testing.assert_array_equal(state.contexts[:, 1], NGRAM.context(state.seqs))
  _, stats = jax.jit(decoder.arm_step, static_argnums=2)(params, state, 1, samplers)
  contexts = np.asarray(state.contexts[:, 1])
  tested = np.asarray(stats["live"]) * np.minimum(np.asarray(stats["accepted"]) + 1, gamma)
  expected = [tested[contexts == c].sum() for c in range(NGRAM.num_contexts)]
  np.testing.assert_array_equal(stats["arm_tested"][1], expected)
  np.testing.assert_array_equal(stats["arm_accepted"][1],
                                np.bincount(contexts, stats["accepted"], NGRAM.num_contexts))
  assert len(set(contexts.tolist())) > 1, "the prompts should put rows in several contexts"
  np.testing.assert_array_equal(stats["arm_tested"][0], 0)


def test_with_step_context_a_model_drafter_learns_in_ngram_lookups_context(params):
  """step_context: the model drafter learns in n-gram lookup's context (AR in none), and
  its own step's drafts land in the context each row was in when the step began."""
  arms = (engine.Arm(SELF, 4), engine.Arm(NGRAM, 2), engine.Arm(NGRAM, 3), engine.Arm())
  own = AcceptanceKLUCB(contextual=True).bind(arms)
  shared = AcceptanceKLUCB(contextual=True, step_context=True).bind(arms)
  assert own.context_arms == (-1, 1, 1, -1) and own.arm_contexts == (1, 3, 3, 1)
  assert shared.context_arms == (1, 1, 1, -1) and shared.arm_contexts == (3, 3, 3, 1)
  with pytest.raises(ValueError, match="step_context is for a contextual chooser"):
    AcceptanceKLUCB(step_context=True)
  decoder = engine.SpeculativeDecoder(TARGET, arms, 16, strategy=shared)
  samplers = Samplers.same(Greedy())
  state = decoder.init(params, *decoder.ar_decoder.prepare(PROMPTS), jax.random.key(0),
                       samplers.target)
  contexts = np.asarray(NGRAM.context(state.seqs))
  np.testing.assert_array_equal(state.contexts, np.stack([contexts] * 3 + [0 * contexts], 1))
  _, stats = jax.jit(decoder.arm_step, static_argnums=2)(params, state, 0, samplers)
  tested = np.asarray(stats["live"]) * np.minimum(np.asarray(stats["accepted"]) + 1, 4)
  np.testing.assert_array_equal(stats["arm_tested"][0],
                                [tested[contexts == c].sum() for c in range(3)])
  assert len(set(contexts.tolist())) > 1, "the prompts should put rows in several contexts"


def test_contextual_choosers_refuse_what_would_ignore_the_contexts():
  arms = (engine.Arm(NGRAM, 4), engine.Arm(SELF, 4))
  with pytest.raises(ValueError, match="bound to its arms"):
    AcceptanceKLUCB(contextual=True).init(2)
  chooser = AcceptanceKLUCB(contextual=True).bind(arms)
  with pytest.raises(ValueError, match="needs the rows' contexts"):
    chooser.select(chooser.init(2), jax.random.key(0))
  with pytest.raises(ValueError, match="no contextual variant"):
    Hedge(contextual=True)


def test_a_choosers_state_is_saved_with_the_results_and_loaded_by_a_later_run(tmp_path):
  arms = (engine.Arm(NGRAM, 2), engine.Arm())
  method = Method("bandit:acceptance_thompson", arms, AcceptanceThompson())
  state = AcceptanceThompson().init(2).replace(accepted=jnp.array([[3.0], [0.0]]),
                                               tested=jnp.array([[5.0], [0.0]]),
                                               pulls=jnp.int32(7))
  saved = jax.tree.map(lambda x: np.asarray(x).tolist(), dataclasses.asdict(state))
  path = tmp_path / "earlier.json"
  path.write_text(json.dumps({"bandit_states": {method.name: saved}}))
  loaded = runner.load_bandit_states(str(path), [Method("ar"), method])
  jax.tree.map(np.testing.assert_array_equal, loaded[method.name], state)
  assert loaded[method.name].pulls.dtype == jnp.int32
  # A file from before evidence was kept per context: [K] where the state holds [K, 1].
  path.write_text(json.dumps({"bandit_states": {method.name: saved | dict(
      accepted=[3.0, 0.0], tested=[5.0, 0.0])}}))
  loaded = runner.load_bandit_states(str(path), [method])
  jax.tree.map(np.testing.assert_array_equal, loaded[method.name], state)
  contextual = Method("bandit:contextual_kl_ucb", arms, AcceptanceKLUCB(contextual=True).bind(arms))
  path.write_text(json.dumps({"bandit_states": {contextual.name: saved}}))
  with pytest.raises(ValueError, match=r"saved accepted has shape \(2, 1\).*\(2, 3\)"):
    runner.load_bandit_states(str(path), [contextual])


def test_chooser_steps_splits_first_calls_and_prices_the_arm_mix():
  """streams.step_costs (bench/chooser_steps.py) on a made-up stream of two sets: n-gram
  is the best fixed arm on chat and over the stream, AR on code, and Hedge's calls
  cost more than their steps, unevenly."""

  def call(method, kind, seconds, steps, tau):
    # No two methods' calls share a prompt here, so none is a held call's twin.
    return dict(method=method, id=f"{method}/{seconds}", kind=kind, new_tokens=tau * steps,
                loop_steps=steps, batch_seconds=seconds, batch_rows=1, text="")
  run = dict(
      _path="run.json", environment=dict(device="gpu:test"),
      config=dict(sampling=dict(gamma=4, temperature=0.0), prompts=dict(order="blocks")),
      arm_costs={"ngram_3:g4": 0.001, "ar": 0.002},
      records=[call("ngram:3", "chat", 0.03, 10, 2), call("ngram:3", "chat", 0.011, 10, 2),
               call("ngram:3", "code", 0.020, 10, 1), call("ar", "chat", 0.03, 10, 1),
               call("ar", "chat", 0.021, 10, 1), call("ar", "code", 0.012, 10, 1),
               call("bandit:hedge", "chat", 0.05, 10, 3),
               call("bandit:hedge", "chat", 0.03, 10, 3),
               call("bandit:hedge", "code", 0.04, 4, 1)],
      bandit_histories={"bandit:hedge": dict(
          arms=["ngram_3:g4", "ar"],
          steps=[["chat", i % 2] for i in range(20)] + [["code", 1]] * 4)})
  out = streams.step_costs(run)
  # Later calls: n-gram 30 tokens in 31 ms, AR 20 in 33 ms.
  assert out["best_fixed"] == "ngram:3"
  assert out["best_fixed_first_call_ms_per_step"] == pytest.approx(3.0)
  assert out["best_fixed_ms_per_step"] == pytest.approx(31 / 20)
  # n-gram's later calls beyond their steps: 11 - 10 and 20 - 10 ms.
  assert out["best_fixed_call_excess_ms"]["calls"] == pytest.approx([1.0, 10.0])
  assert out["best_fixed_call_excess_ms"]["median"] == pytest.approx(5.5)
  (hedge,) = out["choosers"]
  assert hedge["first_call_ms_per_step"] == pytest.approx(5.0)
  assert hedge["ms_per_step"] == pytest.approx(70 / 14)
  assert hedge["tau"] == pytest.approx(34 / 14)
  assert hedge["shares"] == pytest.approx({"ngram_3:g4": 5 / 14, "ar": 9 / 14})
  assert hedge["calibrated_mix_ms"] == pytest.approx((5 * 1 + 9 * 2) / 14)
  # Its calls beyond their steps: 30 - (5 x 1 + 5 x 2) ms on chat; 40 - 4 x 2 ms on code.
  assert hedge["call_excess_ms"]["calls"] == pytest.approx([15.0, 32.0])
  assert hedge["call_excess_ms"]["median"] == pytest.approx(23.5)
  # Best per set: n-gram on chat (20 tokens in 11 ms), AR on code (10 in 12 ms).
  assert hedge["at_mix_by_set"] == pytest.approx(
      {"chat": (30 / (15 + 5.5)) / (20 / 11), "code": (4 / (8 + 5.5)) / (10 / 12)})
  assert hedge["at_own_median_by_set"] == pytest.approx(
      {"chat": (30 / (15 + 23.5)) / (20 / 11), "code": (4 / (8 + 23.5)) / (10 / 12)})
  assert hedge["vs_best_fixed"] == pytest.approx((34 / 70) / (30 / 31))
  with pytest.raises(ValueError, match="batch > 1"):
    streams.step_costs(run | dict(records=[r | dict(batch_rows=2) for r in run["records"]]))


def test_held_calls_leave_out_those_committed_to_their_arm():
  """A call committed to n-gram lookup ran n-gram's own program: it says nothing of what
  the chooser's program costs beyond that arm's."""

  def call(method, prompt, seconds, **extra):
    return dict(method=method, id=prompt, kind="chat", new_tokens=20, loop_steps=10,
                batch_seconds=seconds, batch_rows=1, text="same") | extra
  run = dict(config=dict(sampling=dict(gamma=4)),
             records=[call("ngram:3", "first", 0.01), call("ngram:3", "a", 0.010),
                      call("ngram:3", "b", 0.010)])
  calls = [call("bandit:kl_ucb", "a", 0.012), call("bandit:kl_ucb", "b", 0.011, committed=True)]
  held = streams._held_call_overhead_ms(run, calls, [["ngram_3:g4"] * 10] * 2, ["ngram:3"])
  assert held["calls"] == pytest.approx([2.0])


def test_entry_opcodes_counts_the_instructions_of_the_entry_computation_alone():
  def count_up(x):
    return jax.lax.while_loop(lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.sin(c[1]) * 2),
                              (0, x))[1]
  compiled = jax.jit(count_up).lower(jnp.ones(4)).compile().as_text()
  opcodes = hlo.entry_opcodes(compiled)
  # The loop is one instruction (on a CPU a call of a computation holding it); its body's
  # sin and multiply are inside it.
  assert opcodes["while"] + opcodes["call"] == 1
  assert not {"parameter", "tuple", "get-tuple-element", "sine", "multiply"} & set(opcodes)


def test_loop_bodies_count_each_loops_body_and_its_copies():
  def carried(x):
    # The body reads the old x beside writing a row of it, which XLA may keep apart
    # with copies at every turn: those it makes are counted by shape.
    def body(c):
      i, x = c
      return i + 1, x.at[i].set(x[0] * 2) + x[::-1]
    return jax.lax.while_loop(lambda c: c[0] < 3, body, (0, x))[1]
  (opcodes, copies), = hlo.loop_bodies(
      jax.jit(carried).lower(jnp.ones((4, 8))).compile().as_text()).values()
  assert opcodes.total() > 0 and not {"parameter", "tuple"} & set(opcodes)
  assert sum(copies.values()) == opcodes["copy"]


def test_a_chooser_holding_the_drafter_runs_more_than_the_fixed_drafter_step():
  """bench/step_kernels.py on the tiny target: KL-UCB's held step also scores the n-gram
  arms for free and updates its posteriors, so it has instructions the fixed step has not."""
  target = SyntheticTarget.create("tiny_smollm2", jnp.float32)
  payload = step_kernels.bench(target, ("kl_ucb",), gamma=4, context=32, temperature=1.0,
                               loops=True)
  fixed, held = payload["rows"]
  assert fixed["program"] == "fixed eagle" and held["program"] == "bandit:kl_ucb holding eagle"
  assert fixed["opcodes"]["fusion"] > 0 and held["beyond_fixed"] > 0
  assert held["instructions"] == sum(held["opcodes"].values())
  # The loop that steps the drafter in each whole program holds most of that step's work.
  for row in (fixed, held):
    assert row["loop_instructions"] == sum(row["loop_opcodes"].values())
    assert row["loop_opcodes"]["fusion"] > row["opcodes"]["fusion"] / 2
  assert held["loop_beyond_fixed"] > 0


def test_calls_carrying_a_held_choosers_state_take_the_fixed_drafters_steps():
  """bench/carried_state.py on the tiny target: the held chooser's programs, donated and
  not, step as the fixed drafter does, call after call, on the state the last returned."""
  from flashspec_jax.bench import carried_state  # pylint: disable=import-outside-toplevel
  target = SyntheticTarget.create("tiny_smollm2", jnp.float32)
  payload = carried_state.bench(target, target.prompts(1, 16), new_tokens=12, calls=2)
  assert [row["program"] for row in payload["rows"]] == ["fixed", "donated", "not donated"]
  assert len({row["steps"] for row in payload["rows"]}) == 1
  assert all(len(row["times"]) == 2 and row["call_ms"] > 0 for row in payload["rows"])


def test_stream_goals_hold_each_chooser_to_every_goal():
  """streams.goals (bench/stream_goals.py) on a made-up stream: n-gram is the best fixed
  arm over it (30 tokens in 2.25 s) and on chat, AR on code. The chooser beats n-gram
  over the stream and stays within 10% of the oracle and at AR's speed on code, but
  runs chat at 0.9x n-gram's, below the 0.95x a set needs."""

  def call(method, kind, seconds, tokens):
    return dict(method=method, id=f"{method}/{kind}", kind=kind, new_tokens=tokens,
                batch_seconds=seconds, batch_rows=1)
  records = [call("ngram:3", "chat", 1.0, 20), call("ngram:3", "code", 1.25, 10),
             call("ar", "chat", 1.0, 10), call("ar", "code", 1.0, 10),
             call("bandit:x", "chat", 1.0, 18), call("bandit:x", "code", 1.0, 10)]
  histories = {"bandit:x": dict(arms=["ngram_3:g4", "ar"], steps=[["chat", 0], ["code", 1]])}
  (stream,) = streams.compare(records, histories, {"ngram:3": "ngram_3:g4", "ar": "ar"}).values()
  run = dict(records=records, summaries={
      "ngram:3": {}, "bandit:x": dict(vs_best_fixed=14 / (30 / 2.25), stream=stream)})
  (chooser,) = streams.goals(run).values()
  assert chooser["worst_set"] == "chat" and chooser["worst_ar_set"] == "code"
  assert chooser["worst_set_vs_best"] == pytest.approx(0.9)
  assert chooser["vs_oracle"] == pytest.approx(14 / 15)
  assert chooser["worst_set_vs_ar"] == pytest.approx(1.0)
  # AR's speed on code exactly is the goal met, not missed.
  assert chooser["met"] == dict(vs_best_fixed=True, worst_set_vs_best=False, vs_oracle=True,
                                worst_set_vs_ar=True)
  # Without AR there is nothing to hold the choosers to: the run is left out.
  assert streams.goals(run | dict(records=[r for r in records if r["method"] != "ar"])) == {}
  # The bench names the chooser that met most goals, and counts runs that met all four.
  other = dict(chooser, vs_best_fixed=1.2, met=dict(chooser["met"], vs_best_fixed=False))
  assert stream_goals.best_chooser({"bandit:x": chooser, "bandit:y": other}) == "bandit:x"
  passing = dict(chooser, met=dict.fromkeys(chooser["met"], True))
  runs = [dict(device="gpu:test", temperature=1.0, options="defaults", choosers=choosers)
          for choosers in ({"bandit:x": chooser}, {"bandit:x": passing},
                           {"bandit:x": passing, "bandit:y": passing})]
  (group,) = stream_goals.tally(runs)
  assert group["all_met"] == {"bandit:x": 2, "bandit:y": 1}
  assert group["ran"] == {"bandit:x": 3, "bandit:y": 1}
  before, after, gammas = ({"environment": {"date": date}, "config": {
      "bandit": dict(wait_cost=5e-5, step_context=True), "eagle_checkpoint": "",
      "arms": arms, "sampling": {"gamma": 4}}}
      for date, arms in (("2026-12-06T00:00:00", "ngram:3,eagle:smollm2,ar"),
                         ("2026-12-08T00:00:00", "ngram:3,eagle:smollm2,ar"),
                         ("2026-12-08T00:00:00", "eagle:smollm2@2,eagle:smollm2,ar")))
  assert stream_goals.run_options(before) == "wait_cost 5e-05, step_context"
  assert stream_goals.run_options(after) == "wait_cost 5e-05, step_context, fused drafter"
  assert stream_goals.run_options(gammas) == ("wait_cost 5e-05, step_context, fused drafter, "
                                              "drafter at gammas 2, 4")


def test_held_calls_price_the_chooser_program_against_the_same_steps_of_a_fixed_arm():
  """A chooser's call counts as held only when every step ran one arm and that arm's
  fixed call on the same prompt took the same steps to the same text; then its extra
  time is the program's, not its choices'."""

  def call(method, prompt, seconds, steps, text):
    return dict(method=method, id=prompt, kind="chat", new_tokens=steps, loop_steps=steps,
                batch_seconds=seconds, batch_rows=1, text=text)
  run = dict(
      _path="run.json", environment=dict(device="gpu:test"),
      config=dict(sampling=dict(gamma=4, temperature=1.0), prompts=dict(order="blocks")),
      arm_costs={"eagle_smollm2:g4": 0.001, "ar": 0.002},
      records=[call("eagle:smollm2", p, 0.010, 3, p) for p in "abcd"]
      + [call("ar", p, 0.030, 3, p) for p in "abcd"]
      # The first call (a) is left out as always; b is held on eagle and matches; c ran
      # eagle throughout but sampled other text; d mixed arms.
      + [call("bandit:kl_ucb", "a", 0.5, 3, "a"), call("bandit:kl_ucb", "b", 0.014, 3, "b"),
         call("bandit:kl_ucb", "c", 0.020, 3, "other"),
         call("bandit:kl_ucb", "d", 0.020, 3, "d")],
      bandit_histories={"bandit:kl_ucb": dict(
          arms=["eagle_smollm2:g4", "ar"],
          steps=[["chat", 0]] * 9 + [["chat", 0], ["chat", 1], ["chat", 0]])})
  (chooser,) = streams.step_costs(run)["choosers"]
  assert chooser["held_call_overhead_ms"]["calls"] == pytest.approx([4.0])
  assert chooser["held_call_overhead_ms"]["median"] == pytest.approx(4.0)
  assert streams.describe_held(chooser["held_call_overhead_ms"]) == "4.0 (1)"
  never_held = dict(run, records=run["records"][:-3] + [
      dict(r, text="x") for r in run["records"][-3:]])
  (chooser,) = streams.step_costs(never_held)["choosers"]
  assert chooser["held_call_overhead_ms"] == dict(calls=[], median=None)
  assert streams.describe_held(chooser["held_call_overhead_ms"]) == "-"


def test_the_first_arm_follows_what_the_target_would_accept_of_the_prompt(params):
  """KL-UCB over n-gram and a model drafter, both untried. With no evidence the tie goes
  to the first arm, n-gram. Scored on its prompt before the first step, n-gram still
  goes first on a prompt that repeats what the target writes (this random target
  writes token 1 over and over); the model drafter goes first on a prompt that never
  repeats itself, and on one that repeats text the target would not write, where
  n-gram's drafts match the prompt but the target would reject them."""
  arms = (engine.Arm(NGRAM, 4), engine.Arm(SELF, 4))
  decoder = engine.SpeculativeDecoder(TARGET, arms, 8, eos_ids=(), strategy=AcceptanceKLUCB())
  chooser, samplers = decoder.chooser, Samplers.same(Greedy())
  assert int(chooser.select(chooser.init(2), jax.random.key(0))) == 0
  first, scores = {}, {}
  prior = jax.jit(lambda tokens, lengths: decoder.init(params, tokens, lengths, jax.random.key(0),
                                                       samplers.target).bandit)
  prompts = {"target's": [5, 6, 7] + [1] * 21, "other": [5, 6, 7, 8] * 6,
             "never": list(range(20, 44))}
  for name, prompt in prompts.items():
    tokens, lengths = decoder.ar_decoder.prepare([prompt])
    bandit = prior(tokens, lengths)
    scores[name] = np.asarray(bandit.accepted)[:, 0], np.asarray(bandit.tested)[:, 0]
    first[name] = int(decoder.generate(params, tokens, lengths, jax.random.key(0),
                                       samplers).history.arm[0])
  for name, (accepted, tested) in scores.items():
    assert tested[0] >= engine.PROMPT_POSITIONS, name
    assert tested[1] == accepted[1] == 0  # a model drafter is not scored for free
  (accepted, tested), (other_accepted, other_tested) = scores["target's"], scores["other"]
  assert accepted[0] / tested[0] > 0.8
  # Its drafts match the prompt (a chain goes on only past a match) and are rejected.
  assert other_tested[0] > 2 * engine.PROMPT_POSITIONS and other_accepted[0] == 0
  assert scores["never"][0][0] == 0  # no draft the target would take
  assert first == {"target's": 0, "other": 1, "never": 1}


def test_the_prompt_prior_is_the_targets_acceptance_of_lookups_along_the_prompt(params):
  """The prior, by search: at each of the last PROMPT_POSITIONS positions of the committed
  tokens, n-gram's drafts from the tokens before it, each tested while the drafts before
  it matched the prompt and accepted with the target's probability of it (temperature 2,
  so that no probability is 0 or 1), in the context of that position's match."""
  arms = (engine.Arm(NGRAM, 3), engine.Arm(SELF, 2))
  decoder = engine.SpeculativeDecoder(TARGET, arms, 8, eos_ids=(),
                                      strategy=AcceptanceKLUCB(contextual=True))
  sampler = Temperature(2.0)
  prompt = [5, 6, 7, 5, 6, 9, 5, 6, 7, 3, 5, 6] * 2
  tokens, lengths = decoder.ar_decoder.prepare([prompt])
  state = jax.jit(decoder.init)(params, tokens, lengths, jax.random.key(0), sampler)
  length = int(state.seqs.seq_lens[0])
  committed = np.asarray(state.seqs.tokens)[0, :length].tolist()
  logits, _ = TARGET.apply(params["target"], jnp.asarray([committed]),
                           engine.KVCache.init(CONFIG, 1, length, dtype=jnp.float32))
  p = np.exp(np.asarray(sampler.log_probs(logits))[0])  # p[t]: of the token after t
  accepted = np.zeros(NGRAM.num_contexts)
  tested = np.zeros_like(accepted)
  for back in range(1, engine.PROMPT_POSITIONS + 1):
    end = length - back
    start, context = latest_longest_match(committed, end, NGRAM.max_n)
    for i in range(min(3, back)):
      draft = committed[start + i] if start >= 0 and start + i < end else committed[end - 1]
      tested[context] += 1
      accepted[context] += p[end - 1 + i, draft]
      if draft != committed[end + i]:
        break
  np.testing.assert_allclose(np.asarray(state.bandit.tested)[0], tested)
  np.testing.assert_allclose(np.asarray(state.bandit.accepted)[0], accepted, rtol=1e-5)
  assert 0 < accepted.sum() < tested.sum() and np.count_nonzero(tested) > 1


@pytest.mark.parametrize("event", ["change", "wait"])
@pytest.mark.parametrize("device", ["gpu:test", "cpu:cpu"])
def test_chooser_steps_fits_what_a_change_of_step_body_costs(device, event):
  """Calls whose excess is 3 ms per chooser, 0.05 ms a step and 0.2 ms a change of step
  body, or a wait for the host that the changes add, give those back. On a GPU
  n-gram's arms at two gammas share a body, so moving between them is no change; on a
  CPU each arm has its own."""
  arms = ["ngram_3:g2", "ngram_3:g4", "eagle_smollm2:g4", "ar"]
  costs = {"ngram_3:g2": 0.001, "ngram_3:g4": 0.001, "eagle_smollm2:g4": 0.002, "ar": 0.001}
  on_gpu = device.startswith("gpu")
  # _body_moves gives (changes of body, waits for the host) per call.
  count = lambda picked: streams._body_moves(picked, arms, on_gpu)[["change", "wait"].index(event)]
  records, histories = [], {}
  for method, intercept in (("bandit:kl_ucb", 3.0), ("bandit:hedge", 5.0)):
    steps = []
    patterns = [[0], [0, 1], [0, 2], [0, 1, 2, 2], [2, 0, 1], [1, 2], [3, 2], [0, 3, 1]]
    for call, pattern in enumerate(patterns * 2):
      picks = (pattern * 7)[:6 + call]
      ms = intercept + 0.05 * len(picks) + 0.2 * count([arms[a] for a in picks])
      seconds = sum(costs[arms[a]] for a in picks) + ms / 1e3
      records.append(dict(method=method, id=f"{method}/{call}", kind="chat", new_tokens=1,
                          loop_steps=len(picks), batch_seconds=seconds, batch_rows=1, text=""))
      steps += [["chat", a] for a in picks]
    histories[method] = dict(arms=arms, steps=steps)
  records += [dict(method="eagle:smollm2", id=f"eagle/{i}", kind="chat", new_tokens=2,
                   loop_steps=2, batch_seconds=0.005, batch_rows=1, text="") for i in range(2)]
  run = dict(_path="run.json", environment=dict(device=device),
             config=dict(sampling=dict(gamma=4, temperature=1.0), prompts=dict(order="blocks")),
             arm_costs=costs, records=records, bandit_histories=histories)
  out = streams.step_costs(run)
  fit = out[dict(change="body_change_fit", wait="host_wait_fit")[event]]
  assert fit[f"ms_per_{event}"] == pytest.approx(0.2, abs=1e-9)
  assert fit["ms_per_step"] == pytest.approx(0.05, abs=1e-9)
  # The first call of each chooser is left out, as everywhere in step_costs.
  assert fit["intercept_ms"] == pytest.approx({"bandit:hedge": 5.0, "bandit:kl_ucb": 3.0})
  assert fit["calls"] == 30
  # [0, 1] repeated: a change of body every step on a CPU, none on a GPU.
  assert streams._body_moves(arms[:2] * 3, arms, on_gpu)[0] == (0 if on_gpu else 5)
  # n-gram to the drafter and back: on a GPU bodies (n-gram, drafter, AR), one wait
  # forward and three back round; on a CPU the two n-gram arms' bodies come first.
  assert streams._body_moves([arms[0], arms[2], arms[0]], arms, on_gpu)[1] == (
      1 + 3 if on_gpu else 2 + 3)

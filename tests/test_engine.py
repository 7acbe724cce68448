"""The speculative engine: greedy equivalence, ragged batches, budgets, metrics, errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_as_one_program, spread_params, tiny_config
from helpers import latest_longest_match, loops_per_step

from flashspec_jax import engine
from flashspec_jax.bandit import UCB1, EpsilonGreedy, Fixed, Thompson
from flashspec_jax.bench.hlo import buffer_copies, cache_shapes
from flashspec_jax.drafters import ModelDrafter, NgramDrafter
from flashspec_jax.kernels.verify import verify_reference
from flashspec_jax.generate import Decoder, run_generate
from flashspec_jax.models.llama import Llama
from flashspec_jax.sampling import Greedy, Samplers, Temperature, TopP
from flashspec_jax.sequences import PAD_ID, Sequences, loop_until_done, prepare_prompts

CONFIG = tiny_config(num_layers=4)
DRAFT_CONFIG = tiny_config(num_layers=1, hidden_size=16, num_heads=2, num_kv_heads=1)
TARGET = Llama(CONFIG, param_dtype=jnp.float32)
# Draft steps in one loop body (unroll=False) compile several times faster on CPU;
# the layer-skip drafter keeps the unrolled GPU default covered.
DRAFTERS = {
    "small": ModelDrafter(Llama(DRAFT_CONFIG, param_dtype=jnp.float32), "small", unroll=False),
    "layer_skip": ModelDrafter(Llama(CONFIG, num_layers=2, param_dtype=jnp.float32)),
    "self": ModelDrafter(TARGET, unroll=False),
}
PROMPTS = [[5, 6, 7], list(range(8, 20)), [1], [3, 3, 3, 3], [9, 2], list(range(30, 39)),
           [4] * 6, [60, 61, 62, 63, 0]]  # batch 8, lengths 1 to 12


@pytest.fixture(scope="module")
def params():
  return {"target": spread_params(CONFIG, seed=0),
          "drafters": {"small": spread_params(DRAFT_CONFIG, seed=1)}}


def speculate(params, drafter="small", prompts=PROMPTS, gamma=3, target_sampler=Greedy(),
              max_new_tokens=16, **kwargs):
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(DRAFTERS[drafter], gamma),),
                                      max_new_tokens, **kwargs)
  return engine.run_speculative(params, decoder, prompts, jax.random.key(0),
                                Samplers.same(target_sampler))


@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculation_equals_greedy_ar_on_a_ragged_batch(params, drafter, gamma):
  ar = run_generate(params["target"], Decoder(TARGET, 16), PROMPTS, jax.random.key(0), Greedy())
  out = speculate(params, drafter, gamma=gamma)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  np.testing.assert_array_equal(out.num_tokens, 16)


def test_acceptance_is_ragged_across_rows(params):
  out = speculate(params, "layer_skip", gamma=4)
  accepted_per_step = out.metrics.accepted / np.maximum(out.metrics.steps, 1)
  assert len(set(np.round(np.asarray(accepted_per_step), 3))) > 1


def test_drafting_with_the_target_accepts_everything(params):
  out = speculate(params, "self", gamma=4, max_new_tokens=21, target_sampler=Temperature(1.0))
  summary = engine.summarize(out.metrics)
  assert summary["alpha"] == 1.0
  # 20 tokens after the prefill's first: four full steps of 5 tokens per row.
  assert summary["tau"] == 5.0 and summary["steps"] == 8 * 4
  assert summary["accept_hist"] == [0, 0, 0, 0, 32]


def test_alpha_stops_counting_at_the_first_rejection(params):
  out = speculate(params, "small", gamma=4, target_sampler=Temperature(1.0))
  m = jax.tree.map(np.asarray, out.metrics)
  hist = m.accept_hist.sum(axis=0)
  n = np.arange(5)
  assert m.accepted.sum() == (hist * n).sum()
  assert m.tested.sum() == (hist * np.minimum(n + 1, 4)).sum()
  assert m.proposed.sum() == 4 * hist.sum()
  summary = engine.summarize(out.metrics)
  assert summary["alpha"] == pytest.approx(m.accepted.sum() / m.tested.sum())
  assert summary["alpha"] > m.accepted.sum() / m.proposed.sum() or summary["alpha"] == 1


@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 13])
def test_no_overshoot_of_max_new_tokens(params, max_new_tokens):
  out = speculate(params, "self", gamma=4, max_new_tokens=max_new_tokens,
                  target_sampler=Temperature(1.0))
  assert out.tokens.shape == (8, max_new_tokens)
  np.testing.assert_array_equal(out.num_tokens, max_new_tokens)


def test_per_row_eos(params):
  free = speculate(params, "layer_skip", gamma=4).tokens
  eos = int(free[1, 5])
  first_hit = [int(np.argmax(row == eos)) + 1 if (row == eos).any() else 16 for row in free]
  out = speculate(params, "layer_skip", gamma=4, eos_ids=(eos,))
  np.testing.assert_array_equal(out.num_tokens, first_hit)
  for row, n in enumerate(first_hit):
    assert out.tokens[row, :n].tolist() == free[row, :n].tolist()
    assert (out.tokens[row, n:] == PAD_ID).all()


def test_speculation_is_one_program_without_host_transfers(params, caplog):
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  args = jax.device_put((params, tokens, lengths, jax.random.key(0)))
  samplers = jax.device_put(Samplers(target=TopP(0.9, 0.8), draft=Temperature(1.0)))
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(DRAFTERS["small"], 4),), 10,
                                      eos_ids=(3,))
  hlo = decoder.lower(*args, samplers, None).compile().as_text()
  assert re.search(r"= .* while\(", hlo)
  for host_op in (r"\boutfeed\(", r"\binfeed\(", r"\bsend\(", r"\brecv\(", "callback"):
    assert not re.search(host_op, hlo), host_op
  out = run_as_one_program(caplog, decoder.generate, *args, samplers)
  assert (np.asarray(out.num_tokens) >= 1).all()


def test_drafter_vocabulary_must_match(params):
  other = ModelDrafter(Llama(tiny_config(vocab_size=65), param_dtype=jnp.float32), "small")
  with pytest.raises(ValueError, match="drafter vocabulary \\(65\\) differs from the target's "
                                       "\\(64\\)"):
    engine.SpeculativeDecoder(TARGET, (engine.Arm(other, 2),), 4)


def test_bad_gamma_is_rejected(params):
  with pytest.raises(ValueError, match="gamma must be >= 1, got 0"):
    speculate(params, gamma=0)
  with pytest.raises(ValueError, match="\\+ 5 speculative slots = 33 exceeds the KV cache "
                                       "capacity of 32"):
    speculate(params, gamma=4, max_new_tokens=16, capacity=32)
  with pytest.raises(ValueError, match="exceeds the model's 256 positions"):
    speculate(params, gamma=4, max_new_tokens=250)
  with pytest.raises(ValueError, match=f"gamma must be <= MAX_GAMMA = {engine.MAX_GAMMA}, got "
                                       f"{engine.MAX_GAMMA + 1}"):
    speculate(params, gamma=engine.MAX_GAMMA + 1)


def test_nan_logits_are_reported_not_sampled(params):
  poisoned = {"target": params["target"],
              "drafters": {"small": jax.tree.map(lambda x: x.at[...].set(jnp.nan),
                                                 params["drafters"]["small"])}}
  with pytest.raises(FloatingPointError, match="NaN logits for rows \\[0, 1, 2, 3, 4, 5, 6, 7\\]"):
    speculate(poisoned, "small", target_sampler=Temperature(1.0))


def test_nan_drafter_is_named_under_greedy_sampling(params):
  """A greedy q is a one-hot at the argmax, which hid NaN draft logits: alpha was 0
  and nothing was reported."""
  poisoned = {"target": params["target"],
              "drafters": {"small": jax.tree.map(lambda x: x.at[...].set(jnp.nan),
                                                 params["drafters"]["small"])}}
  with pytest.raises(FloatingPointError, match="the drafter of arm 'draft_model:small@3' produced NaN "
                                               "logits for rows \\[0, 1, 2, 3, 4, 5, 6, 7\\]"):
    speculate(poisoned, "small")


def test_nan_target_is_named(params):
  poisoned = {"target": jax.tree.map(lambda x: x.at[...].set(jnp.nan), params["target"]),
              "drafters": params["drafters"]}
  with pytest.raises(FloatingPointError, match="^the target model produced NaN logits"):
    speculate(poisoned, "small")


def test_greedy_speculation_equals_greedy_ar_on_smollm2(smollm2, smollm2_heldout):
  """Five real held-out prompts (chat, code), 128 new tokens each, layer-skip drafter, f32."""
  config, params, _ = smollm2
  prompts, ar_tokens = smollm2_heldout
  target = Llama(config, param_dtype=jnp.float32)
  # Deep enough that most drafts are partly accepted (alpha ~0.5): every accepted count
  # from 0 to gamma then occurs, where a shallow drafter is almost always rejected at once.
  drafter = ModelDrafter(Llama(config, num_layers=28, param_dtype=jnp.float32), unroll=False)
  decoder = engine.SpeculativeDecoder(target, (engine.Arm(drafter, 4),), 128, eos_ids=())
  out = engine.run_speculative({"target": params}, decoder, prompts, jax.random.key(0),
                               Samplers.same(Greedy()))
  for row in range(len(prompts)):
    assert out.tokens[row].tolist() == ar_tokens[row].tolist(), f"prompt {row} diverges"
  assert all(engine.summarize(out.metrics)["accept_hist"]), "some accepted counts never occur"


def test_ngram_drafter_proposes_what_followed_the_last_match():
  tokens = jnp.array([[7, 1, 2, 3, 4, 9, 1, 2, 0, 0, 0, 0],   # "1 2" seen before, then "3 4 9"
                      [5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0, 0]])  # no earlier match: repeat last
  seq_lens = jnp.array([8, 4])
  drafter = NgramDrafter(vocab_size=10, max_n=2)
  seqs = Sequences(tokens=tokens, seq_lens=seq_lens, prompt_lens=seq_lens,
                   done=jnp.zeros(2, bool), nan_rows=jnp.zeros(2, bool), rng=jax.random.key(0))
  _, drafts, logq = drafter.propose(None, (), seqs, 4, Greedy(), None)
  assert drafts.tolist() == [[3, 4, 9, 1], [8, 8, 8, 8]]
  np.testing.assert_array_equal(jnp.argmax(logq, -1), drafts)
  assert (jnp.exp(logq).sum(-1) == 1).all()


@pytest.mark.parametrize("max_n", [1, 3])
def test_ngram_lookup_finds_the_latest_longest_match(max_n):
  """On random text over 3 symbols, where matches of every length are common, with
  lengths from 1 to the buffer's width."""
  rng = np.random.default_rng(max_n)
  tokens = rng.integers(0, 3, (64, 12))
  seq_lens = rng.integers(1, 13, 64)
  seqs = Sequences(tokens=jnp.asarray(tokens), seq_lens=jnp.asarray(seq_lens),
                   prompt_lens=jnp.asarray(seq_lens), done=jnp.zeros(64, bool),
                   nan_rows=jnp.zeros(64, bool), rng=jax.random.key(0))
  continuation, match_length = NgramDrafter(3, max_n).lookup(seqs)
  expected = [latest_longest_match(row.tolist(), length, max_n)
              for row, length in zip(tokens, seq_lens)]
  assert list(zip(continuation.tolist(), match_length.tolist())) == expected
  assert {n for _, n in expected} == set(range(max_n + 1))

def bandit_arms(**chunks):
  return (engine.Arm(ModelDrafter(DRAFTERS["small"].model, "small", unroll=False, **chunks), 3),
          engine.Arm(ModelDrafter(DRAFTERS["layer_skip"].model, unroll=False, **chunks), 2),
          engine.Arm(NgramDrafter(CONFIG.vocab_size, 3), 4), engine.Arm())


def bandit_generate(params, strategy, arms, max_new_tokens=24, **kwargs):
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  samplers = Samplers(target=kwargs.pop("sampler", Greedy()), draft=Greedy())
  decoder = engine.SpeculativeDecoder(TARGET, arms, max_new_tokens, strategy=strategy,
                                      capacity=tokens.shape[1] + max_new_tokens + 5, **kwargs)
  return decoder.generate(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0),
                          samplers)


@pytest.mark.parametrize("strategy", [Fixed(0), UCB1()], ids=["fixed", "ucb1"])
def test_a_choosers_state_is_donated_and_a_fixed_arms_is_not(params, strategy):
  """A chooser's state, handed from call to call, is written where it was handed; a fixed
  arm's, made afresh for each call, is left alone (donated, it slowed the fixed drafter)."""
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  arms = (engine.Arm(NgramDrafter(CONFIG.vocab_size, 3), 2), engine.Arm())
  decoder = engine.SpeculativeDecoder(TARGET, arms, 6, strategy=strategy)
  handed = decoder.chooser.init(len(arms))
  decoder.generate(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0),
                   Samplers.same(Greedy()), handed)
  deleted = [leaf.is_deleted() for leaf in jax.tree.leaves(handed)]
  assert deleted == [not isinstance(strategy, Fixed)] * len(deleted)


@pytest.mark.parametrize("strategy", [EpsilonGreedy(0.7), Thompson()], ids=["eps", "thompson"])
def test_switching_arms_keeps_greedy_output(params, strategy):
  """Arms used rarely catch up when picked, in wide chunks (of 5 here) while more than a
  chunk (3) is missing, then in chunks; greedy output is AR's."""
  out = bandit_generate(params, strategy, bandit_arms(chunk=3, wide_chunk=5))
  ar = run_generate(params["target"], Decoder(TARGET, 24), PROMPTS, jax.random.key(0), Greedy())
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  arms = np.asarray(out.history.arm[:int(out.steps)])
  assert len(set(arms.tolist())) == 4, "every arm should have been used"
  assert (np.asarray(out.history.arm[int(out.steps):]) == -1).all()
  rewards = np.asarray(out.history.reward[:int(out.steps)])
  assert ((rewards >= 0) & (rewards <= 1)).all()
  np.testing.assert_allclose(out.bandit.counts.sum(), int(out.steps))


@pytest.mark.parametrize("name", ["small", "layer_skip"])
def test_a_running_model_drafter_steps_without_loops_of_its_own(params, name):
  """Settled once before the step loop, a model drafter's steps hold neither of its
  catch-up loops (on a GPU each is a wait for the host): a step it ran leaves it only
  the last one or two tokens to feed."""
  decoder = engine.SpeculativeDecoder(TARGET, (engine.Arm(DRAFTERS[name], 3),), 16)
  assert loops_per_step(decoder, params, PROMPTS, CONFIG.vocab_size,
                        Samplers.same(Greedy())) == 0


def prefilled_bandit(params, arms, strategy):
  """The state after prefilling PROMPTS, and the decoder's step(params, state) for these arms."""
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  decoder = engine.SpeculativeDecoder(TARGET, arms, 20, strategy=strategy,
                                      capacity=tokens.shape[1] + 30, verify_fn=verify_reference)
  state = decoder.init(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0),
                       Greedy())
  return state, lambda params, state: decoder.step(params, state, Samplers.same(Greedy()))


def test_idle_arms_are_not_touched(params):
  state, step = prefilled_bandit(params, bandit_arms(), Fixed(2))
  lengths = state.seqs.prompt_lens
  step = jax.jit(step)
  for _ in range(3):
    state = step(params, state)
  assert (state.seqs.seq_lens > lengths + 3).any()  # the n-gram arm made progress
  for idle in (0, 1):  # the model arms never ran: their caches are still empty
    np.testing.assert_array_equal(state.drafter_states[idle].lengths, 0)


def test_the_bandit_step_updates_every_cache_in_place(params):
  """No cache buffer is copied inside the compiled step: a `lax.switch` over the
  arms copied all of them (XLA copies what a conditional's branches return)."""
  state, step = prefilled_bandit(params, bandit_arms(), UCB1())
  loop = jax.jit(lambda p, s: jax.lax.fori_loop(0, 2, lambda _, s: step(p, s), s))
  copied = buffer_copies(loop.lower(params, state).compile().as_text(), cache_shapes(state))
  assert not copied, f"{len(copied)} cache copies per step, e.g. {copied[0]}"


def test_the_generation_loop_takes_steps_in_place_as_step_would(params):
  """The generation loop runs each step body in a loop of its own (`run_steps`), yet
  takes the steps `step` takes in one loop, in the same order, at temperature 1 under
  Thompson sampling; and no step copies a cache."""
  ngram = bandit_arms()[2].drafter
  arms = (*bandit_arms(), engine.Arm(ngram, 2))  # n-gram at gammas 4 and 2 share a body
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  decoder = engine.SpeculativeDecoder(TARGET, arms, 24, strategy=Thompson(),
                                      capacity=tokens.shape[1] + 30, verify_fn=verify_reference)
  samplers = Samplers.same(Temperature(1.0))
  args = (params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(3), samplers, None)

  def stepped(params, tokens, lengths, rng, samplers, bandit):
    state = decoder.init(params, tokens, lengths, rng, samplers.target, bandit)
    return loop_until_done(state, lambda state: decoder.step(params, state, samplers), 24)

  program = decoder.lower(*args).compile()
  state = jax.eval_shape(decoder.init, *args[:4], samplers.target)
  copied = buffer_copies(program.as_text(), cache_shapes(state))
  assert not copied, f"{len(copied)} cache copies per step, e.g. {copied[0]}"
  out, looped = program(*args), jax.jit(stepped)(*args)
  np.testing.assert_array_equal(out.tokens, looped.seqs.generated(24))
  np.testing.assert_array_equal(out.history.arm, looped.history.arm)
  np.testing.assert_array_equal(out.history.reward, looped.history.reward)
  assert len(set(np.asarray(out.history.arm[:int(out.steps)]).tolist())) == len(arms)


def test_arms_of_one_free_drafter_share_a_step_body():
  ngram, other = NgramDrafter(CONFIG.vocab_size, 3), NgramDrafter(CONFIG.vocab_size, 2)
  arms = (engine.Arm(ngram, 2), engine.Arm(DRAFTERS["small"], 2), engine.Arm(ngram, 4),
          engine.Arm(), engine.Arm(other, 2), engine.Arm(DRAFTERS["small"], 4), engine.Arm())
  assert engine.step_bodies(arms) == ((0, 2), (1,), (3,), (4,), (5,), (6,))


@pytest.mark.parametrize("held", [0, 1])
def test_an_arm_in_a_shared_step_body_steps_as_it_does_alone(params, held):
  """Greedy, an n-gram arm stepped in the body it shares with a wider one (drafting and
  verifying 4 tokens) emits, accepts and tests what it does alone, step for step: at
  gamma 1 its step keeps one draft's test and the bonus token after it."""
  ngram = NgramDrafter(CONFIG.vocab_size, 2)
  arms = (engine.Arm(ngram, 1), engine.Arm(ngram, 4))
  shared = bandit_generate(params, Fixed(held), arms, verify_fn=verify_reference)
  alone = bandit_generate(params, Fixed(0), arms[held:held + 1], verify_fn=verify_reference)
  np.testing.assert_array_equal(shared.tokens, alone.tokens)
  for field in ("steps", "proposed", "tested", "accepted", "emitted"):
    np.testing.assert_array_equal(getattr(shared.metrics, field), getattr(alone.metrics, field))
  # Drafts were accepted: at gamma 1, every such step ended on the shared body's bonus.
  assert int(shared.metrics.accepted.sum()) > 0


def test_goodput_reward_prefers_cheap_tokens():
  arms = (engine.Arm(NgramDrafter(64, 2), 4, cost=2.0), engine.Arm(cost=1.0))
  stats = dict(emitted=jnp.array([5, 5]), accepted=jnp.array([4, 4]), live=jnp.array([True, True]))
  # 5 tokens at cost 2 is the best rate possible (5 / 2), so the reward is 1.
  assert float(engine.Goodput()(stats, 0, arms)) == pytest.approx(1.0)
  one = dict(emitted=jnp.array([1, 1]), accepted=jnp.array([0, 0]), live=jnp.array([True, True]))
  assert float(engine.Goodput()(one, 1, arms)) == pytest.approx(1 / 2.5)
  assert float(engine.Acceptance()(stats, 0, arms)) == pytest.approx(1.0)
  assert float(engine.Acceptance()(one, 1, arms)) == 0.0


def test_bandit_generation_is_one_program(params, caplog):
  tokens, lengths = prepare_prompts(PROMPTS, CONFIG.vocab_size)
  args = jax.device_put((params, tokens, lengths, jax.random.key(0),
                         Samplers.same(Temperature(1.0))))
  decoder = engine.SpeculativeDecoder(TARGET, bandit_arms(), 10, strategy=UCB1(),
                                      capacity=tokens.shape[1] + 15)
  out = run_as_one_program(caplog, decoder.generate, *args)
  assert int(out.bandit.counts.sum()) == int(out.steps) > 0


def test_arms_are_validated():
  with pytest.raises(ValueError, match="an AR arm has gamma 0"):
    engine.Arm(None, 3)
  with pytest.raises(ValueError, match="arm cost must be > 0"):
    engine.Arm(cost=0.0)
  with pytest.raises(ValueError, match=r"Fixed\(2\) names no arm of 2"):
    engine.SpeculativeDecoder(TARGET, (engine.Arm(), engine.Arm(NgramDrafter(64, 2), 2)), 4,
                              strategy=Fixed(2))
  with pytest.raises(ValueError, match="unknown reward 'speed'"):
    engine.reward_named("speed")

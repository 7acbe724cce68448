"""Exact speculative decoding, with drafters chosen online by a bandit, as one XLA program.

`speculative_generate` is jitted whole: prefill, then a `lax.while_loop`
whose body (`bandit_step`) lets the bandit pick an arm, runs that arm's step
alone (`dispatch`), and feeds the step's reward back to the bandit. An arm
is a drafter with its own gamma, or a plain AR step. An arm's step
(`speculative_step`) drafts gamma tokens, scores them with one target forward
of gamma + 1 tokens, verifies, appends and rolls the caches back by a length
update. Arms not selected do no work: their caches lag and catch up, in
chunks, the next time they are picked. A single drafter is the one-arm case.

Exactness survives the bandit: the arm for step t depends only on steps
before t, so conditioned on the past each step is an exact speculative step
with some fixed drafter, and its output is distributed as the target's.

Per-row bookkeeping follows `generate`: prompts are right-padded, each row's
tokens continue right after its own prompt, and the target cache holds every
committed token but the last. Each row accepts its own number of drafts and
emits at most its remaining budget, stopping at its first EOS, so what is
returned never overshoots max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from flashspec_jax.bandit.strategies import BanditState, Fixed, Strategy
from flashspec_jax.drafters import Drafter
from flashspec_jax.generate import (GenerationOutput, append_tokens, check_budget,
                                    generated_tokens, is_stop_token, prefill, prepare_prompts,
                                    raise_on_nan)
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Sampler

# (target_logp [B, G+1, V], draft_logq [B, G, V], draft_tokens [B, G], seeds [B])
#   -> (num_accepted [B], next_token [B])
VerifyFn = Callable[..., tuple[jax.Array, jax.Array]]
REWARDS = ("goodput", "acceptance")
# With per-draft acceptance alpha a step emits (1 - alpha^(gamma+1)) / (1 - alpha)
# tokens on average, never more than 1 / (1 - alpha). At alpha = 0.9, beyond any
# drafter measured here, gamma = 32 already reaches 97% of that limit, while the
# drafting, the verify pass and its [B, gamma+1, V] log-probabilities keep growing
# linearly with gamma (gamma = 1000 ran at 6.4 s per step). A larger gamma only
# costs time, so it is refused.
MAX_GAMMA = 32


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way to take a step: a drafter with its gamma, or plain AR (drafter None).

  Attributes:
    drafter: a ModelDrafter or NgramDrafter, or None for an AR step.
    gamma: draft tokens per step (0 for AR).
    cost: the step's cost in any unit (only ratios between arms matter); the
      goodput reward divides tokens by it.
  """

  drafter: Drafter | None = None
  gamma: int = 0
  cost: float = 1.0

  def __post_init__(self):
    if (self.drafter is None) != (self.gamma == 0):
      raise ValueError(f"an AR arm has gamma 0 and a drafter arm gamma >= 1; got gamma "
                       f"{self.gamma} with drafter {self.drafter}")
    if self.gamma < 0:
      raise ValueError(f"gamma must be >= 1, got {self.gamma}")
    if self.gamma > MAX_GAMMA:
      raise ValueError(f"gamma must be <= MAX_GAMMA = {MAX_GAMMA}, got {self.gamma}: a longer "
                       f"draft only costs time (see engine.MAX_GAMMA)")
    if not self.cost > 0:
      raise ValueError(f"arm cost must be > 0, got {self.cost}")

  @property
  def name(self) -> str:
    return "ar" if self.drafter is None else f"{self.drafter.name}:g{self.gamma}"


@struct.dataclass(kw_only=True)
class SpecMetrics:
  """Device-side counters, per row.

  Attributes:
    steps: [B] int32, loop steps the row took part in.
    proposed: [B] int32, draft tokens proposed (gamma per speculative step).
    tested: [B] int32, drafts the accept test reached: n + 1 on a rejection, gamma if none.
    accepted: [B] int32, drafts accepted.
    emitted: [B] int32, tokens appended (accepted + the corrected or bonus token,
      less what EOS or the budget cut).
    accept_hist: [B, max gamma + 1] int32, speculative steps by drafts accepted.
  """

  steps: jax.Array
  proposed: jax.Array
  tested: jax.Array
  accepted: jax.Array
  emitted: jax.Array
  accept_hist: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_gamma: int) -> SpecMetrics:
    z = jnp.zeros((batch,), jnp.int32)
    return cls(steps=z, proposed=z, tested=z, accepted=z, emitted=z,
               accept_hist=jnp.zeros((batch, max_gamma + 1), jnp.int32))


@struct.dataclass(kw_only=True)
class ArmHistory:
  """What the bandit did at each loop step (slots past the last step hold -1 and 0).

  Attributes:
    arm: [S] int32, the arm chosen; S = max_new_tokens bounds the loop steps.
    reward: [S] f32, the reward it received.
    emitted: [S] int32, tokens emitted by all rows in that step.
  """

  arm: jax.Array
  reward: jax.Array
  emitted: jax.Array

  @classmethod
  def empty(cls, num_steps: int) -> ArmHistory:
    return cls(arm=jnp.full((num_steps,), -1, jnp.int32),
               reward=jnp.zeros((num_steps,), jnp.float32),
               emitted=jnp.zeros((num_steps,), jnp.int32))


@struct.dataclass(kw_only=True)
class SpecState:
  """The speculative loop's carry.

  Attributes:
    tokens: [B, L] int32, prompt then committed tokens; L = P + max_new + max gamma + 1.
    seq_lens: [B] int32, committed tokens per row.
    prompt_lens: [B] int32.
    target_cache: holds seq_lens - 1 tokens per row between steps.
    drafter_states: one per arm (a KVCache, or () for stateless arms); a
      drafter's cache holds at most seq_lens - 1 tokens per row between steps.
    bandit: the bandit's state.
    done: [B] bool.
    nan_rows: [B] bool, rows stopped because target or draft logits were NaN.
    nan_arm: [B] int32, the arm whose drafter's logits were NaN; -1 where none were.
    rng: PRNG key.
    step: [] int32, loop iterations.
    metrics: SpecMetrics.
    history: ArmHistory.
  """

  tokens: jax.Array
  seq_lens: jax.Array
  prompt_lens: jax.Array
  target_cache: KVCache
  drafter_states: tuple
  bandit: BanditState
  done: jax.Array
  nan_rows: jax.Array
  nan_arm: jax.Array
  rng: jax.Array
  step: jax.Array
  metrics: SpecMetrics
  history: ArmHistory


@struct.dataclass(kw_only=True)
class SpecOutput(GenerationOutput):
  """GenerationOutput plus the arm whose drafter gave NaN logits (SpecState.nan_arm),
  the loop's metrics, the bandit's final state and history."""

  nan_arm: jax.Array
  metrics: SpecMetrics
  bandit: BanditState
  history: ArmHistory


def emitted_counts(new_tokens, num_accepted, remaining, eos_ids):
  """Tokens each row keeps of new_tokens [B, G+1]: accepted + 1, cut after the first EOS
  and at the remaining budget."""
  width = new_tokens.shape[1]
  position = jnp.arange(width)[None, :]
  in_step = position <= num_accepted[:, None]
  stops = is_stop_token(new_tokens, eos_ids) & in_step
  first_stop = jnp.where(stops.any(axis=1), jnp.argmax(stops, axis=1), width)
  return jnp.minimum(jnp.minimum(num_accepted + 1, first_stop + 1), remaining)


def speculative_step(params, state: SpecState, target_sampler: Sampler, draft_sampler: Sampler,
                     *, arm_index: int, arms: tuple[Arm, ...], target: Llama,
                     max_new_tokens: int, eos_ids: tuple[int, ...],
                     verify_fn: VerifyFn) -> tuple[SpecState, dict[str, jax.Array]]:
  """One step of arms[arm_index]: draft, verify with one target pass, append, roll back.

  Rows already done do not change. Returns the new state and the step's
  per-row `emitted`, `accepted` and `live` arrays, from which rewards are made.
  """
  arm = arms[arm_index]
  gamma = arm.gamma
  batch = state.tokens.shape[0]
  active = ~state.done
  rng, draft_key, verify_key = jax.random.split(state.rng, 3)
  last = state.tokens[jnp.arange(batch), state.seq_lens - 1]

  drafter_states = list(state.drafter_states)
  if arm.drafter is None:
    logits, target_cache = target.apply(params["target"], last[:, None], state.target_cache)
    num_accepted = jnp.zeros((batch,), jnp.int32)
    next_token = target_sampler.get_next_tokens(logits[:, 0], verify_key)
    new_tokens = next_token[:, None]
    draft_nan = jnp.zeros((batch,), bool)
  else:
    drafter_states[arm_index], draft_tokens, draft_logq = arm.drafter.propose(
        params, state.drafter_states[arm_index], state.tokens, state.seq_lens, gamma,
        draft_sampler, draft_key)
    scored = jnp.concatenate([last[:, None], draft_tokens], axis=1)  # [B, G+1]
    logits, target_cache = target.apply(params["target"], scored, state.target_cache)
    target_logp = target_sampler.log_probs(logits)  # [B, G+1, V]
    seeds = jax.random.bits(verify_key, (batch,), jnp.uint32)
    num_accepted, next_token = verify_fn(target_logp, draft_logq, draft_tokens, seeds)
    position = jnp.arange(gamma + 1)[None, :]
    new_tokens = jnp.where(position == num_accepted[:, None], next_token[:, None],
                           jnp.pad(draft_tokens, ((0, 0), (0, 1))))
    draft_nan = jnp.isnan(draft_logq).any(axis=(1, 2))

  nan_rows = active & (jnp.isnan(logits).any(axis=(1, 2)) | draft_nan)
  live = active & ~nan_rows
  remaining = max_new_tokens - (state.seq_lens - state.prompt_lens)
  emitted = jnp.where(live, emitted_counts(new_tokens, num_accepted, remaining, eos_ids), 0)

  tokens = append_tokens(state.tokens, state.seq_lens, new_tokens, emitted)
  seq_lens = state.seq_lens + emitted
  target_cache = dataclasses.replace(target_cache, lengths=seq_lens - 1)
  if arm.drafter is not None:
    drafter_states[arm_index] = arm.drafter.rollback(drafter_states[arm_index], seq_lens)

  emits_stop = (is_stop_token(new_tokens, eos_ids)
                & (jnp.arange(gamma + 1)[None, :] < emitted[:, None])).any(axis=1)
  done = (state.done | nan_rows | emits_stop
          | (seq_lens - state.prompt_lens >= max_new_tokens))

  m = state.metrics
  count = live.astype(jnp.int32)
  accepted_slot = jnp.arange(m.accept_hist.shape[1])[None, :] == num_accepted[:, None]
  metrics = SpecMetrics(
      steps=m.steps + count,
      proposed=m.proposed + count * gamma,
      tested=m.tested + count * jnp.minimum(num_accepted + 1, gamma),
      accepted=m.accepted + count * num_accepted,
      emitted=m.emitted + emitted,
      accept_hist=m.accept_hist + (count * (gamma > 0))[:, None] * accepted_slot,
  )
  state = dataclasses.replace(
      state, tokens=tokens, seq_lens=seq_lens, target_cache=target_cache,
      drafter_states=tuple(drafter_states), done=done, nan_rows=state.nan_rows | nan_rows,
      nan_arm=jnp.where(active & draft_nan, arm_index, state.nan_arm), rng=rng, metrics=metrics)
  return state, dict(emitted=emitted, accepted=num_accepted * count, live=live)


def step_reward(stats: dict[str, jax.Array], arm_index: jax.Array, arms: tuple[Arm, ...],
                reward: str) -> jax.Array:
  """The bandit's reward in [0, 1] for one step, averaged over the rows that took part.

  goodput: tokens emitted per unit of the arm's cost, divided by the most any
  arm could emit per unit of its cost (gamma + 1 tokens). acceptance: accepted
  drafts / gamma (0 for the AR arm, which drafts nothing).
  """
  rows = jnp.maximum(stats["live"].sum(), 1)
  gammas = jnp.asarray([a.gamma for a in arms], jnp.float32)
  costs = jnp.asarray([a.cost for a in arms], jnp.float32)
  if reward == "goodput":
    best_rate = jnp.max((gammas + 1) / costs)
    return stats["emitted"].sum() / rows / costs[arm_index] / best_rate
  return jnp.where(gammas[arm_index] > 0,
                   stats["accepted"].sum() / rows / jnp.maximum(gammas[arm_index], 1), 0.0)


def dispatch(arm: jax.Array, params, state: SpecState, target_sampler: Sampler,
             draft_sampler: Sampler, *, arms: tuple[Arm, ...], **step_kwargs
             ) -> tuple[SpecState, dict[str, jax.Array]]:
  """Runs the step of arms[arm] alone.

  Not `lax.switch`: XLA copies every buffer a conditional's branches return,
  so each step would copy all the caches in the state, the idle arms' too (seen
  in the CPU program's HLO). A while loop updates its carry in place, so each
  arm's step sits in a loop that runs once if the arm was chosen and not at all
  otherwise.
  """
  def step(i):
    return functools.partial(speculative_step, arm_index=i, arms=arms, **step_kwargs)

  if len(arms) == 1:
    return step(0)(params, state, target_sampler, draft_sampler)
  batch = state.tokens.shape[0]
  zeros = jnp.zeros((batch,), jnp.int32)
  stats = dict(emitted=zeros, accepted=zeros, live=jnp.zeros((batch,), bool))
  for i in range(len(arms)):
    def run_once(carry, i=i):
      _, state, _ = carry
      return (jnp.bool_(False), *step(i)(params, state, target_sampler, draft_sampler))
    _, state, stats = jax.lax.while_loop(lambda carry: carry[0], run_once,
                                         (arm == i, state, stats))
  return state, stats


def bandit_step(params, state: SpecState, target_sampler: Sampler, draft_sampler: Sampler, *,
                arms: tuple[Arm, ...], strategy: Strategy, reward: str, target: Llama,
                max_new_tokens: int, eos_ids: tuple[int, ...], verify_fn: VerifyFn) -> SpecState:
  """The bandit picks an arm, that arm steps, and the bandit learns the step's reward."""
  rng, select_key = jax.random.split(state.rng)
  state = dataclasses.replace(state, rng=rng)
  arm = strategy.select(state.bandit, select_key)
  state, stats = dispatch(arm, params, state, target_sampler, draft_sampler, arms=arms,
                          target=target, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                          verify_fn=verify_fn)
  r = step_reward(stats, arm, arms, reward)
  history = state.history
  history = ArmHistory(arm=history.arm.at[state.step].set(arm, mode="drop"),
                       reward=history.reward.at[state.step].set(r, mode="drop"),
                       emitted=history.emitted.at[state.step].set(stats["emitted"].sum(),
                                                                  mode="drop"))
  return dataclasses.replace(state, bandit=strategy.update(state.bandit, arm, r),
                             history=history, step=state.step + 1)


def init_state(params, prompt_tokens, prompt_lens, rng, target_sampler: Sampler,
               bandit: BanditState, *, target: Llama, arms: tuple[Arm, ...],
               max_new_tokens: int, eos_ids: tuple[int, ...], capacity: int) -> SpecState:
  """Prefills the target and every drafter; the target samples each row's first token."""
  ar = prefill(params["target"], prompt_tokens, prompt_lens, rng, model=target,
               sampler=target_sampler, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
               capacity=capacity)
  max_gamma = max(arm.gamma for arm in arms)
  # The AR state's buffer has no room for a step's gamma + 1 tokens past the budget.
  tokens = jnp.pad(ar.tokens, ((0, 0), (0, max_gamma + 1)))
  drafter_states = tuple(
      () if arm.drafter is None else arm.drafter.init(params, prompt_tokens, prompt_lens, capacity)
      for arm in arms)
  return SpecState(
      tokens=tokens, seq_lens=ar.seq_lens, prompt_lens=prompt_lens, target_cache=ar.cache,
      drafter_states=drafter_states, bandit=bandit, done=ar.done, nan_rows=ar.nan_rows,
      nan_arm=jnp.full_like(prompt_lens, -1), rng=ar.rng, step=jnp.zeros((), jnp.int32),
      metrics=SpecMetrics.zeros(prompt_tokens.shape[0], max_gamma),
      history=ArmHistory.empty(max_new_tokens))


@functools.partial(jax.jit, static_argnames=(
    "target", "arms", "strategy", "reward", "max_new_tokens", "eos_ids", "capacity", "verify_fn"))
def speculative_generate(params, prompt_tokens, prompt_lens, rng, target_sampler: Sampler,
                         draft_sampler: Sampler, bandit: BanditState | None = None, *,
                         target: Llama, arms: tuple[Arm, ...], strategy: Strategy = Fixed(0),
                         reward: str = "goodput", max_new_tokens: int,
                         eos_ids: tuple[int, ...], capacity: int,
                         verify_fn: VerifyFn | None = None) -> SpecOutput:
  """Speculative generation over one or more arms, compiled into one program.

  Args:
    params: {"target": target params, "drafters": {key: drafter params}}.
    prompt_tokens: [B, P] int32, right-padded.
    prompt_lens: [B] int32.
    rng: PRNG key.
    target_sampler, draft_sampler: pytrees; the target's defines the output
      distribution, the drafters sample with theirs.
    bandit: the bandit's state to start from (carried across calls to adapt
      over a stream of prompts); None starts fresh.
    arms: the arms; with one arm and the default Fixed(0) strategy this is
      plain speculative decoding with that arm's drafter.
    capacity: KV cache slots, at least P + max_new_tokens + max gamma + 1.
    verify_fn: see kernels/verify.py; None is the Pallas kernel on a GPU and
      the jnp reference elsewhere.
  """
  verify_fn = verify_fn or get_verify_fn("auto")
  if bandit is None:
    bandit = strategy.init(len(arms))
  state = init_state(params, prompt_tokens, prompt_lens, rng, target_sampler, bandit,
                     target=target, arms=arms, max_new_tokens=max_new_tokens, eos_ids=eos_ids,
                     capacity=capacity)

  def should_continue(state: SpecState):
    return (state.step < max_new_tokens) & ~jnp.all(state.done)

  step = functools.partial(bandit_step, params, target_sampler=target_sampler,
                           draft_sampler=draft_sampler, arms=arms, strategy=strategy,
                           reward=reward, target=target, max_new_tokens=max_new_tokens,
                           eos_ids=eos_ids, verify_fn=verify_fn)
  state = jax.lax.while_loop(should_continue, step, state)
  return SpecOutput(tokens=generated_tokens(state.tokens, state.prompt_lens, state.seq_lens,
                                            max_new_tokens),
                    num_tokens=state.seq_lens - state.prompt_lens, nan_rows=state.nan_rows,
                    nan_arm=state.nan_arm, steps=state.step, metrics=state.metrics,
                    bandit=state.bandit, history=state.history)


def check_arms(target: Llama, arms: Sequence[Arm], reward: str = "goodput") -> None:
  if not arms:
    raise ValueError("no arms given")
  if reward not in REWARDS:
    raise ValueError(f"unknown reward {reward!r}; known: {REWARDS}")
  for arm in arms:
    if arm.drafter is not None and arm.drafter.vocab_size != target.config.vocab_size:
      raise ValueError(f"drafter vocabulary ({arm.drafter.vocab_size}) differs from the "
                       f"target's ({target.config.vocab_size}); speculative decoding needs "
                       f"one vocabulary")


def run_speculative(params, target: Llama, drafter: Drafter | None,
                    prompts: Sequence[Sequence[int]], *, gamma: int, target_sampler: Sampler,
                    draft_sampler: Sampler | None = None, max_new_tokens: int, rng,
                    eos_ids: tuple[int, ...] | None = None, cache_capacity: int | None = None,
                    verify_fn: VerifyFn | None = None) -> SpecOutput:
  """Validates inputs, then runs `speculative_generate` with one drafter.

  The drafter samples with draft_sampler (the target's by default); exactness
  holds for any drafter distribution.

  Raises:
    ValueError: on mismatched vocabularies, gamma outside [1, MAX_GAMMA], or a budget the
      cache cannot hold.
    FloatingPointError: when a row's target or draft logits were NaN.
  """
  if gamma < 1:
    raise ValueError(f"gamma must be >= 1, got {gamma}")
  arms = (Arm(drafter, gamma),)
  check_arms(target, arms)
  tokens, lengths = prepare_prompts(prompts, target.config.vocab_size)
  capacity = check_budget(target.config, tokens.shape[1], max_new_tokens, reserve=gamma + 1,
                          cache_capacity=cache_capacity)
  out = speculative_generate(
      params, jnp.asarray(tokens), jnp.asarray(lengths), rng, target_sampler,
      draft_sampler or target_sampler, target=target, arms=arms, max_new_tokens=max_new_tokens,
      eos_ids=target.config.eos_token_ids if eos_ids is None else tuple(eos_ids),
      capacity=capacity, verify_fn=verify_fn)
  raise_on_nan(out.nan_rows, out.nan_arm, [arm.name for arm in arms])
  return out


def summarize(metrics: SpecMetrics) -> dict[str, Any]:
  """Host-side report of the device metrics, over all rows.

  alpha counts only the drafts the accept test reached (it stops at the first
  rejection); tau is tokens emitted per loop step.
  """
  m = jax.tree.map(np.asarray, metrics)
  steps, tested = int(m.steps.sum()), int(m.tested.sum())
  hist = m.accept_hist.sum(axis=0)
  return {
      "steps": steps,
      "proposed": int(m.proposed.sum()),
      "tested": tested,
      "accepted": int(m.accepted.sum()),
      "emitted": int(m.emitted.sum()),
      "alpha": int(m.accepted.sum()) / tested if tested else float("nan"),
      "tau": int(m.emitted.sum()) / steps if steps else float("nan"),
      "mean_accepted": int(m.accepted.sum()) / steps if steps else float("nan"),
      "accept_hist": hist.tolist(),
  }

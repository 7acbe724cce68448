"""Exact speculative decoding, with drafters chosen online by a bandit, as one XLA program.

A `SpeculativeDecoder` holds the static settings (target, arms, strategy,
reward, budget) and is jitted with itself static. `generate` is one program:
prefill (`init`), then the step loops (`run_steps`): the bandit picks an arm,
that arm's step runs alone, and the step's reward goes back to the bandit,
with each step body (an arm, or n-gram arms of several gammas, `step_bodies`)
stepping in a `lax.while_loop` of its own while the bandit keeps picking it.
An arm is a drafter with its own gamma, or a plain AR step. An arm's step
(`arm_step`) drafts gamma tokens (its body's widest gamma W), scores them with
one target forward of W + 1 tokens, verifies, appends and rolls the caches
back by a length update. Arms not selected do no work: their caches lag and catch up, in
chunks, the next time they are picked. A single drafter is the one-arm case.

Exactness survives the bandit: the arm for step t depends only on steps
before t (and, for a contextual chooser, on each drafter's context, a function
of the committed tokens), so conditioned on the past each step is an exact
speculative step with some fixed drafter, and its output is distributed as the
target's.

Per-row bookkeeping is AR's (`sequences.Sequences`): prompts are
right-padded, each row's tokens continue right after its own prompt, and the
target cache holds every committed token but the last. Each row accepts its own number of drafts and
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

from flashspec_jax.bandit.acceptance import by_context
from flashspec_jax.bandit.strategies import BanditState, Feedback, Fixed, Strategy
from flashspec_jax.drafters import Drafter, gather_window, step_bodies
from flashspec_jax.generate import FIXED_KERNELS, Decoder, GenerationOutput, model_pass
from flashspec_jax.sequences import (Sequences, append_tokens, check_max_new_tokens,
                                     is_stop_token, loop_until_done, raise_on_nan,
                                     still_running)
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.models.eagle import feature_width
from flashspec_jax.models.llama import KVCache, Llama, lm_head
from flashspec_jax.sampling import Sampler, Samplers

# (target_logp [B, G+1, V], draft_logq [B, G, V], draft_tokens [B, G], seeds [B])
#   -> (num_accepted [B], next_token [B])
VerifyFn = Callable[..., tuple[jax.Array, jax.Array]]
# With per-draft acceptance alpha a step emits (1 - alpha^(gamma+1)) / (1 - alpha)
# tokens on average, never more than 1 / (1 - alpha). At alpha = 0.9, beyond any
# drafter measured here, gamma = 32 already reaches 97% of that limit, while the
# drafting, the verify pass and its [B, gamma+1, V] log-probabilities keep growing
# linearly with gamma (gamma = 1000 ran at 6.4 s per step). A larger gamma only
# costs time, so it is refused.
MAX_GAMMA = 32

# Positions at the end of each prompt where the free-scored drafters are scored before
# the first step (SpeculativeDecoder._scored_on_prompt): a few steps' worth of drafts.
PROMPT_POSITIONS = 16


def _reached(matches: jax.Array) -> jax.Array:
  """[B, W] bool: whether each draft of a chain is tested, that is whether every draft
  before it matched (matches [B, W]).

  A running AND over the W (at most MAX_GAMMA) static columns, not a cumulative
  product: a scan is a kernel of its own at every step, where the ANDs fuse."""
  reached = [jnp.ones_like(matches[:, 0])]
  for column in range(matches.shape[1] - 1):
    reached.append(reached[-1] & matches[:, column])
  return jnp.stack(reached, axis=1)


@dataclasses.dataclass(frozen=True)
class Arm:
  """One way to take a step: a drafter with its gamma, or plain AR (drafter None).

  Attributes:
    drafter: a ModelDrafter, NgramDrafter or FeatureDrafter, or None for an AR step.
    gamma: draft tokens per step (0 for AR).
    cost: the step's cost in any unit (only ratios between arms matter); the
      goodput reward divides tokens by it.
  """

  drafter: Drafter | None = None
  gamma: int = 0
  cost: float = 1.0

  def __post_init__(self):
    if self.drafter is not None and self.gamma < 1:
      raise ValueError(f"gamma must be >= 1, got {self.gamma}")
    if self.drafter is None and self.gamma != 0:
      raise ValueError(f"an AR arm has gamma 0 and a drafter arm gamma >= 1; got gamma "
                       f"{self.gamma} with no drafter")
    if self.gamma > MAX_GAMMA:
      raise ValueError(f"gamma must be <= MAX_GAMMA = {MAX_GAMMA}, got {self.gamma}: a longer "
                       f"draft only costs time (see engine.MAX_GAMMA)")
    if not self.cost > 0:
      raise ValueError(f"arm cost must be > 0, got {self.cost}")

  @property
  def name(self) -> str:
    return "ar" if self.drafter is None else f"{self.drafter.name}:g{self.gamma}"

  @property
  def method(self) -> str:
    """The arm as a user writes it (config.methods' syntax)."""
    return "ar" if self.drafter is None else f"{self.drafter.method}@{self.gamma}"


@struct.dataclass(kw_only=True)
class SpecMetrics:
  """Device-side counters, per row.

  Attributes:
    steps: [B] int32, loop steps the row took part in.
    proposed: [B] int32, draft tokens proposed (the chosen arm's gamma per
      speculative step, though a shared step body drafts its widest).
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
    seqs: the token buffer and per-row bookkeeping, as AR keeps them;
      L = P + max_new + max gamma + 1; nan_rows counts target and draft NaNs.
    target_cache: holds seq_lens - 1 tokens per row between steps.
    drafter_states: one per arm (a KVCache, a FeatureDrafterState, or () for
      stateless arms; the arms of a shared step body use their first arm's);
      a drafter's cache holds at most seq_lens - 1 tokens (or pairs) per row
      between steps.
    bandit: the bandit's state.
    contexts: [B, K] int32, the context each arm's drafter is in at the rows' current
      position (Drafter.lookup), as the chooser saw it when it chose the step's arm;
      0 unless the chooser is contextual.
    drafts: per arm, [B, W] int32 where the chooser learns from free feedback and the
      arm is the first of a free-scored drafter (`_keeps_drafts`): that drafter's drafts
      at the position the next step starts from, made by `init` or `select`, W its
      arms' widest gamma (`_lookups`); () for every other arm. The step's own drafts
      and its free scoring read them, not the token buffer that the step writes to.
    nan_arm: [B] int32, the arm whose drafter's logits were NaN; -1 where none were.
    step: [] int32, loop iterations.
    metrics: SpecMetrics.
    history: ArmHistory.
  """

  seqs: Sequences
  target_cache: KVCache
  drafter_states: tuple
  bandit: BanditState
  contexts: jax.Array
  drafts: tuple
  nan_arm: jax.Array
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


@dataclasses.dataclass(frozen=True)
class Goodput:
  """Tokens emitted per unit of the arm's cost, divided by the most any arm could
  emit per unit of its cost (gamma + 1 tokens): in [0, 1]."""

  def __call__(self, stats: dict[str, jax.Array], arm_index: jax.Array,
               arms: tuple[Arm, ...]) -> jax.Array:
    rows = jnp.maximum(stats["live"].sum(), 1)
    gammas = jnp.asarray([a.gamma for a in arms], jnp.float32)
    costs = jnp.asarray([a.cost for a in arms], jnp.float32)
    best_rate = jnp.max((gammas + 1) / costs)
    return stats["emitted"].sum() / rows / costs[arm_index] / best_rate


@dataclasses.dataclass(frozen=True)
class Acceptance:
  """Accepted drafts / gamma, 0 for the AR arm, which drafts nothing: in [0, 1]."""

  def __call__(self, stats: dict[str, jax.Array], arm_index: jax.Array,
               arms: tuple[Arm, ...]) -> jax.Array:
    rows = jnp.maximum(stats["live"].sum(), 1)
    gamma = jnp.asarray([a.gamma for a in arms], jnp.float32)[arm_index]
    return jnp.where(gamma > 0, stats["accepted"].sum() / rows / jnp.maximum(gamma, 1), 0.0)


# A reward maps a step's per-row stats (emitted, accepted, live) to the bandit's
# reward in [0, 1], averaged over the rows that took part.
Reward = Goodput | Acceptance
REWARDS = {"goodput": Goodput(), "acceptance": Acceptance()}


def reward_named(name: str) -> Reward:
  if name not in REWARDS:
    raise ValueError(f"unknown reward {name!r}; known: {tuple(REWARDS)}")
  return REWARDS[name]


@dataclasses.dataclass(frozen=True)
class SpeculativeDecoder:
  """The static half of speculative generation; params, state and samplers are passed in.

  Hashable, and jitted with itself static (gemma's sampler keeps its settings
  the same way), so each distinct decoder compiles once per input shape.

  Attributes:
    target: the target model.
    arms: the arms; one arm with the default Fixed(0) strategy is plain
      speculative decoding with that arm's drafter.
    max_new_tokens: the budget per row.
    eos_ids: tokens that end a row; None is the target config's.
    strategy: the bandit strategy that picks an arm per step.
    reward: the bandit's reward for a step.
    capacity: KV cache slots, at least P + max_new_tokens + max gamma + 1; None
      is just enough for the prompts' width P.
    verify_fn: see kernels/verify.py; None is the Pallas kernel on a GPU and
      the jnp reference elsewhere.
    pass_width: deterministic mode: every target pass after the prefill (AR
      steps and verify passes alike) is this many tokens wide, at least max
      gamma + 1 (see generate.model_pass); greedy output then equals that of
      a `Decoder` with the same pass_width, bit for bit. None: each pass is as
      wide as its tokens.
  """

  target: Llama
  arms: tuple[Arm, ...]
  max_new_tokens: int
  eos_ids: tuple[int, ...] | None = None
  strategy: Strategy = Fixed(0)
  reward: Reward = Goodput()
  capacity: int | None = None
  verify_fn: VerifyFn | None = None
  pass_width: int | None = None

  def __post_init__(self):
    if not self.arms:
      raise ValueError("no arms given")
    if self.pass_width is not None and self.pass_width < self.max_gamma + 1:
      raise ValueError(f"pass_width {self.pass_width} is narrower than a verify pass of the "
                       f"arms' largest gamma + 1 = {self.max_gamma + 1} tokens")
    for arm in self.arms:
      if arm.drafter is not None and arm.drafter.vocab_size != self.target.config.vocab_size:
        raise ValueError(f"drafter vocabulary ({arm.drafter.vocab_size}) differs from the "
                         f"target's ({self.target.config.vocab_size}); speculative decoding "
                         f"needs one vocabulary")
    if len({self.arms[i].drafter.feature_layers for i in self.feature_arms}) > 1:
      raise ValueError("the feature drafters read different target layers ("
                       + ", ".join(f"{self.arms[i].name}: {self.arms[i].drafter.feature_layers}"
                                   for i in self.feature_arms)
                       + "); each target pass returns one kind of feature")
    # Binding checks the strategy against the arms: an arm index outside them would
    # match no step body, and the loop would never end.
    self.strategy.bind(self.arms)
    check_max_new_tokens(self.max_new_tokens)

  @property
  def ar_decoder(self) -> Decoder:
    """The AR decoder of the target that prefills, with room for a step's gamma + 1
    tokens past the budget."""
    return Decoder(self.target, self.max_new_tokens, self.eos_ids, self.capacity,
                   reserve=self.max_gamma + 1, pass_width=self.pass_width)

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return self.ar_decoder.stop_ids

  @property
  def max_gamma(self) -> int:
    return max(arm.gamma for arm in self.arms)

  @property
  def arm_names(self) -> list[str]:
    return [arm.name for arm in self.arms]

  @property
  def chooser(self) -> Strategy:
    """The strategy bound to these arms (their gammas, costs and drafters)."""
    return self.strategy.bind(self.arms)

  @property
  def feature_arms(self) -> tuple[int, ...]:
    """The arms whose drafters read the target's features."""
    return tuple(i for i, arm in enumerate(self.arms)
                 if arm.drafter is not None and arm.drafter.reads_features)

  @property
  def feature_layers(self) -> tuple[int, ...]:
    """What the feature drafters read of the target: Llama's feature_layers, one for all
    (__post_init__ checks), empty for its final-normed state."""
    return self.arms[self.feature_arms[0]].drafter.feature_layers if self.feature_arms else ()

  def target_forward(self, params, tokens, cache: KVCache,
                     drafter_states: list) -> tuple[jax.Array, KVCache]:
    """The target's logits [B, T, V] for tokens [B, T] at each row's cache length; the
    drafters that read features observe the target's (in drafter_states, in place)."""
    starts = cache.lengths
    logits, cache, *features = model_pass(self.target, params["target"], tokens, cache,
                                          self.pass_width,
                                          return_features=bool(self.feature_arms),
                                          feature_layers=self.feature_layers)
    if features:
      self._observe(drafter_states, features[0], starts)
    return logits, cache

  def _observe(self, drafter_states: list, features, starts) -> None:
    """Hands the target's features [B, T, D or F] at positions starts[b] + t to every
    drafter that reads them (in drafter_states, in place)."""
    for i in self.feature_arms:
      drafter_states[i] = self.arms[i].drafter.observe(drafter_states[i], features, starts)

  def init(self, params, prompt_tokens, prompt_lens, rng, target_sampler: Sampler,
           bandit: BanditState | None = None) -> SpecState:
    """Prefills the target and every drafter; the target samples each row's first token.

    bandit: the state to start from (carried across calls to adapt over a stream
    of prompts); None starts fresh.
    """
    ar_decoder = self.ar_decoder
    scores_prompt = self.chooser.uses_free_feedback
    # Scoring the prompt reads the target's final-normed state, which fused features
    # may lack: the prefill then also returns it, last.
    final = self.target.depth
    layers = self.feature_layers
    with_final = layers + (final,) if scores_prompt and layers and final not in layers else layers
    ar, features = ar_decoder.prefill(params["target"], prompt_tokens, prompt_lens, rng,
                                      target_sampler,
                                      with_features=bool(self.feature_arms) or scores_prompt,
                                      feature_layers=with_final)
    capacity = ar_decoder.cache_capacity(prompt_tokens.shape[1])
    drafter_states = [
        () if arm.drafter is None
        else arm.drafter.init(params, prompt_tokens, prompt_lens, capacity)
        for arm in self.arms]
    if self.feature_arms:
      self._observe(drafter_states,
                    features[..., :feature_width(self.target.config, len(layers))],
                    jnp.zeros_like(prompt_lens))
    state = SpecState(
        seqs=ar.seqs, target_cache=ar.cache, drafter_states=tuple(drafter_states),
        bandit=self.chooser.init(len(self.arms)) if bandit is None else bandit,
        **self._lookups(ar.seqs),
        nan_arm=jnp.full_like(prompt_lens, -1), step=jnp.zeros((), jnp.int32),
        metrics=SpecMetrics.zeros(prompt_tokens.shape[0], self.max_gamma),
        history=ArmHistory.empty(self.max_new_tokens))
    if scores_prompt:
      # The first arm is chosen knowing how much this prompt repeats itself, with what
      # earlier requests taught faded by the chooser's request_carry.
      at, width = (with_final.index(final) if with_final else 0), self.target.config.hidden_size
      prompt_logp = self._prompt_log_probs(
          params, ar.seqs, features[..., at * width:(at + 1) * width], target_sampler)
      state = state.replace(bandit=self.chooser.observe(
          state.bandit, *self._scored_on_prompt(state, prompt_logp)))
    return state

  def _prompt_log_probs(self, params, seqs: Sequences, features: jax.Array,
                        target_sampler: Sampler) -> jax.Array:
    """[B, PROMPT_POSITIONS, V] the target's log p, as target_sampler processes it, of the
    token at each of the last PROMPT_POSITIONS committed positions before the first
    generated one, from the prefill's features [B, P, D]."""
    positions = seqs.seq_lens[:, None] - 1 - PROMPT_POSITIONS + jnp.arange(PROMPT_POSITIONS)
    normed = jnp.take_along_axis(features, jnp.maximum(positions, 0)[..., None], axis=1)
    return target_sampler.log_probs(lm_head(params["target"], normed))

  @property
  def bodies(self) -> tuple[tuple[int, ...], ...]:
    """The arms, grouped by the piece of program that steps them (`step_bodies`)."""
    return step_bodies(self.arms)

  def arm_step(self, params, state: SpecState, arm_index: int | jax.Array,
               samplers: Samplers, body: tuple[int, ...] | None = None,
               settled: bool = False) -> tuple[SpecState, dict[str, jax.Array]]:
    """One step of arms[arm_index]: draft, verify with one target pass, append, roll back.

    body: the arms that share this step's program (one of `bodies`), arm_index
    among them, traced or not; None is arm_index alone. settled: the body's drafter
    was settled (`settle`) and has run every step since. A
    shared body drafts and verifies the widest gamma among its arms and keeps
    the chosen arm's: its accept test over that arm's drafts, and when all of
    them pass, a bonus token sampled from p at the position after them. The
    tests of later drafts are discarded unseen, so the step is distributed
    exactly as a step of the chosen arm alone.

    Rows already done do not change. Returns the new state and the step's
    per-row `emitted`, `accepted` and `live` arrays, from which rewards are made.
    state's contexts and kept drafts must be those of its tokens: from `init`, or from
    `select` after the last step.
    """
    body = body or (arm_index,)
    if len(body) == 1:
      arm_index = body[0]  # static: a body of one arm needs no index traced
    arm = self.arms[body[0]]
    width = max(self.arms[i].gamma for i in body)
    gamma = width if len(body) == 1 else jnp.asarray([a.gamma for a in self.arms])[arm_index]
    seqs = state.seqs
    batch = seqs.tokens.shape[0]
    active = ~seqs.done
    rng, draft_key, verify_key = jax.random.split(seqs.rng, 3)
    last = seqs.last_tokens

    drafter_states = list(state.drafter_states)
    if arm.drafter is None:
      logits, target_cache = self.target_forward(params, last[:, None], state.target_cache,
                                                 drafter_states)
      num_accepted = jnp.zeros((batch,), jnp.int32)
      target_logp = samplers.target.log_probs(logits)  # [B, 1, V]; scoring may read it
      next_token = samplers.target.get_next_tokens(logits[:, 0], verify_key)
      new_tokens = next_token[:, None]
      draft_nan = jnp.zeros((batch,), bool)
    else:
      drafter_states[body[0]], draft_tokens, draft_logq = arm.drafter.propose(
          params, state.drafter_states[body[0]], seqs, width, samplers.draft, draft_key,
          **self._kept_drafts(state, body[0]), **({"settled": True} if settled else {}))
      scored = jnp.concatenate([last[:, None], draft_tokens], axis=1)  # [B, W+1]
      logits, target_cache = self.target_forward(params, scored, state.target_cache,
                                                 drafter_states)
      target_logp = samplers.target.log_probs(logits)  # [B, W+1, V]
      if len(body) > 1:
        verify_key, bonus_key = jax.random.split(verify_key)
      seeds = jax.random.bits(verify_key, (batch,), jnp.uint32)
      verify_fn = self.verify_fn or get_verify_fn("auto")
      num_accepted, next_token = verify_fn(target_logp, draft_logq, draft_tokens, seeds)
      if len(body) > 1:
        bonus = samplers.target.get_next_tokens(
            jax.lax.dynamic_index_in_dim(logits, gamma, axis=1, keepdims=False), bonus_key)
        next_token = jnp.where(num_accepted >= gamma, bonus, next_token)
        num_accepted = jnp.minimum(num_accepted, gamma)
      position = jnp.arange(width + 1)[None, :]
      new_tokens = jnp.where(position == num_accepted[:, None], next_token[:, None],
                             jnp.pad(draft_tokens, ((0, 0), (0, 1))))
      draft_nan = jnp.isnan(draft_logq).any(axis=(1, 2))

    nan_rows = active & (jnp.isnan(logits).any(axis=(1, 2)) | draft_nan)
    live = active & ~nan_rows
    remaining = self.max_new_tokens - seqs.num_generated
    emitted = jnp.where(live, emitted_counts(new_tokens, num_accepted, remaining, self.stop_ids),
                        0)

    tokens = append_tokens(seqs.tokens, seqs.seq_lens, new_tokens, emitted)
    seq_lens = seqs.seq_lens + emitted
    target_cache = dataclasses.replace(target_cache, lengths=seq_lens - 1)
    if arm.drafter is not None:
      drafter_states[body[0]] = arm.drafter.rollback(drafter_states[body[0]], seq_lens)

    emits_stop = (is_stop_token(new_tokens, self.stop_ids)
                  & (jnp.arange(width + 1)[None, :] < emitted[:, None])).any(axis=1)
    done = (seqs.done | nan_rows | emits_stop
            | (seq_lens - seqs.prompt_lens >= self.max_new_tokens))

    m = state.metrics
    count = live.astype(jnp.int32)
    tested = count * jnp.minimum(num_accepted + 1, gamma)
    accepted_slot = jnp.arange(m.accept_hist.shape[1])[None, :] == num_accepted[:, None]
    metrics = SpecMetrics(
        steps=m.steps + count,
        proposed=m.proposed + count * gamma,
        tested=m.tested + tested,
        accepted=m.accepted + count * num_accepted,
        emitted=m.emitted + emitted,
        accept_hist=m.accept_hist + (count * (gamma > 0))[:, None] * accepted_slot,
    )
    stats = dict(emitted=emitted, accepted=num_accepted * count, live=live)
    if self.chooser.uses_free_feedback:
      outcome = dict(logp=target_logp, accepted=num_accepted, tokens=new_tokens,
                     emitted=emitted, live=live)
      arm_accepted, arm_tested = self._scored_for_free(state, body[0], outcome)
      chosen = (jnp.arange(len(self.arms)) == arm_index)[:, None]
      own_context = jnp.take(state.contexts, arm_index, axis=1)
      stats |= dict(
          arm_accepted=arm_accepted + chosen * self._by_context(num_accepted * count, own_context),
          arm_tested=arm_tested + chosen * self._by_context(tested, own_context))
    seqs = seqs.replace(tokens=tokens, seq_lens=seq_lens, done=done,
                        nan_rows=seqs.nan_rows | nan_rows, rng=rng)
    state = state.replace(
        seqs=seqs, target_cache=target_cache, drafter_states=tuple(drafter_states),
        nan_arm=jnp.where(active & draft_nan, arm_index, state.nan_arm), metrics=metrics)
    return state, stats

  def _by_context(self, values: jax.Array, contexts: jax.Array) -> jax.Array:
    """[C] values [B] summed over the rows in each context (contexts [B])."""
    return by_context(values, contexts, self.chooser.num_contexts)

  def _teller(self, arm_index: int) -> int:
    """The arm whose drafter tells the context arms[arm_index] learns in (its chooser's
    context_arms: its own drafter, or with step_context another); -1 where the chooser
    tells none apart."""
    return self.chooser.context_arms[arm_index] if self.chooser.num_contexts > 1 else -1

  def _keeps_drafts(self, arm_index: int) -> bool:
    """Whether SpecState.drafts holds arms[arm_index]'s drafts: for a chooser that
    scores free-scored drafters after every step, the first arm of each."""
    arm = self.arms[arm_index]
    return (self.chooser.uses_free_feedback and arm.drafter is not None
            and arm.drafter.scored_free and self.chooser.groups[arm_index] == arm_index)

  def _lookups(self, seqs: Sequences) -> dict[str, Any]:
    """SpecState's `contexts` and `drafts` at the rows' current position (contexts all
    0 where the chooser tells none apart): one lookup per drafter that tells a context,
    which the arms that learn in it share and its drafts start from.

    The drafts are made here, after a step has written its tokens, rather than in the
    next step beside the write of its own: there XLA copies the token buffer at every
    step to keep the unwritten one for them (twice a step in the CPU program,
    bench/step_kernels.py's held loops)."""
    tellers = [self._teller(j) for j in range(len(self.arms))]
    looked = {t: self.arms[t].drafter.lookup(seqs) for t in dict.fromkeys(tellers) if t >= 0}
    drafts = []
    for j, (arm, teller) in enumerate(zip(self.arms, tellers)):
      if not self._keeps_drafts(j):
        drafts.append(())
        continue
      shares_lookup = teller >= 0 and self.arms[teller].drafter == arm.drafter
      width = max(other.gamma for other in self.arms if other.drafter == arm.drafter)
      drafts.append(arm.drafter.drafts(seqs, width, looked[teller][0] if shares_lookup else None))
    none = jnp.zeros_like(seqs.seq_lens)
    contexts = [looked[t][1] if t >= 0 else none for t in tellers]
    return dict(contexts=jnp.stack(contexts, axis=1), drafts=tuple(drafts))

  def _kept_drafts(self, state: SpecState, arm_index: int) -> dict[str, jax.Array]:
    """propose's `drafts=` for arms[arm_index]: its drafter's drafts kept in the state
    (`_keeps_drafts`); none where they are not kept."""
    if not self.chooser.uses_free_feedback:
      return {}
    first = self.chooser.groups[arm_index]
    return dict(drafts=state.drafts[first]) if self._keeps_drafts(first) else {}

  def _scored_for_free(self, state: SpecState, arm_index: int,
                       outcome: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """[K, C] drafts accepted and tested, summed over live rows in each context, by the
    arms whose drafters can be scored without running them (`scored_free`:
    deterministic, no model), had they proposed their drafts kept in the state
    (`_keeps_drafts`) at this step instead of arms[arm_index]; a row's context is its
    drafter's when the step began.

    Draft i of such an arm is a trial when its earlier drafts match the committed
    tokens and the target's log p at its position was computed on the committed
    prefix (i <= the drafts the step accepted). It counts as accepted with the
    target's probability of that token, the acceptance probability of a point-mass
    draft: exactly 0 or 1 when greedy. The chain reaches draft i as often as a run
    of the arm would (the committed tokens follow the target's distribution), so
    at each depth the counts estimate the arm's acceptance without bias; which
    depths are seen depends on how far the step that ran verified, so the pooled
    estimate weights shallow depths more. An arm that shares its drafter with the arm that
    ran, or with an earlier arm, is left out, so no draft is counted twice.
    """
    groups = self.chooser.groups
    nothing = jnp.zeros((self.chooser.num_contexts,))
    accepted, tested = [], []
    for j, arm in enumerate(self.arms):
      if not self._keeps_drafts(j) or groups[j] == groups[arm_index]:
        accepted.append(nothing)
        tested.append(nothing)
        continue
      width = min(arm.gamma, outcome["logp"].shape[1])
      drafts = state.drafts[j][:, :width]
      position = jnp.arange(width)[None, :]
      matches = drafts == outcome["tokens"][:, :width]
      trials = (_reached(matches) & (position <= outcome["accepted"][:, None])
                & (position < outcome["emitted"][:, None]) & outcome["live"][:, None])
      p = jnp.exp(jnp.take_along_axis(outcome["logp"][:, :width], drafts[..., None],
                                      axis=-1)[..., 0])
      context = state.contexts[:, j]
      accepted.append(self._by_context(jnp.sum(jnp.where(trials, p, 0.0), axis=1), context))
      tested.append(self._by_context(jnp.sum(trials, axis=1).astype(jnp.float32), context))
    return jnp.stack(accepted), jnp.stack(tested)

  def _scored_on_prompt(self, state: SpecState,
                        prompt_logp: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[K, C] drafts accepted and tested, summed over rows in each context, had each
    free-scored drafter (`scored_free`, once per drafter, as in `_scored_for_free`; its
    drafts and contexts as `_lookups` makes them) drafted at each of the last
    PROMPT_POSITIONS positions of the committed tokens (the prompt and the first token).

    Draft i is tested when the drafts before it match the tokens that followed in
    the prompt, and accepted with the target's probability of it there (prompt_logp,
    `_prompt_log_probs`), as a step's free scoring counts it. The prompt is no sample
    of the target, so this is a prior, not an estimate: how much the text repeats
    itself, which is what a prompt-lookup drafter lives on, weighed by how surely the
    target would copy it: counting matches alone overstates a copy's acceptance
    wherever the target would not copy surely, above all when it samples.
    """
    seqs = state.seqs
    nothing = jnp.zeros((self.chooser.num_contexts,))
    rows = jnp.arange(seqs.tokens.shape[0])[:, None]

    def score(back):
      ends = seqs.seq_lens - back  # draft as if only the tokens before `ends` were known
      known = seqs.replace(seq_lens=jnp.maximum(ends, 1))
      lookups = self._lookups(known)
      accepted, tested = [nothing] * len(self.arms), [nothing] * len(self.arms)
      for j, arm in enumerate(self.arms):
        if not self._keeps_drafts(j):
          continue
        drafts = lookups["drafts"][j][:, :arm.gamma]
        matches = drafts == gather_window(seqs.tokens, jnp.maximum(ends, 0), arm.gamma)
        depth = jnp.arange(arm.gamma)
        trials = _reached(matches) & (depth[None, :] < back) & (ends >= 1)[:, None]
        # The target scored draft i after position ends - 1 + i: prompt_logp's row
        # PROMPT_POSITIONS - back + i.
        scored_at = jnp.clip(PROMPT_POSITIONS - back + depth, 0, PROMPT_POSITIONS - 1)
        p = jnp.exp(prompt_logp[rows, scored_at[None, :], drafts])
        context = lookups["contexts"][:, j]
        accepted[j] = self._by_context(jnp.sum(jnp.where(trials, p, 0.0), axis=1), context)
        tested[j] = self._by_context(jnp.sum(trials, axis=1).astype(jnp.float32), context)
      return jnp.stack(accepted), jnp.stack(tested)

    accepted, tested = jax.vmap(score)(jnp.arange(1, PROMPT_POSITIONS + 1))
    return accepted.sum(0), tested.sum(0)

  def settles(self, body: tuple[int, ...]) -> bool:
    """Whether the body's drafter catches up in loops of its own (`settle`) that its
    steps at the body's gamma leave nothing for (its `settles`)."""
    drafter = self.arms[body[0]].drafter
    return (hasattr(drafter, "settle")
            and drafter.settles(max(self.arms[i].gamma for i in body)))

  @property
  def lone_settling_body(self) -> tuple[int, ...] | None:
    """The step body, where there is one and its drafter `settles`: `run_steps`
    settles it before its loop, and every step after runs settled."""
    (body, *others) = self.bodies
    return None if others or not self.settles(body) else body

  def settle(self, params, state: SpecState, body: tuple[int, ...]) -> SpecState:
    """The body's drafter fed the tokens it missed (the prompt, idle steps) but a
    step's worth (`ModelDrafter.settle`, `FeatureDrafter.settle`)."""
    drafter_states = list(state.drafter_states)
    drafter_states[body[0]] = self.arms[body[0]].drafter.settle(
        params, drafter_states[body[0]], state.seqs.tokens, state.seqs.seq_lens)
    return state.replace(drafter_states=tuple(drafter_states))

  def dispatch(self, params, state: SpecState, arm: jax.Array,
               samplers: Samplers, settled: bool = False
               ) -> tuple[SpecState, dict[str, jax.Array]]:
    """Runs the step of arms[arm] alone.

    Not `lax.switch`: XLA copies every buffer a conditional's branches return,
    so each step would copy all the caches in the state, the idle arms' too (seen
    in the CPU program's HLO). A while loop updates its carry in place, so each
    body's step (`bodies`) sits in a loop that runs once if one of its arms was
    chosen and not at all otherwise. On a GPU each loop costs the step a wait
    for the host, which reads its predicate (docs/bandits.md), hence one loop
    per body rather than per arm.
    """
    bodies = self.bodies
    if len(bodies) == 1:
      return self.arm_step(params, state, arm, samplers, bodies[0], settled)
    batch = state.seqs.tokens.shape[0]
    zeros = jnp.zeros((batch,), jnp.int32)
    stats = dict(emitted=zeros, accepted=zeros, live=jnp.zeros((batch,), bool))
    if self.chooser.uses_free_feedback:
      nothing = jnp.zeros((len(self.arms), self.chooser.num_contexts))
      stats |= dict(arm_accepted=nothing, arm_tested=nothing)
    for body in bodies:
      def run_once(carry, body=body):
        _, state, _ = carry
        return (jnp.bool_(False), *self.arm_step(params, state, arm, samplers, body))
      _, state, stats = jax.lax.while_loop(lambda carry: carry[0], run_once,
                                           (jnp.isin(arm, jnp.asarray(body)), state, stats))
    return state, stats

  def select(self, state: SpecState) -> tuple[SpecState, jax.Array]:
    """The arm the chooser picks for the next step, knowing only the steps before it
    (and, for a contextual chooser, the context each drafter is in now)."""
    rng, select_key = jax.random.split(state.seqs.rng)
    state = state.replace(seqs=state.seqs.replace(rng=rng))
    if self.chooser.uses_free_feedback or self.chooser.num_contexts > 1:
      lookups = self._lookups(state.seqs)
      # Contexts that are all 0 stay as init made them: a loop that wrote them anew
      # would copy them at every step.
      state = state.replace(drafts=lookups["drafts"], **(
          {"contexts": lookups["contexts"]} if self.chooser.num_contexts > 1 else {}))
    if self.chooser.num_contexts == 1:
      return state, self.chooser.select(state.bandit, select_key)
    live = (~state.seqs.done).astype(jnp.float32)[:, None]  # [B, 1] against contexts [B, K]
    weights = by_context(live, state.contexts, self.chooser.num_contexts)
    return state, self.chooser.select(state.bandit, select_key, weights)

  def learn(self, state: SpecState, arm: jax.Array, stats: dict[str, jax.Array]) -> SpecState:
    """The chooser learns the reward of the step arms[arm] just took (its stats), and
    the step is recorded."""
    r = self.reward(stats, arm, self.arms)
    zeros = jnp.zeros((len(self.arms), self.chooser.num_contexts))
    feedback = Feedback(reward=r, accepted=stats.get("arm_accepted", zeros),
                        tested=stats.get("arm_tested", zeros),
                        rows=stats["live"].sum().astype(jnp.float32))
    history = state.history
    history = ArmHistory(arm=history.arm.at[state.step].set(arm, mode="drop"),
                         reward=history.reward.at[state.step].set(r, mode="drop"),
                         emitted=history.emitted.at[state.step].set(stats["emitted"].sum(),
                                                                    mode="drop"))
    return dataclasses.replace(state, bandit=self.chooser.learn(state.bandit, arm, feedback),
                               history=history, step=state.step + 1)

  def step(self, params, state: SpecState, samplers: Samplers,
           settled: bool = False) -> SpecState:
    """The bandit picks an arm, that arm steps, and the bandit learns the step's reward.
    settled: as `arm_step`'s, with one step body."""
    state, arm = self.select(state)
    state, stats = self.dispatch(params, state, arm, samplers, settled)
    return self.learn(state, arm, stats)

  def body_turn(self, params, state: SpecState, arm: jax.Array, samplers: Samplers,
                body: tuple[int, ...], settled: bool = False) -> tuple[SpecState, jax.Array]:
    """One turn of `run_steps`' loop over a step body: arms[arm] steps (`arm_step`), the
    chooser learns from it and picks the next arm."""
    state, stats = self.arm_step(params, state, arm, samplers, body, settled)
    return self.select(self.learn(state, arm, stats))

  def run_steps(self, params, state: SpecState, samplers: Samplers) -> SpecState:
    """`step` until every row is done or the steps reach max_new_tokens.

    With several step bodies (`bodies`), not `step` in a loop: each body steps in
    a loop of its own that goes on while the chooser keeps picking its arms, and
    an outer loop goes round the bodies. On a GPU each loop's predicate is a wait
    for the host, so a step costs one such wait, as a fixed arm's does, where
    `step` costs one per body (docs/bandits.md); only a change of body costs
    more. The chooser picks each step's arm after the step before it, from the
    same key, so the steps are `step`'s, in the same order.

    A drafter that catches up in a loop of its own (`settles`) is settled where its
    body starts to run, and its steps in the loop that follows skip that loop: on a
    GPU, three waits for the host at each start of a run of its steps (the settling
    loop, and the loop around the run entered and left) instead of one at every step.
    """
    bodies = self.bodies
    if len(bodies) == 1:
      body = self.lone_settling_body
      if body is not None:
        state = self.settle(params, state, body)
      return loop_until_done(state,
                             lambda state: self.step(params, state, samplers, body is not None),
                             self.max_new_tokens)

    def running(carry):
      return still_running(carry[0], self.max_new_tokens)

    def body_loop(carry, body):
      def in_body(carry):
        return running(carry) & jnp.isin(carry[1], jnp.asarray(body))

      def body_steps(carry, settled=False):
        return self.body_turn(params, *carry, samplers, body, settled)

      def settled_steps(carry):  # runs once each time the body starts
        state, arm = carry
        return jax.lax.while_loop(in_body, functools.partial(body_steps, settled=True),
                                  (self.settle(params, state, body), arm))
      return jax.lax.while_loop(in_body, settled_steps if self.settles(body) else body_steps,
                                carry)

    def each_body(carry):
      for body in bodies:
        carry = body_loop(carry, body)
      return carry

    state, _ = jax.lax.while_loop(running, each_body, self.select(state))
    return state

  def generate(self, params, prompt_tokens, prompt_lens, rng, samplers: Samplers,
               bandit: BanditState | None = None) -> SpecOutput:
    """Prefill and the step loop, compiled into one program.

    Args:
      params: {"target": target params, "drafters": {key: drafter params}}.
      prompt_tokens: [B, P] int32, right-padded.
      prompt_lens: [B] int32.
      rng: PRNG key.
      samplers: pytrees; the target's defines the output distribution.
      bandit: the bandit's state to start from; None starts fresh. A chooser's is
        donated: the arrays passed are deleted, and the output's `bandit` takes their
        place. A Fixed strategy's is not.
    """
    return self._program(self, params, prompt_tokens, prompt_lens, rng, samplers, bandit)

  def lower(self, *args) -> jax.stages.Lowered:
    """`generate`'s program for these arguments, lowered and ready to compile."""
    return self._program.lower(self, *args)

  @property
  def _program(self):
    return _PROGRAMS[not isinstance(self.strategy, Fixed), self.pass_width is not None]

  def checked(self, out: SpecOutput) -> SpecOutput:
    """`out`, once the host has seen no NaN rows in it.

    Raises:
      FloatingPointError: naming the target or the arm whose drafter gave NaN logits.
    """
    raise_on_nan(out.nan_rows, out.nan_arm, [arm.method for arm in self.arms])
    return out


def _generate_body(decoder: SpeculativeDecoder, params, prompt_tokens, prompt_lens, rng,
                   samplers: Samplers, bandit: BanditState | None) -> SpecOutput:
  state = decoder.init(params, prompt_tokens, prompt_lens, rng, samplers.target, bandit)
  state = decoder.run_steps(params, state, samplers)
  return SpecOutput(tokens=state.seqs.generated(decoder.max_new_tokens),
                    num_tokens=state.seqs.num_generated, nan_rows=state.seqs.nan_rows,
                    nan_arm=state.nan_arm, steps=state.step, metrics=state.metrics,
                    bandit=state.bandit, history=state.history)


# A chooser's state is donated: each call writes its state where it was handed, so a
# chooser's calls find their buffers where the previous call left them. In the H100 A/B
# of docs/bandits.md, KL-UCB's calls that held the drafter then took 0.2 to 2.5 ms longer
# than the (donated) drafter's calls, against 2.8 to 6.9 ms undonated. A Fixed strategy's
# state is made afresh for each call and dropped after it; donated, it made the fixed
# drafter 0.9 to 2.3% slower in the same A/B, so it is not. Keyed by (donated, fixed
# kernels).
_PROGRAMS = {
    (donated, fixed_kernels): jax.jit(
        _generate_body, static_argnums=0, donate_argnames="bandit" if donated else (),
        compiler_options=FIXED_KERNELS if fixed_kernels else None)
    for donated in (False, True) for fixed_kernels in (False, True)}


def run_speculative(params, decoder: SpeculativeDecoder, prompts: Sequence[Sequence[int]], rng,
                    samplers: Samplers) -> SpecOutput:
  """Validates the prompts and budget on the host, generates, and raises on NaN rows.

  Raises:
    ValueError: on prompts outside the vocabulary or a budget the cache or the
      model's positions cannot hold.
    FloatingPointError: when a row's target or draft logits were NaN.
  """
  return decoder.checked(
      decoder.generate(params, *decoder.ar_decoder.prepare(prompts), rng, samplers))


def acceptance_rates(steps: int, tested: int, accepted: int, emitted: int) -> dict[str, float]:
  """alpha: drafts accepted per draft the accept test reached (it stops at the first
  rejection); tau: tokens emitted per row step. NaN where nothing was counted."""
  return dict(alpha=accepted / tested if tested else float("nan"),
              tau=emitted / steps if steps else float("nan"))


def summarize(metrics: SpecMetrics) -> dict[str, Any]:
  """Host-side report of the device metrics, over all rows."""
  m = jax.tree.map(np.asarray, metrics)
  totals = {name: int(getattr(m, name).sum())
            for name in ("steps", "proposed", "tested", "accepted", "emitted")}
  return (totals
          | acceptance_rates(totals["steps"], totals["tested"], totals["accepted"],
                             totals["emitted"])
          | dict(mean_accepted=(totals["accepted"] / totals["steps"] if totals["steps"]
                                else float("nan")),
                 accept_hist=m.accept_hist.sum(axis=0).tolist()))

"""Choosers that model what is unknown about an arm: its per-draft acceptance.

An arm's step cost c_a is calibrated and its gamma is fixed; what a step
yields is unknown. If each draft is accepted with probability alpha (until the
first rejection), a step emits on average

  tau(gamma, alpha) = (1 - alpha^(gamma + 1)) / (1 - alpha)

tokens, so the arm to run maximises tau(gamma_a, alpha_a) / c_a (the AR arm:
1 / c_AR). These choosers keep, per drafter, the drafts tested and accepted,
and learn alpha from every draft rather than from one [0, 1] reward per step:
a step of gamma 4 is up to four Bernoulli trials, and the variance of a
Beta posterior shrinks with trials, not with a Hoeffding width. Arms that
share a drafter at different gammas share its statistics, so the choice among
them is an adaptive gamma.

Evidence comes from the arm that ran and, for free, from deterministic
drafters the engine scores against the committed tokens
(`engine.SpeculativeDecoder._scored_for_free`). `discount` < 1 fades old
evidence each step, to follow a stream that changes domain; `request_carry` < 1
fades it once more at each new request, where a stream changes domain if at
all, so that a request's own first steps outweigh the last request's sooner.

`contextual` choosers learn alpha apart in each context a drafter tells before
it drafts (`Drafter.lookup`): n-gram lookup's match length. After no match
it proposes the last token again, which is almost never right; after a long
match it often copies several tokens (bench/ngram_contexts.py measures both on
real text). A chooser that knows only the drafter's mean runs it at the wrong
moments; one that knows the context can run it where it has a long match and
another drafter elsewhere, and so can beat every fixed arm within a domain, not
only across domains.

On a GPU a step that runs another step body than the last step's waits for
the host more often than its arm's calibrated cost counts: once for each
loop predicate between the two bodies (`drafters.host_waits`; from the n-gram
body to the feature drafter's, one wait; back, four). With `wait_cost` > 0
(the cost of one wait) the Thompson and KL-UCB choosers price those waits
into the step's cost, so that a detour to another body is taken only where it
pays for its waits, and the dearer way back is priced when leaving.

| chooser             | rule                                                               |
|---------------------|--------------------------------------------------------------------|
| AcceptanceThompson  | alpha ~ Beta(1 + accepted, 1 + rejected) per drafter, sampled each |
|                     | step; the arm with the largest tau / c                             |
| AcceptanceKLUCB     | the largest alpha within the KL-UCB bound of Bernoulli trials      |
|                     | (Garivier & Cappe 2011); the arm with the largest tau / c there     |
| contextual variants | either of the two above with alpha per drafter and context; tau    |
|                     | at the contexts the rows are in now                                |
| Hedge               | exponential weights on each arm's tokens per cost, tau at this     |
|                     | step's acceptance estimate; drafters scored for free gain every    |
|                     | step (full information), the others only when run, importance-     |
|                     | weighted (Exp3)                                                    |
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import struct

from flashspec_jax.bandit.strategies import BanditState, Feedback, sample_beta
from flashspec_jax.drafters import host_waits, step_bodies

# Bisection steps of the KL-UCB bound: 2^-24 of the unit interval.
_BISECTION_STEPS = 24


@struct.dataclass(kw_only=True)
class AcceptanceState(BanditState):
  """BanditState (steps and rewards per arm, for reports) plus what the choosers learn.

  Attributes:
    accepted: [K, C] f32, drafts accepted per arm and context (discounted); C is 1
      unless the chooser is contextual.
    tested: [K, C] f32, drafts tested per arm and context (discounted).
    gains: [K] f32, Hedge's discounted estimated gains (unused by the others).
    last_arm: [] int32, the arm of the last step, -1 before the first.
  """

  accepted: jax.Array
  tested: jax.Array
  gains: jax.Array
  last_arm: jax.Array


def expected_tokens(gamma: jax.Array, alpha: jax.Array) -> jax.Array:
  """tau: tokens per step with gamma drafts each accepted with probability alpha (1 for
  gamma 0, gamma + 1 at alpha = 1)."""
  alpha = jnp.clip(alpha, 0.0, 1.0 - 1e-6)
  return (1.0 - alpha ** (gamma + 1.0)) / (1.0 - alpha)


def bernoulli_kl(p: jax.Array, q: jax.Array) -> jax.Array:
  eps = 1e-9
  p, q = jnp.clip(p, eps, 1 - eps), jnp.clip(q, eps, 1 - eps)
  return p * jnp.log(p / q) + (1 - p) * jnp.log((1 - p) / (1 - q))


def kl_upper_bound(mean: jax.Array, trials: jax.Array, budget: jax.Array) -> jax.Array:
  """The largest q >= mean with trials * kl(mean, q) <= budget, by bisection."""
  def halve(_, bounds):
    low, high = bounds
    middle = (low + high) / 2
    inside = trials * bernoulli_kl(mean, middle) <= budget
    return jnp.where(inside, middle, low), jnp.where(inside, high, middle)
  # Unrolled: on a GPU each turn of a loop inside the decode step waits for the host to
  # test its condition. With the loop, KL-UCB's steps in the H200 choosers runs cost
  # 0.27-0.37 ms more than Hedge's beyond their arms' calibrated costs (docs/bandits.md).
  low, _ = jax.lax.fori_loop(0, _BISECTION_STEPS, halve, (mean, jnp.ones_like(mean)),
                             unroll=True)
  return low


def by_context(values: jax.Array, contexts: jax.Array, num_contexts: int) -> jax.Array:
  """[..., C] values summed over rows within each context: contexts [B, ...] int32,
  values [B, ...] broadcasting against them."""
  return (jax.nn.one_hot(contexts, num_contexts) * values[..., None]).sum(0)


@dataclasses.dataclass(frozen=True)
class _AcceptanceModel:
  """What the three choosers share: the arms' gammas and costs (bound by the engine),
  drafter groups, and learning from drafts.

  Attributes:
    gammas, costs: per arm; set by `bind` from the engine's arms.
    groups: per arm, the first arm with the same drafter (itself if none before).
    free_arms: per arm, whether the engine scores it without running it (AR, and
      drafters with `scored_free`).
    context_arms: per arm, the first arm of the drafter whose context it learns in (its
      own drafter's if that tells contexts; with step_context, else the first drafter
      that does); -1 for none. Set by `bind`.
    arm_contexts: per arm, how many contexts it learns apart (1 unless contextual).
    discount: per step, on all evidence; 1 keeps everything.
    request_carry: at each new request (`observe`), on the evidence carried from
      earlier ones; 1 keeps it whole.
    contextual: learn each drafter's acceptance per context (`Drafter.lookup`).
    step_context: a contextual chooser also learns each drafter that tells no context
      of its own (a model drafter; not AR, whose step emits one token in any context)
      in the context of the first drafter that tells one (n-gram lookup's match
      length): on real text a feature drafter's steps emit more where the text repeats
      itself (bench/drafter_contexts.py), so one mean for it misprices it against
      n-gram lookup in each context.
    wait_cost: what one wait for the host costs, in the costs' unit; an arm's step
      costs c_a plus wait_cost for each wait from the last step's body to its own
      (`drafters.host_waits`); 0 prices none.
    bodies: per arm, the index of its step body (`drafters.step_bodies`); set by `bind`.
  """

  gammas: tuple[int, ...] = ()
  costs: tuple[float, ...] = ()
  groups: tuple[int, ...] = ()
  free_arms: tuple[bool, ...] = ()
  context_arms: tuple[int, ...] = ()
  arm_contexts: tuple[int, ...] = ()
  discount: float = 1.0
  request_carry: float = 1.0
  contextual: bool = False
  step_context: bool = False
  wait_cost: float = 0.0
  bodies: tuple[int, ...] = ()
  uses_free_feedback = True
  commits = True  # whether `committed_arm` may name an arm

  def __post_init__(self):
    for name in ("discount", "request_carry"):
      if not 0 < getattr(self, name) <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
    if not self.wait_cost >= 0:
      raise ValueError(f"wait_cost must be >= 0, got {self.wait_cost}")
    if self.step_context and not self.contextual:
      raise ValueError("step_context is for a contextual chooser")

  def bind(self, arms) -> _AcceptanceModel:
    drafters = [arm.drafter for arm in arms]
    groups = tuple(drafters.index(d) if d is not None else i for i, d in enumerate(drafters))
    tellers = [groups[i] for i, d in enumerate(drafters)
               if self.contextual and d is not None and d.num_contexts > 1]
    context_arms = tuple(
        groups[i] if groups[i] in tellers
        else tellers[0] if self.step_context and d is not None and tellers else -1
        for i, d in enumerate(drafters))
    arm_contexts = tuple(drafters[t].num_contexts if t >= 0 else 1 for t in context_arms)
    bodies = [0] * len(arms)
    for index, body in enumerate(step_bodies(arms)):
      for arm in body:
        bodies[arm] = index
    return dataclasses.replace(
        self, gammas=tuple(a.gamma for a in arms), costs=tuple(a.cost for a in arms),
        groups=groups, free_arms=tuple(d is None or d.scored_free for d in drafters),
        context_arms=context_arms, arm_contexts=arm_contexts, bodies=tuple(bodies))

  @property
  def num_contexts(self) -> int:
    """C: the most contexts any arm's drafter tells apart (1 if the chooser is not
    contextual)."""
    return max(self.arm_contexts, default=1)

  def init(self, num_arms: int) -> AcceptanceState:
    if self.contextual and not self.arm_contexts:
      # Unbound, it cannot know its arms' contexts, and its state would have the wrong shape.
      raise ValueError("a contextual chooser's state needs the chooser bound to its arms")
    # A buffer each: the engine's program takes the state donated, and may not take one
    # buffer twice.
    accepted, tested = (jnp.zeros((num_arms, self.num_contexts), jnp.float32) for _ in range(2))
    gains, counts, sums = (jnp.zeros((num_arms,), jnp.float32) for _ in range(3))
    return AcceptanceState(accepted=accepted, tested=tested, gains=gains, counts=counts,
                           sums=sums, pulls=jnp.zeros((), jnp.int32),
                           last_arm=jnp.full((), -1, jnp.int32))

  def pooled(self, values: jax.Array) -> jax.Array:
    """[K, ...] each arm's drafter's total over the arms that share it.

    Sums of static rows, not a scatter-add by group and a gather back: those are
    a kernel each on a GPU, run at every step, where the sums fuse with the
    arithmetic around them."""
    totals = {group: sum(values[i] for i, other in enumerate(self.groups) if other == group)
              for group in set(self.groups)}
    return jnp.stack([totals[group] for group in self.groups])

  def learn(self, state: AcceptanceState, arm, feedback: Feedback) -> AcceptanceState:
    chosen = jnp.arange(state.num_arms) == arm
    d = self.discount
    return dataclasses.replace(
        state, accepted=d * state.accepted + feedback.accepted,
        tested=d * state.tested + feedback.tested, counts=state.counts + chosen,
        sums=state.sums + chosen * feedback.reward, pulls=state.pulls + 1,
        last_arm=jnp.asarray(arm, jnp.int32))

  def observe(self, state: AcceptanceState, accepted: jax.Array,
              tested: jax.Array) -> AcceptanceState:
    """A new request: the evidence carried from earlier requests, scaled by
    `request_carry` (Hedge's gains too), plus evidence no step produced, [K, C] drafts
    accepted and tested per arm and context (the prompt, scored before the first step), with no
    pull. Hedge chooses by its gains, which only steps add to."""
    c = self.request_carry
    return dataclasses.replace(state, accepted=c * state.accepted + accepted,
                               tested=c * state.tested + tested, gains=c * state.gains)

  def step_costs(self, state: AcceptanceState) -> jax.Array:
    """[K] each arm's cost if it ran the next step: c_a, plus wait_cost for each wait
    for the host its body adds after the last step's (none before the first step)."""
    costs = jnp.asarray(self.costs, jnp.float32)
    if self.wait_cost == 0:
      return costs
    bodies = jnp.asarray(self.bodies)
    waits = host_waits(bodies[jnp.maximum(state.last_arm, 0)], bodies, max(self.bodies) + 1)
    return costs + self.wait_cost * jnp.where(state.last_arm >= 0, waits, 0)

  def tokens_per_cost(self, alpha: jax.Array, weights: jax.Array | None = None,
                      costs: jax.Array | None = None) -> jax.Array:
    """[K] tau(gamma_a, alpha_a) / c_a, alpha [K, C] per context averaged over the
    contexts with weights [K, C] (None: one context); costs [K] (None: the arms')."""
    if weights is None:
      if alpha.shape[1] > 1:
        raise ValueError("a contextual chooser needs the rows' contexts (weights)")
      weights = jnp.ones_like(alpha)
    tau = expected_tokens(jnp.asarray(self.gammas, jnp.float32)[:, None], alpha)
    tokens = (tau * weights).sum(-1) / jnp.maximum(weights.sum(-1), 1e-9)
    return tokens / (jnp.asarray(self.costs, jnp.float32) if costs is None else costs)

  def select(self, state, key, weights=None):
    """The arm for the next step; weights [K, C]: how many rows are in each context
    of each arm's drafter now (needed if C > 1)."""
    return self.choose(state, self.draw(state, key), weights)

  def committed_arm(self, state: AcceptanceState, confidence: float) -> jax.Array:
    """[] int32: the arm a new request may run alone, or -1 for none.

    On a GPU a chooser's step costs more than its arm's step alone: held on the
    feature drafter at temperature 1, KL-UCB's calls on an H100 ran 3 to 6 ms
    slower than the fixed drafter's on the same prompts and steps (docs/bandits.md,
    "Committing a request to one arm"). So where the evidence says one arm beats
    every other, the request runs that arm's own program, and the chooser learns
    from its totals (`learn_committed`). "Beats" is by KL confidence bounds at
    level `confidence` on each drafter's acceptance: the arm's tokens per cost at
    the lower end of its bound exceed every other arm's at the upper end, in every
    context any drafter has been seen in. Not the chooser's own pick: an
    optimistic rule picks arms to learn about them, and whole requests committed
    to learning ran KL-UCB at 0.62x the drafter in an H100 stream. While a request
    is committed the other arms' evidence fades with each step (the discount, and
    request_carry at each request; config.validate refuses commit with neither) and
    their bounds widen, so a later request runs the chooser again and refreshes
    them. Only an arm learnt in one context can commit, since a lone drafter's
    program reports no contexts; nothing commits before any evidence.
    """
    accepted, tested = self.pooled(state.accepted), self.pooled(state.tested)  # [K, C]
    mean = accepted / jnp.maximum(tested, 1e-9)
    budget = jnp.float32(-math.log1p(-min(confidence, 1 - 1e-6)))
    gammas = jnp.asarray(self.gammas, jnp.float32)[:, None]
    # Untried, a drafter may accept every draft; AR's step yields one token whatever.
    upper = jnp.where(tested > 0, kl_upper_bound(mean, tested, budget),
                      jnp.where(gammas > 0, 1.0, 0.0))
    lower = jnp.where(tested > 0, 1 - kl_upper_bound(1 - mean, tested, budget), 0.0)
    costs = jnp.asarray(self.costs, jnp.float32)[:, None]
    best_case = expected_tokens(gammas, upper) / costs  # [K, C]
    worst_case = expected_tokens(gammas[:, 0], lower[:, 0]) / costs[:, 0]  # [K], context 0
    # Each arm's contexts: those seen, for an arm learnt per context; else its one.
    contextual = jnp.asarray(self.arm_contexts)[:, None] > 1
    seen = state.tested.sum(0) > 0  # [C]
    in_play = jnp.where(contextual, seen, jnp.arange(self.num_contexts) == 0)
    rivals = ~jnp.eye(len(self.gammas), dtype=bool)  # [K, K]: b is a's rival
    rival_best = jnp.max(jnp.where(rivals[:, :, None] & in_play, best_case, 0.0), (1, 2))
    known = (tested[:, 0] > 0) | (gammas[:, 0] == 0)
    commits = ((worst_case > rival_best) & known & ~contextual[:, 0]
               & seen.any() & self.commits)
    return jnp.where(commits.any(), jnp.argmax(commits), -1).astype(jnp.int32)

  def learn_committed(self, state: AcceptanceState, arm, steps, accepted,
                      tested) -> AcceptanceState:
    """The chooser after a request that arms[arm] ran alone for `steps` steps, with
    `accepted` of `tested` drafts: a new request (`observe`, with no prompt
    evidence), then the steps' evidence, faded by the per-step discount as if spread
    evenly over them. The steps' rewards are not known, so `sums` is left as it is."""
    state = self.observe(state, jnp.zeros_like(state.accepted), jnp.zeros_like(state.tested))
    steps = jnp.asarray(steps, jnp.float32)
    fade = self.discount ** steps
    spread = jnp.where(fade < 1, (1 - fade) / jnp.maximum(steps * (1 - self.discount), 1e-9),
                       1.0)
    into = (jnp.arange(state.num_arms) == arm)[:, None] & (jnp.arange(self.num_contexts) == 0)
    return dataclasses.replace(
        state, accepted=fade * state.accepted + into * spread * accepted,
        tested=fade * state.tested + into * spread * tested,
        counts=state.counts + (jnp.arange(state.num_arms) == arm) * steps,
        pulls=state.pulls + steps.astype(jnp.int32), last_arm=jnp.asarray(arm, jnp.int32))

  def draw(self, state, key):
    del state, key
    return None


@dataclasses.dataclass(frozen=True)
class AcceptanceThompson(_AcceptanceModel):

  def draw(self, state, key):
    """[K, C] alpha sampled from each arm's drafter's Beta posterior in each context
    (one draw per drafter and context)."""
    accepted, tested = self.pooled(state.accepted), self.pooled(state.tested)
    alpha = sample_beta(key, 1 + accepted, 1 + tested - accepted)
    return alpha[jnp.asarray(self.groups)]

  def choose(self, state, draws, weights=None):
    return jnp.argmax(self.tokens_per_cost(draws, weights, self.step_costs(state))
                      ).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class AcceptanceKLUCB(_AcceptanceModel):
  """Optimism in the face of uncertainty about alpha, with KL-UCB's bound: log t
  exploration budget per drafter (t = steps so far)."""

  def choose(self, state, draws, weights=None):
    del draws
    accepted, tested = self.pooled(state.accepted), self.pooled(state.tested)
    mean = (accepted + 0.5) / (tested + 1.0)  # untried drafters start at 1/2, bounded at 1
    budget = jnp.log(jnp.maximum(state.pulls, 1).astype(jnp.float32) + 1.0)
    alpha = kl_upper_bound(mean, tested + 1.0, budget)
    return jnp.argmax(self.tokens_per_cost(alpha, weights, self.step_costs(state))
                      ).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Hedge(_AcceptanceModel):
  """Exponential weights over arms, on gains g_a = tau(gamma_a, alpha) / c_a normalised by
  the largest possible ((gamma + 1) / c), where alpha is the step's acceptance of the
  arm's drafter over the drafts it was scored on. Arms whose drafter was seen this step
  (it ran, or the engine scored it for free; the AR arm always yields one token) gain;
  the others gain nothing, and an arm the engine cannot score for free gains its
  estimate divided by the probability it was chosen (Exp3) when it ran. Cumulative
  gains are discounted by `discount`."""

  learning_rate: float = 0.5
  discount: float = 0.99
  commits = False  # it chooses by gains that a committed request would not update

  def __post_init__(self):
    super().__post_init__()
    if self.contextual:
      raise ValueError("Hedge weighs arms, not contexts: it has no contextual variant")
    if self.wait_cost:
      raise ValueError("Hedge draws its arm from its weights and prices no wait for the host")

  def weights(self, state: AcceptanceState) -> jax.Array:
    return jax.nn.softmax(self.learning_rate * state.gains)

  def draw(self, state, key):
    return jax.random.uniform(key)

  def choose(self, state, draws, weights=None):
    del weights  # Hedge weighs arms, not contexts
    weights = self.weights(state)
    # Prefix sums of static slices, not a cumsum: that is a loop of its own on a CPU and
    # a kernel of its own on a GPU, run at every step, where the sums fuse.
    cumulative = jnp.stack([weights[:i + 1].sum() for i in range(weights.shape[0])])
    return jnp.minimum(jnp.sum(cumulative < draws), state.num_arms - 1).astype(jnp.int32)

  def learn(self, state, arm, feedback):
    gammas = jnp.asarray(self.gammas, jnp.float32)
    costs = jnp.asarray(self.costs, jnp.float32)
    # This step's per-draft acceptance of each drafter, from every draft it was scored on,
    # extrapolated to each arm's own gamma: a chain cut short by the depth the step
    # verified would undercount arms of long gamma. [K, 1]: Hedge is never contextual.
    accepted, tested = self.pooled(feedback.accepted), self.pooled(feedback.tested)
    alpha = accepted / jnp.maximum(tested, 1e-9)
    gain = self.tokens_per_cost(alpha) / jnp.max((gammas + 1) / costs)
    # The AR arm always yields one token; a drafter is seen when it ran or was scored.
    seen = (tested[:, 0] > 0) | (gammas == 0)
    # An arm the engine never scores for free is seen only when chosen: Exp3's estimate.
    chosen = jnp.arange(state.num_arms) == arm
    seen_only_when_chosen = chosen & ~jnp.asarray(self.free_arms)
    gain = jnp.where(seen_only_when_chosen, gain / self.weights(state)[arm], gain)
    gains = self.discount * state.gains + jnp.where(seen, gain, 0.0)
    return dataclasses.replace(super().learn(state, arm, feedback), gains=gains)

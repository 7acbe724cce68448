"""Drafters: propose gamma tokens and the full distributions q they were drawn from.

A drafter is a static, hashable description; its mutable part (a KV cache) is
a pytree that the engine carries. Every drafter sees the committed token
buffer, so a drafter whose cache lags behind (it was not used for a while, or
the target accepted the draft it never fed itself) first catches up on the
tokens it has not seen, in chunks.

Cache invariant, shared with the target: a drafter's cache never holds the
row's last committed token, which is fed first at the next proposal.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from flax import struct

from flashspec_jax.models.eagle import FeatureDrafterNet, feature_width, rollout_visibility
from flashspec_jax.models.llama import KVCache, LayerCache, Llama, lm_head
from flashspec_jax.sampling import Sampler
from flashspec_jax.sequences import Sequences


class Drafter(Protocol):
  """What the engine needs of a drafter (static and hashable; its state is a pytree)."""

  @property
  def name(self) -> str:
    """The name results files and arm costs know it by."""

  @property
  def method(self) -> str:
    """The name a user gives it (config.methods, the API's drafters)."""

  @property
  def vocab_size(self) -> int: ...

  def init(self, params, prompt_tokens, prompt_lens, capacity: int) -> Any:
    """The drafter's state after reading the prompts."""

  def propose(self, params, state, seqs: Sequences, gamma: int, sampler: Sampler,
              rng) -> tuple[Any, jax.Array, jax.Array]:
    """(state, draft_tokens [B, gamma], draft_logq [B, gamma, V]) given the committed
    tokens (seqs.tokens, seqs.seq_lens); rng is the draft's own key."""

  def rollback(self, state, seq_lens) -> Any:
    """The state once rows hold seq_lens committed tokens."""

  # A drafter that reads the target's features has `reads_features` True, the
  # target layers it reads in `feature_layers` (Llama's), and an
  # `observe(state, features, starts)` that the engine calls after every target
  # forward, with the features of the positions starts[b] + t, as Llama returns them
  # for those layers.
  reads_features: bool
  # True for a deterministic drafter with no model, whose proposal the engine can
  # score against the committed tokens at no cost (engine._scored_for_free). Such a
  # drafter has a `drafts(seqs, gamma, found=None) -> [B, gamma] int32`, its proposal's
  # tokens, and its propose takes `drafts=` (at least gamma of them, made earlier at
  # the same tokens) to propose those.
  scored_free: bool
  # True where a wider step costs about what a narrower one does, so that arms of
  # this drafter at several gammas share one step body (step_bodies). Such a
  # drafter keeps the prefix contract: the first g drafts of propose(..., gamma=W, ...)
  # are distributed as propose(..., gamma=g, ...)'s, with the same q.
  shares_step_body: bool
  # How many contexts a drafter tells apart before it drafts, at no cost: a drafter with
  # more than one has a `lookup(seqs) -> (found [B] int32, context [B] int32)`, context in
  # [0, num_contexts); if it is also scored_free, its `drafts` takes `found=` to draft
  # from that lookup without looking again. The contextual choosers learn its
  # acceptance in each context apart (bandit/acceptance.py).
  num_contexts: int
  # A drafter that catches up on the tokens it missed in loops of its own may have a
  # `settle(params, state, tokens, seq_lens) -> state` that runs them, a
  # `settles(gamma) -> bool` that says whether its steps at gamma leave it nothing for
  # them, and a propose that then takes `settled=True` to skip them
  # (engine.SpeculativeDecoder.run_steps).


def step_bodies(arms: Sequence[Any]) -> tuple[tuple[int, ...], ...]:
  """The indices of arms (engine.Arm: each with a drafter, None for an AR step), grouped
  by the piece of program that steps them.

  The arms of one drafter with `shares_step_body` (n-gram lookup, whose drafts
  cost nothing) share one, which drafts and verifies their widest gamma
  (`engine.SpeculativeDecoder.arm_step`): on a GPU a verify pass a few tokens wider
  costs about the same (on the H200 the calibrated n-gram arms at gamma 2, 4
  and 8 were within 1.5% of each other,
  results/choosers_smollm2/2026-12-02T013755Z_da02342b.json), and each step
  body costs every step a wait for the host (`engine.SpeculativeDecoder.run_steps`),
  and a change of body costs more waits (`host_waits`). The body's narrower arms
  then cost what its widest does and emit no more tokens for the same draws: a
  chooser that knows it keeps to the widest. On a CPU, where width costs time, a
  narrow n-gram arm would get dearer than it is alone, so there the pipeline's
  n-gram arms step alone (`NgramDrafter.shares_step_body`). Every other arm has
  its own body.
  """
  bodies: dict[Any, list[int]] = {}
  for i, arm in enumerate(arms):
    shared = arm.drafter is not None and arm.drafter.shares_step_body
    bodies.setdefault(("drafter", arm.drafter) if shared else ("arm", i), []).append(i)
  return tuple(map(tuple, bodies.values()))


def host_waits(from_body, to_body, num_bodies: int):
  """The waits for the host, beyond a step's own, when a step in body `to_body` follows
  one in `from_body` (indices into `step_bodies`; ints or int arrays). The generation
  loop (engine.SpeculativeDecoder.run_steps) runs one loop per body, in order, inside
  an outer loop, and each loop entered or passed reads its predicate: moving forward
  passes the bodies between the two; moving back goes round past the later bodies and
  the outer loop's predicate, one more slot of the cycle. Not counted: a body whose
  drafter the engine settles (`engine.SpeculativeDecoder.settles`) adds three at each
  start and saves its drafter's own loops at every step."""
  return (to_body - from_body) % (num_bodies + 1)


def draft_log_q(sampler: Sampler, logits: jax.Array) -> jax.Array:
  """[..., V] log q the sampler draws from, NaN where the raw logits hold a NaN.

  A greedy q is a one-hot at the argmax, which hides NaN logits; the engine
  stops a row whose q holds NaN, so the NaN must survive into q.
  """
  return jnp.where(jnp.isnan(logits).any(axis=-1, keepdims=True), jnp.nan,
                   sampler.log_probs(logits))


def gather_window(buffer: jax.Array, starts: jax.Array, width: int) -> jax.Array:
  """[B, width, ...] buffer[b, starts[b]:starts[b] + width], clamped at the buffer's end."""
  index = jnp.minimum(starts[:, None] + jnp.arange(width)[None, :], buffer.shape[1] - 1)
  index = index.reshape(index.shape + (1,) * (buffer.ndim - 2))
  return jnp.take_along_axis(buffer, index, axis=1)


@dataclasses.dataclass(frozen=True)
class ModelDrafter:
  """A Llama that drafts with its own KV cache.

  With `model` = Llama(target_config, num_layers=k) and params_key="target",
  this is the layer-skip self-drafter: the target's first k layers, final norm
  and head, sharing the target's weights. With a separate small model, its
  params sit under params["drafters"][params_key].

  Attributes:
    model: the drafting network (static).
    params_key: "target", or the drafter's key in params["drafters"].
    chunk: tokens per catch-up forward when the cache lags by more than the
      usual one or two tokens (after steps in which another arm was used).
    wide_chunk: tokens per forward while the lag exceeds `chunk`: the prompt, and
      the tokens of long idle spans. On a GPU a forward of 128 tokens costs about
      what one of 16 does, and each forward of the loop waits for the host once.
    unroll: unroll the gamma draft steps in XLA (fastest on GPU); False keeps one
      loop body, which compiles several times faster on CPU.
  """

  model: Llama
  params_key: str = "target"
  chunk: int = 16
  wide_chunk: int = 128
  unroll: bool = True
  reads_features = False
  scored_free = False
  shares_step_body = False
  num_contexts = 1

  @property
  def name(self) -> str:
    return (f"layer_skip_{self.model.depth}" if self.params_key == "target"
            else f"model_{self.params_key}")

  @property
  def method(self) -> str:
    return (f"layer_skip:{self.model.depth}" if self.params_key == "target"
            else f"draft_model:{self.params_key}")

  @property
  def vocab_size(self) -> int:
    return self.model.config.vocab_size

  def params(self, params: dict[str, Any]):
    return params["target"] if self.params_key == "target" else params["drafters"][self.params_key]

  def init(self, params, prompt_tokens, prompt_lens, capacity: int) -> KVCache:
    """Empty: the prompts are fed at the first proposal, so that an arm a chooser never
    picks costs no prefill (layer-skip's was most of the target's, every call)."""
    del params, prompt_lens
    return KVCache.init(self.model.config, prompt_tokens.shape[0], capacity,
                        dtype=self.model.param_dtype, num_layers=self.model.num_layers)

  def settle(self, params, cache: KVCache, tokens, seq_lens) -> KVCache:
    """Feeds the committed tokens the cache lacks but the last one or two: `wide_chunk`
    at a time while more than `chunk` remain (the prompt, long idle spans), then
    `chunk` at a time.

    A step it runs leaves only the last one or two, so an engine that settles it
    where it starts to run it may propose with `settled=True` while it keeps
    running it: on a GPU each loop's predicate is a wait for the host, two a step
    when they sit in `propose`."""
    def to_feed(cache):  # the tokens to feed before the last one or two
      return seq_lens - 2 - cache.lengths

    def feeder(width):
      def feed(cache):
        num_valid = jnp.clip(to_feed(cache), 0, width)
        window = gather_window(tokens, cache.lengths, width)
        _, cache = self.model.apply(self.params(params), window, cache, num_valid=num_valid,
                                    logits_index=jnp.zeros_like(num_valid))
        return cache
      return feed

    cache = jax.lax.while_loop(lambda cache: jnp.any(to_feed(cache) > self.chunk),
                               feeder(self.wide_chunk), cache)
    return jax.lax.while_loop(lambda cache: jnp.any(to_feed(cache) > 0), feeder(self.chunk),
                              cache)

  def settles(self, gamma: int) -> bool:
    """Always: a step leaves only the last one or two tokens, whatever its gamma."""
    del gamma
    return True

  def catch_up(self, params, cache: KVCache, tokens, seq_lens,
               settled: bool = False) -> tuple[jax.Array, KVCache]:
    """Feeds every committed token the cache lacks; returns logits after the last one [B, V].

    The usual lag is one token (the last committed) or two (the target also
    accepted the last draft, which the drafter never fed itself): one forward
    of two tokens, after `settle` unless settled (no longer lag)."""
    if not settled:
      cache = self.settle(params, cache, tokens, seq_lens)
    num_valid = seq_lens - cache.lengths  # 1 or 2
    window = gather_window(tokens, cache.lengths, 2)
    logits, cache = self.model.apply(self.params(params), window, cache, num_valid=num_valid,
                                     logits_index=num_valid - 1)
    return logits, cache

  def propose(self, params, cache: KVCache, seqs: Sequences, gamma: int, sampler: Sampler,
              rng, settled: bool = False) -> tuple[KVCache, jax.Array, jax.Array]:
    """Drafts gamma tokens per row; settled: as `catch_up`'s.

    Returns:
      cache: holding the committed tokens and all drafts but the last.
      draft_tokens: [B, gamma] int32.
      draft_logq: [B, gamma, V] f32, the log q each draft was sampled from.
    """
    logits, cache = self.catch_up(params, cache, seqs.tokens, seqs.seq_lens, settled)
    keys = jax.random.split(rng, gamma)
    first = sampler.get_next_tokens(logits, keys[0])

    def draft_one(carry, key):
      cache, previous, logq = carry
      logits, cache = self.model.apply(self.params(params), previous[:, None], cache)
      token = sampler.get_next_tokens(logits[:, 0], key)
      return (cache, token, draft_log_q(sampler, logits[:, 0])), (previous, logq)

    # Each iteration feeds the previous draft and samples the next; the last
    # draft is never fed, as the target's pass scores it.
    (cache, last, last_logq), (drafts, logqs) = jax.lax.scan(
        draft_one, (cache, first, draft_log_q(sampler, logits)), keys[1:],
        unroll=max(gamma - 1, 1) if self.unroll else 1)
    draft_tokens = jnp.concatenate([drafts, last[None]], axis=0).T  # [B, gamma]
    draft_logq = jnp.concatenate([logqs, last_logq[None]], axis=0).transpose(1, 0, 2)
    return cache, draft_tokens, draft_logq

  def rollback(self, cache: KVCache, seq_lens) -> KVCache:
    """Forgets rejected drafts: keeps at most the committed tokens but the last."""
    return dataclasses.replace(cache, lengths=jnp.minimum(cache.lengths, seq_lens - 1))


def one_hot_log(tokens: jax.Array, vocab_size: int) -> jax.Array:
  """[..., V] log of the point mass at tokens [...]: 0 there, -inf elsewhere."""
  return jnp.where(jnp.arange(vocab_size) == tokens[..., None], 0.0, -jnp.inf)


@dataclasses.dataclass(frozen=True)
class NgramDrafter:
  """Prompt lookup: find the latest earlier occurrence of the row's last n tokens
  (the longest n from max_n down to 1 that matches) and propose the tokens that
  followed it. A point-mass q on each proposal keeps verification exact; with
  no match it proposes the last token again.

  Pure jnp over the committed token buffer; it has no state.

  Attributes:
    shares_step_body: its arms at several gammas share one step body, which drafts
      and verifies the widest (step_bodies). Drafting more costs nothing,
      and its drafts at gamma W begin with its drafts at any smaller gamma, but
      verifying more is free only where a target pass is launch-bound (a GPU);
      on a CPU a wider pass costs time, and each arm is better off alone.
  """

  vocab_size: int
  max_n: int = 3
  shares_step_body: bool = True
  reads_features = False
  # Deterministic and without a model: the engine scores it after other arms' steps.
  scored_free = True

  @property
  def name(self) -> str:
    return f"ngram_{self.max_n}"

  @property
  def method(self) -> str:
    return f"ngram:{self.max_n}"

  def init(self, params, prompt_tokens, prompt_lens, capacity: int):
    del params, prompt_tokens, prompt_lens, capacity
    return ()

  @property
  def num_contexts(self) -> int:
    return self.max_n + 1

  def lookup(self, seqs: Sequences) -> tuple[jax.Array, jax.Array]:
    """(continuation [B], match_length [B]): where the tokens after each row's latest
    longest match start, and that match's length n (-1 and 0 where nothing matches);
    the match length is the drafter's context."""
    tokens, seq_lens = seqs.tokens, seqs.seq_lens
    batch, width = tokens.shape
    # A match of length n whose continuation starts at e has tokens[e - 1 - j] ==
    # tokens[L - 1 - j] for every j < n (L = seq_lens). Counting the run of equal
    # pairs back from every e finds all n in one pass over the buffer, where a pass
    # per n costs kernels of its own (15 fusions against 8 in the CPU program), paid
    # twice a step when a contextual chooser reads the match length too.
    last = jnp.take_along_axis(
        tokens, jnp.maximum(seq_lens[:, None] - 1 - jnp.arange(self.max_n)[None, :], 0), axis=1)
    # -1 before the buffer's start: no token equals it, so no match starts before it.
    padded = jnp.pad(tokens, ((0, 0), (self.max_n, 0)), constant_values=-1)
    run = jnp.ones((batch, width), bool)
    length = jnp.zeros((batch, width), jnp.int32)
    for j in range(self.max_n):
      before = padded[:, self.max_n - 1 - j:self.max_n - 1 - j + width]  # tokens[e - 1 - j]
      # A match of length j + 1 also needs a token before the row's last j + 1.
      run &= (before == last[:, j:j + 1]) & (seq_lens[:, None] > j + 1)
      length += run
    ends = jnp.arange(width)[None, :]
    # The longest match first, then the latest: one max over length * width + e.
    score = jnp.max(jnp.where((length > 0) & (ends < seq_lens[:, None]), length * width + ends, -1),
                    axis=1)
    found = score >= 0
    return (jnp.where(found, score % width, -1).astype(jnp.int32),
            jnp.where(found, score // width, 0).astype(jnp.int32))

  def context(self, seqs: Sequences) -> jax.Array:
    """[B] the length of the match the next drafts follow, 0 to max_n: on real text a
    step after a 3-token match emits several times what one after none does."""
    return self.lookup(seqs)[1]

  def drafts(self, seqs: Sequences, gamma: int, found: jax.Array | None = None) -> jax.Array:
    """[B, gamma] the gamma tokens after each row's latest longest match; found: the
    continuation `lookup(seqs)` gave, where the caller looked already."""
    tokens, seq_lens = seqs.tokens, seqs.seq_lens
    width = tokens.shape[1]
    continuation = self.lookup(seqs)[0] if found is None else found
    index = continuation[:, None] + jnp.arange(gamma)[None, :]
    proposed = jnp.take_along_axis(tokens, jnp.clip(index, 0, width - 1), axis=1)
    # Past the committed tokens (or with no match), repeat the last committed token.
    return jnp.where((continuation[:, None] >= 0) & (index < seq_lens[:, None]), proposed,
                     seqs.last_tokens[:, None])

  def propose(self, params, state, seqs: Sequences, gamma: int, sampler: Sampler, rng,
              drafts: jax.Array | None = None):
    """drafts: [B, >= gamma] `drafts(seqs, ...)`, where the caller drafted already."""
    del params, sampler, rng
    draft_tokens = (self.drafts(seqs, gamma) if drafts is None else drafts)[:, :gamma]
    return state, draft_tokens, one_hot_log(draft_tokens, self.vocab_size)

  def rollback(self, state, seq_lens):
    del seq_lens
    return state


def write_rows(buffer: jax.Array, new: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes new [B, T, ...] into buffer [B, S, ...] at rows' slots starts[b] + t,
  dropping writes past the end."""
  batch, width = new.shape[:2]
  slots = starts[:, None] + jnp.arange(width)[None, :]
  return buffer.at[jnp.arange(batch)[:, None], slots].set(new.astype(buffer.dtype), mode="drop")


@struct.dataclass(kw_only=True)
class FeatureDrafterState:
  """Attributes:
    cache: the drafter's one-layer KVCache; slot j holds the pair (f_j, t_{j+1}).
      Between steps it holds at most seq_lens - 1 pairs, all from target features.
    features: [B, S, D] the target's features f_j of the positions it has scored,
      as the target returns them for the drafter's feature layers ([B, S, F], one
      model width per layer, when it has some); those of committed positions
      (j < seq_lens - 1) are final.
  """

  cache: KVCache
  features: jax.Array


@dataclasses.dataclass(frozen=True)
class FeatureDrafter:
  """An EAGLE-style drafter (models/eagle.py) with its own one-layer KV cache.

  The engine hands it the target's features after every target forward, the
  other arms' too, so an idle feature drafter catches up on pairs it has not
  read without running the target again. It drafts from the pair of the last
  committed token, then from its own outputs; the slots it wrote while
  drafting hold its own features, not the target's, so it forgets them at
  once and reads the accepted tokens' true features at the next step.

  Attributes:
    target: the target model, whose embedding and head the drafter shares.
    params_key: the drafter's key in params["drafters"].
    chunk: pairs per catch-up forward; a step usually leaves gamma + 1 or fewer.
    wide_chunk: pairs per forward while more than `chunk` are missing: the prompt,
      and the pairs of long idle spans. On a GPU a forward of 128 pairs costs about
      what one of 16 does, and each forward of the loop waits for the host once.
    unroll: unroll the gamma draft steps in XLA (fastest on GPU).
    feature_layers: the target layers (0-based) whose residual streams it reads,
      fused (EAGLE-3), the layer count standing for the final-normed state; empty
      reads that state alone, unfused (EAGLE). Its params must match: fused ones
      have the projection `combine`.
  """

  target: Llama
  params_key: str
  chunk: int = 16
  wide_chunk: int = 128
  unroll: bool = True
  feature_layers: tuple[int, ...] = ()
  reads_features = True
  scored_free = False
  shares_step_body = False
  num_contexts = 1

  @property
  def name(self) -> str:
    return f"eagle_{self.params_key}"

  @property
  def method(self) -> str:
    return f"eagle:{self.params_key}"

  @property
  def vocab_size(self) -> int:
    return self.target.config.vocab_size

  def __post_init__(self):
    # A list would leave the dataclass unhashable, and jit keys programs by it.
    object.__setattr__(self, "feature_layers", tuple(self.feature_layers))

  @property
  def net(self) -> FeatureDrafterNet:
    return FeatureDrafterNet(self.target.config, self.target.param_dtype,
                             len(self.feature_layers))

  def init(self, params, prompt_tokens, prompt_lens, capacity: int) -> FeatureDrafterState:
    """Empty: the prompts' pairs are read at the first proposal, once observed."""
    del params, prompt_lens
    c = self.target.config
    batch = prompt_tokens.shape[0]
    dtype = self.target.param_dtype
    return FeatureDrafterState(
        cache=KVCache.init(c, batch, capacity, dtype=dtype, num_layers=1),
        features=jnp.zeros((batch, capacity, feature_width(c, len(self.feature_layers))), dtype))

  def observe(self, state: FeatureDrafterState, features, starts) -> FeatureDrafterState:
    return state.replace(features=write_rows(state.features, features, starts))

  def head(self, params, normed: jax.Array) -> jax.Array:
    """f32 logits [..., V] from the drafter's final-normed outputs [..., D], through
    the target's head; a drafter restricted to a vocabulary (models/eagle.py) gives
    -inf to the tokens outside it."""
    own = params["drafters"][self.params_key]
    if "vocabulary" not in own:
      return lm_head(params["target"], normed)
    vocabulary = own["vocabulary"]
    logits = jnp.einsum("...D,VD->...V", normed, vocabulary["head"],
                        preferred_element_type=jnp.float32)
    full = jnp.full(logits.shape[:-1] + (self.vocab_size,), -jnp.inf, jnp.float32)
    return full.at[..., vocabulary["ids"]].set(logits, unique_indices=True,
                                               indices_are_sorted=True)

  def rollout(self, params, features, tokens, steps: int) -> jax.Array:
    """[steps, B, T, D] final-normed outputs of draft steps 0..steps-1 at every position,
    run at once as drafting runs them (see models/eagle.py), for training.

    Step 0 at position j reads (f_j, t_{j+1}); step k reads its step k-1 output at
    j - 1 with t_{j+1}. Every step at j predicts t_{j+2}; step k at j < k is not
    a real draft.

    Args:
      params: {"target": ..., "drafters": {params_key: ...}}.
      features: [B, T, D or F] the target's features at positions 0..T-1, as the
        target returns them for `feature_layers`.
      tokens: [B, T] the tokens t_0..t_{T-1}.
      steps: draft steps to run.
    """
    batch, width = tokens.shape
    c = self.target.config
    following = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    embeds = jnp.take(params["target"]["params"]["embedding"], following, axis=0)
    shape = (batch, c.num_kv_heads, steps * width, c.head_dim)
    layer_cache = LayerCache(k=jnp.zeros(shape, self.target.param_dtype),
                             v=jnp.zeros(shape, self.target.param_dtype))
    positions = jnp.broadcast_to(jnp.arange(width), (batch, width))
    outputs = []
    for step in range(steps):
      hidden, normed, layer_cache = self.net.apply(
          self.net_params(params), features, embeds, layer_cache,
          jnp.full((batch,), step * width), positions, rollout_visibility(width, steps, step),
          from_target=step == 0)
      outputs.append(normed)
      features = jnp.pad(hidden, ((0, 0), (1, 0), (0, 0)))[:, :width]
    return jnp.stack(outputs)

  def net_params(self, params) -> dict:
    own = params["drafters"][self.params_key]["params"]
    # Unfused params given to a fused drafter (or the reverse) would run, untrained
    # where they do not fit: linen ignores params a module does not ask for.
    fused = own.get("combine")
    width = feature_width(self.target.config, len(self.feature_layers))
    if (fused is None) == bool(self.feature_layers) or (fused is not None
                                                         and fused.shape[0] != width):
      raise ValueError(f"{self.name} reads target layers {self.feature_layers}, but its params "
                       + ("fuse none" if fused is None
                          else f"fuse {fused.shape[0] // self.target.config.hidden_size}"))
    return {"params": own}

  def forward(self, params, cache: KVCache, features, tokens, num_valid,
              from_target: bool) -> tuple[jax.Array, jax.Array, KVCache]:
    """Reads pairs (features, tokens [B, T]) at each row's cache length; returns the
    outputs [B, T, D], the same final-normed (`head` reads them) and the cache grown by
    num_valid. from_target: the features are the target's (state.features), else the
    drafter's own outputs [B, T, D]."""
    starts = cache.lengths
    positions = starts[:, None] + jnp.arange(tokens.shape[1])[None, :]
    embeds = jnp.take(params["target"]["params"]["embedding"], tokens, axis=0)
    hidden, normed, layer_cache = self.net.apply(
        self.net_params(params), features, embeds, cache.layers[0], starts, positions,
        from_target=from_target)
    return hidden, normed, KVCache(layers=(layer_cache,), lengths=starts + num_valid)

  def _pairs_at(self, state: FeatureDrafterState, tokens, cache: KVCache, width: int):
    """The committed pairs (features, tokens) [B, width, ...] from each row's cache length."""
    return (gather_window(state.features, cache.lengths, width),
            gather_window(tokens, cache.lengths + 1, width))

  def settle(self, params, state: FeatureDrafterState, tokens,
             seq_lens) -> FeatureDrafterState:
    """Reads the missing pairs, `wide_chunk` at a time, until at most `chunk` are left.

    A step leaves gamma + 1 or fewer missing, so an engine that settles the drafter
    where it starts to run it (after the prompt, after idle steps) may propose with
    `settled=True` while it keeps running it, when `settles(gamma)`: on a GPU the
    loop's predicate is a wait for the host, once per step when it sits in `propose`.
    """
    def missing(cache):
      return seq_lens - 1 - cache.lengths

    def feed_wide(cache):  # all but the last missing pair, up to wide_chunk of them
      num_valid = jnp.clip(missing(cache) - 1, 0, self.wide_chunk)
      return self.forward(params, cache, *self._pairs_at(state, tokens, cache, self.wide_chunk),
                          num_valid, from_target=True)[2]

    return state.replace(cache=jax.lax.while_loop(
        lambda cache: jnp.any(missing(cache) > self.chunk), feed_wide, state.cache))

  def settles(self, gamma: int) -> bool:
    """Whether a step at gamma leaves at most `chunk` pairs missing (gamma + 1)."""
    return gamma + 1 <= self.chunk

  def catch_up(self, params, state: FeatureDrafterState, tokens, seq_lens,
               settled: bool = False) -> tuple[jax.Array, jax.Array, KVCache]:
    """Reads every committed pair the cache lacks (the last is that of the newest
    token); returns the logits [B, V] and output [B, D] after the last pair. settled:
    at most `chunk` are missing (`settle`)."""
    if not settled:
      state = self.settle(params, state, tokens, seq_lens)
    cache = state.cache
    num_valid = jnp.maximum(seq_lens - 1 - cache.lengths, 0)
    hidden, normed, cache = self.forward(
        params, cache, *self._pairs_at(state, tokens, cache, self.chunk), num_valid,
        from_target=True)
    last = jnp.maximum(num_valid - 1, 0)[:, None, None]
    # Only the last pair's logits are drafted from: the head reads one row, not a chunk.
    return (self.head(params, jnp.take_along_axis(normed, last, axis=1)[:, 0]),
            jnp.take_along_axis(hidden, last, axis=1)[:, 0], cache)

  def propose(self, params, state: FeatureDrafterState, seqs: Sequences, gamma: int,
              sampler: Sampler, rng, settled: bool = False
              ) -> tuple[FeatureDrafterState, jax.Array, jax.Array]:
    """Drafts gamma tokens per row; returns the state, draft_tokens [B, gamma] and
    draft_logq [B, gamma, V]. settled: as `catch_up`'s."""
    logits, hidden, cache = self.catch_up(params, state, seqs.tokens, seqs.seq_lens,
                                          settled)
    keys = jax.random.split(rng, gamma)
    first = sampler.get_next_tokens(logits, keys[0])
    ones = jnp.ones_like(seqs.seq_lens)

    def draft_one(carry, key):
      cache, hidden, previous, logq = carry
      hidden, normed, cache = self.forward(params, cache, hidden[:, None], previous[:, None], ones,
                                           from_target=False)
      logits = self.head(params, normed[:, 0])
      token = sampler.get_next_tokens(logits, key)
      return (cache, hidden[:, 0], token, draft_log_q(sampler, logits)), (previous, logq)

    (_, _, last, last_logq), (drafts, logqs) = jax.lax.scan(
        draft_one, (cache, hidden, first, draft_log_q(sampler, logits)), keys[1:],
        unroll=max(gamma - 1, 1) if self.unroll else 1)
    draft_tokens = jnp.concatenate([drafts, last[None]], axis=0).T
    draft_logq = jnp.concatenate([logqs, last_logq[None]], axis=0).transpose(1, 0, 2)
    # Only pairs of target features stay: the drafted slots are forgotten.
    cache = dataclasses.replace(cache, lengths=seqs.seq_lens - 1)
    return state.replace(cache=cache), draft_tokens, draft_logq

  def rollback(self, state: FeatureDrafterState, seq_lens) -> FeatureDrafterState:
    cache = state.cache
    return state.replace(cache=dataclasses.replace(
        cache, lengths=jnp.minimum(cache.lengths, seq_lens - 1)))

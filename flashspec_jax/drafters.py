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
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Sampler
from flashspec_jax.sequences import Sequences


class Drafter(Protocol):
  """What the engine needs of a drafter (static and hashable; its state is a pytree)."""

  @property
  def name(self) -> str: ...

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


def draft_log_q(sampler: Sampler, logits: jax.Array) -> jax.Array:
  """[..., V] log q the sampler draws from, NaN where the raw logits hold a NaN.

  A greedy q is a one-hot at the argmax, which hides NaN logits; the engine
  stops a row whose q holds NaN, so the NaN must survive into q.
  """
  return jnp.where(jnp.isnan(logits).any(axis=-1, keepdims=True), jnp.nan,
                   sampler.log_probs(logits))


def gather_window(tokens: jax.Array, starts: jax.Array, width: int) -> jax.Array:
  """[B, width] tokens[b, starts[b]:starts[b] + width], clamped at the buffer's end."""
  index = jnp.minimum(starts[:, None] + jnp.arange(width)[None, :], tokens.shape[1] - 1)
  return jnp.take_along_axis(tokens, index, axis=1)


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
    unroll: unroll the gamma draft steps in XLA (fastest on GPU); False keeps one
      loop body, which compiles several times faster on CPU.
  """

  model: Llama
  params_key: str = "target"
  chunk: int = 16
  unroll: bool = True

  @property
  def name(self) -> str:
    layers = self.model.num_layers or self.model.config.num_layers
    return (f"layer_skip_{layers}" if self.params_key == "target"
            else f"model_{self.params_key}")

  @property
  def vocab_size(self) -> int:
    return self.model.config.vocab_size

  def params(self, params: dict[str, Any]):
    return params["target"] if self.params_key == "target" else params["drafters"][self.params_key]

  def init(self, params, prompt_tokens, prompt_lens, capacity: int) -> KVCache:
    """Prefills the drafter's cache with the prompts."""
    cache = KVCache.init(self.model.config, prompt_tokens.shape[0], capacity,
                         dtype=self.model.param_dtype, num_layers=self.model.num_layers)
    _, cache = self.model.apply(self.params(params), prompt_tokens, cache, num_valid=prompt_lens,
                                logits_index=prompt_lens - 1)
    return cache

  def catch_up(self, params, cache: KVCache, tokens, seq_lens) -> tuple[jax.Array, KVCache]:
    """Feeds every committed token the cache lacks; returns logits after the last one [B, V].

    The usual lag is one token (the last committed) or two (the target also
    accepted the last draft, which the drafter never fed itself): one forward
    of two tokens. Longer lags are first fed `chunk` tokens at a time.
    """
    def lagging(cache):
      return jnp.any(seq_lens - cache.lengths > 2)

    def feed_chunk(cache):
      num_valid = jnp.clip(seq_lens - 2 - cache.lengths, 0, self.chunk)
      window = gather_window(tokens, cache.lengths, self.chunk)
      _, cache = self.model.apply(self.params(params), window, cache, num_valid=num_valid,
                                  logits_index=jnp.zeros_like(num_valid))
      return cache

    cache = jax.lax.while_loop(lagging, feed_chunk, cache)
    num_valid = seq_lens - cache.lengths  # 1 or 2
    window = gather_window(tokens, cache.lengths, 2)
    logits, cache = self.model.apply(self.params(params), window, cache, num_valid=num_valid,
                                     logits_index=num_valid - 1)
    return logits, cache

  def propose(self, params, cache: KVCache, seqs: Sequences, gamma: int, sampler: Sampler,
              rng) -> tuple[KVCache, jax.Array, jax.Array]:
    """Drafts gamma tokens per row.

    Returns:
      cache: holding the committed tokens and all drafts but the last.
      draft_tokens: [B, gamma] int32.
      draft_logq: [B, gamma, V] f32, the log q each draft was sampled from.
    """
    logits, cache = self.catch_up(params, cache, seqs.tokens, seqs.seq_lens)
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
  """

  vocab_size: int
  max_n: int = 3

  @property
  def name(self) -> str:
    return f"ngram_{self.max_n}"

  def init(self, params, prompt_tokens, prompt_lens, capacity: int):
    del params, prompt_tokens, prompt_lens, capacity
    return ()

  def propose(self, params, state, seqs: Sequences, gamma: int, sampler: Sampler, rng):
    del params, sampler, rng
    tokens, seq_lens = seqs.tokens, seqs.seq_lens
    batch, width = tokens.shape
    starts = jnp.arange(width)[None, :]  # candidate match start s
    continuation = jnp.full((batch,), -1, jnp.int32)  # index of the token after the match
    for n in range(1, self.max_n + 1):  # longer matches overwrite shorter ones
      suffix = gather_window(tokens, jnp.maximum(seq_lens - n, 0), n)  # [B, n]
      matches = jnp.ones((batch, width), bool)
      for k in range(n):
        shifted = jnp.take_along_axis(tokens, jnp.minimum(starts + k, width - 1).repeat(
            batch, 0), axis=1)
        matches &= shifted == suffix[:, k:k + 1]
      # The match must end before the suffix starts, with n tokens to match at all.
      matches &= (starts + n < seq_lens[:, None]) & (seq_lens[:, None] > n)
      latest = jnp.max(jnp.where(matches, starts, -1), axis=1)
      continuation = jnp.where(latest >= 0, latest + n, continuation)
    last = seqs.last_tokens
    index = continuation[:, None] + jnp.arange(gamma)[None, :]
    proposed = jnp.take_along_axis(tokens, jnp.clip(index, 0, width - 1), axis=1)
    # Past the committed tokens (or with no match), repeat the last committed token.
    draft_tokens = jnp.where((continuation[:, None] >= 0) & (index < seq_lens[:, None]), proposed,
                             last[:, None])
    return state, draft_tokens, one_hot_log(draft_tokens, self.vocab_size)

  def rollback(self, state, seq_lens):
    del seq_lens
    return state

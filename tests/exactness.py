"""Sequence-level exactness checks shared by the engine, kernel and bandit tests.

We enumerate the exact distribution of the first K generated tokens under the
processed target distribution, draw N sequences from the speculative engine in
one vectorised program, and test goodness of fit two ways:
  * chi-squared over the V**K sequences, merging lexicographically adjacent
    sequences into bins that expect at least 5 samples each;
  * Kolmogorov-Smirnov on the CDF of the sequence's lexicographic index, which
    the original FlashSpec promised (its p-value is conservative for a discrete
    distribution).
Rows of a batch have their own prompts; their statistics are computed per row
and combined (chi-squared statistics and degrees of freedom add across
independent rows; the KS p-values by Bonferroni).
"""

from __future__ import annotations

import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import spread_params, tiny_config
from scipy import stats

from flashspec_jax.bandit import Fixed
from flashspec_jax.drafters import FeatureDrafter, ModelDrafter
from flashspec_jax.engine import Arm, SpeculativeDecoder
from flashspec_jax.sequences import prepare_prompts
from flashspec_jax.kernels.verify import verify_reference
from flashspec_jax.models import eagle
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Samplers, Temperature, TopK, TopP


def continuation_logits(params, config, prompts, num_tokens) -> list[np.ndarray]:
  """Target logits after every possible continuation of each prompt, shortest first.

  Entry k is [num_prompts, V**k, V]: the logits after prompt + each k-token
  prefix (lexicographic). One batched forward per k, rows right-padded.
  """
  model = jax.jit(Llama(config, param_dtype=jnp.float32).apply)
  vocab, width = config.vocab_size, max(len(p) for p in prompts)
  by_length = []
  for k in range(num_tokens):
    prefixes = np.array(list(itertools.product(range(vocab), repeat=k)), np.int32)
    prefixes = prefixes.reshape(vocab**k, k)
    rows = np.zeros((len(prompts), len(prefixes), width + k), np.int32)
    lengths = np.zeros((len(prompts), len(prefixes)), np.int32)
    for i, prompt in enumerate(prompts):
      rows[i, :, :len(prompt)] = prompt
      rows[i, :, len(prompt):len(prompt) + k] = prefixes
      lengths[i] = len(prompt) + k
    flat_rows, flat_lengths = rows.reshape(-1, width + k), lengths.reshape(-1)
    cache = KVCache.init(config, len(flat_rows), width + k, jnp.float32)
    logits, _ = model(params, jnp.asarray(flat_rows), cache, num_valid=jnp.asarray(flat_lengths),
                      logits_index=jnp.asarray(flat_lengths - 1))
    by_length.append(np.asarray(logits).reshape(len(prompts), len(prefixes), vocab))
  return by_length


def sequence_probs(logits_by_length: list[np.ndarray], sampler) -> np.ndarray:
  """[num_prompts, V**K] probabilities of every K-token continuation under the sampler (f64)."""
  probs = np.ones((logits_by_length[0].shape[0], 1))
  for logits in logits_by_length:
    step = np.exp(np.asarray(sampler.log_probs(jnp.asarray(logits)), np.float64))
    step /= step.sum(axis=-1, keepdims=True)
    probs = (probs[:, :, None] * step).reshape(probs.shape[0], -1)
  return probs


def sequence_index(tokens: np.ndarray, vocab: int) -> np.ndarray:
  """Lexicographic index of each row of tokens [..., K]."""
  weights = vocab ** np.arange(tokens.shape[-1] - 1, -1, -1)
  return (tokens * weights).sum(axis=-1)


def chi2_test(indices: np.ndarray, probs: np.ndarray, min_expected: float = 5.0):
  """(statistic, degrees of freedom) of observed indices against probs.

  Lexicographically adjacent sequences share a bin until the bin expects at least
  `min_expected` samples, so a flat distribution with fewer samples than sequences
  still keeps many degrees of freedom (pooling every small bin into one would leave
  none there).
  """
  observed = np.bincount(indices, minlength=len(probs)).astype(np.float64)
  expected = probs * len(indices)
  if observed[expected == 0].any():  # a sequence the target can never produce
    return np.inf, 1
  bins, current, mass = np.empty(len(expected), np.int64), 0, 0.0
  for i, e in enumerate(expected):
    if mass >= min_expected:
      current, mass = current + 1, 0.0
    bins[i], mass = current, mass + e
  if mass < min_expected and current > 0:  # the last bin is short: merge it into the one before
    bins[bins == current] = current - 1
  obs, exp = np.bincount(bins, observed), np.bincount(bins, expected)
  return float(((obs - exp) ** 2 / exp).sum()), len(obs) - 1


def ks_pvalue(indices: np.ndarray, probs: np.ndarray) -> float:
  n = len(indices)
  empirical = np.cumsum(np.bincount(indices, minlength=len(probs))) / n
  distance = np.abs(empirical - np.cumsum(probs)).max()
  return float(stats.kstwo.sf(distance, n))


def fit_pvalues(samples: np.ndarray, probs_per_row: list[np.ndarray], vocab: int) -> dict:
  """samples [N, B, K] against each row's exact distribution; returns chi2 and KS p-values."""
  statistic, dof, ks = 0.0, 0, []
  for row, probs in enumerate(probs_per_row):
    indices = sequence_index(samples[:, row], vocab)
    s, d = chi2_test(indices, probs)
    statistic, dof = statistic + s, dof + d
    ks.append(ks_pvalue(indices, probs))
  if dof == 0:
    raise ValueError("too few samples for a chi-squared test: every row is one bin")
  return {"chi2": float(stats.chi2.sf(statistic, dof)),
          "ks": min(1.0, min(ks) * len(ks))}


# The grid that the engine's and the kernel's exactness tests share; test_exactness.py
# documents its sizes and seeds.
VOCAB, NUM_TOKENS, NUM_SAMPLES = 12, 3, 10_000
TARGET_CONFIG = tiny_config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
DRAFT_CONFIG = tiny_config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64)
PROMPTS = {1: [[3, 7, 1]], 8: [list(range(1, n + 1)) for n in range(1, 9)]}
SAMPLERS = {"plain": Temperature, "top_k": functools.partial(TopK, 4),
            "top_p": functools.partial(TopP, 0.8)}
TEMPERATURES = (0.5, 1.0, 1.5)

TARGET = Llama(TARGET_CONFIG, param_dtype=jnp.float32)
# One loop body for the draft steps: the same program, compiled several times faster on CPU.
DRAFTERS = {"small": ModelDrafter(Llama(DRAFT_CONFIG, param_dtype=jnp.float32), "small",
                                  unroll=False),
            "self": ModelDrafter(TARGET, "target", unroll=False),
            "eagle": FeatureDrafter(TARGET, "eagle", unroll=False),
            "eagle_vocab": FeatureDrafter(TARGET, "eagle_vocab", unroll=False)}
# The restricted feature drafter drafts 5 of the 12 tokens: q is 0 on the other 7.
DRAFT_VOCABULARY = (0, 2, 3, 7, 11)


@pytest.fixture(scope="module")
def params():
  target = spread_params(TARGET_CONFIG, seed=0, scale=6.0)
  feature_drafter = eagle.init_params(TARGET_CONFIG, jax.random.key(2), jnp.float32)
  return {"target": target,
          "drafters": {"small": spread_params(DRAFT_CONFIG, seed=1, scale=6.0),
                       "eagle": feature_drafter,
                       "eagle_vocab": eagle.restrict_vocabulary(feature_drafter, target,
                                                                DRAFT_VOCABULARY)}}


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
         verify_fn=verify_reference, initial_bandit=None, target=TARGET):
  """[S, runs, B, K] samples for S stacked samplers: NUM_SAMPLES sequences per sampler.

  initial_bandit(key) -> BanditState, if given, starts each run's bandit from
  its own state instead of a fresh one.
  """
  tokens, lengths = prepare_prompts(PROMPTS[batch], VOCAB)
  decoder = SpeculativeDecoder(target, arms, NUM_TOKENS, strategy=strategy, verify_fn=verify_fn)

  def one_run(sampler, key):
    bandit = None if initial_bandit is None else initial_bandit(jax.random.fold_in(key, 1))
    samplers = Samplers(target=sampler, draft=draft_sampler or sampler)
    return decoder.generate(params, jnp.asarray(tokens), jnp.asarray(lengths), key, samplers,
                            bandit).tokens

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

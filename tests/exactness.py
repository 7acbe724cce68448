"""Sequence-level exactness checks shared by the engine, kernel and bandit tests.

We enumerate the exact distribution of the first K generated tokens under the
processed target distribution, draw N sequences from the speculative engine in
one vectorised program, and test goodness of fit two ways:
  * chi-squared over the V**K sequences, pooling bins whose expected count is
    below 5 into one bin (scipy.stats.chisquare);
  * Kolmogorov-Smirnov on the CDF of the sequence's lexicographic index, which
    the original FlashSpec promised (its p-value is conservative for a discrete
    distribution).
Rows of a batch have their own prompts; their statistics are computed per row
and combined (chi-squared statistics and degrees of freedom add across
independent rows; the KS p-values by Bonferroni).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from flashspec_jax.models.llama import KVCache, Llama


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
  """(statistic, degrees of freedom) of observed indices against probs, pooling small bins."""
  observed = np.bincount(indices, minlength=len(probs)).astype(np.float64)
  expected = probs * len(indices)
  if observed[expected == 0].any():  # a sequence the target can never produce
    return np.inf, 1
  small = (expected > 0) & (expected < min_expected)
  obs, exp = list(observed[expected >= min_expected]), list(expected[expected >= min_expected])
  if small.any():
    if expected[small].sum() >= min_expected or not exp:
      obs.append(observed[small].sum())
      exp.append(expected[small].sum())
    else:  # too little mass to stand alone: fold it into the smallest large bin
      smallest = int(np.argmin(exp))
      obs[smallest] += observed[small].sum()
      exp[smallest] += expected[small].sum()
  obs, exp = np.array(obs), np.array(exp)
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
  return {"chi2": float(stats.chi2.sf(statistic, dof)),
          "ks": min(1.0, min(ks) * len(ks))}


def holm_rejections(pvalues: dict, alpha: float) -> list:
  """Keys whose hypotheses Holm's step-down procedure rejects at family-wise level alpha."""
  ordered = sorted(pvalues.items(), key=lambda kv: kv[1])
  rejected = []
  for i, (key, p) in enumerate(ordered):
    if p > alpha / (len(ordered) - i):
      break
    rejected.append(key)
  return rejected

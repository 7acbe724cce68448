"""Strategies that choose a drafter at every step: reward bandits (strategies.py), which
the Bernoulli simulation also runs, and choosers that model acceptance (acceptance.py),
which need the engine's per-draft feedback."""

import functools

from flashspec_jax.bandit.acceptance import (AcceptanceKLUCB, AcceptanceState,
                                             AcceptanceThompson, Hedge, expected_tokens)
from flashspec_jax.bandit.strategies import (STRATEGIES, BanditState, Cycle, DiscountedUCB,
                                             EpsilonGreedy, Feedback, Fixed, Oracle, Strategy,
                                             Thompson, UCB1, initial_state, sample_beta)

ACCEPTANCE_STRATEGIES = {
    "acceptance_thompson": AcceptanceThompson, "kl_ucb": AcceptanceKLUCB, "hedge": Hedge,
    "contextual_thompson": functools.partial(AcceptanceThompson, contextual=True),
    "contextual_kl_ucb": functools.partial(AcceptanceKLUCB, contextual=True)}
# What bandit:<name> methods may use.
ENGINE_STRATEGIES = {**STRATEGIES, **ACCEPTANCE_STRATEGIES}


def make_strategy(name: str, **kwargs) -> Strategy:
  if name not in ENGINE_STRATEGIES:
    raise ValueError(f"unknown bandit strategy {name!r}; known: {sorted(ENGINE_STRATEGIES)}")
  return ENGINE_STRATEGIES[name](**kwargs)


__all__ = ["ACCEPTANCE_STRATEGIES", "ENGINE_STRATEGIES", "STRATEGIES", "AcceptanceKLUCB",
           "AcceptanceState", "AcceptanceThompson", "BanditState", "Cycle", "DiscountedUCB",
           "EpsilonGreedy", "Feedback", "Fixed", "Hedge", "Oracle", "Strategy", "Thompson",
           "UCB1", "expected_tokens", "initial_state", "make_strategy", "sample_beta"]

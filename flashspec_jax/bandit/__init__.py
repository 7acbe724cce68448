"""Bandits that choose a drafter at every step; see strategies.py."""

from flashspec_jax.bandit.strategies import (STRATEGIES, BanditState, DiscountedUCB,
                                             EpsilonGreedy, Fixed, Oracle, Strategy, Thompson,
                                             UCB1, initial_state, make_strategy)

__all__ = ["STRATEGIES", "BanditState", "DiscountedUCB", "EpsilonGreedy", "Fixed", "Oracle",
           "Strategy", "Thompson", "UCB1", "initial_state", "make_strategy"]

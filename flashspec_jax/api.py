"""A Python API shaped like the original FlashSpec's, for people coming from it.

  from flashspec_jax import FlashSpec, FlashSpecConfig, BanditConfig, SamplingConfig
  config = FlashSpecConfig(
      target="smollm2_135m",
      drafters=("ngram:3", "layer_skip:26", "ar"),
      bandit=BanditConfig(strategy="ucb1"),
      sampling=SamplingConfig(gamma=4, temperature=0.0),
      max_new_tokens=64,
  )
  engine = FlashSpec(config)
  result = engine.generate(["What is speculative decoding?"])
  print(result.texts[0], result.metrics["alpha"])

It builds the same objects `run.py` does (see flashspec_jax/config.py for the
meaning of every field) and keeps the bandit's state between calls, so the
choice of drafter adapts over a conversation.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashspec_jax import config as config_lib
from flashspec_jax.engine import summarize
from flashspec_jax.loading import LoadedModel, load_model
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.runner import (Request, build_methods, make_setup, param_dtype, run_batch,
                                  with_arm_costs)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  gamma: int = 4
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class BanditConfig:
  """strategy: ucb1, thompson, discounted_ucb or epsilon_greedy; reward: goodput or
  acceptance; costs: one per drafter (None: 1 each, i.e. tokens per step)."""

  strategy: str = "ucb1"
  reward: str = "goodput"
  costs: tuple[float, ...] | None = None
  discount: float = 0.995
  epsilon: float = 0.1


@dataclasses.dataclass(frozen=True)
class FlashSpecConfig:
  """target: a shape in configs/; drafters: arms as in config.arms ("ar",
  "layer_skip:<k>", "draft_model:<shape>", "ngram:<n>", each "@<gamma>" optional);
  one drafter means plain speculative decoding, several a bandit over them, none
  plain AR. device: "cpu" or "gpu" (None: JAX's default)."""

  target: str = "smollm2_135m"
  drafters: tuple[str, ...] = ("layer_skip:26",)
  bandit: BanditConfig = BanditConfig()
  sampling: SamplingConfig = SamplingConfig()
  max_new_tokens: int = 128
  device: str | None = None
  checkpoint_dir: str = ""
  synthetic_weights: bool = False
  verify_impl: str = "auto"
  seed: int = 0

  def to_config_dict(self):
    """The equivalent run.py config, validated."""
    config = config_lib.base_config()
    config.target, config.checkpoint_dir = self.target, self.checkpoint_dir
    config.synthetic_weights, config.verify_impl, config.seed = (
        self.synthetic_weights, self.verify_impl, self.seed)
    if len(self.drafters) > 1:
      config.arms = ",".join(self.drafters)
      config.methods = f"bandit:{self.bandit.strategy}"
      config.bandit.costs = ",".join(map(str, self.bandit.costs or [1.0] * len(self.drafters)))
    else:
      config.methods = self.drafters[0] if self.drafters else "ar"
    config.bandit.reward, config.bandit.discount, config.bandit.epsilon = (
        self.bandit.reward, self.bandit.discount, self.bandit.epsilon)
    for field in dataclasses.fields(SamplingConfig):
      config.sampling[field.name] = getattr(self.sampling, field.name)
    config.sampling.max_new_tokens = self.max_new_tokens
    config_lib.validate(config)
    return config


@dataclasses.dataclass
class GenerationResult:
  texts: list[str | None]
  token_ids: list[list[int]]
  metrics: dict[str, Any]


class FlashSpec:
  """Loads the target and drafters once; `generate` runs one compiled program per call."""

  def __init__(self, config: FlashSpecConfig, model: LoadedModel | None = None):
    """model: the target as another engine loaded it (its `.model`), to compare
    configurations of the same target without loading it again."""
    self.config = config
    self.run_config = config.to_config_dict()
    with self._on_device():
      dtype = jnp.dtype(param_dtype(self.run_config))
      if model is None:
        model = load_model(config.target, config.checkpoint_dir, config.synthetic_weights,
                           dtype, config.seed)
      elif model.config.name != config.target or model.dtype != dtype:
        raise ValueError(f"the model passed in is {model.config.name} in {model.dtype}, but "
                         f"this config runs {config.target} in {dtype}")
      self.model = model
      methods, params = build_methods(self.run_config, self.model, dtype)
    self.setup = make_setup(self.run_config, self.model, params, dtype)
    # The config always carries costs (1 per arm unless given), so nothing is timed here.
    (self.method,) = with_arm_costs(methods, self.run_config, self.setup)
    self.bandit = None
    self.rng = jax.random.key(config.seed)

  def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]],
               chat: bool = True) -> GenerationResult:
    """Generates for a batch of prompts: strings (as chat turns if `chat`) or token ids."""
    if prompts and isinstance(prompts[0], str):
      if self.model.tokenizer is None:
        raise ValueError("synthetic weights have no tokenizer: pass token ids")
      ids = (encode_chat(self.model.tokenizer, prompts) if chat
             else [self.model.tokenizer.encode(p) for p in prompts])
    else:
      ids = [list(p) for p in prompts]
    self.rng, key = jax.random.split(self.rng)
    batch = [Request(f"prompt/{i}", "api", row) for i, row in enumerate(ids)]
    with self._on_device():
      out, seconds, _ = run_batch(self.method, self.setup, batch, key, self.bandit)
    if self.method.is_bandit:
      self.bandit = out.bandit
    token_ids = [np.asarray(out.tokens[i, :out.num_tokens[i]]).tolist() for i in range(len(ids))]
    texts = [None if self.model.tokenizer is None else self.model.tokenizer.decode(t)
             for t in token_ids]
    metrics = dict(seconds=seconds, tokens_per_second=sum(map(len, token_ids)) / seconds)
    if self.method.arms:
      metrics |= summarize(out.metrics)
    return GenerationResult(texts=texts, token_ids=token_ids, metrics=metrics)

  def _on_device(self):
    if self.config.device is None:
      return contextlib.nullcontext()
    return jax.default_device(jax.devices(self.config.device)[0])

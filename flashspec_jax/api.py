"""A Python API shaped like the original FlashSpec's, for people coming from it.

  from flashspec_jax import FlashSpec, FlashSpecConfig, BanditConfig, SamplingConfig
  config = FlashSpecConfig(
      target="smollm2_135m",
      drafters=("ngram:3", "eagle:smollm2", "ar"),
      bandit=BanditConfig(strategy="contextual_thompson"),
      sampling=SamplingConfig(gamma=4, temperature=0.0),
      max_new_tokens=64,
  )
  engine = FlashSpec(config)
  result = engine.generate(["What is speculative decoding?"])
  print(result.texts[0], result.metrics["alpha"])

It builds the same objects `run.py` does (see flashspec_jax/config.py for the
meaning of every field) and keeps the bandit's state between calls, so the
choice of drafter adapts over a conversation. Without given costs, a bandit's
arm costs are timed on its first call and kept in the per-user cache
(environment.user_cache_dir()/arm_costs.json), one entry per target, dtype,
device, batch size and arm, so later engines start without timing them again.
An engine keeps the programs it compiled: a later call at the same batch size
whose prompts fall in the same bucket neither traces nor compiles again, and
compiled programs also persist in the per-user cache (compilation_cache_dir)
for later processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import numbers
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flashspec_jax import config as config_lib
from flashspec_jax import environment, results, sharding
from flashspec_jax.engine import summarize
from flashspec_jax.loading import LoadedModel
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.prompts import Prompt
from flashspec_jax.pipeline import (Request, build_methods, calibrate_costs, compile_and_run,
                                    load_target, make_setup, param_dtype, warm_commit,
                                    with_arm_costs)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  gamma: int = 4
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


@dataclasses.dataclass(frozen=True)
class BanditConfig:
  """strategy: a chooser that models acceptance (contextual_thompson, the default, and
  contextual_kl_ucb, which learn n-gram lookup's acceptance per match length;
  acceptance_thompson, kl_ucb, hedge; docs/bandits.md) or a reward bandit (ucb1,
  thompson, discounted_ucb, epsilon_greedy); reward: goodput or acceptance; costs: one per
  drafter (None: timed on the first call, or read from the per-user cache where an
  earlier engine timed them); the rest as config.bandit's fields of the same names."""

  # The chooser that met all four stream goals in the most GPU runs: 18 of 41, against
  # 14 for contextual_kl_ucb and none for UCB1 (results/stream_goals/, the README).
  strategy: str = "contextual_thompson"
  reward: str = "goodput"
  costs: tuple[float, ...] | None = None
  discount: float = 0.995
  epsilon: float = 0.1
  acceptance_discount: float = 0.99
  request_carry: float = 1.0
  wait_cost: float = 0.0
  step_context: bool = False
  commit: float = 0.0


@dataclasses.dataclass(frozen=True)
class FlashSpecConfig:
  """target: a shape in configs/; drafters: a tuple of arms (or one comma-separated
  string of them) as in config.arms ("ar",
  "layer_skip:<k>", "draft_model:<shape>", "ngram:<n>", "eagle:<name>" (a shipped
  feature drafter, e.g. eagle:smollm2), each "@<gamma>" optional);
  one drafter means plain speculative decoding, several a bandit over them, none
  plain AR. device: "cpu" or "gpu" (None: JAX's default). draft_checkpoint_dir: the
  weights of draft_model:<shape> drafters. compilation_cache_dir: as in run.py's
  config ("auto": the per-user cache; "": off). deterministic: greedy output of
  every engine of one pass width (the largest gamma + 1, sampling.gamma's for AR)
  is the same, bit for bit (run.py's config.deterministic). mesh: "tp:<n>" splits the
  target over n devices (run.py's config.mesh; "" is one device). draft_steps:
  "unrolled", "loop" or "auto", as run.py's config.draft_steps (a loop compiles
  faster)."""

  target: str = "smollm2_135m"
  # Prompt lookup drafts for any target and costs next to nothing; a layer-skip drafter
  # of SmolLM2 ran at 0.4x AR on the H200 and the H100 (README, "eagle:smollm2 against
  # AR" and "The last-layer eagle:smollm2 against AR").
  drafters: tuple[str, ...] = ("ngram:3",)
  bandit: BanditConfig = BanditConfig()
  sampling: SamplingConfig = SamplingConfig()
  max_new_tokens: int = 128
  device: str | None = None
  checkpoint_dir: str = ""
  draft_checkpoint_dir: str = ""
  synthetic_weights: bool = False
  verify_impl: str = "auto"
  seed: int = 0
  compilation_cache_dir: str = "auto"
  deterministic: bool = False
  mesh: str = ""
  draft_steps: str = "auto"

  def __post_init__(self):
    # A string is a comma-separated list of arms, as config.arms is, not its characters.
    if isinstance(self.drafters, str):
      object.__setattr__(self, "drafters", tuple(config_lib.split_list(self.drafters)))

  def to_config_dict(self):
    """The equivalent run.py config, validated; an error names this API's fields."""
    # Checked whatever the drafters: with one, run.py's config would not read it.
    if self.bandit.strategy not in config_lib.CHOOSERS:
      raise ValueError(f"BanditConfig.strategy = {self.bandit.strategy!r} is invalid: expected "
                       f"one of {list(config_lib.CHOOSERS)}")
    config = config_lib.base_config()
    config.target, config.checkpoint_dir = self.target, self.checkpoint_dir
    config.draft_checkpoint_dir = self.draft_checkpoint_dir
    config.compilation_cache_dir = self.compilation_cache_dir
    config.synthetic_weights, config.verify_impl, config.seed = (
        self.synthetic_weights, self.verify_impl, self.seed)
    config.deterministic, config.mesh = self.deterministic, self.mesh
    config.draft_steps = self.draft_steps
    if len(self.drafters) > 1:
      config.arms = ",".join(self.drafters)
      config.methods = f"bandit:{self.bandit.strategy}"
      config.bandit.costs = ",".join(map(str, self.bandit.costs or ()))
    else:
      config.methods = self.drafters[0] if self.drafters else "ar"
    for name in ("reward", "discount", "epsilon", "acceptance_discount", "request_carry",
                 "wait_cost", "step_context", "commit"):
      config.bandit[name] = getattr(self.bandit, name)
    for field in dataclasses.fields(SamplingConfig):
      config.sampling[field.name] = getattr(self.sampling, field.name)
    config.sampling.max_new_tokens = self.max_new_tokens
    try:
      config_lib.validate(config)
    except ValueError as error:
      raise ValueError(_API_FIELD.sub(lambda match: _API_FIELDS[match[0]], str(error))) from None
    return config


# config.validate's messages name run.py's fields; the API's user set these instead.
_API_FIELDS = {"config.sampling.max_new_tokens": "FlashSpecConfig.max_new_tokens",
               "config.sampling.": "SamplingConfig.", "sampling.": "SamplingConfig.",
               "config.bandit.": "BanditConfig.", "config.arms": "FlashSpecConfig.drafters",
               "config.methods": "FlashSpecConfig.drafters", "config.": "FlashSpecConfig."}
_API_FIELD = re.compile(r"(?<![\w.])(?:" + "|".join(map(re.escape, _API_FIELDS)) + ")")


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
    environment.enable_compilation_cache(config.compilation_cache_dir)
    with self._on_device():
      dtype = jnp.dtype(param_dtype(self.run_config))
      if model is None:
        model = load_target(self.run_config, dtype, "FlashSpecConfig.checkpoint_dir",
                            "FlashSpecConfig.draft_checkpoint_dir")
      elif (model.config.name, model.dtype, model.config.tp_shards) != (
          config.target, dtype, sharding.parse_mesh(config.mesh)):
        raise ValueError(f"the model passed in is {model.config.name} in {model.dtype} over "
                         f"{model.config.tp_shards} device(s), but this config runs "
                         f"{config.target} in {dtype} over {sharding.parse_mesh(config.mesh)}")
      self.model = model
      methods, params = build_methods(self.run_config, self.model, dtype)
      # On this engine's device: the verify kernel, dtype and unrolling follow it.
      self.setup = make_setup(self.run_config, self.model, params, dtype)
    # A bandit's costs not given are timed on the first call's prompts, or found in the cache.
    self._costs_pending = methods[0].is_bandit and config.bandit.costs is None
    (self.method,) = (methods if self._costs_pending
                      else with_arm_costs(methods, self.run_config, self.setup))
    self.bandit = None
    self.rng = jax.random.key(config.seed)

  def generate(self, prompts, chat: bool = True) -> GenerationResult:
    """Generates for one prompt or a batch.

    A prompt is a string (a chat turn if `chat`, else plain text), a Prompt (see
    prompts.read_prompt_file), a list of {"role", "content"} messages, or token
    ids (a list or a 1-D integer array); a batch is a list of prompts or a 2-D
    integer array.
    """
    batch = [Request(f"prompt/{i}", "api", row)
             for i, row in enumerate(self._token_ids(prompts, chat))]
    self.rng, key = jax.random.split(self.rng)
    with self._on_device():
      if self._costs_pending:
        self.method = dataclasses.replace(self.method, arms=self._arm_costs(batch))
        self._costs_pending = False
      if self.bandit is None:  # the first call, or one after a call that raised
        warm_commit(self.method, self.run_config.bandit.commit)
      try:
        run = compile_and_run(self.method, self.setup, batch, key, self.bandit,
                              self.run_config.bandit.commit)
      except BaseException:
        # A call that ran took the bandit's state (donated, SpeculativeDecoder.generate)
        # and, raising (NaN logits, out of memory, Ctrl-C), returned none: the next call
        # starts afresh, and what the bandit had learned is lost.
        if any(leaf.is_deleted() for leaf in jax.tree.leaves(self.bandit)):
          self.bandit = None
        raise
    out, seconds = run.output, run.seconds
    if self.method.is_bandit:
      self.bandit = out.bandit
    token_ids = out.token_lists()
    texts = [None if self.model.tokenizer is None else self.model.tokenizer.decode(t)
             for t in token_ids]
    metrics = dict(seconds=seconds, tokens_per_second=sum(map(len, token_ids)) / seconds)
    if self.method.arms:
      metrics |= summarize(out.metrics)
    return GenerationResult(texts=texts, token_ids=token_ids, metrics=metrics)

  def _token_ids(self, prompts, chat: bool) -> list[list[int]]:
    """The batch's token ids; raises ValueError on anything but the forms `generate` takes."""
    if (isinstance(prompts, (str, Prompt)) or _is_conversation(prompts)
        or isinstance(prompts, np.ndarray) and prompts.ndim == 1 or _is_number_list(prompts)):
      prompts = [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim != 2:
      raise ValueError(f"a token-id array must be 1-D (one prompt) or 2-D (a batch), got "
                       f"shape {prompts.shape}")
    if not isinstance(prompts, (Sequence, np.ndarray)) or not len(prompts):
      raise ValueError(f"expected a prompt or a non-empty list of prompts, got {prompts!r:.80}")
    rows = []
    for i, prompt in enumerate(prompts):
      if isinstance(prompt, (str, Prompt)) or _is_conversation(prompt):
        if self.model.tokenizer is None:
          raise ValueError("synthetic weights have no tokenizer: pass token ids")
        if isinstance(prompt, str) and not chat:
          rows.append(self.model.tokenizer.encode(prompt))
        else:
          conversation = prompt.conversation if isinstance(prompt, Prompt) else prompt
          bad = [m for m in conversation if isinstance(m, dict) and not (
              isinstance(m.get("role"), str) and isinstance(m.get("content"), str))]
          if bad:
            raise ValueError(f"prompt {i}: each message needs 'role' and 'content' strings, "
                             f"got {bad[0]!r:.80}")
          rows.append(encode_chat(self.model.tokenizer, [conversation])[0])
      else:
        rows.append(_integer_ids(prompt, i))
    return rows

  def _arm_costs(self, batch: list[Request]):
    """The bandit's arms with step costs from the per-user cache, timing (on this batch)
    and caching those it lacks."""
    arms = self.method.arms
    device = self._device()
    # Unrolled draft steps cost a model drafter's step less on a GPU than a loop does.
    drafts = "unrolled" if config_lib.unrolled_drafts(self.run_config) else "loop"
    key = (f"{self.config.target}|{jnp.dtype(self.model.dtype).name}|{device.platform}:"
           f"{device.device_kind}|batch {len(batch)}|drafts {drafts}")
    path = environment.user_cache_dir() / "arm_costs.json"
    try:
      cache = json.loads(path.read_text())
    except (OSError, ValueError):
      cache = {}
    known = cache.get(key, {})
    missing = tuple(arm for arm in arms if arm.name not in known)
    if missing:
      timed = calibrate_costs(missing, self.setup, batch, self.run_config.bandit.calibration_steps)
      known |= {arm.name: arm.cost for arm in timed}
      cache[key] = known
      path.parent.mkdir(parents=True, exist_ok=True)
      with results.open_atomic(path) as file:
        file.write(json.dumps(cache, indent=2) + "\n")
    return tuple(dataclasses.replace(arm, cost=known[arm.name]) for arm in arms)

  def _device(self) -> jax.Device:
    return jax.devices(self.config.device)[0] if self.config.device else jax.devices()[0]

  def _on_device(self):
    if self.config.device is None:
      return contextlib.nullcontext()
    return jax.default_device(self._device())


def _is_conversation(prompt) -> bool:
  return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
          and all(isinstance(message, dict) for message in prompt))


def _is_number_list(prompt) -> bool:
  """A flat sequence of numbers: one prompt of token ids, floats too, so that
  `_integer_ids` names them rather than a batch of one-number prompts."""
  return (isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
          and all(isinstance(x, numbers.Number) for x in prompt))


def _integer_ids(prompt, index: int) -> list[int]:
  """A prompt's token ids as ints; refuses floats, booleans and anything else."""
  ids = np.asarray(prompt)
  if ids.ndim != 1:
    raise ValueError(f"prompt {index}: expected text or a 1-D sequence of token ids, got "
                     f"{prompt!r:.80}")
  # A list's values as given: numpy would make [True, 5] integers, and [1, 2.0] floats;
  # 0-d arrays in it (np.int64(3), jnp.array(3)) as the Python numbers they hold.
  values = list(prompt) if isinstance(prompt, Sequence) else ids.tolist()
  values = [x.item() if getattr(x, "ndim", None) == 0 else x for x in values]
  bad = [x for x in values if isinstance(x, bool) or not isinstance(x, numbers.Integral)]
  if bad:
    raise ValueError(f"prompt {index}: token ids must be integers, got {bad[:5]}")
  return ids.astype(np.int64).tolist()

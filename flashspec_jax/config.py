"""The experiment config schema: every field `run.py` understands, with its default.

Experiment files in `experiments/` start from `base_config()` and change
fields; the returned config is locked, so a misspelt field fails at parse time
with ml_collections' message naming it. `validate` checks values.
"""

from __future__ import annotations

import ml_collections

from flashspec_jax.kernels.verify import VERIFY_IMPLS
from flashspec_jax.prompts import PROMPT_SETS, SPLITS

DTYPES = ("auto", "float32", "bfloat16")
# A method is "ar", "layer_skip:<k>" (the target's first k layers draft) or
# "draft_model:<name>" (a separate model of a shape in configs/).
METHOD_KINDS = ("ar", "layer_skip", "draft_model")


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "default"
  config.methods = "ar"  # comma-separated; all run on the same prompts, side by side
  # A model shape in configs/; its weights come from checkpoint_dir, the default
  # place for that model, or random weights when synthetic_weights is set.
  config.target = "smollm2_135m"
  config.checkpoint_dir = ""
  config.draft_checkpoint_dir = ""  # for a draft_model method; "" = its default place
  config.synthetic_weights = False
  config.dtype = "auto"  # bfloat16 on GPU, float32 on CPU
  config.seed = 0
  config.batch_size = 1
  config.results_dir = "results"
  config.print_text = True

  config.prompts = ml_collections.ConfigDict()
  config.prompts.sets = "chat,code,edit"  # comma-separated, from PROMPT_SETS
  config.prompts.num_per_set = 1
  config.prompts.split = "tune"
  config.prompts.synthetic_length = 128  # prompt tokens per row with synthetic weights

  config.sampling = ml_collections.ConfigDict()
  config.sampling.temperature = 0.0  # 0 is greedy
  config.sampling.top_k = 0  # 0 is off
  config.sampling.top_p = 1.0  # 1 is off
  config.sampling.max_new_tokens = 64
  config.sampling.gamma = 4  # draft tokens per speculative step
  # auto: the Pallas kernel on a GPU, the jnp reference elsewhere.
  config.verify_impl = "auto"
  return config


def _items(text: str) -> list[str]:
  return [item.strip() for item in text.split(",") if item.strip()]


def prompt_sets(config: ml_collections.ConfigDict) -> list[str]:
  return _items(config.prompts.sets)


def method_names(config: ml_collections.ConfigDict) -> list[str]:
  return _items(config.methods)


def _valid_method(name: str) -> bool:
  kind, _, arg = name.partition(":")
  if kind == "ar":
    return not arg
  if kind == "layer_skip":
    return arg.isdigit() and int(arg) >= 1
  return kind == "draft_model" and bool(arg)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value is invalid."""
  checks = [
      ("methods", bool(method_names(config)) and all(map(_valid_method, method_names(config)))
       and len(set(method_names(config))) == len(method_names(config)),
       f"distinct comma-separated methods of the forms ar, layer_skip:<k>, draft_model:<name>"),
      ("dtype", config.dtype in DTYPES, f"one of {DTYPES}"),
      ("batch_size", config.batch_size >= 1, ">= 1"),
      ("prompts.sets", bool(prompt_sets(config))
       and set(prompt_sets(config)) <= set(PROMPT_SETS), f"a comma-separated subset of "
       f"{PROMPT_SETS}"),
      ("prompts.num_per_set", config.prompts.num_per_set >= 1, ">= 1"),
      ("prompts.split", config.prompts.split in SPLITS, f"one of {SPLITS}"),
      ("prompts.synthetic_length", config.prompts.synthetic_length >= 1, ">= 1"),
      ("sampling.temperature", config.sampling.temperature >= 0, ">= 0 (0 is greedy)"),
      ("sampling.top_k", config.sampling.top_k >= 0, ">= 0 (0 is off)"),
      ("sampling.top_p", 0 < config.sampling.top_p <= 1, "in (0, 1]"),
      ("sampling.max_new_tokens", config.sampling.max_new_tokens >= 1, ">= 1"),
      ("sampling.gamma", config.sampling.gamma >= 1, ">= 1"),
      ("verify_impl", config.verify_impl in VERIFY_IMPLS, f"one of {VERIFY_IMPLS}"),
  ]
  for field, ok, expected in checks:
    if not ok:
      value = config
      for part in field.split("."):
        value = value[part]
      raise ValueError(f"config.{field} = {value!r} is invalid: expected {expected}")

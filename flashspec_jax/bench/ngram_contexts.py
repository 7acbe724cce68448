"""What n-gram lookup's match length says about its drafts, on real text.

  python -m flashspec_jax.bench.ngram_contexts
  python -m flashspec_jax.bench.ngram_contexts --num_per_set=4 --max_new_tokens=32  # quick

The target answers held-out prompts of each set (chat, code, edit) greedily.
At every position of each answer, n-gram lookup drafts gamma tokens from the
tokens before it, as the engine's NgramDrafter does, and its context there
(`NgramDrafter.context`: the length of the match it follows, 0 for none) is
recorded with how many of its drafts the answer confirms. The table gives, per
set and context, the share of positions in that context and the tokens a
greedy step from there would emit (drafts confirmed + 1); near an answer's
end fewer drafts can be confirmed, as a real step there is cut by the budget.
That is what the contextual choosers (bandit/acceptance.py) learn online, one
context at a time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from flashspec_jax import cli
from flashspec_jax.bench import run_and_write
from flashspec_jax.drafters import NgramDrafter
from flashspec_jax.generate import Decoder, run_generate
from flashspec_jax.loading import load_model
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.models.llama import Llama
from flashspec_jax.prompts import PROMPT_SETS, load_prompts
from flashspec_jax.sampling import Greedy
from flashspec_jax.sequences import Sequences


@functools.partial(jax.jit, static_argnums=(0, 1))
def drafts_confirmed(drafter: NgramDrafter, gamma: int, tokens: jax.Array, start: int,
                     end: int) -> tuple[jax.Array, jax.Array]:
  """(context [L], confirmed [L]) at each position t in [start, end) of tokens [L] (the
  slots outside that range are meaningless): the drafter's context after tokens[:t],
  and how many of its gamma drafts from there match tokens[t:end]."""
  length = tokens.shape[0]

  def at(t):
    seqs = Sequences(tokens=tokens[None], seq_lens=t[None], prompt_lens=jnp.full((1,), start),
                     done=jnp.zeros((1,), bool), nan_rows=jnp.zeros((1,), bool),
                     rng=jax.random.key(0))
    _, drafts, _ = drafter.propose(None, (), seqs, gamma, None, None)
    index = t + jnp.arange(gamma)
    truth = jnp.where(index < end, tokens[jnp.minimum(index, length - 1)], -1)
    confirmed = jnp.sum(jnp.cumprod(drafts[0] == truth))
    return drafter.context(seqs)[0], confirmed

  return jax.vmap(at)(jnp.arange(length))


def bench(model: str, num_per_set: int, max_new_tokens: int, max_n: int, gamma: int) -> dict:
  loaded = load_model(model, dtype=jnp.float32)
  decoder = Decoder(Llama(loaded.config, param_dtype=jnp.float32), max_new_tokens)
  drafter = NgramDrafter(loaded.config.vocab_size, max_n)
  by_set = {}
  for kind in PROMPT_SETS:
    ids = encode_chat(loaded.tokenizer, [p.conversation
                                         for p in load_prompts(kind, num_per_set, "heldout")])
    out = run_generate(loaded.params, decoder, ids, jax.random.key(0), Greedy())
    answers, lengths = np.asarray(out.tokens), np.asarray(out.num_tokens)
    # One width for every text, so that one program serves them all.
    width = max(map(len, ids)) + max_new_tokens
    contexts, confirmed = [], []
    for prompt, answer, n in zip(ids, answers, lengths):
      text = np.full(width, -1, np.int32)
      text[:len(prompt) + n] = list(prompt) + answer[:n].tolist()
      context, count = drafts_confirmed(drafter, gamma, jnp.asarray(text), len(prompt),
                                        len(prompt) + n)
      contexts += np.asarray(context)[len(prompt):len(prompt) + n].tolist()
      confirmed += np.asarray(count)[len(prompt):len(prompt) + n].tolist()
    contexts, confirmed = np.asarray(contexts), np.asarray(confirmed)
    by_set[kind] = dict(
        positions=len(contexts),
        mean_tokens=float(confirmed.mean() + 1),
        contexts={str(c): dict(share=float(np.mean(contexts == c)),
                               mean_tokens=float(confirmed[contexts == c].mean() + 1),
                               first_confirmed=float(np.mean(confirmed[contexts == c] > 0)))
                  for c in range(drafter.num_contexts) if np.any(contexts == c)})
  return dict(model=model, weights="real", dtype="float32", num_per_set=num_per_set,
              max_new_tokens=max_new_tokens, max_n=max_n, gamma=gamma, by_set=by_set)


def answer_flags(num_per_set: int, max_new_tokens: int) -> dict[str, flags.FlagHolder]:
  """The flags of a bench over held-out answers and n-gram lookup's contexts (this one
  and drafter_contexts), with their defaults for how many answers and how long."""
  return dict(
      num_per_set=flags.DEFINE_integer("num_per_set", num_per_set, "Held-out prompts per set.",
                                       lower_bound=1),
      max_new_tokens=flags.DEFINE_integer("max_new_tokens", max_new_tokens, "Tokens per answer.",
                                          lower_bound=1),
      max_n=flags.DEFINE_integer("max_n", 3, "Longest match n-gram lookup tries.", lower_bound=1),
      out=flags.DEFINE_string("out", "results", "Results directory."))


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that tests can
  import bench() beside other benchmarks that define flags of the same names."""
  return dict(
      model=flags.DEFINE_string("model", "smollm2_135m", "Target model (real weights)."),
      gamma=flags.DEFINE_integer("gamma", 8, "Drafts per position.", lower_bound=1),
      **answer_flags(num_per_set=8, max_new_tokens=128))


def main(argv, options):
  del argv
  result, path = run_and_write("ngram_contexts", bench, options)
  print(f"\n{result['model']}, greedy answers of {result['max_new_tokens']} tokens, n-gram "
        f"max_n {result['max_n']}, gamma {result['gamma']} -> {path}")
  print(f"{'set':<6} {'context':>8} {'share':>7} {'tokens/step':>12} {'1st draft ok':>13}")
  for kind, row in result["by_set"].items():
    for context, cell in row["contexts"].items():
      print(f"{kind:<6} {context:>8} {cell['share']:>7.2f} {cell['mean_tokens']:>12.2f} "
            f"{cell['first_confirmed']:>13.2f}")
    print(f"{kind:<6} {'all':>8} {1:>7.2f} {row['mean_tokens']:>12.2f}")


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))

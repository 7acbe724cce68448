"""The feature drafter's greedy acceptance on held-out answers, scored as its training
scores validation answers, beside the engine's own steps on the same answers.

  python -m flashspec_jax.bench.teacher_forced
  python -m flashspec_jax.bench.teacher_forced --num_per_set=1 --max_new_tokens=32  # quick

On held-out chat the engine's last-layer eagle:smollm2 (shipped before the fused
one) made 2.24 tokens a step on the H200
(results/eagle_smollm2/2026-12-01T231750Z_270c856f.json, greedy, gamma 4), where
its training run's chat validation answers gave 3.14 (chain acceptance 0.73,
0.56, 0.46, 0.39 at the four draft positions; MODEL_CARD.md); the fused drafter
shipped since makes 2.31 on an H100 against 3.48 on validation. Either held-out
answers are harder for the drafter than the validation answers, or the engine
drafts worse than training scores it. Here the target answers experiments/
eagle_smollm2.py's held-out prompts greedily through the drafter arm (its answer
is AR's), and each answer is then scored whole as `distill.evaluate` scores
validation answers. The engine's steps are replayed on those scores: the first
step starts at the first answer token, each accepts the chain of greedy matches
that starts where it starts, and the next starts after the tokens it emitted.
Replayed steps that emit what the engine's emitted say that the engine drafts as
training scores; the chain acceptance over every start position, against the
model card's, says how much harder held-out answers are.

  python -m flashspec_jax.bench.teacher_forced --sets=chat --chat_turns=later

scores answers to later user turns of held-out conversations instead, each alone
as a prompt, as training takes the tune split's: they are most of the shipped
drafter's training chats, while every held-out chat prompt of the experiments is a
record's first turn.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import tqdm
from absl import flags

from flashspec_jax import cli, distill, pipeline
from flashspec_jax import config as config_lib
from flashspec_jax.bench import run_and_write
from flashspec_jax.drafters import FeatureDrafter
from flashspec_jax.prompts import load_later_chat_turns
from flashspec_jax.runner import build_requests


def replay(chains: np.ndarray, prompt_len: int, length: int) -> list[int]:
  """Tokens each greedy step emits on one scored sequence.

  Args:
    chains: [gamma, T] bool, `rollout_loss`'s step_chains of the sequence: step k at j
      ends a chain of k + 1 matches that started at j - k.
    prompt_len: P; the first step drafts from the pair (f_{P-1}, t_P).
    length: tokens in the sequence, prompt and answer.
  """
  gamma, emitted, start = chains.shape[0], [], prompt_len - 1
  while start + 2 < length:  # t_{start+2} is the first token this step can emit
    accepted = 0
    while accepted < gamma and chains[accepted, start + accepted]:
      accepted += 1
    # The correction or bonus token, unless the accepted drafts already end the answer.
    emitted.append(min(accepted + 1, length - start - 2))
    start += emitted[-1]
  return emitted


def bench(arm: str, num_per_set: int, max_new_tokens: int, gamma: int,
          batch_size: int, dtype: str = "auto", sets: str = "chat,code,edit",
          chat_turns: str = "first") -> dict:
  """dtype: the target's and drafter's ('auto': bfloat16 on a GPU, else float32). In
  bfloat16 on the H200 the engine's steps and the replayed ones differed (the engine
  drafts a token at a time, the scoring takes whole answers, and each rounds its own
  way), so float32 is what tells whether the engine drafts as training scores.
  chat_turns: 'first', the experiments' held-out chat prompts, or 'later', later user
  turns of held-out conversations (`prompts.load_later_chat_turns`)."""
  config = config_lib.base_config()
  config.dtype = dtype
  config.prompts.sets = sets
  if chat_turns not in ("first", "later"):
    raise ValueError(f"chat_turns must be 'first' or 'later', not {chat_turns!r}")
  if chat_turns == "later" and "chat" not in config_lib.prompt_sets(config):
    raise ValueError(f"chat_turns='later' asks for chat prompts, which sets={sets!r} leaves out")
  config.methods, config.arms = arm, arm
  config.sampling.temperature = 0.0
  config.sampling.max_new_tokens, config.sampling.gamma = max_new_tokens, gamma
  config.prompts.split, config.prompts.num_per_set = "heldout", num_per_set
  dtype = pipeline.param_dtype(config)
  model = pipeline.load_target(config, dtype)
  (method,), params = pipeline.build_methods(config, model, dtype)
  drafter = method.arms[0].drafter
  if not isinstance(drafter, FeatureDrafter):
    raise ValueError(f"--arm={arm} is not a feature drafter (eagle:<name>)")
  setup = pipeline.make_setup(config, model, params, dtype)
  requests = build_requests(config, model)
  if chat_turns == "later":
    later = load_later_chat_turns(num_per_set, config.prompts.seed, held_out=True)
    requests = (pipeline.requests_of(later, model.tokenizer)
                + [r for r in requests if r.kind != "chat"])
  answers, engine_steps = [], []
  for i, request in enumerate(tqdm.tqdm(requests, desc="answers", unit="prompt")):
    out = pipeline.compile_and_run(method, setup, [request], jax.random.key(i)).output
    answers.append(out.token_lists()[0])
    engine_steps.append([int(e) for e in np.asarray(out.history.emitted) if e > 0])
  # One width for every sequence, so that one scoring program serves them all.
  data = distill.TrainingData.from_answers(list(zip(requests, answers)))
  by_set = {}
  for kind in dict.fromkeys(data.kinds):
    rows = [i for i, k in enumerate(data.kinds) if k == kind]
    scored = distill.evaluate(drafter, setup.params, data.take(rows), batch_size, gamma,
                              keep_chains=True)
    replayed = [replay(scored["step_chains"][:, n], int(data.prompt_lens[i]),
                       int(data.lengths[i])) for n, i in enumerate(rows)]
    engine = [engine_steps[i] for i in rows]
    by_set[kind] = dict(
        sequences=len(rows), answer_tokens=int(sum(map(sum, engine))),
        engine_tau=sum(map(sum, engine)) / sum(map(len, engine)),
        replayed_tau=sum(map(sum, replayed)) / sum(map(len, replayed)),
        same_steps=sum(e == r for e, r in zip(engine, replayed)),
        acceptance=scored["step_acceptance"],
        tau_every_start=distill.expected_tokens_per_step(scored["step_acceptance"]),
        engine_steps=engine, replayed_steps=replayed)
  return dict(model=config.target, weights=model.source, dtype=np.dtype(dtype).name, arm=arm,
              num_per_set=num_per_set, max_new_tokens=max_new_tokens, gamma=gamma,
              chat_turns=chat_turns, ids=list(data.ids), by_set=by_set)


def define_flags() -> dict[str, flags.FlagHolder]:
  return dict(
      arm=flags.DEFINE_string("arm", "eagle:smollm2", "The feature drafter arm."),
      num_per_set=flags.DEFINE_integer("num_per_set", 5, "Held-out prompts per set.",
                                       lower_bound=1),
      max_new_tokens=flags.DEFINE_integer("max_new_tokens", 128, "Tokens per answer.",
                                          lower_bound=1),
      gamma=flags.DEFINE_integer("gamma", 4, "Drafts per step.", lower_bound=1),
      batch_size=flags.DEFINE_integer("batch_size", 4, "Answers scored at once.", lower_bound=1),
      dtype=flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                              "Weights' dtype ('auto': bfloat16 on a GPU)."),
      sets=flags.DEFINE_string("sets", "chat,code,edit", "Held-out prompt sets."),
      chat_turns=flags.DEFINE_enum("chat_turns", "first", ["first", "later"],
                                   "Chat prompts: records' first turns, as the experiments "
                                   "take, or later turns of held-out conversations."),
      out=flags.DEFINE_string("out", "results", "Results directory."))


def main(argv, options):
  del argv
  result, path = run_and_write("teacher_forced", bench, options)
  print(f"\n{result['arm']}, greedy answers of {result['max_new_tokens']} tokens to held-out "
        f"prompts ({result['chat_turns']} chat turns), gamma {result['gamma']} -> {path}")
  print(f"{'set':<6} {'answers':>7} {'engine tau':>10} {'replayed':>9} {'same steps':>10} "
        f"{'tau, every start':>16}  acceptance per position")
  for kind, s in result["by_set"].items():
    accept = " ".join(f"{a:.2f}" for a in s["acceptance"])
    print(f"{kind:<6} {s['sequences']:>7} {s['engine_tau']:>10.2f} {s['replayed_tau']:>9.2f} "
          f"{s['same_steps']:>6}/{s['sequences']:<3} {s['tau_every_start']:>16.2f}  {accept}")


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))

"""What a chooser's step runs beyond the fixed drafter's step, counted in the compiled
program.

  python -m flashspec_jax.bench.step_kernels --target=tiny_smollm2

In the H100 streams KL-UCB's calls that held eagle:smollm2 at every step took a
median 4.7 to 7.5 ms longer than the fixed drafter's calls with the same steps
(results/chooser_steps/2026-12-05T222620Z_9ba71beb.json), and a trace counted about
a dozen more kernels a step (docs/bandits.md). This compiles one step of the fixed
feature-drafter program and, per chooser, the step the chooser program's loop takes
while it keeps the drafter (the arm's step, the chooser learning from it, and its
choice of the next arm), over experiments/choosers_smollm2.py's arms without
layer-skip (n-gram at gamma 2, 4 and 8, the feature drafter, AR), and counts the
top-level instructions of each compiled step by opcode (bench.hlo.entry_opcodes);
what runs inside a loop or a call counts as that one instruction. On a GPU each
top-level fusion, custom call and copy is a kernel launch and each while loop waits
for the host; on a CPU the counts show which of the step's computations XLA could not
fuse. The held arm is known when the step compiles, as the fixed program's is, so
what differs is the chooser's learning and choice and the free scoring. With
--loops (the default) it also compiles each whole program and counts the loop body
that steps the held arm there, and the shapes that body copies: XLA compiles a step
inside a loop apart from the same step alone, and may copy what the loop carries at
every turn. Synthetic weights; no device time beyond the compiles.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
from absl import app, flags

from flashspec_jax import cli, results
from flashspec_jax.bandit import make_strategy
from flashspec_jax.bench.hlo import entry_opcodes, loop_bodies
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.drafters import NgramDrafter
from flashspec_jax.engine import Arm, SpeculativeDecoder
from flashspec_jax.sampling import Greedy, Samplers, Temperature

CHOOSERS = ("ucb1", "thompson", "acceptance_thompson", "kl_ucb", "hedge", "contextual_thompson",
            "contextual_kl_ucb")


def step_opcodes(decoder: SpeculativeDecoder, params, state, samplers: Samplers,
                 held: int | None) -> collections.Counter:
  """The opcodes of one compiled step: the fixed decoder's `step`, or with `held`, the
  step of the chooser program's loop that keeps arms[held] (`body_turn`); settled where
  run_steps settles the drafter."""
  if held is None:
    settled = decoder.lone_settling_body is not None
    step = lambda params, state: decoder.step(params, state, samplers, settled)
  else:
    body = next(body for body in decoder.bodies if held in body)

    def step(params, state):
      return decoder.body_turn(params, state, jnp.int32(held), samplers, body,
                               decoder.settles(body))
  return entry_opcodes(jax.jit(step).lower(params, state).compile().as_text())


def held_loop(decoder: SpeculativeDecoder, params, inputs, step: collections.Counter
              ) -> tuple[collections.Counter, collections.Counter]:
  """(opcodes, copied shapes) of the loop body that steps the held arm in the whole
  compiled program: of its loops, the one whose opcodes are nearest the standalone
  step's (step). XLA compiles a step inside the program's loop apart from the same step
  alone: values the loop carries may be copied at every turn."""
  bodies = loop_bodies(decoder.lower(params, *inputs).compile().as_text())
  distance = lambda counts: sum(((counts[0] - step) + (step - counts[0])).values())
  return min(bodies.values(), key=distance)


def bench(target: SyntheticTarget, choosers: tuple[str, ...], gamma: int, context: int,
          temperature: float, loops: bool) -> dict:
  sampler = Temperature(temperature) if temperature > 0 else Greedy()
  samplers = Samplers.same(sampler)
  eagle = target.feature_drafter_arm(gamma)
  ngram = NgramDrafter(target.config.vocab_size, 3)
  arms = (Arm(ngram, 2), Arm(ngram, 4), Arm(ngram, 8), eagle, Arm())
  prompt, lengths = target.prompts(1, context)
  key = jax.random.key(0)

  def row(program, decoder, held=None):
    state = decoder.init(target.params, prompt, lengths, key, sampler)
    opcodes = step_opcodes(decoder, target.params, state, samplers, held)
    counts = dict(program=program, opcodes=dict(opcodes.most_common()),
                  instructions=opcodes.total())
    if loops:
      loop, copies = held_loop(decoder, target.params, (prompt, lengths, key, samplers, None),
                               opcodes)
      counts |= dict(loop_opcodes=dict(loop.most_common()), loop_instructions=loop.total(),
                     loop_copies=dict(copies.most_common()))
    return counts

  rows = [row("fixed eagle", SpeculativeDecoder(target.model, (eagle,), 32, eos_ids=()))]
  for name in choosers:
    decoder = SpeculativeDecoder(target.model, arms, 32, eos_ids=(), strategy=make_strategy(name))
    rows.append(row(f"bandit:{name} holding eagle", decoder, held=arms.index(eagle)))
  for r in rows:
    r["beyond_fixed"] = r["instructions"] - rows[0]["instructions"]
    if loops:
      r["loop_beyond_fixed"] = r["loop_instructions"] - rows[0]["loop_instructions"]
  return dict(target=target.config.name, dtype=target.model.param_dtype.name,
              synthetic_weights=True, arms=[arm.name for arm in arms], gamma=gamma,
              context=context, temperature=temperature, loops=loops, rows=rows)


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that tests can
  import this module beside other benchmarks that define flags of the same names."""
  return dict(
      target=flags.DEFINE_string("target", "smollm2_135m", "Target shape in configs/."),
      choosers=flags.DEFINE_list("choosers", list(CHOOSERS), "Choosers to compile."),
      gamma=flags.DEFINE_integer("gamma", 4, "The feature drafter's gamma."),
      context=flags.DEFINE_integer("context", 256, "Prompt tokens."),
      temperature=flags.DEFINE_float("temperature", 1.0, "Sampling temperature (0: greedy).",
                                     lower_bound=0.0),
      loops=flags.DEFINE_bool("loops", True, "Also compile each whole program and count the "
                              "loop body that steps the held arm (slower)."),
      out=flags.DEFINE_string("out", "results", "Results directory."))


def main(argv, options: dict[str, flags.FlagHolder]):
  del argv
  unknown = set(options["choosers"].value) - set(CHOOSERS)
  if unknown:
    raise app.UsageError(f"--choosers: unknown {sorted(unknown)}; known: {list(CHOOSERS)}")
  payload = bench(SyntheticTarget.create(options["target"].value), tuple(options["choosers"].value),
                  options["gamma"].value, options["context"].value,
                  options["temperature"].value, options["loops"].value)
  path = results.write("step_kernels", payload, directory=options["out"].value)
  print(f"\nstep kernels -> {path}")
  loops = payload["loops"]
  print(f"{'program':<42} {'instructions':>12} {'beyond fixed':>12}"
        + (f" {'in loop':>8} {'beyond':>7}" if loops else "") + "  by opcode")
  for row in payload["rows"]:
    print(f"{row['program']:<42} {row['instructions']:>12} {row['beyond_fixed']:>+12}"
          + (f" {row['loop_instructions']:>8} {row['loop_beyond_fixed']:>+7}" if loops else "")
          + "  " + " ".join(f"{opcode} {n}" for opcode, n in row["opcodes"].items()))
  if loops:
    print("\ncopies in the held loop, by shape")
    for row in payload["rows"]:
      print(f"{row['program']:<42} "
            + " ".join(f"{shape} {n}" for shape, n in row["loop_copies"].items()))


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))

"""Step time against the number of idle model arms: unselected drafters should do no work.

  python -m flashspec_jax.bench.idle_arms --target=smollm2_135m --idle=0,1,2,4

A greedy bandit holds arm 0 (a layer-skip drafter), chosen at run time so the
dispatch over all the arms stays in the program; the other arms are layer-skip
drafters of other depths that are never selected. Their caches sit in the loop
state and their steps in the program, but only the chosen arm's step runs.
It times `SpeculativeDecoder.step`, whose dispatch runs each step body in a
one-trip loop; a generation (`run_steps`) steps each body in a loop of its own
and pays no such loops while the bandit stays on one body.
"""

from __future__ import annotations

from absl import flags

from flashspec_jax import cli, results
from flashspec_jax import timing
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.engine import SpeculativeDecoder
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.sampling import Temperature

_TARGET = flags.DEFINE_string("target", "smollm2_135m", "Target shape in configs/.")
_IDLE = flags.DEFINE_list("idle", ["0", "1", "2", "4"], "Numbers of idle model arms.")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size.")
_GAMMA = flags.DEFINE_integer("gamma", 4, "Draft tokens per step.")
_CONTEXT = flags.DEFINE_integer("context", 256, "Prompt tokens before stepping.")
_STEPS = flags.DEFINE_list("steps", ["4", "20"], "Loop lengths whose time difference is used.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per loop length.")
_UNROLL = flags.DEFINE_bool("unroll", False, "Unroll the draft steps (compiles slower).")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")


def bench(target: SyntheticTarget, prompts, idle_counts, gamma, loops, unroll) -> dict:
  """prompts: (tokens [B, P], lengths [B]); loops: ((short, long) steps, repeats)."""
  depths = [target.config.num_layers * (i + 2) // 8 for i in range(max(idle_counts) + 1)]
  rows = []
  for idle in idle_counts:
    arms = tuple(target.layer_skip_arm(d, gamma, unroll) for d in depths[:idle + 1])
    decoder = SpeculativeDecoder(target.model, arms, max_new_tokens=1,
                                 verify_fn=get_verify_fn("auto"))
    measured, _ = timing.held_step_seconds(decoder, target.params, prompts, Temperature(1.0),
                                           *loops)
    rows.append(dict(idle_arms=idle, arms=[a.name for a in arms],
                     step_ms=measured["seconds"] * 1e3, raw=measured))
  base = rows[0]["step_ms"]
  for row in rows:
    row["relative_to_no_idle"] = row["step_ms"] / base
  batch, context = prompts[0].shape
  return dict(target=target.config.name, dtype=target.model.param_dtype.name,
              synthetic_weights=True, batch=batch, gamma=gamma, context=context,
              unrolled_drafts=unroll, rows=rows)


def main(argv):
  del argv
  target = SyntheticTarget.create(_TARGET.value)
  result = bench(target, target.prompts(_BATCH.value, _CONTEXT.value),
                 [int(i) for i in _IDLE.value], _GAMMA.value,
                 (tuple(int(s) for s in _STEPS.value), _REPEATS.value), _UNROLL.value)
  path = results.write("idle_arms", result, directory=_OUT.value)
  print(f"\nstep time with idle model arms, {result['target']} shape, synthetic weights -> {path}")
  print(f"{'idle arms':>9} {'step ms':>9} {'vs none':>8}")
  for row in result["rows"]:
    print(f"{row['idle_arms']:>9} {row['step_ms']:>9.3f} {row['relative_to_no_idle']:>8.3f}")


if __name__ == "__main__":
  cli.run(main)

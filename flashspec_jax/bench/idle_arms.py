"""Step time against the number of idle model arms: unselected drafters should do no work.

  python -m flashspec_jax.bench.idle_arms --target=smollm2_135m --idle=0,1,2,4

A greedy bandit holds arm 0 (a layer-skip drafter), chosen at run time so the
dispatch over all the arms stays in the program; the other arms are layer-skip
drafters of other depths that are never selected. Their caches sit in the loop
state and their steps in the program, but only the chosen arm's step runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import app, flags

from flashspec_jax import results
from flashspec_jax.bench import timing
from flashspec_jax.drafters import ModelDrafter
from flashspec_jax.engine import Arm, SpeculativeDecoder
from flashspec_jax.environment import on_gpu
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.models.config import model_config
from flashspec_jax.models.llama import Llama, init_params
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


def bench(target_name, idle_counts, batch, gamma, context, steps, repeats, unroll) -> dict:
  dtype = jnp.bfloat16 if on_gpu() else jnp.float32
  config = model_config(target_name)
  params = {"target": init_params(config, jax.random.key(0), dtype), "drafters": {}}
  target = Llama(config, param_dtype=dtype)
  depths = [config.num_layers * (i + 2) // 8 for i in range(max(idle_counts) + 1)]
  sampler = Temperature(1.0)
  prompt = jax.random.randint(jax.random.key(1), (batch, context), 0, config.vocab_size)
  lengths = jnp.full((batch,), context, jnp.int32)
  rows = []
  for idle in idle_counts:
    arms = tuple(Arm(ModelDrafter(Llama(config, num_layers=d, param_dtype=dtype),
                                  unroll=unroll), gamma) for d in depths[:idle + 1])
    decoder = SpeculativeDecoder(target, arms, max_new_tokens=1, verify_fn=get_verify_fn("auto"))
    measured, _ = timing.held_step_seconds(decoder, params, (prompt, lengths), sampler, steps,
                                           repeats)
    rows.append(dict(idle_arms=idle, arms=[a.name for a in arms],
                     step_ms=measured["seconds"] * 1e3, raw=measured))
  base = rows[0]["step_ms"]
  for row in rows:
    row["relative_to_no_idle"] = row["step_ms"] / base
  return dict(target=target_name, dtype=jnp.dtype(dtype).name, synthetic_weights=True,
              batch=batch, gamma=gamma, context=context, unrolled_drafts=unroll, rows=rows)


def main(argv):
  del argv
  result = bench(_TARGET.value, [int(i) for i in _IDLE.value], _BATCH.value, _GAMMA.value,
                 _CONTEXT.value, tuple(int(s) for s in _STEPS.value), _REPEATS.value,
                 _UNROLL.value)
  path = results.write("idle_arms", result, directory=_OUT.value)
  print(f"\nstep time with idle model arms, {result['target']} shape, synthetic weights -> {path}")
  print(f"{'idle arms':>9} {'step ms':>9} {'vs none':>8}")
  for row in result["rows"]:
    print(f"{row['idle_arms']:>9} {row['step_ms']:>9.3f} {row['relative_to_no_idle']:>8.3f}")


if __name__ == "__main__":
  app.run(main)

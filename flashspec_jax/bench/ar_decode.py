"""AR decode step time against the bandwidth floor, with synthetic weights.

  python -m flashspec_jax.bench.ar_decode --model=llama3_8b --batch=1,8 --context=1024

  python -m flashspec_jax.bench.ar_decode --model=llama3_70b --mesh=tp:2 --batch=1,8

The step is the one `generate` runs (`decode_step` inside a while loop); the
floor is the bytes one step must read (all weights plus the KV cache at this
context) divided by the copy bandwidth measured in the same run. With a
tensor-parallel mesh, the bytes are those each device reads (its shards of the
weights and cache, and the replicated weights whole), against one device's
copy bandwidth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from absl import flags

from flashspec_jax import cli, results, sharding, timing
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.generate import Decoder
from flashspec_jax.sampling import Greedy

_MODEL = flags.DEFINE_string("model", "llama3_8b", "Model shape in configs/.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "Tokens in the cache when stepping.")
_STEPS = flags.DEFINE_list("steps", ["16", "80"], "Loop lengths whose time difference is used.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed calls per loop length.")
_COPY_GIB = flags.DEFINE_float("copy_gib", 4.0, "Size of the array copied to measure bandwidth.")
_MESH = flags.DEFINE_string("mesh", "", "'' (one device) or tp:<n> (sharding.py).")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")


def bench(target: SyntheticTarget, batches: list[int], context: int, steps: tuple[int, int],
          repeats: int, copy_bytes: int) -> dict:
  config, dtype, params = target.config, target.model.param_dtype, target.params["target"]
  tp = config.tp_shards
  # What the first of the weights' devices holds (not the default backend's: a mesh may be
  # of CPU devices on a GPU machine): its shards of the split weights, the others whole.
  devices = sorted(jax.tree.leaves(params)[0].sharding.device_set, key=lambda d: d.id)
  weight_bytes = sum(shard.data.nbytes for x in jax.tree.leaves(params)
                     for shard in x.addressable_shards if shard.device == devices[0])
  bandwidth = timing.copy_bandwidth(copy_bytes)
  rows = []
  for batch in batches:
    capacity = context + steps[1] + 1
    decoder = Decoder(target.model, max_new_tokens=capacity, eos_ids=(), capacity=capacity)
    state = jax.jit(decoder.init)(params, *target.prompts(batch, context), jax.random.key(2),
                                  Greedy())
    measured = timing.per_step(lambda p, s: decoder.step(p, s, Greedy()), params, state, steps,
                               repeats)
    kv_bytes = (2 * config.num_layers * batch * config.num_kv_heads // tp * context
                * config.head_dim * jnp.dtype(dtype).itemsize)
    floor = (weight_bytes + kv_bytes) / bandwidth["bytes_per_second"]
    rows.append(dict(batch=batch, context=context, step_ms=measured["seconds"] * 1e3,
                     floor_ms=floor * 1e3, ratio_to_floor=measured["seconds"] / floor,
                     weight_bytes=weight_bytes, kv_bytes=kv_bytes, raw=measured))
  return dict(model=config.name, dtype=dtype.name, synthetic_weights=True, tp=tp,
              devices=[str(d) for d in devices], copy_bandwidth=bandwidth, rows=rows)


def main(argv):
  del argv
  result = bench(SyntheticTarget.create(_MODEL.value, jnp.bfloat16, sharding.mesh_for(_MESH.value)),
                 [int(b) for b in _BATCH.value], _CONTEXT.value,
                 tuple(int(s) for s in _STEPS.value), _REPEATS.value, int(_COPY_GIB.value * 2**30))
  path = results.write("ar_decode", result, directory=_OUT.value)
  bw = result["copy_bandwidth"]["bytes_per_second"] / 1e12
  print(f"\nAR decode, {result['model']} shape over {result['tp']} device(s), synthetic bf16 "
        f"weights, copy bandwidth "
        f"{bw:.2f} TB/s -> {path}")
  print(f"{'batch':>5} {'context':>8} {'step ms':>8} {'floor ms':>9} {'ratio':>6}")
  for row in result["rows"]:
    print(f"{row['batch']:>5} {row['context']:>8} {row['step_ms']:>8.3f} {row['floor_ms']:>9.3f} "
          f"{row['ratio_to_floor']:>6.2f}")


if __name__ == "__main__":
  cli.run(main)

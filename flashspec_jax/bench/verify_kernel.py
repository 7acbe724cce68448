"""The Pallas verify kernel against the jnp reference, and against the bandwidth floor.

  python -m flashspec_jax.bench.verify_kernel

Per shape, both implementations run the same calls on the same inputs. Calls
are timed back to back inside one compiled loop: each iteration makes one
call per input set, chained by an optimisation barrier so XLA neither fuses
nor reorders them, and enough sets rotate that they do not fit in L2. The
per-call time is the slope of loop time against iterations, less the loop's
own per-iteration cost (measured with an empty body).

The floor is the bytes one call must move (per row: the p and q rows at the
first rejection, the 2G accepted-test scalars and G tokens, the seed and the
two outputs) divided by the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
from absl import flags

from flashspec_jax import cli, results
from flashspec_jax import timing
from flashspec_jax.kernels.verify import VerifyTiling, verify_pallas, verify_reference

_BATCH = flags.DEFINE_list("batch", ["1", "8", "32", "128"], "Batch sizes.")
_GAMMA = flags.DEFINE_list("gamma", ["1", "4", "8", "16"], "Draft lengths.")
_VOCAB = flags.DEFINE_list("vocab", ["32000", "128256"], "Vocabulary sizes.")
_ITERS = flags.DEFINE_list("iters", ["4", "24"], "Loop lengths whose time difference is used "
                           "(the longer is raised until 640 calls separate them).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per loop length.")
_BLOCK_V = flags.DEFINE_integer("block_v", VerifyTiling().block_v, "Kernel vocabulary tile.")
_NUM_WARPS = flags.DEFINE_integer("num_warps", VerifyTiling().num_warps, "Kernel warps.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the kernel in interpret mode (CPU).")
_COPY_GIB = flags.DEFINE_float("copy_gib", 4.0, "Size of the array copied to measure bandwidth.")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")

L2_BYTES = 60 << 20  # H200; rotating through 3x this defeats the cache
# Timed calls at least between the two loop lengths, so that the slope stands well
# above the timer's noise when few input sets fit per iteration.
MIN_CALLS = 640


def make_inputs(key, batch, gamma, vocab):
  """Realistic verify inputs: peaked distributions, drafts sampled from q."""
  k1, k2, k3, k4 = jax.random.split(key, 4)
  logp = jax.nn.log_softmax(3 * jax.random.normal(k1, (batch, gamma + 1, vocab)), axis=-1)
  logq = jax.nn.log_softmax(3 * jax.random.normal(k2, (batch, gamma, vocab)), axis=-1)
  tokens = jax.random.categorical(k3, logq).astype(jnp.int32)
  return logp, logq, tokens, jax.random.bits(k4, (batch,), jnp.uint32)


def loop_of_calls(verify_fn, sets, num_iterations):
  """num_iterations x len(sets) calls, in order; returns a checksum of all outputs."""
  def body(_, checksum):
    for logp, logq, tokens, seeds in sets:
      (logp, logq, tokens, seeds, checksum) = jax.lax.optimization_barrier(
          (logp, logq, tokens, seeds, checksum))
      num_accepted, next_token = verify_fn(logp, logq, tokens, seeds)
      checksum = checksum + num_accepted + next_token
    return checksum
  return jax.lax.fori_loop(0, num_iterations, body, jnp.zeros(sets[0][3].shape, jnp.int32))


def empty_loop(num_iterations, batch):
  return jax.lax.fori_loop(0, num_iterations, lambda i, c: c + i, jnp.zeros((batch,), jnp.int32))


def bench(shapes, loops, tiling: VerifyTiling, interpret: bool, copy_bytes: int) -> dict:
  """shapes: (batch, gamma, vocab) triples; loops: ((short, long) iterations, repeats)."""
  iters, repeats = loops
  bandwidth = timing.copy_bandwidth(copy_bytes)
  impls = {"reference": verify_reference,
           "pallas": functools.partial(verify_pallas, tiling=tiling, interpret=interpret)}
  rows = []
  for batch, gamma, vocab in shapes:
    set_bytes = batch * (2 * gamma + 1) * vocab * 4
    num_sets = max(2, min(32, math.ceil(3 * L2_BYTES / set_bytes)))
    sets = [make_inputs(jax.random.key(i), batch, gamma, vocab) for i in range(num_sets)]
    iters = (iters[0], iters[0] + max(iters[1] - iters[0], -(-MIN_CALLS // num_sets)))
    run_empty = jax.jit(empty_loop, static_argnums=1)
    loop_cost = timing.per_iteration(lambda n: run_empty(jnp.int32(n), batch), *iters,
                                     repeats)["seconds"]
    row = dict(batch=batch, gamma=gamma, vocab=vocab, calls_per_iteration=num_sets,
               loop_overhead_us=loop_cost * 1e6)
    for name, fn in impls.items():
      run = jax.jit(functools.partial(loop_of_calls, fn))
      measured = timing.per_iteration(lambda n: run(sets, jnp.int32(n)), *iters, repeats)
      row[f"{name}_us"] = (measured["seconds"] - loop_cost) / num_sets * 1e6
      row[f"raw_{name}"] = measured
    must_move = batch * (8 * vocab + 12 * gamma + 12)
    row["floor_us"] = must_move / bandwidth["bytes_per_second"] * 1e6
    row["speedup"] = row["reference_us"] / row["pallas_us"]
    row["pallas_to_floor"] = row["pallas_us"] / row["floor_us"]
    rows.append(row)
    print(f"{batch:>4} {gamma:>3} {vocab:>7} {row['reference_us']:>9.2f} {row['pallas_us']:>9.2f}"
          f" {row['speedup']:>6.2f}x {row['floor_us']:>8.2f} {row['pallas_to_floor']:>7.1f}",
          flush=True)
  return dict(tiling=vars(tiling), interpret=interpret, copy_bandwidth=bandwidth, rows=rows)


HEADER = (f"{'B':>4} {'G':>3} {'V':>7} {'ref us':>9} {'pallas us':>9} {'speedup':>7} "
          f"{'floor us':>8} {'x floor':>7}")


def main(argv):
  del argv
  print(HEADER)
  ints = lambda values: [int(v) for v in values]
  shapes = itertools.product(ints(_BATCH.value), ints(_GAMMA.value), ints(_VOCAB.value))
  result = bench(shapes, (tuple(ints(_ITERS.value)), _REPEATS.value),
                 VerifyTiling(_BLOCK_V.value, _NUM_WARPS.value), _INTERPRET.value,
                 int(_COPY_GIB.value * 2**30))
  path = results.write("verify_kernel", result, directory=_OUT.value)
  bw = result["copy_bandwidth"]["bytes_per_second"] / 1e12
  print(f"\nverify kernel vs jnp reference, copy bandwidth {bw:.2f} TB/s -> {path}")
  print(HEADER)
  for r in result["rows"]:
    print(f"{r['batch']:>4} {r['gamma']:>3} {r['vocab']:>7} {r['reference_us']:>9.2f} "
          f"{r['pallas_us']:>9.2f} {r['speedup']:>6.2f}x {r['floor_us']:>8.2f} "
          f"{r['pallas_to_floor']:>7.1f}")


if __name__ == "__main__":
  cli.run(main)

"""The Pallas verify kernel against its jnp reference, and against the bandwidth floor.

  python run.py --config=experiments/kernel_bench.py          # on a GPU
  python run.py --config=experiments/kernel_bench.py:tiny     # CPU, interpret mode

Grid: B in {1, 8, 32, 128} x gamma in {1, 4, 8, 16} x V in {32000, 128256}.
Writes results/kernel_bench/. Expected on an H200: the kernel faster than the
reference at every shape and about 6 us at B=1, gamma=4, V=128256 (see the
README's table). In interpret mode on a CPU the kernel is far slower than
the reference; that run only checks that the benchmark works.
"""

from flashspec_jax.config import base_config, is_tiny


def get_config(arg=None):
  config = base_config()
  config.experiment = "kernel_bench"
  config.kind = "kernel_bench"
  if is_tiny(arg):
    config.experiment = "kernel_bench_tiny"
    config.kernel.batches, config.kernel.gammas, config.kernel.vocabs = "1,2", "2", "64"
    config.kernel.interpret, config.kernel.repeats, config.kernel.copy_gib = True, 1, 0.01
  return config

"""How far a verify pass's logits are from a decode step's, in the model's dtype.

  python -m flashspec_jax.bench.numerics --model=smollm2_135m --dtype=bfloat16
  python -m flashspec_jax.bench.numerics --model=llama3_8b --positions=30

Greedy speculative decoding equals greedy AR only if the target's logits at a
position do not depend on how many tokens share its forward pass. For one token
path (the f32 model's greedy continuation of a prompt), the logits of the same
positions are computed three ways: by one-token decode steps, by verify passes
of gamma + 1 tokens, and by the model in f32 over the whole sequence. The table
gives each low-precision path's error against f32 (largest and median absolute
logit error) and how often its argmax differs from f32's, and how often the
decode and verify paths disagree with each other. Synthetic weights unless
--weights=real (SmolLM2 only).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from flashspec_jax import cli, results
from flashspec_jax.generate import Decoder, run_generate
from flashspec_jax.loading import load_model
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Greedy



def logits_by_passes(model: Llama, params, tokens: jax.Array, prompt: int,
                     width: int) -> jax.Array:
  """[N, V] logits of positions prompt - 1 ... of tokens [1, prompt + N], from a prefill of
  the prompt but its last token, then passes of `width` tokens."""
  num = tokens.shape[1] - prompt
  if num % width:
    raise ValueError(f"{num} positions do not split into passes of {width}")
  cache = KVCache.init(model.config, 1, tokens.shape[1], model.param_dtype)
  _, cache = model.apply(params, tokens[:, :prompt - 1], cache)

  def one_pass(cache, start):
    window = jax.lax.dynamic_slice_in_dim(tokens, start, width, axis=1)
    logits, cache = model.apply(params, window, cache)
    return cache, logits[0]

  starts = prompt - 1 + width * jnp.arange(num // width)
  return jax.lax.scan(one_pass, cache, starts)[1].reshape(num, -1)


def compare(low: np.ndarray, reference: np.ndarray) -> dict[str, float]:
  error = np.abs(low - reference)
  return dict(max_abs_error=float(error.max()), median_abs_error=float(np.median(error)),
              argmax_flips=float(np.mean(low.argmax(-1) != reference.argmax(-1))))


def bench(name: str, real: bool, dtype, gamma: int, lengths: tuple[int, int]) -> dict:
  """lengths: (prompt tokens, positions compared; a multiple of gamma + 1)."""
  prompt, positions = lengths
  model32 = load_model(name, synthetic=not real, dtype=jnp.float32)
  params32 = model32.params
  params = jax.tree.map(lambda x: x.astype(dtype), params32)
  reference_model = Llama(model32.config, param_dtype=jnp.float32)
  model = dataclasses.replace(reference_model, param_dtype=jnp.dtype(dtype))
  rng = np.random.default_rng(0)
  prompt_ids = rng.integers(0, model32.config.vocab_size, prompt).tolist()
  # The token path: the f32 model's greedy continuation of the prompt.
  continuation = run_generate(params32, Decoder(reference_model, positions, eos_ids=()),
                              [prompt_ids], jax.random.key(0), Greedy())
  sequence = jnp.concatenate([jnp.asarray([prompt_ids], jnp.int32), continuation.tokens], axis=1)
  cache = KVCache.init(model32.config, 1, sequence.shape[1], jnp.float32)
  reference, _ = jax.jit(reference_model.apply)(params32, sequence, cache)
  reference = np.asarray(reference[0, prompt - 1:prompt - 1 + positions], np.float32)
  run = jax.jit(logits_by_passes, static_argnums=(0, 3, 4))
  decode = np.asarray(run(model, params, sequence, prompt, 1), np.float32)
  verify = np.asarray(run(model, params, sequence, prompt, gamma + 1), np.float32)
  return dict(model=name, weights="real" if real else "synthetic", dtype=jnp.dtype(dtype).name,
              gamma=gamma, prompt=prompt, positions=positions,
              decode=compare(decode, reference), verify=compare(verify, reference),
              decode_vs_verify=compare(verify, decode))


def define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags; defined only when run as a program, so that tests can
  import bench() beside other benchmarks that define flags of the same names."""
  options = dict(
      model=flags.DEFINE_string("model", "smollm2_135m", "Model shape in configs/."),
      weights=flags.DEFINE_enum("weights", "synthetic", ["synthetic", "real"], "Weights."),
      dtype=flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "The paths' dtype."),
      gamma=flags.DEFINE_integer("gamma", 4, "Drafts per verify pass (gamma + 1 wide)."),
      prompt=flags.DEFINE_integer("prompt", 128, "Prompt tokens."),
      positions=flags.DEFINE_integer("positions", 120, "Positions compared after the prompt, "
                                     "a multiple of gamma + 1."),
      out=flags.DEFINE_string("out", "results", "Results directory."))
  # Fails in one line before any weights load, not after the f32 reference ran.
  flags.register_multi_flags_validator(
      [options["positions"], options["gamma"]],
      lambda v: v["positions"] > 0 and v["positions"] % (v["gamma"] + 1) == 0,
      "--positions must be a positive multiple of --gamma + 1 (whole verify passes)")
  return options


def main(argv, options):
  del argv
  value = {name: holder.value for name, holder in options.items()}
  result = bench(value["model"], value["weights"] == "real", jnp.dtype(value["dtype"]),
                 value["gamma"], (value["prompt"], value["positions"]))
  path = results.write("numerics", result, directory=value["out"])
  print(f"\n{result['model']} ({result['weights']} weights), {result['dtype']}, gamma "
        f"{result['gamma']}, {result['positions']} positions -> {path}")
  print(f"{'path':<18} {'max |error|':>12} {'median |error|':>15} {'argmax flips':>13}")
  for label, key in (("decode vs f32", "decode"), ("verify vs f32", "verify"),
                     ("verify vs decode", "decode_vs_verify")):
    row = result[key]
    print(f"{label:<18} {row['max_abs_error']:>12.4f} {row['median_abs_error']:>15.5f} "
          f"{row['argmax_flips']:>13.1%}")


if __name__ == "__main__":
  cli.run(functools.partial(main, options=define_flags()))

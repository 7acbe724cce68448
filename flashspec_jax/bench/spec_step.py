"""Speculative step time against its parts, with synthetic weights.

  python -m flashspec_jax.bench.spec_step --target=llama3_8b --drafter=llama3.2_1b --batch=1,8
  python -m flashspec_jax.bench.spec_step --target=llama3_8b --drafter=eagle --batch=1 \
      --draft_vocabulary=0,32768

For each batch size, timed in the same process:
  * the speculative step the engine runs (draft gamma tokens, one target pass
    of gamma + 1 tokens, verify, append, roll back), once per verify
    implementation;
  * its parts, each alone: one target forward of gamma + 1 tokens and one
    drafter forward of one token (the step runs gamma of them).
overhead = step / (target forward + gamma x drafter step) - 1, and
step_vs_target_forward = step / target forward: what a drafter's tau has to beat.
--drafter=eagle is an untrained feature drafter as wide as the target;
--draft_vocabulary=0,32768 times it drafting from the whole vocabulary, then
from 32,768 tokens, as EAGLE-3 does.
--mesh=tp:<n> splits the target over n devices and replicates the drafter
(sharding.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from absl import flags

from flashspec_jax import cli, results, sharding, timing
from flashspec_jax.bench.synthetic import SyntheticTarget
from flashspec_jax.drafters import FeatureDrafter
from flashspec_jax.engine import Arm, SpeculativeDecoder
from flashspec_jax.kernels.verify import PALLAS_GPU_AVAILABLE, get_verify_fn
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Temperature

_TARGET = flags.DEFINE_string("target", "llama3_8b", "Target shape in configs/.")
_DRAFTER = flags.DEFINE_string("drafter", "llama3.2_1b",
                                "Drafter shape in configs/, or eagle (a feature drafter).")
_VOCABULARY = flags.DEFINE_list(
    "draft_vocabulary", ["0"], "With --drafter=eagle, one run each: > 0 restricts it to that "
    "many tokens (models/eagle.py); 0 drafts the whole vocabulary.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_GAMMA = flags.DEFINE_integer("gamma", 4, "Draft tokens per step.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "Prompt tokens before stepping.")
_STEPS = flags.DEFINE_list("steps", ["8", "40"], "Loop lengths whose time difference is used.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed calls per loop length.")
_IMPLS = flags.DEFINE_list("verify", ["reference", "pallas"], "Verify implementations to time.")
_MESH = flags.DEFINE_string("mesh", "", "'' (one device) or tp:<n> (sharding.py).")
_OUT = flags.DEFINE_string("out", "results", "Results directory.")


def forward_loop(model: Llama, params, cache: KVCache, tokens, num_steps: int):
  """num_steps forwards of tokens [B, T] at a fixed context (each rolled back)."""
  def body(_, carry):
    cache, checksum = carry
    logits, cache = model.apply(params, tokens, cache)
    cache = dataclasses.replace(cache, lengths=cache.lengths - tokens.shape[1])
    return cache, checksum + jnp.argmax(logits[:, -1], axis=-1)
  return jax.lax.fori_loop(0, num_steps, body, (cache, jnp.zeros(tokens.shape[0], jnp.int32)))[1]


def feature_draft_loop(drafter: FeatureDrafter, params, state, tokens, num_steps: int):
  """num_steps feature-drafter forwards of one token per row, each rolled back."""
  ones = jnp.ones(tokens.shape[:1], jnp.int32)

  def body(_, carry):
    cache, hidden, checksum = carry
    hidden, normed, cache = drafter.forward(params, cache, hidden, tokens, ones, from_target=False)
    cache = dataclasses.replace(cache, lengths=cache.lengths - 1)
    return cache, hidden, checksum + jnp.argmax(drafter.head(params, normed[:, -1]), axis=-1)

  hidden = state.features[:, :1, :drafter.target.config.hidden_size]
  zeros = jnp.zeros(tokens.shape[0], jnp.int32)
  return jax.lax.fori_loop(0, num_steps, body, (state.cache, hidden, zeros))[2]


def bench(target: SyntheticTarget, arm: Arm, batches, context, loops, impls) -> list[dict]:
  """One row per batch size; loops: ((short, long) steps, repeats); impls: verify
  implementations to time."""
  steps, repeats = loops
  params, drafter, gamma = target.params, arm.drafter, arm.gamma
  rows = []
  for batch in batches:
    prompt, lengths = target.prompts(batch, context)
    row = dict(batch=batch, gamma=gamma, context=context)
    for impl in impls:
      decoder = SpeculativeDecoder(target.model, (arm,), max_new_tokens=1,
                                   verify_fn=get_verify_fn(impl))
      measured, state = timing.held_step_seconds(decoder, params, (prompt, lengths),
                                                 Temperature(1.0), steps, repeats)
      row[f"step_ms_{impl}"] = measured["seconds"] * 1e3
      row[f"raw_step_{impl}"] = measured

    run_forward = jax.jit(forward_loop, static_argnums=0)
    verify_tokens = prompt[:, :gamma + 1]
    target_fwd = timing.per_iteration(
        lambda n: run_forward(target.model, params["target"], state.target_cache, verify_tokens,
                              jnp.int32(n)),
        *steps, repeats)
    if isinstance(drafter, FeatureDrafter):
      run_draft = jax.jit(feature_draft_loop, static_argnums=0)
      draft_fwd = timing.per_iteration(
          lambda n: run_draft(drafter, params, state.drafter_states[0], prompt[:, :1],
                              jnp.int32(n)), *steps, repeats)
    else:
      draft_fwd = timing.per_iteration(
          lambda n: run_forward(drafter.model, drafter.params(params),
                                state.drafter_states[0], prompt[:, :1], jnp.int32(n)), *steps,
          repeats)
    parts = target_fwd["seconds"] + gamma * draft_fwd["seconds"]
    row |= dict(target_forward_ms=target_fwd["seconds"] * 1e3,
                drafter_step_ms=draft_fwd["seconds"] * 1e3, parts_ms=parts * 1e3,
                raw_target_forward=target_fwd, raw_drafter_step=draft_fwd)
    for impl in impls:
      row[f"overhead_{impl}"] = row[f"step_ms_{impl}"] / row["parts_ms"] - 1
      row[f"step_vs_target_forward_{impl}"] = row[f"step_ms_{impl}"] / row["target_forward_ms"]
    rows.append(row)
  return rows


def main(argv):
  del argv
  impls = [i for i in _IMPLS.value if i != "pallas" or PALLAS_GPU_AVAILABLE]
  target = SyntheticTarget.create(_TARGET.value, jnp.bfloat16, sharding.mesh_for(_MESH.value))
  # A draft model drafts the whole vocabulary; each feature-drafter arm replaces the
  # last one's params.
  vocabularies = [int(v) for v in _VOCABULARY.value] if _DRAFTER.value == "eagle" else [None]
  rows = []
  for vocabulary in vocabularies:
    arm = (target.draft_model_arm(_DRAFTER.value, _GAMMA.value) if vocabulary is None
           else target.feature_drafter_arm(_GAMMA.value, vocabulary=vocabulary))
    rows += [row | dict(draft_vocabulary=vocabulary or target.config.vocab_size)
             for row in bench(target, arm, [int(b) for b in _BATCH.value], _CONTEXT.value,
                              (tuple(int(s) for s in _STEPS.value), _REPEATS.value), impls)]
  result = dict(target=target.config.name, drafter=arm.drafter.params_key,
                dtype=target.model.param_dtype.name, synthetic_weights=True,
                tp=target.config.tp_shards, rows=rows)
  path = results.write("spec_step", result, directory=_OUT.value)
  print(f"\nspeculative step, {result['target']} target over {result['tp']} device(s), "
        f"{result['drafter']} drafter, synthetic bf16 weights -> {path}")
  header = f"{'vocab':>6} {'batch':>5} {'target fwd ms':>13} {'draft step ms':>13} {'parts ms':>9}"
  for impl in impls:
    header += f" {'step ms ' + impl:>18} {'overhead':>9} {'vs target fwd':>13}"
  print(header)
  for row in result["rows"]:
    line = (f"{row['draft_vocabulary']:>6} {row['batch']:>5} {row['target_forward_ms']:>13.3f} "
            f"{row['drafter_step_ms']:>13.3f} {row['parts_ms']:>9.3f}")
    for impl in impls:
      line += (f" {row['step_ms_' + impl]:>18.3f} {row['overhead_' + impl]:>9.1%}"
               f" {row['step_vs_target_forward_' + impl]:>12.2f}x")
    print(line)


if __name__ == "__main__":
  cli.run(main)

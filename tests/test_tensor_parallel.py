"""Tensor parallelism on eight CPU devices (conftest.py asks XLA for them): sharded
equals unsharded, the layout's collectives are Megatron's, and nothing else moves."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import spread_params, tiny_config
from exactness import (NUM_SAMPLES, NUM_TOKENS, PROMPTS, SAMPLERS, TARGET_CONFIG, VOCAB,
                       continuation_logits, draw, fit_pvalues, point_key, sequence_probs)
from helpers import with_fields, write_tiny_llama
from jax.sharding import NamedSharding, PartitionSpec as P

from flashspec_jax import config as config_lib
from flashspec_jax import engine, runner, sharding
from flashspec_jax.bandit import make_strategy
from flashspec_jax.drafters import FeatureDrafter, ModelDrafter, NgramDrafter
from flashspec_jax.generate import Decoder
from flashspec_jax.kernels.verify import get_verify_fn
from flashspec_jax.loading import load_model
from flashspec_jax.loading import hf
from flashspec_jax.loading.hf import load_hf_checkpoint
from flashspec_jax.models import eagle
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.sampling import Greedy, Samplers, Temperature
from flashspec_jax.sequences import prepare_prompts

CPUS = jax.devices("cpu")
pytestmark = pytest.mark.skipif(len(CPUS) < 8, reason="needs XLA's 8 host devices (conftest.py)")

# GQA with 8 KV heads, so that tp 2, 4 and 8 each hold whole heads.
CONFIG = tiny_config(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=16,
                     num_kv_heads=8, head_dim=8)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo: str) -> dict[str, int]:
  return {op: len(re.findall(rf"= \S+ {op}(?:-start)?\(", hlo)) for op in COLLECTIVES}


def shard(params, config, tp):
  """(config, params) laid out and placed for tp CPU devices."""
  mesh = sharding.make_mesh(tp, CPUS)
  return (sharding.sharded_config(config, tp), jax.device_put(
      sharding.shard_major(params, config, tp), sharding.param_shardings(params, mesh)))


def logits_of(config, params, tokens):
  cache = KVCache.init(config, tokens.shape[0], 16, jnp.float32)
  return Llama(config, param_dtype=jnp.float32).apply(params, tokens, cache)[0]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_sharded_logits_equal_unsharded_with_two_all_reduces_per_layer(tp):
  params = spread_params(CONFIG, seed=0)
  tokens = jnp.array([[3, 5, 7, 9], [2, 4, 6, 8]])
  forward = jax.jit(logits_of, static_argnums=0)
  config, sharded = shard(params, CONFIG, tp)
  np.testing.assert_allclose(forward(config, sharded, tokens), forward(CONFIG, params, tokens),
                             atol=1e-5, rtol=0)
  counts = collectives(forward.lower(config, sharded, tokens).compile().as_text())
  assert counts == dict.fromkeys(COLLECTIVES, 0) | {"all-reduce": 2 * CONFIG.num_layers}, counts


def test_sharded_greedy_speculation_is_unsharded_and_one_program():
  """A UCB1 bandit over n-gram and layer-skip at tp 2: the same tokens, run with every host
  transfer disallowed, and its only collectives the layers' all-reduces."""
  params = spread_params(CONFIG, seed=0)
  tokens, lengths = prepare_prompts([[3, 5, 7, 9, 11], [2, 4, 6]], CONFIG.vocab_size)

  def speculate(config, params, mesh=None):
    arms = (engine.Arm(NgramDrafter(CONFIG.vocab_size, 2), 3),
            engine.Arm(ModelDrafter(Llama(config, num_layers=1, param_dtype=jnp.float32),
                                    unroll=False), 2))
    decoder = engine.SpeculativeDecoder(Llama(config, param_dtype=jnp.float32), arms, 12,
                                        eos_ids=(), strategy=make_strategy("ucb1"))
    args = ({"target": params}, *sharding.replicated(
        (tokens, lengths, jax.random.key(0), Samplers.same(Greedy()), decoder.chooser.init(2)),
        mesh))
    with jax.transfer_guard("disallow"):
      return decoder.generate(*args), decoder.lower(*args).compile().as_text()

  expected, _ = speculate(CONFIG, params)
  config, sharded = shard(params, CONFIG, 2)
  out, hlo = speculate(config, sharded, sharding.mesh_of(sharded))
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  counts = collectives(hlo)
  assert counts["all-reduce"] > 0 and counts["all-reduce"] % 2 == 0, counts
  assert not any(n for op, n in counts.items() if op != "all-reduce"), counts


@pytest.mark.parametrize("restricted", [False, True], ids=["whole_vocabulary", "restricted"])
def test_a_feature_drafter_drafts_the_same_over_a_sharded_target(restricted):
  """Its own block stays in the checkpoint's layout, replicated: the same tokens and the
  same accepted drafts as over the unsharded target; restricted to a vocabulary, its head
  rows come from the sharded head."""
  params = spread_params(CONFIG, seed=0)
  drafter_params = eagle.init_params(CONFIG, jax.random.key(3), jnp.float32)
  tokens, lengths = prepare_prompts([[3, 5, 7, 9, 11], [2, 4, 6]], CONFIG.vocab_size)

  def speculate(config, params, mesh=None):
    target = Llama(config, param_dtype=jnp.float32)
    decoder = engine.SpeculativeDecoder(
        target, (engine.Arm(FeatureDrafter(target, "eagle", unroll=False), 3),), 12, eos_ids=())
    own = (eagle.restrict_vocabulary(drafter_params, params, range(0, CONFIG.vocab_size, 2))
           if restricted else drafter_params)
    return decoder.generate(
        {"target": params, "drafters": sharding.replicated({"eagle": own}, mesh)},
        *sharding.replicated((tokens, lengths, jax.random.key(0), Samplers.same(Greedy())),
                             mesh))

  expected = speculate(CONFIG, params)
  config, sharded = shard(params, CONFIG, 2)
  out = speculate(config, sharded, sharding.mesh_of(sharded))
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.metrics.accepted, expected.metrics.accepted)


def test_sharded_speculation_samples_the_target_exactly():
  """One setting of the exactness grid at tp 2 (layer-skip drafting, gamma 2, batch 1,
  plain temperature sampling at three temperatures), against the exact distribution of
  the unsharded model."""
  config = dataclasses.replace(TARGET_CONFIG, num_kv_heads=2)  # whole KV heads per device
  params = spread_params(config, seed=0, scale=6.0)
  logits = continuation_logits(params, config, PROMPTS[1], NUM_TOKENS)
  sharded_config, sharded = shard(params, config, 2)
  arms = (engine.Arm(ModelDrafter(Llama(sharded_config, num_layers=1, param_dtype=jnp.float32),
                                  unroll=False), 2),)
  temperatures = (0.5, 1.0, 1.5)
  samplers = jax.tree.map(lambda *x: jnp.stack(x),
                          *[SAMPLERS["plain"](temperature=t) for t in temperatures])
  keys = jnp.stack([point_key(("tp2", 2, t, "plain", 1)) for t in temperatures])
  samples = draw({"target": sharded}, arms, samplers, 1, keys,
                 target=Llama(sharded_config, param_dtype=jnp.float32))
  assert samples.shape[1] * samples.shape[2] == NUM_SAMPLES
  for i, t in enumerate(temperatures):
    p = fit_pvalues(samples[i], sequence_probs(logits, SAMPLERS["plain"](temperature=t)), VOCAB)
    assert min(p.values()) > 0.01 / len(temperatures), (t, p)


GPUS = [d for d in jax.devices() if d.platform == "gpu"]


@pytest.mark.parametrize("impl, devices", [
    ("pallas_interpret", CPUS),
    pytest.param("pallas", GPUS, marks=pytest.mark.skipif(
        len(GPUS) < 2, reason="needs two GPUs for the Triton kernel under a mesh"))])
def test_the_pallas_verify_kernel_runs_whole_on_every_device_of_a_mesh(impl, devices):
  """Temperature sampling at tp 2 with the Pallas kernel verifying: the tokens the jnp
  reference gives from the same sharded logits and seeds, and no collective beyond the
  layers' all-reduces (the kernel's inputs are replicated, so nothing is gathered)."""
  params = spread_params(CONFIG, seed=0)
  tokens, lengths = prepare_prompts([[3, 5, 7, 9, 11], [2, 4, 6]], CONFIG.vocab_size)
  mesh = sharding.make_mesh(2, devices)
  config = sharding.sharded_config(CONFIG, 2)
  sharded = jax.device_put(sharding.shard_major(params, CONFIG, 2),
                           sharding.param_shardings(params, mesh))

  def decoder(verify_impl):
    arms = (engine.Arm(ModelDrafter(Llama(config, num_layers=1, param_dtype=jnp.float32),
                                    unroll=False), 3),)
    return engine.SpeculativeDecoder(Llama(config, param_dtype=jnp.float32), arms, 12,
                                     eos_ids=(), verify_fn=get_verify_fn(verify_impl))

  kernel = decoder(impl)
  args = ({"target": sharded}, *sharding.replicated(
      (tokens, lengths, jax.random.key(0), Samplers.same(Temperature(1.0)),
       kernel.chooser.init(1)), mesh))
  # A Fixed strategy's state is not donated, so both calls can be handed it.
  with jax.transfer_guard("disallow"):
    out = kernel.generate(*args)
  expected = decoder("reference").generate(*args)
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.metrics.accepted, expected.metrics.accepted)
  assert 0 < np.asarray(out.metrics.accepted).sum() < np.asarray(out.metrics.proposed).sum()
  counts = collectives(kernel.lower(*args).compile().as_text())
  assert not any(n for op, n in counts.items() if op != "all-reduce"), counts


def test_a_checkpoint_loads_into_its_shards(tmp_path):
  write_tiny_llama(tmp_path, num_attention_heads=4, num_key_value_heads=2,
                   tie_word_embeddings=False)
  whole_config, whole = load_hf_checkpoint(tmp_path, jnp.float32)
  mesh = sharding.make_mesh(2, CPUS)
  split_config, split = load_hf_checkpoint(tmp_path, jnp.float32, mesh=mesh)
  layer = split["params"]["layer_0"]
  assert layer["attn"]["qkv"].sharding == NamedSharding(mesh, P(None, "tp"))
  assert layer["mlp"]["down"].sharding == NamedSharding(mesh, P("tp", None))
  assert split["params"]["embedding"].sharding == NamedSharding(mesh, P())
  # Each device holds half of each split weight, never the whole.
  shard_shapes = {s.data.shape for s in layer["attn"]["qkv"].addressable_shards}
  assert shard_shapes == {(whole_config.hidden_size, layer["attn"]["qkv"].shape[1] // 2)}
  tokens = jnp.array([[1, 2, 3, 4]])
  forward = jax.jit(logits_of, static_argnums=0)
  np.testing.assert_allclose(forward(split_config, split, tokens),
                             forward(whole_config, whole, tokens), atol=1e-5, rtol=0)


def test_each_device_reads_only_its_block_of_a_split_weight(tmp_path, monkeypatch):
  write_tiny_llama(tmp_path, num_attention_heads=4, num_key_value_heads=2)
  reads = []

  class Recorded(hf.StoredTensor):
    def __getitem__(self, index):
      reads.append((self.name, index))
      return super().__getitem__(index)

  monkeypatch.setattr(hf, "StoredTensor", Recorded)
  config, _ = hf.load_hf_checkpoint(tmp_path, jnp.float32, mesh=sharding.make_mesh(2, CPUS))
  q_rows = config.num_heads * config.head_dim
  q_reads = [i for name, i in reads if name == "model.layers.0.self_attn.q_proj.weight"]
  assert sorted((i.start, i.stop) for i in q_reads) == [(0, q_rows // 2), (q_rows // 2, q_rows)]
  out_reads = [i for name, i in reads if name == "model.layers.0.self_attn.o_proj.weight"]
  assert sorted((i[1].start, i[1].stop) for i in out_reads) == [(0, q_rows // 2),
                                                                  (q_rows // 2, q_rows)]
  assert [i for name, i in reads if name == "model.embed_tokens.weight"] == [slice(None)]


def test_synthetic_weights_are_created_in_their_shards():
  model = load_model("tiny_llama", synthetic=True, dtype=jnp.float32,
                     mesh=sharding.make_mesh(2, CPUS))
  qkv = model.params["params"]["layer_0"]["attn"]["qkv"]
  assert model.config.tp_shards == 2 and qkv.sharding.spec == P(None, "tp")


def test_an_ar_decoder_runs_sharded():
  params = spread_params(CONFIG, seed=1)
  tokens, lengths = prepare_prompts([[3, 5, 7]], CONFIG.vocab_size)
  config, sharded = shard(params, CONFIG, 4)
  outputs = [Decoder(Llama(c, param_dtype=jnp.float32), 6, eos_ids=()).generate(
      p, *sharding.replicated((tokens, lengths, jax.random.key(0), Greedy()),
                              sharding.mesh_of(p))).tokens
             for c, p in ((CONFIG, params), (config, sharded))]
  np.testing.assert_array_equal(*outputs)


def test_heads_that_do_not_split_are_refused():
  with pytest.raises(ValueError, match="num_kv_heads=8 does not split over 3 tensor-parallel"):
    sharding.sharded_config(CONFIG, 3)
  with pytest.raises(ValueError, match="mesh 'tp:x'"):
    sharding.parse_mesh("tp:x")


def test_weights_too_large_for_a_device_are_refused_with_the_degree_that_fits():
  from flashspec_jax.models.config import model_config
  with pytest.raises(ValueError, match="llama3_70b: its weights take 141 GB .* a device holds "
                                       "105 GB: use --config.mesh=tp:2"):
    sharding.check_fits(model_config("llama3_70b"), 1, 2, int(105e9))
  sharding.check_fits(model_config("llama3_70b"), 2, 2, int(105e9))


@pytest.mark.skipif(len(jax.devices()) < 2 and jax.default_backend() != "cpu",
                    reason="a run's mesh takes the default backend's devices: needs two GPUs")
def test_a_run_split_over_two_devices_is_the_run_on_one(tmp_path):
  config = config_lib.base_config()
  config.experiment, config.results_dir = "tp_run", str(tmp_path)
  config.target, config.synthetic_weights, config.print_text = "tiny_llama", True, False
  config.methods, config.arms = "ar,ngram:2,bandit:ucb1", "ngram:2,layer_skip:2"
  config.bandit.costs = "1,1"
  config.sampling.max_new_tokens = 8
  fields = ("method", "new_tokens", "steps", "accepted", "loop_steps")
  records = [[{k: r.get(k) for k in fields} for r in runner.run(
      with_fields(config, mesh=mesh))["records"]] for mesh in ("", "tp:2")]
  assert records[0] == records[1]


def test_the_ar_decode_bench_counts_what_each_device_reads():
  """bench.ar_decode at tp 2: the floor's bytes are one device's share (its shards, the
  replicated weights whole), at most the unsharded bytes and at least half of them."""
  from flashspec_jax.bench import ar_decode
  from flashspec_jax.bench.synthetic import SyntheticTarget
  args = ([1], 32, (2, 4), 1, 1 << 20)
  whole, split = (ar_decode.bench(SyntheticTarget.create("tiny_llama", jnp.float32, mesh), *args)
                  for mesh in (None, sharding.make_mesh(2, CPUS)))
  assert split["tp"] == 2 and whole["tp"] == 1
  (w,), (s,) = whole["rows"], split["rows"]
  assert w["weight_bytes"] / 2 < s["weight_bytes"] < w["weight_bytes"]
  assert s["kv_bytes"] * 2 == w["kv_bytes"]

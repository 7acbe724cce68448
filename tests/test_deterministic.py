"""Deterministic mode: greedy speculative output is greedy AR output, bit for bit, in bf16 too.

Off, a verify pass of gamma + 1 tokens and a one-token decode step may round a
row's logits differently, and greedy replies can part (issue 16). On, every
target pass after the prefill has one width and XLA picks kernels without
autotuning (docs/exactness.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import spread_params, tiny_config

from flashspec_jax import engine
from flashspec_jax.bandit import Fixed, make_strategy
from flashspec_jax.drafters import ModelDrafter, NgramDrafter
from flashspec_jax.generate import Decoder, model_pass, run_generate
from flashspec_jax.loading.tokenizer import encode_chat
from flashspec_jax.models.llama import KVCache, Llama
from flashspec_jax.prompts import load_prompts
from flashspec_jax.sampling import Greedy, Samplers

ON_GPU = jax.default_backend() == "gpu"
GAMMA = 4


def bf16(params):
  return jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16] if ON_GPU else [jnp.float32, jnp.bfloat16])
def test_greedy_speculation_is_greedy_ar_bit_for_bit(smollm2, dtype):
  """Five real held-out prompts (chat, code), each arm alone and a UCB1 bandit over both.

  On a GPU: 128 new tokens, n-gram, layer-skip and the bandit. On the CPU, for
  time: 32 new tokens; in f32 n-gram, in bf16 the bandit alone, whose steps run
  both arms.
  """
  config, params, tokenizer = smollm2
  params = params if dtype == jnp.float32 else bf16(params)
  ids = encode_chat(tokenizer, [p.conversation for kind in ("chat", "code")
                                for p in load_prompts(kind, 3, "heldout")][:5])
  new_tokens = 128 if ON_GPU else 32
  target = Llama(config, param_dtype=dtype)
  ngram = engine.Arm(NgramDrafter(config.vocab_size, 3), GAMMA)
  layer_skip = engine.Arm(ModelDrafter(Llama(config, num_layers=26, param_dtype=dtype),
                                       unroll=False), GAMMA)
  methods = {}
  if dtype == jnp.float32 or ON_GPU:
    methods["ngram"] = ((ngram,), Fixed(0))
  if dtype == jnp.bfloat16:
    methods["bandit"] = ((ngram, layer_skip), make_strategy("ucb1"))
  if ON_GPU:
    methods["layer_skip"] = ((layer_skip,), Fixed(0))

  ar = run_generate(params, Decoder(target, new_tokens, eos_ids=(), pass_width=GAMMA + 1), ids,
                    jax.random.key(0), Greedy())
  for name, (arms, strategy) in methods.items():
    decoder = engine.SpeculativeDecoder(target, arms, new_tokens, eos_ids=(), strategy=strategy,
                                        pass_width=GAMMA + 1)
    out = engine.run_speculative({"target": params}, decoder, ids, jax.random.key(0),
                                 Samplers.same(Greedy()))
    np.testing.assert_array_equal(out.tokens, ar.tokens, err_msg=name)
    assert int(np.asarray(out.metrics.accepted).sum()) > 0, f"{name} never accepted a draft"
    if name == "bandit":
      assert set(np.asarray(out.history.arm[:int(out.steps)]).tolist()) == {0, 1}


def test_a_padded_pass_gives_each_row_the_logits_of_an_unpadded_one():
  """In f32 padding changes nothing but the width: the kept rows' logits and the cache
  up to the real tokens match an unpadded pass."""
  config = tiny_config()
  params = spread_params(config, seed=0)
  model = Llama(config, param_dtype=jnp.float32)
  tokens = jnp.array([[3, 5, 7], [2, 4, 6]])
  cache = KVCache.init(config, 2, 16, jnp.float32)
  plain, plain_cache = jax.jit(model.apply)(params, tokens, cache)
  padded, padded_cache = jax.jit(lambda *args: model_pass(model, *args, pass_width=8))(
      params, tokens, cache)
  np.testing.assert_allclose(padded, plain, atol=1e-5)
  np.testing.assert_array_equal(padded_cache.lengths, plain_cache.lengths)
  np.testing.assert_allclose(padded_cache.layers[0].k[:, :, :3], plain_cache.layers[0].k[:, :, :3],
                             atol=1e-6)
  with pytest.raises(ValueError, match="does not fit the pass width 2"):
    model_pass(model, params, tokens, cache, pass_width=2)


def test_a_pass_width_narrower_than_a_verify_pass_is_refused():
  target = Llama(tiny_config(), param_dtype=jnp.float32)
  with pytest.raises(ValueError, match="narrower than a verify pass"):
    engine.SpeculativeDecoder(target, (engine.Arm(NgramDrafter(64, 2), 4),), 8, pass_width=4)

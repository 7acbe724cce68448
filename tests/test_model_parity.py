"""Our Llama against transformers' PyTorch Llama on tiny random checkpoints (f32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import CASES, save_tiny_llama

torch = pytest.importorskip("torch")

from flashspec_jax.loading.hf import load_hf_checkpoint  # noqa: E402
from flashspec_jax.models.llama import KVCache, Llama  # noqa: E402

ATOL = 1e-4


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  torch_model = save_tiny_llama(directory, **CASES[request.param])
  config, params = load_hf_checkpoint(directory, dtype=jnp.float32)
  return torch_model, config, params


def torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.numpy()


def test_config_is_read_back(checkpoint):
  torch_model, config, _ = checkpoint
  hf = torch_model.config
  assert config.num_layers == hf.num_hidden_layers == 3
  assert config.num_kv_heads == hf.num_key_value_heads
  assert config.tie_word_embeddings == hf.tie_word_embeddings


def test_prefill_logits_match(checkpoint):
  torch_model, config, params = checkpoint
  tokens = np.random.default_rng(0).integers(0, config.vocab_size, (2, 40))
  model = Llama(config, param_dtype=jnp.float32)
  cache = KVCache.init(config, batch=2, capacity=48, dtype=jnp.float32)
  logits, cache = model.apply(params, jnp.asarray(tokens), cache)
  np.testing.assert_allclose(logits, torch_logits(torch_model, tokens), atol=ATOL, rtol=0)
  np.testing.assert_array_equal(cache.lengths, [40, 40])


def test_token_by_token_decode_matches(checkpoint):
  torch_model, config, params = checkpoint
  tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 24))
  expected = torch_logits(torch_model, tokens)
  model = Llama(config, param_dtype=jnp.float32)
  step = jax.jit(model.apply)
  cache = KVCache.init(config, batch=2, capacity=32, dtype=jnp.float32)
  _, cache = step(params, jnp.asarray(tokens[:, :8]), cache)  # prefill, then one at a time
  for t in range(8, 24):
    logits, cache = step(params, jnp.asarray(tokens[:, t:t + 1]), cache)
    np.testing.assert_allclose(logits[:, 0], expected[:, t], atol=ATOL, rtol=0)


def test_ragged_rows_match_single_rows(checkpoint):
  """Rows at different cache lengths, fed a right-padded chunk, match each row run alone."""
  torch_model, config, params = checkpoint
  rng = np.random.default_rng(2)
  lengths = [5, 11, 1]
  rows = [rng.integers(0, config.vocab_size, n + 6) for n in lengths]
  model = Llama(config, param_dtype=jnp.float32)
  cache = KVCache.init(config, batch=3, capacity=32, dtype=jnp.float32)
  prompt = np.zeros((3, max(lengths)), np.int32)
  for b, n in enumerate(lengths):
    prompt[b, :n] = rows[b][:n]
  _, cache = model.apply(params, jnp.asarray(prompt), cache, num_valid=jnp.asarray(lengths))
  chunk = np.stack([row[n:n + 6] for row, n in zip(rows, lengths)])
  logits, cache = model.apply(params, jnp.asarray(chunk), cache)
  for b, row in enumerate(rows):
    expected = torch_logits(torch_model, row[None])[0, lengths[b]:]
    np.testing.assert_allclose(logits[b], expected, atol=ATOL, rtol=0)
  np.testing.assert_array_equal(cache.lengths, np.array(lengths) + 6)


def test_logits_index_selects_one_position(checkpoint):
  _, config, params = checkpoint
  tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 9)))
  model = Llama(config, param_dtype=jnp.float32)
  cache = KVCache.init(config, batch=2, capacity=16, dtype=jnp.float32)
  full, _ = model.apply(params, tokens, cache)
  picked, _ = model.apply(params, tokens, cache, logits_index=jnp.array([3, 8]))
  np.testing.assert_allclose(picked, full[jnp.arange(2), jnp.array([3, 8])], atol=1e-6)


def test_sharded_checkpoint_loads_the_same(tmp_path):
  torch_model = save_tiny_llama(tmp_path / "one", **CASES["gqa_untied"])
  torch_model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
  index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  _, single = load_hf_checkpoint(tmp_path / "one", dtype=jnp.float32)
  _, sharded = load_hf_checkpoint(tmp_path / "sharded", dtype=jnp.float32)
  jax.tree.map(np.testing.assert_array_equal, single, sharded)

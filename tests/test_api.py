"""The FlashSpec Python API, on synthetic tiny_llama weights."""

import jax.numpy as jnp
import pytest

from flashspec_jax import FlashSpec, FlashSpecConfig, SamplingConfig
from flashspec_jax.loading import load_model

GREEDY = SamplingConfig(gamma=3, temperature=0.0)
PROMPTS = [[5, 9, 2, 7, 5, 9, 2], [11, 3]]


def tiny_engine(drafters, model=None):
  config = FlashSpecConfig(target="tiny_llama", drafters=drafters, sampling=GREEDY,
                           max_new_tokens=6, synthetic_weights=True, device="cpu")
  return FlashSpec(config, model=model)


def test_engines_can_share_one_loaded_model():
  ar = tiny_engine(())
  speculative = tiny_engine(("ngram:2",), model=ar.model)
  assert speculative.model is ar.model
  assert speculative.generate(PROMPTS).token_ids == ar.generate(PROMPTS).token_ids


@pytest.mark.parametrize("name, dtype, message", [
    ("tiny_llama_draft", jnp.float32, "is tiny_llama_draft in float32, but this config runs "
                                      "tiny_llama in float32"),
    ("tiny_llama", jnp.bfloat16, "is tiny_llama in bfloat16, but this config runs tiny_llama "
                                 "in float32"),
])
def test_a_model_of_another_shape_or_dtype_is_refused(name, dtype, message):
  model = load_model(name, synthetic=True, dtype=dtype)
  with pytest.raises(ValueError, match=message):
    tiny_engine(("ngram:2",), model=model)

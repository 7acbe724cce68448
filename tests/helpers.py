"""Helpers that several test modules share; fixtures live in conftest.py.

Test modules never import each other: a module-level skip in one, such as
`pytest.importorskip("torch")`, would skip every module that imports it too.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from safetensors.numpy import save_file

from flashspec_jax.sequences import prepare_prompts

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}

# Tiny Llama variants for write_tiny_llama: GQA, tied embeddings and Llama 3 RoPE scaling.
CASES = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_llama3_rope": dict(num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False,
                            rope_scaling=LLAMA3_ROPE, rope_theta=500_000.0),
}


def write_tiny_llama(directory, seed=0, **overrides) -> transformers.LlamaConfig:
  """Writes a random f32 HF Llama checkpoint (config.json, model.safetensors) without torch."""
  directory = pathlib.Path(directory)
  fields = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-5)
  config = transformers.LlamaConfig(**(fields | overrides))
  config.save_pretrained(directory)
  d, f = config.hidden_size, config.intermediate_size
  q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
  shapes = {"model.embed_tokens.weight": (config.vocab_size, d), "model.norm.weight": (d,)}
  if not config.tie_word_embeddings:
    shapes["lm_head.weight"] = (config.vocab_size, d)
  for layer in range(config.num_hidden_layers):
    shapes |= {f"model.layers.{layer}.{name}.weight": shape for name, shape in {
        "self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f), "input_layernorm": (d,), "post_attention_layernorm": (d,)}.items()}
  rng = np.random.default_rng(seed)
  # HF initialises norms to ones; random scales catch a missing norm.
  tensors = {name: (rng.uniform(0.5, 1.5, shape) if "norm" in name
                    else rng.normal(0.0, config.initializer_range, shape)).astype(np.float32)
             for name, shape in shapes.items()}
  # transformers refuses safetensors files without the format tag that torch's writer adds.
  save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
  return config


def save_tiny_llama(directory, seed=0, **overrides):
  """write_tiny_llama, then that checkpoint as transformers' PyTorch model (needs torch)."""
  write_tiny_llama(directory, seed, **overrides)
  return transformers.LlamaForCausalLM.from_pretrained(directory).eval()


def with_fields(config, **fields):
  """Sets each dotted field of an ml_collections config, e.g. **{"sampling.gamma": 2}."""
  for key, value in fields.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def latest_longest_match(tokens, length, max_n):
  """n-gram lookup's definition, by search: (continuation, n) of the latest earlier
  occurrence of the longest suffix of tokens[:length] (n <= max_n) that occurs earlier;
  (-1, 0) if none does."""
  for n in range(max_n, 0, -1):
    if length > n:
      suffix = tokens[length - n:length]
      for start in range(length - n - 1, -1, -1):
        if tokens[start:start + n] == suffix:
          return start + n, n
  return -1, 0


def _while_loops(jaxpr) -> int:
  """While loops in a jaxpr, nested ones included, but not those inside a Pallas kernel
  (the GPU's verify kernel loops over the vocabulary within one kernel launch)."""
  count = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      continue
    count += eqn.primitive.name == "while"
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          count += _while_loops(getattr(sub, "jaxpr", sub))
  return count


def loops_per_step(decoder, params, prompts, vocab_size, samplers) -> int:
  """While loops inside the step loop of decoder.run_steps after prefilling prompts
  (on a GPU each loop's predicate is a wait for the host), for a one-body decoder
  whose step loop is the last loop at the top of the program."""
  tokens, lengths = prepare_prompts(prompts, vocab_size)
  state = decoder.init(params, jnp.asarray(tokens), jnp.asarray(lengths), jax.random.key(0),
                       samplers.target)
  program = jax.make_jaxpr(decoder.run_steps)(params, state, samplers).jaxpr
  step_loop = [eqn for eqn in program.eqns if eqn.primitive.name == "while"][-1]
  return _while_loops(step_loop.params["body_jaxpr"].jaxpr)

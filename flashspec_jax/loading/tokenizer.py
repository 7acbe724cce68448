"""Tokenizers from an HF directory (`tokenizer.json`) or from GGUF metadata.

transformers can read a GGUF tokenizer too, but only with torch installed; we
build the byte-level BPE ourselves with `tokenizers` so that running needs no
torch. The test suite checks it encodes exactly as transformers' GGUF path does.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from types import ModuleType
from typing import TYPE_CHECKING

import gguf
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from flashspec_jax.loading.gguf import read_gguf, required_field
from flashspec_jax.loading.params import CheckpointError

if TYPE_CHECKING:
  from transformers import PreTrainedTokenizerFast

_NO_ADVICE = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
_CONTROL = int(gguf.TokenType.CONTROL)
_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)

# llama.cpp's pre-tokenizer names -> the HF pre-tokenizer that matches them.
_PRE_TOKENIZERS = {
    # SmolLM splits every digit, then applies GPT-2's byte-level regex.
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}


def tokenizer_from_gguf(path: pathlib.Path) -> PreTrainedTokenizerFast:
  header = read_gguf(path)
  fields = header.fields
  required = lambda key: required_field(header, path, f"tokenizer.ggml.{key}")
  kind = required("model")
  pre = fields.get("tokenizer.ggml.pre", "gpt2")
  if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
    raise CheckpointError(f"{path}: GGUF tokenizer {kind!r}/{pre!r} is not supported; supported: "
                          f"'gpt2' BPE with pre-tokenizer {sorted(_PRE_TOKENIZERS)}")
  tokens = list(required("tokens"))
  types = list(required("token_type"))
  merges = [tuple(m.split(" ", 1)) for m in required("merges")]
  vocab = {token: i for i, token in enumerate(tokens)}
  bpe = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  bpe.pre_tokenizer = _PRE_TOKENIZERS[pre]()
  bpe.decoder = decoders.ByteLevel()
  bpe.add_special_tokens([t for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)])

  def special(key: str) -> str | None:
    token_id = fields.get(f"tokenizer.ggml.{key}_token_id")
    return None if token_id is None else tokens[int(token_id)]

  template = fields.get("tokenizer.chat_template")
  return _transformers().PreTrainedTokenizerFast(
      tokenizer_object=bpe,
      bos_token=special("bos"), eos_token=special("eos"), unk_token=special("unknown"),
      pad_token=special("padding"),
      chat_template=template)


def load_tokenizer(source: str | pathlib.Path) -> PreTrainedTokenizerFast:
  """A tokenizer from a `.gguf` file or an HF directory holding `tokenizer.json`."""
  source = pathlib.Path(source)
  if source.suffix == ".gguf":
    return tokenizer_from_gguf(source)
  if not (source / "tokenizer.json").exists():
    raise CheckpointError(f"no tokenizer.json in {source}")
  try:
    return _transformers().AutoTokenizer.from_pretrained(source)
  except Exception as error:  # whatever transformers raises for the files it reads
    message = " ".join(str(error).split()) or "(no message)"
    raise CheckpointError(f"cannot load the tokenizer in {source} (tokenizer.json, "
                          f"tokenizer_config.json, config.json): {type(error).__name__}: "
                          f"{message}") from error


def encode_chat(tokenizer, conversations: Sequence[str | Sequence[dict[str, str]]]
                ) -> list[list[int]]:
  """Token ids of each conversation, ready for the assistant's reply: a string is one
  user turn, else a list of {"role", "content"} messages.

  Base models without a chat template get the plain text (messages joined by lines).
  """
  encoded = []
  for conversation in conversations:
    messages = ([{"role": "user", "content": conversation}] if isinstance(conversation, str)
                else list(conversation))
    if tokenizer.chat_template:
      text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
      encoded.append(tokenizer.encode(text, add_special_tokens=False))
    else:
      encoded.append(tokenizer.encode("\n".join(m["content"] for m in messages)))
  return encoded


def _transformers() -> ModuleType:
  """transformers, imported on first use: it (and torch, where installed) takes seconds
  to import, which every process that never tokenizes would pay (error exits, synthetic
  runs). Only its tokenizers are used, which need no torch; without torch its import
  would advise that its models are unavailable, so the advice is off while it imports
  (the variable is read then), and as it was afterwards."""
  previous = os.environ.get(_NO_ADVICE)
  os.environ[_NO_ADVICE] = "1"
  try:
    import transformers  # pylint: disable=import-outside-toplevel
  finally:
    if previous is None:
      del os.environ[_NO_ADVICE]
    else:
      os.environ[_NO_ADVICE] = previous
  return transformers

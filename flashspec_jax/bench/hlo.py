"""Reading compiled programs: which buffers XLA copies, and what the entry computation
runs."""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp

_COPY = re.compile(r"= (\w+\[[\d,]*\])\S* copy(?:-start)?\(")
# Instructions that only name or regroup values: no kernel runs for them.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?[\w.\-]+ = (?:\(.*?\)|\S+) ([\w\-]+)\(")


def hlo_shape(x: jax.Array) -> str:
  """The array's shape as HLO text writes it, e.g. bf16[2,8,64,256]."""
  name = jnp.dtype(x.dtype).name
  for numpy_prefix, hlo_prefix in (("bfloat", "bf"), ("float", "f"), ("uint", "u"),
                                   ("int", "s"), ("bool", "pred")):
    if name.startswith(numpy_prefix):
      name = hlo_prefix + name[len(numpy_prefix):]
      break
  return f"{name}[{','.join(map(str, x.shape))}]"


def cache_shapes(state) -> set[str]:
  """HLO shapes of the KV-cache buffers in an engine state: the target's and every model
  drafter's (n-gram and AR arms have none)."""
  caches = [state.target_cache, *[d for d in state.drafter_states if d != ()]]
  return {hlo_shape(leaf) for cache in caches for leaf in jax.tree.leaves(cache)
          if leaf.ndim == 4}


def buffer_copies(hlo_text: str, shapes: set[str]) -> list[str]:
  """Copies of buffers of the given shapes made inside loops or branches of an optimized
  program, i.e. at every step. Copies inside fusions are layout changes of values in
  registers, and those in the entry computation happen once per call, so neither counts."""
  return [line.strip()
          for name, lines in computations(hlo_text).items()
          if name != "ENTRY" and "fused" not in name
          for line in lines if (match := _COPY.search(line)) and match.group(1) in shapes]


def _opcodes(lines) -> collections.Counter:
  """The opcodes of a computation's instruction lines that launch work, counted."""
  opcodes = collections.Counter()
  for line in lines:
    match = _INSTRUCTION.match(line)
    if match and match.group(1) not in _NO_KERNEL:
      opcodes[match.group(1)] += 1
  return opcodes


def entry_opcodes(hlo_text: str) -> collections.Counter:
  """Opcodes of the optimized program's entry computation, counted; nested computations
  (fusion bodies, loop bodies) are not entered."""
  return _opcodes(computations(hlo_text)["ENTRY"])


def computations(hlo_text: str) -> dict[str, list[str]]:
  """Each computation's instruction lines by name; the entry computation's as "ENTRY"."""
  found, lines = {}, None
  for line in hlo_text.splitlines():
    if line.startswith("}"):
      lines = None
    elif line and not line.startswith(" ") and line.rstrip().endswith("{"):
      words = line.split()
      lines = found.setdefault("ENTRY" if words[0] == "ENTRY" else words[0].lstrip("%"), [])
    elif lines is not None:
      lines.append(line)
  return found


def loop_bodies(hlo_text: str) -> dict[str, tuple[collections.Counter, collections.Counter]]:
  """Per while loop of an optimized program, by its body's name: the body's opcodes and
  the shapes it copies, each counted; what runs inside a fusion, call or nested loop
  counts as that one instruction."""
  every = computations(hlo_text)
  bodies = re.findall(r"\bbody=%?([\w.\-]+)", hlo_text)
  return {body: (_opcodes(every[body]),
                 collections.Counter(m.group(1) for m in map(_COPY.search, every[body]) if m))
          for body in dict.fromkeys(bodies)}

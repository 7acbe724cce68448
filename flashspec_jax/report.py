"""Writes the README's results section and results/README.md from the files in results/.

  python -m flashspec_jax.report          # rewrite both
  python -m flashspec_jax.report --check  # fail if either is out of date (CI)

No number in the README is typed by hand: each table below is rendered from
the newest results file of its experiment, which it names. Only the files git
tracks (staged ones too) count, where results/ is in a git checkout: a run of
one's own written into results/ (`make run`'s) changes neither page until its
file is added, and `--check` still holds after it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import re
import statistics
import subprocess
import sys
from collections.abc import Callable

from flashspec_jax import results, streams
from flashspec_jax.environment import REPO

RESULTS = REPO / "results"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"


def load(path: pathlib.Path) -> dict:
  """A results file's contents, parsed once per process and version of the file: the
  sections read many of the same files, some of them near a megabyte."""
  return _parsed(path, path.stat().st_mtime_ns)


@functools.cache
def _parsed(path: pathlib.Path, mtime_ns: int) -> dict:
  del mtime_ns  # part of the cache's key only
  return json.loads(path.read_text())


def results_files(pattern: str) -> list[pathlib.Path]:
  """RESULTS' files matching the glob pattern that the report renders from, sorted."""
  tracked = _tracked(RESULTS)
  return sorted(path for path in RESULTS.glob(pattern) if tracked is None or path in tracked)


@functools.cache
def _tracked(folder: pathlib.Path) -> frozenset[pathlib.Path] | None:
  """The files under folder that git tracks or has staged; None where folder is not in
  a git checkout (a copy of the tree without .git, a test's folder): every file."""
  try:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=folder, capture_output=True,
                            text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return None
  return frozenset(folder / name for name in listed.split("\0") if name)


def newest(name: str, device: str = "",
           select: Callable[[dict], bool] = lambda data: True) -> tuple[pathlib.Path, dict] | None:
  """The newest results file of experiment `name` whose device starts with `device` and
  whose contents `select` accepts."""
  loaded = [(f, load(f)) for f in results_files(f"{name}/*.json")]
  loaded = [item for item in loaded
            if item[1]["environment"]["device"].startswith(device) and select(item[1])]
  if not loaded:
    return None
  return max(loaded, key=lambda item: recency(*item))


def recency(path: pathlib.Path, data: dict) -> tuple[str, int]:
  """Orders results files oldest first: by the time their run started, then by the
  -2, -3, ... suffix of runs that started in the same second. Names alone would not
  do: 2026-11-29T...Z_<sha> sorts before the older 2026-11-29_<sha>."""
  suffix = re.search(r"-(\d+)$", path.stem)
  return data["environment"]["date"], int(suffix[1]) if suffix else 1


def command(env: dict) -> str:
  """The command as it ran, with XLA_FLAGS in front where the run had any (files from
  before 2026-12-06 do not record them)."""
  flags = env.get("xla_flags")
  return f"XLA_FLAGS='{flags}' {env['command']}" if flags else env["command"]


def provenance(path: pathlib.Path, data: dict) -> str:
  env = data["environment"]
  dirty = ", uncommitted changes present" if env["git_dirty"] else ""
  # Not f"{path.stem}*.png", which would take the figures of <stem>-2 as well.
  figures = sorted([*path.parent.glob(f"{path.stem}.png"),
                    *path.parent.glob(f"{path.stem}_*.png")])
  plots = "".join(f" Figure: [`{f.name}`]({f.relative_to(REPO)})." for f in figures)
  return (f"Source: [`{path.relative_to(REPO)}`]({path.relative_to(REPO)}), written by "
          f"`{command(env)}` at `{env['git_sha'][:8]}`{dirty} on {env['device']}, "
          f"jax {env['jax']}, {env['date']}.{plots}")


def ar_decode(data: dict) -> list[str]:
  bw = data["copy_bandwidth"]
  lines = [f"Llama-3-8B shape, synthetic bf16 weights. Floor = (weights + KV cache bytes) / "
           f"copy bandwidth measured in the same run ({bw['bytes_per_second'] / 1e12:.2f} TB/s, "
           f"{bw['method']}).", "",
           "| batch | context | step (ms) | floor (ms) | step / floor |", "|---|---|---|---|---|"]
  for r in data["rows"]:
    lines.append(f"| {r['batch']} | {r['context']} | {r['step_ms']:.3f} | {r['floor_ms']:.3f} | "
                 f"{r['ratio_to_floor']:.2f} |")
  return lines


def spec_step(data: dict) -> list[str]:
  impls = [k.removeprefix("step_ms_") for k in data["rows"][0] if k.startswith("step_ms_")]
  # Files from before the bench reported the step against one target forward lack it.
  against_target = "step_vs_target_forward_" + impls[0] in data["rows"][0]
  columns = "step, {} verify (ms) | overhead" + (" | vs target fwd" if against_target else "")
  # Files from before the bench timed restricted feature drafters lack their vocabulary.
  by_vocabulary = "draft_vocabulary" in data["rows"][0]
  lines = [f"{data['target']} target, {data['drafter']} drafter, synthetic bf16 weights, "
           f"gamma {data['rows'][0]['gamma']}, context {data['rows'][0]['context']}. Parts = one "
           f"target forward of gamma + 1 tokens + gamma drafter steps, each timed alone.", "",
           "| " + ("drafted from (tokens) | " if by_vocabulary else "")
           + "batch | target fwd (ms) | drafter step (ms) | parts (ms) | "
           + " | ".join(columns.format(i) for i in impls) + " |",
           "|---|---|---|---|" + "---|" * by_vocabulary
           + ("---|" * columns.count("|") + "---|") * len(impls)]
  for r in data["rows"]:
    cells = [f"{r['step_ms_' + i]:.3f} | {r['overhead_' + i]:+.1%}"
             + (f" | {r['step_vs_target_forward_' + i]:.2f}x" if against_target else "")
             for i in impls]
    lines.append("| " + (f"{r['draft_vocabulary']:,} | " if by_vocabulary else "")
                 + f"{r['batch']} | {r['target_forward_ms']:.3f} | {r['drafter_step_ms']:.3f} | "
                 f"{r['parts_ms']:.3f} | " + " | ".join(cells) + " |")
  return lines


def verify_kernel(data: dict) -> list[str]:
  bw = data["copy_bandwidth"]["bytes_per_second"] / 1e12
  lines = [f"Per call, back to back, inputs rotated past L2. Floor = bytes the kernel must move / "
           f"copy bandwidth measured in the same run ({bw:.2f} TB/s). Tiling: "
           f"{data['tiling']}.", "",
           "| B | gamma | V | jnp reference (us) | Pallas (us) | speedup | floor (us) | Pallas / floor |",
           "|---|---|---|---|---|---|---|---|"]
  for r in data["rows"]:
    lines.append(f"| {r['batch']} | {r['gamma']} | {r['vocab']} | {r['reference_us']:.2f} | "
                 f"{r['pallas_us']:.2f} | {r['speedup']:.2f}x | {r['floor_us']:.2f} | "
                 f"{r['pallas_to_floor']:.1f} |")
  return lines


def method_table(data: dict) -> list[str]:
  config = data["config"]
  weights = "synthetic weights" if data["synthetic_weights"] else f"weights: `{pathlib.Path(data['weights']).name}`"
  lines = [f"{config['target']}, {weights}, temperature {config['sampling']['temperature']}, "
           f"gamma {config['sampling']['gamma']}, {config['sampling']['max_new_tokens']} new tokens, "
           f"prompts: {config['prompts']['sets']} x {config['prompts']['num_per_set']}, batch "
           f"{config['batch_size']}.", "",
           "| method | tok/s | alpha | tau | step p50 (ms) | vs AR |", "|---|---|---|---|---|---|"]
  base = data["summaries"].get("ar", {}).get("tokens_per_second")
  for name, s in data["summaries"].items():
    alpha = f"{s['alpha']:.3f}" if "alpha" in s else "-"
    tau = f"{s['tau']:.2f}" if "tau" in s else "-"
    speedup = f"{s['tokens_per_second'] / base:.2f}x" if base else "-"
    lines.append(f"| {name} | {s['tokens_per_second']:.1f} | {alpha} | {tau} | "
                 f"{s['step_ms_p50']:.1f} | {speedup} |")
  return lines


def _by_method_and_set(data: dict):
  """(method, prompt set, its records) for each method of the run and each set it ran."""
  kinds = dict.fromkeys(r["kind"] for r in data["records"])
  for name in data["summaries"]:
    for kind in kinds:
      rows = [r for r in data["records"] if r["method"] == name and r["kind"] == kind]
      if rows:
        yield name, kind, rows


def by_prompt_set(data: dict) -> list[str]:
  """method_table, then each method per prompt set, with its speedup against AR's on
  the same prompts."""
  lines = method_table(data) + ["", "Per prompt set:", "",
                                "| method | set | tok/s | vs AR | alpha | tau |",
                                "|---|---|---|---|---|---|"]
  batch_size = data["config"]["batch_size"]

  def rate(rows):
    # Each row's share of its batch's time (rows of full batches share it evenly).
    seconds = sum(r["batch_seconds"] / r.get("batch_rows", batch_size) for r in rows)
    return sum(r["new_tokens"] for r in rows) / seconds

  groups = list(_by_method_and_set(data))
  rates = [rate(rows) for _, _, rows in groups]
  base = {kind: r for (name, kind, _), r in zip(groups, rates) if name == "ar"}
  for (name, kind, rows), tokens_per_second in zip(groups, rates):
    speedup = f"{tokens_per_second / base[kind]:.2f}x" if kind in base else "-"
    alpha = tau = "-"
    if "accepted" in rows[0]:
      totals = {k: sum(r[k] for r in rows) for k in ("steps", "tested", "accepted", "emitted")}
      alpha, tau = f"{totals['accepted'] / totals['tested']:.3f}", \
          f"{totals['emitted'] / totals['steps']:.2f}"
    lines.append(f"| {name} | {kind} | {tokens_per_second:.1f} | {speedup} | {alpha} | {tau} |")
  return lines


def batch_steps(data: dict) -> list[str]:
  """by_prompt_set, then where a batch's steps went: a batch steps until its slowest row
  is done, so rows that finish sooner wait, and each loop step costs what it costs."""
  lines = by_prompt_set(data) + [
      "", "Steps of the batches (a batch steps until its last row is done):", "",
      "| method | set | loop steps | a row's mean steps | loop / mean | ms per loop step |",
      "|---|---|---|---|---|---|"]
  for name, kind, rows in _by_method_and_set(data):
    # A batch's rows are consecutive records sharing its loop steps and seconds; the
    # first batches are full, the last may not be.
    width = rows[0].get("batch_rows", data["config"]["batch_size"])
    batches = [rows[i:i + width] for i in range(0, len(rows), width)]
    loop_steps = sum(batch[0]["loop_steps"] for batch in batches)
    ms = 1e3 * sum(batch[0]["batch_seconds"] for batch in batches) / loop_steps
    mean = ratio = "-"  # AR's records hold no steps of their own
    if "steps" in rows[0]:
      row_steps = sum(statistics.mean(r["steps"] for r in batch) for batch in batches)
      mean, ratio = f"{row_steps:.1f}", f"{loop_steps / row_steps:.2f}"
    lines.append(f"| {name} | {kind} | {loop_steps} | {mean} | {ratio} | {ms:.2f} |")
  return lines


def choosers(data: dict) -> list[str]:
  """by_prompt_set, then each chooser against the best fixed arms and the per-set oracle."""
  lines = by_prompt_set(data)
  rows = {name: s["stream"] for name, s in data["summaries"].items() if "stream" in s}
  if not rows:
    return lines
  kinds = list(next(iter(rows.values()))["by_set"])
  lines += ["", "Choosers against the best fixed arm over the stream, per set and the per-set "
            "oracle; steps off each set's best arm; steps to settle on it after each change "
            "of set (a run of 5 picks; - if never).", "",
            "| chooser | vs best fixed | " + " | ".join(f"vs best on {k}" for k in kinds)
            + " | vs oracle | off-best steps | settle steps |",
            "|---|---|" + "---|" * len(kinds) + "---|---|---|"]
  for name, stream in rows.items():
    settle = ", ".join("-" if n is None else str(n) for n in stream["settle_steps"] or [])
    lines.append(f"| {name} | {data['summaries'][name]['vs_best_fixed']:.2f}x | "
                 + " | ".join(f"{stream['by_set'][k]['vs_best_fixed']:.2f}x "
                              f"({stream['by_set'][k]['best_fixed']})" for k in kinds)
                 + f" | {stream['vs_oracle']:.2f}x | {stream['off_best_share']:.0%} | "
                 f"{settle or '-'} |")
  return lines


def numerics(data: dict) -> list[str]:
  weights = "SmolLM2's real" if data["weights"] == "real" else "synthetic"
  lines = [f"{data['model']} shape, {weights} weights in {data['dtype']}: the logits of "
           f"{data['positions']} positions after a {data['prompt']}-token prompt, computed by "
           f"one-token decode steps and by verify passes of {data['gamma'] + 1} tokens, each "
           f"against the model in f32, and against each other.", "",
           "| path | largest abs error | median abs error | argmax flips |", "|---|---|---|---|"]
  for name, label in (("decode", "decode steps vs f32"), ("verify", "verify passes vs f32"),
                      ("decode_vs_verify", "decode steps vs verify passes")):
    e = data[name]
    lines.append(f"| {label} | {e['max_abs_error']:.3f} | {e['median_abs_error']:.3f} | "
                 f"{e['argmax_flips']:.1%} |")
  return lines


def ngram_contexts(data: dict) -> list[str]:
  lines = [f"{data['model']} answers {data['num_per_set']} held-out prompts per set greedily "
           f"({data['max_new_tokens']} tokens, real weights in {data['dtype']}). At every "
           f"position of an answer, n-gram lookup (max_n {data['max_n']}) drafts {data['gamma']} "
           f"tokens from the text before it; its context there is the length of the match it "
           f"follows (0: none, when it repeats the last token). Tokens per step: drafts the "
           f"answer confirms, plus one.", "",
           "| set | context | share of positions | tokens per step | first draft confirmed |",
           "|---|---|---|---|---|"]
  return lines + _context_rows(data["by_set"], extra="first_confirmed")


def _context_rows(by_set: dict, extra: str | None = None) -> list[str]:
  """Per set, a row for each n-gram context and one for all: the share and tokens per
  step, and the cell's `extra` value where given (ngram_contexts, drafter_contexts)."""
  rows = []
  for kind, row in by_set.items():
    for context, cell in row["contexts"].items():
      rows.append(f"| {kind} | {context} | {cell['share']:.2f} | {cell['mean_tokens']:.2f} |"
                  + (f" {cell[extra]:.2f} |" if extra else ""))
    rows.append(f"| {kind} | all | 1.00 | {row['mean_tokens']:.2f} |" + (" |" if extra else ""))
  return rows


def drafter_contexts(data: dict) -> list[str]:
  lines = [f"{data['model']} answers {data['num_per_set']} held-out prompts per set with "
           f"{data['arm']} at temperature {data['temperature']} ({data['max_new_tokens']} tokens, "
           f"real weights in {data['dtype']}). Each step is counted in n-gram lookup's context "
           f"(max_n {data['max_n']}) on the tokens committed when it began: the length of the "
           f"match lookup would follow (0: none).", "",
           "| set | context | share of steps | tokens per step |", "|---|---|---|---|"]
  return lines + _context_rows(data["by_set"])


def teacher_forced(data: dict) -> list[str]:
  chat = ("" if _first_chat_turns(data)
          else " (chat: later user turns of held-out conversations, each alone as a prompt)")
  lines = [f"{data['model']} answers {data['num_per_set']} held-out prompts per set{chat} "
           f"greedily with {data['arm']} (gamma {data['gamma']}, {data['max_new_tokens']} "
           f"tokens, real weights in {data['dtype']}); each answer is then scored whole as "
           f"training scores its validation answers (acceptance of draft position k: the whole "
           f"chain before it accepted too, over every start position), and the engine's steps "
           f"are replayed on those scores.", "",
           "| set | answers | engine tau | replayed tau | answers whose steps all match | "
           "tau, every start | acceptance per draft position |", "|---|---|---|---|---|---|---|"]
  for kind, v in data["by_set"].items():
    accept = ", ".join(f"{a:.2f}" for a in v["acceptance"])
    lines.append(f"| {kind} | {v['sequences']} | {v['engine_tau']:.2f} | {v['replayed_tau']:.2f} "
                 f"| {v['same_steps']} | {v['tau_every_start']:.2f} | {accept} |")
  return lines


def drafter_training(data: dict) -> list[str]:
  t, sequences, curve = data["config"]["train"], data["sequences"], data["curve"]
  answers_per_prompt = 1 + t.get("sampled_answers", 0)
  prompts = (sequences["train"] + sequences["validation"]) // answers_per_prompt
  lines = [f"{data['config']['target']} answers {prompts} "
           f"tune-split prompts ({data['config']['prompts']['sets']}, up to "
           f"{t['answer_tokens']} tokens, temperature {t['answer_temperature']}"
           + (f", and {t['sampled_answers']} more each at temperature 1"
              if t.get("sampled_answers") else "") + ") "
           + ("in an earlier run" if data.get("sequences_kept")
              else f"in {data['seconds']['generate']:.0f} s")
           + f"; {data['steps']} steps of batch "
           f"{t['batch_size']} with {t['rollout_steps']}-step rollouts in "
           f"{data['seconds']['train']:.0f} s"
           + (" (stopped by train.max_seconds)" if data["stopped_early"] else "")
           + f"; loss {curve[0]['loss']:.3f} at step {curve[0]['step']}, "
           f"{curve[-1]['loss']:.3f} at step {curve[-1]['step']}. Validation: "
           f"{sequences['validation']} held-back answers "
           # Runs before the split took whole conversations do not name it.
           f"({data.get('validation_split', 'rows drawn one by one')}); acceptance of draft "
           f"position k is greedy, with the whole chain before it accepted.", "",
           "| set | sequences | loss | greedy tau | acceptance per draft position |",
           "|---|---|---|---|---|"]
  for kind, v in data["validation"].items():
    accept = ", ".join(f"{a:.2f}" for a in v["step_acceptance"])
    lines.append(f"| {kind} | {v['sequences']} | {sum(v['step_loss']) / len(v['step_loss']):.3f} "
                 f"| {v['greedy_tau']:.2f} | {accept} |")
  return lines


def regret(data: dict) -> list[str]:
  sim = data["config"]["simulation"]
  switching = bool(sim["means_after"])
  lines = [f"Bernoulli arms with means [{sim['means']}]"
           + (f", changing to [{sim['means_after']}] at pull {sim['switch_at']}" if switching
              else "")
           + f"; T = {sim['horizon']}, {sim['seeds']} seeds; pseudo-regret at T, mean and "
           f"standard deviation over seeds.", ""]
  if switching:
    lines += ["| strategy | regret at T | recovery (pulls after the switch) | seeds recovered |",
              "|---|---|---|---|"]
  else:
    lines += ["| strategy | regret at T |", "|---|---|"]
  for name, s in data["summaries"].items():
    row = f"| {name} | {s['regret_mean']:.1f} ± {s['regret_std']:.1f} |"
    if switching:
      recovery = s["recovery_steps_mean"]
      row += (f" {recovery:.0f} |" if recovery is not None else " never |")
      row += f" {s['recovered_seeds']}/{sim['seeds']} |"
    lines.append(row)
  if data.get("ucb1_bound"):
    lines += ["", f"UCB1 bound (Auer et al. 2002, Theorem 1) at T: {data['ucb1_bound']:.1f}."]
  return lines


def bandit_run(data: dict) -> list[str]:
  lines = method_table(data)
  costs = data.get("arm_costs") or {}
  if costs:
    lines += ["", "Arm costs timed at start-up (s per step): "
              + ", ".join(f"`{name}` {cost:.4f}" for name, cost in costs.items()) + "."]
  for name, s in data["summaries"].items():
    if "arm_shares" not in s:
      continue
    kinds = [k for k in s["arm_shares"] if k != "all"] + ["all"]
    arms = list(s["arm_shares"]["all"])
    lines += ["", f"`{name}`: share of steps per arm, by segment of the stream"
              + (f"; {s['vs_best_fixed']:.2f}x the best fixed arm in hindsight "
                 f"(`{s['best_fixed']}`)" if "vs_best_fixed" in s else "") + ".", "",
              "| arm | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for arm in arms:
      lines.append(f"| {arm} | " + " | ".join(f"{s['arm_shares'][k][arm]:.2f}" for k in kinds)
                   + " |")
  return lines


def idle_arms(data: dict) -> list[str]:
  lines = [f"{data['target']} shape, synthetic {data['dtype']} weights, batch {data['batch']}, "
           f"gamma {data['gamma']}; a greedy bandit holds the first arm (layer-skip), chosen at "
           f"run time, and the other layer-skip arms are never selected.", "",
           "| idle model arms | step (ms) | vs none |", "|---|---|---|"]
  for r in data["rows"]:
    lines.append(f"| {r['idle_arms']} | {r['step_ms']:.3f} | {r['relative_to_no_idle']:.3f} |")
  return lines


def carried_state(data: dict) -> list[str]:
  lines = [f"{data['target']} shape, synthetic {data['dtype']} weights, batch 1, prompt "
           f"{data['context']} tokens, {data['new_tokens']} new tokens, temperature 1, the "
           f"arms {', '.join(data['arms'])}. KL-UCB is held on the feature drafter, and each "
           f"of its calls is handed the state the last returned; the three programs take "
           f"turns call by call, {data['calls']} timed each.", "",
           "| program | steps | call (ms, median) | 10th-90th percentile (ms) | vs fixed (ms) |",
           "|---|---|---|---|---|"]
  for r in data["rows"]:
    deciles = statistics.quantiles([t * 1e3 for t in r["times"]], n=10)
    low, high = deciles[0], deciles[-1]
    lines.append(f"| {r['program']} | {r['steps']} | {r['call_ms']:.2f} | {low:.2f}-{high:.2f} | "
                 f"{r['vs_fixed_ms']:+.2f} |")
  return lines


def bandit_call(data: dict) -> list[str]:
  lines = [f"{data['target']} shape, synthetic {data['dtype']} weights, batch {data['batch']}, "
           f"gamma {data['gamma']}, prompt {data['context']} tokens, "
           f"{data.get('sampler', 'temperature')} sampling. "
           + ("Cycle programs pull their two arms in turn (bandit.Cycle); vs its arms alone: "
              "against the two arms' fixed programs' steps, weighted by the steps each arm "
              "took. " if _has_cycle(data) else
              f"A {data.get('strategy', 'greedy')} bandit holds the n-gram arm, chosen at run "
              "time. ")
           + f"Calls of "
           f"{' and '.join(map(str, data['new_tokens']))} new tokens split the time into a part "
           f"per loop step and a part per call.", "",
           "| program | per step (ms) | vs fixed | vs its arms alone | per call (ms) | "
           "cache copies in the loop |", "|---|---|---|---|---|---|"]
  for p in data["programs"]:
    alone = f"{p['step_vs_arms_alone']:.3f}" if "step_vs_arms_alone" in p else ""
    lines.append(f"| {p['program']} | {p['ms_per_step']:.3f} | {p['step_vs_fixed']:.3f} | "
                 f"{alone} | {p['ms_per_call']:.2f} | {p['cache_copies_in_loop']} |")
  return lines


def compile_time(data: dict) -> list[str]:
  lines = [f"{data['target']} shape, synthetic {data['dtype']} weights, batch {data['batch']}, "
           f"a {data['prompt_length']}-token prompt (bucket {data['prompt_bucket']}), "
           f"{data['max_new_tokens']} new tokens, drafts unrolled: {data['unrolled_drafts']}. "
           f"Cold: compiled in a fresh persistent cache. Cached: a second process sharing the "
           f"cache, its whole first call (tracing unless the program store held the program, "
           f"loading it, generating).", "",
           "| program | XLA options | cold compile (s) | cached: load (s) | cached: first call (s) "
           "| of which generating (s) | compiled again | untraced | same tokens |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in data["rows"]:
    lowering = f" ({r['cold_lower_seconds']:.2f} lowering)" if "cold_lower_seconds" in r else ""
    untraced, same = ({True: "yes", False: "no"}.get(r.get(field), "(not recorded)")
                      for field in ("cached_untraced", "cached_same_tokens"))
    lines.append(f"| {r['method']} | {r['variant']} | {r['cold_compile_seconds']:.2f}{lowering} | "
                 f"{r['cached_load_seconds']:.2f} | {r['cached_call_seconds']:.2f} | "
                 f"{r['cached_run_seconds']:.3f} | {r['compiles_with_warm_cache']} | {untraced} | {same} |")
  return lines


# Spans named per call in the compile profile's table.
PROFILE_SPANS = 8


def compile_profile(data: dict) -> list[str]:
  """The host's own seconds by span name, per program, its cold compile beside its load
  from the disk cache, each under the profiler (so slower than compile_time's)."""
  lines = [f"{data['target']} shape, synthetic {data['dtype']} weights, as in the compile-time "
           f"table, each compile or load under JAX's profiler (slower than unprofiled). Per "
           f"program, the host's spans by their own time (open, waiting included, less their "
           f"children's on the same thread), summed over threads: thread-seconds, not wall "
           f"seconds; the {PROFILE_SPANS} largest of each.", "",
           "| program | call | wall (s) | host threads | span: own seconds |", "|---|---|---|---|---|"]
  for r in data["rows"]:
    for call, wall in (("cold", r["cold_compile_seconds"]), ("cached", r["cached_load_seconds"])):
      profile = r[f"{call}_host_profile"]
      spans = ", ".join(f"`{name}` {seconds:.2f}" for name, seconds
                        in list(profile["self_seconds"].items())[:PROFILE_SPANS])
      lines.append(f"| {r['method']} | {call} | {wall:.2f} | {profile['threads']} | {spans} |")
  return lines


def sweep(data: dict) -> list[str]:
  field = data["sweep_field"]
  methods = list(data["points"][0]["summaries"])
  lines = [f"Sweep over `{field}`; tok/s (alpha) per method.", "",
           f"| {field} | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
  for point in data["points"]:
    cells = []
    for name in methods:
      s = point["summaries"][name]
      alpha = f" ({s['alpha']:.2f})" if "alpha" in s else ""
      cells.append(f"{s['tokens_per_second']:.1f}{alpha}")
    lines.append(f"| {point['value']} | " + " | ".join(cells) + " |")
  return lines


def _share(summary: dict, key: str) -> str:
  return f"{summary[key]:.0%}" if key in summary else "-"


def deterministic(data: dict) -> list[str]:
  """Each method with the mode off and on: tok/s, their ratio, replies equal to AR's."""
  off, on = (next(p["summaries"] for p in data["points"] if p["value"] is v)
             for v in (False, True))
  c = data["config"]
  # "auto" is bf16 on a GPU and f32 elsewhere (pipeline.param_dtype).
  dtype = c["dtype"] if c["dtype"] != "auto" else (
      "bfloat16" if _on_gpu(data) else "float32")
  lines = [f"{c['target']} in {dtype}, batch {c['batch_size']}, greedy, gamma "
           f"{c['sampling']['gamma']}, "
           f"{c['sampling']['max_new_tokens']} new tokens, {c['prompts']['num_per_set']} held-out "
           f"prompts per set ({c['prompts']['sets']}), the mode off and on in one run. "
           "= AR: the share of replies whose text is AR's.", "",
           "| method | tok/s off | tok/s on | on / off | = AR off | = AR on |",
           "|---|---|---|---|---|---|"]
  for name in off:
    a, b = off[name], on[name]
    lines.append(f"| {name} | {a['tokens_per_second']:.1f} | {b['tokens_per_second']:.1f} | "
                 f"{b['tokens_per_second'] / a['tokens_per_second']:.2f} | "
                 f"{_share(a, 'same_as_ar')} | {_share(b, 'same_as_ar')} |")
  return lines


def _stream_run(run: dict) -> str:
  """A stream run of bench/chooser_steps.py's results, by device, sampling, order and file."""
  return (f"{run['device']}, T={run['temperature']:g}, {run['order']} "
          f"({pathlib.Path(run['run']).stem})")


def stream_goals(data: dict) -> list[str]:
  """Per recorded stream run, the chooser that met most of issue 14's goals; then per
  chooser, the runs of each kind in which it met all four."""
  goals = data["goals"]
  lines = [f"Read from recorded stream runs. A chooser's goals: at least "
           f"{goals['vs_best_fixed']:.2f}x the best fixed arm over the stream, at least "
           f"{goals['worst_set_vs_best']:.2f}x each set's best fixed arm (its worst set "
           f"shown), at least {goals['vs_oracle']:.2f}x the per-set oracle, and at least "
           f"{goals['worst_set_vs_ar']:.2f}x AR on every set (its worst set shown). Each row "
           "names the chooser that met the most goals in that run, the fastest of them "
           "where several tie (ratios to three places, so that a miss by a hair shows); "
           "the second table counts, per kind of run (device, temperature, options; a "
           "kind may span commits), the runs in which each chooser met all four, of "
           "those it ran in.", "",
           "| run | T | order | seed | options | chooser | vs best fixed | worst set vs its "
           "best | vs oracle | worst set vs AR | goals met |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for run in data["runs"]:
    name = run["best_chooser"]
    c = run["choosers"][name]
    lines.append(f"| {run['device']} ({pathlib.Path(run['run']).stem}) | "
                 f"{run['temperature']:g} | {run['order']} | {run['seed']} | "
                 f"{run['options']} | {name} | {c['vs_best_fixed']:.3f}x | "
                 f"{c['worst_set_vs_best']:.3f}x ({c['worst_set']}) | {c['vs_oracle']:.3f}x | "
                 f"{c['worst_set_vs_ar']:.3f}x ({c['worst_ar_set']}) | "
                 f"{sum(c['met'].values())}/4 |")
  names = list(dict.fromkeys(n for group in data["tally"] for n in group["all_met"]))
  lines += ["", "Runs in which each chooser met all four goals, of the runs it ran in:", "",
            "| device | T | options | " + " | ".join(names) + " |",
            "|---|---|---|" + "---|" * len(names)]
  for group in data["tally"]:
    lines.append(f"| {group['device']} | {group['temperature']:g} | {group['options']} | "
                 + " | ".join(f"{group['all_met'][n]}/{group['ran'][n]}"
                              if n in group["all_met"] else "-" for n in names) + " |")
  return lines


def chooser_steps(data: dict) -> list[str]:
  """Per recorded stream run: first calls against later ones, and steps against the
  calibrated cost of the arms they ran."""
  lines = ["Read from recorded stream runs. Later calls leave out each method's first call; "
           "mix: a step of the chooser's later arm shares at the run's calibrated arm costs; "
           "at mix: its speed against the best fixed arm had each step cost that mix plus "
           "the per-call share the fixed arm pays beyond its calibrated cost. Call excess: "
           "each later call's time beyond the calibrated cost of the steps it ran, median / "
           "90th percentile / max. By set: against each set's best fixed arm, had each call "
           "cost its steps' calibrated costs plus the best fixed arm's median call excess "
           "(at mix) or the chooser's own median (at own median). Held calls: the "
           "chooser's later calls that ran one arm at every step and match, step for "
           "step, that arm's fixed call on the same prompt; the median milliseconds each "
           "took beyond that call (the chooser's program, its choices taken out), and "
           "how many. Body changes: the chooser's steps whose step body differs from "
           "the step before's, per step.",
           "", "| run | method | first call ms/step | later ms/step | mix ms/step | tau | "
           "vs best fixed | at mix | call excess ms | held calls: ms (calls) | "
           "by set: at mix / at own median | body changes |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for run in data["runs"]:
    name = _stream_run(run)
    lines.append(f"| {name} | {run['best_fixed']} (best fixed) | "
                 f"{run['best_fixed_first_call_ms_per_step']:.2f} | "
                 f"{run['best_fixed_ms_per_step']:.3f} | {run['best_fixed_calibrated_ms']:.3f} | "
                 f"{run['best_fixed_tau']:.2f} | 1.00 | | "
                 f"{_excess(run['best_fixed_call_excess_ms'])} | | | |")
    for c in run["choosers"]:
      lines.append(f"| {name} | {c['method']} | {c['first_call_ms_per_step']:.2f} | "
                   f"{c['ms_per_step']:.3f} | {c['calibrated_mix_ms']:.3f} | {c['tau']:.2f} | "
                   f"{c['vs_best_fixed']:.2f} | {c['estimated_vs_best_fixed']:.2f} | "
                   f"{_excess(c['call_excess_ms'])} | "
                   f"{streams.describe_held(c['held_call_overhead_ms'])} | "
                   + ", ".join(f"{kind} {ratio:.2f} / {c['at_own_median_by_set'][kind]:.2f}"
                               for kind, ratio in c["at_mix_by_set"].items())
                   + f" | {c['body_changes_per_step']:.2f} |")
  lines += ["", "What a change of step body and a step add to a chooser's call, by least "
            "squares over the choosers' later calls in each run (call excess against "
            "steps and changes of body, one intercept per chooser), with standard errors. "
            "On a GPU a change leaves one body's loop and enters another's, each a wait "
            "for the host. The last column fits the waits a change adds instead "
            "(`drafters.host_waits`: one loop predicate for each loop between the two "
            "bodies, more going back round than forward).", "",
            "| run | us per change of body | us per step | calls | us per wait for the host |",
            "|---|---|---|---|---|"]
  for run in data["runs"]:
    if fit := run["body_change_fit"]:
      waits = run.get("host_wait_fit")  # absent from files written before it was fitted
      lines.append(f"| {_stream_run(run)} | {1e3 * fit['ms_per_change']:.0f} +- "
                   f"{1e3 * fit['ms_per_change_se']:.0f} | {1e3 * fit['ms_per_step']:.0f} +- "
                   f"{1e3 * fit['ms_per_step_se']:.0f} | {fit['calls']} | "
                   + (f"{1e3 * waits['ms_per_wait']:.0f} +- {1e3 * waits['ms_per_wait_se']:.0f}"
                      if waits else "") + " |")
  return lines


def trace_calls(data: dict) -> list[str]:
  lines = ["Per loop step, median over each method's calls, read from a profiler trace "
           "(`bench/trace_calls.py`); the profiler slows every call, so wall and idle "
           "times are the traced run's, not a plain run's. Device-to-host copies are "
           "mostly the predicates of the loop's while loops, each a wait for the host; "
           "graphs are command-buffer (CUDA graph) launches; updates, where recorded, are "
           "the host's recordings of a command buffer again because its buffers moved.", "",
           "| method | calls | wall (us) | GPU busy (us) | idle (us) | kernels | "
           "device-to-host copies | graphs | updates (us) |", "|---|---|---|---|---|---|---|---|---|"]
  for name, m in data["methods"].items():
    # Files written before updates were counted lack them.
    updates = (f"{m['graph_updates']:.2f} ({m['graph_update_us']:.0f})"
               if "graph_updates" in m else "(not recorded)")
    lines.append(f"| {name} | {m['calls']} | {m['wall_us']:.0f} | {m['busy_us']:.0f} | "
                 f"{m['idle_us']:.0f} | {m['kernels']:.0f} | {m['device_to_host']:.2f} | "
                 f"{m['graph_launches']:.2f} | {updates} |")
  if "per_call" in data:
    lines += ["", "Per call, median over each method's calls: the GPU's first activity after "
              "the call began (lead) and the call's end after the GPU's last (tail).", "",
              "| method | wall (ms) | GPU busy (ms) | lead (us) | tail (us) |",
              "|---|---|---|---|---|"]
    for name, c in data["per_call"].items():
      lines.append(f"| {name} | {c['wall_us'] / 1e3:.1f} | {c['busy_us'] / 1e3:.1f} | "
                   f"{c['lead_us']:.0f} | {c['tail_us']:.0f} |")
  return lines


def _excess(excess: dict) -> str:
  return f"{excess['median']:.0f} / {excess['p90']:.0f} / {excess['max']:.0f}"


@dataclasses.dataclass(frozen=True)
class Section:
  """A README section: the newest file of `experiment` run on `device` (a prefix) that
  `select` accepts, drawn by `render`. An experiment with several sections, one per
  device or per variant, keeps them apart by device and select."""

  experiment: str
  device: str
  title: str
  render: Callable[[dict], list[str]]
  select: Callable[[dict], bool] = lambda data: True


def _plain_run(data: dict) -> bool:
  """A generation run at the experiment's own batch, greedy and unswept."""
  config = data["config"]
  return (not config["sweep"] and config["batch_size"] == 1
          and config["sampling"]["temperature"] == 0)


def _first_chat_turns(data: dict) -> bool:
  """A teacher_forced run whose chat prompts are records' first turns, as the
  experiments' held-out chat prompts are."""
  return data.get("chat_turns", "first") == "first"


def _against_layer_skip(data: dict) -> bool:
  """A run with the experiment's default methods, layer-skip among them, rather than a
  shorter one of a few methods on more prompts."""
  return any(m.startswith("layer_skip") for m in data["config"]["methods"].split(","))


def _at_temperature_1(data: dict) -> bool:
  """An unswept run sampling at temperature 1."""
  return data["config"]["sampling"]["temperature"] == 1 and not data["config"]["sweep"]


def _at_batch_8(data: dict) -> bool:
  """An unswept run at batch 8."""
  return data["config"]["batch_size"] == 8 and not data["config"]["sweep"]


def _swept_at(temperature: float) -> Callable[[dict], bool]:
  """A sweep sampling at this temperature."""
  return lambda data: ("sweep_field" in data
                       and data["config"]["sampling"]["temperature"] == temperature)


def _stream(temperature: float, order: str, request_carry: float = 1.0,
            deterministic: bool = False, priced_waits: bool = False,
            step_context: bool = False, fused: bool = False,
            drafter_gammas: bool = False) -> Callable[[dict], bool]:
  # Runs from before config.bandit.request_carry (wait_cost, step_context) carried all
  # evidence over (priced no wait for the host, learnt the drafter as one mean).
  return lambda data: (data["config"]["sampling"]["temperature"] == temperature
                       and results.fused_drafter(data) == fused
                       and bool(results.drafter_gammas(data)) == drafter_gammas
                       and _whole_stream(data)
                       and data["config"]["prompts"]["order"] == order
                       and data["config"]["bandit"].get("request_carry", 1.0) == request_carry
                       and data["config"].get("deterministic", False) == deterministic
                       and (data["config"]["bandit"].get("wait_cost", 0.0) > 0) == priced_waits
                       and data["config"]["bandit"].get("step_context", False) == step_context
                       and not _commits(data))


def _commits(data: dict) -> bool:
  """Whether the run's choosers could commit a request to one arm (config.bandit.commit)."""
  return bool(data["config"]["bandit"].get("commit", 0.0))


def _traced_held(data: dict) -> bool:
  """A trace of calls at batch 1 whose choosers never committed a request to one arm."""
  return data["config"]["batch_size"] == 1 and not _commits(data)


def _whole_stream(data: dict) -> bool:
  """A stream run with AR among its methods, whose table the goals need; not a run of a
  few methods, such as the A/B of two source trees in docs/bandits.md."""
  return "ar" in data["config"]["methods"].split(",")


def _with_reward_bandits(data: dict) -> bool:
  """A stream run that compares every chooser, the reward bandits too, rather than a
  shorter one of the acceptance choosers."""
  return "bandit:ucb1" in data["config"]["methods"]


def _contextual_against_plain(data: dict) -> bool:
  """A shorter stream run that sets the contextual choosers beside the plain acceptance
  choosers, without the reward bandits."""
  return "bandit:contextual_kl_ucb" in data["config"]["methods"] and not _with_reward_bandits(data)


def _has_cycle(data: dict) -> bool:
  return any(p["program"].startswith("cycle") for p in data["programs"])


def _model(name: str) -> Callable[[dict], bool]:
  return lambda data: data["model"] == name


def _fused_against_last_layer(data: dict) -> bool:
  """An unswept run of the fused-feature drafter (eagle:fused) beside the last-layer one."""
  return "eagle:fused" in data["config"]["methods"].split(",") and not data["config"]["sweep"]


def _shipped_eagle_only(data: dict) -> bool:
  """A run whose feature drafters are the shipped ones: no weights of a trial run beside
  them (config.eagle_checkpoint; MODEL_CARD.md reports those)."""
  return not data["config"].get("eagle_checkpoint")


def _last_layer(data: dict) -> bool:
  """A run of the last-layer eagle:smollm2, shipped before the fused-feature drafter."""
  return not results.fused_drafter(data)


def _stream_sections(device: str, name: str, priced_waits: bool = False,
                     step_context: bool = False, fused: bool = False,
                     every_chooser: bool = False, drafter_gammas: bool = False) -> list[Section]:
  """The choosers' four streams on one device: greedy and at temperature 1, in blocks
  and interleaved; with priced_waits, those whose choosers priced waits for the host
  (config.bandit.wait_cost), with step_context, learnt the drafter in n-gram lookup's
  context (config.bandit.step_context), and with fused, ran the fused-feature drafter
  (the others ran the last-layer one); with every_chooser, only runs that compare
  every chooser, the reward bandits too; with drafter_gammas, runs whose arms held the
  feature drafter at several gammas. A stream not run has no section."""
  options = (", waits for the host priced" if priced_waits else "") + (
      ", the drafter learnt in n-gram lookup's context" if step_context else "") + (
      ", the fused-feature drafter" if fused else "") + (
      " at several gammas" if drafter_gammas else "")

  def select(temperature, order):
    stream = _stream(temperature, order, priced_waits=priced_waits, step_context=step_context,
                     fused=fused, drafter_gammas=drafter_gammas)
    return lambda data: stream(data) and (not every_chooser or _with_reward_bandits(data))

  return [Section("choosers_smollm2", device, f"Choosers on a held-out stream{how}, {sampling}"
                  f"{options} ({name})", choosers, select(temperature, order))
          for temperature, sampling in ((0, "greedy"), (1, "temperature 1"))
          for order, how in (("blocks", " in blocks of one set"), ("interleaved",
                                                                   ", sets interleaved"))]


def _drafter_sections(device: str, name: str) -> list[Section]:
  """The shipped (fused-feature) eagle:smollm2's runs on one device: against every other
  drafter, then on more prompts against AR and n-gram alone, greedy and at temperature 1;
  at batch 8; against gamma, greedy and at temperature 1. A run not made has no section."""
  def section(title: str, render, select: Callable[[dict], bool]) -> Section:
    return Section("eagle_smollm2", device, f"eagle:smollm2 {title} ({name})", render,
                   lambda data: results.fused_drafter(data) and select(data))

  def more_prompts(data: dict) -> bool:
    return not _against_layer_skip(data) and _shipped_eagle_only(data)

  return [
      section("against AR, n-gram and layer-skip on held-out prompts", by_prompt_set,
              lambda data: _plain_run(data) and _against_layer_skip(data)),
      section("at temperature 1", by_prompt_set,
              lambda data: _at_temperature_1(data) and _against_layer_skip(data)),
      section("against AR and n-gram alone, on more held-out prompts, greedy", by_prompt_set,
              lambda data: _plain_run(data) and more_prompts(data)),
      section("against AR and n-gram alone, on more held-out prompts, temperature 1",
              by_prompt_set, lambda data: _at_temperature_1(data) and more_prompts(data)),
      section("at batch 8", batch_steps, _at_batch_8),
      section("against gamma", sweep, _swept_at(0)),
      section("against gamma, temperature 1", sweep, _swept_at(1)),
  ]


def _profiled(data: dict) -> bool:
  return data.get("profiled", False)


def _unprofiled(data: dict) -> bool:
  return not _profiled(data)


def _compiled_as_run_py(data: dict) -> bool:
  """An unprofiled compile_time run whose drafts compile as run.py's do by default on its
  device: unrolled on a GPU, in a loop elsewhere."""
  return _unprofiled(data) and data["unrolled_drafts"] == _on_gpu(data)


def _drafts_in_a_loop(data: dict) -> bool:
  return _unprofiled(data) and not data["unrolled_drafts"]


def _on_gpu(data: dict) -> bool:
  return data["environment"]["device"].startswith("gpu")


# Every GPU section's title names its GPU, and the section draws only that GPU's runs: a
# run on another would pass for one (tests/test_results.py checks both).
H200 = "gpu:NVIDIA H200"
H100 = "gpu:NVIDIA H100"

SECTIONS = [
    Section("ar_decode", H200, "AR decode step against the bandwidth floor (H200)", ar_decode,
            lambda data: data.get("tp", 1) == 1),
    Section("ar_decode", H200, "AR decode step split over GPUs, against each GPU's floor "
            "(H200 x2)", ar_decode, lambda data: data.get("tp", 1) > 1),
    Section("spec_step", H200, "Speculative step against the sum of its parts (H200)", spec_step,
            lambda data: data["drafter"] != "eagle" and data.get("tp", 1) == 1),
    Section("spec_step", H200, "An untrained feature drafter at the Llama-3-8B shape (H200)",
            spec_step, lambda data: (data["drafter"] == "eagle" and data["target"] == "llama3_8b"
                                     and data.get("tp", 1) == 1)),
    Section("spec_step", H200, "A feature drafter's step at the SmolLM2-135M shape, batch 1 "
            "and 8 (H200)", spec_step,
            lambda data: data["drafter"] == "eagle" and data["target"] == "smollm2_135m"),
    Section("spec_step", H200, "Speculative step with the target split over GPUs (H200 x2)",
            spec_step, lambda data: data.get("tp", 1) > 1),
    Section("verify_kernel", H200, "Pallas verify kernel against the jnp reference (H200)",
            verify_kernel),
    Section("layer_skip_smollm2", "cpu", "SmolLM2-135M with layer-skip drafters against AR (CPU)",
            method_table),
    Section("train_eagle_smollm2", H100, "Training eagle:smollm2 on fused features (H100)",
            drafter_training, lambda data: (bool(data["config"]["train"].get("feature_layers"))
                                            and results.wrote_shipped_drafter(data))),
    *_drafter_sections(H100, "H100"),
    *_drafter_sections(H200, "H200"),
    Section("eagle_smollm2", H100, "Fused features against the last layer's, side by side, "
            "greedy (H100)", by_prompt_set,
            lambda data: _fused_against_last_layer(data) and _plain_run(data)),
    Section("eagle_smollm2", H100, "Fused features against the last layer's, side by side, "
            "temperature 1 (H100)", by_prompt_set,
            lambda data: _fused_against_last_layer(data) and data["config"]["batch_size"] == 1
            and data["config"]["sampling"]["temperature"] == 1),
    Section("eagle_smollm2", H100, "Fused features against the last layer's, side by side, "
            "batch 8 (H100)", batch_steps,
            lambda data: _fused_against_last_layer(data) and data["config"]["batch_size"] == 8
            and data["config"]["sampling"]["temperature"] == 0),
    Section("train_eagle_smollm2", H200, "Training the last-layer eagle:smollm2 (H200)",
            drafter_training, lambda data: not data["config"]["train"].get("feature_layers")),
    Section("eagle_smollm2", H200, "The last-layer eagle:smollm2 against AR, n-gram and "
            "layer-skip on held-out prompts (H200)", by_prompt_set,
            lambda data: _plain_run(data) and _last_layer(data)),
    Section("eagle_smollm2", H200, "The last-layer eagle:smollm2 at temperature 1 (H200)",
            by_prompt_set, lambda data: _at_temperature_1(data) and _last_layer(data)),
    Section("eagle_smollm2", H200, "The last-layer eagle:smollm2 at batch 8 (H200)", batch_steps,
            lambda data: _at_batch_8(data) and _last_layer(data)),
    Section("eagle_smollm2", H200, "The last-layer eagle:smollm2 against gamma (H200)", sweep,
            lambda data: _swept_at(0)(data) and _last_layer(data)),
    Section("eagle_smollm2", "cpu", "eagle:smollm2 against AR, n-gram and layer-skip on held-out "
            "prompts (CPU)", by_prompt_set,
            lambda data: _plain_run(data) and results.fused_drafter(data)),
    Section("teacher_forced", "cpu", "eagle:smollm2 on held-out answers, scored as training "
            "scores them (CPU)", teacher_forced,
            lambda data: results.fused_drafter(data) and _first_chat_turns(data)
            and data["max_new_tokens"] == 128 and len(data["by_set"]) == 3),
    Section("teacher_forced", "cpu", "eagle:smollm2 on held-out chat answers of 256 tokens, "
            "scored as training scores them (CPU)", teacher_forced,
            lambda data: results.fused_drafter(data) and _first_chat_turns(data)
            and data["max_new_tokens"] == 256 and "chat" in data["by_set"]),
    Section("teacher_forced", "cpu", "eagle:smollm2 on answers to later chat turns, scored as "
            "training scores them (CPU)", teacher_forced,
            lambda data: results.fused_drafter(data) and not _first_chat_turns(data)),
    Section("eagle_smollm2", "cpu", "The last-layer eagle:smollm2 against AR, n-gram and "
            "layer-skip on held-out prompts (CPU)", by_prompt_set,
            lambda data: _plain_run(data) and _last_layer(data)),
    Section("teacher_forced", "cpu", "The last-layer eagle:smollm2 on held-out answers, scored "
            "as training scores them (CPU)", teacher_forced,
            _last_layer),
    *_stream_sections(H200, "H200"),
    Section("choosers_smollm2", H200, "Choosers on a held-out stream in blocks of one set, "
            "greedy, deterministic mode (H200)", choosers,
            _stream(0, "blocks", deterministic=True)),
    Section("choosers_smollm2", H200, "Choosers on a held-out stream, sets interleaved, greedy, "
            "deterministic mode (H200)", choosers,
            _stream(0, "interleaved", deterministic=True)),
    Section("choosers_smollm2", H200, "Choosers on a held-out stream, sets interleaved, greedy, "
            "request_carry 0.25 (H200)", choosers, _stream(0, "interleaved", request_carry=0.25)),
    Section("choosers_smollm2", H200, "Choosers on a held-out stream in blocks of one set, "
            "temperature 1, request_carry 0.25 (H200)", choosers,
            _stream(1, "blocks", request_carry=0.25)),
    Section("choosers_smollm2", H200, "Choosers on a held-out stream, sets interleaved, "
            "temperature 1, request_carry 0.25 (H200)", choosers,
            _stream(1, "interleaved", request_carry=0.25)),
    # The H200 was not lent in the sessions after the prompt prior changed; the same
    # streams ran on an H100, with the H200's calibrated arm costs.
    *_stream_sections(H100, "H100", fused=True, every_chooser=True),
    *_stream_sections(H100, "H100", fused=True, drafter_gammas=True),
    *_stream_sections(H200, "H200", fused=True, drafter_gammas=True),
    *_stream_sections(H100, "H100"),
    *_stream_sections(H200, "H200", priced_waits=True),
    *_stream_sections(H100, "H100", priced_waits=True),
    *_stream_sections(H100, "H100", priced_waits=True, step_context=True),
    Section("choosers_smollm2", "cpu", "Choosers on a held-out stream in blocks of one set, "
            "greedy (CPU)", choosers,
            lambda data: _stream(0, "blocks")(data) and _with_reward_bandits(data)),
    Section("choosers_smollm2", "cpu", "Choosers on a held-out stream, sets interleaved, greedy "
            "(CPU)", choosers,
            lambda data: _stream(0, "interleaved")(data) and not _contextual_against_plain(data)),
    Section("choosers_smollm2", "cpu", "Contextual choosers on a held-out stream in blocks of one "
            "set, greedy (CPU)", choosers,
            lambda data: _stream(0, "blocks")(data) and _contextual_against_plain(data)),
    Section("choosers_smollm2", "cpu", "Contextual choosers on a held-out stream, sets "
            "interleaved, greedy (CPU)", choosers,
            lambda data: _stream(0, "interleaved")(data) and _contextual_against_plain(data)),
    Section("choosers_smollm2", "cpu", "Contextual choosers on a held-out stream, sets "
            "interleaved, greedy, the fused-feature drafter (CPU)", choosers,
            lambda data: _stream(0, "interleaved", fused=True)(data)
            and _contextual_against_plain(data)),
    Section("choosers_smollm2", "cpu", "Contextual choosers on a held-out stream, sets "
            "interleaved, temperature 1 (CPU)", choosers,
            lambda data: _stream(1, "interleaved")(data) and _contextual_against_plain(data)),
    Section("choosers_smollm2", "cpu", "Contextual choosers on a held-out stream, sets "
            "interleaved, temperature 1, the fused-feature drafter (CPU)", choosers,
            lambda data: _stream(1, "interleaved", fused=True)(data)
            and _contextual_against_plain(data)),
    Section("choosers_smollm2", "cpu", "Contextual choosers on a held-out stream, sets "
            "interleaved, temperature 1, the drafter learnt in n-gram lookup's context (CPU)",
            choosers, _stream(1, "interleaved", step_context=True)),
    *_stream_sections("cpu", "CPU", fused=True, drafter_gammas=True),
    Section("ngram_contexts", "cpu", "n-gram lookup's drafts by the match they follow, SmolLM2 "
            "(CPU)", ngram_contexts),
    Section("drafter_contexts", "cpu", "eagle:smollm2's steps by n-gram lookup's context, "
            "temperature 1 (CPU)", drafter_contexts,
            lambda data: data["arm"] == "eagle:smollm2" and data["temperature"] == 1
            and results.fused_drafter(data)),
    Section("drafter_contexts", "cpu", "The last-layer eagle:smollm2's steps by n-gram lookup's "
            "context, temperature 1 (CPU)", drafter_contexts,
            lambda data: data["arm"] == "eagle:smollm2" and data["temperature"] == 1
            and _last_layer(data)),
    Section("choosers_smollm2", "cpu", "Choosers on a held-out stream in blocks of one set, "
            "greedy, request_carry 0.25 (CPU)", choosers,
            _stream(0, "blocks", request_carry=0.25)),
    Section("choosers_smollm2", "cpu", "Choosers on a held-out stream, sets interleaved, greedy, "
            "request_carry 0.25 (CPU)", choosers, _stream(0, "interleaved", request_carry=0.25)),
    Section("stream_goals", "", "The choosers against the stream goals, run by run",
            stream_goals),
    Section("chooser_steps", "", "Where the choosers' time went in the recorded streams",
            chooser_steps),
    Section("trace_calls", H200, "A chooser's step against fixed arms' steps, traced (H200)",
            trace_calls, _traced_held),
    Section("trace_calls", H100, "A chooser's step against fixed arms' steps, traced (H100)",
            trace_calls, _traced_held),
    Section("trace_calls", H200, "AR and eagle:smollm2 at batch 8, traced (H200)", trace_calls,
            lambda data: data["config"]["batch_size"] == 8),
    Section("bandit_regret", "", "Bandit regret, stationary arms", regret),
    Section("bandit_switching", "", "Bandit regret when the best arm changes", regret),
    Section("bandit_smollm2", "cpu", "The bandit choosing SmolLM2-135M's drafters over a "
            "changing stream (CPU)", bandit_run),
    Section("bandit_smollm2", H200, "The same stream on the H200", bandit_run),
    Section("idle_arms", H200, "Step time with idle model arms (H200)", idle_arms),
    Section("bandit_call", H200, "Whole calls of the bandit program held on one arm (H200)",
            bandit_call, lambda data: not _has_cycle(data)),
    Section("bandit_call", H200, "Moving between arms on a fixed schedule (H200)", bandit_call,
            _has_cycle),
    Section("carried_state", H100, "Calls that hand the chooser's state on, donated and not "
            "(H100)", carried_state),
    Section("numerics", H200, "Verify-pass and decode-step logits against f32, SmolLM2 (H200)",
            numerics, _model("smollm2_135m")),
    Section("numerics", H200, "Verify-pass and decode-step logits against f32, Llama-3-8B "
            "shape (H200)", numerics, _model("llama3_8b")),
    Section("deterministic_smollm2", H200, "Deterministic mode off and on, batch 1 (H200)",
            deterministic, lambda data: data["config"]["batch_size"] == 1),
    Section("deterministic_smollm2", H200, "Deterministic mode off and on, batch 8 (H200)",
            deterministic, lambda data: data["config"]["batch_size"] == 8),
    Section("deterministic_smollm2", "cpu", "Deterministic mode off and on (CPU)",
            deterministic),
    Section("compile_time", H200, "Compile time and the disk cache (H200)", compile_time,
            _compiled_as_run_py),
    Section("compile_time", H200, "Compile time and the disk cache, draft steps in a loop "
            "(H200)", compile_time, _drafts_in_a_loop),
    Section("compile_time", H100, "Compile time and the disk cache, draft steps in a loop "
            "(H100)", compile_time, _drafts_in_a_loop),
    Section("compile_time", H200, "Where a compile and a load from the disk cache spend "
            "their time (H200)", compile_profile, _profiled),
    Section("compile_time", H100, "Where a compile and a load from the disk cache spend "
            "their time (H100)", compile_profile, _profiled),
    Section("compile_time", "cpu", "Compile time and the disk cache (CPU)", compile_time,
            _compiled_as_run_py),
    Section("gamma_sweep", "", "Throughput and acceptance against gamma", sweep),
    Section("baselines", "", "Baselines on held-out prompts", bandit_run),
]


def claim(path: pathlib.Path, data: dict) -> str:
  """The title of the section this file could back, whether or not it is the newest."""
  return next((s.title for s in SECTIONS if s.experiment == path.parent.name
               and data["environment"]["device"].startswith(s.device) and s.select(data)),
              "(not quoted in the README)")


def readme_section() -> str:
  lines = [BEGIN, "<!-- Generated by `python -m flashspec_jax.report`; do not edit. -->"]
  for section in SECTIONS:
    found = newest(section.experiment, section.device, section.select)
    if found is None:
      continue
    path, data = found
    lines += ["", f"### {section.title}", "", *section.render(data), "", provenance(path, data)]
  lines.append(END)
  return "\n".join(lines)


def results_index() -> str:
  lines = ["# Results", "",
           "Every file here was written by a command in this repository; none is edited by hand.",
           "Each JSON file holds the command, git sha, device, versions, date and raw timings.",
           "`python -m flashspec_jax.report` regenerates this index and the README's results "
           "section from them; the newest file of an experiment backs the README section named "
           "beside it.", "", "| file | backs | command | device | date |",
           "|---|---|---|---|---|"]
  for path in results_files("*/*.json"):
    data = load(path)
    env = data["environment"]
    lines.append(f"| [`{path.relative_to(RESULTS)}`]({path.relative_to(RESULTS)}) | "
                 f"{claim(path, data)} | `{command(env)}` | {env['device']} | {env['date']} |")
  return "\n".join(lines) + "\n"


def render() -> dict[pathlib.Path, str]:
  readme = (REPO / "README.md").read_text()
  start, end = readme.index(BEGIN), readme.index(END) + len(END)
  return {REPO / "README.md": readme[:start] + readme_section() + readme[end:],
          RESULTS / "README.md": results_index()}


def main(argv: list[str]) -> int:
  stale = [path for path, text in render().items()
           if not path.exists() or path.read_text() != text]
  if "--check" in argv:
    for path in stale:
      print(f"{path.relative_to(REPO)} is out of date: run python -m flashspec_jax.report")
    return 1 if stale else 0
  for path, text in render().items():
    with results.open_atomic(path) as f:
      f.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))

"""Results files: unique names, whole files or none, and the report's choice of the newest."""

import json
import os
import re
import subprocess

import matplotlib.figure
import numpy as np
import pytest

from flashspec_jax import plots, report, results

ENV = {"date": "2026-11-30T14:05:09+00:00", "git_sha": "0123456789abcdef", "device": "cpu:cpu"}


def files_in(directory):
  """Every file below `directory`, temporary ones included."""
  return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file())


def test_runs_in_the_same_second_keep_their_own_files(tmp_path):
  paths = [results.write("exp", {"run": i}, [{"run": i}], directory=tmp_path, env=ENV)
           for i in range(3)]
  assert [p.name for p in paths] == ["2026-11-30T140509Z_01234567.json",
                                     "2026-11-30T140509Z_01234567-2.json",
                                     "2026-11-30T140509Z_01234567-3.json"]
  assert [json.loads(p.read_text())["run"] for p in paths] == [0, 1, 2]
  assert [p.with_suffix(".csv").read_text().splitlines()[1] for p in paths] == ["0", "1", "2"]
  assert len(files_in(tmp_path)) == 6


def test_a_results_file_keeps_each_list_of_plain_values_on_one_line(tmp_path):
  payload = {"summary": {"tok_s": 1.5, "arms": ["ngram", "ar"]}, "empty": {}, "steps": [],
             "history": [[1, 2, 3], [4, 5]], "calls": [{"steps": [7, 8], "sha": None}],
             "path": tmp_path, "ids": (np.int32(3),)}
  path = results.write("exp", payload, directory=tmp_path, env=ENV)
  text = path.read_text()
  assert json.loads(text) == {"environment": ENV, **json.loads(json.dumps(payload, default=str))}
  for line in ['"arms": ["ngram", "ar"]', '"empty": {}', '"steps": []', "  [1, 2, 3],",
               '"steps": [7, 8]', f'"path": "{tmp_path}"', '"ids": ["3"]']:
    assert line in text, line


def test_a_failed_write_leaves_no_file(tmp_path):
  with pytest.raises(ZeroDivisionError):
    with results.open_atomic(tmp_path / "new.json") as f:
      f.write("half of it")
      1 / 0
  (tmp_path / "old.json").write_text("whole")
  with pytest.raises(ZeroDivisionError):
    with results.open_atomic(tmp_path / "old.json") as f:
      f.write("half of it")
      1 / 0
  assert files_in(tmp_path) == ["old.json"] and (tmp_path / "old.json").read_text() == "whole"


def test_results_file_and_csv_appear_together_or_not_at_all(tmp_path, monkeypatch):
  def disk_full(*args):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr(results.os, "link", disk_full)
  with pytest.raises(OSError, match="No space left"):
    results.write("exp", {}, [{"a": 1}], directory=tmp_path, env=ENV)
  assert files_in(tmp_path) == []


def test_a_failed_plot_leaves_no_file(tmp_path, monkeypatch):
  def savefig(self, file, **kwargs):
    file.write(b"\x89PNG half of it")
    raise RuntimeError("renderer crashed")
  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
  with pytest.raises(RuntimeError, match="renderer crashed"):
    plots.regret_curves({"ucb1": np.ones((2, 5))}, tmp_path / "regret.png", title="t")
  assert files_in(tmp_path) == []


def test_report_takes_the_newest_file_across_both_name_forms(tmp_path, monkeypatch):
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  monkeypatch.setattr(report, "REPO", tmp_path)
  # The name of the files written before names had a time sorts after the
  # others' ('_' > 'T'), and -10 before -9, but neither is the newest.
  started = {"2026-11-29_aaaaaaaa": "2026-11-29T05:00:00+00:00",
             "2026-11-29T060000Z_bbbbbbbb": "2026-11-29T06:00:00+00:00",
             "2026-11-29T060000Z_bbbbbbbb-9": "2026-11-29T06:00:00+00:00",
             "2026-11-29T060000Z_bbbbbbbb-10": "2026-11-29T06:00:00+00:00",
             "2026-11-29T070000Z_cccccccc": "2026-11-29T07:00:00+00:00"}
  (tmp_path / "exp").mkdir()
  for stem, date in started.items():
    device = "gpu:H200" if stem.endswith("cccccccc") else "cpu:cpu"
    env = dict(ENV, date=date, device=device, command="python run.py", git_dirty=False, jax="0")
    (tmp_path / "exp" / f"{stem}.json").write_text(json.dumps({"environment": env}))
  for figure in ("", "_arms", "-9", "-9_arms", "-10", "-10_arms"):
    (tmp_path / "exp" / f"2026-11-29T060000Z_bbbbbbbb{figure}.png").write_bytes(b"")
  path, data = report.newest("exp", "cpu")
  assert path.stem == "2026-11-29T060000Z_bbbbbbbb-10"
  assert re.findall(r"Figure: \[`(.*?)`\]", report.provenance(path, data)) == [
      "2026-11-29T060000Z_bbbbbbbb-10.png", "2026-11-29T060000Z_bbbbbbbb-10_arms.png"]
  assert report.newest("exp", "")[0].stem == "2026-11-29T070000Z_cccccccc"


def test_sections_that_name_a_gpu_draw_only_its_runs(tmp_path, monkeypatch):
  """A run on another GPU, an H100 say, would otherwise be drawn under an H200 title."""
  for section in report.SECTIONS:
    assert ("H200" in section.title) == (section.device == report.H200), section.title
    assert ("H100" in section.title) == (section.device == report.H100), section.title
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  (tmp_path / "exp").mkdir()
  for stem, device in {"2026-11-29T060000Z_aaaaaaaa": "gpu:NVIDIA H200",
                       "2026-11-29T070000Z_bbbbbbbb": "gpu:NVIDIA H100 80GB HBM3"}.items():
    env = dict(ENV, date=f"{stem[:10]}T{stem[11:13]}:00:00+00:00", device=device)
    (tmp_path / "exp" / f"{stem}.json").write_text(json.dumps({"environment": env}))
  assert report.newest("exp", report.H200)[0].stem == "2026-11-29T060000Z_aaaaaaaa"
  assert report.newest("exp", "gpu")[0].stem == "2026-11-29T070000Z_bbbbbbbb"


def test_the_report_renders_only_the_results_git_tracks(tmp_path, monkeypatch):
  """A run written into results/ and not added (the Quickstart's `make run`) is not
  published: the README stays as committed, and `make test` after it still passes."""
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  (tmp_path / "exp").mkdir()
  for stem, date in {"2026-11-29T060000Z_aaaaaaaa": "2026-11-29T06:00:00+00:00",
                     "2026-11-29T070000Z_bbbbbbbb": "2026-11-29T07:00:00+00:00"}.items():
    (tmp_path / "exp" / f"{stem}.json").write_text(
        json.dumps({"environment": dict(ENV, date=date)}))
  # Not a git checkout: every file counts.
  assert report.newest("exp")[0].stem == "2026-11-29T070000Z_bbbbbbbb"
  # A git hook's GIT_DIR or GIT_INDEX_FILE would point these at another repository.
  env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
  git = dict(cwd=tmp_path, check=True, capture_output=True, env=env)
  subprocess.run(["git", "init", "-q"], **git)
  subprocess.run(["git", "add", "exp/2026-11-29T060000Z_aaaaaaaa.json"], **git)
  report._tracked.cache_clear()
  try:
    assert [p.stem for p in report.results_files("*/*.json")] == ["2026-11-29T060000Z_aaaaaaaa"]
    assert report.newest("exp")[0].stem == "2026-11-29T060000Z_aaaaaaaa"
  finally:
    report._tracked.cache_clear()


def test_report_parses_a_results_file_once_until_it_changes(tmp_path):
  path = tmp_path / "run.json"
  path.write_text(json.dumps({"rows": [1]}))
  first = report.load(path)
  assert report.load(path) is first  # parsed once, however many sections read it
  path.write_text(json.dumps({"rows": [2]}))
  os.utime(path, ns=(0, path.stat().st_mtime_ns + 1))  # rewritten within one clock tick
  assert report.load(path) == {"rows": [2]}


def test_stream_sections_skip_a_run_of_a_few_methods(tmp_path, monkeypatch):
  """A newer run of a few methods without AR (an A/B of two trees) would otherwise
  replace a stream's table, and the goals need AR on every set."""
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  (tmp_path / "choosers_smollm2").mkdir()
  config = {"sampling": {"temperature": 1.0}, "prompts": {"order": "interleaved"},
            "bandit": {}, "arms": "ngram:3,eagle:smollm2,ar"}
  for stem, methods in {"2026-11-29T060000Z_aaaaaaaa": "ar,eagle:smollm2,bandit:kl_ucb",
                        "2026-11-29T070000Z_bbbbbbbb": "eagle:smollm2,bandit:kl_ucb"}.items():
    env = dict(ENV, date=f"{stem[:10]}T{stem[11:13]}:00:00+00:00",
               device="gpu:NVIDIA H100 80GB HBM3")
    run = {"environment": env, "config": dict(config, methods=methods)}
    (tmp_path / "choosers_smollm2" / f"{stem}.json").write_text(json.dumps(run))
  section, = [s for s in report.SECTIONS if s.title == (
      "Choosers on a held-out stream, sets interleaved, temperature 1 (H100)")]
  assert report.newest(section.experiment, section.device,
                       section.select)[0].stem == "2026-11-29T060000Z_aaaaaaaa"


def test_variants_of_a_run_get_sections_of_their_own(tmp_path, monkeypatch):
  """A newer stream whose arms hold the drafter at several gammas, a newer gamma sweep
  at temperature 1, or a newer compile-time run with draft steps in a loop, backs a
  section of its own and leaves the plain one its run."""
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  monkeypatch.setattr(report.results, "fused_drafter", lambda data: True)
  env = dict(ENV, device="gpu:NVIDIA H100 80GB HBM3")
  runs = {
      "choosers_smollm2": {
          "2026-11-29T060000Z_aaaaaaaa": dict(arms="ngram:3,eagle:smollm2,ar"),
          "2026-11-29T070000Z_bbbbbbbb": dict(arms="ngram:3,eagle:smollm2@2,eagle:smollm2,ar")},
      "eagle_smollm2": {
          "2026-11-29T060000Z_aaaaaaaa": dict(sampling={"temperature": 0.0}),
          "2026-11-29T070000Z_bbbbbbbb": dict(sampling={"temperature": 1.0})}}
  for experiment, stems in runs.items():
    (tmp_path / experiment).mkdir()
    for stem, changes in stems.items():
      config = {"sampling": {"temperature": 1.0, "gamma": 4}, "prompts": {"order": "blocks"},
                "bandit": {}, "methods": "ar,bandit:ucb1", "sweep": ""} | changes
      run = {"environment": dict(env, date=f"{stem[:10]}T{stem[11:13]}:00:00+00:00"),
             "config": config} | ({"sweep_field": "sampling.gamma"}
                                  if experiment == "eagle_smollm2" else {})
      (tmp_path / experiment / f"{stem}.json").write_text(json.dumps(run))
  (tmp_path / "compile_time").mkdir()
  for stem, unrolled in {"2026-11-29T060000Z_aaaaaaaa": True,
                         "2026-11-29T070000Z_bbbbbbbb": False}.items():
    run = {"environment": dict(env, device="gpu:NVIDIA H200",
                               date=f"{stem[:10]}T{stem[11:13]}:00:00+00:00"),
           "unrolled_drafts": unrolled}
    (tmp_path / "compile_time" / f"{stem}.json").write_text(json.dumps(run))
  drawn = {}
  for title in ("Compile time and the disk cache (H200)",
                "Compile time and the disk cache, draft steps in a loop (H200)",
                "Choosers on a held-out stream in blocks of one set, temperature 1, the "
                "fused-feature drafter (H100)",
                "Choosers on a held-out stream in blocks of one set, temperature 1, the "
                "fused-feature drafter at several gammas (H100)",
                "eagle:smollm2 against gamma (H100)",
                "eagle:smollm2 against gamma, temperature 1 (H100)"):
    section, = [s for s in report.SECTIONS if s.title == title]
    drawn[title] = report.newest(section.experiment, section.device, section.select)[0].stem[-8:]
  assert list(drawn.values()) == ["aaaaaaaa", "bbbbbbbb"] * 3


def test_the_training_section_draws_the_run_that_wrote_the_shipped_drafter(tmp_path, monkeypatch):
  """A later run of the recipe (the full schedule, at another commit) is newer, but the
  README's training section describes the weights the package ships."""
  monkeypatch.setattr(report, "RESULTS", tmp_path)
  (tmp_path / "train_eagle_smollm2").mkdir()
  runs = {"2026-12-07T075350Z_5515e4a3": ("5515e4a33ff83f8f58a78648cce9a8e21921fa97", 2660),
          "2026-12-07T211135Z_6a2af29b": ("6a2af29b" + "0" * 32, 3200)}
  for stem, (sha, steps) in runs.items():
    env = dict(ENV, date=f"{stem[:10]}T{stem[11:13]}:00:00+00:00", git_sha=sha,
               device="gpu:NVIDIA H100 80GB HBM3")
    run = {"environment": env, "config": {"train": {"feature_layers": "2,15,27"}},
           "steps": steps}
    (tmp_path / "train_eagle_smollm2" / f"{stem}.json").write_text(json.dumps(run))
  section, = [s for s in report.SECTIONS if s.title == (
      "Training eagle:smollm2 on fused features (H100)")]
  assert report.newest(section.experiment, section.device,
                       section.select)[0].stem == "2026-12-07T075350Z_5515e4a3"


def test_a_run_under_xla_flags_is_cited_with_them(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
  env = results.environment.describe()
  assert report.command(env) == f"XLA_FLAGS='--xla_gpu_autotune_level=0' {env['command']}"
  # Files from before XLA_FLAGS were recorded, and runs without them, cite the command alone.
  assert report.command({"command": "python run.py"}) == "python run.py"
  assert report.command({"command": "python run.py", "xla_flags": ""}) == "python run.py"


def test_a_training_run_is_described_by_its_prompts_answers_and_split():
  train = dict(answer_tokens=16, answer_temperature=0.0, batch_size=4, rollout_steps=3)
  data = dict(config=dict(target="t", prompts=dict(sets="chat"), train=train),
              sequences=dict(train=6, validation=2), curve=[dict(step=1, loss=2.0)],
              seconds=dict(generate=1.0, train=2.0), steps=1, stopped_early=False,
              validation={})
  before = report.drafter_training(data)[0]  # a run from before sampled answers and the split
  assert "answers 8 tune-split prompts" in before and "(rows drawn one by one)" in before
  train["sampled_answers"] = 1
  after = report.drafter_training(data | dict(validation_split="whole conversations"))[0]
  assert "answers 4 tune-split prompts" in after and "and 1 more each at temperature 1" in after
  assert "(whole conversations)" in after


def test_a_batch_takes_the_steps_of_its_slowest_row():
  """Two batches of two rows: the drafter's rows took 3 and 5 steps, then 2 and 2."""
  config = dict(target="t", batch_size=2, sampling=dict(temperature=0.0, gamma=4, max_new_tokens=8),
                prompts=dict(sets="chat", num_per_set=4))

  def row(method, loop_steps, seconds, **steps):
    return dict(method=method, kind="chat", new_tokens=8, batch_rows=2, loop_steps=loop_steps,
                batch_seconds=seconds, **steps)
  records = [row("ar", 7, 0.7), row("ar", 7, 0.7), row("ar", 7, 0.7), row("ar", 7, 0.7),
             row("d", 5, 1.0, steps=3), row("d", 5, 1.0, steps=5),
             row("d", 2, 0.4, steps=2), row("d", 2, 0.4, steps=2)]
  summaries = {name: dict(tokens_per_second=1.0, step_ms_p50=1.0) for name in ("ar", "d")}
  lines = report.batch_steps(dict(config=config, synthetic_weights=True, summaries=summaries,
                                  records=records))
  # 5 + 2 loop steps where the batches' mean rows took 4 + 2; 1.4 s over 7 loop steps.
  assert "| d | chat | 7 | 6.0 | 1.17 | 200.00 |" in lines
  assert "| ar | chat | 14 | - | - | 100.00 |" in lines

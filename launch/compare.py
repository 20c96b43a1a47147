r"""Compares cores as a paper does: a grid of cores x seeds, their spread, one command.

  python -m launch.compare --experiment=nth_farthest:cpu --cores=rmc,lstm,dnc \
      --seeds=0,1,2 --out=workdirs/compare/nth [--parallel=2] \
      [-- --config.num_steps=1000 ...]

Every (core, seed) is one `python -m launch.train` run in OUT/<core>_seed<S>
(arguments after `--` go to every run). Rerunning the command reuses the
finished runs and resumes interrupted ones. Then it prints, and writes to
OUT/table.md and OUT/comparison.json, the final headline metric of the
experiment (its `RESULTS`, or --split/--metric) per core: mean, standard
deviation (n - 1 in the denominator; 0 for one seed), min, max and the number
of seeds; and draws OUT/curves.png, the mean learning curve of each core with
a band of +- one standard deviation across seeds.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

from launch import common
from rmc_jax import experiments
from rmc_jax.training import runs

_EXPERIMENT = flags.DEFINE_string("experiment", None,
                                  "NAME:VARIANT of the experiment.",
                                  required=True)
_CORES = flags.DEFINE_list("cores", ["rmc", "lstm"], "Cores to compare.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of every core.")
_OUT = flags.DEFINE_string("out", None, "Directory of the grid's runs.",
                           required=True)
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at a time.")
_SPLIT = flags.DEFINE_string("split", None,
                             "Split of the metric (default: the experiment's).")
_METRIC = flags.DEFINE_string("metric", None,
                              "Final metric compared (default: the "
                              "experiment's headline metric).")


def is_finished(workdir: str) -> bool:
  """True when the run's summary says it completed all its steps."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  return summary.get("status") == "completed" and \
      summary.get("step") == summary.get("num_steps")


def train_command(experiment: str, workdir: str, core: str, seed: int,
                  overrides: list[str]) -> list[str]:
  return [sys.executable, "-m", "launch.train", f"--config={experiment}",
          f"--workdir={workdir}", f"--config.core={core}",
          f"--config.seed={seed}", *overrides]


def run_grid(experiment: str, cores: list[str], seeds: list[int], out: str,
             overrides: list[str], parallel: int) -> list[str]:
  """Runs every unfinished (core, seed), `parallel` at a time; returns the
  names of the runs that failed."""
  todo, failed = [], []
  for core in cores:
    for seed in seeds:
      workdir = runs.grid_run_dir(out, core, seed)
      if is_finished(workdir):
        print(f"[{core} seed {seed}] finished before: reused", flush=True)
      else:
        todo.append((core, seed, workdir))
  running = []
  while todo or running:
    while todo and len(running) < parallel:
      core, seed, workdir = todo.pop(0)
      os.makedirs(workdir, exist_ok=True)
      log = open(os.path.join(workdir, "launcher.log"), "a",
                 encoding="utf-8")
      proc = subprocess.Popen(
          train_command(experiment, workdir, core, seed, overrides),
          stdout=log, stderr=subprocess.STDOUT)
      print(f"[{core} seed {seed}] started ({workdir})", flush=True)
      running.append((core, seed, workdir, proc, log, time.monotonic()))
    time.sleep(0.2)
    for entry in list(running):
      core, seed, workdir, proc, log, start = entry
      if proc.poll() is None:
        continue
      running.remove(entry)
      log.close()
      took = time.monotonic() - start
      if proc.returncode == 0 and is_finished(workdir):
        print(f"[{core} seed {seed}] done in {took:.0f} s", flush=True)
      else:
        failed.append(f"{core} seed {seed}")
        why = (f"exit {proc.returncode}" if proc.returncode else
               "stopped before its last step")
        print(f"[{core} seed {seed}] failed ({why}); see "
              f"{os.path.join(workdir, 'launcher.log')}", flush=True)
  return failed


def final_value(history: dict, split: str, metric: str) -> float | None:
  """The run's final `metric` of `split` (summary.json, else its last row)."""
  value = (history["summary"].get(split) or {}).get(metric)
  if value is None:
    _, values = runs.series(history, split, metric)
    value = values[-1] if values else None
  return None if value is None else float(value)


def compare(out: str, cores: list[str], seeds: list[int], split: str,
            metric: str) -> dict[str, dict]:
  """{core: spread of the final metric over its seeds} of finished runs."""
  table = {}
  for core in cores:
    values = []
    for seed in seeds:
      workdir = runs.grid_run_dir(out, core, seed)
      if is_finished(workdir):
        value = final_value(runs.read_history(workdir), split, metric)
        if value is not None and math.isfinite(value):
          values.append(value)
    if values:
      table[core] = runs.spread(values)
  return table


def markdown(table: dict[str, dict], split: str, metric: str) -> str:
  lines = [f"| core | {split} {metric}: mean +- std | min | max | seeds |",
           "| --- | ---: | ---: | ---: | ---: |"]
  for core, s in table.items():
    lines.append(f"| {core} | {s['mean']:.4g} +- {s['std']:.2g} | "
                 f"{s['min']:.4g} | {s['max']:.4g} | {s['n']} |")
  return "\n".join(lines)


def plot_bands(out: str, cores: list[str], seeds: list[int], split: str,
               metric: str, path: str) -> None:
  """Mean curve per core over the seeds' common steps, +- one std band."""
  plt = common.pyplot()
  fig, ax = plt.subplots(figsize=(6, 3.8), dpi=90)
  for core in cores:
    dirs = [runs.grid_run_dir(out, core, s) for s in seeds]
    curves = [dict(zip(*runs.series(runs.read_history(d), split, metric)))
              for d in dirs if is_finished(d)]
    if not curves:
      continue
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [runs.spread([c[t] for c in curves]) for t in steps]
    mean = [s["mean"] for s in stats]
    std = [s["std"] for s in stats]
    ax.plot(steps, mean, label=f"{core} ({len(curves)} seeds)")
    ax.fill_between(steps, [m - d for m, d in zip(mean, std)],
                    [m + d for m, d in zip(mean, std)], alpha=0.25)
  ax.set(xlabel="step", ylabel=f"{split} {metric}",
         title=f"{split} {metric}: mean +- std over seeds")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main(argv):
  overrides = argv[1:]
  bad = [a for a in overrides if not a.startswith("--config.")]
  if bad:
    common.fail(f"arguments after -- must be --config.FIELD=VALUE overrides, "
                f"got {bad}")
  name = _EXPERIMENT.value.partition(":")[0]
  try:
    results = experiments.get(name).RESULTS
    seeds = [int(s) for s in _SEEDS.value]
  except ValueError as e:
    common.fail(f"--experiment / --seeds: {e}")
  if _PARALLEL.value < 1 or not _CORES.value or not seeds:
    common.fail("--parallel must be >= 1 and --cores, --seeds non-empty.")
  split = _SPLIT.value or results.split
  metric = _METRIC.value or results.metric
  common.pyplot()  # Before any run: fails without the plot extra.
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  failed = run_grid(_EXPERIMENT.value, _CORES.value, seeds, out, overrides,
                    _PARALLEL.value)
  table = compare(out, _CORES.value, seeds, split, metric)
  text = markdown(table, split, metric)
  print("\n" + text)
  with open(os.path.join(out, "table.md"), "w", encoding="utf-8") as f:
    f.write(text + "\n")
  with open(os.path.join(out, "comparison.json"), "w", encoding="utf-8") as f:
    json.dump(dict(experiment=_EXPERIMENT.value, split=split, metric=metric,
                   higher_is_better=results.higher_is_better,
                   overrides=overrides, cores=table), f, indent=1)
  curve_split = "train" if split == "train" else "eval"
  plot_bands(out, _CORES.value, seeds, curve_split, metric,
             os.path.join(out, "curves.png"))
  if failed:
    common.fail(f"{len(failed)} run(s) failed: {', '.join(failed)}", code=1)


if __name__ == "__main__":
  app.run(main)

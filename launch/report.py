r"""Renders one results page (markdown + PNG figures) from run workdirs.

  python -m launch.report --manifest=docs/manifest.json --out=docs/results.md
  python -m launch.report ... --sections=learn_to_execute,rl   # only these

The figures are written next to the page (`<stem>_<section>.png`, e.g.
docs/results_nth_farthest.png), with matplotlib (`pip install -e .[plot]`).
Every number in the "ours" tables is read from the workdirs (summary.json, metrics.jsonl, config.json); the paper's
numbers (Santoro et al., 2018, full scale) are printed beside them and always
marked as the paper's.

The manifest is a JSON object; every section is optional (a missing one is
listed as skipped). Relative paths are taken from the manifest's directory,
or from the current directory when nothing is there.

  {
    "machine": "2-core AMD EPYC CPU (AVX-512), no GPU", "date": "2026-11-25",
    "title": "optional page title", "intro": "optional paragraph",
    "nth_farthest": {"runs": {"RMC": DIR, "LSTM": DIR, "DNC": DIR},
                     "command": "..." or ["...", "..."], "notes": "...",
                     "extra_runs": {"RMC (curriculum)": DIR, ...},
                     "extra_title": "...", "extra_command": "...",
                     "extra_notes": "..."},
    "learn_to_execute": {"runs": {"addition/RMC": DIR, "copy/LSTM": DIR}},
    "lm_wikitext2": {"runs": {"RMC": DIR, "LSTM": DIR}},
    "lm_synthetic": {"runs": {...}, "true_entropy": 0.8745},
    "rl": {"runs": {"RMC": DIR, "LSTM": DIR, "random policy": DIR}},
    "attention": {"workdir": DIR, "example": null, "heads": "all"},
    "benchmarks": {"core": "core.json", "env_table_markdown": "...",
                   "lm_table_markdown": "..."}
  }

Instead of (or beside) "runs", a section may name "grids": {NAME: DIR} of
`python -m launch.compare` output directories: every `<core>_seed<S>` run in
DIR is shown, labelled "NAME/CORE seed S" ("CORE seed S" for the name ""),
and a table of the spread over seeds (mean +- std, min, max, number of
finished seeds) per grid and core follows the section's table; "extra_runs"
may be {"grids": ..., "title": ...} too.

Every section also takes "command", "notes" (the "where we disagree with the
paper and why" sentence), "title", "description", "machine" and "date" (which
override the top-level ones). Any other key starting with "lm_" is rendered
like the LM sections, and any other key starting with "rl_" like "rl". In
"learn_to_execute" the task of a run is its
config.json `task` (else the label's part before "/"). In "rl" a run whose
config has `random_policy` (or whose label contains "random") is drawn as a
horizontal line at its mean return. In "attention", "example" picks an index
in a held-out batch of 64 (null: the first correctly answered non-trivial
question) and "heads" is "all" (mean and one row per head) or "mean". The
benchmark markdown entries are inserted verbatim, or read from a file when
they name an existing .md file.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import textwrap
from typing import Any, Callable

from absl import app
from absl import flags

from launch import common
from rmc_jax import experiments
from rmc_jax.training.runs import grid_run_dir
from rmc_jax.training.runs import grid_runs
from rmc_jax.training.runs import read_history
from rmc_jax.training.runs import series
from rmc_jax.training.runs import spread

DPI = 90
MAX_PNG_BYTES = 200_000
PAPER = "Santoro et al. (2018)"

# -- What each experiment contributes (its module's RESULTS) ------------------

NTH = experiments.get("nth_farthest").RESULTS
LTE = experiments.get("learn_to_execute").RESULTS
LM = experiments.get("lm").RESULTS
RL = experiments.get("rl").RESULTS
CORE_NAMES = {"rmc": "RMC", "lstm": "LSTM", "dnc": "DNC",
              "convlstm": "ConvLSTM"}

DEFAULT_TITLES = {
    "nth_farthest": NTH.title,
    "learn_to_execute": LTE.title,
    "lm_wikitext2": f"{LM.title}: WikiText-2",
    "lm_wikitext103": f"{LM.title}: WikiText-103",
    "lm_synthetic": f"{LM.title}: synthetic corpus",
    "rl": RL.title,
    "attention": f"What the RMC attends to ({NTH.title})",
    "benchmarks": "Core throughput benchmarks",
}


# -- Formatting helpers ----------------------------------------------------------


def _num(value: Any) -> float | None:
  """`value` as a finite float, or None (missing, 'nan' strings, ...)."""
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if math.isfinite(value) else None


def _fmt(value: Any, spec: str = ".3g") -> str:
  x = _num(value)
  return "n/a" if x is None else f"{x:{spec}}"


def _pct(value: Any) -> str:
  x = _num(value)
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _int(value: Any) -> str:
  x = _num(value)
  return "?" if x is None else f"{int(x):,}"


def _duration(seconds: Any) -> str:
  s = _num(seconds)
  if s is None:
    return "n/a"
  if s < 120:
    return f"{s:.0f} s"
  if s < 7200:
    return f"{s / 60:.1f} min"
  return f"{s / 3600:.1f} h"


_NUMERIC = re.compile(r"^([~<>+-]\s?)?[\d.,]+(%| s| min| h)?( \(.*\))?$|^n/a$|^\?$")


def md_table(header: list[str], rows: list[list[str]]) -> str:
  """A GitHub markdown table; numeric columns are right-aligned."""
  def line(cells):
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"
  align = ["---:" if rows and all(_NUMERIC.match(str(r[i])) for r in rows)
           else "---" for i in range(len(header))]
  return "\n".join([line(header), "| " + " | ".join(align) + " |"]
                   + [line(r) for r in rows])


def _commands(spec: dict, key: str = "command") -> str:
  command = spec.get(key)
  if not command:
    return "Command: _not given in the manifest._"
  if isinstance(command, (list, tuple)):
    command = "\n".join(command)
  return f"Command:\n\n```\n{command}\n```"


def _notes(spec: dict, key: str = "notes") -> str:
  text = spec.get(key) or "_not filled in yet._"
  return f"**Where we disagree with the paper and why:** {text}"


def _provenance(runs: list[dict], spec: dict, manifest: dict) -> str:
  seeds = sorted({str(r["config"].get("seed", "?")) for r in runs})
  machine = spec.get("machine") or manifest.get("machine") or "not given"
  date = spec.get("date") or manifest.get("date") or "not given"
  workdirs = "; ".join(f"{r['label']}: `{r['workdir']}`" for r in runs)
  return (f"Seed{'s' if len(seeds) > 1 else ''} {', '.join(seeds)} "
          f"(config.json); machine: {machine}; date: {date}. Workdirs: "
          f"{workdirs}.")


# -- Runs ------------------------------------------------------------------------


def _resolve(path: str, base_dir: str) -> str:
  path = os.path.expanduser(path)
  if os.path.isabs(path):
    return path
  candidate = os.path.join(base_dir, path)
  return candidate if os.path.exists(candidate) else path


def load_runs(run_specs: dict | None, base_dir: str,
              grids: dict | None = None) -> tuple[list[dict], list[str]]:
  """(runs, notes on runs that are missing).

  `run_specs` is {label: workdir}; `grids` is {name: directory of a
  `launch.compare` grid}, whose `<core>_seed<S>` runs are labelled
  "name/CORE seed S" (just "CORE seed S" for the name "") and carry
  run["grid"] = name.
  """
  entries = [(label, workdir, None) for label, workdir in
             (run_specs or {}).items()]
  missing = []
  for name, grid in (grids or {}).items():
    found = grid_runs(_resolve(grid, base_dir))
    if not found:
      missing.append(f"grid {name or grid}: no <core>_seed<S> runs in {grid}")
    for core, seed, _ in found:
      label = f"{CORE_NAMES.get(core, core)} seed {seed}"
      entries.append((f"{name}/{label}" if name else label,
                      grid_run_dir(grid, core, seed), name))
  runs = []
  for label, workdir, grid in entries:
    try:
      run = read_history(_resolve(workdir, base_dir))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError) as e:
      missing.append(f"{label}: {e}")
      continue
    run["label"] = label
    run["workdir"] = workdir
    if grid is not None:
      run["grid"] = grid
    runs.append(run)
  return runs, missing


def seed_table(runs: list[dict], value: Callable[[dict], Any], name: str,
               scale: float = 1.0, spec: str = ".4g") -> list[str]:
  """The spread over seeds of `scale * value(run)` per grid and core
  (finished runs).

  Empty when no run comes from a grid.
  """
  groups: dict[tuple[str, str], list[float]] = {}
  for run in runs:
    if "grid" not in run:
      continue
    values = groups.setdefault((run["grid"], _core(run)), [])
    v = _num(value(run))
    if run["summary"].get("status") == "completed" and v is not None \
        and math.isfinite(v):
      values.append(scale * v)
  if not groups:
    return []
  named = any(grid for grid, _ in groups)
  rows = []
  for (grid, core), values in groups.items():
    cells = ["n/a"] * 3
    if values:
      s = spread(values)
      cells = [f"{s['mean']:{spec}} +- {s['std']:.3g}", f"{s['min']:{spec}}",
               f"{s['max']:{spec}}"]
    rows.append(([grid] if named else []) + [core] + cells + [str(len(values))])
  header = (["grid"] if named else []) + [
      "core", f"{name}: mean +- std over seeds", "min", "max", "seeds"]
  return ["Across seeds (finished runs only; standard deviation with n - 1 "
          "in the denominator, 0 for one seed):", md_table(header, rows)]


def final(run: dict, split: str, metric: str) -> Any:
  """summary[split][metric], else the last logged value of the split."""
  value = (run["summary"].get(split) or {}).get(metric)
  if _num(value) is not None:
    return value
  _, values = series(run, split, metric)
  return values[-1] if values else None


def _steps(run: dict) -> str:
  s = run["summary"]
  step = s.get("step")
  if step is None:
    logged = [r["step"] for r in run["rows"]]
    step = max(logged) if logged else None
  text = _int(step)
  if not s:
    return f"{text} (in progress: no summary.json)"
  status = s.get("status")
  if status and status != "completed":
    text += f" ({status})"
  return text


def _core(run: dict) -> str:
  core = run["summary"].get("core") or run["config"].get("core") or "?"
  return CORE_NAMES.get(core, core)


def _common(run: dict) -> list[str]:
  return [run["label"], _core(run), _int(run["summary"].get("num_params")),
          _steps(run), str(run["config"].get("seed", "?"))]


def _speed(run: dict) -> list[str]:
  s = run["summary"]
  return [_fmt(s.get("steps_per_sec"), ".1f"), _duration(s.get("wall_seconds"))]


COMMON_HEADER = ["run", "core", "parameters", "steps", "seed"]
SPEED_HEADER = ["steps/s (avg)", "wall time"]


# -- Figures ---------------------------------------------------------------------


def save_figure(fig, path: str) -> None:
  """Saves at DPI; saves again smaller if the PNG is over MAX_PNG_BYTES."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  dpi = DPI
  fig.savefig(path, dpi=dpi)
  while os.path.getsize(path) > MAX_PNG_BYTES and dpi > 40:
    dpi = int(dpi * 0.75)
    fig.savefig(path, dpi=dpi)
  common.pyplot().close(fig)


def _style(ax, xlabel: str, ylabel: str, title: str) -> None:
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)


def _curves(ax, runs: list[dict], split: str, metric: str,
            scale: float = 1.0) -> int:
  drawn = 0
  for run in runs:
    steps, values = series(run, split, metric)
    if steps:
      ax.plot(steps, [scale * v for v in values], marker="." if
              len(steps) < 40 else None, label=run["label"])
      drawn += 1
  return drawn


def _figure_link(path: str, alt: str) -> str:
  return f"![{alt}]({os.path.basename(path)})"


# -- Sections --------------------------------------------------------------------


class Context:
  """What every section renderer needs."""

  def __init__(self, manifest: dict, out: str, base_dir: str):
    self.manifest = manifest
    self.out = out
    self.base_dir = base_dir
    self.stem = os.path.splitext(os.path.basename(out))[0]
    self.figures: list[str] = []

  def figure_path(self, name: str) -> str:
    path = os.path.join(os.path.dirname(os.path.abspath(self.out)),
                        f"{self.stem}_{name}.png")
    self.figures.append(path)
    return path

  def save(self, fig, name: str, alt: str, drawn: int = 1) -> str:
    """Saves `fig` as figure `name`; the markdown that shows it.

    Nothing is saved when no curve was `drawn` (runs that logged nothing yet).
    """
    if not drawn:
      common.pyplot().close(fig)
      return "_No figure: none of these runs has logged this metric yet._"
    path = self.figure_path(name)
    save_figure(fig, path)
    return _figure_link(path, alt)


def _missing_lines(missing: list[str]) -> list[str]:
  return [f"- Missing run, left out: {m}" for m in missing]


def _nth_block(ctx: Context, key: str, runs: list[dict], title: str) -> str:
  """Figure (held-out accuracy, training loss) and table of Nth-farthest runs."""
  plt = common.pyplot()
  fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9, 3.2))
  drawn = _curves(ax_acc, runs, NTH.split, NTH.metric, 100)
  drawn += _curves(ax_loss, runs, "train", "loss")
  sizes = {run["config"].get("num_objects") for run in runs}
  if len(sizes) == 1 and isinstance(next(iter(sizes)), int):
    ax_acc.axhline(100 / next(iter(sizes)), color="gray", ls=":", lw=1,
                   label=f"chance (1/{next(iter(sizes))})")
  for run in runs[:1]:  # Curriculum stages, from the first run that has one.
    cfg = run["config"]
    if cfg.get("objects_step") and cfg.get("min_objects"):
      k = cfg["min_objects"] + 1
      while k <= cfg["num_objects"]:
        x = (k - cfg["min_objects"]) * cfg["objects_step"]
        for ax in (ax_acc, ax_loss):
          ax.axvline(x, color="gray", lw=0.6, alpha=0.5)
        ax_acc.text(x, 0.02, f" {k} objects", fontsize=7, color="gray",
                    transform=ax_acc.get_xaxis_transform(), va="bottom")
        k += 1
  _style(ax_acc, "step", "held-out accuracy (%)", title)
  _style(ax_loss, "step", "training loss", "training loss")
  fig.tight_layout()
  figure = ctx.save(fig, key, title, drawn)

  rows, curriculum = [], False
  for run in runs:
    cfg = run["config"]
    curriculum |= bool(cfg.get("objects_step") and cfg.get("min_objects"))
    task = f"{cfg.get('num_objects', '?')} x {cfg.get('num_features', '?')}"
    if cfg.get("objects_step") and cfg.get("min_objects"):
      task += f" (curriculum from {cfg['min_objects']})"
    core = run["summary"].get("core") or cfg.get("core")
    rows.append(_common(run) + [task, _pct(final(run, NTH.split, NTH.metric)),
                                _fmt(final(run, "eval", "loss"), ".4f")]
                + _speed(run) + [NTH.paper.get(core, "n/a")])
  header = (COMMON_HEADER + ["objects x features", "held-out accuracy",
                             "held-out loss"] + SPEED_HEADER
            + ["paper accuracy (8 x 16, full scale)"])
  parts = [figure, md_table(header, rows), *seed_table(
      runs, lambda r: final(r, NTH.split, NTH.metric), "held-out accuracy (%)",
      100)]
  if curriculum:
    parts.append("With the curriculum, training batches start with fewer "
                 "objects (one more at each grey line); the held-out set "
                 "always has the final number of objects, so held-out "
                 "accuracy stays near chance until the last stage.")
  return "\n\n".join(parts)


def render_nth_farthest(ctx: Context, spec: dict) -> str:
  title = spec.get("title") or DEFAULT_TITLES["nth_farthest"]
  runs, missing = load_runs(spec.get("runs"), ctx.base_dir,
                            spec.get("grids"))
  parts = [f"## {title}", spec.get("description", ""),
           "Held-out accuracy is measured on a fixed evaluation set drawn "
           "from a random stream disjoint from the training batches. The "
           f"paper's column is {PAPER}'s result at full scale (8 objects x 16 "
           "features), not a run of ours."]
  if runs:
    parts += [_nth_block(ctx, "nth_farthest", runs, "held-out accuracy"),
              _provenance(runs, spec, ctx.manifest), _commands(spec)]
  else:
    parts.append("_No run of this section could be read._")
  parts += _missing_lines(missing)
  extra = spec.get("extra_runs")
  if extra:
    sub = extra if "runs" in extra or "grids" in extra else {
        "runs": extra, "title": spec.get("extra_title"),
        "command": spec.get("extra_command"), "notes": spec.get("extra_notes")}
    extra_runs, extra_missing = load_runs(sub.get("runs"), ctx.base_dir,
                                          sub.get("grids"))
    sub_title = sub.get("title") or "Second comparison"
    parts.append(f"### {sub_title}")
    if extra_runs:
      parts += [_nth_block(ctx, "nth_farthest_extra", extra_runs, sub_title),
                _provenance(extra_runs, {**spec, **sub}, ctx.manifest),
                _commands(sub)]
      if sub.get("notes"):
        parts.append(sub["notes"])
    parts += _missing_lines(extra_missing)
  parts.append(_notes(spec))
  return "\n\n".join(p for p in parts if p)


def _lte_task(run: dict) -> str:
  return str(run["config"].get("task") or run["label"].split("/")[0])


def render_learn_to_execute(ctx: Context, spec: dict) -> str:
  title = spec.get("title") or DEFAULT_TITLES["learn_to_execute"]
  runs, missing = load_runs(spec.get("runs"), ctx.base_dir,
                            spec.get("grids"))
  parts = [f"## {title}", spec.get("description", ""),
           "Per-character accuracy on a fixed evaluation set of programs "
           "drawn from a random stream that no training batch uses. The "
           f"paper's column is {PAPER}, Table 1 (full scale), for the same "
           "task and core."]
  if runs:
    tasks = sorted({_lte_task(r) for r in runs})
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.6 * len(tasks) + 0.6,
                                                     3.2), squeeze=False)
    drawn = 0
    for ax, task in zip(axes[0], tasks):
      drawn += _curves(ax, [r for r in runs if _lte_task(r) == task], "eval",
              LTE.metric, 100)
      _style(ax, "step", "held-out char accuracy (%)", task)
    fig.tight_layout()
    figure = ctx.save(fig, "learn_to_execute", title, drawn)
    rows = []
    for run in sorted(runs, key=_lte_task):
      cfg = run["config"]
      task = _lte_task(run)
      column = LTE.paper["task_column"].get(task)
      paper = LTE.paper["rows"].get(_core(run))
      paper_cell = (f"{paper[LTE.paper['columns'].index(column)]:.1f}%"
                    if column and paper else "n/a")
      size = (f"length {cfg.get('max_length', '?')}, nesting "
              f"{cfg.get('max_nesting', '?')}")
      decoder = ("?" if "teacher_forcing" not in cfg else
                 "teacher forcing" if cfg["teacher_forcing"] else "zero inputs")
      rows.append(_common(run) + [task, size, decoder,
                                  _pct(final(run, LTE.split, LTE.metric)),
                                  _pct(final(run, "eval", "sequence_accuracy"))]
                  + _speed(run) + [paper_cell])
    header = (COMMON_HEADER + ["task", "difficulty", "decoder inputs",
                               "held-out char accuracy",
                               "held-out sequence accuracy"] + SPEED_HEADER
              + ["paper char accuracy (full scale)"])
    parts += [figure, md_table(header, rows), *seed_table(
        runs, lambda r: final(r, LTE.split, LTE.metric),
        "held-out char accuracy (%)", 100),
              _provenance(runs, spec, ctx.manifest), _commands(spec)]
  else:
    parts.append("_No run of this section could be read._")
  parts += _missing_lines(missing)
  paper_rows = [[model] + [f"{v:.1f}" for v in values]
                for model, values in LTE.paper["rows"].items()]
  parts += [f"Paper, {PAPER} Table 1 (full scale, per-character accuracy %, "
            "not our runs):", md_table(["model", *LTE.paper["columns"]], paper_rows),
            _notes(spec)]
  return "\n\n".join(p for p in parts if p)


def _paper_lm_table() -> str:
  rows = [[model] + [_fmt(v, ".1f") for v in values]
          for model, values in LM.paper["rows"].items()]
  return (f"Paper, {PAPER} Table 2 (full scale, perplexity, not our runs):"
          "\n\n" + md_table(["model", *LM.paper["columns"]], rows))


def render_lm(ctx: Context, key: str, spec: dict) -> str:
  title = spec.get("title") or DEFAULT_TITLES.get(
      key, "Language modelling: " + key[len("lm_"):])
  runs, missing = load_runs(spec.get("runs"), ctx.base_dir,
                            spec.get("grids"))
  entropy = _num(spec.get("true_entropy"))
  parts = [f"## {title}", spec.get("description", ""),
           "Word-level perplexity on the validation split during training and "
           "on the test split with the last checkpoint."]
  if entropy is not None:
    parts.append(f"The corpus is sampled from a known source of entropy "
                 f"{entropy:.4f} nats/token, so no model can have a perplexity "
                 f"below exp({entropy:.4f}) = {math.exp(entropy):.3f}.")
  if runs:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    drawn = _curves(ax, runs, "eval", LM.metric)
    if entropy is not None:
      ax.axhline(math.exp(entropy), color="gray", ls=":", lw=1,
                 label=f"floor exp(H) = {math.exp(entropy):.3f}")
    if all(v > 0 for r in runs for v in series(r, "eval", LM.metric)[1]):
      from matplotlib import ticker  # pylint: disable=g-import-not-at-top
      ax.set_yscale("log")
      low, high = ax.get_ylim()
      subs = (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0) if high < 10 * low else (
          1.0, 2.0, 5.0)
      ax.yaxis.set_major_locator(ticker.LogLocator(subs=subs))
      ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
      ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    _style(ax, "step", "validation perplexity"
           + (" (log scale)" if ax.get_yscale() == "log" else ""), title)
    fig.tight_layout()
    figure = ctx.save(fig, key, title, drawn)
    rows = []
    for run in runs:
      test_loss = final(run, "test", "loss")
      row = _common(run) + [
          str(run["config"].get("dataset", "?")),
          _fmt(final(run, "eval", LM.metric), ".2f"),
          _fmt(final(run, LM.split, LM.metric), ".2f"),
          _fmt(test_loss, ".4f")]
      if entropy is not None:
        gap = _num(test_loss)
        row.append("n/a" if gap is None else f"{gap - entropy:+.4f}")
      tokens = (run["summary"].get("train") or {}).get("tokens_per_sec")
      rows.append(row + _speed(run) + [_fmt(tokens, ".0f")])
    header = COMMON_HEADER + ["dataset", "valid perplexity", "test perplexity",
                              "test loss (nats/token)"]
    if entropy is not None:
      header.append("test loss - entropy")
    header += SPEED_HEADER + ["tokens/s (last window)"]
    parts += [figure, md_table(header, rows), *seed_table(
        runs, lambda r: final(r, LM.split, LM.metric), "test perplexity"),
              _provenance(runs, spec, ctx.manifest), _commands(spec)]
  else:
    parts.append("_No run of this section could be read._")
  parts += _missing_lines(missing)
  parts += [_paper_lm_table(), _notes(spec)]
  return "\n\n".join(p for p in parts if p)


def _is_random(run: dict) -> bool:
  return bool(run["config"].get("random_policy")) or "random" in run[
      "label"].lower()


def mean_return(run: dict, last: int | None = None) -> float | None:
  """Mean return of the episodes that ended in the (last `last`) windows.

  Windows are weighted by their number of finished episodes when the rows
  carry `return_sum` and `episodes`, else averaged.
  """
  rows = [r for r in run["rows"] if r["split"] == "train"]
  rows = rows[-last:] if last else rows
  pairs = [(_num(r.get("return_sum")), _num(r.get("episodes"))) for r in rows]
  if pairs and all(s is not None and e is not None for s, e in pairs):
    episodes = sum(e for _, e in pairs)
    return sum(s for s, _ in pairs) / episodes if episodes > 0 else None
  values = [_num(r.get(RL.metric)) for r in rows]
  values = [v for v in values if v is not None]
  return sum(values) / len(values) if values else None


RL_LAST_WINDOWS = 10


def render_rl(ctx: Context, spec: dict, key: str = "rl") -> str:
  title = spec.get("title") or DEFAULT_TITLES["rl"]
  runs, missing = load_runs(spec.get("runs"), ctx.base_dir,
                            spec.get("grids"))
  parts = [f"## {title}", spec.get("description", ""),
           "Mean return of the episodes that ended in each logging window of "
           "training (the agent's own policy, so this is the learning curve; "
           "thin lines: every window, thick: running mean). The table's "
           f"return is the mean over the last {RL_LAST_WINDOWS} windows; a "
           "random-policy run is shown as a horizontal line at its mean over "
           "all windows."]
  if runs:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    longest = max(len(series(r, RL.split, RL.metric)[0]) for r in runs)
    width = max(1, longest // 20)
    drawn = 0
    for run in runs:
      if _is_random(run):
        level = mean_return(run)
        if level is not None:
          drawn += 1
          ax.axhline(level, color="gray", ls="--", lw=1,
                     label=f"{run['label']} ({level:.3g})")
        continue
      steps, values = series(run, RL.split, RL.metric)
      if not steps:
        continue
      drawn += 1
      (line,) = ax.plot(steps, values, lw=0.7, alpha=0.35)
      smooth = [sum(values[max(0, i - width + 1):i + 1])
                / len(values[max(0, i - width + 1):i + 1])
                for i in range(len(values))]
      ax.plot(steps, smooth, color=line.get_color(), label=run["label"])
    _style(ax, "step", "mean episode return"
           + (f"\n(running mean of {width} windows)" if width > 1 else ""),
           title)
    fig.tight_layout()
    figure = ctx.save(fig, key, title, drawn)
    rows, settings = [], {}
    for run in runs:
      cfg = run["config"]
      env = str(cfg.get("env", "?"))
      kwargs = cfg.get("env_kwargs") or {}
      if kwargs:
        text = ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items()))
        settings.setdefault(f"`{env}`: {text}", []).append(run["label"])
      core = "random policy" if _is_random(run) else _core(run)
      ret = mean_return(run, None if _is_random(run) else RL_LAST_WINDOWS)
      env_steps = (run["summary"].get("train") or {}).get("env_steps_per_sec")
      rows.append([run["label"], core, _int(run["summary"].get("num_params")),
                   _steps(run), str(cfg.get("seed", "?")), env,
                   _fmt(ret, ".3g")] + _speed(run)
                  + [_fmt(env_steps, ".0f")])
    header = (COMMON_HEADER + ["environment", "mean episode return"]
              + SPEED_HEADER + ["env steps/s (last window)"])
    parts += [figure, md_table(header, rows), *seed_table(
        [r for r in runs if not _is_random(r)],
        lambda r: mean_return(r, RL_LAST_WINDOWS),
        f"mean return (last {RL_LAST_WINDOWS} windows)")]
    parts += [f"Environment settings ({', '.join(labels)}): {text}."
              for text, labels in settings.items()]
    parts += [_provenance(runs, spec, ctx.manifest), _commands(spec)]
  else:
    parts.append("_No run of this section could be read._")
  parts += _missing_lines(missing)
  parts += [f"Paper, {PAPER} (full scale, not our runs; different "
            "environments and metrics from a small BoxWorld):",
            md_table(["environment", "RMC", "baseline"],
                     [list(r) for r in RL.paper["rows"]]), _notes(spec)]
  return "\n\n".join(p for p in parts if p)


def plot_attention(weights, path: str, *, ids=None, title: str = "",
                   heads: str = "all", mem_slots: int | None = None,
                   reference: int | None = None) -> None:
  """Plots attention weights [T, num_blocks, H, R, R] (or [T, H, R, R]).

  One column per time step; the first row is the mean over heads, then one
  row per head (heads='all', at most 8). Only the last attention block is
  drawn. Rows of each panel are queries, columns keys: memory slots
  m0..m{N-1} then the input row(s), after a thin white line.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  w = np.asarray(weights, dtype=np.float32)
  if w.ndim == 5:
    w = w[:, -1]
  if w.ndim != 4 or w.shape[-1] != w.shape[-2]:
    raise ValueError(f"weights must be [T, (blocks,) H, R, R], got "
                     f"{np.shape(weights)}")
  num_steps, num_heads, size = w.shape[0], w.shape[1], w.shape[-1]
  n_mem = size - 1 if mem_slots is None else mem_slots
  labels = [f"m{i}" for i in range(n_mem)] + (
      ["in"] if size - n_mem == 1 else [f"in{i}" for i in range(size - n_mem)])
  # With many rows, label only the first slot and the input(s); a white line
  # separates the memory slots from the inputs.
  ticks = list(range(size)) if size <= 6 else [0, *range(n_mem, size)]
  tick_labels = [labels[i] for i in ticks]
  panels = [("mean of heads", w.mean(axis=1))]
  if heads == "all" and num_heads > 1:
    panels += [(f"head {h}", w[:, h]) for h in range(min(num_heads, 8))]
  plt = common.pyplot()
  cell = 1.15 if num_steps * len(panels) <= 24 else 0.9
  fig, axes = plt.subplots(
      len(panels), num_steps, squeeze=False,
      figsize=(cell * num_steps + 1.6, cell * len(panels) + 0.9))
  image = None
  for row, (name, array) in enumerate(panels):
    for t in range(num_steps):
      ax = axes[row, t]
      image = ax.imshow(array[t], vmin=0, vmax=1, cmap="viridis")
      ax.set_xticks(ticks)
      ax.set_yticks(ticks)
      ax.set_xticklabels(tick_labels if row == len(panels) - 1 else [],
                         fontsize=6, rotation=90)
      ax.set_yticklabels(tick_labels if t == 0 else [], fontsize=6)
      ax.tick_params(length=0)
      ax.axhline(n_mem - 0.5, color="white", lw=0.6)
      ax.axvline(n_mem - 0.5, color="white", lw=0.6)
      if t == 0:
        ax.set_ylabel(name, fontsize=7)
      if row == 0:
        head = f"t={t + 1}"
        if ids is not None:
          head += f"\nid {ids[t]}" + (" (= m)" if ids[t] == reference else "")
        ax.set_title(head, fontsize=7)
  fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02,
               label="attention weight")
  if title:
    width = fig.get_size_inches()[0]
    fig.suptitle(textwrap.fill(title, int(width * 15)), fontsize=8)
  save_figure(fig, path)


def render_attention(ctx: Context, spec: dict) -> str:
  title = spec.get("title") or DEFAULT_TITLES["attention"]
  parts = [f"## {title}", spec.get("description", "")]
  workdir = spec.get("workdir")
  if not workdir:
    return "\n\n".join(parts + ["_No workdir given in the manifest._"])
  workdir = _resolve(workdir, ctx.base_dir)
  try:
    from rmc_jax.tasks import nth_farthest_analysis  # pylint: disable=g-import-not-at-top
    ex = nth_farthest_analysis.attention_example(workdir, spec.get("example"))
  except (FileNotFoundError, ValueError, KeyError) as e:
    return "\n\n".join(parts + [f"_Skipped: {e}_"])
  order = "nearest" if ex["sonnet_compat"] else "farthest"
  verdict = "correct" if ex["prediction"] == ex["label"] else "wrong"
  question = (f"question: the n={ex['n']} {order} (0-indexed) from the vector "
              f"with id m={ex['m']}; answer id {ex['label']}; model: id "
              f"{ex['prediction']} (p={ex['probability']:.2f}, {verdict})")
  path = ctx.figure_path("attention")
  blocks = ex["weights"].shape[1]
  plot_attention(ex["weights"], path, ids=ex["ids"], heads=spec.get(
      "heads", "all"), mem_slots=ex["mem_slots"], reference=ex["m"],
                 title=question)
  summary_path = os.path.join(workdir, "summary.json")
  held_out = None
  if os.path.exists(summary_path):
    with open(summary_path, encoding="utf-8") as f:
      held_out = (json.load(f).get(NTH.split) or {}).get(NTH.metric)
  parts += [
      _figure_link(path, "attention weights"),
      f"Attention weights of the trained RMC in `{spec['workdir']}` "
      f"(checkpoint of step {ex['step']}; {ex['num_objects']} objects x "
      f"{ex['num_features']} features; held-out accuracy "
      f"{_pct(held_out)}) on {ex['selection']} (the model answers "
      f"{_pct(ex['batch_accuracy'])} of that batch correctly). One column per "
      "time step, headed by the id of the object presented at that step; "
      "rows of a panel are queries and columns keys: the memory slots "
      f"m0..m{ex['mem_slots'] - 1}, then (after the white line) the input "
      "row 'in'. The first row averages the heads"
      + (f"; only the last of {blocks} attention blocks is shown" if blocks > 1
         else "") + f". {question[0].upper()}{question[1:]}.",
      _commands(spec), _notes(spec)]
  return "\n\n".join(p for p in parts if p)


def _markdown_or_file(value: str, base_dir: str) -> str:
  if value.endswith(".md"):
    path = _resolve(value, base_dir)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        return f.read().strip()
  return value


def render_benchmarks(ctx: Context, spec: dict) -> str:
  title = spec.get("title") or DEFAULT_TITLES["benchmarks"]
  parts = [f"## {title}", spec.get("description", "")]
  core = spec.get("core")
  if core:
    path = _resolve(core, ctx.base_dir)
    try:
      with open(path, encoding="utf-8") as f:
        bench = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      parts.append(f"_Core benchmark skipped: {e}_")
    else:
      rows = []
      for r in bench if isinstance(bench, list) else bench.get("rows", []):
        kwargs = ", ".join(f"{k}={v}" for k, v in (r.get("core_kwargs")
                                                   or {}).items())
        achieved = _num(r.get("achieved_flops"))
        rows.append([str(r.get("config", "?")),
                     CORE_NAMES.get(r.get("core"), str(r.get("core"))),
                     _int(r.get("params")), _fmt(r.get("tokens_per_s"), ".0f"),
                     _fmt(_num(r.get("flops_per_token")) and
                          r["flops_per_token"] / 1e6, ".2f"),
                     _fmt(achieved and achieved / 1e9, ".1f"),
                     _pct(r.get("fraction_of_peak")),
                     _fmt(_num(r.get("seconds_per_step")) and
                          1e3 * r["seconds_per_step"], ".1f"), kwargs])
      parts += [f"From `{core}`: one jitted step computing the gradient of "
                "a loss on the core's unroll with respect to all its "
                "parameters (forward and backward, no task model); the "
                "fraction of peak is against the float32 matmul rate "
                "measured in the same run.",
                md_table(["config", "core", "parameters", "tokens/s",
                          "MFLOPs/token", "achieved GFLOP/s",
                          "fraction of peak", "ms/step", "core arguments"],
                         rows)]
  for key, caption in (("env_table_markdown", "Environment throughput"),
                       ("lm_table_markdown", "Language-model throughput")):
    if spec.get(key):
      parts += [f"### {caption}", _markdown_or_file(spec[key], ctx.base_dir)]
  machine = spec.get("machine") or ctx.manifest.get("machine") or "not given"
  date = spec.get("date") or ctx.manifest.get("date") or "not given"
  parts += [f"Machine: {machine}; date: {date}.", _commands(spec)]
  if spec.get("notes"):
    parts.append(spec["notes"])
  return "\n\n".join(p for p in parts if p)


SECTIONS: tuple[tuple[str, Callable[[Context, dict], str]], ...] = (
    ("nth_farthest", render_nth_farthest),
    ("attention", render_attention),
    ("learn_to_execute", render_learn_to_execute),
    ("lm_wikitext2", lambda ctx, spec: render_lm(ctx, "lm_wikitext2", spec)),
    ("lm_synthetic", lambda ctx, spec: render_lm(ctx, "lm_synthetic", spec)),
    ("rl", render_rl),
    ("benchmarks", render_benchmarks),
)


SECTION_MARK = "<!-- section: {} -->"


def _section_list(manifest: dict) -> list[tuple[str, Callable]]:
  """SECTIONS plus the manifest's further "lm_*" and "rl_*" sections."""
  sections = list(SECTIONS)
  known = {key for key, _ in sections}
  for key in manifest:  # Further LM or RL sections, e.g. lm_wikitext103.
    if key.startswith("lm_") and key not in known:
      sections.insert(-2, (key, lambda c, s, k=key: render_lm(c, k, s)))
    elif key.startswith("rl_") and key not in known:
      sections.insert(-1, (key, lambda c, s, k=key: render_rl(c, s, k)))
  return sections


_NEXT_SECTION = re.compile(r"^(<!-- section: |## )", re.M)


def replace_sections(page: str, rendered: dict[str, str]) -> str:
  """`page` with each section of `rendered` ({key: markdown}) replaced.

  A section is found by its mark (written by every build) or, on a page
  written before the marks, by its "## title" line; it runs to the next mark
  or "## " heading. Raises ValueError naming a section the page lacks.
  """
  for key, text in rendered.items():
    start = page.find(SECTION_MARK.format(key))
    if start < 0:
      heading = text.splitlines()[0]
      found = re.search("^" + re.escape(heading) + "$", page, re.M)
      if not found:
        raise ValueError(f"section {key!r} ({heading!r}) is not on the page; "
                         "build the whole page instead")
      start = found.start()
    heading_end = page.index("\n", page.index("## ", start)) + 1
    nxt = _NEXT_SECTION.search(page, heading_end)
    end = nxt.start() if nxt else len(page)
    page = (page[:start] + SECTION_MARK.format(key) + "\n" + text + "\n\n"
            + page[end:])
  return page.rstrip("\n") + "\n"


def _head(manifest: dict, skipped: list[str]) -> str:
  """The page's title and introduction (all from the manifest)."""
  head = [f"# {manifest.get('title', 'Results')}",
          manifest.get("intro", ""),
          f"Machine: {manifest.get('machine', 'not given')}; date: "
          f"{manifest.get('date', 'not given')} (unless a section says "
          "otherwise). Every number in our tables is "
          "read from the runs' own summary.json / metrics.jsonl / config.json. "
          f"Columns and tables marked \"paper\" are {PAPER}'s results at full "
          "scale, copied for reference; our runs are much smaller unless a "
          "table says otherwise.",
          "Generated by `python -m launch.report`; do not edit by hand."]
  if skipped:
    head.append("Sections without runs in this report (not run yet or not in "
                "the manifest): " + ", ".join(skipped) + ".")
  return "\n\n".join(p for p in head if p)


def build_report(manifest: dict, out: str, base_dir: str = ".",
                 only: list[str] | None = None) -> tuple[str, list[str]]:
  """Writes the page `out` and its figures; returns (markdown, figure paths).

  Relative paths in the manifest are taken from `base_dir` first. With
  `only` (section keys), the head and just those sections and their figures
  are rendered again and replaced in the existing page; the other sections
  are kept.
  """
  ctx = Context(manifest, out, base_dir)
  sections = _section_list(manifest)
  skipped = [DEFAULT_TITLES.get(key, key) for key, _ in sections
             if not manifest.get(key)]
  if only is not None:
    unknown = sorted(set(only) - {k for k, _ in sections if manifest.get(k)})
    if unknown:
      raise ValueError(f"--sections: {unknown} are not sections of the "
                       "manifest")
    with open(out, encoding="utf-8") as f:
      page = f.read()
    rendered = {key: render(ctx, manifest[key]) for key, render in sections
                if key in only}
    page = replace_sections(page, rendered)
    first = _NEXT_SECTION.search(page, page.index("\n") + 1)
    text = _head(manifest, skipped) + "\n\n" + page[first.start():]
  else:
    text = "\n\n".join(
        [_head(manifest, skipped)]
        + [SECTION_MARK.format(key) + "\n" + render(ctx, manifest[key])
           for key, render in sections if manifest.get(key)]) + "\n"
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    f.write(text)
  return text, ctx.figures


_MANIFEST = flags.DEFINE_string("manifest", None,
                                "JSON manifest (see the module docstring).")
_OUT = flags.DEFINE_string("out", "docs/results.md",
                           "Markdown page to write; figures go next to it.")
_SECTIONS = flags.DEFINE_list(
    "sections", None, "Render only these sections of the manifest (e.g. "
    "learn_to_execute,rl) and replace them in the existing --out page, "
    "keeping the rest of it; default: the whole page.")


def main(argv: list[str]) -> int:
  del argv
  common.pyplot()  # Before any work: fails without the plot extra.
  if not _MANIFEST.value:
    print("error: --manifest is required", file=sys.stderr)
    return 2
  try:
    with open(_MANIFEST.value, encoding="utf-8") as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    print(f"error: --manifest: {e}", file=sys.stderr)
    return 2
  if not isinstance(manifest, dict):
    print("error: --manifest: expected a JSON object", file=sys.stderr)
    return 2
  base_dir = os.path.dirname(os.path.abspath(_MANIFEST.value))
  if _SECTIONS.value and not os.path.exists(_OUT.value):
    print(f"error: --sections: --out={_OUT.value} does not exist; build the "
          "whole page first", file=sys.stderr)
    return 2
  try:
    _, figures = build_report(manifest, _OUT.value, base_dir, _SECTIONS.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {_OUT.value}")
  for path in figures:
    print(f"wrote {path} ({os.path.getsize(path) / 1000:.0f} kB)")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))

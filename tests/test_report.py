"""Tests of `python -m launch.report` on hand-written (fake) workdirs.

No training: config.json, metrics.jsonl and summary.json are written by hand,
the report is rendered, and the page and its figures are checked. The
attention plot is tested on a synthetic array (a real one needs a trained
checkpoint).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `launch` is not an installed package.
  sys.path.insert(0, REPO_ROOT)

from launch import report  # pylint: disable=g-import-not-at-top

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NTH_COMMAND = "python -m launch.train --config=nth_farthest:cpu --config.core=rmc --fake"
LM_COMMAND = "python -m launch.train --config=lm:synthetic --config.core=lstm --fake"


def _write_run(workdir, config, rows, summary):
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(config, f)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  if summary is not None:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)


def _nth_run(workdir, core, seed, params, accuracies):
  rows = []
  for i, acc in enumerate(accuracies):
    step = 100 * (i + 1)
    rows.append({"step": step, "split": "train", "loss": 1.0 - acc,
                 "accuracy": acc - 0.01, "steps_per_sec": 9.0})
    rows.append({"step": step, "split": "eval", "loss": 1.1 - acc,
                 "accuracy": acc})
  summary = {"status": "completed", "step": 100 * len(accuracies),
             "num_params": params, "core": core, "steps_per_sec": 12.5,
             "wall_seconds": 95.0,
             "train": {"loss": 0.2, "accuracy": accuracies[-1] - 0.01},
             "eval": {"loss": 1.1 - accuracies[-1],
                      "accuracy": accuracies[-1]}}
  _write_run(workdir, {"core": core, "seed": seed, "num_objects": 3,
                       "num_features": 2}, rows, summary)


def _lm_run(workdir, core, valid_ppls, test_ppl, finished=True):
  rows = []
  for i, ppl in enumerate(valid_ppls):
    step = 50 * (i + 1)
    rows.append({"step": step, "split": "train", "loss": np.log(ppl) + 0.1})
    rows.append({"step": step, "split": "eval", "loss": float(np.log(ppl)),
                 "perplexity": ppl})
  summary = None
  if finished:
    rows.append({"step": 50 * len(valid_ppls), "split": "test",
                 "loss": float(np.log(test_ppl)), "perplexity": test_ppl})
    summary = {"status": "completed", "step": 50 * len(valid_ppls),
               "num_params": 4321, "core": core, "steps_per_sec": 3.25,
               "wall_seconds": 4000.0,
               "train": {"loss": 1.5, "tokens_per_sec": 777.0},
               "eval": {"loss": float(np.log(valid_ppls[-1])),
                        "perplexity": valid_ppls[-1]},
               "test": {"loss": float(np.log(test_ppl)),
                        "perplexity": test_ppl}}
  _write_run(workdir, {"core": core, "seed": 3, "dataset": "synthetic"},
             rows, summary)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("report")
  _nth_run(str(tmp / "rmc"), "rmc", 7, 123456, [0.5, 0.7, 0.875])
  _nth_run(str(tmp / "lstm"), "lstm", 7, 654321, [0.4, 0.41, 0.425])
  _lm_run(str(tmp / "lm_rmc"), "rmc", [9.0, 4.0, 3.5], 3.21)
  _lm_run(str(tmp / "lm_lstm"), "lstm", [10.0, 6.0], None, finished=False)
  manifest = {
      "machine": "fake 2-core test machine", "date": "2000-01-02",
      "nth_farthest": {"runs": {"RMC": "rmc", "LSTM": str(tmp / "lstm"),
                                "DNC": "does_not_exist"},
                       "command": NTH_COMMAND,
                       "notes": "Ours is a 3 x 2 task, not 8 x 16."},
      "lm_synthetic": {"runs": {"RMC": "lm_rmc", "LSTM": "lm_lstm"},
                       "true_entropy": 1.0, "command": [LM_COMMAND, "second"]},
  }
  manifest_path = tmp / "manifest.json"
  manifest_path.write_text(json.dumps(manifest))
  out = tmp / "docs" / "results.md"
  result = subprocess.run(
      [sys.executable, "-m", "launch.report", f"--manifest={manifest_path}",
       f"--out={out}"], cwd=REPO_ROOT, capture_output=True, text=True,
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  return out, out.read_text()


def test_page_has_sections_and_provenance(rendered):
  _, text = rendered
  assert text.startswith("# Results")
  assert "## Nth farthest" in text
  assert "## Language modelling: synthetic corpus" in text
  assert NTH_COMMAND in text and LM_COMMAND in text
  assert "fake 2-core test machine" in text and "2000-01-02" in text
  assert "Seed 7 (config.json)" in text and "RMC: `rmc`" in text
  assert "Ours is a 3 x 2 task, not 8 x 16." in text
  assert "_not filled in yet._" in text  # The LM section has no notes.
  # Sections not in the manifest are listed, not silently dropped.
  assert "Learning to Execute" in text.split("## Nth farthest")[0]
  assert "Missing run, left out: DNC" in text


def parse_tables(text: str) -> list[list[dict[str, str]]]:
  """Every markdown table of `text` as a list of {header: cell} rows."""
  tables, block = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      block.append([c.strip() for c in line.strip().strip("|").split("|")])
      continue
    if len(block) >= 2:
      header, rows = block[0], block[2:]
      tables.append([dict(zip(header, row)) for row in rows])
    block = []
  return tables


def find_row(text: str, **cells: str) -> dict[str, str]:
  """The one table row whose cells include `cells` (keys: headers)."""
  matches = [row for table in parse_tables(text) for row in table
             if all(row.get(k) == v for k, v in cells.items())]
  assert len(matches) == 1, (cells, matches)
  return matches[0]


def test_tables_hold_the_fake_numbers(rendered):
  _, text = rendered
  rmc = find_row(text, run="RMC", parameters="123,456")
  assert rmc["steps"] == "300" and rmc["seed"] == "7"
  assert rmc["objects x features"] == "3 x 2"
  assert rmc["held-out accuracy"] == "87.5%"
  assert rmc["steps/s (avg)"] == "12.5" and rmc["wall time"] == "95 s"
  assert rmc["paper accuracy (8 x 16, full scale)"] == "~91%"
  lstm = find_row(text, run="LSTM", parameters="654,321")
  assert lstm["held-out accuracy"] == "42.5%"
  assert lstm["paper accuracy (8 x 16, full scale)"] == "< 30%"
  lm = find_row(text, run="RMC", parameters="4,321")
  assert lm["valid perplexity"] == "3.50" and lm["test perplexity"] == "3.21"
  assert lm["test loss (nats/token)"] == "1.1663"
  assert lm["test loss - entropy"] == "+0.1663"  # The true entropy is 1 nat.
  assert lm["wall time"] == "66.7 min"
  assert lm["tokens/s (last window)"] == "777"
  unfinished = find_row(text, run="LSTM", parameters="?")
  assert "in progress" in unfinished["steps"]
  # The paper's numbers are there, marked as the paper's.
  assert "Table 2 (full scale" in text
  paper = find_row(text, model="RMC", **{"WikiText-103 valid": "30.8"})
  assert paper["WikiText-103 test"] == "31.6"


def test_figures_are_small_pngs(rendered):
  out, text = rendered
  names = ["results_nth_farthest.png", "results_lm_synthetic.png"]
  for name in names:
    path = out.parent / name
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size < 200_000
    assert f"]({name})" in text
  assert sorted(p.name for p in out.parent.glob("*.png")) == sorted(names)


def test_plot_attention_on_synthetic_weights(tmp_path):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 1, 2, 5, 5))  # [T, blocks, H, N+1, N+1]
  weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  path = tmp_path / "attention.png"
  report.plot_attention(weights, str(path), ids=[2, 0, 3, 1], reference=3,
                        mem_slots=4, title="question: n=1, m=3; answer 0")
  assert path.read_bytes()[:8] == PNG_MAGIC
  assert path.stat().st_size < 200_000
  report.plot_attention(weights[:, 0], str(tmp_path / "mean.png"),
                        heads="mean")
  assert (tmp_path / "mean.png").exists()
  with pytest.raises(ValueError):
    report.plot_attention(weights[..., :4], str(tmp_path / "bad.png"))


def test_mean_return_weights_windows_by_episodes():
  run = {"rows": [
      {"step": 1, "split": "train", "return_sum": 1.0, "episodes": 1.0},
      {"step": 2, "split": "train", "return_sum": 9.0, "episodes": 3.0}]}
  assert report.mean_return(run) == pytest.approx(2.5)
  assert report.mean_return(run, last=1) == pytest.approx(3.0)


def test_bad_manifest_exits_with_code_2(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "launch.report",
       f"--manifest={tmp_path / 'none.json'}", f"--out={tmp_path / 'r.md'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert "--manifest" in result.stderr.splitlines()[-1]


def test_runs_without_points_give_no_figure(tmp_path):
  _write_run(str(tmp_path / "rl"), {"core": "rmc", "seed": 1, "env": "box"},
             [], None)
  out = tmp_path / "page.md"
  text, figures = report.build_report(
      {"rl": {"runs": {"RMC": str(tmp_path / "rl")}}}, str(out))
  assert figures == [] and "_No figure" in text
  row = find_row(text, run="RMC", core="RMC")
  assert row["parameters"] == "?" and row["seed"] == "1"
  assert row["steps"] == "? (in progress: no summary.json)"


def test_grids_show_every_seed_and_their_spread(tmp_path):
  finals = {("rmc", 0): 0.9, ("rmc", 1): 0.8, ("rmc", 4): 0.6,
            ("lstm", 0): 0.5}
  for (core, seed), acc in finals.items():
    _nth_run(str(tmp_path / "grid" / f"{core}_seed{seed}"), core, seed, 10,
             [0.3, acc])
  # Neither an unfinished run nor a stray directory counts.
  _write_run(str(tmp_path / "grid" / "lstm_seed1"),
             {"core": "lstm", "seed": 1}, [], None)
  os.makedirs(tmp_path / "grid" / "notes")
  text, _ = report.build_report(
      {"nth_farthest": {"grids": {"": str(tmp_path / "grid")}}},
      str(tmp_path / "page.md"))
  assert find_row(text, run="RMC seed 4")["held-out accuracy"] == "60.0%"
  assert find_row(text, run="LSTM seed 1")["steps"].endswith(
      "(in progress: no summary.json)")
  rmc = 100 * np.array([0.9, 0.8, 0.6])
  row = find_row(text, core="RMC", seeds="3")
  mean, std = row["held-out accuracy (%): mean +- std over seeds"].split(" +- ")
  assert float(mean) == pytest.approx(rmc.mean(), rel=1e-3)
  assert float(std) == pytest.approx(rmc.std(ddof=1), rel=1e-2)
  assert (row["min"], row["max"]) == ("60", "90")
  lstm = find_row(text, core="LSTM", seeds="1")
  assert lstm["held-out accuracy (%): mean +- std over seeds"] == "50 +- 0"
  assert "notes" not in text


def test_sections_replaces_only_those_sections(tmp_path):
  _nth_run(str(tmp_path / "a"), "rmc", 1, 111, [0.5, 0.6])
  _nth_run(str(tmp_path / "b"), "rmc", 2, 222, [0.5, 0.7])
  _write_run(str(tmp_path / "rl"), {"core": "lstm", "seed": 3, "env": "box"},
             [], None)
  out = str(tmp_path / "page.md")
  first = {"nth_farthest": {"runs": {"RMC": str(tmp_path / "a")}},
           "rl": {"runs": {"LSTM": str(tmp_path / "rl")}}}
  whole, _ = report.build_report(first, out)
  # A page written before the section marks is found by its headings.
  with open(out, "w", encoding="utf-8") as f:
    f.write(re.sub(r"<!-- section: \w+ -->\n", "", whole))
  second = {"nth_farthest": {"runs": {"RMC": str(tmp_path / "b")}},
            "rl": {"runs": {"RMC": "nowhere"}}, "title": "Second page",
            "intro": "New intro."}
  text, figures = report.build_report(second, out, only=["nth_farthest"])
  assert text.startswith("# Second page\n\nNew intro.")  # The head too.
  assert text.count("Generated by") == 1
  assert find_row(text, run="RMC", core="RMC")["parameters"] == "222"
  assert "111" not in text
  rl_part = lambda t: t[t.index("## " + report.DEFAULT_TITLES["rl"]):]
  assert rl_part(text) == rl_part(whole)  # Kept, not rendered from `second`.
  assert [os.path.basename(p) for p in figures] == ["page_nth_farthest.png"]
  assert text.count("<!-- section: nth_farthest -->") == 1
  again, _ = report.build_report(second, out, only=["nth_farthest"])
  assert again == text  # Found by its mark this time; nothing duplicated.
  with pytest.raises(ValueError, match="attention"):
    report.build_report(second, out, only=["attention"])


# Runs a launcher's entry point with matplotlib unimportable.
_WITHOUT_MATPLOTLIB = """
import runpy, sys
sys.modules["matplotlib"] = None  # import matplotlib -> ImportError
sys.argv = sys.argv[1:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module,flags", [
    ("launch.plot", ["--workdirs=nowhere", "--out=curves.png"]),
    ("launch.report", ["--manifest=none.json", "--out=r.md"])])
def test_without_matplotlib_one_line_names_the_plot_extra(tmp_path, module,
                                                          flags):
  result = subprocess.run(
      [sys.executable, "-c", _WITHOUT_MATPLOTLIB, module, *flags],
      cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120,
      env=dict(os.environ, PYTHONPATH=REPO_ROOT))
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [
      "error: plots need matplotlib, which is not installed; install the "
      "optional extra: pip install -e .[plot]"]
  assert not os.listdir(tmp_path)

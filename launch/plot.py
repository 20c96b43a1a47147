r"""Compares runs: learning curves (PNG) and a table from any set of workdirs.

  python -m launch.plot --workdirs=workdirs/demo/rmc,workdirs/demo/lstm \
      --out=workdirs/demo/curves.png [--metric=accuracy]

Each curve is labelled by its workdir's name; the table lists the core, the
parameter count, the final held-out (eval) metrics and the run's average
training speed (evaluation and checkpoints included) from `summary.json`.
`--out` needs matplotlib (`pip install -e .[plot]`).
"""

from __future__ import annotations

import os

from absl import app
from absl import flags

from launch import common
from rmc_jax.training.runs import read_history, series

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Run directories to compare.",
                              required=True)
_OUT = flags.DEFINE_string("out", None, "PNG file to write (optional).")
_METRIC = flags.DEFINE_string("metric", "accuracy",
                              "Metric on the y axis of the first panel.")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train", "test"],
                           "Split of the first panel's metric (RL logs its "
                           "episode_return under train).")


def table(runs: list[dict], metric: str, split: str = "eval") -> str:
  """A fixed-width text table of the runs' final numbers."""
  header = (f"{'run':16} {'core':5} {'params':>10} {'steps':>6} "
            f"{split + ' ' + metric:>14} {split + ' loss':>10} {'steps/s':>8}")
  lines = [header, "-" * len(header)]
  for run in runs:
    s = run["summary"]
    ev = s.get(split) or {}
    _, values = series(run, split, metric)
    final = ev.get(metric, values[-1] if values else float("nan"))
    lines.append(
        f"{run['name'][:16]:16} {str(s.get('core', '?')):5} "
        f"{s.get('num_params', 0):>10,} {s.get('step', 0):>6} "
        f"{final:>14.4f} {ev.get('loss', float('nan')):>10.4f} "
        f"{s.get('steps_per_sec') or float('nan'):>8.1f}")
  return "\n".join(lines)


def plot(runs: list[dict], out: str, metric: str, split: str = "eval") -> None:
  """Writes `split` `metric` and train loss against steps, one line per run."""
  plt = common.pyplot()
  fig, (ax_metric, ax_loss) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=100)
  for run in runs:
    ax_metric.plot(*series(run, split, metric), marker=".", label=run["name"])
    ax_loss.plot(*series(run, "train", "loss"), label=run["name"])
  label = f"held-out {metric}" if split == "eval" else f"{split} {metric}"
  ax_metric.set(xlabel="step", ylabel=label, title=label)
  ax_loss.set(xlabel="step", ylabel="training loss", title="training loss")
  for ax in (ax_metric, ax_loss):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out)
  plt.close(fig)


def main(argv):
  del argv
  if _OUT.value:
    common.pyplot()  # Before any work: fails without the plot extra.
  try:
    runs = [read_history(w) for w in _WORKDIRS.value]
  except FileNotFoundError as e:
    common.fail(f"--workdirs: {e}")
  print(table(runs, _METRIC.value, _SPLIT.value))
  if _OUT.value:
    plot(runs, _OUT.value, _METRIC.value, _SPLIT.value)
    print(f"\nlearning curves written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)

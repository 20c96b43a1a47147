"""Where metrics go: `metrics.jsonl`, TensorBoard events and the console.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

from absl import logging
import jax


class MetricWriter:
  """Writes one JSON object per (step, split) and mirrors it to TensorBoard.

  On a terminal a progress bar with ETA shows the latest training metrics;
  elsewhere (CI, log files) each logged row becomes one plain log line.
  """

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0,
               enabled: bool | None = None, progress_bar: bool | None = None):
    self._enabled = jax.process_index() == 0 if enabled is None else enabled
    self._bar = None
    self._tb = None
    self._jsonl = None
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a",
                       encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if progress_bar is None:
      progress_bar = sys.stderr.isatty()
    if progress_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=initial_step,
                       dynamic_ncols=True, unit="step")
    self._last_step = initial_step

  def write(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    """Records scalar `metrics` of `split` ('train', 'eval', ...) at `step`."""
    if not self._enabled:
      return
    row = {"step": int(step), "split": split, "time": time.time()}
    row.update({k: _to_python(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for key, value in row.items():
      if key not in ("step", "split", "time") and isinstance(value, float):
        self._tb.add_scalar(f"{split}/{key}", value, step)
    self._tb.flush()
    text = " ".join(f"{k}={_fmt(v)}" for k, v in row.items()
                    if k not in ("step", "split", "time"))
    if self._bar is not None:
      self._bar.update(step - self._last_step)
      self._last_step = step
      if split == "train":
        self._bar.set_postfix_str(text, refresh=True)
      else:
        self._bar.write(f"[{split} @ {step}] {text}")
    else:
      logging.info("[%s @ %d] %s", split, step, text)

  def close(self) -> None:
    if not self._enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file, then rename); process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=_to_python)
    f.write("\n")
  os.replace(tmp, path)


def _to_python(value: Any) -> Any:
  if hasattr(value, "item") and getattr(value, "size", 1) == 1:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf.
  return value


def _fmt(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value)

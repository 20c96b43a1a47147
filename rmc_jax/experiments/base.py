"""What experiment modules share: the results-page declaration."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class ResultsSpec:
  """What the results page reports for an experiment.

  Attributes:
    title: the section title.
    split: where the headline metric is read ('eval', 'train', 'test').
    metric: the headline metric's name in metrics.jsonl / summary.json.
    higher_is_better: the metric's direction.
    metrics: every metric the page shows, name -> column label.
    paper: the paper's numbers (full scale), as the page prints them.
  """

  title: str
  split: str
  metric: str
  higher_is_better: bool
  metrics: Mapping[str, str]
  paper: Mapping[str, Any] = dataclasses.field(default_factory=dict)

"""The README's Python examples run as written."""

import os
import re

import numpy as np
import pytest

_README = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")


def _python_blocks():
  with open(_README, encoding="utf-8") as f:
    return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_readme_has_examples():
  assert len(_python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_example_runs(index):
  namespace = {}
  exec(compile(_python_blocks()[index], f"README block {index}", "exec"),
       namespace)
  if "outputs" in namespace:  # The core example: [T, B, N * F].
    assert namespace["outputs"].shape == (10, 8, 4 * 128)
  if "single" in namespace:  # Unbatched, bfloat16 policy: [T, N * F] float32.
    assert namespace["single"].shape == (10, 4 * 32)
    assert namespace["single"].dtype == np.float32
  if "logits" in namespace:  # The agent example: one action per episode.
    assert namespace["logits"].shape == (8, 4)
    assert namespace["timestep"].observation.shape[0] == 8

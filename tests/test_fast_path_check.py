"""The fast-path check of benchmarks.accelerator_check, on the CPU."""

from __future__ import annotations

import numpy as np

from benchmarks import fast_path_check


def test_relative_error_is_against_the_largest_reference_value():
  reference = {"a": np.array([1.0, -4.0]), "b": np.array([2.0])}
  other = {"a": np.array([1.0, -4.2]), "b": np.array([2.1])}
  # max(|0.2| / 4, |0.1| / 2) = 0.05
  assert np.isclose(fast_path_check._relative_error(reference, other), 0.05)


def test_fast_path_checks_pass_on_the_cpu(monkeypatch):
  monkeypatch.setattr(fast_path_check, "_CHECKS", (("memory", 2, True),))
  rows = fast_path_check.fast_path_checks()
  assert [r["precision"] for r in rows] == ["float32", "bfloat16"]
  assert all(r["passed"] for r in rows), rows
  float32, bfloat16 = rows
  # Both paths round differently only in float32's last bits. Under
  # bfloat16 both move visibly away from the float32 result, the fast path
  # by about as much as dynamic_unroll.
  assert float32["max_relative_error"] < 1e-5
  assert 1e-3 < bfloat16["reference_error"]
  assert (bfloat16["max_relative_error"]
          <= fast_path_check.BFLOAT16_MARGIN * bfloat16["reference_error"])


def test_a_wrong_fast_path_fails_the_check(monkeypatch):
  """A fast path 5% off fails both rows, while rounding noise of the size
  that dynamic_unroll's own bfloat16 result shows passes."""
  rng = np.random.default_rng(0)
  truth = {"out": rng.normal(size=(4, 3)), "grad": rng.normal(size=(5,))}
  noisy = lambda tree, scale: {k: v + scale * np.max(np.abs(v))
                               * rng.standard_normal(v.shape)
                               for k, v in tree.items()}
  skewed = lambda tree: {k: v * 1.05 for k, v in tree.items()}
  monkeypatch.setattr(fast_path_check, "_CHECKS", ((None, 1, False),))

  def check(fast32, fast16):
    paths = {"float32": (truth, fast32(truth)),
             "bfloat16": (noisy(truth, 1e-2), fast16(truth))}
    monkeypatch.setattr(fast_path_check, "_paths",
                        lambda *args: paths[args[-1]])
    return [r["passed"] for r in fast_path_check.fast_path_checks()]

  assert check(lambda t: t, lambda t: noisy(t, 8e-3)) == [True, True]
  assert check(skewed, skewed) == [False, False]

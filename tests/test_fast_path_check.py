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
  # Both paths round differently only in float32's last bits; bfloat16
  # differs visibly but within its tolerance.
  assert float32["max_relative_error"] < 1e-5
  assert 1e-4 < bfloat16["max_relative_error"] <= fast_path_check.BFLOAT16_TOL

"""Test-session settings, applied before any test module imports JAX.

The suite is dominated by XLA compiling many small programs. Its LLVM
backend optimisation level 0 compiles them much faster; the HLO passes
(fusion, layout, the op counts that tests inspect) are unchanged, and so are
the results up to rounding. The setting reaches the subprocesses that the
tests start, through the environment they inherit.
"""

import os

_FAST_COMPILE = "--xla_backend_optimization_level=0"

if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = " ".join(
      [os.environ.get("XLA_FLAGS", ""), _FAST_COMPILE]).strip()

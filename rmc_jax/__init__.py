"""rmc_jax: the Relational Memory Core and its experiments in JAX/Haiku."""

from rmc_jax.cores import LSTMStack, RelationalMemory, StepInfo, make_core

__version__ = "0.1.0"
__all__ = ["LSTMStack", "RelationalMemory", "StepInfo", "make_core"]

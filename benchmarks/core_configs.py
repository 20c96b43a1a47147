"""The benchmark configs C1-C4 and what the core benchmarks share.

FLOP counts per token, the float32 matmul rate of the machine, and a median
timer, used by `core_throughput` and `profile_core`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

from absl import app
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax import make_core


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  mem_slots: int
  head_size: int
  num_heads: int
  mlp_layers: int
  input_size: int
  batch: int
  steps: int
  key_size: int | None = None
  gate_style: str = "unit"

  @property
  def mem_size(self) -> int:
    return self.head_size * self.num_heads

  def rmc_kwargs(self) -> dict:
    return dict(mem_slots=self.mem_slots, head_size=self.head_size,
                num_heads=self.num_heads, attention_mlp_layers=self.mlp_layers,
                key_size=self.key_size, num_blocks=1,
                gate_style=self.gate_style)


def check_config_names(names: list[str]) -> None:
  """Raises a usage error naming --configs if a name is not a config."""
  unknown = sorted(set(names) - set(CONFIGS))
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; expected some of "
                         f"{sorted(CONFIGS)}.")


CONFIGS = {
    "C1": BenchConfig(4, 64, 4, 2, 40, 64, 8),
    "C2": BenchConfig(1, 192, 4, 3, 192, 32, 100, key_size=64),
    "C3": BenchConfig(1, 625, 4, 5, 512, 8, 100),
    "C4": BenchConfig(8, 64, 4, 2, 64, 32, 100),
    # C1 at the paper's Nth-farthest batch.
    "C5": BenchConfig(4, 64, 4, 2, 40, 1600, 8),
    # The RL agent's core (memory gating) on the flattened conv features of
    # the paper's BoxWorld (14 x 14 grid x 24 channels), 32 x unroll 40.
    "C6": BenchConfig(4, 64, 4, 2, 14 * 14 * 24, 32, 40, gate_style="memory"),
}


def rmc_forward_flops_per_token(c: BenchConfig) -> float:
  """Matmul FLOPs of one RMC step per batch element (one input row, one block)."""
  f, n, h = c.mem_size, c.mem_slots, c.num_heads
  dk = c.key_size or c.head_size
  rows = n + 1
  d_qkv = h * (2 * dk + c.head_size)
  flops = 2 * c.input_size * f                        # input projection
  flops += 2 * rows * f * d_qkv                       # qkv
  flops += 2 * h * rows * rows * (dk + c.head_size)   # q k^T and weights @ v
  flops += c.mlp_layers * 2 * rows * f * f            # attention MLP
  gates = {"unit": 2 * f, "memory": 2}.get(c.gate_style, 0)  # per slot
  flops += 2 * f * gates + 2 * n * f * gates          # gates: input, memory
  return float(flops)


DNC_KWARGS = dict(memory_size=80, word_size=64, num_reads=4, num_writes=1,
                  controller="lstm", controller_sizes=(256, 256))


def dnc_forward_flops_per_token(input_size: int, memory_size: int,
                                word_size: int, num_reads: int,
                                controller_sizes: tuple[int, ...],
                                **unused) -> float:
  """Matmul-like FLOPs of one DNC step (one write head, LSTM controller)."""
  m, w, r = memory_size, word_size, num_reads
  flops, below = 0, input_size + r * w
  for h in controller_sizes:
    flops += 2 * (below + h) * 4 * h
    below = h
  interface = r * w + 3 * w + 5 * r + 3
  flops += 2 * below * interface + 2 * (below + r * w) * below
  flops += 2 * m * w * (r + 1)        # content similarities (reads + write)
  flops += 2 * 2 * m * w + 2 * m * w * r  # erase/write outer products, reads
  flops += 4 * m * m + 2 * 2 * r * m * m  # link update, forward/backward reads
  return float(flops)


def lstm_forward_flops_per_token(input_size: int, hidden: int) -> float:
  return float(2 * (input_size + hidden) * 4 * hidden)


def lstm_hidden_for(num_params: int, input_size: int) -> int:
  """Hidden size of a one-layer LSTM with about `num_params` parameters."""
  # 4H^2 + 4H(D + 1) = P.
  b = 4 * (input_size + 1)
  return max(1, round((-b + math.sqrt(b * b + 16 * num_params)) / 8))


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  jax.block_until_ready(fn())  # warm-up (and compilation).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measure_matmul_peak(size: int = 2048, repeats: int = 10,
                        dtype=jnp.float32) -> float:
  """FLOP/s of jitted square matmuls (of `dtype`), one on each device at
  once."""
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  shape = (len(devices), size, size)
  a = jax.device_put(jax.random.normal(key_a, shape, dtype), split)
  b = jax.device_put(jax.random.normal(key_b, shape, dtype), split)
  matmul = jax.jit(jnp.matmul, out_shardings=split)
  return 2 * len(devices) * size**3 / median_seconds(lambda: matmul(a, b),
                                                    repeats)


def count_rmc_params(c: BenchConfig) -> int:
  """Parameter count of the config's RMC, from shapes only."""

  def init(x):
    core = make_core("rmc", **c.rmc_kwargs())
    return core.unroll(x, core.initial_state(1))
  shapes = jax.eval_shape(hk.transform(init).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1, c.input_size)))
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))

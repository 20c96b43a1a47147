r"""Forward+backward throughput of the memory cores against the machine's matmul peak.

For each named config it times one jitted step that computes the gradient of
a loss on `core.unroll` outputs with respect to all parameters, reports the
median over repeated runs after warm-up, and compares the analytic matmul
FLOPs per token with the float32 matmul rate measured in the same run.

  python -m benchmarks.core_throughput                 # all configs, RMC and LSTM
  python -m benchmarks.core_throughput --configs=C1,C3 --cores=rmc --repeats=5

The LSTM baseline of each config has about the RMC's parameter count; the DNC
is the paper's Learning-to-Execute baseline (memory 80 x 64, 4 reads, 1 write,
2-layer LSTM controller of 256) on the config's inputs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import time
from typing import Callable

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax import make_core

_CONFIGS = flags.DEFINE_list("configs", ["C1", "C2", "C3", "C4"],
                             "Named configs to run.")
_CORES = flags.DEFINE_list("cores", ["rmc", "lstm", "dnc"], "Cores to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement.")
_REMAT = flags.DEFINE_bool("remat", False, "Use remat in the RMC unroll.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_DYNAMIC_UNROLL = flags.DEFINE_bool(
    "dynamic_unroll", False,
    "Time hk.dynamic_unroll(core, ...) instead of core.unroll (to measure what "
    "the hoisted input projections of `unroll` are worth).")


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

  @property
  def mem_size(self) -> int:
    return self.head_size * self.num_heads

  def rmc_kwargs(self) -> dict:
    return dict(mem_slots=self.mem_slots, head_size=self.head_size,
                num_heads=self.num_heads, attention_mlp_layers=self.mlp_layers,
                key_size=self.key_size, num_blocks=1, gate_style="unit")


CONFIGS = {
    "C1": BenchConfig(4, 64, 4, 2, 40, 64, 8),
    "C2": BenchConfig(1, 192, 4, 3, 192, 32, 100, key_size=64),
    "C3": BenchConfig(1, 625, 4, 5, 512, 8, 100),
    "C4": BenchConfig(8, 64, 4, 2, 64, 32, 100),
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
  flops += 2 * f * 2 * f + 2 * n * f * 2 * f          # unit gates: input, memory
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


def measure_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
  """Float32 FLOP/s of a jitted square matmul on the default device."""
  key_a, key_b = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(key_a, (size, size), jnp.float32)
  b = jax.random.normal(key_b, (size, size), jnp.float32)
  matmul = jax.jit(jnp.dot)
  return 2 * size**3 / median_seconds(lambda: matmul(a, b), repeats)


def time_core(core_name: str, core_kwargs: dict, c: BenchConfig,
              repeats: int, remat: bool) -> tuple[int, float]:
  """Returns (parameter count, median seconds of one forward+backward)."""

  def loss_fn(inputs_TBD):
    core = make_core(core_name, **core_kwargs)
    state = core.initial_state(c.batch)
    if _DYNAMIC_UNROLL.value:
      outputs, _ = hk.dynamic_unroll(core, inputs_TBD, state)
    else:
      extra = {"remat": True} if remat and core_name == "rmc" else {}
      outputs, _ = core.unroll(inputs_TBD, state, **extra)
    return jnp.mean(jnp.square(outputs))

  model = hk.without_apply_rng(hk.transform(loss_fn))
  inputs = jax.random.normal(jax.random.PRNGKey(1),
                             (c.steps, c.batch, c.input_size))
  params = model.init(jax.random.PRNGKey(2), inputs)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  grad_fn = jax.jit(jax.grad(model.apply))
  return num_params, median_seconds(lambda: grad_fn(params, inputs), repeats)


def count_rmc_params(c: BenchConfig) -> int:
  """Parameter count of the config's RMC, from shapes only."""

  def init(x):
    core = make_core("rmc", **c.rmc_kwargs())
    return core.unroll(x, core.initial_state(1))
  shapes = jax.eval_shape(hk.transform(init).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 1, c.input_size)))
  return sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))


def main(argv):
  del argv
  unknown = sorted(set(_CONFIGS.value) - set(CONFIGS))
  if unknown:
    raise app.UsageError(f"--configs: unknown {unknown}; expected some of "
                         f"{sorted(CONFIGS)}.")
  bad_cores = sorted(set(_CORES.value) - {"rmc", "lstm", "dnc"})
  if bad_cores:
    raise app.UsageError(f"--cores: unknown {bad_cores}; expected some of "
                         "rmc, lstm, dnc.")
  peak = measure_matmul_peak()
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}")
  print(f"measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s; timing "
        f"{'hk.dynamic_unroll' if _DYNAMIC_UNROLL.value else 'core.unroll'}\n")
  header = (f"{'config':6} {'core':5} {'params':>11} {'tokens/s':>10} "
            f"{'GFLOP/token':>11} {'GFLOP/s':>8} {'% peak':>7}")
  print(header)
  print("-" * len(header))
  results = []
  for name in _CONFIGS.value:
    c = CONFIGS[name]
    rmc_params = None
    for core_name in _CORES.value:
      if core_name == "rmc":
        kwargs = c.rmc_kwargs()
        fwd = rmc_forward_flops_per_token(c)
      elif core_name == "dnc":
        kwargs = DNC_KWARGS
        fwd = dnc_forward_flops_per_token(c.input_size, **DNC_KWARGS)
      else:
        if rmc_params is None:
          rmc_params = count_rmc_params(c)
        hidden = lstm_hidden_for(rmc_params, c.input_size)
        kwargs = dict(hidden_sizes=(hidden,))
        fwd = lstm_forward_flops_per_token(c.input_size, hidden)
      num_params, seconds = time_core(core_name, kwargs, c, _REPEATS.value,
                                      _REMAT.value)
      if core_name == "rmc":
        rmc_params = num_params
      tokens_per_s = c.batch * c.steps / seconds
      flops_per_token = 3 * fwd  # backward is about twice the forward.
      achieved = flops_per_token * tokens_per_s
      row = dict(config=name, core=core_name, params=num_params,
                 tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
                 achieved_flops=achieved, peak_flops=peak,
                 fraction_of_peak=achieved / peak, core_kwargs=kwargs,
                 seconds_per_step=seconds)
      results.append(row)
      print(f"{name:6} {core_name:5} {num_params:>11,} {tokens_per_s:>10,.0f} "
            f"{flops_per_token / 1e9:>11.4f} {achieved / 1e9:>8.1f} "
            f"{100 * achieved / peak:>6.1f}%", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)

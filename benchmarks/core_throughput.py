r"""Forward+backward throughput of the memory cores against the machine's matmul peak.

For each named config it times one jitted step that computes the gradient of
a loss on `core.unroll` outputs with respect to all parameters, reports the
median over repeated runs after warm-up, and compares the analytic matmul
FLOPs per token with the float32 matmul rate measured in the same run.

  python -m benchmarks.core_throughput            # all configs, RMC, LSTM, DNC
  python -m benchmarks.core_throughput --configs=C1,C3 --cores=rmc --remat=false
  python -m benchmarks.core_throughput --cores=rmc --batch_size=64 --compile_only
  python -m benchmarks.core_throughput --cpu_plan=threads   # one threaded device

On a CPU the configs run under `--cpu_plan` (rmc_jax/training/cpu_plan.py;
default "auto", chosen per config as the launchers choose it, so each config
runs in a process of its own); with several devices the batch is split over
them and the gradient averaged, as in data-parallel training.

Each row also gives XLA's temporary memory of the compiled step ("temp MiB":
activations kept for the backward pass and workspace).

The LSTM baseline of each config has about the RMC's parameter count; the DNC
is the paper's Learning-to-Execute baseline (memory 80 x 64, 4 reads, 1 write,
2-layer LSTM controller of 256) on the config's inputs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from benchmarks.core_configs import BenchConfig
from benchmarks.core_configs import check_config_names
from benchmarks.core_configs import CONFIGS
from benchmarks.core_configs import count_rmc_params
from benchmarks.core_configs import DNC_KWARGS
from benchmarks.core_configs import dnc_forward_flops_per_token
from benchmarks.core_configs import lstm_forward_flops_per_token
from benchmarks.core_configs import lstm_hidden_for
from benchmarks.core_configs import measure_matmul_peak
from benchmarks.core_configs import median_seconds
from benchmarks.core_configs import rmc_forward_flops_per_token
from rmc_jax import make_core
from rmc_jax.training import cpu_plan
from rmc_jax.training import precision as precision_lib

_CONFIGS = flags.DEFINE_list("configs", ["C1", "C2", "C3", "C4", "C5", "C6"],
                             "Named configs to run.")
_CORES = flags.DEFINE_list("cores", ["rmc", "lstm", "dnc"], "Cores to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement.")
_REMAT = flags.DEFINE_enum(
    "remat", "auto", ["auto", "true", "false"],
    "RelationalMemory(remat=...): recompute each step's forward in the "
    "backward pass instead of storing its activations; auto: the core's "
    "default (remat=None).")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Override the configs' batch sizes.", lower_bound=1)
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only compile and report XLA's temporary memory of "
    "the step (no timing).")
_CPU_PLAN = flags.DEFINE_enum(
    "cpu_plan", "auto", cpu_plan.PLANS,
    "CPU devices and threads (rmc_jax/training/cpu_plan.py); ignored on "
    "accelerators.")
_PRECISION = flags.DEFINE_enum(
    "precision", "float32", list(precision_lib.PRECISIONS),
    "The cores' compute precision (rmc_jax/training/precision.py); the "
    "matmul peak is measured in the same dtype.")
_DYNAMIC_UNROLL = flags.DEFINE_bool(
    "dynamic_unroll", False,
    "Time hk.dynamic_unroll(core, ...) instead of core.unroll (to measure what "
    "the hoisted input projections of `unroll` are worth).")


def time_core(core_name: str, core_kwargs: dict, c: BenchConfig,
              repeats: int, remat: str) -> tuple[int, float, int]:
  """Returns (parameter count, median seconds of one forward+backward, bytes).

  The bytes are XLA's temporaries of the compiled step (its activations and
  workspace; parameters, inputs and gradients not included). The seconds are
  NaN with --compile_only.
  """

  if remat != "auto" and core_name == "rmc":
    core_kwargs = dict(core_kwargs, remat=remat == "true")

  def loss_fn(inputs_TBD):
    core = make_core(core_name, **core_kwargs)
    state = core.initial_state(c.batch)
    if _DYNAMIC_UNROLL.value:
      outputs, _ = hk.dynamic_unroll(core, inputs_TBD, state)
    else:
      outputs, _ = core.unroll(inputs_TBD, state)
    return jnp.mean(jnp.square(outputs))

  model = hk.without_apply_rng(hk.transform(
      precision_lib.scoped(loss_fn, _PRECISION.value)))
  inputs = jax.random.normal(jax.random.PRNGKey(1),
                             (c.steps, c.batch, c.input_size))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(2), inputs)
  num_params = sum(x.size for x in jax.tree.leaves(params))
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  batch_split = jax.sharding.NamedSharding(mesh, P(None, "data"))
  replicated = jax.sharding.NamedSharding(mesh, P())
  inputs = jax.device_put(inputs, batch_split)
  grad_fn = jax.jit(jax.grad(model.apply), in_shardings=(replicated,
                                                         batch_split),
                    out_shardings=replicated)
  compiled = grad_fn.lower(params, inputs).compile()
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  if _COMPILE_ONLY.value:
    return num_params, float("nan"), temp_bytes
  params = model.init(jax.random.PRNGKey(2), inputs)
  seconds = median_seconds(lambda: compiled(params, inputs), repeats)
  return num_params, seconds, temp_bytes


def main(argv):
  del argv
  check_config_names(_CONFIGS.value)
  bad_cores = sorted(set(_CORES.value) - {"rmc", "lstm", "dnc"})
  if bad_cores:
    raise app.UsageError(f"--cores: unknown {bad_cores}; expected some of "
                         "rmc, lstm, dnc.")
  if _CPU_PLAN.value == "auto" and cpu_plan.not_cpu_reason() is None:
    _run_each_config_under_its_plan()
    return
  applied = cpu_plan.apply(cpu_plan.choose(_CPU_PLAN.value, (), 0))
  _run_configs(applied)


def _run_each_config_under_its_plan() -> None:
  """--cpu_plan=auto on a CPU: each config in a process with its plan."""
  results = []
  for name in _CONFIGS.value:
    c = CONFIGS[name]
    batch = _BATCH.value or c.batch
    plan = cpu_plan.choose("auto", (batch,), c.mem_size)
    print(f"{name}: cpu plan {plan.name} ({plan.reason})", flush=True)
    argv = [a for a in sys.argv[1:]
            if not a.startswith(("--configs", "--cpu_plan", "--json"))]
    json_path = f"{_JSON.value}.{name}" if _JSON.value else None
    subprocess.run(
        [sys.executable, "-m", "benchmarks.core_throughput",
         f"--configs={name}", f"--cpu_plan={plan.name}"] + argv
        + ([f"--json={json_path}"] if json_path else []), check=True)
    if json_path:
      with open(json_path) as f:
        results.extend(json.load(f))
      os.remove(json_path)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


def _run_configs(plan: cpu_plan.CpuPlan) -> None:
  dtype = jnp.bfloat16 if _PRECISION.value == "bfloat16" else jnp.float32
  # 2048 fills a CPU's cores; an accelerator needs larger products.
  size = 2048 if jax.default_backend() == "cpu" else 8192
  peak = measure_matmul_peak(size=size, dtype=dtype)
  print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}, {len(jax.devices())} device(s), cpu plan "
        f"{plan.name}")
  print(f"measured {_PRECISION.value} matmul peak: {peak / 1e9:.1f} GFLOP/s; timing "
        f"{'hk.dynamic_unroll' if _DYNAMIC_UNROLL.value else 'core.unroll'}\n")
  header = (f"{'config':6} {'core':5} {'params':>11} {'tokens/s':>10} "
            f"{'GFLOP/token':>11} {'GFLOP/s':>8} {'% peak':>7} "
            f"{'temp MiB':>9}")
  print(header)
  print("-" * len(header))
  results = []
  for name in _CONFIGS.value:
    c = CONFIGS[name]
    if _BATCH.value:
      c = dataclasses.replace(c, batch=_BATCH.value)
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
      num_params, seconds, temp_bytes = time_core(
          core_name, kwargs, c, _REPEATS.value, _REMAT.value)
      if core_name == "rmc":
        rmc_params = num_params
      tokens_per_s = c.batch * c.steps / seconds
      flops_per_token = 3 * fwd  # backward is about twice the forward.
      achieved = flops_per_token * tokens_per_s
      row = dict(config=name, core=core_name, params=num_params,
                 tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
                 achieved_flops=achieved, peak_flops=peak,
                 fraction_of_peak=achieved / peak, core_kwargs=kwargs,
                 seconds_per_step=seconds, batch=c.batch,
                 temp_bytes=temp_bytes, cpu_plan=plan.name,
                 precision=_PRECISION.value, device=jax.devices()[0].device_kind,
                 num_devices=len(jax.devices()))
      results.append(row)
      timing = ("-".rjust(10) + f" {flops_per_token / 1e9:>11.4f} "
                + "-".rjust(8) + " " + "-".rjust(7)
                if _COMPILE_ONLY.value else
                f"{tokens_per_s:>10,.0f} {flops_per_token / 1e9:>11.4f} "
                f"{achieved / 1e9:>8.1f} {100 * achieved / peak:>6.1f}%")
      print(f"{name:6} {core_name:5} {num_params:>11,} {timing} "
            f"{temp_bytes / 2**20:>9.1f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)

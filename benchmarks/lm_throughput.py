r"""Training throughput and memory of the word-level language model.

Times the training stack's jitted step (`rmc_jax.training.steps.
make_train_step`: forward, backward, gradient clipping and the Adam update,
with the recurrent state carried from step to step) of the LM experiment's
own Task (`rmc_jax.experiments.lm.build_task`) for the RMC and the LSTM at
the model sizes of the `lm` experiment's variants:

  small:       WikiText-2 sized: vocabulary 33,278, embedding 256, adaptive
               softmax cutoffs (2000, 10000); RMC 1 x 4 x 128, 3 MLP layers;
               LSTM 650. Default batch 32 x unroll 100.
  wikitext103: the paper's model: vocabulary 267,735, embedding 512, adaptive
               softmax (20k, 40k, 200k); RMC 1 x 4 x 625, 5 MLP layers; LSTM
               2048. Default batch 64 per device x unroll 100.

The model is the library's LanguageModel built from the config (dropout as
configured, so the small variant's 0.25 dropout is on); the batches come from
the LM's truncated-BPTT batcher over a stream of uniformly random token ids
of the full vocabulary (no corpus is read); the timed steps read one batch of
continuing lanes ('reset' False). Reported per configuration: parameters, median seconds per step over
`--repeats` timed steps after `--warmup` untimed ones, tokens/s (= B x T /
median), XLA's memory analysis of the compiled step (arguments, outputs,
temporaries, and the bytes aliased by buffer donation), the bytes of
parameters + optimizer state per device ('state': replicated, or split over
the devices with `--shard_params`) and the process's peak
resident memory so far (`ru_maxrss`; monotone over the run, so it belongs to
the largest configuration timed up to that row).

  python -m benchmarks.lm_throughput                          # defaults
  python -m benchmarks.lm_throughput --sizes=small --batch_size=8 \
      --unroll_length=20 --repeats=3                     # a quick CPU check
  python -m benchmarks.lm_throughput --sizes=wikitext103 --compile_only
                                     # memory of the full batch, not run
  python -m benchmarks.lm_throughput --sizes=small --cpu_plan=device_per_core
                        # one single-threaded device per core (default auto)
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m \
      benchmarks.lm_throughput --sizes=wikitext103 --cores=rmc \
      --compile_only [--shard_params]   # 8 devices, 64 x 100 per device
"""

from __future__ import annotations

import json
import math
import platform
import resource
import sys
import time

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.experiments import lm
from rmc_jax.lm import batcher as batcher_lib
from rmc_jax.training import config as config_lib
from rmc_jax.training import cpu_plan
from rmc_jax.training import steps
from rmc_jax.training.mesh import DataMesh

SIZES = {
    # name: (config variant, vocabulary size, default global batch per device)
    "small": ("small", 33_278, 32),
    "wikitext103": ("wikitext103", 267_735, 64),
}

_SIZES = flags.DEFINE_list("sizes", list(SIZES), "Model sizes to time.")
_CORES = flags.DEFINE_list("cores", ["rmc", "lstm"], "Cores to time.")
_BATCH = flags.DEFINE_integer(
    "batch_size", 0, "Global batch (lanes); 0: the size's default (small 32, "
    "wikitext103 64 per device).")
_UNROLL = flags.DEFINE_integer("unroll_length", 100,
                               "Tokens per lane per step.")
_VOCAB = flags.DEFINE_integer(
    "vocab_size", 0, "Override the vocabulary size (0: the size's; the "
    "adaptive softmax cutoffs must stay below it).")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compiling.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed steps.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of parameters and batches.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Only compile and report XLA's memory analysis "
    "(e.g. for batches too large to run on this machine).")
_SHARD_PARAMS = flags.DEFINE_bool(
    "shard_params", False, "Split large parameters and their Adam moments "
    "over the devices (config.shard_params) instead of replicating them.")
_CPU_PLAN = flags.DEFINE_enum(
    "cpu_plan", "auto", cpu_plan.PLANS,
    "CPU devices and threads (rmc_jax/training/cpu_plan.py), one for all "
    "the configs timed; ignored on accelerators.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")


def random_tokens(rng: np.random.Generator, vocab_size: int, batch_size: int,
                  unroll: int) -> np.ndarray:
  """A uniformly random token stream long enough for a few steps per lane."""
  return rng.integers(0, vocab_size, batch_size * unroll * 4 + 1, np.int32)


def state_bytes_per_device(state: steps.TrainState) -> int:
  """Bytes of parameters + optimizer state that one device holds."""
  total = 0
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    shape = leaf.sharding.shard_shape(leaf.shape)
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def peak_rss_bytes() -> int:
  scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB.
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def lm_config(size: str, core: str, num_devices: int):
  """The variant's config as timed on `num_devices` devices."""
  variant, vocab_size, per_device = SIZES[size]
  config = lm.get_config(variant)
  config.core = core
  config.seed = _SEED.value
  config.vocab_size = _VOCAB.value or vocab_size
  config.batch_size = _BATCH.value or per_device * num_devices
  config.unroll_length = _UNROLL.value
  config.shard_params = _SHARD_PARAMS.value
  return config


def plan_inputs(size: str, core: str) -> tuple[tuple[int, ...], int]:
  """(batch sizes, widest matmul) of a config for `cpu_plan.choose`."""
  config = lm_config(size, core, cpu_plan.usable_cores())
  width = max(cpu_plan.core_width(core, config_lib.core_kwargs(config)),
              lm.matmul_width(config))
  return (config.batch_size,), width


def time_config(size: str, core: str, mesh: DataMesh) -> dict:
  config = lm_config(size, core, mesh.num_devices)
  vocab_size = config.vocab_size
  mesh.check_batch_size(config.batch_size, "--batch_size")
  b, t = config.batch_size, config.unroll_length

  # The experiment's own Task on a random stream, and the training stack's
  # state and jitted step (what loop.train runs).
  tokens = random_tokens(np.random.default_rng(_SEED.value), vocab_size, b, t)
  task = lm.build_task(config, vocab_size,
                       batcher_lib.TBPTTBatcher(tokens, b, t))
  start = time.perf_counter()
  # Compiling only needs the state's shapes and shardings: nothing is
  # allocated (the replicated state of the large model on many fake
  # devices would not fit in host memory).
  state = (steps.abstract_train_state(task, config, mesh)
           if _COMPILE_ONLY.value else
           steps.init_train_state(task, config, mesh))
  num_params = steps.count_params(state.params)
  train_step = steps.make_train_step(task, config, mesh, state)
  first = mesh.shard_batch(next(task.train_iterator))
  batch = mesh.shard_batch(next(task.train_iterator))
  compiled = train_step.lower(state, batch).compile()
  init_and_compile_seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()

  row = dict(size=size, core=core, vocab_size=vocab_size, batch_size=b,
             unroll_length=t, num_devices=mesh.num_devices,
             shard_params=config.shard_params, num_params=num_params,
             state_bytes_per_device=state_bytes_per_device(state),
             init_and_compile_seconds=init_and_compile_seconds)
  if memory is not None:
    row.update(
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes))
    row["compiled_total_bytes"] = (row["argument_bytes"] + row["output_bytes"]
                                   + row["temp_bytes"])
    # Donated state buffers are reused for the outputs: counted once.
    row["compiled_live_bytes"] = (row["compiled_total_bytes"]
                                  - row["alias_bytes"])
  if _COMPILE_ONLY.value:
    return dict(row, peak_rss_bytes=peak_rss_bytes())

  state, metrics = compiled(state, first)
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    raise RuntimeError(f"{size}/{core}: non-finite loss {loss}")

  return dict(row, seconds_per_step=seconds, step_times=times,
              tokens_per_sec=b * t / seconds, loss=loss,
              peak_rss_bytes=peak_rss_bytes())


def _gib(x) -> str:
  return "-" if x is None else f"{x / 2**30:.2f}"


def main(argv):
  del argv
  unknown = sorted(set(_SIZES.value) - set(SIZES))
  if unknown:
    raise app.UsageError(f"--sizes: unknown {unknown}; expected some of "
                         f"{sorted(SIZES)}.")
  bad_cores = sorted(set(_CORES.value) - {"rmc", "lstm"})
  if bad_cores:
    raise app.UsageError(f"--cores: unknown {bad_cores}; expected rmc, lstm.")
  if _BATCH.value < 0 or _UNROLL.value < 1 or _REPEATS.value < 1 or \
      _WARMUP.value < 0 or _VOCAB.value < 0:
    raise app.UsageError("--batch_size, --vocab_size and --warmup must be "
                         ">= 0; --unroll_length and --repeats >= 1.")
  plan = cpu_plan.apply(cpu_plan.choose_for_process(
      _CPU_PLAN.value,
      [plan_inputs(size, core) for size in _SIZES.value
       for core in _CORES.value]))
  mesh = DataMesh()
  device = jax.devices()[0]
  print(f"cpu plan: {plan.name} ({plan.reason})")
  print(f"device: {mesh.num_devices} x {device.device_kind} "
        f"({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}; "
        + ("compile only" if _COMPILE_ONLY.value else
           f"warmup {_WARMUP.value}, median of {_REPEATS.value} steps")
        + "; memory in GiB")
  header = (f"{'size':11} {'core':4} {'vocab':>7} {'B':>4} {'T':>4} "
            f"{'params':>12} {'state':>6} {'s/step':>8} {'tokens/s':>10} {'args':>6} "
            f"{'out':>6} {'temp':>6} {'alias':>6} {'a+o+t':>6} {'maxRSS':>7}")
  print(header)
  print("-" * len(header))
  results = []
  for size in _SIZES.value:
    for core in _CORES.value:
      r = dict(time_config(size, core, mesh), cpu_plan=plan.name)
      results.append(r)
      print(f"{size:11} {core:4} {r['vocab_size']:>7} {r['batch_size']:>4} "
            f"{r['unroll_length']:>4} {r['num_params']:>12,} "
            f"{_gib(r['state_bytes_per_device']):>6} "
            f"{r.get('seconds_per_step', math.nan):>8.3f} "
            f"{r.get('tokens_per_sec', math.nan):>10,.0f} "
            f"{_gib(r.get('argument_bytes')):>6} "
            f"{_gib(r.get('output_bytes')):>6} "
            f"{_gib(r.get('temp_bytes')):>6} "
            f"{_gib(r.get('alias_bytes')):>6} "
            f"{_gib(r.get('compiled_total_bytes')):>6} "
            f"{_gib(r['peak_rss_bytes']):>7}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)

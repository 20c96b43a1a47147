r"""Where the forward+backward time of a memory core goes, per XLA op.

For each named config of `benchmarks.core_configs` it builds the same
jitted step (the gradient of a loss on `core.unroll` outputs), times it,
profiles `--repeats` runs with `jax.profiler.trace` and maps every thunk of
the trace to its instruction in the compiled HLO. It reports the time by op
category (matmul, reduce, elementwise, copy/transpose/broadcast,
dynamic-slice/update, other), inside vs outside the scan's while loops, the
idle time between ops (dispatch and thunk-executor overhead), the top ops,
and two floors: matmul FLOPs at the measured matmul peak, and the recurrent
weights streamed from memory (once forward, once backward per time step) at
the measured weight-streaming bandwidth.

  python -m benchmarks.profile_core                       # C1-C4, RMC
  python -m benchmarks.profile_core --configs=C1 --repeats=2 --top=20
  python -m benchmarks.profile_core --core=lstm --remat --json=/tmp/p.json
  python -m benchmarks.profile_core --configs=C1 --cpu_plan=device_per_core

On a CPU `--cpu_plan` (rmc_jax/training/cpu_plan.py; "auto" chooses one plan
for all the configs given) sets the threads; under "device_per_core" the
profile is of what one device of such a run computes: its share of the batch,
single-threaded.

Op times are wall times: where thunks run concurrently on several threads,
each shares the overlapping time evenly, so categories plus idle time add up
to the profiled step, which the profiler makes somewhat slower than the
unprofiled one (both are reported).
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import os
import re
import tempfile

from absl import app
from absl import flags
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.core_configs import BenchConfig
from benchmarks.core_configs import check_config_names
from benchmarks.core_configs import CONFIGS
from benchmarks.core_configs import count_rmc_params
from benchmarks.core_configs import lstm_forward_flops_per_token
from benchmarks.core_configs import lstm_hidden_for
from benchmarks.core_configs import measure_matmul_peak
from benchmarks.core_configs import median_seconds
from benchmarks.core_configs import rmc_forward_flops_per_token
from rmc_jax import make_core
from rmc_jax.training import cpu_plan

_CONFIGS = flags.DEFINE_list("configs", list(CONFIGS), "Named configs to run.")
_CORE = flags.DEFINE_enum("core", "rmc", ["rmc", "lstm"], "Core to profile.")
_REMAT = flags.DEFINE_bool("remat", False, "RelationalMemory(remat=True).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed and profiled runs.")
_TOP = flags.DEFINE_integer("top", 12, "Rows of the per-op table.")
_CPU_PLAN = flags.DEFINE_enum(
    "cpu_plan", "auto", cpu_plan.PLANS,
    "CPU devices and threads (rmc_jax/training/cpu_plan.py), one for all "
    "the configs; ignored on accelerators.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")

CATEGORIES = ("matmul", "reduce", "elementwise", "copy/transpose/broadcast",
              "dynamic-slice/update", "other")
_MOVES = {"parameter", "constant", "copy", "transpose", "broadcast", "bitcast",
          "reshape", "slice", "concatenate", "pad", "iota", "tuple",
          "get-tuple-element"}
_ELEMENTWISE = {"add", "subtract", "multiply", "divide", "maximum", "minimum",
                "exponential", "log", "tanh", "logistic", "rsqrt", "sqrt",
                "negate", "abs", "select", "compare", "convert", "power", "and",
                "or", "not", "clamp", "sign"}
_SLICES = {"dynamic-slice", "dynamic-update-slice", "gather", "scatter"}
_CONTAINERS = {"while", "conditional", "call"}  # Their bodies are traced too.
_INPUT_SIDE = {"rmc": ("input_projection", "input_to_gates"),
               "lstm": ("/w_x", "/b")}
_STEP_EVENT = "profile_core_step"

_COMPUTATION_RE = re.compile(r"^(?:ENTRY )?%([\w.\-]+) .*\{$")
_INSTRUCTION_RE = re.compile(
    r"^\s+(ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_CALLEE_RE = re.compile(r"\b(?:calls|body|condition|to_apply)=%([\w.\-]+)")
_CALLEE_SET_RE = re.compile(r"\b(?:branch|called)_computations=\{([^}]*)\}")


def _dims(hlo_type: str) -> list[int]:
  match = re.match(r"\w+\[([\d,]*)\]", hlo_type)
  return [int(d) for d in match.group(1).split(",") if d] if match else []


def parse_hlo(text: str) -> dict[str, dict]:
  """Instruction name -> opcode, shape, category, in_loop, matmul FLOPs.

  A fusion is a matmul if it contains a dot, else a reduce if it contains one;
  else it moves data (dynamic-slice/update if its result is a
  dynamic-update-slice or it only slices and copies, copy/transpose/broadcast
  if it only copies) unless it computes on arrays (elementwise). Scalar
  instructions (index arithmetic) do not count.
  """
  insts, body_of, memo, roots = {}, collections.defaultdict(list), {}, {}
  computation = None
  for line in text.splitlines():
    if match := _COMPUTATION_RE.match(line):
      computation = match.group(1)
    elif computation and (match := _INSTRUCTION_RE.match(line)):
      root, name, hlo_type, opcode, rest = match.groups()
      if root:
        roots[computation] = opcode
      called = _CALLEE_RE.findall(rest) + [
          c for group in _CALLEE_SET_RE.findall(rest)
          for c in re.findall(r"%([\w.\-]+)", group)]
      insts[name] = dict(type=hlo_type, opcode=opcode, rest=rest,
                         computation=computation, called=called)
      body_of[computation].append(name)

  def dot_flops(inst: dict) -> float:
    lhs = _dims(insts[re.search(r"%([\w.\-]+)", inst["rest"]).group(1)]["type"])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", inst["rest"])
    k = math.prod(lhs[int(d)] for d in contracting.group(1).split(",") if d)
    return 2.0 * math.prod(_dims(inst["type"])) * k

  def contents(computation: str) -> tuple[set[str], float]:
    """Opcodes and dot FLOPs of a computation and those it calls."""
    if computation not in memo:
      opcodes, flops = set(), 0.0
      for name in body_of[computation]:
        inst = insts[name]
        if not re.match(r"\w+\[\]", inst["type"]):
          opcodes.add(inst["opcode"])
        flops += dot_flops(inst) if inst["opcode"] == "dot" else 0.0
        for called in inst["called"]:
          called_opcodes, called_flops = contents(called)
          opcodes |= called_opcodes
          flops += called_flops
      memo[computation] = (opcodes, flops)
    return memo[computation]

  in_loop, frontier = set(), [c for i in insts.values()
                              if i["opcode"] == "while" for c in i["called"]]
  while frontier:
    computation = frontier.pop()
    if computation not in in_loop:
      in_loop.add(computation)
      frontier += [c for n in body_of[computation] for c in insts[n]["called"]]

  ops = {}
  for name, inst in insts.items():
    opcode = inst["opcode"]
    if opcode in _CONTAINERS:
      continue
    opcodes, flops = {opcode}, dot_flops(inst) if opcode == "dot" else 0.0
    result = opcode
    if opcode == "fusion":
      opcodes, flops = contents(inst["called"][0])
      result = roots[inst["called"][0]]
    if opcodes & {"dot", "convolution"}:
      category = "matmul"
    elif opcodes & {"reduce", "reduce-window"}:
      category = "reduce"
    elif result == "dynamic-update-slice" or opcodes <= _MOVES | _SLICES:
      category = ("copy/transpose/broadcast" if opcodes <= _MOVES
                  else "dynamic-slice/update")
    elif opcode == "fusion" or opcodes & _ELEMENTWISE:
      category = "elementwise"
    else:
      category = "other"
    ops[name] = dict(opcode=opcode, category=category, flops=flops,
                     shape=re.sub(r"\{[^}]*\}", "", inst["type"]),
                     in_loop=inst["computation"] in in_loop)
  return ops


def wall_shares_us(events: list[dict]) -> collections.Counter:
  """Microseconds per event name, concurrent events sharing time evenly."""
  bounds = sorted([(e["ts"], 1, i) for i, e in enumerate(events)] +
                  [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)])
  shares, active, last = collections.Counter(), set(), 0.0
  for time_us, kind, i in bounds:
    for j in active:
      shares[events[j]["name"]] += (time_us - last) / len(active)
    last = time_us
    (active.add if kind > 0 else active.discard)(i)
  return shares


def build_step(core_name: str, c: BenchConfig, remat: bool):
  """Returns (jitted grad, params, inputs, forward FLOPs/token, weight bytes).

  The weight bytes are those of the recurrent parameters (all but the input
  side), which every time step reads.
  """
  if core_name == "rmc":
    kwargs = dict(c.rmc_kwargs(), remat=remat)
    fwd = rmc_forward_flops_per_token(c)
  else:
    hidden = lstm_hidden_for(count_rmc_params(c), c.input_size)
    kwargs = dict(hidden_sizes=(hidden,))
    fwd = lstm_forward_flops_per_token(c.input_size, hidden)

  def loss_fn(inputs_TBD):
    core = make_core(core_name, **kwargs)
    outputs, _ = core.unroll(inputs_TBD, core.initial_state(c.batch))
    return jnp.mean(jnp.square(outputs))

  model = hk.without_apply_rng(hk.transform(loss_fn))
  inputs_TBD = jax.random.normal(jax.random.PRNGKey(1),
                                 (c.steps, c.batch, c.input_size))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(2), inputs_TBD)
  recurrent_bytes = sum(
      4 * math.prod(s.shape) for module, leaves in shapes.items()
      for leaf, s in leaves.items()
      if not any(p in f"{module}/{leaf}" for p in _INPUT_SIDE[core_name]))
  params = model.init(jax.random.PRNGKey(2), inputs_TBD)
  grad_fn = jax.jit(jax.grad(model.apply))
  return grad_fn, params, inputs_TBD, fwd, recurrent_bytes


def measure_weight_bandwidth(repeats: int = 10) -> float:
  """Bytes/s at which a jitted [16, 2500] @ [2500, 7500] reads its 75 MB W."""
  x_RK = jax.random.normal(jax.random.PRNGKey(0), (16, 2500), jnp.float32)
  w_KN = jax.random.normal(jax.random.PRNGKey(1), (2500, 7500), jnp.float32)
  matmul = jax.jit(jnp.dot)
  return w_KN.nbytes / median_seconds(lambda: matmul(x_RK, w_KN), repeats)


def profile_config(name: str, peak: float, bandwidth: float,
                   devices: int) -> dict:
  """Times, profiles and attributes one config's step, on one device's share
  of the batch when a run would split it over `devices`."""
  c, repeats = CONFIGS[name], _REPEATS.value
  c = dataclasses.replace(c, batch=c.batch // devices)
  grad_fn, params, inputs, fwd, recurrent_bytes = build_step(
      _CORE.value, c, _REMAT.value)
  compiled = grad_fn.lower(params, inputs).compile()  # Names the trace's ops.
  ops = parse_hlo(compiled.as_text())
  seconds = median_seconds(lambda: compiled(params, inputs), repeats)
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir, create_perfetto_trace=True):
      for i in range(repeats):
        with jax.profiler.TraceAnnotation(f"{_STEP_EVENT}_{i}"):
          jax.block_until_ready(compiled(params, inputs))
    path, = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"),
                      recursive=True)
    with gzip.open(path) as f:
      events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  profiled = float(np.median([e["dur"] for e in events
                              if e["name"].startswith(_STEP_EVENT)])) / 1e6
  op_events = [e for e in events if e["name"] in ops]
  wall_us = wall_shares_us(op_events)
  busy_us, counts = collections.Counter(), collections.Counter()
  for e in op_events:
    busy_us[e["name"]] += e["dur"]
    counts[e["name"]] += 1
  per_step = lambda us: us / 1e6 / repeats
  categories = dict.fromkeys(CATEGORIES, 0.0)
  for op_name, us in wall_us.items():
    categories[ops[op_name]["category"]] += per_step(us)
  op_time = sum(categories.values())
  flops = 3 * fwd * c.batch * c.steps
  floors = dict(flop_floor_s=flops / peak,
                byte_floor_s=2 * c.steps * recurrent_bytes / bandwidth)
  top = [dict(name=n, category=ops[n]["category"], in_loop=ops[n]["in_loop"],
              count_per_step=counts[n] / repeats, seconds_per_step=per_step(us),
              busy_seconds_per_step=per_step(busy_us[n]), shape=ops[n]["shape"],
              gflops_per_s=(ops[n]["flops"] * counts[n] / busy_us[n] / 1e3
                            if ops[n]["flops"] and busy_us[n] else None))
         for n, us in wall_us.most_common(_TOP.value)]
  return dict(
      config=name, core=_CORE.value, remat=_REMAT.value, batch=c.batch,
      seconds_per_step=seconds, profiled_seconds_per_step=profiled,
      tokens_per_s=c.batch * c.steps / seconds,
      fraction_of_peak=flops / seconds / peak, op_time_sum=op_time,
      busy_time_sum=per_step(sum(busy_us.values())),
      overhead=profiled - op_time, ops_per_step=len(op_events) / repeats,
      categories=categories,
      in_loop_seconds=sum(per_step(us) for n, us in wall_us.items()
                          if ops[n]["in_loop"]),
      top_ops=top, recurrent_param_bytes=recurrent_bytes,
      bandwidth_bytes_per_s=bandwidth, peak_flops=peak,
      best_fraction_of_peak=floors["flop_floor_s"] / max(floors.values()),
      **floors)


def print_report(r: dict) -> None:
  c = CONFIGS[r["config"]]
  ms, step = 1e3, r["profiled_seconds_per_step"]
  pct = lambda s: f"{100 * s / step:5.1f}%"
  print(f"== {r['config']} {r['core']}{' remat' if r['remat'] else ''}: "
        f"B={r['batch']} T={c.steps} mem {c.mem_slots}x{c.mem_size} ==")
  print(f"step {r['seconds_per_step'] * ms:.2f} ms (median, unprofiled), "
        f"{r['tokens_per_s']:,.0f} tokens/s, "
        f"{100 * r['fraction_of_peak']:.1f}% of the matmul peak")
  print(f"profiled step {step * ms:.2f} ms = categories + idle below "
        f"({step / r['seconds_per_step']:.2f}x the unprofiled step: profiler "
        f"cost and noise); ops busy {r['busy_time_sum'] * ms:.2f} ms on all "
        f"threads, {r['op_time_sum'] * ms:.2f} ms of wall time")
  print(f"{r['ops_per_step']:,.0f} op executions per step, "
        f"{r['op_time_sum'] / r['ops_per_step'] * 1e6:.1f} us wall "
        f"({r['busy_time_sum'] / r['ops_per_step'] * 1e6:.1f} us busy) each")
  print("time by category (wall ms per step, % of the profiled step):")
  for name, seconds in r["categories"].items():
    print(f"  {name:26} {seconds * ms:9.2f} {pct(seconds)}")
  print(f"  {'idle between ops':26} {r['overhead'] * ms:9.2f} "
        f"{pct(r['overhead'])}  (dispatch, thunk executor)")
  outside = r["op_time_sum"] - r["in_loop_seconds"]
  print(f"  in the while loops {r['in_loop_seconds'] * ms:.2f} ms "
        f"{pct(r['in_loop_seconds'])}, outside {outside * ms:.2f} ms "
        f"{pct(outside)}")
  print(f"top ops (ms per step; GFLOP/s over busy time):\n  {'op':34} "
        f"{'category':24} {'loop':4} {'count':>6} {'ms':>7} {'busy ms':>7} "
        f"{'GFLOP/s':>7}  shape")
  for op in r["top_ops"]:
    rate = f"{op['gflops_per_s']:7.1f}" if op["gflops_per_s"] else " " * 7
    print(f"  {op['name']:34} {op['category']:24} "
          f"{'yes' if op['in_loop'] else 'no':4} {op['count_per_step']:6.0f} "
          f"{op['seconds_per_step'] * ms:7.2f} "
          f"{op['busy_seconds_per_step'] * ms:7.2f} {rate}  {op['shape']}")
  flop_floor, byte_floor = r["flop_floor_s"], r["byte_floor_s"]
  print(f"floors: FLOPs at the matmul peak {flop_floor * ms:.2f} ms/step "
        f"(allows 100% of peak); recurrent weights 2 x T x "
        f"{r['recurrent_param_bytes'] / 1e6:.2f} MB at "
        f"{r['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s {byte_floor * ms:.2f} "
        f"ms/step (allows {min(100, 100 * flop_floor / byte_floor):.0f}%); "
        f"best possible {100 * r['best_fraction_of_peak']:.0f}% of peak, the "
        f"step is {r['seconds_per_step'] / max(flop_floor, byte_floor):.1f}x "
        "the larger floor\n", flush=True)


def main(argv):
  del argv
  check_config_names(_CONFIGS.value)
  plan = cpu_plan.apply(cpu_plan.choose_for_process(
      _CPU_PLAN.value,
      [((CONFIGS[n].batch,), CONFIGS[n].mem_size) for n in _CONFIGS.value]))
  uneven = [n for n in _CONFIGS.value if CONFIGS[n].batch % plan.devices]
  if uneven:
    raise app.UsageError(f"--cpu_plan={plan.name}: the batch of {uneven} "
                         f"does not divide over {plan.devices} devices.")
  print(f"cpu plan: {plan.name} ({plan.reason})"
        + (f"; profiling one device's 1/{plan.devices} of each batch"
           if plan.devices > 1 else ""))
  peak, bandwidth = measure_matmul_peak(), measure_weight_bandwidth()
  print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; "
        f"float32 matmul peak {peak / 1e9:.1f} GFLOP/s, weight streaming "
        f"{bandwidth / 1e9:.1f} GB/s\n")
  results = []
  for name in _CONFIGS.value:
    results.append(dict(profile_config(name, peak, bandwidth, plan.devices),
                        cpu_plan=plan.name))
    print_report(results[-1])
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)

r"""Environment steps per second of the pure-JAX Mini Pac-Man and BoxWorld.

For each environment and number of parallel episodes B it times one jitted
`lax.scan` of `--steps` vmapped steps with uniformly random actions (drawn
beforehand, outside the timed call), wrapped in `AutoReset` so finished
episodes restart inside the scan (under vmap the reset is computed every
step; `--noauto_reset` times the bare step). The observation is carried
through the scan so that it is really computed. Reports the median over
`--repeats` timed calls after one compile-and-run call.

  python -m benchmarks.env_throughput                      # 1..8192 episodes
  python -m benchmarks.env_throughput --sizes=1,64 --steps=50 --repeats=2
  python -m benchmarks.env_throughput --envs=boxworld --viewport=5
  python -m benchmarks.env_throughput --sizes=64,1024 --cpu_plan=device_per_core

On a CPU `--cpu_plan` (rmc_jax/training/cpu_plan.py) sets the devices and
threads: "auto" keeps XLA's threaded device (there is no memory core to size
a plan by); under "device_per_core" the episodes are split over one
single-threaded device per core, as in the RL launcher's data-parallel mesh.
"""

from __future__ import annotations

import json
import platform
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from rmc_jax.rl.envs import AutoReset, BoxWorld, MiniPacman
from rmc_jax.training import cpu_plan
from rmc_jax.training.mesh import DATA_AXIS
from rmc_jax.training.mesh import DataMesh

_ENVS = flags.DEFINE_list("envs", ["mini_pacman", "boxworld"],
                          "Environments to time.")
_SIZES = flags.DEFINE_list("sizes", ["1", "64", "1024", "8192"],
                           "Numbers of parallel episodes.")
_STEPS = flags.DEFINE_integer("steps", 100, "Steps per timed scan.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per size.")
_VIEWPORT = flags.DEFINE_integer("viewport", 0,
                                 "Viewport size (0: full observation).")
_AUTO_RESET = flags.DEFINE_bool("auto_reset", True,
                                "Wrap the environment in AutoReset.")
_CPU_PLAN = flags.DEFINE_enum(
    "cpu_plan", "auto", cpu_plan.PLANS,
    "CPU devices and threads (rmc_jax/training/cpu_plan.py); ignored on "
    "accelerators.")
_JSON = flags.DEFINE_string("json", None, "Also write the results here.")


def make_env(name: str, viewport: int | None):
  if name == "mini_pacman":
    return MiniPacman("regular", viewport=viewport)
  if name == "boxworld":
    return BoxWorld(viewport=viewport)
  raise ValueError(f"Unknown environment {name!r}.")


def time_env(name: str, batch: int, steps: int, repeats: int,
             viewport: int | None, auto_reset: bool, mesh: DataMesh) -> dict:
  """Compiles and times `steps` vmapped steps of `batch` episodes, split
  over the devices of `mesh`."""
  env = make_env(name, viewport)
  if auto_reset:
    env = AutoReset(env)
  num_actions = env.action_spec().num_values
  keys = jax.device_put(jax.random.split(jax.random.PRNGKey(0), batch),
                        mesh.batch_sharding)
  states, first = jax.jit(jax.vmap(env.reset))(keys)
  actions_TB = jax.device_put(np.random.default_rng(0).integers(
      0, num_actions, (steps, batch), dtype=np.int32),
                              NamedSharding(mesh.mesh, P(None, DATA_AXIS)))

  @jax.jit
  def run(states, obs_B, actions_TB):
    def body(carry, actions_B):
      states, _, episodes = carry
      states, ts = jax.vmap(env.step)(states, actions_B)
      return (states, ts.observation, episodes + ts.last().sum()), None

    carry, _ = jax.lax.scan(body, (states, obs_B, jnp.zeros((), jnp.int32)),
                            actions_TB)
    return carry

  start = time.perf_counter()
  out = run(states, first.observation, actions_TB)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = run(states, first.observation, actions_TB)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  seconds = float(np.median(times))
  return dict(env=name, batch=batch, steps=steps,
              obs_shape=list(first.observation.shape[1:]),
              steps_per_s=batch * steps / seconds,
              us_per_batched_step=1e6 * seconds / steps,
              episodes_ended=int(out[2]), compile_and_first_s=compile_s,
              median_s=seconds)


def main(argv):
  del argv
  viewport = _VIEWPORT.value or None
  plan = cpu_plan.apply(cpu_plan.choose_for_process(_CPU_PLAN.value, []))
  mesh = DataMesh()
  uneven = [s for s in _SIZES.value if int(s) % mesh.num_devices]
  if uneven:
    raise app.UsageError(f"--sizes: {uneven} do not divide over the "
                         f"{mesh.num_devices} devices of --cpu_plan="
                         f"{plan.name}.")
  print(f"# cpu plan: {plan.name} ({plan.reason})")
  device = jax.devices()[0]
  print(f"# device: {device.platform} ({device.device_kind}), "
        f"{len(jax.devices())} device(s); host {platform.processor() or '?'}"
        f"; viewport={viewport}; auto_reset={_AUTO_RESET.value}; "
        f"steps per scan={_STEPS.value}; median of {_REPEATS.value}")
  header = (f"{'env':<12} {'obs':<12} {'episodes':>8} {'steps/s':>12} "
            f"{'us/step':>9} {'ended':>6} {'compile s':>9}")
  print(header)
  print("-" * len(header))
  results = []
  for name in _ENVS.value:
    for size in _SIZES.value:
      r = dict(time_env(name, int(size), _STEPS.value, _REPEATS.value,
                        viewport, _AUTO_RESET.value, mesh),
               cpu_plan=plan.name)
      results.append(r)
      obs = "x".join(map(str, r["obs_shape"]))
      print(f"{name:<12} {obs:<12} {r['batch']:>8} {r['steps_per_s']:>12,.0f} "
            f"{r['us_per_batched_step']:>9.1f} {r['episodes_ended']:>6} "
            f"{r['compile_and_first_s']:>9.2f}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(dict(device=str(device), results=results), f, indent=1)


if __name__ == "__main__":
  app.run(main)

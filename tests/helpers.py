"""What several test modules share: subprocess environments and tiny configs."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small Nth-farthest RMC, as launcher flags (the in-process configs of the
# tests set the same values).
TINY_NTH_FLAGS = (
    "--config.batch_size=16",
    "--config.num_objects=3",
    "--config.num_features=2",
    "--config.mlp_sizes=(16,)",
    "--config.rmc.mem_slots=2",
    "--config.rmc.head_size=8",
    "--config.rmc.num_heads=2",
    "--config.eval_batches=1",
    "--config.eval_batch_size=16",
)


def subprocess_env(num_devices: int | None = None) -> dict:
  """The environment of a CPU subprocess, with `num_devices` fake devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if num_devices is not None:
    flag = f"--xla_force_host_platform_device_count={num_devices}"
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}"
  return env

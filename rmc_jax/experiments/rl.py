"""Reinforcement learning: `--config=rl:VARIANT`.

Variants (agent after the paper's BoxWorld agent: two 2x2
convolutions with 12 and 24 channels and x/y coordinate planes, a core, policy
and value heads; V-trace actor-critic, entropy cost 0.005, discount 0.99):
  mini_pacman_viewport: Mini PacMan, 'regular' rewards, 5x5 viewport.
  mini_pacman_full:     Mini PacMan, full 15x19 observation.
  boxworld_viewport:    BoxWorld 14x14 (12x12 room), solution length 1-5,
                        0-5 distractor branches of length 1, 5x5 viewport.
  cpu:                  a small BoxWorld (6x6 room, solution length 1, no
                        distractors, full view) that a CPU learns in minutes.
  cpu_pacman:           Mini PacMan 'regular', full view, short episodes.
The paper's RMC: 4 slots, 4 heads, 1024 total units (head 64), 1 block,
'memory' gating. Rollouts run in-graph on `batch_size` parallel episodes;
there is no held-out evaluation: the training returns are the curve
(`episode_return` in metrics.jsonl, split 'train').
"""

from __future__ import annotations

import ml_collections

from rmc_jax.experiments.base import ResultsSpec
from rmc_jax.rl import envs as envs_lib
from rmc_jax.rl.agent import make_actor_critic
from rmc_jax.rl.learner import actor_critic_task
from rmc_jax.training import config as config_lib
from rmc_jax.training.config import ConfigError
from rmc_jax.training.task import Task

NAME = "rl"
VARIANTS = ("mini_pacman_viewport", "mini_pacman_full", "boxworld_viewport",
            "cpu", "cpu_pacman")
RESULTS = ResultsSpec(
    title="Reinforcement learning", split="train", metric="episode_return",
    higher_is_better=True, metrics={"episode_return": "mean episode return"},
    # Mini PacMan: mean episode return; BoxWorld: % of levels solved.
    paper={"rows": (
        ("Mini PacMan, viewport (return)", "677", "550 (LSTM)"),
        ("Mini PacMan, full observation (return)", "1159", "598 (LSTM)"),
        ("BoxWorld (% levels solved)", "98%", "73% (ConvLSTM)"),
    )})


def get_config(variant: str = "cpu") -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ConfigError(f"unknown {NAME} variant {variant!r}; expected one of "
                      f"{VARIANTS}")
  c = config_lib.base_config(NAME)
  c.env = "boxworld"
  c.env_kwargs = {}
  c.unroll_length = 40
  c.batch_size = 32  # Parallel episodes (IMPALA's 32 trajectories per batch).
  c.discount = 0.99
  c.entropy_cost = 0.005
  c.baseline_cost = 0.5
  c.random_policy = False
  c.conv_channels = (12, 24)
  c.head_hidden = (256,)
  c.learning_rate = 2e-4
  c.grad_clip_norm = 40.0
  c.num_steps = 1_000_000
  c.log_every = 100
  c.checkpoint_every = 5_000
  c.rmc.update(mem_slots=4, num_heads=4, head_size=64, gate_style="memory")
  c.lstm.update(hidden_sizes=(256,))
  # The paper's BoxWorld baseline: a ConvLSTM of 64 channels, 2x2 kernel,
  # over the torso's feature maps (input_shape is the observation's grid,
  # filled in by make_task).
  c.convlstm = ml_collections.ConfigDict(dict(channels=(64,), kernel_size=2),
                                         type_safe=False)

  # The paper variants see RGB pixels, as the paper's agents did; the CPU
  # variants keep the symbolic observations (smaller inputs).
  if variant.startswith("mini_pacman"):
    c.env = "mini_pacman"
    c.env_kwargs = dict(mode="regular", observation_type="rgb",
                        viewport=5 if variant.endswith("viewport") else None)
  elif variant == "boxworld_viewport":
    c.env_kwargs = dict(viewport=5, observation_type="rgb")
  elif variant == "cpu":
    c.env_kwargs = dict(room_size=6, min_solution_length=1,
                        max_solution_length=1, min_distractors=0,
                        max_distractors=0, num_colours=4, frame_cap=50)
  elif variant == "cpu_pacman":
    c.env = "mini_pacman"
    c.env_kwargs = dict(mode="regular", frame_cap=200)
  if variant.startswith("cpu"):
    c.batch_size = 64
    c.unroll_length = 20
    # At 1e-3 the RMC's returns collapsed on `cpu`; 3e-4 trains both cores.
    c.learning_rate = 3e-4
    c.num_steps = 3_000
    c.log_every = 25
    c.checkpoint_every = 500
    c.head_hidden = (64,)
    c.rmc.update(mem_slots=2, num_heads=2, head_size=32)
    c.lstm.update(hidden_sizes=(128,))
    c.convlstm.update(channels=(16,))
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  config_lib.validate(config)
  if config.unroll_length < 1:
    raise ConfigError(f"--config.unroll_length={config.unroll_length}: "
                      "expected a positive integer.")
  if not 0 <= config.discount <= 1:
    raise ConfigError(f"--config.discount={config.discount}: expected a "
                      "value in [0, 1].")
  make_env(config)


def make_env(config: ml_collections.ConfigDict) -> envs_lib.Environment:
  """The auto-resetting environment of a config (`env`, `env_kwargs`)."""
  if config.env not in envs_lib.ENVIRONMENTS:
    raise ConfigError(f"--config.env={config.env!r}: expected one of "
                      f"{sorted(envs_lib.ENVIRONMENTS)}.")
  try:
    env = envs_lib.ENVIRONMENTS[config.env](**dict(config.env_kwargs))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--config.env_kwargs: {e}") from None
  return envs_lib.AutoReset(env)


def make_task(config: ml_collections.ConfigDict) -> Task:
  validate(config)
  env = make_env(config)
  obs_shape = env.observation_spec().shape
  core_kwargs = config_lib.core_kwargs(config)
  if config.core == "convlstm":
    core_kwargs.setdefault("input_shape", tuple(obs_shape[:2]))
  net = make_actor_critic(
      obs_shape, env.action_spec().num_values,
      core_name=config.core, core_kwargs=core_kwargs,
      conv_channels=tuple(config.conv_channels),
      head_hidden=tuple(config.head_hidden), precision=config.precision)
  return actor_critic_task(
      env, net, batch_size=config.batch_size,
      unroll_length=config.unroll_length, discount=config.discount,
      baseline_cost=config.baseline_cost, entropy_cost=config.entropy_cost,
      random_policy=config.random_policy, env_seed=config.seed + 1)

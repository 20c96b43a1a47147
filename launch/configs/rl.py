"""RL configs: `--config=launch/configs/rl.py:VARIANT`.

Variants (spec section 5; agent after the paper's BoxWorld agent: two 2x2
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
'memory' gating. Rollouts run in-graph on `batch_size` parallel episodes.
"""

from rmc_jax.training.config import base_config

VARIANTS = ("mini_pacman_viewport", "mini_pacman_full", "boxworld_viewport",
            "cpu", "cpu_pacman")


def get_config(variant: str = "cpu"):
  if variant not in VARIANTS:
    raise ValueError(f"Unknown rl variant {variant!r}; expected one of "
                     f"{VARIANTS}.")
  c = base_config()
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
  c.eval_every = 1_000_000_000  # No held-out evaluation: training returns are the curve.
  c.checkpoint_every = 5_000
  c.rmc.update(mem_slots=4, num_heads=4, head_size=64, gate_style="memory")
  c.lstm.update(hidden_sizes=(256,))

  if variant.startswith("mini_pacman"):
    c.env = "mini_pacman"
    c.env_kwargs = dict(mode="regular",
                        viewport=5 if variant.endswith("viewport") else None)
  elif variant == "boxworld_viewport":
    c.env_kwargs = dict(viewport=5)
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
  return c

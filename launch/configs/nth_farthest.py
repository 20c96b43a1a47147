"""Nth-farthest configs: `--config=launch/configs/nth_farthest.py:VARIANT`.

Variants:
  paper:  the paper's task (8 objects x 16 features, batch 1600) with an RMC
          of 2048 total units (8 slots x 8 heads x 32), unit gating, 1 block.
  sonnet: Sonnet's example script as it actually runs (4 objects x 4
          features, batch 1600, its flag quirk: N=4, H=4, 4 blocks,
          head_size 2048, so F = 8192), with Sonnet's generator semantics.
  cpu:    a small setting in which the RMC leaves the plateau within minutes
          on a 2-core CPU (see WORKSPACE_NOTES.md for how it was chosen).
All use Adam on Sonnet's schedule unless overridden.
"""

from rmc_jax.training.config import base_config

VARIANTS = ("paper", "sonnet", "cpu")


def get_config(variant: str = "cpu"):
  if variant not in VARIANTS:
    raise ValueError(f"Unknown nth_farthest variant {variant!r}; expected one "
                     f"of {VARIANTS}.")
  c = base_config()
  c.num_objects = 8
  c.num_features = 16
  c.sonnet_compat = False
  # Curriculum over objects: start with min_objects (0 = off) and add one
  # every objects_step steps until num_objects.
  c.min_objects = 0
  c.objects_step = 0
  c.mlp_sizes = (256, 256, 256, 256)
  c.eval_batches = 4
  c.eval_batch_size = 1600
  # Sonnet: max(1e-4 * 0.9**(step / 10_000), 8e-5).
  c.learning_rate = 1e-4
  c.min_learning_rate = 8e-5
  c.lr_decay_steps = 10_000
  c.lr_decay_rate = 0.9
  c.batch_size = 1600
  c.num_steps = 1_000_000
  c.log_every = 100
  c.eval_every = 2_000
  c.checkpoint_every = 2_000
  c.rmc.update(mem_slots=8, num_heads=8, head_size=32, gate_style="unit")
  c.lstm.hidden_sizes = (1024,)

  if variant == "sonnet":
    c.num_objects = 4
    c.num_features = 4
    c.sonnet_compat = True
    c.rmc.update(mem_slots=4, num_heads=4, num_blocks=4, head_size=2048)
  elif variant == "cpu":
    c.num_objects = 3
    c.num_features = 2
    c.batch_size = 256
    c.learning_rate = 5e-4
    c.min_learning_rate = 0.0
    c.lr_decay_steps = 0
    c.num_steps = 2_500
    c.log_every = 50
    c.eval_every = 250
    c.checkpoint_every = 500
    c.eval_batches = 4
    c.eval_batch_size = 512
    c.rmc.update(mem_slots=4, num_heads=4, head_size=32)
    c.lstm.hidden_sizes = (512,)
  return c

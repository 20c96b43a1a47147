"""Learning to Execute configs: `--config=launch/configs/learn_to_execute.py:VARIANT`.

Variants:
  paper:  the paper's setting (spec 3.1): batch 128, 200K steps, Adam 1e-3,
          Mix curriculum, literal length 5, nesting 2, RMC with 4 slots,
          4 heads, 1024 total units and 'memory' (scalar) gating, decoder on
          zero inputs. Choose the Table-1 task with --config.task=addition |
          control | all | copy | reverse | double (memory tasks use nesting 1).
  cpu:    a small model and task that learn visibly on a 2-core CPU in
          about 10 minutes (see WORKSPACE_NOTES.md).
"""

from rmc_jax.training.config import base_config

VARIANTS = ("paper", "cpu")
MEMORY_TASKS = ("copy", "reverse", "double")


def get_config(variant: str = "cpu"):
  if variant not in VARIANTS:
    raise ValueError(f"Unknown learn_to_execute variant {variant!r}; expected "
                     f"one of {VARIANTS}.")
  c = base_config()
  c.task = "addition"
  c.max_length = 5
  c.max_nesting = 2
  c.curriculum = "mix"
  c.curriculum_loss_threshold = 0.1
  c.curriculum_min_tries = 10
  c.teacher_forcing = False
  c.mlp_sizes = (256, 256, 256, 256)
  c.eval_samples = 12_800
  c.eval_batch_size = 1_280
  c.batch_size = 128
  c.num_steps = 200_000
  c.learning_rate = 1e-3
  c.log_every = 100
  c.eval_every = 5_000
  c.checkpoint_every = 5_000
  # 4 slots x 4 heads x 64 = 1024 total units; scalar gating.
  c.rmc.update(mem_slots=4, num_heads=4, head_size=64, gate_style="memory")
  c.lstm.update(hidden_sizes=(1024, 1024), skip_connections=True)
  # The paper's DNC: memory 80 x 64, 4 reads, 1 write, 2-layer controller
  # (LSTM for programs; use --config.dnc.controller=feedforward for the
  # memorisation tasks, as the paper did).
  c.dnc.update(memory_size=80, word_size=64, num_reads=4, num_writes=1,
               controller="lstm", controller_sizes=(256, 256))
  if variant == "cpu":
    c.max_length = 2
    c.max_nesting = 1
    c.num_steps = 3_000
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 500
    c.eval_samples = 2_560
    c.eval_batch_size = 1_280
    c.mlp_sizes = (128, 128)
    c.rmc.update(mem_slots=2, num_heads=2, head_size=32)
    c.lstm.update(hidden_sizes=(256,), skip_connections=False)
    c.dnc.update(memory_size=16, word_size=16, num_reads=2,
                 controller_sizes=(128,))
  return c

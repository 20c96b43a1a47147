r"""Generates text from a language-model checkpoint, carrying the recurrent state.

  python -m launch.sample_lm --workdir=workdirs/lm_synthetic \
      --prompt="w3 w17" --length=50 --temperature=0.8 --top_k=20

The model and corpus settings are read from WORKDIR/config.json; the latest
checkpoint's parameters are used. Prompt words outside the vocabulary map to
<unk>.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax

from launch.configs import lm as lm_configs
from rmc_jax.lm import task as lm_task
from rmc_jax.training.loop import restore_latest

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Words to start from (space separated).")
_LENGTH = flags.DEFINE_integer("length", 100, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  path = os.path.join(_WORKDIR.value, "config.json")
  if not os.path.exists(path):
    sys.exit(f"error: --workdir: {path} not found (not a train_lm workdir?)")
  # The saved values over the current defaults, so that a workdir written
  # before a field existed still loads (every LM variant has the same fields).
  config = lm_configs.get_config()
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  config.update(saved)
  if _LENGTH.value < 1 or _TEMPERATURE.value <= 0 or _TOP_K.value < 0:
    sys.exit("error: --length must be >= 1, --temperature > 0, --top_k >= 0.")
  setup = lm_task.make_setup(config)
  vocab = setup.corpus.vocab
  try:
    state, step = restore_latest(setup.task, config, _WORKDIR.value)
  except FileNotFoundError as e:
    sys.exit(f"error: --workdir: {e}")
  words = _PROMPT.value.split() or ["<eos>"]
  prompt_ids = vocab.encode(words)
  out = lm_task.sample(jax.device_get(state.params), config, len(vocab), prompt_ids,
                       _LENGTH.value, _TEMPERATURE.value, _TOP_K.value,
                       _SEED.value)
  text = " ".join(vocab.decode(out)).replace(" <eos> ", "\n")
  print(f"[step {step}] {' '.join(words)} || {text}")


if __name__ == "__main__":
  app.run(main)

r"""Generates text from a language-model run, carrying the recurrent state.

  python -m launch.sample_lm --workdir=workdirs/lm_synthetic \
      --prompt="w3 w17" --length=50 --temperature=0.8 --top_k=20 --top_p=0.9

The model and corpus settings are read from WORKDIR/config.json and the
latest checkpoint's parameters are used; the run directory is only read.
Prompt words outside the vocabulary map to <unk>. Each token is drawn from
the softmax of log-probabilities / temperature, restricted to the top_k most
likely (top_k > 0), then to the nucleus of mass top_p (top_p < 1); see
`rmc_jax.lm.sampling.filter_logits`.
"""

from absl import app
from absl import flags

from launch import common
from rmc_jax.experiments import lm
from rmc_jax.lm import sampling
from rmc_jax.training import runs

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.", required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Words to start from (space separated).")
_LENGTH = flags.DEFINE_integer("length", 100, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely (0: all).")
_TOP_P = flags.DEFINE_float(
    "top_p", 1.0, "Sample among the fewest most likely tokens holding this "
    "much probability, in (0, 1] (1: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  if _LENGTH.value < 1:
    common.fail(f"--length={_LENGTH.value}: expected >= 1.")
  try:
    sampling.check_options(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  except ValueError as e:
    common.fail(f"--{e}")
  try:
    run = runs.load_run(_WORKDIR.value, experiment=lm.NAME)
  except (*common.RUN_ERRORS, FileNotFoundError, ValueError) as e:
    common.fail(f"--workdir: {e}")
  if run.config.experiment != lm.NAME:
    common.fail(f"--workdir: {run.workdir} is a {run.config.experiment!r} "
                "run, not a language model")
  vocab = lm.load_corpus(run.config).vocab
  words = _PROMPT.value.split() or ["<eos>"]
  out = sampling.sample(run.params, lambda: lm.make_model(run.config, len(vocab)),
                        vocab.encode(words), _LENGTH.value, _TEMPERATURE.value,
                        _TOP_K.value, _TOP_P.value, _SEED.value)
  text = " ".join(vocab.decode(out)).replace(" <eos> ", "\n")
  print(f"[step {run.step}] {' '.join(words)} || {text}")


if __name__ == "__main__":
  app.run(main)

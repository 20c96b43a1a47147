r"""Trains (or evaluates) a word-level language model.

  python -m launch.train_lm --workdir=workdirs/lm_synthetic            # synthetic corpus
  python -m launch.train_lm --config=launch/configs/lm.py:wikitext103 \
      --config.data_dir=/data/wikitext-103 --workdir=workdirs/wt103_rmc
  python -m launch.train_lm --config=...:wikitext103 --config.data_dir=... \
      --workdir=workdirs/wt103_rmc --config.eval_only=true   # valid + test of the last checkpoint

After training, the last checkpoint is evaluated on the test split (split
'test' in metrics.jsonl and summary.json). Rerunning on a workdir resumes.
"""

from absl import app
from absl import flags

from launch import common
from rmc_jax.lm import corpora
from rmc_jax.lm import task as lm_task

_CONFIG = common.define_config_flag("launch/configs/lm.py:synthetic")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  setup = {}

  def make_task():
    setup["lm"] = lm_task.make_setup(config)
    return setup["lm"].task

  summary = common.run(make_task, config, _WORKDIR.value, validate=_validate,
                       final_evals=lambda: {"test": setup["lm"].test_batches},
                       eval_only=config.eval_only)
  entropy = setup["lm"].true_entropy
  if entropy is not None and "test" in summary:
    print(f"synthetic corpus: true entropy {entropy:.4f} nats/token; model "
          f"test loss {summary['test']['loss']:.4f} "
          f"(+{summary['test']['loss'] - entropy:.4f})")


def _validate(config):
  try:
    corpora.canonical_dataset(config.dataset)
  except corpora.DataError as e:
    raise common.ConfigError(f"--config.dataset: {e}") from None
  if config.softmax not in ("adaptive", "full"):
    raise common.ConfigError(f"--config.softmax={config.softmax!r}: expected "
                             "'adaptive' or 'full'.")
  if config.tie_embeddings and config.softmax != "full":
    raise common.ConfigError("--config.tie_embeddings=true needs "
                             "--config.softmax=full.")
  if config.vocab_size and config.vocab_size < 2:
    raise common.ConfigError(f"--config.vocab_size={config.vocab_size}: "
                             "expected 0 (all words) or at least 2 (<unk> "
                             "and <eos>).")
  if config.unroll_length < 1 or config.embed_size < 1:
    raise common.ConfigError("--config.unroll_length and --config.embed_size "
                             "must be positive.")
  if config.dataset != "synthetic" and not config.data_dir:
    raise common.ConfigError(f"--config.data_dir is required for dataset "
                             f"{config.dataset!r}.")


if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)

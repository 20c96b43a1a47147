"""Tests for the word-level language model: model, Task, loop, launchers.

Covers what rmc_jax.lm and rmc_jax.experiments.lm document and the launchers
promise:

  1. the recurrent state is carried across truncated-BPTT segments (segment 1
     then segment 2 with the carry == one segment of twice the length), and
     the training loop really threads it (its logged losses and checkpointed
     carries equal a recomputation from the checkpoints);
  2. 'reset' flags restart a lane from the core's initial state;
  3. evaluation over a whole split is exact per token (padding and mask
     included), against a token-by-token reference;
  4. 8 fake CPU devices train exactly like 1 (subprocess);
  5. a briefly trained LM gets close to the synthetic corpus's entropy rate;
  6. the adaptive softmax and tied embeddings train through the LM;
  7. bad launcher input is one 'error:' line naming the flag or file;
  8. launch.train (--config=lm:...) + launch.sample_lm run end to end.

References are independent of the code under test where it matters: the
token-by-token reference uses `next_token_log_probs` (the core's one-step
`__call__` and the softmax's `log_probs`), not the batched `unroll`/`nll`
path the Task uses. Models are tiny (the machine has 2 shared cores); every
corpus is written under pytest's tmp dirs (`cache_dir`), never ~/.cache.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import types

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax.experiments import lm as lm_experiment
from rmc_jax.lm import batcher as batcher_lib
from rmc_jax.lm import synthetic
from rmc_jax.lm import sampling
from rmc_jax.training import loop
from rmc_jax.training import runs
from rmc_jax.training import steps
from rmc_jax.training.checkpoint import Checkpointer
from rmc_jax.training.mesh import DataMesh
from tests.helpers import REPO_ROOT, subprocess_env

# A small synthetic source: 16 words, bigram (order 1), 2 successors per
# context. Its entropy rate is about 0.522 nats/token.
SOURCE = dict(num_words=16, order=1, branching=2, eos_prob=0.05, seed=0)


def tiny_config(cache_dir, core: str = "lstm", train_tokens: int = 2_000,
                valid_tokens: int = 300, test_tokens: int = 300, **overrides):
  """The launcher's synthetic variant shrunk to a model that compiles fast."""
  c = lm_experiment.get_config("synthetic")
  c.core = core
  c.cache_dir = str(cache_dir)
  c.reader_options = dict(SOURCE, train_tokens=train_tokens,
                          valid_tokens=valid_tokens, test_tokens=test_tokens)
  c.embed_size = 16
  c.lstm.hidden_sizes = (16,)
  c.rmc.update(mem_slots=2, head_size=8, num_heads=2, attention_mlp_layers=1)
  c.batch_size = 4
  c.eval_batch_size = 3
  c.unroll_length = 8
  c.log_every = 1
  c.eval_every = 1000
  c.checkpoint_every = 1000
  c.update(overrides)
  return c


class Fns:
  """Jitted pure functions of the config's LanguageModel (the library's)."""

  def __init__(self, config, vocab_size: int):

    def forward(batch, state):
      lm = lm_experiment.make_model(config, vocab_size)
      return lm(batch["inputs"], batch["targets"], batch["reset"], state,
                False)

    def initial_state(batch_size):
      return lm_experiment.make_model(config, vocab_size).initial_state(batch_size)

    def stream_nll(tokens_N):
      """Per-target NLL [N - 1] of one lane read token by token from scratch."""
      lm = lm_experiment.make_model(config, vocab_size)

      def body(state, pair):
        token, target = pair
        log_probs_1V, state = lm.next_token_log_probs(token[None], state)
        return state, -log_probs_1V[0, target]

      _, nll = hk.scan(body, lm.initial_state(1),
                       (tokens_N[:-1], tokens_N[1:]))
      return nll

    self.forward = jax.jit(hk.without_apply_rng(hk.transform(forward)).apply)
    self.initial_state = lambda b: hk.transform(initial_state).apply(
        {}, None, b)
    self.stream_nll = jax.jit(
        hk.without_apply_rng(hk.transform(stream_nll)).apply)


def model_batch(batch):
  """The keys `Fns.forward` reads, as jnp arrays."""
  return {k: jnp.asarray(batch[k]) for k in ("inputs", "targets", "reset")}


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(
      lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) -
                                       np.asarray(y, np.float64)), initial=0)),
      a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def make_setup(config) -> types.SimpleNamespace:
  """The experiment's Task and the corpus it reads."""
  return types.SimpleNamespace(task=lm_experiment.make_task(config),
                               corpus=lm_experiment.load_corpus(config))


def restore_state(workdir: str, setup, config, step: int,
                  mesh: DataMesh | None = None):
  """The TrainState saved at `step`, into the loop's abstract state."""
  target = steps.abstract_train_state(setup.task, config, mesh or DataMesh())
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    state, _, _ = ckpt.restore(step, target=target)
  return state


def rows(workdir: str, split: str) -> list[dict]:
  return [r for r in runs.read_jsonl(
      os.path.join(workdir, "metrics.jsonl")) if r["split"] == split]


# -- 1, 2. Carried state and reset flags ---------------------------------------


@pytest.mark.parametrize("core", ["lstm", "rmc"])
def test_carry_then_segment_equals_one_long_segment(tmp_path, core):
  config = tiny_config(tmp_path, core)
  setup = make_setup(config)
  fns = Fns(config, len(setup.corpus.vocab))
  b, t = config.batch_size, config.unroll_length
  batcher = setup.task.train_iterator
  first, second = batcher.batch_at(0, 0), batcher.batch_at(0, 1)
  # The same lanes walked 2T pairs at a time: its first segment is the
  # concatenation of the two T-segments (checked, so the comparison is fair).
  long = batcher_lib.TBPTTBatcher(setup.corpus.splits["train"], b,
                                  2 * t).batch_at(0, 0)
  for key in ("inputs", "targets"):
    np.testing.assert_array_equal(
        long[key], np.concatenate([first[key], second[key]], axis=1))
  assert first["reset"].all() and not second["reset"].any()

  params = jax.jit(setup.task.init)(jax.random.PRNGKey(0), first)
  fresh = fns.initial_state(b)
  nll1, carry = fns.forward(params, model_batch(first), fresh)
  nll2, final = fns.forward(params, model_batch(second), carry)
  nll_long, final_long = fns.forward(params, model_batch(long), fresh)
  assert max_abs_diff(nll1, nll_long[:, :t]) <= 1e-5
  assert max_abs_diff(nll2, nll_long[:, t:]) <= 1e-5
  chex.assert_trees_all_close(final, final_long, atol=1e-5, rtol=0)

  # The carry matters: segment 2 from a fresh state gives other NLLs.
  nll2_fresh, _ = fns.forward(params, model_batch(second), fresh)
  assert max_abs_diff(nll2_fresh, nll2) > 1e-3


def test_reset_flags_restart_their_lanes(tmp_path):
  config = tiny_config(tmp_path, "lstm")
  setup = make_setup(config)
  fns = Fns(config, len(setup.corpus.vocab))
  batch = setup.task.train_iterator.batch_at(0, 1)
  params = jax.jit(setup.task.init)(jax.random.PRNGKey(0), batch)
  b = config.batch_size
  fresh = fns.initial_state(b)
  # An arbitrary (large) incoming state, so that ignoring it would show.
  leaves, treedef = jax.tree.flatten(fresh)
  keys = jax.random.split(jax.random.PRNGKey(3), len(leaves))
  garbage = jax.tree.unflatten(treedef, [
      3.0 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])

  reset = np.array([True, False, True, False])
  mixed = dict(model_batch(batch), reset=jnp.asarray(reset))
  nll_mixed, state_mixed = fns.forward(params, mixed, garbage)
  all_reset = dict(mixed, reset=jnp.ones(b, bool))
  nll_fresh, state_fresh = fns.forward(params, all_reset, garbage)
  no_reset = dict(mixed, reset=jnp.zeros(b, bool))
  nll_carried, state_carried = fns.forward(params, no_reset, garbage)
  # Resetting from garbage == starting from the initial state.
  nll_initial, _ = fns.forward(params, no_reset, fresh)
  assert max_abs_diff(nll_fresh, nll_initial) <= 1e-6
  assert max_abs_diff(nll_fresh, nll_carried) > 1e-2  # The state matters.

  nll_mixed, nll_fresh, nll_carried = map(np.asarray,
                                          (nll_mixed, nll_fresh, nll_carried))
  np.testing.assert_allclose(nll_mixed[reset], nll_fresh[reset], atol=1e-6)
  np.testing.assert_allclose(nll_mixed[~reset], nll_carried[~reset],
                             atol=1e-6)
  for got, want_fresh, want_carried in zip(jax.tree.leaves(state_mixed),
                                           jax.tree.leaves(state_fresh),
                                           jax.tree.leaves(state_carried)):
    np.testing.assert_allclose(got[reset], want_fresh[reset], atol=1e-6)
    np.testing.assert_allclose(got[~reset], want_carried[~reset], atol=1e-6)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 3-step loop run whose epoch has 2 segments: step 3 restarts the lanes.

  Checkpoints after every step. The eval batch size does not divide the
  valid stream (padding and mask are exercised).
  """
  tmp = tmp_path_factory.mktemp("trained")
  config = tiny_config(tmp / "cache", "lstm", train_tokens=200,
                       valid_tokens=150, num_steps=3, checkpoint_every=1,
                       keep_checkpoints=3, learning_rate=1e-2)
  corpus = lm_experiment.load_corpus(config)
  lane_len = (corpus.splits["train"].shape[0] - 1) // config.batch_size
  config.unroll_length = lane_len // 2  # Exactly 2 segments per epoch.
  num_targets = corpus.splits["valid"].shape[0] - 1
  config.eval_batch_size = next(b for b in (3, 5, 7) if num_targets % b)
  setup = make_setup(config)
  assert setup.task.train_iterator.segments_in_epoch(0) == 2
  workdir = str(tmp / "run")
  summary = loop.train(setup.task, config, workdir).summary
  assert summary["status"] == "completed" and summary["step"] == 3
  return dict(config=config, setup=setup, workdir=workdir, summary=summary,
              fns=Fns(config, len(setup.corpus.vocab)))


def test_loop_threads_the_carry_and_resets_each_epoch(trained):
  config, setup, fns = trained["config"], trained["setup"], trained["fns"]
  workdir = trained["workdir"]
  states = {s: restore_state(workdir, setup, config, s) for s in (1, 2, 3)}
  logged = {r["step"]: r["loss"] for r in rows(workdir, "train")}
  assert sorted(logged) == [1, 2, 3]
  batcher = setup.task.train_iterator
  fresh = fns.initial_state(config.batch_size)

  def mean_nll(params, batch, state):
    nll, state = fns.forward(params, model_batch(batch), state)
    return float(np.mean(nll)), state

  # Step 2 = epoch 0, segment 1: continues from the carry of step 1.
  batch = batcher.batch_at(0, 1)
  carried, carry = mean_nll(states[1].params, batch, states[1].carry)
  from_scratch, _ = mean_nll(states[1].params, batch, fresh)
  assert abs(logged[2] - carried) <= 1e-5, (logged[2], carried)
  assert abs(carried - from_scratch) > 1e-3  # Resetting would differ.
  chex.assert_trees_all_close(states[2].carry, carry, atol=1e-5, rtol=0)

  # Step 3 = epoch 1, segment 0: its 'reset' flags restart every lane.
  batch = batcher.batch_at(1, 0)
  assert batch["reset"].all()
  restarted, carry = mean_nll(states[2].params, batch, states[2].carry)
  from_scratch, _ = mean_nll(states[2].params, batch, fresh)
  kept, _ = mean_nll(states[2].params, dict(batch, reset=np.zeros_like(
      batch["reset"])), states[2].carry)
  assert abs(restarted - from_scratch) <= 1e-6
  assert abs(logged[3] - restarted) <= 1e-5, (logged[3], restarted)
  assert abs(kept - restarted) > 1e-3
  chex.assert_trees_all_close(states[3].carry, carry, atol=1e-5, rtol=0)


# -- 3. Exact evaluation -------------------------------------------------------


def lanes_reference(fns, params, tokens_N: np.ndarray, batch_size: int
                    ) -> float:
  """Mean NLL over the N - 1 targets, each of the eval layout's lanes read
  token by token from the initial state (batcher docstring: lane b holds
  pairs [b L', (b + 1) L') with L' = ceil((N - 1) / B))."""
  num_targets = tokens_N.shape[0] - 1
  lane_len = math.ceil(num_targets / batch_size)
  total, count = 0.0, 0
  for start in range(0, num_targets, lane_len):
    stop = min(start + lane_len, num_targets)
    nll = np.asarray(fns.stream_nll(params, jnp.asarray(
        tokens_N[start:stop + 1], jnp.int32)), np.float64)
    total, count = total + nll.sum(), count + nll.size
  assert count == num_targets
  return total / count


def test_evaluation_is_exact_per_token(trained):
  config, setup, fns = trained["config"], trained["setup"], trained["fns"]
  workdir = trained["workdir"]
  valid_N = np.asarray(setup.corpus.splits["valid"])
  num_targets = valid_N.shape[0] - 1
  params = restore_state(workdir, setup, config, 3).params

  # One lane: the loop's evaluator equals reading the whole stream token by
  # token (T does not divide N - 1: the last segment is padded).
  single = steps.Evaluator(setup.task, DataMesh())(
      params, batcher_lib.EvalBatches(valid_N, 1, config.unroll_length))
  single = setup.task.summarize(single)
  nll_N = np.asarray(fns.stream_nll(params, jnp.asarray(valid_N, jnp.int32)),
                     np.float64)
  assert nll_N.shape == (num_targets,)
  assert num_targets % config.unroll_length
  assert abs(single["loss"] - nll_N.mean()) <= 1e-5, (single, nll_N.mean())
  assert single["perplexity"] == pytest.approx(math.exp(single["loss"]))

  # B lanes with B not dividing N - 1 (short last lane, padded segments).
  b = config.eval_batch_size
  batches = setup.task.eval_splits["eval"]
  assert batches.batch_size == b and num_targets % b
  masks = np.stack([batch["mask"] for batch in batches])
  assert masks.sum() == num_targets and (masks == 0).any()
  reference = lanes_reference(fns, params, valid_N, b)
  lanes = loop.evaluate_and_record(setup.task, params, 3, workdir,
                                   {"valid_lanes": batches},
                                   DataMesh())["valid_lanes"]
  assert rows(workdir, "valid_lanes")[-1]["loss"] == lanes["loss"]
  assert abs(lanes["loss"] - reference) <= 1e-5, (lanes, reference)
  # train() evaluated the same batches at its last step.
  assert abs(trained["summary"]["eval"]["loss"] - reference) <= 1e-5
  # The lane restarts are visible: one lane is a different number.
  assert abs(reference - nll_N.mean()) > 1e-4


# -- 4. Data parallelism: 8 devices == 1 device --------------------------------


def _multi_device_main(tmpdir: str) -> dict:
  """Runs in a subprocess with 8 fake CPU devices; returns JSON results.

  The LSTM LM: every parameter with an exactly zero gradient (embedding rows
  of tokens absent from a batch) gets an exactly zero Adam step on both
  device counts, so parameters can be compared directly.
  """
  devices = jax.devices()
  out = dict(num_devices=len(devices))
  runs = {}
  for n in (8, 1):
    config = tiny_config(os.path.join(tmpdir, "cache"), "lstm",
                         batch_size=16, eval_batch_size=8, num_steps=3,
                         eval_every=3, checkpoint_every=3)
    setup = make_setup(config)
    workdir = os.path.join(tmpdir, f"devices{n}")
    summary = loop.train(setup.task, config, workdir,
                         DataMesh(devices[:n])).summary
    state = restore_state(workdir, setup, config, 3, DataMesh(devices[:n]))
    runs[n] = dict(
        summary=summary, state=state,
        train=[(r["step"], r["loss"], r["grad_norm"])
               for r in rows(workdir, "train")],
        eval=[(r["step"], r["loss"]) for r in rows(workdir, "eval")],
        carry_rows=sorted({s.data.shape[0] for s in
                           jax.tree.leaves(state.carry)[0].addressable_shards}))
  for key in ("train", "eval", "carry_rows"):
    out[key] = {n: r[key] for n, r in runs.items()}
  out["summary_devices"] = {n: r["summary"]["num_devices"]
                            for n, r in runs.items()}
  out["param_diff"] = max_abs_diff(runs[8]["state"].params,
                                   runs[1]["state"].params)
  out["carry_diff"] = max_abs_diff(runs[8]["state"].carry,
                                   runs[1]["state"].carry)
  out["carry_max"] = max(float(np.max(np.abs(x)))
                         for x in jax.tree.leaves(runs[1]["state"].carry))
  return out


def test_eight_devices_train_like_one(tmp_path):
  code = ("import json, sys\n"
          "from tests.test_lm import _multi_device_main\n"
          "print('RESULT=' + json.dumps(_multi_device_main(sys.argv[1])))\n")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)],
                        cwd=REPO_ROOT, env=subprocess_env(8),
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")]
  r = json.loads(line[len("RESULT="):])
  assert r["num_devices"] == 8
  assert r["summary_devices"] == {"8": 8, "1": 1}
  # The lanes really are split: 16 rows of carry as 8 shards of 2.
  assert r["carry_rows"] == {"8": [2], "1": [16]}
  train8, train1 = np.array(r["train"]["8"]), np.array(r["train"]["1"])
  np.testing.assert_array_equal(train1[:, 0], [1, 2, 3])
  np.testing.assert_allclose(train8, train1, rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.array(r["eval"]["8"]),
                             np.array(r["eval"]["1"]), rtol=0, atol=1e-5)
  assert r["param_diff"] <= 1e-5, r["param_diff"]
  assert r["carry_max"] > 1e-2 and r["carry_diff"] <= 1e-5, r


# -- 5. The synthetic corpus's entropy rate ------------------------------------


def test_lm_approaches_the_synthetic_entropy_rate(tmp_path):
  config = tiny_config(tmp_path / "cache", "lstm", train_tokens=20_000,
                       valid_tokens=2_000, test_tokens=10_000, batch_size=32,
                       eval_batch_size=32, unroll_length=20, num_steps=300,
                       learning_rate=1e-2, log_every=100)
  config.lstm.hidden_sizes = (32,)
  setup = make_setup(config)
  entropy = lm_experiment.true_entropy(config)
  source = synthetic.MarkovSource(**SOURCE)
  assert entropy == pytest.approx(source.entropy_rate())
  workdir = str(tmp_path / "run")
  # train() ends by evaluating its final parameters on the test split.
  test = loop.train(setup.task, config, workdir).summary["test"]
  assert test["loss_above_entropy"] == pytest.approx(test["loss"] - entropy)

  # The true model's NLL on these very test targets (ids mapped back to the
  # source's): the finite-sample counterpart of the entropy rate.
  words = setup.corpus.vocab.decode(np.asarray(setup.corpus.splits["test"]))
  source_ids = {w: i for i, w in enumerate(source.words)}
  true_nll = -source.log_probs(np.array([source_ids[w] for w in words]))[1:]
  assert np.isfinite(true_nll).all()
  # Measured on this CPU: test loss = entropy + 0.013 after 300 steps
  # (+0.015 after 200, +0.029 after 100); the margin is about 4x that.
  assert test["loss"] <= entropy + 0.05, (test["loss"], entropy)
  # Nothing beats the source by more than the noise of 10k test tokens
  # (|true_nll - entropy| is 0.0025 here).
  assert test["loss"] >= entropy - 0.02, (test["loss"], entropy)
  assert test["loss"] >= true_nll.mean() - 0.02, (test["loss"], true_nll.mean())


# -- 6. Adaptive softmax and tied embeddings -----------------------------------


@pytest.mark.parametrize("variant", ["adaptive", "tied"])
def test_softmax_variants_train(tmp_path, variant):
  if variant == "adaptive":
    overrides = dict(softmax="adaptive", cutoffs=(4, 10))
  else:
    overrides = dict(softmax="full", cutoffs=(), tie_embeddings=True)
  config = tiny_config(tmp_path / "cache", "lstm", batch_size=16,
                       eval_batch_size=16, unroll_length=10, num_steps=40,
                       learning_rate=1e-2, log_every=5, **overrides)
  setup = make_setup(config)
  vocab_size = len(setup.corpus.vocab)
  workdir = str(tmp_path / "run")
  summary = loop.train(setup.task, config, workdir).summary
  losses = [r["loss"] for r in rows(workdir, "train")]
  assert len(losses) == 8 and all(map(math.isfinite, losses))
  assert losses[-1] < losses[0] - 0.5, losses
  assert summary["eval"]["loss"] < math.log(vocab_size) - 0.5

  params = restore_state(workdir, setup, config, config.num_steps).params
  names = "\n".join(params)
  fns = Fns(config, vocab_size)
  tokens = np.asarray(setup.corpus.splits["valid"][:50])
  nll = np.asarray(fns.stream_nll(params, jnp.asarray(tokens, jnp.int32)))
  assert np.isfinite(nll).all() and (nll > 0).all()
  if variant == "adaptive":
    assert "output_projection" not in names and "softmax" in names
    # The one-step log-probabilities (adaptive `log_probs`) are normalised
    # and agree with the batched per-token NLL (`nll`) the Task trains on.
    batch = setup.task.train_iterator.batch_at(0, 0)
    nll_BT, _ = fns.forward(params, model_batch(batch),
                            fns.initial_state(config.batch_size))

    def one_step(tokens_B):
      lm = lm_experiment.make_model(config, vocab_size)
      return lm.next_token_log_probs(tokens_B, lm.initial_state(
          tokens_B.shape[0]))[0]

    log_probs = jax.jit(hk.without_apply_rng(hk.transform(one_step)).apply)(
        params, jnp.asarray(batch["inputs"][:, 0]))
    np.testing.assert_allclose(np.exp(log_probs).sum(-1), 1.0, atol=1e-5)
    picked = -np.take_along_axis(np.asarray(log_probs),
                                 batch["targets"][:, :1], axis=-1)[:, 0]
    np.testing.assert_allclose(picked, np.asarray(nll_BT)[:, 0], atol=1e-5)
  else:
    assert "output_projection" in names and "softmax" not in names
    # Tied: the embedding matrix is the output layer, so every row gets a
    # gradient even when the inputs only ever show token 2.
    batch = dict(setup.task.train_iterator.batch_at(0, 0))
    batch["inputs"] = np.full_like(batch["inputs"], 2)
    grads = jax.grad(lambda p: setup.task.loss(
        p, fns.initial_state(config.batch_size), jax.random.PRNGKey(0),
        batch)[0])(params)
    (embed_grad,) = [g["embeddings"] for name, g in grads.items()
                     if name.endswith("embed")]
    row_norms = np.linalg.norm(np.asarray(embed_grad), axis=1)
    assert (row_norms[np.arange(vocab_size) != 2] > 0).all()


# -- 7. Bad launcher input -----------------------------------------------------

SMALL = "--config=lm:small"
SHORT_SYNTHETIC = "--config.reader_options.train_tokens=3000"
FULL_SOFTMAX = ("--config.softmax=full", "--config.cutoffs=()")
WIKI_LINES = " = Title = \n\n the cat sat on the mat . \n the dog sat . \n"


def _wiki_dir(root, name: str, **files: bytes) -> str:
  """A WikiText-like dir (train/valid/test.txt) with some files replaced."""
  path = os.path.join(root, name)
  os.makedirs(path)
  for split in ("train", "valid", "test"):
    with open(os.path.join(path, f"{split}.txt"), "wb") as f:
      f.write(files.get(split, WIKI_LINES.encode()))
  return path


def _bad_input_cases(root) -> dict:
  """{case: (flags, substrings the error line must contain)}."""
  good = _wiki_dir(root, "good")
  empty = os.path.join(root, "empty")
  os.makedirs(empty)
  empty_split = _wiki_dir(root, "empty_split", valid=b"")
  undecodable = _wiki_dir(root, "undecodable",
                          test=b" fine words \n bad \xff\xfe bytes \n")
  tfds_installed = all(importlib.util.find_spec(m) for m in
                       ("tensorflow", "tensorflow_datasets"))
  return {
      "missing_data_dir": ([SMALL, "--config.data_dir=/nonexistent"],
                           ["/nonexistent"]),
      "empty_data_dir": ([SMALL, f"--config.data_dir={empty}"], [empty]),
      "empty_split_file": ([SMALL, f"--config.data_dir={empty_split}"],
                           [os.path.join(empty_split, "valid.txt"), "empty"]),
      "undecodable_bytes": ([SMALL, f"--config.data_dir={undecodable}"],
                            [os.path.join(undecodable, "test.txt"), "UTF-8"]),
      "unknown_dataset": (["--config.dataset=bogus"], ["bogus"]),
      "unknown_core": (["--config.core=bogus"], ["--config.core="]),
      "zero_batch_size": (["--config.batch_size=0"], ["--config.batch_size="]),
      "zero_num_steps": (["--config.num_steps=0"], ["--config.num_steps="]),
      "cutoffs_beyond_vocabulary": (
          ["--config.softmax=adaptive", "--config.cutoffs=(100000,)",
           SHORT_SYNTHETIC], ["--config.cutoffs="]),
      "bad_core_argument": (["--config.rmc.mem_slots=0", SHORT_SYNTHETIC],
                            ["mem_slots"]),
      "tied_adaptive_softmax": (
          ["--config.tie_embeddings=true", "--config.softmax=adaptive",
           "--config.cutoffs=(5,)", SHORT_SYNTHETIC],
          ["--config.tie_embeddings"]),
      "unknown_config_field": (["--config.bogus=1"], ["bogus"]),
      "vocab_size_too_small": (
          [SMALL, f"--config.data_dir={good}", "--config.vocab_size=1"],
          ["--config.vocab_size"]),
      "train_split_too_short": (
          [SMALL, f"--config.data_dir={good}", *FULL_SOFTMAX],
          ["train", "--config.unroll_length"]),
      # The paper variant's shuffle_seed is ignored; then either the tfds
      # extra is missing or the dataset is not in the TFDS data dir.
      "tfds_dataset": (
          ["--config=lm:gutenberg", "--config.dataset=tfds:pg19",
           f"--config.data_dir={empty}"],
          ["pg19", "could not load TFDS" if tfds_installed
           else "pip install -e .[tfds]"]),
  }




@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
  """Runs every bad-input case of the launcher at once (they are short)."""
  root = str(tmp_path_factory.mktemp("bad_input"))
  cases = _bad_input_cases(root)
  procs = {}
  for name, (flags, _) in cases.items():
    if not any(f.startswith("--config=") for f in flags):
      flags = ["--config=lm:synthetic", *flags]
    # --config=... must come before the --config.* overrides.
    flags = sorted(flags, key=lambda f: not f.startswith("--config="))
    workdir = os.path.join(root, "workdirs", name)
    cmd = [sys.executable, "-m", "launch.train", *flags,
           f"--config.cache_dir={os.path.join(root, 'cache')}",
           f"--workdir={workdir}"]
    procs[name] = (subprocess.Popen(cmd, cwd=REPO_ROOT, env=subprocess_env(),
                                    stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True),
                   workdir)
  results = {}
  for name, (proc, workdir) in procs.items():
    try:
      _, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
      proc.kill()
      _, stderr = proc.communicate()
    results[name] = dict(returncode=proc.returncode, stderr=stderr,
                         workdir_exists=os.path.exists(workdir),
                         expected=cases[name][1])
  return results


@pytest.mark.parametrize("case", [
    "missing_data_dir", "empty_data_dir", "empty_split_file",
    "undecodable_bytes", "unknown_dataset", "unknown_core", "zero_batch_size",
    "zero_num_steps", "cutoffs_beyond_vocabulary", "bad_core_argument",
    "tied_adaptive_softmax", "unknown_config_field", "vocab_size_too_small",
    "train_split_too_short", "tfds_dataset"])
def test_bad_input_is_one_error_line_naming_it(bad_runs, case):
  r = bad_runs[case]
  stderr = r["stderr"]
  assert r["returncode"] not in (0, None), stderr[-2000:]
  assert "Traceback" not in stderr, stderr[-2000:]
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr[-2000:]
  for word in r["expected"]:
    assert word in errors[0], (word, errors[0])
  assert not r["workdir_exists"]  # Nothing is written for bad input.


# -- 8. Launchers end to end ---------------------------------------------------

LAUNCH_FLAGS = (
    "--config.core=lstm",
    "--config.lstm.hidden_sizes=(16,)",
    "--config.embed_size=16",
    "--config.batch_size=8",
    "--config.eval_batch_size=8",
    "--config.unroll_length=10",
    "--config.reader_options.train_tokens=5000",
    "--config.reader_options.valid_tokens=500",
    "--config.reader_options.test_tokens=500",
    "--config.num_steps=20",
    "--config.log_every=10",
    "--config.eval_every=20",
    "--config.checkpoint_every=20",
)


def test_train_then_sample_launchers(tmp_path):
  workdir = str(tmp_path / "run")
  cache = f"--config.cache_dir={tmp_path / 'cache'}"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.train", "--config=lm:synthetic",
       *LAUNCH_FLAGS, cache,
       f"--workdir={workdir}"], cwd=REPO_ROOT, env=subprocess_env(),
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  printed = json.loads(proc.stdout)
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    summary = json.load(f)
  assert summary["status"] == "completed" and summary["step"] == 20
  assert printed["test"] == summary["test"]
  test = summary["test"]
  entropy = test["loss"] - test["loss_above_entropy"]
  assert entropy == pytest.approx(synthetic.MarkovSource(
      num_words=32, order=2, branching=3, eos_prob=0.05,
      seed=0).entropy_rate(), rel=1e-6)
  assert entropy < test["loss"] < 4.0

  length = 12
  proc = subprocess.run(
      [sys.executable, "-m", "launch.sample_lm", f"--workdir={workdir}",
       "--prompt=w3 w5", f"--length={length}", "--seed=1"],
      cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  match = re.search(r"^\[step 20\] w3 w5 \|\| (.*)\Z", proc.stdout.strip(),
                    re.DOTALL | re.MULTILINE)
  assert match, proc.stdout
  text = match[1]
  words = text.split()
  # '<eos>' between words is printed as a newline.
  assert len(words) + text.count("\n") == length, text
  vocab = {"<unk>", "<eos>"} | {f"w{i}" for i in range(1, 33)}
  assert words and set(words) <= vocab, text


def test_top1_sampling_is_greedy(tmp_path):
  config = tiny_config(tmp_path, "lstm")
  setup = make_setup(config)
  vocab_size = len(setup.corpus.vocab)
  params = jax.jit(setup.task.init)(jax.random.PRNGKey(0),
                           setup.task.train_iterator.batch_at(0, 0))
  prompt = np.asarray(setup.corpus.splits["valid"][:5], np.int32)
  out = sampling.sample(params,
                        lambda: lm_experiment.make_model(config, vocab_size),
                        prompt, length=8, top_k=1, seed=3)

  # Greedy decoding written independently: read the prompt, then feed back
  # the argmax, all in one jitted scan.
  def greedy(prompt_P):
    lm = lm_experiment.make_model(config, vocab_size)

    def read(state, token):
      log_probs, state = lm.next_token_log_probs(token[None], state)
      return state, log_probs[0]

    state, log_probs_PV = hk.scan(read, lm.initial_state(1), prompt_P)

    def decode(carry, _):
      state, log_probs_V = carry
      token = jnp.argmax(log_probs_V).astype(jnp.int32)
      return read(state, token), token

    _, tokens = hk.scan(decode, (state, log_probs_PV[-1]), None, length=8)
    return tokens

  expected = jax.jit(hk.without_apply_rng(hk.transform(greedy)).apply)(
      params, jnp.asarray(prompt))
  chex.assert_shape(out, (8,))
  chex.assert_type(out, np.int32)
  np.testing.assert_array_equal(out, np.asarray(expected))


def test_gradient_accumulation_carries_each_lanes_state(tmp_path):
  """grad_accum_steps=2: the same update and carried state as one batch."""
  mesh = DataMesh()
  out = {}
  for k in (1, 2):
    config = tiny_config(tmp_path, "lstm", grad_accum_steps=k)
    task = make_setup(config).task
    state = steps.init_train_state(task, config, mesh)
    train_step = steps.make_train_step(task, config, mesh, state)
    for _ in range(3):
      state, metrics = train_step(state,
                                  mesh.shard_batch(next(task.train_iterator)))
    out[k] = (jax.device_get(state), float(metrics["loss"]))
  assert out[2][1] == pytest.approx(out[1][1], rel=1e-5)
  assert max_abs_diff(out[2][0].params, out[1][0].params) <= 1e-6
  assert max_abs_diff(out[2][0].carry, out[1][0].carry) <= 1e-6
  assert max(float(np.abs(x).max())
             for x in jax.tree.leaves(out[1][0].carry)) > 1e-2


# A next-token distribution with distinct probabilities (so every nucleus is
# unique) and the masses between which the nucleus changes.
NEXT_PROBS = np.array([0.05, 0.32, 0.11, 0.27, 0.17, 0.08])


def _nucleus_by_enumeration(probs, top_p: float) -> set[int]:
  """The smallest set of tokens with mass >= top_p (the most massive of the
  smallest ones), found by trying every subset."""
  best = None
  for mask in range(1, 2 ** len(probs)):
    members = {i for i in range(len(probs)) if mask >> i & 1}
    mass = sum(probs[i] for i in members)
    if mass >= top_p and (best is None or (len(members), -mass) <
                          (len(best[0]), -best[1])):
      best = (members, mass)
  return best[0]


@pytest.mark.parametrize("top_p", [0.1, 0.32, 0.5, 0.6, 0.8, 0.9, 0.99, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
  logits = sampling.filter_logits(jnp.log(jnp.asarray(NEXT_PROBS, jnp.float32)),
                                  top_p=top_p)
  kept = {int(i) for i in np.flatnonzero(np.isfinite(np.asarray(logits)))}
  assert kept == _nucleus_by_enumeration(NEXT_PROBS, top_p)
  # The kept logits are unchanged (renormalised only by the softmax).
  np.testing.assert_allclose(np.asarray(logits)[sorted(kept)],
                             np.log(NEXT_PROBS[sorted(kept)]), rtol=1e-6)


class FixedDistributionLM(hk.Module):
  """A stand-in LanguageModel whose next-token distribution is NEXT_PROBS
  whatever the input, with a counter as its state."""

  def initial_state(self, batch_size):
    return jnp.zeros((batch_size,), jnp.int32)

  def next_token_log_probs(self, inputs_B, state):
    log_probs_V = jnp.log(jnp.asarray(NEXT_PROBS, jnp.float32))
    return jnp.broadcast_to(log_probs_V, inputs_B.shape + log_probs_V.shape), \
        state + 1


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.5, 0, 1.0), (2.0, 0, 0.75), (1.0, 4, 0.7)])
def test_samples_follow_the_filtered_distribution(temperature, top_k, top_p):
  n = 3000
  out = sampling.sample({}, FixedDistributionLM, np.asarray([0], np.int32), n,
                        temperature=temperature, top_k=top_k, top_p=top_p,
                        seed=1)
  # The expected distribution, computed here in float64: p ** (1 / T)
  # renormalised, the top_k most likely, then the nucleus.
  scaled = NEXT_PROBS ** (1 / temperature)
  scaled /= scaled.sum()
  if top_k:
    scaled[np.argsort(-scaled)[top_k:]] = 0
    scaled /= scaled.sum()
  expected = np.zeros_like(scaled)
  nucleus = sorted(_nucleus_by_enumeration(scaled, top_p))
  expected[nucleus] = scaled[nucleus] / scaled[nucleus].sum()
  freq = np.bincount(out, minlength=len(NEXT_PROBS)) / n
  assert set(np.flatnonzero(freq)) <= set(nucleus)
  # 4.5 standard errors of a frequency over n draws.
  np.testing.assert_array_less(
      np.abs(freq - expected), 4.5 * np.sqrt(expected * (1 - expected) / n)
      + 1e-9)


@pytest.mark.parametrize("options,word", [
    (dict(temperature=0.0), "temperature"), (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")])
def test_bad_sampling_options_are_refused(options, word):
  with pytest.raises(ValueError, match=word):
    sampling.sample({}, FixedDistributionLM, np.asarray([0], np.int32), 1,
                    **options)


def test_sample_launcher_refuses_a_bad_top_p(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "launch.sample_lm", f"--workdir={tmp_path}",
       "--top_p=0"], cwd=REPO_ROOT, env=subprocess_env(),
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: --top_p must be in (0, 1] (1: all tokens), got 0.0"]

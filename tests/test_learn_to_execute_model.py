"""Tests of the Learning-to-Execute model, loss and experiment Task."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rmc_jax.cores import make_core
from rmc_jax.experiments import learn_to_execute as lte_experiment
from rmc_jax.tasks import learn_to_execute as lte
from rmc_jax.tasks import learn_to_execute_model as model_lib


@pytest.mark.parametrize("core_name,kwargs", [
    ("lstm", {"hidden_sizes": (7, 5)}),
    ("rmc", {"mem_slots": 2, "num_heads": 2, "head_size": 4,
             "gate_style": "memory"}),
])
def test_encoder_state_stops_at_each_length(core_name, kwargs):
  """The encoder's state equals a per-example loop of `core(...)` steps over
  exactly that program's characters."""
  b, t = 4, 6
  lengths = np.array([6, 2, 4, 1], np.int32)
  tokens = np.random.default_rng(0).integers(0, lte.VOCAB_SIZE, (b, t))
  tokens = tokens.astype(np.int32)

  def encoded(tokens):
    return model_lib.encode(make_core(core_name, **kwargs), tokens, lengths)

  def per_example(tokens):
    core = make_core(core_name, **kwargs)
    finals = []
    for i in range(b):
      state = core.initial_state(1)
      for step in range(lengths[i]):
        x = jax.nn.one_hot(tokens[i:i + 1, step], lte.VOCAB_SIZE)
        _, state = core(x, state)
      finals.append(state)
    return jax.tree.map(lambda *rows: jnp.concatenate(rows), *finals)

  f_encoded = hk.without_apply_rng(hk.transform(encoded))
  f_loop = hk.without_apply_rng(hk.transform(per_example))
  params = jax.jit(f_encoded.init)(jax.random.PRNGKey(1), tokens)
  got = jax.jit(f_encoded.apply)(params, tokens)
  want = jax.jit(f_loop.apply)(params, tokens)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, atol=1e-5)
  # Padding characters after a program's end must not change its state.
  scrambled = np.where(np.arange(t)[None] < lengths[:, None], tokens,
                       (tokens + 7) % lte.VOCAB_SIZE)
  for g, w in zip(jax.tree.leaves(jax.jit(f_encoded.apply)(params, scrambled)),
                  jax.tree.leaves(got)):
    np.testing.assert_allclose(g, w, atol=1e-6)


def test_loss_and_metrics_against_numpy():
  rng = np.random.default_rng(0)
  b, t, v = 4, 5, lte.VOCAB_SIZE
  logits = rng.normal(size=(b, t, v)).astype(np.float32)
  targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
  lengths = np.array([5, 1, 3, 2], np.int32)
  # Make sample 1 entirely right and sample 0 right except at one position.
  logits[1, 0, targets[1, 0]] += 100.0
  logits[0, :, :] = -10.0
  logits[0, np.arange(t), targets[0]] = 10.0
  logits[0, 2, targets[0, 2]] = -20.0
  unused = np.zeros((b, 1), np.int32)
  batch = lte.LTEBatch(tokens_in=unused, tokens_out=targets,
                       decoder_inputs=targets, lengths_in=lengths,
                       lengths_out=lengths)
  loss, metrics = model_lib.loss_and_metrics(jnp.asarray(logits), batch)

  log_probs = logits.astype(np.float64)
  log_probs = log_probs - np.log(np.exp(log_probs).sum(-1, keepdims=True))
  ce, correct, total, seq_ok = 0.0, 0, 0, 0
  for i in range(b):
    ok = True
    for j in range(lengths[i]):
      ce -= log_probs[i, j, targets[i, j]]
      hit = int(np.argmax(logits[i, j]) == targets[i, j])
      correct += hit
      ok &= bool(hit)
      total += 1
    seq_ok += ok
  np.testing.assert_allclose(loss, ce / total, rtol=1e-5)
  np.testing.assert_allclose(metrics["char_accuracy"], correct / total,
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["sequence_accuracy"], seq_ok / b)
  assert seq_ok >= 1


def _tiny_config(core):
  c = lte_experiment.get_config("cpu")
  c.core = core
  c.batch_size = 32
  c.eval_samples = 64
  c.eval_batch_size = 32
  c.mlp_sizes = (32,)
  c.rmc.update(mem_slots=2, num_heads=2, head_size=8)
  c.lstm.update(hidden_sizes=(32,))
  return c


def test_tiny_model_loss_falls_on_addition():
  config = _tiny_config("lstm")
  task = lte_experiment.make_task(config)
  batch = next(task.train_iterator)
  params = jax.jit(task.init)(jax.random.PRNGKey(0), batch)
  opt = optax.adam(3e-3)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    (loss, _), grads = jax.value_and_grad(task.loss, has_aux=True)(
        params, (), jax.random.PRNGKey(0), batch)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state,
                                   next(task.train_iterator))
    losses.append(float(loss))
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5]), losses
  metrics, _ = task.evaluate(params, (), task.eval_splits["eval"][0])
  assert set(metrics) == {"loss", "char_accuracy", "sequence_accuracy"}


def test_teacher_forcing_feeds_the_shifted_targets():
  """With teacher forcing the logits depend on the decoder inputs; without, not."""
  outputs = {}
  for tf in (False, True):
    config = _tiny_config("lstm")
    config.teacher_forcing = tf
    task = lte_experiment.make_task(config)
    batch = next(task.train_iterator)
    model = hk.transform(lambda b: model_lib.forward(
        b, "lstm", {"hidden_sizes": (16,)}, (8,), tf))
    params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
    changed = batch._replace(decoder_inputs=(batch.decoder_inputs + 1) % 40)
    outputs[tf] = np.abs(model.apply(params, None, batch)
                         - model.apply(params, None, changed)).max()
  assert outputs[False] == 0.0
  assert outputs[True] > 0.0


def test_observe_advances_the_curriculum():
  config = _tiny_config("lstm")
  config.curriculum = "naive"
  config.curriculum_min_tries = 5
  task = lte_experiment.make_task(config)
  level = lambda: (task.train_iterator.get_state()["curriculum"]["length"],
                   task.train_iterator.get_state()["curriculum"]["nesting"])
  assert level() == (1, 1)
  for _ in range(12):
    task.observe({"loss": 1.0})  # A plateau: the level must go up.
  assert level() == (2, 1)


def test_tiny_model_fits_a_fixed_addition_set():
  """A small LSTM encoder-decoder learns a fixed set of 2-digit additions to
  100%: its decoded answers equal the sums computed from the program text."""
  _, pairs = lte.generate_batch(np.random.default_rng(0), 32, "addition", 2,
                                1, return_text=True)
  batch = lte.encode_batch(pairs, *lte.sequence_lengths("addition", 2, 1))
  model = hk.without_apply_rng(hk.transform(lambda b: model_lib.forward(
      b, "lstm", {"hidden_sizes": (64,)}, (64,), teacher_forcing=False)))
  params = jax.jit(model.init)(jax.random.PRNGKey(0), batch)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(
        lambda p: model_lib.loss_and_metrics(model.apply(p, batch), batch)[0]
    )(params)
    updates, opt_state = opt.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  for _ in range(300):
    params, opt_state, loss = step(params, opt_state)
  predictions = np.asarray(jnp.argmax(jax.jit(model.apply)(params, batch), -1))
  for (program, _), ids, n in zip(pairs, predictions, batch.lengths_out):
    a, b = program.split("+")
    assert lte.decode(ids[:n]) == str((int(a) + int(b)) % 1000), (program,
                                                                 float(loss))

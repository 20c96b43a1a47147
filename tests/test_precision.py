"""`--config.precision=bfloat16`: one policy for every core, the LM's
embedding and softmax and the RL network, float32 parameters and loss, and
training that stays close to float32 over a few steps."""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax import experiments
from rmc_jax.cores import RelationalMemory
from rmc_jax.training import precision
from rmc_jax.training import steps
from rmc_jax.training.config import ConfigError
from rmc_jax.training.mesh import DataMesh

NUM_STEPS = 3


def _config(spec, core, cache_dir, **overrides):
  c = experiments.get_config(spec)
  c.core = core
  c.batch_size = 8
  c.rmc.update(mem_slots=2, head_size=8, num_heads=2)
  c.lstm.hidden_sizes = (16,)
  if c.experiment == "lm":
    c.cache_dir = str(cache_dir)
    c.reader_options = dict(num_words=16, order=1, branching=2,
                            eos_prob=0.05, seed=0, train_tokens=2_000,
                            valid_tokens=300, test_tokens=300)
    c.embed_size = 16
    c.unroll_length = 8
    c.eval_batch_size = 8
  elif c.experiment == "rl":
    c.batch_size = 4
    c.unroll_length = 4
    c.conv_channels = (4, 4)
    c.head_hidden = (16,)
  else:
    c.eval_batch_size = 8
    c.mlp_sizes = (16,)
  c.update(overrides)
  return c


def _train(config):
  """Losses of NUM_STEPS steps and the final state."""
  task = experiments.make_task(config)
  mesh = DataMesh()
  state = steps.init_train_state(task, config, mesh)
  train_step = steps.make_train_step(task, config, mesh, state)
  losses = []
  for _ in range(NUM_STEPS):
    batch = (() if task.train_iterator is None
             else mesh.shard_batch(next(task.train_iterator)))
    state, metrics = train_step(state, batch)
    assert metrics["loss"].dtype == jnp.float32
    losses.append(float(metrics["loss"]))
  return np.array(losses), state


@pytest.mark.parametrize("spec,core", [("lm:synthetic", "rmc")])
def test_bfloat16_trains_like_float32(tmp_path, spec, core):
  f32_losses, f32_state = _train(_config(spec, core, tmp_path))
  bf16_losses, bf16_state = _train(_config(spec, core, tmp_path,
                                           precision="bfloat16"))
  # Parameters (and so their updates) stay float32.
  for leaf in jax.tree.leaves(bf16_state.params):
    assert leaf.dtype == jnp.float32
  # bfloat16 has an 8-bit mantissa: losses agree to a few percent (measured
  # here: <= 1%), and are not bit-identical (the policy is really applied).
  np.testing.assert_allclose(bf16_losses, f32_losses, rtol=3e-2, atol=2e-2)
  assert not np.array_equal(bf16_losses, f32_losses)
  # Nothing leaks: outside the model's functions no policy is set.
  assert hk.mixed_precision.get_policy(RelationalMemory) is None


def test_bad_precision_is_a_config_error():
  config = experiments.get_config("nth_farthest:cpu")
  config.precision = "float16"
  with pytest.raises(ConfigError, match=r"--config\.precision='float16'"):
    experiments.make_task(config)
  assert set(precision.PRECISIONS) == {"float32", "bfloat16"}


def test_the_rl_network_follows_the_policy():
  """The actor-critic (torso convolutions, core, heads) under bfloat16:
  float32 outputs and parameters, close to float32 and not equal to it."""
  from rmc_jax.rl.agent import make_actor_critic  # pylint: disable=g-import-not-at-top
  obs_TBHWC = np.random.default_rng(0).uniform(size=(3, 2, 5, 5, 3))
  obs_TBHWC = obs_TBHWC.astype(np.float32)
  out = {}
  for name in ("float32", "bfloat16"):
    net = make_actor_critic((5, 5, 3), 4, precision=name, core_name="lstm",
                            core_kwargs=dict(hidden_sizes=(8,)),
                            conv_channels=(4,), head_hidden=(8,))
    params = net.init(jax.random.PRNGKey(0))
    (logits, values), _ = jax.jit(net.unroll)(
        params, obs_TBHWC, net.initial_state({}, 2))
    assert logits.dtype == values.dtype == jnp.float32
    for leaf in jax.tree.leaves(params):
      assert leaf.dtype == jnp.float32
    out[name] = np.asarray(logits)
  np.testing.assert_allclose(out["bfloat16"], out["float32"], atol=3e-2)
  assert not np.array_equal(out["bfloat16"], out["float32"])

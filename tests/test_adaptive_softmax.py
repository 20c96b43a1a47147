"""Tests for `rmc_jax.lm.adaptive_softmax` against a float64 NumPy reference.

The reference (`_ref_*`) computes each token's log-probability on its own,
straight from the parameters: the head log-softmax, and for a tail word its
cluster's projection and log-softmax. It shares no code with the module.
Parameters are random (every weight and bias, biases large), so each one
matters in the comparisons. JAX runs in float32.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import jmp
import numpy as np
import pytest

from rmc_jax.lm.adaptive_softmax import AdaptiveSoftmax, FullSoftmax, LossAux

V = 50  # vocabulary
D = 16  # hidden size
N = 12  # tokens
TOL = 1e-5

# (cutoffs, div_value, tail_projection); every cluster is non-trivial.
SETTINGS = [
    ((), 4.0, True),
    ((10,), 4.0, True),
    ((10, 20, 35), 4.0, True),
    ((10, 20, 35), 2.0, False),
    ((1, 2, 49), 3.0, True),  # one-word clusters, at both ends
]
SETTING_IDS = ["full", "one_tail", "three_tails", "no_projection", "edges"]


def _module(cutoffs, div_value=4.0, tail_projection=True, **kwargs):
  return AdaptiveSoftmax(V, cutoffs, div_value, tail_projection, **kwargs)


def _transform(cutoffs, div_value=4.0, tail_projection=True, **kwargs):
  """hk.transform of (log_probs, nll, loss) sharing one module.

  `apply` is jitted (one compilation per shape) to keep the tests fast.
  """

  def f(hidden, targets, mask):
    sm = _module(cutoffs, div_value, tail_projection, **kwargs)
    return sm.log_probs(hidden), sm.nll(hidden, targets), sm.loss(
        hidden, targets, mask)

  fn = hk.without_apply_rng(hk.transform(f))
  return hk.Transformed(fn.init, jax.jit(fn.apply))


def _random_params(params, seed):
  """Replaces every leaf by random values; biases drawn with stddev 3."""
  rng = np.random.default_rng(seed)
  out = {}
  for mod, leaves in sorted(params.items()):
    out[mod] = {
        k: jnp.asarray(rng.normal(size=v.shape) * (3.0 if k == "b" else 0.5),
                       jnp.float32) for k, v in leaves.items()}
  return out


def _inputs(seed, n=N, cutoffs=(10, 20, 35)):
  """Hidden [n, D] and targets [n] hitting every cluster and its boundaries."""
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(n, D)).astype(np.float32)
  edges = [0, V - 1] + [c for c in cutoffs] + [c - 1 for c in cutoffs]
  targets = np.concatenate([edges, rng.integers(0, V, size=n)])[:n]
  return jnp.asarray(hidden), jnp.asarray(targets, jnp.int32)


def _setup(setting, seed=0, **kwargs):
  cutoffs, div_value, proj = setting
  fn = _transform(cutoffs, div_value, proj, **kwargs)
  hidden, targets = _inputs(seed, cutoffs=cutoffs)
  shapes = jax.eval_shape(fn.init, jax.random.PRNGKey(0), hidden, targets,
                          None)
  params = _random_params(shapes, seed + 1)
  return fn, params, hidden, targets


# ---------------------------------------------------------------------------
# Independent float64 NumPy reference.
# ---------------------------------------------------------------------------


def _ref_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _ref_nll(params, hidden, targets, cutoffs, tail_projection,
             name="adaptive_softmax"):
  """Per-token NLL, token by token, in float64."""
  p = {m.split("/~/")[-1]: {k: np.asarray(v, np.float64) for k, v in d.items()}
       for m, d in params.items() if m.startswith(name)}
  bounds = list(cutoffs) + [V]
  shortlist = bounds[0]
  out = []
  for h, y in zip(np.asarray(hidden, np.float64), np.asarray(targets)):
    head_lp = _ref_log_softmax(h @ p["head"]["w"] + p["head"]["b"])
    if y < shortlist:
      out.append(-head_lp[y])
      continue
    k = max(i for i, lo in enumerate(bounds[:-1]) if y >= lo)
    x = h @ p[f"tail_{k}_projection"]["w"] if tail_projection else h
    tail = p[f"tail_{k}_output"]
    tail_lp = _ref_log_softmax(x @ tail["w"] + tail["b"])
    out.append(-(head_lp[shortlist + k] + tail_lp[y - bounds[k]]))
  return np.array(out)


# ---------------------------------------------------------------------------
# Tests.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
def test_log_probs_normalise_and_nll_matches_reference(setting):
  cutoffs, _, proj = setting
  fn, params, hidden, targets = _setup(setting)
  log_probs, nll, (loss, aux) = fn.apply(params, hidden, targets, None)
  assert log_probs.shape == (N, V) and log_probs.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.logsumexp(log_probs, axis=-1), 0.0,
                             atol=TOL)
  assert nll.shape == (N,)
  gathered = -np.take_along_axis(np.asarray(log_probs),
                                 np.asarray(targets)[:, None], axis=-1)[:, 0]
  np.testing.assert_allclose(nll, gathered, rtol=TOL, atol=TOL)
  ref = _ref_nll(params, hidden, targets, cutoffs, proj)
  np.testing.assert_allclose(nll, ref, rtol=TOL, atol=TOL)
  # The reference covers every word: compare the whole log_probs matrix too.
  all_words = np.arange(V)
  ref_lp = -np.stack([
      _ref_nll(params, np.repeat(hidden[i:i + 1], V, 0), all_words, cutoffs,
               proj) for i in range(3)])
  np.testing.assert_allclose(log_probs[:3], ref_lp, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(loss, ref.mean(), rtol=TOL)
  assert isinstance(aux, LossAux)
  np.testing.assert_allclose(aux.nll, nll)
  assert float(aux.num_tokens) == N


def test_leading_dims_are_flattened():
  setting = SETTINGS[2]
  fn, params, hidden, targets = _setup(setting)
  lp, nll, (loss, _) = fn.apply(params, hidden, targets, None)
  lp3, nll3, (loss3, aux3) = fn.apply(params, hidden.reshape(3, 4, D),
                                      targets.reshape(3, 4), None)
  assert lp3.shape == (3, 4, V) and nll3.shape == (3, 4)
  assert aux3.nll.shape == (3, 4)
  np.testing.assert_allclose(lp3.reshape(N, V), lp, atol=1e-6)
  np.testing.assert_allclose(nll3.reshape(N), nll, atol=1e-6)
  np.testing.assert_allclose(loss3, loss, atol=1e-6)


def test_one_cluster_is_full_softmax():
  fn, params, hidden, targets = _setup(SETTINGS[0])
  assert set(params) == {"adaptive_softmax/~/head"}
  w, b = params["adaptive_softmax/~/head"]["w"], params[
      "adaptive_softmax/~/head"]["b"]
  assert w.shape == (D, V)
  log_probs, nll, (loss, _) = fn.apply(params, hidden, targets, None)
  logits = np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) + b
  ce = -_ref_log_softmax(logits)[np.arange(N), np.asarray(targets)]
  np.testing.assert_allclose(nll, ce, rtol=TOL, atol=TOL)
  np.testing.assert_allclose(loss, ce.mean(), rtol=TOL)

  def full(hidden, targets):
    sm = FullSoftmax(V)
    return sm.log_probs(hidden), sm.nll(hidden, targets), sm.loss(hidden,
                                                                  targets)

  full_fn = hk.without_apply_rng(hk.transform(full))
  full_params = jax.eval_shape(full_fn.init, jax.random.PRNGKey(0), hidden,
                               targets)
  assert jax.tree.map(lambda x: x.shape, full_params) == {
      "full_softmax/~/output": {"w": (D, V), "b": (V,)}}
  f_lp, f_nll, (f_loss, _) = jax.jit(full_fn.apply)(
      {"full_softmax/~/output": {"w": w, "b": b}}, hidden, targets)
  np.testing.assert_allclose(f_lp, log_probs, atol=1e-6)
  np.testing.assert_allclose(f_nll, nll, atol=1e-6)
  np.testing.assert_allclose(f_loss, loss, atol=1e-6)


def test_masked_mean():
  fn, params, hidden, targets = _setup(SETTINGS[2])
  ones = jnp.ones(N, jnp.float32)
  mask = np.arange(N) % 3 != 0
  # Masked-out tokens may carry any id (padding): they must not matter.
  padded = jnp.where(jnp.asarray(mask), targets, -1)
  _, nll, _ = fn.apply(params, hidden, targets, ones)
  _, nll_pad, (loss_m, aux_m) = fn.apply(params, hidden, padded,
                                         jnp.asarray(mask, jnp.float32))
  assert np.all(np.isnan(np.asarray(nll_pad)[~mask]))  # Invalid ids: NaN.
  np.testing.assert_allclose(loss_m, np.asarray(nll)[mask].mean(), rtol=TOL)
  assert float(aux_m.num_tokens) == mask.sum()
  np.testing.assert_allclose(aux_m.sum_nll, np.asarray(nll)[mask].sum(),
                             rtol=TOL)
  # Float weights: a weighted mean.
  weights = np.linspace(0.0, 2.0, N).astype(np.float32)
  _, _, (loss_w, _) = fn.apply(params, hidden, targets, jnp.asarray(weights))
  np.testing.assert_allclose(loss_w, (weights * nll).sum() / weights.sum(),
                             rtol=TOL)
  # All masked: 0 with zero (finite) gradients.
  loss_0, grads_0 = jax.jit(jax.value_and_grad(
      lambda p, h: fn.apply(p, h, padded, 0 * ones)[2][0], argnums=(0, 1)))(
          params, hidden)
  assert float(loss_0) == 0.0
  for g in jax.tree.leaves(grads_0):
    assert np.all(np.asarray(g) == 0.0)


def test_gradients_finite_and_packed_tails_exact():
  """Packed tails (compute_tail_for_all=False) give the same values/grads."""
  setting = SETTINGS[2]
  cutoffs = setting[0]
  fn, params, hidden, targets = _setup(setting)
  # Second batch: nothing in tail 0 or 2 (all their chunks skipped), 10 of
  # the 12 rows in tail 1 (more than one chunk).
  targets_b = jnp.asarray(np.where(np.arange(N) < 2, 3, cutoffs[1]),
                          jnp.int32)  # Same dtype as targets: no retrace.
  mask = jnp.asarray(np.arange(N) != 5, jnp.float32)

  def loss_and_grads(fn):
    return jax.jit(jax.value_and_grad(
        lambda p, h, t: fn.apply(p, h, t, mask)[2][0], argnums=(0, 1)))

  ref_fn = loss_and_grads(fn)
  ref = [ref_fn(params, hidden, t) for t in (targets, targets_b)]
  for _, grads in ref:
    for g in jax.tree.leaves(grads):
      assert np.all(np.isfinite(np.asarray(g)))
  # With targets in every cluster, every parameter gets a gradient.
  for g in jax.tree.leaves(ref[0][1][0]):
    assert np.any(np.asarray(g) != 0.0)
  # With no target in the last tail, its parameters get zero gradient.
  last = ref[1][1][0]["adaptive_softmax/~/tail_2_output"]
  assert np.all(np.asarray(last["w"]) == 0.0)
  # Chunks of 2, 6 and 5 rows (6, 2 and 3 chunks) for the 3 tails.
  packed_fn = loss_and_grads(
      _transform(*setting, compute_tail_for_all=False,
                 tail_capacity=(0.1, 0.5, 0.34)))
  for t, (ref_loss, ref_grads) in zip((targets, targets_b), ref):
    loss, grads = packed_fn(params, hidden, t)
    np.testing.assert_allclose(loss, ref_loss, rtol=TOL)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOL),
                 grads, ref_grads)


def test_parameter_count_matches_formula():
  """D (c_1 + K) + (c_1 + K) + sum_k (D D_k + D_k S_k + S_k) for the head
  [D, c_1 + K] + bias and each tail's projection [D, D_k] (no bias) and output
  [D_k, S_k] + bias, with D_k = max(1, floor(D / div**(k+1) + 1/2)); without
  projections each tail is D S_k + S_k; a full softmax is D V + V."""
  hidden, targets = _inputs(0)

  def count(module_fn):
    fn = hk.transform(lambda h, t: module_fn().nll(h, t))
    params = jax.eval_shape(fn.init, jax.random.PRNGKey(0), hidden, targets)
    return (sum(x.size for x in jax.tree.leaves(params)),
            jax.tree.map(lambda x: x.shape, params))

  # Sizes need no parameters but (Haiku modules) a transform.
  in_transform = lambda f: hk.testing.transform_and_run(f)()

  cutoffs, sizes = (10, 20, 35), (10, 15, 15)
  proj = (4, 1, 1)  # 16/4 = 4, 16/16 = 1, 16/64 = 0.25 -> at least 1.
  k = len(cutoffs)
  formula = (D * (cutoffs[0] + k) + cutoffs[0] + k
             + sum(D * p + p * s + s for p, s in zip(proj, sizes)))
  assert formula == 427
  n, params = count(lambda: AdaptiveSoftmax(V, cutoffs))
  assert n == formula == in_transform(
      lambda: AdaptiveSoftmax(V, cutoffs).num_params(D))
  assert params == {
      "adaptive_softmax/~/head": {"w": (D, 13), "b": (13,)},
      "adaptive_softmax/~/tail_0_projection": {"w": (D, 4)},
      "adaptive_softmax/~/tail_0_output": {"w": (4, 10), "b": (10,)},
      "adaptive_softmax/~/tail_1_projection": {"w": (D, 1)},
      "adaptive_softmax/~/tail_1_output": {"w": (1, 15), "b": (15,)},
      "adaptive_softmax/~/tail_2_projection": {"w": (D, 1)},
      "adaptive_softmax/~/tail_2_output": {"w": (1, 15), "b": (15,)},
  }
  formula_np = D * 13 + 13 + sum(D * s + s for s in sizes)
  n, _ = count(lambda: AdaptiveSoftmax(V, cutoffs, tail_projection=False))
  assert n == formula_np == in_transform(lambda: AdaptiveSoftmax(
      V, cutoffs, tail_projection=False).num_params(D))
  n, _ = count(lambda: AdaptiveSoftmax(V, ()))
  assert n == D * V + V
  n, _ = count(lambda: FullSoftmax(V))
  assert n == D * V + V == in_transform(lambda: FullSoftmax(V).num_params(D))
  # Rounding half up: 10/4 = 2.5 -> 3.
  assert in_transform(
      lambda: AdaptiveSoftmax(V, cutoffs).projection_sizes(10)) == (3, 1, 1)
  assert in_transform(lambda: AdaptiveSoftmax(V, cutoffs, 2.0).projection_sizes(
      D)) == (8, 4, 2)


@pytest.mark.parametrize("cutoffs", [
    (0, 10), (10, 10), (20, 10), (10, 50), (10, 60), (-1,), (10.5,),
    (True,), 10, "10", None])
def test_bad_cutoffs_raise(cutoffs):
  with pytest.raises(ValueError, match="cutoffs"):
    hk.testing.transform_and_run(lambda: AdaptiveSoftmax(V, cutoffs))()


@pytest.mark.parametrize("kwargs, word", [
    (dict(vocab_size=0), "vocab_size"),
    (dict(div_value=0.5), "div_value"),
    (dict(div_value=float("inf")), "div_value"),
    (dict(tail_capacity=0.0), "tail_capacity"),
    (dict(tail_capacity=(0.5, 0.5)), "tail_capacity"),
    (dict(tail_capacity=None), "tail_capacity"),
])
def test_bad_arguments_raise(kwargs, word):
  args = dict(vocab_size=V, cutoffs=(10, 20, 35)) | kwargs
  with pytest.raises(ValueError, match=word):
    hk.testing.transform_and_run(lambda: AdaptiveSoftmax(**args))()
  with pytest.raises(ValueError, match="vocab_size"):
    hk.testing.transform_and_run(lambda: FullSoftmax(0))()


def test_bfloat16_policy_close():
  """Under a bf16 compute policy the matmuls run in bf16; log-probabilities,
  NLLs and the loss stay float32 and close to float32's."""
  setting = SETTINGS[2]
  fn, params, hidden, targets = _setup(setting)
  lp, nll, _ = fn.apply(params, hidden, targets, None)
  policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  with hk.mixed_precision.push_policy(AdaptiveSoftmax, policy):
    fn16 = _transform(*setting)  # Traced inside the policy.
    lp16, nll16, (loss16, _) = fn16.apply(params, hidden, targets, None)
  assert not np.array_equal(np.asarray(nll16), np.asarray(nll))
  assert lp16.dtype == nll16.dtype == loss16.dtype == jnp.float32
  np.testing.assert_allclose(jax.nn.logsumexp(lp16, axis=-1), 0.0, atol=1e-4)
  np.testing.assert_allclose(nll16, nll, rtol=0.05, atol=0.1)

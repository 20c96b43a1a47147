"""`paper_variant=True` against a float64 NumPy re-derivation of the paper's equations.

Paper (Santoro et al. 2018, eq. 2 and 7), with Sonnet's other details kept
(qkv LayerNorm, post-norm residuals, shared MLP, gates from x' and
tanh(M_{t-1})): only memory rows query; the input row is a key and value in
every block and is never updated; the gated update uses the attended memory
without a tanh.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rmc_jax

N, H, DV, DK, K, L, D, B, T = 3, 2, 4, 3, 2, 2, 5, 2, 3
F = H * DV
PREFIX = "relational_memory/~/"


def _ln(x, p):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["offset"]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _reference_step(p, x_BD, m_BNF, gate_style):
  lin = lambda name, v: v @ p[PREFIX + name]["w"] + p[PREFIX + name]["b"]
  x_B1F = lin("input_projection", x_BD)[:, None, :]
  mem = m_BNF
  weights = []
  for k in range(K):
    z = np.concatenate([mem, x_B1F], axis=1)  # The input row never changes.
    qkv = _ln(lin(f"block_{k}/~/qkv", z), p[PREFIX + f"block_{k}/~/qkv_layer_norm"])
    qkv = qkv.reshape(B, N + 1, H, 2 * DK + DV)
    q = qkv[:, :N, :, :DK] * DK ** -0.5
    kk, v = qkv[..., DK:2 * DK], qkv[..., 2 * DK:]
    w = _softmax(np.einsum("bqhd,bshd->bhqs", q, kk))
    att = np.einsum("bhqs,bshd->bqhd", w, v).reshape(B, N, F)
    mem = _ln(mem + att, p[PREFIX + f"block_{k}/~/attention_layer_norm"])
    h = mem
    for i in range(L):
      h = lin(f"attention_mlp/~/linear_{i}", np.maximum(h, 0) if i else h)
    mem = _ln(h + mem, p[PREFIX + f"block_{k}/~/mlp_layer_norm"])
    weights.append(w)
  if gate_style is None:
    return mem, np.stack(weights, 1)
  gates = (lin("input_to_gates", x_B1F.reshape(B, F))[:, None, :]
           + lin("memory_to_gates", np.tanh(m_BNF)))
  g = gates.shape[-1] // 2
  i_gate = _sigmoid(gates[..., :g] + 0.0)
  f_gate = _sigmoid(gates[..., g:] + 1.0)
  return i_gate * mem + f_gate * m_BNF, np.stack(weights, 1)


@pytest.mark.parametrize("gate_style", ["unit", "memory", None])
def test_paper_variant_matches_numpy(gate_style):
  def fn(x_TBD):
    core = rmc_jax.RelationalMemory(N, DV, num_heads=H, num_blocks=K,
                                    attention_mlp_layers=L, key_size=DK,
                                    gate_style=gate_style, paper_variant=True)
    return core.unroll(x_TBD, core.initial_state(B), return_info=True)

  model = hk.without_apply_rng(hk.transform(fn))
  x = np.random.default_rng(0).normal(size=(T, B, D)).astype(np.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(1)
  params = jax.tree.map(
      lambda a: (a + 0.3 * rng.normal(size=a.shape)).astype(np.float32), params)
  outputs, state, info = jax.jit(model.apply)(params, x)

  p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  m = np.broadcast_to(np.eye(N, F), (B, N, F)).astype(np.float64)
  for t in range(T):
    m, w = _reference_step(p64, x[t].astype(np.float64), m, gate_style)
    np.testing.assert_allclose(outputs[t], m.reshape(B, N * F), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(info.attention_weights[t], w, atol=1e-5)
  np.testing.assert_allclose(state, m, rtol=1e-5, atol=1e-5)
  assert info.attention_weights.shape == (T, B, K, H, N, N + 1)


def test_paper_variant_differs_from_sonnet():
  def fn(x_TBD, paper):
    core = rmc_jax.RelationalMemory(N, DV, num_heads=H, paper_variant=paper)
    return core.unroll(x_TBD, core.initial_state(B))[0]

  model = hk.without_apply_rng(hk.transform(fn))
  x = jnp.ones((T, B, D))
  params = model.init(jax.random.PRNGKey(0), x, False)
  assert np.abs(model.apply(params, x, True)
                - model.apply(params, x, False)).max() > 1e-3

"""Tests for the DNC core and its memory addressing (`rmc_jax.cores.dnc*`).

The addressing functions are checked against float64 NumPy references written
here from the paper's equations (loops over slots, a brute-force sort for the
allocation), the whole feedforward- and LSTM-controlled core step by step
against a NumPy re-derivation, the options where DeepMind's code and the
paper differ (key strength activation, gradient of the usage, clipping of
the controller state) in both settings, and the core against Haiku's unroll,
grad and vmap.
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax.cores import CORES, DNC, DNCState, make_core
from rmc_jax.cores import dnc_addressing as addr

EPS = 1e-6  # The module's documented epsilon (norms and usage sort).

# ---------------------------------------------------------------------------
# Independent float64 NumPy references (one example, no batch axis).
# ---------------------------------------------------------------------------


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _softmax(x):
  e = np.exp(x - np.max(x, axis=-1, keepdims=True))
  return e / np.sum(e, axis=-1, keepdims=True)


def ref_content(memory, keys, strengths):
  """memory [M, W], keys [H, W], strengths [H] -> [H, M]."""
  out = np.zeros((keys.shape[0], memory.shape[0]))
  for h in range(keys.shape[0]):
    k_norm = np.sqrt(keys[h] @ keys[h] + EPS)
    sims = [keys[h] @ row / (k_norm * np.sqrt(row @ row + EPS))
            for row in memory]
    out[h] = _softmax(strengths[h] * np.array(sims))
  return out


def ref_allocation(usage):
  """Brute force: sort the (eps-mapped) usage, then a loop over the order."""
  u = EPS + (1.0 - EPS) * np.asarray(usage, np.float64)
  order = sorted(range(len(u)), key=lambda i: (u[i], i))
  a = np.zeros_like(u)
  prod = 1.0
  for j in order:
    a[j] = (1.0 - u[j]) * prod
    prod *= u[j]
  return a


def ref_usage(usage, prev_ww, free_gates, prev_wr):
  """usage [M], prev_ww [H, M], free_gates [R], prev_wr [R, M] -> [M]."""
  out = np.zeros_like(usage)
  for i in range(len(usage)):
    w = 1.0 - np.prod([1.0 - prev_ww[h, i] for h in range(len(prev_ww))])
    psi = np.prod([1.0 - free_gates[r] * prev_wr[r, i]
                   for r in range(len(free_gates))])
    out[i] = (usage[i] + w - usage[i] * w) * psi
  return out


def ref_write_weights(memory, usage, keys, strengths, alloc_gates, write_gates):
  """Sequential allocation across write heads; -> [H, M]."""
  content = ref_content(memory, keys, strengths)
  u = usage.copy()
  out = np.zeros((len(keys), len(usage)))
  for h in range(len(keys)):
    a = ref_allocation(u)
    u = u + (1.0 - u) * alloc_gates[h] * write_gates[h] * a
    out[h] = write_gates[h] * (alloc_gates[h] * a
                               + (1.0 - alloc_gates[h]) * content[h])
  return out


def ref_write_memory(memory, ww, erase, write):
  out = memory.copy()
  for h in range(len(ww)):
    out = out * (1.0 - np.outer(ww[h], erase[h]))
  for h in range(len(ww)):
    out = out + np.outer(ww[h], write[h])
  return out


def ref_linkage(link, precedence, ww):
  """link [H, M, M], precedence [H, M], ww [H, M] -> (link, precedence)."""
  new_link = np.zeros_like(link)
  hh, m = ww.shape
  for h in range(hh):
    for i in range(m):
      for j in range(m):
        if i != j:
          new_link[h, i, j] = ((1.0 - ww[h, i] - ww[h, j]) * link[h, i, j]
                               + ww[h, i] * precedence[h, j])
  new_prec = (1.0 - ww.sum(-1, keepdims=True)) * precedence + ww
  return new_link, new_prec


def ref_read_weights(memory, link, prev_wr, keys, strengths, modes):
  """modes [R, 2H+1] ordered [backward_h..., content, forward_h...]."""
  hh = link.shape[0]
  content = ref_content(memory, keys, strengths)
  out = np.zeros_like(prev_wr)
  for r in range(len(prev_wr)):
    out[r] = modes[r, hh] * content[r]
    for h in range(hh):
      forward = link[h] @ prev_wr[r]    # f[i] = sum_j L[i, j] w[j]
      backward = link[h].T @ prev_wr[r]  # b[i] = sum_j L[j, i] w[j]
      out[r] += modes[r, h] * backward + modes[r, hh + 1 + h] * forward
  return out


def ref_access_step(s, iface):
  """s, iface: dicts of float64 arrays for one example."""
  usage = ref_usage(s["usage"], s["write_weights"], iface["free_gates"],
                    s["read_weights"])
  ww = ref_write_weights(s["memory"], usage, iface["write_keys"],
                         iface["write_strengths"], iface["allocation_gates"],
                         iface["write_gates"])
  memory = ref_write_memory(s["memory"], ww, iface["erase_vectors"],
                            iface["write_vectors"])
  link, prec = ref_linkage(s["link"], s["precedence_weights"], ww)
  wr = ref_read_weights(memory, link, s["read_weights"], iface["read_keys"],
                        iface["read_strengths"], iface["read_modes"])
  new = dict(memory=memory, read_weights=wr, write_weights=ww, link=link,
             precedence_weights=prec, usage=usage)
  return wr @ memory, new


def ref_parse(xi, r, h, w, strength_activation="softplus"):
  """The documented field-major interface layout."""
  sizes = [r * w, r, h * w, h, h * w, h * w, r, h, h, r * (2 * h + 1)]
  parts = np.split(xi, np.cumsum(sizes)[:-1])
  offset = {"softplus": 0.0, "oneplus": 1.0}[strength_activation]
  strength = lambda x: offset + np.log1p(np.exp(x))
  return dict(
      read_keys=parts[0].reshape(r, w), read_strengths=strength(parts[1]),
      write_keys=parts[2].reshape(h, w), write_strengths=strength(parts[3]),
      erase_vectors=_sigmoid(parts[4]).reshape(h, w),
      write_vectors=parts[5].reshape(h, w), free_gates=_sigmoid(parts[6]),
      allocation_gates=_sigmoid(parts[7]), write_gates=_sigmoid(parts[8]),
      read_modes=_softmax(parts[9].reshape(r, 2 * h + 1)))


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _close(actual, expected, tol=1e-5, what=""):
  actual = np.asarray(actual, np.float64)
  expected = np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  assert np.all(np.isfinite(actual)), what
  err = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-3)
  assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.1g}"


def _f32(x):
  return jnp.asarray(x, jnp.float32)


def _random_weights(rng, shape, total=None):
  """Non-negative rows summing to `total` (random in (0, 1) if None)."""
  w = rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])
  if total is None:
    total = rng.uniform(0.0, 1.0, size=shape[:-1] + (1,))
  return w * total


# ---------------------------------------------------------------------------
# Addressing functions vs the references.
# ---------------------------------------------------------------------------


def test_content_weights_match_reference():
  rng = np.random.default_rng(0)
  memory = rng.normal(size=(2, 5, 4))
  memory[0, 3] = 0.0  # An empty slot: the epsilon keeps it finite.
  keys = rng.normal(size=(2, 3, 4))
  strengths = rng.uniform(1.0, 5.0, size=(2, 3))
  got = addr.content_weights(_f32(memory), _f32(keys), _f32(strengths))
  assert got.shape == (2, 3, 5)
  for b in range(2):
    _close(got[b], ref_content(memory[b], keys[b], strengths[b]), 1e-5, "C")
  np.testing.assert_allclose(np.sum(got, -1), 1.0, atol=1e-6)
  # Unbatched call; a very strong key picks the most similar slot.
  got = addr.content_weights(_f32(memory[1]), _f32(memory[1, 2:3]),
                             _f32([200.0]))
  assert got.shape == (1, 5) and got[0, 2] > 0.99


def test_allocation_weights_match_bruteforce():
  rng = np.random.default_rng(1)
  usage = rng.uniform(size=(4, 7))
  usage[1, :3] = 0.0        # ties at zero
  usage[2] = 1.0            # a full memory
  usage[3, [1, 4]] = 0.25   # ties inside
  got = np.asarray(addr.allocation_weights(_f32(usage)))
  for b in range(4):
    _close(got[b], ref_allocation(usage[b]), 1e-5, f"a[{b}]")
  assert np.all(got >= 0.0) and np.all(got <= 1.0)
  assert np.all(got.sum(-1) <= 1.0 + 1e-6)
  for b in (0, 1, 3):  # the largest weight is on the least-used slot
    assert np.argmax(got[b]) == np.argmin(usage[b])
  np.testing.assert_allclose(got[1, 0], 1.0, atol=1e-5)  # first free slot
  assert got[2].sum() < 1e-4                             # nothing free
  # Gradients exist and are finite, even for all-zero usage.
  g = jax.grad(lambda u: jnp.sum(addr.allocation_weights(u) ** 2))(
      jnp.zeros((5,)))
  assert np.all(np.isfinite(g))


def test_write_allocation_with_two_heads_picks_different_slots():
  usage = _f32([0.9, 0.0, 0.5, 0.0, 0.8])
  a = np.asarray(addr.write_allocation_weights(usage, _f32([1.0, 1.0])))
  assert a.shape == (2, 5)
  assert np.argmax(a[0]) == 1 and np.argmax(a[1]) == 3
  a = np.asarray(addr.write_allocation_weights(usage, _f32([0.0, 1.0])))
  assert np.argmax(a[0]) == 1 and np.argmax(a[1]) == 1  # head 0 not writing


def test_usage_stays_in_unit_interval_and_matches_reference():
  rng = np.random.default_rng(2)
  b, m, r, h = 3, 6, 2, 2
  usage = np.zeros((b, m))
  prev_ww = np.zeros((b, h, m))
  prev_wr = np.zeros((b, r, m))
  for step in range(6):
    free = rng.uniform(size=(b, r))
    got = np.asarray(addr.update_usage(_f32(usage), _f32(prev_ww), _f32(free),
                                       _f32(prev_wr)))
    want = np.stack([ref_usage(usage[i], prev_ww[i], free[i], prev_wr[i])
                     for i in range(b)])
    _close(got, want, 1e-5, f"usage step {step}")
    assert np.all(got >= 0.0) and np.all(got <= 1.0)
    usage = want
    prev_ww = _random_weights(rng, (b, h, m))
    prev_wr = _random_weights(rng, (b, r, m), total=1.0)
  # Full write without freeing saturates; full free with full read empties.
  full = addr.update_usage(_f32(np.zeros(m)), _f32(np.eye(m)[None, 0]),
                           _f32([0.0]), _f32(np.zeros((1, m))))
  assert full[0] == 1.0
  freed = addr.update_usage(full, _f32(np.zeros((1, m))), _f32([1.0]),
                            _f32(np.eye(m)[None, 0]))
  assert freed[0] == 0.0


def test_write_weights_and_memory_match_reference():
  rng = np.random.default_rng(3)
  m, w, h = 6, 4, 2
  memory = rng.normal(size=(m, w))
  usage = rng.uniform(size=m)
  keys = rng.normal(size=(h, w))
  strengths = rng.uniform(1.0, 4.0, size=h)
  ga, gw = rng.uniform(size=h), rng.uniform(size=h)
  ww = np.asarray(addr.write_weights(_f32(memory), _f32(usage), _f32(keys),
                                     _f32(strengths), _f32(ga), _f32(gw)))
  _close(ww, ref_write_weights(memory, usage, keys, strengths, ga, gw), 1e-5,
         "w^w")
  assert np.all(ww.sum(-1) <= 1.0 + 1e-6)
  erase, write = rng.uniform(size=(h, w)), rng.normal(size=(h, w))
  got = addr.write_memory(_f32(memory), _f32(ww), _f32(erase), _f32(write))
  _close(got, ref_write_memory(memory, ww, erase, write), 1e-5, "M")


def test_linkage_matches_reference():
  rng = np.random.default_rng(4)
  b, h, m = 2, 2, 5
  link = np.zeros((b, h, m, m))
  prec = np.zeros((b, h, m))
  state = addr.TemporalLinkageState(_f32(link), _f32(prec))
  for step in range(5):
    ww = _random_weights(rng, (b, h, m))
    state = addr.update_linkage(state, _f32(ww))
    for i in range(b):
      link[i], prec[i] = ref_linkage(link[i], prec[i], ww[i])
    _close(state.link, link, 1e-5, f"L step {step}")
    _close(state.precedence_weights, prec, 1e-5, f"p step {step}")
    got = np.asarray(state.link)
    assert np.all(got >= -1e-7)
    assert np.all(np.diagonal(got, axis1=-2, axis2=-1) == 0.0)
    assert np.all(got.sum(-1) <= 1.0 + 1e-6)
    assert np.all(got.sum(-2) <= 1.0 + 1e-6)
    assert np.all(np.asarray(state.precedence_weights).sum(-1) <= 1.0 + 1e-6)


def test_read_weights_match_reference_and_follow_links():
  rng = np.random.default_rng(5)
  b, h, r, m, w = 2, 2, 3, 5, 4
  memory = rng.normal(size=(b, m, w))
  link = np.zeros((b, h, m, m))
  prec = np.zeros((b, h, m))
  for _ in range(4):
    ww = _random_weights(rng, (b, h, m))
    for i in range(b):
      link[i], prec[i] = ref_linkage(link[i], prec[i], ww[i])
  prev = _random_weights(rng, (b, r, m), total=1.0)
  keys = rng.normal(size=(b, r, w))
  strengths = rng.uniform(1.0, 4.0, size=(b, r))
  modes = rng.dirichlet(np.ones(2 * h + 1), size=(b, r))
  got = addr.read_weights(_f32(memory), _f32(link), _f32(prev), _f32(keys),
                          _f32(strengths), _f32(modes))
  for i in range(b):
    _close(got[i], ref_read_weights(memory[i], link[i], prev[i], keys[i],
                                    strengths[i], modes[i]), 1e-5, "w^r")

  # Write slots 2, 0, 3 in turn (one head): forward from 2 reads 0, backward
  # from 3 reads 0.
  state = addr.TemporalLinkageState(jnp.zeros((1, m, m)), jnp.zeros((1, m)))
  for slot in (2, 0, 3):
    state = addr.update_linkage(state, _f32(np.eye(m)[None, slot]))
  backward_mode, forward_mode = _f32([[1.0, 0.0, 0.0]]), _f32([[0.0, 0.0, 1.0]])
  onehot = lambda i: _f32(np.eye(m)[None, i])
  args = (jnp.zeros((m, w)), state.link)
  zk, zs = jnp.ones((1, w)), jnp.ones((1,))
  fwd = addr.read_weights(*args, onehot(2), zk, zs, forward_mode)
  bwd = addr.read_weights(*args, onehot(3), zk, zs, backward_mode)
  np.testing.assert_allclose(fwd, onehot(0), atol=1e-6)
  np.testing.assert_allclose(bwd, onehot(0), atol=1e-6)


def _random_state(rng, m, w, r, h, batch=()):
  """A generic (tie-free) access state as a dict of float64 arrays.

  Comparisons over several steps start from such a state: from the all-zero
  initial state, slots get usages that are equal in float32 but differ by
  ~eps**2 in float64, so the two would sort them differently.
  """
  link = np.zeros(batch + (h, m, m))
  prec = np.zeros(batch + (h, m))
  for i in np.ndindex(*batch):
    for _ in range(3):
      link[i], prec[i] = ref_linkage(link[i], prec[i],
                                     _random_weights(rng, (h, m)))
  return dict(memory=rng.normal(size=batch + (m, w)),
              read_weights=_random_weights(rng, batch + (r, m)),
              write_weights=_random_weights(rng, batch + (h, m)), link=link,
              precedence_weights=prec,
              usage=rng.uniform(size=batch + (m,)))


def _to_access_state(d):
  return addr.AccessState(
      memory=_f32(d["memory"]), read_weights=_f32(d["read_weights"]),
      write_weights=_f32(d["write_weights"]),
      linkage=addr.TemporalLinkageState(_f32(d["link"]),
                                        _f32(d["precedence_weights"])),
      usage=_f32(d["usage"]))


def _interface(**fields):
  return addr.Interface(**{k: _f32(v) for k, v in fields.items()})


def test_write_then_read_by_content():
  """Overwrite the slot a key addresses, then read the word back by content."""
  m, w = 6, 8
  q, _ = np.linalg.qr(np.random.default_rng(6).normal(size=(w, w)))
  memory = 2.0 * q[:m]   # orthogonal rows
  word = 3.0 * q[m]      # orthogonal to every stored row
  state = addr.initial_access_state(None, m, w, num_reads=1, num_writes=1)
  state = state._replace(memory=_f32(memory))
  common = dict(read_strengths=[100.0], write_strengths=[100.0],
                erase_vectors=np.ones((1, w)), free_gates=[0.0],
                allocation_gates=[0.0], read_modes=[[0.0, 1.0, 0.0]])
  write = _interface(read_keys=memory[None, 0], write_keys=memory[None, 2],
                     write_vectors=word[None], write_gates=[1.0], **common)
  _, state = addr.access_step(state, write)
  assert state.write_weights[0, 2] > 0.999
  expected = memory.copy()
  expected[2] = word
  _close(state.memory, expected, 1e-4, "memory after write")
  read = _interface(read_keys=word[None], write_keys=memory[None, 0],
                    write_vectors=np.zeros((1, w)), write_gates=[0.0],
                    **common)
  reads, state = addr.access_step(state, read)
  assert state.read_weights[0, 2] > 0.999
  _close(reads[0], word, 1e-3, "read vector")
  assert state.usage[2] > 0.999  # usage counts the previous step's write


@pytest.mark.parametrize("strength_activation", ["softplus", "oneplus"])
def test_access_step_matches_reference_over_steps(strength_activation):
  rng = np.random.default_rng(7)
  m, w, r, h = 5, 3, 2, 2
  size = addr.interface_size(r, h, w)
  assert addr.interface_size(r, 1, w) == r * w + 3 * w + 5 * r + 3
  ref = _random_state(rng, m, w, r, h)
  state = _to_access_state(ref)
  for step in range(4):
    xi = rng.normal(size=size)
    interface = addr.parse_interface(_f32(xi), r, h, w, strength_activation)
    reads, state = addr.access_step(state, interface)
    ref_iface = ref_parse(xi, r, h, w, strength_activation)
    _close(interface.read_strengths, ref_iface["read_strengths"], 1e-6,
           "read strengths")
    _close(interface.write_strengths, ref_iface["write_strengths"], 1e-6,
           "write strengths")
    ref_reads, ref = ref_access_step(ref, ref_iface)
    _close(reads, ref_reads, 1e-4, f"reads step {step}")
    for k, v in (("memory", state.memory), ("usage", state.usage),
                 ("read_weights", state.read_weights),
                 ("write_weights", state.write_weights),
                 ("link", state.linkage.link),
                 ("precedence_weights", state.linkage.precedence_weights)):
      _close(v, ref[k], 1e-4, f"{k} step {step}")


# ---------------------------------------------------------------------------
# The core.
# ---------------------------------------------------------------------------

B, T, D_IN = 2, 3, 5
SMALL = dict(memory_size=6, word_size=3, num_reads=2, num_writes=2,
             controller_sizes=(8,))


def _xs(seed, shape=(T, B, D_IN)):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _core_fn(controller, clip, **options):
  """unroll and dynamic_unroll from the given access state, zero reads."""

  def fn(xs, access0):
    core = DNC(controller=controller, clip_value=clip, **SMALL, **options)
    s0 = core.initial_state(xs.shape[1])._replace(access=access0)
    return core.unroll(xs, s0), hk.dynamic_unroll(core, xs, s0)

  return hk.without_apply_rng(hk.transform(fn))


@pytest.mark.parametrize("controller", ["lstm", "feedforward"])
def test_core_unroll_equals_dynamic_unroll(controller):
  """From a generic memory state; the feedforward core vs NumPy step by step."""
  clip = 0.3 if controller == "feedforward" else 20.0
  t = _core_fn(controller, clip)
  m, w, r, h = (SMALL[k] for k in ("memory_size", "word_size", "num_reads",
                                   "num_writes"))
  xs = _xs(0)
  ref_access = _random_state(np.random.default_rng(8), m, w, r, h, (B,))
  access0 = _to_access_state(ref_access)
  params = jax.jit(t.init)(jax.random.PRNGKey(1), xs, access0)
  names = {"lstm": ["dnc/~/controller/~/layer_0"],
           "feedforward": ["dnc/~/controller/~/linear_0"]}[controller]
  assert sorted(params) == names + ["dnc/~/interface", "dnc/~/output"]
  assert params["dnc/~/interface"]["w"].shape == (
      8, addr.interface_size(r, h, w))
  assert params["dnc/~/output"]["w"].shape == (8 + r * w, 8)

  (outs, final), (d_out, d_state) = jax.jit(t.apply)(params, xs, access0)
  assert outs.shape == (T, B, 8)
  assert isinstance(final, DNCState)
  assert isinstance(final.access, addr.AccessState)
  assert isinstance(final.access.linkage, addr.TemporalLinkageState)
  assert final.access.memory.shape == (B, m, w)
  assert final.access.linkage.link.shape == (B, h, m, m)
  assert final.read_vectors.shape == (B, r, w)
  _close(d_out, outs, 1e-5, "outputs")
  jax.tree.map(lambda a, b_: _close(a, b_, 1e-5, "state"), d_state, final)
  if controller == "feedforward":
    assert np.max(np.abs(outs)) <= clip + 1e-7
    _check_feedforward_reference(params, xs, ref_access, outs, final, clip)


def _check_feedforward_reference(params, xs, ref_access, outs, final, clip):
  """A NumPy float64 re-derivation of the one-layer-MLP-controlled DNC."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  ctrl, iface_p, out_p = (p["dnc/~/controller/~/linear_0"],
                          p["dnc/~/interface"], p["dnc/~/output"])
  r, h, w = SMALL["num_reads"], SMALL["num_writes"], SMALL["word_size"]
  for b in range(B):
    s = {k: v[b] for k, v in ref_access.items()}
    reads = np.zeros((r, w))
    for t in range(T):
      x = np.concatenate([xs[t, b], reads.ravel()])
      c = np.clip(np.maximum(x @ ctrl["w"] + ctrl["b"], 0.0), -clip, clip)
      xi = c @ iface_p["w"] + iface_p["b"]
      reads, s = ref_access_step(s, ref_parse(xi, r, h, w))
      y = np.concatenate([c, reads.ravel()]) @ out_p["w"] + out_p["b"]
      _close(outs[t, b], np.clip(y, -clip, clip), 1e-4, f"output t={t}")
    _close(final.access.memory[b], s["memory"], 1e-4, "memory")
    _close(final.access.usage[b], s["usage"], 1e-4, "usage")
    _close(final.access.linkage.link[b], s["link"], 1e-4, "link")
    _close(final.read_vectors[b], reads, 1e-4, "reads")


@pytest.mark.parametrize("clip_controller_state,strength_activation",
                         [(True, "softplus"), (False, "oneplus")])
def test_lstm_core_matches_reference(clip_controller_state,
                                     strength_activation):
  """The LSTM-controlled core vs NumPy; the clip binds on the cell state."""
  clip = 0.3
  t = _core_fn("lstm", clip, clip_controller_state=clip_controller_state,
               strength_activation=strength_activation)
  m, w, r, h = (SMALL[k] for k in ("memory_size", "word_size", "num_reads",
                                   "num_writes"))
  xs = 3.0 * _xs(4)
  ref_access = _random_state(np.random.default_rng(9), m, w, r, h, (B,))
  access0 = _to_access_state(ref_access)
  params = jax.jit(t.init)(jax.random.PRNGKey(5), xs, access0)
  (outs, final), _ = jax.jit(t.apply)(params, xs, access0)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  lstm, iface_p, out_p = (p["dnc/~/controller/~/layer_0"],
                          p["dnc/~/interface"], p["dnc/~/output"])
  size = SMALL["controller_sizes"][0]
  max_cell = 0.0
  for b in range(B):
    s = {k: v[b] for k, v in ref_access.items()}
    reads, hidden, cell = np.zeros((r, w)), np.zeros(size), np.zeros(size)
    for step in range(T):
      x = np.concatenate([xs[step, b], reads.ravel()])
      gates = x @ lstm["w_x"] + lstm["b"] + hidden @ lstm["w_h"]
      i, g, f, o = np.split(gates, 4)
      cell = _sigmoid(f + 1.0) * cell + _sigmoid(i) * np.tanh(g)
      hidden = _sigmoid(o) * np.tanh(cell)
      max_cell = max(max_cell, np.max(np.abs(cell)))
      c = np.clip(hidden, -clip, clip)
      if clip_controller_state:
        hidden, cell = c, np.clip(cell, -clip, clip)
      xi = c @ iface_p["w"] + iface_p["b"]
      reads, s = ref_access_step(s, ref_parse(xi, r, h, w,
                                              strength_activation))
      y = np.concatenate([c, reads.ravel()]) @ out_p["w"] + out_p["b"]
      _close(outs[step, b], np.clip(y, -clip, clip), 1e-4, f"output {step}")
    _close(final.controller[0].hidden[b], hidden, 1e-4, "hidden")
    _close(final.controller[0].cell[b], cell, 1e-4, "cell")
    _close(final.access.memory[b], s["memory"], 1e-4, "memory")
  assert max_cell > 2 * clip  # The state clipping makes a difference.


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_usage_write_gradient_matches_reference(stop_gradient):
  """jax.grad through two access steps vs float64 central differences of
  the reference, where the stop-gradient cuts step 2's usage from w^w_1."""
  rng = np.random.default_rng(11)
  m, w, r, h = 5, 3, 2, 2
  size = addr.interface_size(r, h, w)
  s0 = _random_state(rng, m, w, r, h)
  xi1, xi2 = rng.normal(size=size), rng.normal(size=size)
  c_reads, c_usage = rng.normal(size=(r, w)), rng.normal(size=m)

  def loss(xi1):
    state = _to_access_state(s0)
    for xi in (xi1, _f32(xi2)):
      reads, state = addr.access_step(
          state, addr.parse_interface(xi, r, h, w), stop_gradient)
    return (jnp.sum(_f32(c_reads) * reads)
            + jnp.sum(_f32(c_usage) * state.usage))

  grad = jax.grad(loss)(_f32(xi1))

  def ref_loss(xi1, frozen_write_weights):
    _, s1 = ref_access_step(s0, ref_parse(xi1, r, h, w))
    if frozen_write_weights is not None:  # Step 2's usage sees a constant.
      s1 = dict(s1, write_weights=frozen_write_weights)
    reads, s2 = ref_access_step(s1, ref_parse(xi2, r, h, w))
    return np.sum(c_reads * reads) + np.sum(c_usage * s2["usage"])

  def ref_grad(cut):
    frozen = ref_access_step(s0, ref_parse(xi1, r, h, w))[1]["write_weights"]
    out, delta = np.zeros(size), 1e-6
    for k in range(size):
      e = np.zeros(size)
      e[k] = delta
      out[k] = (ref_loss(xi1 + e, frozen if cut else None)
                - ref_loss(xi1 - e, frozen if cut else None)) / (2 * delta)
    return out

  expected, other = ref_grad(stop_gradient), ref_grad(not stop_gradient)
  _close(grad, expected, 1e-4, "gradient")
  assert np.max(np.abs(expected - other)) > 1e-2 * np.max(np.abs(expected))


def test_core_grad_and_vmap():
  """From initial_state: finite gradients; vmap over unbatched == batched."""

  def fn(xs):
    core = DNC(**SMALL)
    batched, _ = core.unroll(xs, core.initial_state(B))

    def one(x_TD):  # per example, unbatched state
      return core.unroll(x_TD, core.initial_state(None))[0]

    per_example = hk.vmap(one, in_axes=1, out_axes=1, split_rng=False)(xs)
    return batched, per_example

  t = hk.without_apply_rng(hk.transform(fn))
  xs = _xs(2)
  params = jax.jit(t.init)(jax.random.PRNGKey(3), xs)

  def loss(p):
    batched, per_example = t.apply(p, xs)
    return jnp.sum(jnp.square(batched)), (batched, per_example)

  grads, (batched, per_example) = jax.jit(jax.grad(loss, has_aux=True))(params)
  _close(per_example, batched, 1e-5, "vmap vs batched")
  for module, leaves in grads.items():
    for name, g in leaves.items():
      assert np.all(np.isfinite(g)), (module, name)
  assert np.max(np.abs(grads["dnc/~/interface"]["w"])) > 0.0
  assert np.max(np.abs(grads["dnc/~/interface"]["b"])) > 0.0


def _build(fn):
  def wrapped():
    fn()
    return jnp.zeros(())
  hk.transform(wrapped).init(jax.random.PRNGKey(0))


def test_make_core_and_initial_state():
  assert CORES["dnc"] is DNC

  def fn():
    core = make_core("dnc", memory_size=4, word_size=2, num_reads=3,
                     controller="feedforward", controller_sizes=5,
                     output_size=7)
    assert isinstance(core, DNC) and isinstance(core, hk.RNNCore)
    assert core.controller_sizes == (5,) and core.output_size == 7
    s = core.initial_state(None)
    assert s.controller == () and s.access.memory.shape == (4, 2)
    s = core.initial_state(2)
    assert s.read_vectors.shape == (2, 3, 2) and s.access.usage.shape == (2, 4)
    for leaf in jax.tree.leaves(s):
      assert leaf.dtype == jnp.float32
      np.testing.assert_array_equal(leaf, 0.0)
    lstm = make_core("dnc", controller_sizes=(4, 6), skip_connections=True)
    assert lstm.output_size == 10 and lstm.clip_value == 20.0
    assert make_core("dnc", clip_value=0).clip_value is None

  _build(fn)


@pytest.mark.parametrize("kwargs,match", [
    (dict(memory_size=0), "memory_size"),
    (dict(word_size=2.5), "word_size"),
    (dict(num_reads=-1), "num_reads"),
    (dict(num_writes=True), "num_writes"),
    (dict(controller="gru"), "controller"),
    (dict(controller_sizes=()), "controller_sizes"),
    (dict(controller_sizes=(4, 0)), "controller_sizes"),
    (dict(clip_value=-1.0), "clip_value"),
    (dict(output_size=0), "output_size"),
    (dict(controller="feedforward", skip_connections=True),
     "skip_connections"),
    (dict(strength_activation="exp"), "strength_activation"),
    (dict(bogus=1), "bogus"),
])
def test_bad_args(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _build(lambda: make_core("dnc", **kwargs))

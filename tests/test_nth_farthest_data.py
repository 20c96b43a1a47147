"""Tests for the Nth-farthest data generator (rmc_jax.tasks.nth_farthest).

Labels are checked against an independent brute-force reference written in
pure Python (list comprehensions and `sorted`, no NumPy ranking).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from rmc_jax.tasks import nth_farthest as nf

CONFIGS = [(8, 16), (4, 4), (3, 2)]  # (num_objects, num_features)
MODES = [False, True]  # sonnet_compat
MODE_IDS = ["paper", "sonnet"]

# Two distances closer than this are treated as a tie by the reference check
# (the generator and the reference may round the last bit differently).
TIE_TOL = 1e-12


def _one_hot_index(block: list[float]) -> int:
  """Index of the single 1.0 in a one-hot list; fails if not one-hot."""
  assert all(v in (0.0, 1.0) for v in block), block
  assert sum(block) == 1.0, block
  return block.index(1.0)


def _decode_example(
    rows_TD: list[list[float]], num_objects: int, num_features: int,
    sonnet_compat: bool) -> tuple[list[list[float]], list[int], int, int]:
  """Decodes one example into (features [T][F], ids [T], n, m).

  Paper layout: [x | id | n | m]; Sonnet layout: [x | id | m | n].
  """
  K, F = num_objects, num_features
  feats, ids, firsts, seconds = [], [], [], []
  for row in rows_TD:
    assert len(row) == F + 3 * K
    feats.append(row[:F])
    ids.append(_one_hot_index(row[F:F + K]))
    firsts.append(_one_hot_index(row[F + K:F + 2 * K]))
    seconds.append(_one_hot_index(row[F + 2 * K:]))
  # The question is repeated, unchanged, on every row.
  assert len(set(firsts)) == 1 and len(set(seconds)) == 1
  if sonnet_compat:
    m, n = firsts[0], seconds[0]
  else:
    n, m = firsts[0], seconds[0]
  return feats, ids, n, m


def _reference_answer(feats: list[list[float]], ids: list[int], n: int, m: int,
                      sonnet_compat: bool) -> tuple[int, dict[int, float]]:
  """Brute force: (expected id, distance from m of every id)."""
  ref = feats[ids.index(m)]
  dist_by_id = {
      i: math.sqrt(sum((a - b)**2 for a, b in zip(f, ref)))
      for f, i in zip(feats, ids)
  }
  pairs = [(d, i) for i, d in dist_by_id.items()]
  # Paper: n-th farthest (descending). Sonnet: nth nearest (ascending).
  ranked = sorted(pairs, key=lambda p: p[0], reverse=not sonnet_compat)
  return ranked[n][1], dist_by_id


@pytest.mark.parametrize("sonnet_compat", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("num_objects,num_features", CONFIGS)
def test_labels_match_brute_force(num_objects, num_features, sonnet_compat):
  K, F = num_objects, num_features
  rng = np.random.default_rng(1000 + 10 * K + F)
  inputs_BTD, labels_B = nf.generate_batch(rng, 600, K, F, sonnet_compat)
  seen_ns = set()
  for rows_TD, label in zip(inputs_BTD.tolist(), labels_B.tolist()):
    feats, ids, n, m = _decode_example(rows_TD, K, F, sonnet_compat)
    expected, dist_by_id = _reference_answer(feats, ids, n, m, sonnet_compat)
    assert 0 <= label < K
    if label != expected:  # only acceptable for a (near-)tie
      assert abs(dist_by_id[label] - dist_by_id[expected]) <= TIE_TOL
    # Rank of the answer's distance in the mode's order equals n.
    d = dist_by_id[label]
    sign = 1.0 if sonnet_compat else -1.0  # rank by sign * distance, ascending
    strictly_ahead = sum(
        1 for v in dist_by_id.values() if sign * (v - d) < -TIE_TOL)
    ahead_or_tied = sum(
        1 for v in dist_by_id.values() if sign * (v - d) <= TIE_TOL)
    assert strictly_ahead <= n < ahead_or_tied
    # Trivial questions: the reference itself is at distance 0.
    self_rank = 0 if sonnet_compat else K - 1
    if n == self_rank:
      assert label == m
    else:
      assert label != m
    seen_ns.add(n)
  assert seen_ns == set(range(K))


@pytest.mark.parametrize("sonnet_compat", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("num_objects,num_features", CONFIGS)
def test_shapes_dtypes_and_encoding(num_objects, num_features, sonnet_compat):
  K, F = num_objects, num_features
  B = 512
  inputs_BTD, labels_B = nf.generate_batch(np.random.default_rng(7), B, K, F,
                                           sonnet_compat=sonnet_compat)
  assert inputs_BTD.shape == (B, K, F + 3 * K)
  assert inputs_BTD.shape[-1] == nf.NthFarthestSpec(K, F,
                                                    sonnet_compat).input_size
  assert inputs_BTD.dtype == np.float32
  assert labels_B.shape == (B,) and labels_B.dtype == np.int32
  assert labels_B.min() >= 0 and labels_B.max() < K

  x_BTF = inputs_BTD[..., :F]
  assert x_BTF.min() >= -1.0 and x_BTF.max() < 1.0
  assert x_BTF.min() < -0.9 and x_BTF.max() > 0.9  # covers the range

  for lo in (F, F + K, F + 2 * K):
    block_BTK = inputs_BTD[..., lo:lo + K]
    assert np.isin(block_BTK, (0.0, 1.0)).all()
    np.testing.assert_array_equal(block_BTK.sum(-1), 1.0)
  # Ids of each example are a permutation of range(K).
  ids_BT = inputs_BTD[..., F:F + K].argmax(-1)
  np.testing.assert_array_equal(np.sort(ids_BT, axis=1),
                                np.tile(np.arange(K), (B, 1)))
  # Question blocks are identical on every row.
  q_BTD = inputs_BTD[..., F + K:]
  np.testing.assert_array_equal(q_BTD, np.broadcast_to(q_BTD[:, :1],
                                                       q_BTD.shape))


@pytest.mark.parametrize("sonnet_compat", MODES, ids=MODE_IDS)
def test_generate_batch_deterministic_given_rng(sonnet_compat):
  a = nf.generate_batch(np.random.default_rng(3), 64, 8, 16, sonnet_compat)
  b = nf.generate_batch(np.random.default_rng(3), 64, 8, 16, sonnet_compat)
  c = nf.generate_batch(np.random.default_rng(4), 64, 8, 16, sonnet_compat)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])


def _chi_square(counts: np.ndarray) -> float:
  expected = counts.sum() / len(counts)
  return float(((counts - expected)**2 / expected).sum())


@pytest.mark.parametrize("sonnet_compat", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("num_objects", [8, 3])
def test_label_n_and_m_roughly_uniform(num_objects, sonnet_compat):
  K, F = num_objects, 4
  inputs_BTD, labels_B = nf.generate_batch(np.random.default_rng(11), 20000, K,
                                           F, sonnet_compat)
  first_B = inputs_BTD[:, 0, F + K:F + 2 * K].argmax(-1)
  second_B = inputs_BTD[:, 0, F + 2 * K:].argmax(-1)
  n_B, m_B = (second_B, first_B) if sonnet_compat else (first_B, second_B)
  # Loose bound: the 99.999th percentile of chi2 with <= 7 dof is ~33.
  for values_B in (labels_B, n_B, m_B):
    counts_K = np.bincount(values_B, minlength=K)
    assert len(counts_K) == K
    assert _chi_square(counts_K) < 40.0, counts_K


def test_iterator_same_seed_same_batches_and_state_restore():
  it_a = nf.NthFarthestIterator(32, 8, 16, seed=5)
  it_b = nf.NthFarthestIterator(32, 8, 16, seed=5)
  batches_a = [next(it_a) for _ in range(4)]
  for inputs_a, labels_a in batches_a:
    inputs_b, labels_b = next(it_b)
    np.testing.assert_array_equal(inputs_a, inputs_b)
    np.testing.assert_array_equal(labels_a, labels_b)

  # Save after 2 batches; a fresh iterator restored there yields batches 2, 3.
  it_c = nf.NthFarthestIterator(32, 8, 16, seed=5)
  next(it_c), next(it_c)
  state = it_c.get_state()
  state = json.loads(json.dumps(state))  # JSON round trip
  assert state == {"seed": 5, "index": 2}
  it_d = nf.NthFarthestIterator(32, 8, 16, seed=123)
  it_d.set_state(state)
  assert it_d.get_state() == state
  for k in (2, 3):
    inputs_d, labels_d = next(it_d)
    np.testing.assert_array_equal(inputs_d, batches_a[k][0])
    np.testing.assert_array_equal(labels_d, batches_a[k][1])
    # batch_at is the same pure function of (seed, k).
    np.testing.assert_array_equal(it_d.batch_at(k)[0], batches_a[k][0])
  assert it_d.get_state() == {"seed": 5, "index": 4}


@pytest.mark.parametrize("sonnet_compat", MODES, ids=MODE_IDS)
def test_iterator_is_iterable_and_shapes(sonnet_compat):
  it = nf.NthFarthestIterator(16, 4, 4, sonnet_compat=sonnet_compat, seed=0)
  assert iter(it) is it
  for _, (inputs_BTD, labels_B) in zip(range(3), it):
    assert inputs_BTD.shape == (16, 4,
                                4 + 12) and inputs_BTD.dtype == np.float32
    assert labels_B.shape == (16,) and labels_B.dtype == np.int32
  assert it.get_state()["index"] == 3


def test_different_seeds_differ():
  a = next(nf.NthFarthestIterator(32, 8, 16, seed=0))
  b = next(nf.NthFarthestIterator(32, 8, 16, seed=1))
  assert not np.array_equal(a[0], b[0])


def test_held_out_deterministic_and_disjoint_from_training():
  held_a = nf.held_out_batches(3, 32, 8, 16, seed=0)
  held_b = nf.held_out_batches(3, 32, 8, 16, seed=0)
  assert len(held_a) == 3
  for (xa, ya), (xb, yb) in zip(held_a, held_b):
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  assert not np.array_equal(held_a[0][0], held_a[1][0])
  held_c = nf.held_out_batches(1, 32, 8, 16, seed=1)
  assert not np.array_equal(held_a[0][0], held_c[0][0])

  train = nf.NthFarthestIterator(32, 8, 16, seed=0)
  train_xs = [next(train)[0] for _ in range(5)]
  for x_held, _ in held_a:
    for x_train in train_xs:
      assert not np.array_equal(x_held, x_train)


def test_held_out_sonnet_mode_layout():
  (inputs_BTD, labels_B), = nf.held_out_batches(1, 16, 3, 2, sonnet_compat=True,
                                                seed=2)
  for rows_TD, label in zip(inputs_BTD.tolist(), labels_B.tolist()):
    feats, ids, n, m = _decode_example(rows_TD, 3, 2, True)
    expected, dist_by_id = _reference_answer(feats, ids, n, m, True)
    assert label == expected or abs(dist_by_id[label] -
                                    dist_by_id[expected]) <= TIE_TOL


def test_spec():
  spec = nf.NthFarthestSpec()
  assert (spec.num_objects, spec.num_features, spec.sonnet_compat) == (8, 16,
                                                                       False)
  assert spec.input_size == 16 + 24
  assert nf.NthFarthestSpec(num_objects=4, num_features=3).input_size == 15
  with pytest.raises(ValueError, match="num_objects"):
    nf.NthFarthestSpec(num_objects=1)


BAD_SIZES = [
    (0, 8, 16, "batch_size"),
    (-3, 8, 16, "batch_size"),
    (2.5, 8, 16, "batch_size"),
    (4, 1, 16, "num_objects"),
    (4, 0, 16, "num_objects"),
    (4, True, 16, "num_objects"),
    (4, 8, 0, "num_features"),
    (4, 8, -1, "num_features"),
]


@pytest.mark.parametrize("batch_size,num_objects,num_features,name", BAD_SIZES)
def test_bad_arguments_raise(batch_size, num_objects, num_features, name):
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match=name):
    nf.generate_batch(rng, batch_size, num_objects, num_features)
  with pytest.raises(ValueError, match=name):
    nf.NthFarthestIterator(batch_size, num_objects, num_features)
  with pytest.raises(ValueError, match=name):
    nf.held_out_batches(1, batch_size, num_objects, num_features)


def test_other_bad_arguments_raise():
  with pytest.raises(ValueError, match="num_batches"):
    nf.held_out_batches(0, 4, 8, 16)
  with pytest.raises(ValueError, match="seed"):
    nf.NthFarthestIterator(4, 8, 16, seed=-1)
  with pytest.raises(ValueError, match="seed"):
    nf.held_out_batches(1, 4, 8, 16, seed=2**32)
  it = nf.NthFarthestIterator(4, 8, 16)
  with pytest.raises(ValueError, match="index"):
    it.set_state({"seed": 0})
  with pytest.raises(ValueError, match="index"):
    it.set_state({"seed": 0, "index": -1})
  with pytest.raises(TypeError, match="rng"):
    nf.generate_batch(np.random.RandomState(0), 4, 8, 16)


def _check_padded_batch(inputs_BTD, labels_B, k, width, f, sonnet_compat):
  """Decodes one-hot blocks of `width` columns whose tail is zero, checks labels."""
  for rows_TD, label in zip(inputs_BTD.tolist(), labels_B.tolist()):
    unpadded = []
    for row in rows_TD:
      blocks = [row[f + j * width:f + (j + 1) * width] for j in range(3)]
      assert all(v == 0.0 for b in blocks for v in b[k:])  # padding
      unpadded.append(row[:f] + [v for b in blocks for v in b[:k]])
    feats, ids, n, m = _decode_example(unpadded, k, f, sonnet_compat)
    expected, _ = _reference_answer(feats, ids, n, m, sonnet_compat)
    assert label == expected


@pytest.mark.parametrize("sonnet_compat", MODES, ids=MODE_IDS)
def test_onehot_size_pads_and_keeps_labels(sonnet_compat):
  inputs_BTD, labels_B = nf.generate_batch(np.random.default_rng(5), 300, 3, 2,
                                           sonnet_compat, onehot_size=5)
  assert inputs_BTD.shape == (300, 3, 2 + 3 * 5)
  _check_padded_batch(inputs_BTD, labels_B, 3, 5, 2, sonnet_compat)
  with pytest.raises(ValueError, match="onehot_size"):
    nf.generate_batch(np.random.default_rng(0), 2, 4, 2, onehot_size=3)


def test_object_curriculum_schedule_and_labels():
  it = nf.NthFarthestIterator(64, 5, 2, seed=3, min_objects=3, objects_step=4)
  sizes = [it.num_objects_at(k) for k in range(14)]
  assert sizes == [3] * 4 + [4] * 4 + [5] * 6
  for k in (0, 5, 12):
    inputs_BTD, labels_B = it.batch_at(k)
    assert inputs_BTD.shape == (64, sizes[k], 2 + 3 * 5)
    _check_padded_batch(inputs_BTD, labels_B, sizes[k], 5, 2, False)
  with pytest.raises(ValueError, match="min_objects"):
    nf.NthFarthestIterator(4, 3, 2, min_objects=4, objects_step=1)

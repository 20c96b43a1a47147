"""Data generation for the "Nth farthest" task (Santoro et al., 2018).

Each example is a set of ``K = num_objects`` vectors of ``F = num_features``
dimensions, drawn i.i.d. from U(-1, 1), presented one per time step. Every
vector carries an id (its label) in ``[0, K)``; the ids of an example are a
uniformly random permutation, independent of presentation order. Each example
also carries a question ``(n, m)`` with ``n, m`` uniform in ``[0, K)``, where
``m`` is the id of a reference vector. The target is the id of the vector
selected by ``n`` when the vectors are ranked by Euclidean distance from the
reference. The question is repeated on every time step.

Two semantics are supported:

* Paper mode (``sonnet_compat=False``, default): "what is the n-th farthest
 vector from vector m?", with ``n`` 0-indexed in *descending* order of
 distance. ``n = 0`` is the farthest vector from ``m``; ``n = K - 1`` is ``m``
 itself (distance 0), so that question is trivial. Row layout (paper order,
 ``n`` before ``m``)::

   [ x_t (F) | one_hot(id_t) (K) | one_hot(n) (K) | one_hot(m) (K) ]

* Sonnet mode (``sonnet_compat=True``): reproduces the Sonnet v1 example
 generator. It ranks distances in *ascending* order (``argsort`` of the
 distance matrix), so ``nth`` selects the n-th *nearest* vector, 0-indexed:
 ``nth = 0`` is the reference itself. Row layout (reference ``m`` before
 ``nth``)::

   [ x_t (F) | one_hot(id_t) (K) | one_hot(m) (K) | one_hot(nth) (K) ]

 Sonnet builds the rows in id order (id = row index) and then shuffles the
 rows. Because the feature vectors are i.i.d., this is the same distribution
 as drawing the vectors directly in presentation order and giving them a
 uniformly random permutation of ids, which is what is done here for both
 modes; the two modes differ only in the ranking direction and in the order
 of the two question blocks.

In both modes the features are drawn as float32 values in ``[-1, 1)`` and the
distances are computed (in float64) from exactly those float32 values, so the
label is consistent with what the model sees. Ties in distance have
probability zero; ranking uses a stable sort, so it is deterministic anyway
(tied vectors are ordered by presentation position).

Shape suffixes: B = batch, T = time step (one per object, T = K),
K = num_objects, F = num_features, D = input width ``F + 3 * K``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax

from rmc_jax.checks import batch_rng, check_int, check_seed, SeededBatches
from rmc_jax.cores import make_core

__all__ = [
    "NthFarthestSpec",
    "generate_batch",
    "NthFarthestIterator",
    "held_out_batches",
    "forward",
    "loss_and_metrics",
]

# Stream tags that keep training and held-out randomness disjoint (see
# `_batch_rng`).
_TRAIN_STREAM = 0
_HELD_OUT_STREAM = 1


def _check_sizes(batch_size: Any, num_objects: Any,
                 num_features: Any) -> tuple[int, int, int]:
  """Validates the three size arguments and returns them as ints."""
  return (
      check_int("batch_size", batch_size, 1),
      check_int("num_objects", num_objects, 2),
      check_int("num_features", num_features, 1),
  )


@dataclasses.dataclass(frozen=True)
class NthFarthestSpec:
  """Static description of an Nth-farthest task configuration.

  Attributes:
   num_objects: K, number of vectors per example (also the number of
    classes and the sequence length).
   num_features: F, dimensionality of each vector.
   sonnet_compat: use the Sonnet v1 semantics (n-th nearest, ascending,
    reference block before n block) instead of the paper's.
  """

  num_objects: int = 8
  num_features: int = 16
  sonnet_compat: bool = False

  def __post_init__(self) -> None:
    check_int("num_objects", self.num_objects, 2)
    check_int("num_features", self.num_features, 1)

  @property
  def input_size(self) -> int:
    """D = F + 3 * K, the width of one input row."""
    return self.num_features + 3 * self.num_objects

  @property
  def num_classes(self) -> int:
    """Number of possible labels (= num_objects)."""
    return self.num_objects

  @property
  def seq_len(self) -> int:
    """Number of time steps per example (= num_objects)."""
    return self.num_objects


def generate_batch(
    rng: np.random.Generator,
    batch_size: int,
    num_objects: int,
    num_features: int,
    sonnet_compat: bool = False,
    onehot_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Draws one batch of Nth-farthest examples (fully vectorised).

  Args:
   rng: source of randomness; the output is a pure function of its state.
   batch_size: B > 0.
   num_objects: K >= 2.
   num_features: F > 0.
   sonnet_compat: if True use the Sonnet v1 semantics (see module
    docstring), otherwise the paper's.
   onehot_size: width C >= K of the three one-hot blocks (default K);
    wider blocks are zero-padded, so that batches with fewer objects fit
    a model built for C objects (the curriculum over objects).

  Returns:
   inputs_BTD: float32 [B, K, F + 3C], one row per object (see module
    docstring for the row layout of each mode).
   labels_B: int32 [B], the id of the selected vector.

  Raises:
   ValueError: for non-positive sizes or num_objects < 2.
   TypeError: if `rng` is not a `np.random.Generator`.
  """
  B, K, F = _check_sizes(batch_size, num_objects, num_features)
  if not isinstance(rng, np.random.Generator):
    raise TypeError(
        f"rng must be a numpy.random.Generator, got {type(rng).__name__}")

  # Features in [-1, 1): u is a multiple of 2**-24 in [0, 1), so 2u - 1 is
  # exact in float32 and never reaches 1.
  x_BTF = rng.random((B, K, F), dtype=np.float32)
  x_BTF *= 2
  x_BTF -= 1
  # ids_BT[b, t] = id of the object shown at step t (a permutation per row).
  ids_BT = rng.permuted(np.broadcast_to(np.arange(K), (B, K)), axis=1)
  n_B = rng.integers(0, K, size=B)  # rank asked for ("nth" in Sonnet)
  m_B = rng.integers(0, K, size=B)  # id of the reference vector

  # Only distances from the reference are needed: row m of the pairwise
  # matrix. Squared distances give the same ranking as Euclidean ones.
  ref_pos_B = np.argmax(ids_BT == m_B[:, None], axis=1)
  ref_B1F = np.take_along_axis(x_BTF, ref_pos_B[:, None, None], axis=1)
  diff_BTF = np.subtract(x_BTF, ref_B1F, dtype=np.float64)  # exact in float64
  sq_dist_BT = np.einsum("btf,btf->bt", diff_BTF, diff_BTF)

  if sonnet_compat:
    order_BT = np.argsort(sq_dist_BT, axis=1, kind="stable")  # nearest first
  else:
    order_BT = np.argsort(-sq_dist_BT, axis=1, kind="stable")  # farthest first
  answer_pos_B = np.take_along_axis(order_BT, n_B[:, None], axis=1)[:, 0]
  labels_B = np.take_along_axis(ids_BT, answer_pos_B[:, None], axis=1)[:, 0]

  C = K if onehot_size is None else check_int("onehot_size", onehot_size, K)
  eye_KC = np.eye(K, C, dtype=np.float32)
  inputs_BTD = np.empty((B, K, F + 3 * C), dtype=np.float32)
  inputs_BTD[:, :, :F] = x_BTF
  inputs_BTD[:, :, F:F + C] = eye_KC[ids_BT]
  first_q_B, second_q_B = (m_B, n_B) if sonnet_compat else (n_B, m_B)
  inputs_BTD[:, :, F + C:F + 2 * C] = eye_KC[first_q_B][:, None, :]
  inputs_BTD[:, :, F + 2 * C:] = eye_KC[second_q_B][:, None, :]
  return inputs_BTD, labels_B.astype(np.int32)


class NthFarthestIterator(SeededBatches):
  """Infinite, seeded iterator of training batches with a saveable position.

  Batch k is a pure function of (seed, k) and the configuration: it is drawn
  by `generate_batch` from its own generator, derived from (seed, k). Saving
  `get_state()` and later calling `set_state()` on an iterator with the same
  configuration therefore reproduces exactly the same future batches.
  """

  def __init__(
      self,
      batch_size: int,
      num_objects: int,
      num_features: int,
      sonnet_compat: bool = False,
      seed: int = 0,
      min_objects: int | None = None,
      objects_step: int = 0,
  ) -> None:
    """See class docstring; raises ValueError for bad sizes or seeds.

    With `min_objects` < num_objects and `objects_step` > 0, batch k has
    min(num_objects, min_objects + k // objects_step) objects (a
    curriculum over the number of objects); the one-hot blocks always
    have num_objects columns, so every batch fits the same model.
    """
    self.batch_size, num_objects, num_features = _check_sizes(
        batch_size, num_objects, num_features)
    self.spec = NthFarthestSpec(num_objects, num_features, bool(sonnet_compat))
    super().__init__(seed)
    self.min_objects = num_objects if min_objects is None else check_int(
        "min_objects", min_objects, 2)
    if self.min_objects > num_objects:
      raise ValueError(f"min_objects must be <= num_objects ({num_objects}), "
                       f"got {self.min_objects}")
    self.objects_step = check_int("objects_step", objects_step, 0)

  def num_objects_at(self, index: int) -> int:
    """Number of objects in batch `index` (see the curriculum above)."""
    if not self.objects_step:
      return self.spec.num_objects
    return min(self.spec.num_objects,
               self.min_objects + index // self.objects_step)

  def batch_at(self, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns batch `index` without moving the iterator."""
    index = check_int("index", index, 0)
    return generate_batch(
        batch_rng(_TRAIN_STREAM, self._seed, index),
        self.batch_size,
        self.num_objects_at(index),
        self.spec.num_features,
        self.spec.sonnet_compat,
        onehot_size=self.spec.num_objects,
    )

  def get_state(self) -> dict[str, int]:
    """JSON-serialisable position: {'seed': int, 'index': int}."""
    return {"seed": self._seed, "index": self._index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores a position saved by `get_state` (seed and next index)."""
    if not isinstance(state, Mapping) or not {"seed", "index"} <= state.keys():
      raise ValueError(
          f"state must be a mapping with keys 'seed' and 'index', got {state!r}"
      )
    seed = check_seed(state["seed"])
    index = check_int("index", state["index"], 0)
    self._seed, self._index = seed, index


def held_out_batches(
    num_batches: int,
    batch_size: int,
    num_objects: int,
    num_features: int,
    sonnet_compat: bool = False,
    seed: int = 0,
) -> list[tuple[np.ndarray, np.ndarray]]:
  """A fixed evaluation set, disjoint in randomness from training batches.

  Batch k is drawn from a generator derived from (held-out stream tag, seed,
  k); training batches use a different stream tag, so for any pair of seeds
  no held-out batch shares its random stream with a training batch.

  Returns:
   A list of `num_batches` tuples (inputs_BTD float32 [B, K, F+3K],
   labels_B int32 [B]).
  """
  num_batches = check_int("num_batches", num_batches, 1)
  batch_size, num_objects, num_features = _check_sizes(batch_size, num_objects,
                                                       num_features)
  seed = check_seed(seed)
  return [
      generate_batch(
          batch_rng(_HELD_OUT_STREAM, seed, k),
          batch_size,
          num_objects,
          num_features,
          sonnet_compat,
      ) for k in range(num_batches)
  ]


# -- Model and loss --------------------------------------------------------------


def forward(inputs_BTD: jax.Array, core_name: str,
            core_kwargs: Mapping[str, Any], mlp_sizes: tuple[int, ...],
            num_classes: int) -> jax.Array:
  """Core over the objects, its last output, an MLP head: logits [B, K].

  Must run inside `hk.transform`. The head is the paper's: MLP with ReLU
  after every layer (Sonnet's `activate_final=True`), then a Linear to the
  logits.
  """
  core = make_core(core_name, **core_kwargs)
  inputs_TBD = jnp.swapaxes(inputs_BTD, 0, 1)
  outputs_TBO, _ = core.unroll(inputs_TBD,
                               core.initial_state(inputs_BTD.shape[0]))
  head = hk.nets.MLP(list(mlp_sizes), activate_final=True, name="head_mlp")
  return hk.Linear(num_classes, name="logits")(head(outputs_TBO[-1]))


def loss_and_metrics(logits_BK: jax.Array, labels_B: jax.Array
                     ) -> tuple[jax.Array, dict]:
  """Mean softmax cross-entropy and accuracy of a batch."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BK,
                                                         labels_B).mean()
  accuracy = (jnp.argmax(logits_BK, -1) == labels_B).mean()
  return loss, {"accuracy": accuracy}

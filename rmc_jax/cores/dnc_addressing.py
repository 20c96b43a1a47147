"""Memory access of the Differentiable Neural Computer, as pure functions.

Written from the equations in the Methods section of Graves et al. (2016),
"Hybrid computing using a neural network with dynamic external memory",
Nature 538. One access step, in this order:

  u_t   = (u_{t-1} + w^w_{t-1} - u_{t-1} o w^w_{t-1}) o psi_t    usage
  psi_t = prod_i (1 - f^i_t w^{r,i}_{t-1})                       retention
  a_t   = allocation(u_t)                                        free slots
  c^w_t = C(M_{t-1}, k^w_t, beta^w_t)                            content
  w^w_t = g^w_t (g^a_t a_t + (1 - g^a_t) c^w_t)                  write weights
  M_t   = M_{t-1} o (1 - w^w_t e_t^T) + w^w_t v_t^T              write
  L_t   = (1 - w^w_t[i] - w^w_t[j]) L_{t-1} + w^w_t[i] p_{t-1}[j],
          L_t[i, i] = 0                                          links
  p_t   = (1 - sum_i w^w_t[i]) p_{t-1} + w^w_t                   precedence
  w^r_t = pi_b (L_t^T w^r_{t-1}) + pi_c C(M_t, k^r_t, beta^r_t)
          + pi_f (L_t w^r_{t-1})                                 read weights
  r_t   = M_t^T w^r_t                                            read vectors

with C(M, k, beta)[i] = softmax_i(beta * cos(k, M[i])) and, for slots phi
sorted by ascending usage, a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i].

Two points where DeepMind's released DNC code and the paper differ are
options, with the code's choice as the default:

* Key strengths beta = softplus(raw) (`strength_activation='softplus'`,
  the code; beta >= 0) or oneplus(raw) = 1 + softplus(raw) ('oneplus', the
  paper; beta >= 1).
* The usage update treats the previous write weights w^w_{t-1} as a
  constant for autodiff (`stop_usage_write_gradient=True`, the code) or
  differentiates through them (False, the paper's equations taken as they
  stand). The forward values are the same.

Several write heads (the paper has one) are supported as follows: the usage
update treats the heads' combined write weights 1 - prod_h (1 - w^w_h);
head h allocates from the usage left after the heads before it have
(tentatively) allocated, u <- u + (1 - u) g^w_h g^a_h a_h, so that heads that
all allocate pick different slots; the memory is erased by
prod_h (1 - w^w_h e_h^T) and gets sum_h w^w_h v_h^T; each head keeps its own
link matrix and precedence weights, and every read head has one backward and
one forward mode per write head.

Shape letters in names: B batch (any number of leading axes, including
none: every function here also works on unbatched arrays), M memory slots,
W word size, R read heads, H write heads, K = 2H + 1 read modes,
I = interface size.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EPS = 1e-6  # Guards the norms of the cosine similarity and the usage sort.


class TemporalLinkageState(NamedTuple):
  """Temporal links between memory slots, one set per write head.

  Attributes:
    link: [B, H, M, M]; link[h, i, j] ~ slot i was written (by head h) right
      after slot j. Zero diagonal; rows and columns sum to at most 1.
    precedence_weights: [B, H, M]; how much each slot was the last written
      (by head h). Sums to at most 1.
  """

  link: jax.Array
  precedence_weights: jax.Array


class AccessState(NamedTuple):
  """The external memory and its addressing state.

  Attributes:
    memory: [B, M, W] the memory matrix.
    read_weights: [B, R, M] the last read weights (each sums to at most 1).
    write_weights: [B, H, M] the last write weights (each sums to at most 1).
    linkage: the `TemporalLinkageState`.
    usage: [B, M] slot usage in [0, 1].
  """

  memory: jax.Array
  read_weights: jax.Array
  write_weights: jax.Array
  linkage: TemporalLinkageState
  usage: jax.Array


STRENGTH_ACTIVATIONS = ("softplus", "oneplus")


class Interface(NamedTuple):
  """The interface vector split into its parts, after their activations.

  Attributes:
    read_keys: [B, R, W].
    read_strengths: [B, R], softplus (>= 0) or oneplus (>= 1).
    write_keys: [B, H, W].
    write_strengths: [B, H], like read_strengths.
    erase_vectors: [B, H, W], sigmoid.
    write_vectors: [B, H, W].
    free_gates: [B, R], sigmoid.
    allocation_gates: [B, H], sigmoid.
    write_gates: [B, H], sigmoid.
    read_modes: [B, R, K], softmax over [backward_0..backward_{H-1}, content,
      forward_0..forward_{H-1}].
  """

  read_keys: jax.Array
  read_strengths: jax.Array
  write_keys: jax.Array
  write_strengths: jax.Array
  erase_vectors: jax.Array
  write_vectors: jax.Array
  free_gates: jax.Array
  allocation_gates: jax.Array
  write_gates: jax.Array
  read_modes: jax.Array


def _interface_sizes(num_reads: int, num_writes: int,
                     word_size: int) -> tuple[tuple[str, int], ...]:
  """(field, flat size) in the order the fields sit in the interface vector."""
  r, h, w = num_reads, num_writes, word_size
  return (("read_keys", r * w), ("read_strengths", r), ("write_keys", h * w),
          ("write_strengths", h), ("erase_vectors", h * w),
          ("write_vectors", h * w), ("free_gates", r),
          ("allocation_gates", h), ("write_gates", h),
          ("read_modes", r * (2 * h + 1)))


def interface_size(num_reads: int, num_writes: int, word_size: int) -> int:
  """I; with one write head, the paper's W*R + 3W + 5R + 3."""
  return sum(s for _, s in _interface_sizes(num_reads, num_writes, word_size))


def oneplus(x: jax.Array) -> jax.Array:
  """1 + log(1 + e^x), in [1, inf): the key strengths."""
  return 1.0 + jax.nn.softplus(x)


def parse_interface(interface_BI: jax.Array, num_reads: int, num_writes: int,
                    word_size: int,
                    strength_activation: str = "softplus") -> Interface:
  """Splits the raw interface vector [B, I] and applies each part's activation.

  The fields are contiguous, in `Interface` order (read keys first, read modes
  last); multi-head fields are head-major (e.g. read key r is columns
  [r*W, (r+1)*W)). The key strengths go through `strength_activation`,
  'softplus' (DeepMind's code) or 'oneplus' (the paper).
  """
  if strength_activation not in STRENGTH_ACTIVATIONS:
    raise ValueError("parse_interface: strength_activation must be one of "
                     f"{STRENGTH_ACTIVATIONS}, got {strength_activation!r}.")
  strength = oneplus if strength_activation == "oneplus" else jax.nn.softplus
  sizes = _interface_sizes(num_reads, num_writes, word_size)
  expected = sum(s for _, s in sizes)
  if interface_BI.shape[-1] != expected:
    raise ValueError(f"parse_interface: expected a last axis of {expected}, "
                     f"got shape {interface_BI.shape}.")
  lead = interface_BI.shape[:-1]
  r, h, w = num_reads, num_writes, word_size
  splits = np.cumsum([s for _, s in sizes])[:-1].tolist()
  raw = dict(zip((n for n, _ in sizes),
                 jnp.split(interface_BI, splits, axis=-1)))
  return Interface(
      read_keys=raw["read_keys"].reshape(*lead, r, w),
      read_strengths=strength(raw["read_strengths"]),
      write_keys=raw["write_keys"].reshape(*lead, h, w),
      write_strengths=strength(raw["write_strengths"]),
      erase_vectors=jax.nn.sigmoid(raw["erase_vectors"]).reshape(*lead, h, w),
      write_vectors=raw["write_vectors"].reshape(*lead, h, w),
      free_gates=jax.nn.sigmoid(raw["free_gates"]),
      allocation_gates=jax.nn.sigmoid(raw["allocation_gates"]),
      write_gates=jax.nn.sigmoid(raw["write_gates"]),
      read_modes=jax.nn.softmax(
          raw["read_modes"].reshape(*lead, r, 2 * h + 1), axis=-1))


def initial_access_state(batch_size: int | None, memory_size: int,
                         word_size: int, num_reads: int,
                         num_writes: int) -> AccessState:
  """All zeros (float32); without the batch axis if batch_size is None."""
  lead = () if batch_size is None else (batch_size,)
  z = lambda *shape: jnp.zeros(lead + shape, jnp.float32)
  m, h = memory_size, num_writes
  return AccessState(
      memory=z(m, word_size), read_weights=z(num_reads, m),
      write_weights=z(h, m),
      linkage=TemporalLinkageState(link=z(h, m, m), precedence_weights=z(h, m)),
      usage=z(m))


# -- Addressing ----------------------------------------------------------------


def content_weights(memory_BMW: jax.Array, keys_BHW: jax.Array,
                    strengths_BH: jax.Array, eps: float = EPS) -> jax.Array:
  """C(M, k, beta): softmax over slots of beta * cosine(k, M[i]).

  Args:
    memory_BMW: [B, M, W] memory.
    keys_BHW: [B, H, W] one key per head (H read or write heads).
    strengths_BH: [B, H] key strengths beta.
    eps: added under the square roots of the norms, |x| = sqrt(x.x + eps),
      so an all-zero slot or key has similarity 0 and finite gradients.

  Returns:
    [B, H, M] weights; each row sums to 1.
  """
  dots_BHM = jnp.einsum("...hw,...mw->...hm", keys_BHW, memory_BMW)
  memory_norms_BM = jnp.sqrt(jnp.sum(memory_BMW**2, axis=-1) + eps)
  key_norms_BH = jnp.sqrt(jnp.sum(keys_BHW**2, axis=-1) + eps)
  similarity_BHM = dots_BHM / (key_norms_BH[..., :, None]
                               * memory_norms_BM[..., None, :])
  return jax.nn.softmax(strengths_BH[..., None] * similarity_BHM, axis=-1)


def update_usage(usage_BM: jax.Array, prev_write_weights_BHM: jax.Array,
                 free_gates_BR: jax.Array, prev_read_weights_BRM: jax.Array,
                 stop_write_gradient: bool = True) -> jax.Array:
  """u_t = (u + w - u o w) o psi, psi = prod_r (1 - f_r w^r_{t-1}).

  Args:
    usage_BM: [B, M] usage u_{t-1}.
    prev_write_weights_BHM: [B, H, M] write weights of the previous step;
      the heads count together as w = 1 - prod_h (1 - w_h).
    free_gates_BR: [B, R] free gates f of this step.
    prev_read_weights_BRM: [B, R, M] read weights of the previous step.
    stop_write_gradient: no gradient flows into prev_write_weights_BHM (as
      in DeepMind's code); False differentiates through it.

  Returns:
    [B, M] usage u_t, in [0, 1] when the inputs are in range.
  """
  if stop_write_gradient:
    prev_write_weights_BHM = jax.lax.stop_gradient(prev_write_weights_BHM)
  written_BM = 1.0 - jnp.prod(1.0 - prev_write_weights_BHM, axis=-2)
  usage_BM = usage_BM + written_BM - usage_BM * written_BM
  retention_BM = jnp.prod(
      1.0 - free_gates_BR[..., :, None] * prev_read_weights_BRM, axis=-2)
  return usage_BM * retention_BM


def allocation_weights(usage_BM: jax.Array, eps: float = EPS) -> jax.Array:
  """a[phi_j] = (1 - u[phi_j]) prod_{i<j} u[phi_i], phi = argsort(u) ascending.

  The usage is first mapped affinely into [eps, 1] (u <- eps + (1 - eps) u)
  so that the products stay away from exact zeros and every slot keeps a
  gradient. The sort is stable (ties go to the lower slot index) and is
  treated as constant by autodiff; the weights flow back through the gathers.

  Args:
    usage_BM: [B, M] usage in [0, 1].
    eps: the lower bound of the mapped usage.

  Returns:
    [B, M] weights in [0, 1] summing to 1 - prod(u) <= 1, largest on the
    least-used slot.
  """
  usage_BM = eps + (1.0 - eps) * usage_BM
  order_BM = jnp.argsort(usage_BM, axis=-1, stable=True)  # phi
  sorted_usage_BM = jnp.take_along_axis(usage_BM, order_BM, axis=-1)
  # Exclusive cumulative product: prod_{i<j} u[phi_i] (1 for j = 0).
  shifted_BM = jnp.concatenate(
      [jnp.ones_like(sorted_usage_BM[..., :1]), sorted_usage_BM[..., :-1]],
      axis=-1)
  sorted_allocation_BM = (1.0 - sorted_usage_BM) * jnp.cumprod(shifted_BM,
                                                               axis=-1)
  inverse_order_BM = jnp.argsort(order_BM, axis=-1)  # phi^{-1}
  return jnp.take_along_axis(sorted_allocation_BM, inverse_order_BM, axis=-1)


def write_allocation_weights(usage_BM: jax.Array,
                             allocating_gates_BH: jax.Array) -> jax.Array:
  """Allocation weights of H write heads that allocate one after the other.

  Head h allocates from the usage after heads 0..h-1 have taken their share:
  u <- u + (1 - u) g_h a_h, with g_h = write gate * allocation gate. With one
  head this is `allocation_weights(usage)`.

  Args:
    usage_BM: [B, M] usage u_t.
    allocating_gates_BH: [B, H] how much each head writes by allocation.

  Returns:
    [B, H, M] allocation weights.
  """
  allocations = []
  for h in range(allocating_gates_BH.shape[-1]):  # H is small; not over slots.
    allocation_BM = allocation_weights(usage_BM)
    allocations.append(allocation_BM)
    usage_BM = usage_BM + ((1.0 - usage_BM) * allocating_gates_BH[..., h, None]
                           * allocation_BM)
  return jnp.stack(allocations, axis=-2)


def write_weights(memory_BMW: jax.Array, usage_BM: jax.Array,
                  write_keys_BHW: jax.Array, write_strengths_BH: jax.Array,
                  allocation_gates_BH: jax.Array,
                  write_gates_BH: jax.Array) -> jax.Array:
  """w^w = g^w (g^a a + (1 - g^a) c^w), per write head.

  Args:
    memory_BMW: [B, M, W] memory M_{t-1} (before this step's write).
    usage_BM: [B, M] usage u_t (after `update_usage`).
    write_keys_BHW: [B, H, W] write keys.
    write_strengths_BH: [B, H] write strengths.
    allocation_gates_BH: [B, H] allocation gates g^a.
    write_gates_BH: [B, H] write gates g^w.

  Returns:
    [B, H, M] write weights, each summing to at most 1.
  """
  content_BHM = content_weights(memory_BMW, write_keys_BHW, write_strengths_BH)
  allocation_BHM = write_allocation_weights(
      usage_BM, allocation_gates_BH * write_gates_BH)
  ga_BH1 = allocation_gates_BH[..., None]
  return write_gates_BH[..., None] * (ga_BH1 * allocation_BHM
                                      + (1.0 - ga_BH1) * content_BHM)


def write_memory(memory_BMW: jax.Array, write_weights_BHM: jax.Array,
                 erase_vectors_BHW: jax.Array,
                 write_vectors_BHW: jax.Array) -> jax.Array:
  """M o prod_h (1 - w_h e_h^T) + sum_h w_h v_h^T.

  Args:
    memory_BMW: [B, M, W] memory M_{t-1}.
    write_weights_BHM: [B, H, M] write weights w^w_t.
    erase_vectors_BHW: [B, H, W] erase vectors e_t in [0, 1].
    write_vectors_BHW: [B, H, W] write vectors v_t.

  Returns:
    [B, M, W] memory M_t.
  """
  keep_BMW = jnp.prod(1.0 - write_weights_BHM[..., :, :, None]
                      * erase_vectors_BHW[..., :, None, :], axis=-3)
  add_BMW = jnp.einsum("...hm,...hw->...mw", write_weights_BHM,
                       write_vectors_BHW)
  return memory_BMW * keep_BMW + add_BMW


def update_linkage(linkage: TemporalLinkageState,
                   write_weights_BHM: jax.Array) -> TemporalLinkageState:
  """L = (1 - w_i - w_j) L + w_i p_j (zero diagonal); p = (1 - sum w) p + w.

  The link uses the precedence of the previous step, then the precedence is
  updated. Each write head has its own link matrix and precedence.

  Args:
    linkage: the previous `TemporalLinkageState` ([B, H, M, M], [B, H, M]).
    write_weights_BHM: [B, H, M] this step's write weights.

  Returns:
    The new `TemporalLinkageState`.
  """
  w_i = write_weights_BHM[..., :, :, None]
  w_j = write_weights_BHM[..., :, None, :]
  prev_precedence_j = linkage.precedence_weights[..., :, None, :]
  link_BHMM = (1.0 - w_i - w_j) * linkage.link + w_i * prev_precedence_j
  m = write_weights_BHM.shape[-1]
  link_BHMM = link_BHMM * (1.0 - jnp.eye(m, dtype=link_BHMM.dtype))
  precedence_BHM = ((1.0 - jnp.sum(write_weights_BHM, axis=-1, keepdims=True))
                    * linkage.precedence_weights + write_weights_BHM)
  return TemporalLinkageState(link=link_BHMM, precedence_weights=precedence_BHM)


def directional_weights(link_BHMM: jax.Array, prev_read_weights_BRM: jax.Array
                        ) -> tuple[jax.Array, jax.Array]:
  """Forward f = L w^r_{t-1} and backward b = L^T w^r_{t-1}, per write head.

  Returns:
    (forward [B, R, H, M], backward [B, R, H, M]).
  """
  forward_BRHM = jnp.einsum("...hij,...rj->...rhi", link_BHMM,
                            prev_read_weights_BRM)
  backward_BRHM = jnp.einsum("...hji,...rj->...rhi", link_BHMM,
                             prev_read_weights_BRM)
  return forward_BRHM, backward_BRHM


def read_weights(memory_BMW: jax.Array, link_BHMM: jax.Array,
                 prev_read_weights_BRM: jax.Array, read_keys_BRW: jax.Array,
                 read_strengths_BR: jax.Array,
                 read_modes_BRK: jax.Array) -> jax.Array:
  """w^r = sum_h pi_b[h] b_h + pi_c C(M, k^r, beta^r) + sum_h pi_f[h] f_h.

  Args:
    memory_BMW: [B, M, W] memory M_t (after this step's write).
    link_BHMM: [B, H, M, M] link matrices L_t.
    prev_read_weights_BRM: [B, R, M] read weights of the previous step.
    read_keys_BRW: [B, R, W] read keys.
    read_strengths_BR: [B, R] read strengths.
    read_modes_BRK: [B, R, 2H+1] read modes, ordered [backward_0..H-1,
      content, forward_0..H-1], summing to 1.

  Returns:
    [B, R, M] read weights w^r_t.
  """
  h = link_BHMM.shape[-3]
  content_BRM = content_weights(memory_BMW, read_keys_BRW, read_strengths_BR)
  forward_BRHM, backward_BRHM = directional_weights(link_BHMM,
                                                    prev_read_weights_BRM)
  backward_mode_BRH = read_modes_BRK[..., :h]
  content_mode_BR = read_modes_BRK[..., h]
  forward_mode_BRH = read_modes_BRK[..., h + 1:]
  return (jnp.einsum("...rh,...rhm->...rm", backward_mode_BRH, backward_BRHM)
          + content_mode_BR[..., None] * content_BRM
          + jnp.einsum("...rh,...rhm->...rm", forward_mode_BRH, forward_BRHM))


def access_step(state: AccessState, interface: Interface,
                stop_usage_write_gradient: bool = True
                ) -> tuple[jax.Array, AccessState]:
  """One memory access: usage, write weights, write, links, reads.

  Args:
    state: the previous `AccessState`.
    interface: this step's parsed `Interface`.
    stop_usage_write_gradient: the usage update passes no gradient to the
      previous write weights (`update_usage`'s stop_write_gradient).

  Returns:
    (read vectors r_t = M_t^T w^r_t [B, R, W], the new `AccessState`).
  """
  usage_BM = update_usage(state.usage, state.write_weights,
                          interface.free_gates, state.read_weights,
                          stop_usage_write_gradient)
  write_weights_BHM = write_weights(
      state.memory, usage_BM, interface.write_keys, interface.write_strengths,
      interface.allocation_gates, interface.write_gates)
  memory_BMW = write_memory(state.memory, write_weights_BHM,
                            interface.erase_vectors, interface.write_vectors)
  linkage = update_linkage(state.linkage, write_weights_BHM)
  read_weights_BRM = read_weights(
      memory_BMW, linkage.link, state.read_weights, interface.read_keys,
      interface.read_strengths, interface.read_modes)
  read_vectors_BRW = jnp.einsum("...rm,...mw->...rw", read_weights_BRM,
                                memory_BMW)
  return read_vectors_BRW, AccessState(
      memory=memory_BMW, read_weights=read_weights_BRM,
      write_weights=write_weights_BHM, linkage=linkage, usage=usage_BM)

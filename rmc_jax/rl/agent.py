"""Recurrent actor-critic network for grid-world RL (BoxWorld, Mini-Pacman).

The agent of the RMC paper's BoxWorld experiments (Santoro et al., 2018),
after the IMPALA agents of Zambaldi et al. (2018):

  obs      [B, H, W, C] -> append x and y coordinate planes  [B, H, W, C+2]
  torso    conv 2x2/1 (12) -> ReLU -> conv 2x2/1 (24) -> ReLU [B, H, W, 24]
  core     flatten -> any core from `make_core` (rmc, lstm, dnc)   [B, D]
           (RMC option: each of the H*W cells as one input row;
           'convlstm': the [B, H, W, 24] maps unflattened, the paper's
           BoxWorld baseline)
  heads    flatten -> MLP (256, ReLU) -> policy logits Linear(A)  [B, A]
                                      -> value Linear(1)          [B]

The coordinate planes hold the column (x) and row (y) position of each cell,
evenly spaced in [-1, 1]. They are appended to the observation before the
convolutions by default (`coords_position='input'`); Zambaldi et al. tag the
convolution output instead, which `coords_position='torso_output'` gives.

Acme-style contract (see `ActorCriticNetwork`): `initial_state(batch_size)`,
`__call__(obs_B, state) -> ((logits_BA, value_B), state)` to act and
`unroll(obs_TB, state, first_TB) -> ((logits_TBA, values_TB), state)` to
learn, where `first_TB` resets the recurrent state to the initial state
before every step that starts an episode (like `hk.ResetCore`).
`make_actor_critic` wraps these in pure functions of the parameters.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.cores import ConvLSTM, make_core, select_state
from rmc_jax.training import precision as precision_lib

_COORDS_POSITIONS = ("input", "torso_output", None)


def add_coordinate_planes(x_BHWC: jax.Array) -> jax.Array:
  """Appends x and y coordinate planes: [..., H, W, C] -> [..., H, W, C+2].

  Channel C holds the column coordinate linspace(-1, 1, W)[w] (constant down a
  column), channel C+1 the row coordinate linspace(-1, 1, H)[h] (constant
  along a row). A size-1 axis gets the coordinate -1.
  """
  h, w = x_BHWC.shape[-3], x_BHWC.shape[-2]
  xs_HW = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, w)[None, :], (h, w))
  ys_HW = jnp.broadcast_to(jnp.linspace(-1.0, 1.0, h)[:, None], (h, w))
  coords_HW2 = jnp.stack([xs_HW, ys_HW], axis=-1).astype(x_BHWC.dtype)
  coords = jnp.broadcast_to(coords_HW2, x_BHWC.shape[:-1] + (2,))
  return jnp.concatenate([x_BHWC, coords], axis=-1)


class ActorCriticNetwork(hk.Module):
  """Conv torso, recurrent core and policy/value heads (Acme network contract).

  Parameters (Haiku paths under this module's name, default 'actor_critic',
  e.g. 'actor_critic/~/torso_conv_0'):
    `torso_conv_{i}/{w,b}`: [k, k, C_in, conv_channels[i]] convolutions.
    the core's own parameters (under its module name, e.g.
      'relational_memory', 'lstm_stack' or 'dnc').
    `head_linear_{i}/{w,b}`: the head MLP (ReLU after every layer).
    `policy/{w,b}`: [D, num_actions] logits; `value/{w,b}`: [D, 1].
  """

  def __init__(
      self,
      num_actions: int,
      core_name: str = "rmc",
      core_kwargs: dict[str, Any] | None = None,
      conv_channels: Sequence[int] = (12, 24),
      conv_kernel: int = 2,
      conv_padding: str = "SAME",
      head_hidden: Sequence[int] = (256,),
      coords_position: str | None = "input",
      rmc_input_as_matrix: bool = False,
      name: str | None = "actor_critic",
  ):
    """Constructs the network.

    Args:
      num_actions: A, the number of discrete actions.
      core_name: 'rmc', 'lstm', 'dnc' or 'convlstm' (see
        `rmc_jax.cores.make_core`).
      core_kwargs: keyword arguments of the core's constructor ('convlstm'
        needs input_shape, the torso's output grid (H, W): the
        observation's with 'SAME' padding).
      conv_channels: output channels of each convolution (stride 1, ReLU);
        empty for no convolutions.
      conv_kernel: the square kernel size.
      conv_padding: 'SAME' (keeps H x W) or 'VALID'.
      head_hidden: widths of the ReLU MLP between the core and the heads.
      coords_position: where the coordinate planes are appended: 'input'
        (the observation), 'torso_output' (after the convolutions) or None.
      rmc_input_as_matrix: with the 'rmc' core, feed the H*W cells as input
        rows (`treat_input_as_matrix=True`) instead of one flattened vector.

    Raises:
      ValueError: on num_actions < 1, an unknown coords_position or
        rmc_input_as_matrix with a core other than 'rmc' (unknown core names
        and arguments are rejected by `make_core`).
    """
    super().__init__(name=name)
    if not isinstance(num_actions, (int, np.integer)) or num_actions < 1:
      raise ValueError("ActorCriticNetwork: num_actions must be a positive "
                       f"integer, got {num_actions!r}.")
    if coords_position not in _COORDS_POSITIONS:
      raise ValueError("ActorCriticNetwork: coords_position must be one of "
                       f"{_COORDS_POSITIONS}, got {coords_position!r}.")
    if rmc_input_as_matrix and core_name != "rmc":
      raise ValueError("ActorCriticNetwork: rmc_input_as_matrix needs "
                       f"core_name='rmc', got {core_name!r}.")
    self.num_actions = int(num_actions)
    self.core_name = core_name
    self.coords_position = coords_position
    self.rmc_input_as_matrix = bool(rmc_input_as_matrix)
    self._core = make_core(core_name, **dict(core_kwargs or {}))
    self._spatial_core = isinstance(self._core, ConvLSTM)
    self._convs = [
        hk.Conv2D(int(c), conv_kernel, stride=1, padding=conv_padding,
                  name=f"torso_conv_{i}") for i, c in enumerate(conv_channels)
    ]
    self._head = [hk.Linear(int(h), name=f"head_linear_{i}")
                  for i, h in enumerate(head_hidden)]
    self._policy = hk.Linear(self.num_actions, name="policy")
    self._value = hk.Linear(1, name="value")

  @property
  def core(self) -> hk.RNNCore:
    return self._core

  # -- Pieces ----------------------------------------------------------------

  def torso(self, obs_NHWC: jax.Array) -> jax.Array:
    """[N, H, W, C] observations -> core inputs [N, D] (or [N, H*W, F] as
    input rows, or the feature maps [N, H', W', F] for 'convlstm')."""
    x = obs_NHWC.astype(jnp.float32)
    if self.coords_position == "input":
      x = add_coordinate_planes(x)
    for conv in self._convs:
      x = jax.nn.relu(conv(x))
    if self.coords_position == "torso_output":
      x = add_coordinate_planes(x)
    n = x.shape[0]
    if self._spatial_core:
      return x
    if self.rmc_input_as_matrix:
      return x.reshape(n, -1, x.shape[-1])
    return x.reshape(n, -1)

  def heads(self, core_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Core outputs [N, ...] (flattened) -> (policy logits [N, A], values
    [N])."""
    x = core_out.reshape(core_out.shape[0], -1).astype(jnp.float32)
    for layer in self._head:
      x = jax.nn.relu(layer(x))
    return self._policy(x), self._value(x)[:, 0]

  def _core_step(self, x_B: jax.Array, state: Any) -> tuple[jax.Array, Any]:
    if self.rmc_input_as_matrix:
      return self._core(x_B, state, treat_input_as_matrix=True)
    return self._core(x_B, state)

  def _core_unroll(self, x_TB: jax.Array, state: Any,
                   reset_TB: jax.Array | None) -> tuple[jax.Array, Any]:
    if self.rmc_input_as_matrix:
      return self._core.unroll(x_TB, state, treat_input_as_matrix=True,
                               reset_TB=reset_TB)
    return self._core.unroll(x_TB, state, reset_TB=reset_TB)

  # -- Contract --------------------------------------------------------------

  def initial_state(self, batch_size: int) -> Any:
    """The core's initial state for `batch_size` episodes."""
    return self._core.initial_state(batch_size)

  def __call__(self, obs_BHWC: jax.Array, state: Any,
               first_B: jax.Array | None = None
               ) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """One acting step.

    Args:
      obs_BHWC: [B, H, W, C] observations.
      state: the core state (from `initial_state(B)` or the previous step).
      first_B: optional bool [B]: reset those rows to the initial state first
        (a new episode starts at this observation).

    Returns:
      ((logits [B, A], value [B]), next core state).
    """
    if first_B is not None:
      state = select_state(first_B, self.initial_state(obs_BHWC.shape[0]),
                           state)
    out_BD, state = self._core_step(self.torso(obs_BHWC), state)
    return self.heads(out_BD), state

  def unroll(self, obs_TBHWC: jax.Array, state: Any,
             first_TB: jax.Array | None = None
             ) -> tuple[tuple[jax.Array, jax.Array], Any]:
    """Runs the network over a time-major trajectory.

    The torso and heads run on all T*B observations at once and the core's
    own `unroll` (the fast path) runs over time. Where first_TB[t, b] is
    True the core state of row b is reset to the initial state before step
    t, so the outputs from t on are those of a fresh episode starting at t.

    Args:
      obs_TBHWC: [T, B, H, W, C] observations.
      state: the core state before step 0.
      first_TB: optional bool [T, B], True at the first step of an episode.

    Returns:
      ((logits [T, B, A], values [T, B]), core state after step T-1).
    """
    t, b = obs_TBHWC.shape[:2]
    x_N = self.torso(obs_TBHWC.reshape((t * b,) + obs_TBHWC.shape[2:]))
    x_TB = x_N.reshape((t, b) + x_N.shape[1:])
    if first_TB is not None:
      first_TB = jnp.asarray(first_TB, bool)
      if first_TB.shape != (t, b):
        raise ValueError(f"unroll: first_TB must be [T, B] = {(t, b)}, got "
                         f"{first_TB.shape}.")
    out_TBD, state = self._core_unroll(x_TB, state, first_TB)
    logits_N, values_N = self.heads(
        out_TBD.reshape((t * b,) + out_TBD.shape[2:]))
    return (logits_N.reshape(t, b, -1), values_N.reshape(t, b)), state


class ActorCriticFns(NamedTuple):
  """Pure functions of an `ActorCriticNetwork` (no RNG needed to apply).

  Attributes:
    init: init(key) -> params, from a [1, 1, *obs_shape] dummy trajectory.
    initial_state: initial_state(params, batch_size) -> state (batch_size
      must be a Python int; mark it static under jit).
    step: step(params, obs_BHWC, state, first_B=None)
      -> ((logits_BA, value_B), state).
    unroll: unroll(params, obs_TBHWC, state, first_TB=None)
      -> ((logits_TBA, values_TB), state).
  """

  init: Callable[..., hk.Params]
  initial_state: Callable[..., Any]
  step: Callable[..., Any]
  unroll: Callable[..., Any]


def make_actor_critic(obs_shape: Sequence[int], num_actions: int,
                      precision: str = "float32",
                      **network_kwargs: Any) -> ActorCriticFns:
  """Transforms an `ActorCriticNetwork` into pure functions.

  Args:
    obs_shape: [H, W, C] of one observation.
    num_actions: A.
    precision: 'float32' or 'bfloat16' (`rmc_jax.training.precision`).
    **network_kwargs: the other `ActorCriticNetwork` arguments (core_name,
      core_kwargs, conv_channels, head_hidden, ...).
  """
  obs_shape = tuple(int(d) for d in obs_shape)

  def fns():
    net = ActorCriticNetwork(num_actions, **network_kwargs)

    def init():
      obs_TB = jnp.zeros((1, 1) + obs_shape, jnp.float32)
      return net.unroll(obs_TB, net.initial_state(1),
                        jnp.ones((1, 1), bool))

    scoped = lambda fn: precision_lib.scoped(fn, precision)
    return scoped(init), tuple(map(scoped, (net.initial_state, net.__call__,
                                            net.unroll)))

  transformed = hk.without_apply_rng(hk.multi_transform(fns))
  initial_state, step, unroll = transformed.apply
  return ActorCriticFns(init=transformed.init, initial_state=initial_state,
                        step=step, unroll=unroll)

r"""BoxWorld (Zambaldi et al. 2018, "Relational Deep RL") as a pure-JAX env.

Rules, as described by Zambaldi et al. and the RMC paper (v1, A.3):

* A room of `room_size` x `room_size` (12) free cells inside a one-cell
  wall border: a [14, 14] grid. Actions (4): 0 up, 1 down, 2 left, 3 right.
* Loose keys are single coloured cells (one of `num_colours` = 20). Walking
  onto a loose key picks it up. The agent holds at most one key: picking up
  another replaces it (cannot happen in generated levels, which have one
  loose key at a time).
* A box is two horizontally adjacent cells: the lock on the right, its
  content (a key, or the white gem) on the left. The content cannot be
  entered or taken while the box is locked. Walking into a lock while
  holding the key of the lock's colour opens it: the key is used up (the
  agent then holds nothing), the lock disappears (the agent moves onto its
  cell) and the content becomes loose, to be picked up by walking onto it.
  Walking into a lock without the matching key, into a locked content cell
  or into a wall does nothing.
* Level structure: one loose key k0; a solution path of n boxes (n drawn
  uniformly from [min_solution_length, max_solution_length]) where box i has
  lock k_i and contains k_{i+1}, and the last box contains the gem. m
  distractor branches (m uniform in [min_distractors, max_distractors]),
  each a chain of `distractor_length` boxes: the first has the lock colour of
  a random key k_j of the path (j < n) and holds a fresh colour, each later
  box opens with the previous box's key. Opening a distractor spends a key
  the path needs, so the level becomes unsolvable. All colours in a level are
  distinct except the shared lock colour of a branch's first box.
* Rewards and termination: +1 for opening a box of the solution path, -1 for
  opening a distractor box (the episode then terminates, discount 0), +10
  for picking up the gem (terminates, discount 0). The episode is truncated
  (LAST, discount `frame_cap_discount`) after `frame_cap` steps: the paper
  gives no step limit; the default here is 400.
* Generation is on device and always solvable: objects (boxes, then the loose
  key) are placed one after another on uniformly random cells that keep an
  empty ring around every object (no two objects touch, even diagonally), so
  the free cells stay connected and every lock can be reached from a side
  other than its content; if a random placement runs out of room the whole
  level falls back to a shuffled lattice of slots with the same spacing. The
  agent starts on a random empty cell. The level tests check solvability by
  breadth-first search.

Observation: a grid of cell codes rendered by a palette. Codes: 0 floor,
1 wall, 2 agent, 3 gem, 4 + c colour c. The held key's colour is drawn in
the top-left corner cell (0, 0) (a wall cell when no key is held), as in the
paper. `observation_type='onehot'` renders each code as a one-hot vector
(C = 4 + num_colours channels, float32); 'rgb' as an RGB triple (C = 3;
floor grey, wall black, agent dark grey, gem white, keys/locks of 20 hues).
Full view (viewport=None): [14, 14, C]. With `viewport=v` (odd, the paper
uses 5): [v, v, 2C]: channels [0, C) are the v x v window centred on the
agent cut from the full observation padded with walls, channels [C, 2C) are
an extra frame filled with the held key's colour (floor when none), the
paper's "extra frame showing the colour of the key it holds".
"""

from __future__ import annotations

import colorsys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.rl.envs import grid
from rmc_jax.rl.envs import spec as specs

UP, DOWN, LEFT, RIGHT = range(4)
NUM_ACTIONS = 4
ACTION_DELTAS_A2 = np.array([[-1, 0], [1, 0], [0, -1], [0, 1]], np.int32)

# Cell kinds (state.kind_HW).
FLOOR, WALL, ITEM, LOCK, CONTENT = range(5)
GEM = -1  # colour value of the gem (in ITEM or CONTENT cells).
NO_KEY = -1  # state.held when the agent holds nothing.

# Observation codes.
CODE_FLOOR, CODE_WALL, CODE_AGENT, CODE_GEM = range(4)
CODE_COLOUR0 = 4


class BoxWorldState(NamedTuple):
  """Fixed-shape state of one episode on an [H, W] grid (H = W = room + 2).

  Attributes:
    agent_2: int32 [2] (row, col) of the agent, always a FLOOR cell.
    held: int32 [] colour of the held key, NO_KEY (-1) for none.
    kind_HW: int8 [H, W] FLOOR / WALL / ITEM (loose key or gem) / LOCK /
      CONTENT (inside a locked box).
    colour_HW: int8 [H, W] colour of ITEM, LOCK and CONTENT cells (GEM = -1
      for the gem), -1 elsewhere.
    distractor_HW: bool [H, W] True on the locks of distractor boxes.
    frame: int32 [] steps taken.
    solution_length: int32 [] boxes on the solution path.
    num_distractors: int32 [] distractor branches.
  """

  agent_2: jax.Array
  held: jax.Array
  kind_HW: jax.Array
  colour_HW: jax.Array
  distractor_HW: jax.Array
  frame: jax.Array
  solution_length: jax.Array
  num_distractors: jax.Array


def make_palette(num_colours: int) -> np.ndarray:
  """RGB float32 [4 + num_colours, 3] for the observation codes."""
  fixed = [(0.75, 0.75, 0.75), (0.0, 0.0, 0.0), (0.3, 0.3, 0.3),
           (1.0, 1.0, 1.0)]
  hues = [colorsys.hsv_to_rgb(i / num_colours, 1.0 if i % 2 == 0 else 0.55,
                              1.0 if i % 4 < 2 else 0.7)
          for i in range(num_colours)]
  return np.array(fixed + hues, np.float32)


class BoxWorld(grid.GridEnvironment):
  """BoxWorld; see the module docstring for rules, rewards and observations."""

  def __init__(self, viewport: int | None = None, frame_cap: int | None = 400,
               *,
               room_size: int = 12,
               num_colours: int = 20,
               min_solution_length: int = 1,
               max_solution_length: int = 5,
               min_distractors: int = 0,
               max_distractors: int = 5,
               distractor_length: int = 1,
               observation_type: str = "onehot",
               gem_reward: float = 10.0,
               box_reward: float = 1.0,
               distractor_reward: float = -1.0,
               frame_cap_discount: float = 1.0):
    """Configures the level distribution (defaults: the paper's viewport task).

    Args:
      viewport: None (full [H, W, C] view) or an odd window size v.
      frame_cap: steps before truncation; None or 0 for no cap.
      room_size: free interior size; the grid is room_size + 2 square.
      num_colours: key/lock colours.
      min_solution_length, max_solution_length: range of n (boxes to open).
      min_distractors, max_distractors: range of distractor branches.
      distractor_length: boxes per distractor branch.
      observation_type: 'onehot' or 'rgb'.
      gem_reward, box_reward, distractor_reward: event rewards.
      frame_cap_discount: discount of the LAST timestep at the frame cap.

    Raises:
      ValueError: on inconsistent sizes: too few colours for the largest
        level, or a room too small to hold it.
    """
    super().__init__(NUM_ACTIONS, viewport, observation_type,
                     ("onehot", "rgb"), frame_cap, frame_cap_discount)
    if not 1 <= min_solution_length <= max_solution_length:
      raise ValueError("BoxWorld: need 1 <= min_solution_length <= "
                       "max_solution_length.")
    if not 0 <= min_distractors <= max_distractors:
      raise ValueError("BoxWorld: need 0 <= min_distractors <= "
                       "max_distractors.")
    if distractor_length < 1:
      raise ValueError("BoxWorld: distractor_length must be >= 1.")
    needed = max_solution_length + max_distractors * distractor_length
    if needed > num_colours:
      raise ValueError(f"BoxWorld: levels need up to {needed} colours, only "
                       f"{num_colours} available.")
    self.room_size = int(room_size)
    self.size = self.room_size + 2
    self.num_colours = int(num_colours)
    self.min_solution_length = int(min_solution_length)
    self.max_solution_length = int(max_solution_length)
    self.min_distractors = int(min_distractors)
    self.max_distractors = int(max_distractors)
    self.distractor_length = int(distractor_length)
    self.gem_reward = float(gem_reward)
    self.box_reward = float(box_reward)
    self.distractor_reward = float(distractor_reward)
    self.max_boxes = needed

    # Fallback lattice: box origins every 3 columns and 2 rows, so any two
    # objects are at Chebyshev distance >= 2.
    n = self.room_size
    slots = [(r, c) for r in range(1, n + 1, 2) for c in range(1, n, 3)]
    if len(slots) < self.max_boxes + 1:
      raise ValueError(f"BoxWorld: a {n}x{n} room cannot hold "
                       f"{self.max_boxes} boxes and a key.")
    self._slots_S2 = np.array(slots, np.int32)
    interior = np.zeros((self.size, self.size), bool)
    interior[1:-1, 1:-1] = True
    self._interior_HW = interior
    self._num_codes = CODE_COLOUR0 + self.num_colours
    if observation_type == "onehot":
      self._palette = np.eye(self._num_codes, dtype=np.float32)
    else:
      self._palette = make_palette(self.num_colours)

  # -- Specs -------------------------------------------------------------------

  @property
  def num_channels(self) -> int:
    """C: channels of one rendered grid."""
    return self._palette.shape[1]

  def observation_spec(self) -> specs.BoundedArraySpec:
    c = self.num_channels
    if self.viewport is None:
      shape = (self.size, self.size, c)
    else:
      shape = (self.viewport, self.viewport, 2 * c)
    return specs.BoundedArraySpec(shape, np.float32, "observation", 0.0, 1.0)

  # -- Level generation --------------------------------------------------------

  def _boxes(self, u_n, u_m, u_perm_K, u_attach_D):
    """Box table of a random level, from uniforms.

    Returns (n, m, lock_B, content_B, distractor_B, active_B, key_colour):
    B = max_boxes; boxes [0, max_solution_length) are the path (active if
    index < n), then max_distractors branches of distractor_length boxes
    (active if branch < m). Colours are int32; content GEM for the last path
    box.
    """
    ns, nd, dl = (self.max_solution_length, self.max_distractors,
                  self.distractor_length)
    n = specs.random_int(u_n, self.min_solution_length, ns + 1)
    m = specs.random_int(u_m, self.min_distractors, nd + 1)
    perm = specs.random_permutation(u_perm_K)  # random colour order

    i = jnp.arange(ns)
    path_lock = perm[i]
    path_content = jnp.where(i == n - 1, GEM,
                             perm[jnp.minimum(i + 1, self.num_colours - 1)])
    path_active = i < n

    branch = jnp.repeat(jnp.arange(nd), dl)
    depth = jnp.tile(jnp.arange(dl), nd)
    fresh = perm[ns + jnp.arange(nd * dl)]          # content of each box
    attach = specs.random_int(u_attach_D, 0, n)     # path key each spends
    prev_fresh = jnp.concatenate([fresh[:1], fresh[:-1]])
    distr_lock = jnp.where(depth == 0, perm[attach[branch]], prev_fresh)
    distr_active = branch < m

    lock_B = jnp.concatenate([path_lock, distr_lock])
    content_B = jnp.concatenate([path_content, fresh])
    distractor_B = jnp.concatenate([jnp.zeros(ns, bool), jnp.ones(nd * dl,
                                                                  bool)])
    active_B = jnp.concatenate([path_active, distr_active])
    return n, m, lock_B, content_B, distractor_B, active_B, perm[0]

  def _place(self, u_place_O: jax.Array, u_slots_S: jax.Array,
             active_B: jax.Array) -> jax.Array:
    """Cells of the B boxes (their content cell; the lock is one to the
    right) and then of the loose key: int32 [B + 1, 2]; inactive boxes get
    row H (outside the grid). Uniforms: u_place [B + 1] for the random
    placement, u_slots [S] for the lattice fallback."""
    b = self.max_boxes
    h = w = self.size
    widths = jnp.array([2] * b + [1], jnp.int32)
    active = jnp.concatenate([active_B, jnp.ones((1,), bool)])
    interior_HW = jnp.asarray(self._interior_HW)

    rows_H1 = jnp.arange(h)[:, None]
    cols_1W = jnp.arange(w)[None, :]

    def place_one(carry, inputs):
      # blocked_HW: cells of placed objects and their 8 neighbours.
      blocked_HW, ok = carry
      u, width, on = inputs
      free_HW = interior_HW & ~blocked_HW
      right_free_HW = jnp.pad(free_HW[:, 1:], ((0, 0), (0, 1)))
      valid_HW = free_HW & ((width == 1) | right_free_HW)
      cell = specs.random_cell(u, valid_HW)
      r, c = cell[0], cell[1]
      ok = ok & (~on | valid_HW.any())
      blocked_HW = blocked_HW | (on & (jnp.abs(rows_H1 - r) <= 1)
                                 & (cols_1W >= c - 1) & (cols_1W <= c + width))
      return (blocked_HW, ok), cell

    (_, random_ok), random_cells = jax.lax.scan(
        place_one, (jnp.zeros((h, w), bool), jnp.ones((), bool)),
        (u_place_O, widths, active))
    slots = jnp.asarray(self._slots_S2)
    lattice_cells = slots[specs.random_permutation(u_slots_S)[:b + 1]]
    cells = jnp.where(random_ok, random_cells, lattice_cells)
    return jnp.where(active[:, None], cells, jnp.array([h, 0], jnp.int32))

  def _generate(self, key: jax.Array) -> BoxWorldState:
    """A random solvable level (module docstring)."""
    h = self.size
    (u_n, u_m, u_perm_K, u_attach_D, u_place_O, u_slots_S,
     u_agent) = specs.uniforms(
         key, (), (), (self.num_colours,), (self.max_distractors,),
         (self.max_boxes + 1,), (len(self._slots_S2),), ())
    n, m, lock_B, content_B, distractor_B, active_B, key_colour = (
        self._boxes(u_n, u_m, u_perm_K, u_attach_D))
    cells = self._place(u_place_O, u_slots_S, active_B)
    rows, cols = cells[:-1, 0], cells[:-1, 1]
    kind_HW = jnp.where(jnp.asarray(self._interior_HW), FLOOR, WALL).astype(
        jnp.int8)
    colour_HW = jnp.full((h, h), -1, jnp.int8)
    kind_HW = kind_HW.at[rows, cols].set(CONTENT, mode="drop")
    kind_HW = kind_HW.at[rows, cols + 1].set(LOCK, mode="drop")
    colour_HW = colour_HW.at[rows, cols].set(content_B.astype(jnp.int8),
                                             mode="drop")
    colour_HW = colour_HW.at[rows, cols + 1].set(lock_B.astype(jnp.int8),
                                                 mode="drop")
    distractor_HW = jnp.zeros((h, h), bool).at[rows, cols + 1].set(
        distractor_B, mode="drop")
    kr, kc = cells[-1, 0], cells[-1, 1]
    kind_HW = kind_HW.at[kr, kc].set(ITEM)
    colour_HW = colour_HW.at[kr, kc].set(key_colour.astype(jnp.int8))
    agent_2 = specs.random_cell(u_agent, kind_HW == FLOOR)
    return BoxWorldState(
        agent_2=agent_2, held=jnp.asarray(NO_KEY, jnp.int32), kind_HW=kind_HW,
        colour_HW=colour_HW, distractor_HW=distractor_HW,
        frame=jnp.zeros((), jnp.int32), solution_length=n,
        num_distractors=m)

  # -- Dynamics ----------------------------------------------------------------

  def reset(self, key: jax.Array) -> tuple[BoxWorldState, specs.TimeStep]:
    """A new random level; the FIRST timestep."""
    state = self._generate(key)
    return state, specs.restart(self.observe(state))

  def step(self, state: BoxWorldState,
           action: jax.Array) -> tuple[BoxWorldState, specs.TimeStep]:
    """Moves the agent; picks up items and opens matching locks."""
    target_2 = grid.move_target(state.agent_2, action, ACTION_DELTAS_A2)
    tr, tc = target_2[0], target_2[1]
    kind = state.kind_HW[tr, tc]
    colour = state.colour_HW[tr, tc].astype(jnp.int32)
    opens = (kind == LOCK) & (colour == state.held)
    picks = kind == ITEM
    moves = (kind == FLOOR) | picks | opens
    gem = picks & (colour == GEM)
    distractor = opens & state.distractor_HW[tr, tc]

    held = jnp.where(picks, colour, state.held)
    held = jnp.where(opens, NO_KEY, held).astype(jnp.int32)
    kind_HW = state.kind_HW.at[tr, tc].set(
        jnp.where(picks | opens, FLOOR, kind).astype(jnp.int8))
    # The content of an opened box (left of its lock) becomes a loose item.
    kind_HW = kind_HW.at[tr, tc - 1].set(
        jnp.where(opens, ITEM, kind_HW[tr, tc - 1]).astype(jnp.int8))
    colour_HW = state.colour_HW.at[tr, tc].set(
        jnp.where(picks | opens, -1, colour).astype(jnp.int8))
    agent_2 = jnp.where(moves, target_2, state.agent_2)
    frame = state.frame + 1

    reward = (self.gem_reward * gem
              + jnp.where(opens, jnp.where(distractor, self.distractor_reward,
                                           self.box_reward), 0.0))
    new_state = state._replace(agent_2=agent_2, held=held, kind_HW=kind_HW,
                               colour_HW=colour_HW, frame=frame)
    return new_state, self.end_step(self.observe(new_state), reward,
                                    gem | distractor, frame)

  # -- Observations ------------------------------------------------------------

  def codes(self, state: BoxWorldState) -> jax.Array:
    """Observation codes of the full grid, int32 [H, W] (held key at (0, 0))."""
    kind, colour = state.kind_HW, state.colour_HW.astype(jnp.int32)
    coloured = (kind == ITEM) | (kind == LOCK) | (kind == CONTENT)
    codes_HW = jnp.where(kind == WALL, CODE_WALL, CODE_FLOOR)
    codes_HW = jnp.where(
        coloured, jnp.where(colour == GEM, CODE_GEM, CODE_COLOUR0 + colour),
        codes_HW)
    codes_HW = codes_HW.at[state.agent_2[0], state.agent_2[1]].set(CODE_AGENT)
    held_code = jnp.where(state.held == NO_KEY, CODE_WALL,
                          CODE_COLOUR0 + state.held)
    return codes_HW.at[0, 0].set(held_code).astype(jnp.int32)

  def observe(self, state: BoxWorldState) -> jax.Array:
    """The observation of `state` as described by observation_spec()."""
    palette = jnp.asarray(self._palette)
    codes_HW = self.codes(state)
    if self.viewport is None:
      return palette[codes_HW]
    v = self.viewport
    window_VV = grid.crop_window(codes_HW, state.agent_2, v, CODE_WALL)
    held_code = jnp.where(state.held == NO_KEY, CODE_FLOOR,
                          CODE_COLOUR0 + state.held)
    held_VV = jnp.full((v, v), held_code, jnp.int32)
    return jnp.concatenate([palette[window_VV], palette[held_VV]], axis=-1)

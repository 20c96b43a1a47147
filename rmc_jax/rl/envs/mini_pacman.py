r"""Mini Pac-Man (the PillEater of I2A, Weber et al. 2017) as a pure-JAX env.

The game follows the description and rules of I2A's "MiniPacman":

* Maze: the fixed 15 x 19 map `MAZE` below (walls on the border). At the
  start of every level each free cell holds food, `num_pills` (2) power pills
  lie on distinct random free cells, Pac-Man starts on a random free cell and
  the level's ghosts on random free cells at Chebyshev distance >=
  `ghost_safe_distance` (5) from Pac-Man, facing random directions.
* Actions (5): 0 noop, 1 up, 2 down, 3 left, 4 right. A move into a wall
  leaves Pac-Man in place. After moving (also after a noop) Pac-Man eats the
  food and the pill on its cell.
* A pill makes the ghosts edible for exactly `pill_duration` (20) steps:
  the step on which it is eaten and the 19 after it (the power counter is set
  to 20 and decremented at the start of every step; ghosts are edible while
  it is positive).
* Ghosts, level L: min(1 + (L-1)//2, max_ghosts) of them; each moves one cell
  in a step with probability speed = min(0.5 + 0.1 (L-1), 1), halved while
  edible. A moving ghost never reverses unless at a dead end; in a corridor
  it keeps going (turning with it at corners); at a junction it takes the
  exit best aligned with the direction to Pac-Man (least aligned, i.e. flees,
  while edible), or with probability 0.05 (only when not edible) a random
  exit other than going back. Equally good exits go to the first in
  `ghost_tie_order`: PillEater's right, up, left, down ('pilleater'), or up,
  down, left, right ('up_down_left_right'); the same order ranks the exits
  for the random choice and for a turn where a corner offers two.
* Collisions are checked after Pac-Man's move and again after the ghosts'
  move (a Pac-Man and a ghost that swap cells do not meet, as in I2A). A ghost
  on Pac-Man's cell is eaten (removed until the next level) if edible,
  otherwise Pac-Man is killed and the episode terminates (discount 0).
* Level end (mode dependent): 'regular' all food eaten; 'avoid' all food
  eaten or 128 steps in the level; 'hunt'/'ambush' all ghosts eaten; 'rush'
  all pills eaten. The next level refills food and pills, re-places Pac-Man,
  spawns more and faster ghosts and clears the power counter; the score and
  the frame counter carry on.
* Frame cap: the episode is truncated (LAST, discount `frame_cap_discount`,
  default 1) after `frame_cap` steps (I2A default 3000).

Rewards per step: step + food * foods + pill * pills + ghost * ghosts eaten
+ killed * [killed]. The tables are I2A's (as in DeepMind's released
PillEater code):

  mode      step   food   pill   ghost   killed
  regular    0      1      2      5       0
  avoid      0.1   -0.1   -5    -10     -20
  hunt       0      0      1     10     -20
  ambush     0     -0.1    0     10     -20
  rush       0     -0.1   10      0       0

Departures from I2A: every edible ghost on Pac-Man's cell is eaten (I2A eats
at most one per step and then skips moving the remaining ghosts); a death
costs `killed` once even when two ghosts meet Pac-Man; a level that ends on
the step Pac-Man dies is not restarted (the episode is over anyway); a level
completed by Pac-Man's move still lets the old level's ghosts move that step
before the new level is drawn.

Observation (`observation_type='planes'`, float32 [H, W, 6], values in
[0, 1]), channels in I2A's order: 0 walls, 1 food, 2 Pac-Man, 3 ghosts
(1 - e), 4 edible ghosts (e), 5 pills, where e = power / pill_duration is the
remaining fraction of the pill's effect, so a ghost's two channels sum to 1.
`observation_type='rgb'` gives I2A's 3-channel rendering instead, the
observation PillEater returns (Pac-Man green, ghost (1, e, 0), pill cyan,
food blue, wall white, else black; in that priority, so a ghost hides the
food or pill under it, which the planes show).
With `viewport=v` (odd) the observation is the v x v window centred on
Pac-Man, cut from the full observation padded with walls ([v, v, C]).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.rl.envs import grid
from rmc_jax.rl.envs import spec as specs

MAZE = (
    "###################",
    "#...#.........#...#",
    "#.#.#.#######.#.#.#",
    "#.................#",
    "#.#.#.#######.#.#.#",
    "#.#.............#.#",
    "#.####.#####.####.#",
    "#......#####......#",
    "#.####.#####.####.#",
    "#.#.............#.#",
    "#.#.#.#######.#.#.#",
    "#.................#",
    "#.#.#.#######.#.#.#",
    "#...#.........#...#",
    "###################",
)
WALLS_HW = np.array([[ch == "#" for ch in row] for row in MAZE], dtype=bool)
HEIGHT, WIDTH = WALLS_HW.shape
FREE_CELLS_N2 = np.argwhere(~WALLS_HW).astype(np.int32)  # row-major order

NOOP, UP, DOWN, LEFT, RIGHT = range(5)
NUM_ACTIONS = 5
# Row/column offset of each action; ghost directions are actions 1..4 (so
# direction d in 0..3 is action d + 1 and its reverse is d ^ 1).
ACTION_DELTAS_A2 = np.array([[0, 0], [-1, 0], [1, 0], [0, -1], [0, 1]],
                            np.int32)
_DIRS_42 = ACTION_DELTAS_A2[1:]

# Observation channels (planes).
WALLS, FOOD, PACMAN, GHOSTS, EDIBLE_GHOSTS, PILLS = range(6)
NUM_PLANES = 6

MODES = ("regular", "avoid", "hunt", "ambush", "rush")

# Ghost directions (0 up, 1 down, 2 left, 3 right) in the order in which
# equally good exits are preferred.
GHOST_TIE_ORDERS = {"pilleater": (3, 0, 2, 1),
                    "up_down_left_right": (0, 1, 2, 3)}


class Rewards(NamedTuple):
  """Reward of each event (per event, summed within a step)."""

  step: float
  food: float
  pill: float
  ghost: float
  killed: float


REWARDS = {
    "regular": Rewards(step=0.0, food=1.0, pill=2.0, ghost=5.0, killed=0.0),
    "avoid": Rewards(step=0.1, food=-0.1, pill=-5.0, ghost=-10.0,
                     killed=-20.0),
    "hunt": Rewards(step=0.0, food=0.0, pill=1.0, ghost=10.0, killed=-20.0),
    "ambush": Rewards(step=0.0, food=-0.1, pill=0.0, ghost=10.0, killed=-20.0),
    "rush": Rewards(step=0.0, food=-0.1, pill=10.0, ghost=0.0, killed=0.0),
}


class MiniPacmanState(NamedTuple):
  """Fixed-shape state of one episode (G = max_ghosts).

  Attributes:
    pacman_2: int32 [2] (row, col) of Pac-Man, always a free cell.
    food_HW: bool [H, W] food left.
    pills_HW: bool [H, W] power pills left.
    ghosts_G2: int32 [G, 2] ghost cells (meaningless where not alive).
    ghost_dirs_G: int32 [G] last direction, 0 up, 1 down, 2 left, 3 right.
    ghost_alive_G: bool [G] ghost present in this level (not yet eaten).
    power: int32 [] steps of edibility left (0: ghosts dangerous).
    level: int32 [] current level, from 1.
    level_steps: int32 [] steps taken in the current level.
    frame: int32 [] steps taken in the episode.
    key: PRNG key for the ghosts and the next levels.
  """

  pacman_2: jax.Array
  food_HW: jax.Array
  pills_HW: jax.Array
  ghosts_G2: jax.Array
  ghost_dirs_G: jax.Array
  ghost_alive_G: jax.Array
  power: jax.Array
  level: jax.Array
  level_steps: jax.Array
  frame: jax.Array
  key: jax.Array


def sorted_indices(indices: list[jax.Array]) -> list[jax.Array]:
  """A short list of int scalars in increasing order (traced; fixed length)."""
  if len(indices) < 2:
    return indices
  return list(jnp.sort(jnp.stack(indices)))


class MiniPacman(grid.GridEnvironment):
  """Mini Pac-Man; see the module docstring for the rules and rewards."""

  def __init__(self, mode: str = "regular", viewport: int | None = None,
               frame_cap: int | None = 3000, *,
               observation_type: str = "planes",
               max_ghosts: int = 12,
               num_pills: int = 2,
               pill_duration: int = 20,
               ghost_speed_init: float = 0.5,
               ghost_speed_increase: float = 0.1,
               ghost_randomness: float = 0.05,
               ghost_safe_distance: int = 5,
               avoid_level_steps: int = 128,
               ghost_tie_order: str = "pilleater",
               frame_cap_discount: float = 1.0,
               rewards: Rewards | None = None):
    """Configures the game (the defaults are I2A's).

    Args:
      mode: one of MODES; picks the reward table and the level-end rule.
      viewport: None for the full [15, 19, C] observation, or an odd v for the
        v x v window around Pac-Man (the paper's partially observed task
        uses 5).
      frame_cap: steps after which the episode is truncated; None or 0 for
        no cap.
      observation_type: 'planes' (6 channels) or 'rgb' (3 channels).
      max_ghosts: ghost slots G; later levels stop adding ghosts at G.
      num_pills: power pills per level.
      pill_duration: steps the ghosts stay edible after a pill.
      ghost_speed_init: ghost move probability at level 1 (0 freezes them).
      ghost_speed_increase: added per level (capped at probability 1).
      ghost_randomness: chance of a random exit at a junction (not edible).
      ghost_safe_distance: minimum Chebyshev distance of a spawning ghost
        from Pac-Man.
      avoid_level_steps: level length in 'avoid' mode.
      ghost_tie_order: a key of GHOST_TIE_ORDERS: which of equally good
        exits a ghost takes (PillEater's order by default).
      frame_cap_discount: discount of the LAST timestep at the frame cap
        (1: a truncation; 0 treats the cap as terminal, as I2A's pcontinue).
      rewards: overrides the mode's reward table.

    Raises:
      ValueError: on an unknown mode, observation_type or ghost_tie_order,
        an even or non-positive viewport, or sizes below 1.
    """
    if mode not in MODES:
      raise ValueError(f"MiniPacman: mode must be one of {MODES}, got "
                       f"{mode!r}.")
    super().__init__(NUM_ACTIONS, viewport, observation_type,
                     ("planes", "rgb"), frame_cap, frame_cap_discount)
    if ghost_tie_order not in GHOST_TIE_ORDERS:
      raise ValueError("MiniPacman: ghost_tie_order must be one of "
                       f"{tuple(GHOST_TIE_ORDERS)}, got {ghost_tie_order!r}.")
    for name, value in (("max_ghosts", max_ghosts), ("num_pills", num_pills),
                        ("pill_duration", pill_duration)):
      if value < 1:
        raise ValueError(f"MiniPacman: {name} must be >= 1, got {value}.")
    self.mode = mode
    self.max_ghosts = int(max_ghosts)
    self.num_pills = int(num_pills)
    self.pill_duration = int(pill_duration)
    self.ghost_speed_init = float(ghost_speed_init)
    self.ghost_speed_increase = float(ghost_speed_increase)
    self.ghost_randomness = float(ghost_randomness)
    self.ghost_safe_distance = int(ghost_safe_distance)
    self.avoid_level_steps = int(avoid_level_steps)
    self.ghost_tie_order = ghost_tie_order
    self.rewards = Rewards(*rewards) if rewards is not None else REWARDS[mode]
    # Spawn table: for Pac-Man on free cell i, the free cells j at Chebyshev
    # distance >= ghost_safe_distance are _spawn_NN[i, :_num_spawn_N[i]].
    rows, cols = FREE_CELLS_N2[:, 0], FREE_CELLS_N2[:, 1]
    cheb_NN = np.maximum(np.abs(rows[:, None] - rows[None]),
                         np.abs(cols[:, None] - cols[None]))
    allowed_NN = cheb_NN >= self.ghost_safe_distance
    if not allowed_NN.any(axis=1).all():
      raise ValueError("MiniPacman: ghost_safe_distance leaves no spawn cell "
                       "for some Pac-Man position.")
    self._num_spawn_N = allowed_NN.sum(axis=1).astype(np.int32)
    self._spawn_NN = np.zeros_like(cheb_NN, dtype=np.int32)
    for i, row in enumerate(allowed_NN):
      self._spawn_NN[i, :row.sum()] = np.flatnonzero(row)

  # -- Specs -------------------------------------------------------------------

  def observation_spec(self) -> specs.BoundedArraySpec:
    h, w = ((HEIGHT, WIDTH) if self.viewport is None
            else (self.viewport, self.viewport))
    channels = NUM_PLANES if self.observation_type == "planes" else 3
    return specs.BoundedArraySpec((h, w, channels), np.float32, "observation",
                                  0.0, 1.0)

  # -- Dynamics ----------------------------------------------------------------

  @property
  def _num_level_uniforms(self) -> int:
    return self.num_pills + 1 + 2 * self.max_ghosts

  def _new_level(self, u_level: jax.Array, level: jax.Array,
                 frame: jax.Array, next_key: jax.Array) -> MiniPacmanState:
    """Draws a fresh level `level` (pills, Pac-Man, ghosts); full food.

    u_level: [_num_level_uniforms] uniforms in (0, 1).
    """
    g, p = self.max_ghosts, self.num_pills
    u_pills, u_pac, u_ghosts, u_dirs = (u_level[:p], u_level[p],
                                        u_level[p + 1:p + 1 + g],
                                        u_level[p + 1 + g:])
    free_cells_N2 = jnp.asarray(FREE_CELLS_N2)
    n = len(FREE_CELLS_N2)
    # Distinct pill cells: the j-th pill takes the k-th of the n - j cells
    # not yet chosen (k uniform), by skipping the chosen indices in order.
    chosen = []
    for j in range(p):
      k = specs.random_int(u_pills[j], 0, n - j)
      for c in sorted_indices(chosen):
        k = k + (k >= c)
      chosen.append(k)
    pill_cells_P2 = free_cells_N2[jnp.stack(chosen)]
    pills_HW = jnp.zeros((HEIGHT, WIDTH), bool).at[
        pill_cells_P2[:, 0], pill_cells_P2[:, 1]].set(True)
    pacman_index = specs.random_int(u_pac, 0, n)
    pacman_2 = free_cells_N2[pacman_index]
    num_spawn = jnp.asarray(self._num_spawn_N)[pacman_index]
    spawn_G = jnp.asarray(self._spawn_NN)[
        pacman_index, specs.random_int(u_ghosts, 0, num_spawn)]
    ghosts_G2 = free_cells_N2[spawn_G]
    num_ghosts = jnp.minimum(1 + (level - 1) // 2, g)
    return MiniPacmanState(
        pacman_2=pacman_2,
        food_HW=jnp.asarray(~WALLS_HW),
        pills_HW=pills_HW,
        ghosts_G2=ghosts_G2,
        ghost_dirs_G=specs.random_int(u_dirs, 0, 4),
        ghost_alive_G=jnp.arange(g) < num_ghosts,
        power=jnp.zeros((), jnp.int32),
        level=jnp.asarray(level, jnp.int32),
        level_steps=jnp.zeros((), jnp.int32),
        frame=jnp.asarray(frame, jnp.int32),
        key=next_key)

  def reset(self, key: jax.Array) -> tuple[MiniPacmanState, specs.TimeStep]:
    """Level 1 of a new episode; the FIRST timestep."""
    level_key, next_key = jax.random.split(key)
    u_level, = specs.uniforms(level_key, (self._num_level_uniforms,))
    state = self._new_level(u_level, jnp.ones((), jnp.int32),
                            jnp.zeros((), jnp.int32), next_key)
    return state, specs.restart(self.observe(state))

  def _ghost_step(self, u_explore: jax.Array, u_exit: jax.Array,
                  pos_2: jax.Array, dir_: jax.Array, pacman_2: jax.Array,
                  edible: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One ghost's next (cell [2], direction []) if it moves this step.

    u_explore and u_exit are uniforms for the random junction choice.
    Candidates are ranked in ghost_tie_order, so the first best one wins.
    """
    walls_HW = jnp.asarray(WALLS_HW)
    order_4 = jnp.asarray(GHOST_TIE_ORDERS[self.ghost_tie_order])
    dirs_42 = jnp.asarray(_DIRS_42)
    next_42 = pos_2 + dirs_42
    open_4 = ~walls_HW[next_42[:, 0], next_42[:, 1]]
    not_back_4 = open_4 & (jnp.arange(4) != (dir_ ^ 1))
    exits_4 = jnp.where(not_back_4.any(), not_back_4, open_4)  # dead end
    ranked_exits_4 = exits_4[order_4]
    corridor_dir = jnp.where(exits_4[dir_], dir_,
                             order_4[jnp.argmax(ranked_exits_4)])
    towards_4 = dirs_42 @ (pacman_2 - pos_2)
    preference_4 = jnp.where(edible, -towards_4, towards_4).astype(jnp.float32)
    greedy_dir = order_4[jnp.argmax(
        jnp.where(ranked_exits_4, preference_4[order_4], -jnp.inf))]
    random_dir = order_4[specs.random_index(u_exit, ranked_exits_4)]
    explore = (~edible) & (u_explore < self.ghost_randomness)
    junction_dir = jnp.where(explore, random_dir, greedy_dir)
    new_dir = jnp.where(open_4.sum() >= 3, junction_dir,
                        corridor_dir).astype(jnp.int32)
    return pos_2 + dirs_42[new_dir], new_dir

  def step(self, state: MiniPacmanState,
           action: jax.Array) -> tuple[MiniPacmanState, specs.TimeStep]:
    """Pac-Man moves and eats, ghosts move, collisions, level and frame cap."""
    walls_HW = jnp.asarray(WALLS_HW)
    r = self.rewards
    g = self.max_ghosts
    next_key, step_key = jax.random.split(state.key)
    u_speed_G, u_explore_G, u_exit_G, u_level = specs.uniforms(
        step_key, (g,), (g,), (g,), (self._num_level_uniforms,))
    frame = state.frame + 1
    level_steps = state.level_steps + 1
    power = jnp.maximum(state.power - 1, 0)

    # Pac-Man.
    target_2 = grid.move_target(state.pacman_2, action, ACTION_DELTAS_A2)
    pacman_2 = jnp.where(walls_HW[target_2[0], target_2[1]], state.pacman_2,
                         target_2)
    pr, pc = pacman_2[0], pacman_2[1]
    ate_food = state.food_HW[pr, pc]
    ate_pill = state.pills_HW[pr, pc]
    food_HW = state.food_HW.at[pr, pc].set(False)
    pills_HW = state.pills_HW.at[pr, pc].set(False)
    power = jnp.where(ate_pill, self.pill_duration, power)
    edible = power > 0

    # Pac-Man walking onto ghosts.
    alive_G = state.ghost_alive_G
    met_G = alive_G & jnp.all(state.ghosts_G2 == pacman_2, axis=-1)
    killed = jnp.any(met_G & ~edible)
    eaten_G = met_G & edible
    alive_G = alive_G & ~eaten_G

    # Ghosts move.
    speed = jnp.minimum(
        self.ghost_speed_init
        + self.ghost_speed_increase * (state.level - 1).astype(jnp.float32),
        1.0)
    speed = jnp.where(edible, 0.5 * speed, speed)
    moves_G = alive_G & ~met_G & (u_speed_G < speed)
    moved_G2, moved_dirs_G = jax.vmap(
        self._ghost_step, in_axes=(0, 0, 0, 0, None, None))(
            u_explore_G, u_exit_G, state.ghosts_G2, state.ghost_dirs_G,
            pacman_2, edible)
    ghosts_G2 = jnp.where(moves_G[:, None], moved_G2, state.ghosts_G2)
    ghost_dirs_G = jnp.where(moves_G, moved_dirs_G, state.ghost_dirs_G)

    # Ghosts walking onto Pac-Man.
    met2_G = moves_G & jnp.all(ghosts_G2 == pacman_2, axis=-1)
    killed = killed | jnp.any(met2_G & ~edible)
    eaten2_G = met2_G & edible
    alive_G = alive_G & ~eaten2_G
    num_eaten = eaten_G.sum() + eaten2_G.sum()

    reward = (r.step + r.food * ate_food + r.pill * ate_pill
              + r.ghost * num_eaten + r.killed * killed).astype(jnp.float32)

    stepped = MiniPacmanState(
        pacman_2=pacman_2, food_HW=food_HW, pills_HW=pills_HW,
        ghosts_G2=ghosts_G2, ghost_dirs_G=ghost_dirs_G, ghost_alive_G=alive_G,
        power=power.astype(jnp.int32), level=state.level,
        level_steps=level_steps, frame=frame, key=next_key)

    if self.mode == "regular":
      level_over = ~jnp.any(food_HW)
    elif self.mode == "avoid":
      level_over = ~jnp.any(food_HW) | (level_steps >= self.avoid_level_steps)
    elif self.mode in ("hunt", "ambush"):
      level_over = ~jnp.any(alive_G)
    else:  # rush
      level_over = ~jnp.any(pills_HW)
    new_state = jax.lax.cond(
        level_over & ~killed,
        lambda: self._new_level(u_level, state.level + 1, frame, next_key),
        lambda: stepped)

    return new_state, self.end_step(self.observe(new_state), reward, killed,
                                    frame)

  # -- Observations ------------------------------------------------------------

  def planes(self, state: MiniPacmanState) -> jax.Array:
    """The full observation planes, float32 [H, W, 6] (module docstring)."""
    edibility = state.power.astype(jnp.float32) / self.pill_duration
    alive_G = state.ghost_alive_G
    gr, gc = state.ghosts_G2[:, 0], state.ghosts_G2[:, 1]
    zeros_HW = jnp.zeros((HEIGHT, WIDTH), jnp.float32)
    ghosts_HW = zeros_HW.at[gr, gc].max(jnp.where(alive_G, 1.0 - edibility,
                                                  0.0))
    edible_HW = zeros_HW.at[gr, gc].max(jnp.where(alive_G, edibility, 0.0))
    pacman_HW = zeros_HW.at[state.pacman_2[0], state.pacman_2[1]].set(1.0)
    return jnp.stack([
        jnp.asarray(WALLS_HW, jnp.float32),
        state.food_HW.astype(jnp.float32),
        pacman_HW,
        ghosts_HW,
        edible_HW,
        state.pills_HW.astype(jnp.float32),
    ], axis=-1)

  def observe(self, state: MiniPacmanState) -> jax.Array:
    """The observation of `state` as described by observation_spec()."""
    planes_HWC = self.planes(state)
    if self.viewport is not None:
      # Outside the maze: walls.
      planes_HWC = grid.crop_window(planes_HWC, state.pacman_2, self.viewport,
                                    np.eye(NUM_PLANES)[WALLS])
    if self.observation_type == "rgb":
      return planes_to_rgb(planes_HWC)
    return planes_HWC


def planes_to_rgb(planes_HWC: jax.Array) -> jax.Array:
  """I2A's 3-colour rendering of [H, W, 6] planes, float32 [H, W, 3]."""
  p = planes_HWC
  ghost = p[..., GHOSTS]
  edible = p[..., EDIBLE_GHOSTS]
  zeros = jnp.zeros_like(ghost)
  ones = jnp.ones_like(ghost)

  def rgb(r, g, b):
    return jnp.stack([r, g, b], axis=-1)

  out = rgb(zeros, zeros, zeros)
  out = jnp.where((p[..., WALLS] > 0)[..., None], rgb(ones, ones, ones), out)
  out = jnp.where((p[..., FOOD] > 0)[..., None], rgb(zeros, zeros, ones), out)
  out = jnp.where((p[..., PILLS] > 0)[..., None], rgb(zeros, ones, ones), out)
  out = jnp.where(((ghost > 0) | (edible > 0))[..., None],
                  rgb(ghost + edible, edible, zeros), out)
  out = jnp.where((p[..., PACMAN] > 0)[..., None], rgb(zeros, ones, zeros),
                  out)
  return out

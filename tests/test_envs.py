"""Tests for the pure-JAX Mini Pac-Man and BoxWorld environments.

Scenarios are built as explicit states (NumPy arrays) and rolled out with one
jitted, vmapped scan per environment configuration (compiled once per module
through a cache), so each test mostly checks NumPy arrays. BoxWorld levels
are checked with a breadth-first search written here from the rules, sharing
no code with the environment.
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rmc_jax.rl.envs import (AutoReset, AutoResetState, BoxWorld,
                             BoxWorldState, MiniPacman, MiniPacmanState,
                             StepType)
from rmc_jax.rl.envs import boxworld as bw
from rmc_jax.rl.envs import mini_pacman as mp

T = 21      # rollout length of every scan
BATCH = 6   # batch of every batched rollout and reset (one compile each)
LEVELS = 150  # BoxWorld levels generated per configuration
NOOP, UP, DOWN, LEFT, RIGHT = range(5)
FAR_FOOD = (13, 17)  # keeps 'regular' levels from ending in scenarios
KEY0 = np.asarray(jax.random.PRNGKey(0))
# Compilation dominates this module's run time; XLA's backend optimisation
# level 0 halves it and the tiny rollouts do not need speed.
jit = functools.partial(jax.jit,
                        compiler_options={"xla_backend_optimization_level": 0})


@functools.lru_cache(maxsize=None)
def rollout_fn(env, batched: bool = True):
  """jit(scan of T (vmapped) steps): (state, actions [.., T]) -> trajectory
  (states, timesteps) with a time axis after the batch axis."""

  def run(state, actions_T):
    def body(s, a):
      s, ts = env.step(s, a)
      return s, (s, ts)

    _, traj = jax.lax.scan(body, state, actions_T)
    return traj

  if batched:
    return jit(jax.vmap(run))
  return jit(run)


def roll(env, states, acts):
  """Rolls out a list of (<= BATCH) states with actions [n, T] (padded)."""
  n = len(states)
  states = list(states) + [states[0]] * (BATCH - n)
  acts = np.concatenate([np.asarray(acts, np.int32),
                         np.zeros((BATCH - n, T), np.int32)])
  traj = rollout_fn(env)(stack(states), acts)
  return jax.tree.map(lambda x: np.asarray(x)[:n], traj)


@functools.lru_cache(maxsize=None)
def reset_fn(env, batched: bool = True):
  """jit(reset from integer seeds) (vmapped over a seed vector if batched)."""
  reset = lambda seed: env.reset(jax.random.PRNGKey(seed))
  return jit(jax.vmap(reset) if batched else reset)


def reset_many(env, first_seed, n=BATCH):
  return jax.tree.map(np.asarray, reset_fn(env)(
      np.arange(first_seed, first_seed + n, dtype=np.int32)))


def random_actions(seed, num_actions, n=BATCH):
  return np.random.default_rng(seed).integers(0, num_actions, (n, T),
                                              dtype=np.int32)


def stack(states):
  return jax.tree.map(lambda *xs: np.stack(xs), *states)


def take(tree, i):
  return jax.tree.map(lambda x: np.asarray(x)[i], tree)


# ---------------------------------------------------------------------------
# Mini Pac-Man.
# ---------------------------------------------------------------------------

# Ghosts frozen at level 1 (speed 0), always moving at level >= 2 (speed 1),
# never random: scenarios are deterministic.
_STATIC = dict(ghost_speed_init=0.0, ghost_speed_increase=1.0,
               ghost_randomness=0.0, max_ghosts=3)


@functools.lru_cache(maxsize=None)
def pacman_env(mode="regular"):
  return MiniPacman(mode, **_STATIC)


@functools.lru_cache(maxsize=None)
def make_env(cls, **kwargs):
  """One environment object per configuration (so jit caches are shared)."""
  return cls(**kwargs)


def pacman_state(pacman, ghosts=(), pills=(), food=(FAR_FOOD,), power=0,
                 level=1, frame=0, ghost_dirs=None, max_ghosts=3):
  """A MiniPacmanState with the listed cells (row, col) and nothing else."""
  food_HW = np.zeros(mp.WALLS_HW.shape, bool)
  for cell in food:
    food_HW[cell] = True
  pills_HW = np.zeros_like(food_HW)
  for cell in pills:
    pills_HW[cell] = True
  ghosts_G2 = np.full((max_ghosts, 2), [13, 1], np.int32)
  alive_G = np.zeros(max_ghosts, bool)
  for g, cell in enumerate(ghosts):
    ghosts_G2[g] = cell
    alive_G[g] = True
  dirs_G = np.zeros(max_ghosts, np.int32)
  if ghost_dirs is not None:
    dirs_G[:len(ghost_dirs)] = ghost_dirs
  return MiniPacmanState(
      pacman_2=np.array(pacman, np.int32), food_HW=food_HW, pills_HW=pills_HW,
      ghosts_G2=ghosts_G2, ghost_dirs_G=dirs_G, ghost_alive_G=alive_G,
      power=np.int32(power), level=np.int32(level), level_steps=np.int32(0),
      frame=np.int32(frame), key=KEY0)


def actions(*first, total=T):
  out = np.zeros(total, np.int32)
  out[:len(first)] = first
  return out


def test_maze_layout():
  assert mp.WALLS_HW.shape == (15, 19)
  assert mp.WALLS_HW[0].all() and mp.WALLS_HW[-1].all()
  assert mp.WALLS_HW[:, 0].all() and mp.WALLS_HW[:, -1].all()
  # Free cells form one connected region.
  free = {tuple(c) for c in np.argwhere(~mp.WALLS_HW)}
  seen, todo = set(), [next(iter(free))]
  while todo:
    r, c = todo.pop()
    if (r, c) in seen or (r, c) not in free:
      continue
    seen.add((r, c))
    todo += [(r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)]
  assert seen == free


def test_pacman_cannot_enter_walls():
  env = pacman_env()
  # Explicit: walls above and to the left of (1, 1); (2, 2) is a wall.
  traj, _ = roll(env, [pacman_state((1, 1))] * 3 + [pacman_state((1, 2))],
                 [actions(UP), actions(LEFT), actions(RIGHT), actions(DOWN)])
  np.testing.assert_array_equal(traj.pacman_2[:, 0],
                                [[1, 1], [1, 1], [1, 2], [1, 2]])
  # Random play with moving ghosts: Pac-Man is always on a free cell and
  # moves exactly as the action says unless the target is a wall.
  env = make_env(MiniPacman)
  start, _ = reset_many(env, 100)
  acts = random_actions(1, 5)
  traj, ts = roll(env, [take(start, i) for i in range(BATCH)], acts)
  pos = traj.pacman_2
  assert not mp.WALLS_HW[pos[..., 0], pos[..., 1]].any()
  prev = np.concatenate([start.pacman_2[:, None], pos[:, :-1]], 1)
  target = prev + mp.ACTION_DELTAS_A2[acts]
  expected = np.where(mp.WALLS_HW[target[..., 0], target[..., 1]][..., None],
                      prev, target)
  # Compare until each episode or level ends (Pac-Man is then re-placed).
  last = ts.step_type == StepType.LAST
  running = np.cumsum(last, 1) - last == 0
  check = running & (traj.level == 1)
  assert check.sum() > 50
  np.testing.assert_array_equal(pos[check], expected[check])


def _reward_scenarios():
  # A far ghost, pill and food (FAR_FOOD) keep every mode's level going.
  far, pill = (13, 17), (13, 1)
  return [
      pacman_state((3, 3), food=[(3, 4), FAR_FOOD], ghosts=[far],
                   pills=[pill]),                                    # food
      pacman_state((3, 3), pills=[(3, 4), pill], ghosts=[far]),      # pill
      pacman_state((3, 3), ghosts=[(3, 4), far], pills=[pill]),      # killed
      pacman_state((3, 3), ghosts=[(3, 4), far], pills=[pill],
                   power=5),                                         # eat
      pacman_state((3, 3), ghosts=[far], pills=[pill]),              # nothing
  ]


@pytest.mark.parametrize("mode", mp.MODES)
def test_rewards_and_ghost_collisions_per_mode(mode):
  env = pacman_env(mode)
  r = mp.REWARDS[mode]
  traj, ts = roll(env, _reward_scenarios(), [actions(RIGHT)] * 5)
  reward, step_type = ts.reward[:, 0], ts.step_type[:, 0]
  discount = ts.discount[:, 0]
  np.testing.assert_allclose(
      reward, [r.step + r.food, r.step + r.pill, r.step + r.killed,
               r.step + r.ghost, r.step], rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(step_type, [1, 1, 2, 1, 1])
  np.testing.assert_array_equal(discount, [1, 1, 0, 1, 1])
  assert int(traj.power[1, 0]) == env.pill_duration
  # The eaten ghost is gone for the rest of the level.
  np.testing.assert_array_equal(traj.ghost_alive_G[3, 0, :2], [False, True])
  np.testing.assert_array_equal(traj.level[:, 0], 1)


def test_level_ends_per_mode():
  # Eating the last food ('regular'), the last pill ('rush') or the last
  # ghost ('hunt') starts level 2: full food, new pills, 1 + (2-1)//2 = 1
  # ghost.
  cases = {
      "regular": pacman_state((3, 3), food=[(3, 4)]),
      "rush": pacman_state((3, 3), pills=[(3, 4)]),
      "hunt": pacman_state((3, 3), ghosts=[(3, 4)], power=5),
  }
  for mode, state in cases.items():
    traj, ts = roll(pacman_env(mode), [state], [actions(RIGHT)])
    assert int(traj.level[0, 0]) == 2, mode
    assert int(ts.step_type[0, 0]) == StepType.MID
    assert traj.food_HW[0, 0].sum() == (~mp.WALLS_HW).sum()
    assert traj.pills_HW[0, 0].sum() == 2
    assert traj.ghost_alive_G[0, 0].sum() == 1


def test_ghost_moving_onto_pacman_kills_or_is_eaten():
  env = pacman_env()
  # Level 2: ghosts move every step (every other step on average while
  # edible). The ghost at (3, 6) is in a corridor heading right (direction 3)
  # towards Pac-Man at (3, 7), who waits.
  kill = pacman_state((3, 7), ghosts=[(3, 6)], ghost_dirs=[3], level=2)
  eat = pacman_state((3, 7), ghosts=[(3, 6)], ghost_dirs=[3],
                     level=2, power=20)
  traj, ts = roll(env, [kill, eat], np.zeros((2, T)))
  assert int(ts.step_type[0, 0]) == StepType.LAST
  assert float(ts.discount[0, 0]) == 0.0
  np.testing.assert_array_equal(traj.ghosts_G2[0, 0, 0], [3, 7])
  # An edible ghost flees at junctions, but in a corridor it does not turn
  # back: it reaches Pac-Man while still edible and is eaten.
  rewards = ts.reward[1]
  eaten_at = int(np.argmax(rewards > 0))
  assert rewards[eaten_at] == mp.REWARDS["regular"].ghost
  assert not traj.ghost_alive_G[1, eaten_at, 0]
  assert not (ts.step_type[1] == StepType.LAST).any()


def test_power_pill_lasts_exactly_20_steps():
  env = pacman_env()
  start = pacman_state((3, 3), pills=[(3, 4), (13, 1)], ghosts=[(3, 5),
                                                                (13, 17)])
  # Eat the pill (step 0), wait, then walk into the ghost on step 19 (the
  # 20th step of power) or step 20 (the 21st).
  eat_late = actions(RIGHT, *([NOOP] * 18), RIGHT)
  die = actions(RIGHT, *([NOOP] * 19), RIGHT)
  traj, ts = roll(env, [start] * 2, [eat_late, die])
  power = traj.power
  np.testing.assert_array_equal(power[1], [20 - k for k in range(20)] + [0])
  assert float(ts.reward[0, 19]) == mp.REWARDS["regular"].ghost
  assert int(ts.step_type[0, 19]) == StepType.MID
  assert int(ts.step_type[1, 20]) == StepType.LAST
  assert float(ts.discount[1, 20]) == 0.0
  # The edible-ghost plane shows the remaining fraction for 20 observations.
  edible = ts.observation[1, :, 3, 5, mp.EDIBLE_GHOSTS]
  ghost = ts.observation[1, :, 3, 5, mp.GHOSTS]
  np.testing.assert_allclose(edible[:20], (20 - np.arange(20)) / 20)
  assert (edible > 0).sum() == 20
  np.testing.assert_allclose(ghost[:20] + edible[:20], 1.0)


def test_frame_cap_truncates():
  env = pacman_env()  # frame_cap 3000
  traj, ts = roll(env, [pacman_state((3, 3), frame=2995)], np.zeros((1, T)))
  np.testing.assert_array_equal(ts.step_type[0, :5], [1, 1, 1, 1, 2])
  assert float(ts.discount[0, 4]) == 1.0
  assert int(traj.frame[0, 4]) == 3000


def test_frame_cap_as_pilleater_terminal():
  """PillEater ends at its 3000-step default cap with pcontinue 0."""
  env = make_env(MiniPacman, frame_cap_discount=0.0, **_STATIC)
  assert env.frame_cap == 3000
  _, ts = roll(env, [pacman_state((3, 3), frame=2998)], np.zeros((1, T)))
  np.testing.assert_array_equal(ts.step_type[0, :2], [1, 2])
  np.testing.assert_array_equal(ts.discount[0, :2], [1.0, 0.0])


@pytest.mark.parametrize("order,cell", [("pilleater", (3, 4)),
                                        ("up_down_left_right", (2, 3))])
def test_ghost_tie_order_at_a_junction(order, cell):
  """A ghost heading right at the 4-way junction (3, 3), Pac-Man two up and
  two right: up and right are equally good, the order decides."""
  assert MiniPacman().ghost_tie_order == "pilleater"
  env = make_env(MiniPacman, ghost_tie_order=order, **_STATIC)
  right = 3  # ghost direction
  traj, ts = roll(env, [pacman_state((1, 5), ghosts=[(3, 3)], level=2,
                                     ghost_dirs=[right])], np.zeros((1, T)))
  np.testing.assert_array_equal(traj.ghosts_G2[0, 0, 0], cell)


def test_rgb_pixels_of_a_hand_built_state():
  """PillEater's colours: Pac-Man green, a ghost red over the food under it
  (yellowish while edible), pill cyan, food blue, wall white, else black."""
  env = make_env(MiniPacman, observation_type="rgb")
  state = pacman_state((3, 3), ghosts=[(3, 5), (1, 1)],
                       pills=[(5, 5)], food=[(3, 5), (3, 7), (1, 1)],
                       max_ghosts=12)
  obs = np.asarray(jit(env.observe)(state))
  assert obs.shape == (15, 19, 3)
  expected = {(3, 3): [0, 1, 0], (3, 5): [1, 0, 0], (1, 1): [1, 0, 0],
              (5, 5): [0, 1, 1], (3, 7): [0, 0, 1], (0, 0): [1, 1, 1],
              (6, 2): [1, 1, 1], (3, 4): [0, 0, 0], (13, 17): [0, 0, 0]}
  for cell, colour in expected.items():
    np.testing.assert_array_equal(obs[cell], colour, err_msg=str(cell))
  edible = np.asarray(jit(env.observe)(state._replace(power=np.int32(5))))
  np.testing.assert_allclose(edible[3, 5], [1, 0.25, 0])


def _numpy_crop(planes_HWC, center, v):
  pad = v // 2
  padded = np.pad(planes_HWC, ((pad, pad), (pad, pad), (0, 0)))
  padded[..., mp.WALLS] = np.pad(planes_HWC[..., mp.WALLS], pad,
                                 constant_values=1.0)
  r, c = center
  return padded[r:r + v, c:c + v]


def test_viewport_is_crop_of_full_observation():
  full = make_env(MiniPacman)
  view = make_env(MiniPacman, viewport=5)
  rgb = make_env(MiniPacman, viewport=5, observation_type="rgb")
  start, _ = reset_many(full, 200)
  traj, ts_full = roll(full, [take(start, i) for i in range(BATCH)],
                       random_actions(2, 5))
  states = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), traj)
  corners = stack([pacman_state(p, ghosts=[(2, 1)], pills=[(1, 2)],
                                max_ghosts=12, power=7)
                   for p in [(1, 1), (1, 17), (13, 1), (13, 17), (7, 9)]])
  states = jax.tree.map(lambda a, b: np.concatenate([a, b]), states, corners)
  observe = jit(jax.vmap(
      lambda s: (full.observe(s), view.observe(s), rgb.observe(s))))
  obs_full, obs_view, obs_rgb = map(np.asarray, observe(states))
  np.testing.assert_array_equal(obs_full[:BATCH * T],
                                ts_full.observation.reshape(-1, 15, 19, 6))
  full.observation_spec().validate(obs_full, batched=True)
  view.observation_spec().validate(obs_view, batched=True)
  rgb.observation_spec().validate(obs_rgb, batched=True)
  for i, center in enumerate(states.pacman_2):
    crop = _numpy_crop(obs_full[i], center, 5)
    np.testing.assert_array_equal(obs_view[i], crop)
    assert obs_view[i, 2, 2, mp.PACMAN] == 1.0
    # RGB: Pac-Man green, walls white, pills cyan, food blue, empty black.
    np.testing.assert_array_equal(obs_rgb[i, 2, 2], [0, 1, 0])
    for channel, colour in [(mp.WALLS, [1, 1, 1]), (mp.FOOD, [0, 0, 1]),
                            (mp.PILLS, [0, 1, 1])]:
      others = np.delete(crop, channel, axis=-1).sum(-1) == 0
      cells = (crop[..., channel] == 1) & others
      assert (obs_rgb[i][cells] == colour).all()
    empty = crop.sum(-1) == 0
    assert (obs_rgb[i][empty] == 0).all()
  # A ghost e of the way to harmless is drawn (1, e, 0).
  np.testing.assert_allclose(obs_rgb[-5, 3, 2], [1, 7 / 20, 0])


@pytest.mark.parametrize("make", [
    lambda: MiniPacman(), lambda: MiniPacman(viewport=5),
    lambda: MiniPacman(observation_type="rgb"),
    lambda: MiniPacman(viewport=5, observation_type="rgb"),
    lambda: BoxWorld(), lambda: BoxWorld(viewport=5),
    lambda: BoxWorld(observation_type="rgb"),
    lambda: BoxWorld(viewport=5, observation_type="rgb")])
def test_specs_match_observations(make):
  env = make()
  state, ts = jax.eval_shape(env.reset, jax.random.PRNGKey(0))
  env.observation_spec().validate(ts.observation)
  _, ts2 = jax.eval_shape(env.step, state, jnp.zeros((), jnp.int32))
  env.observation_spec().validate(ts2.observation)
  env.reward_spec().validate(ts2.reward)
  env.discount_spec().validate(ts2.discount)
  spec = env.action_spec()
  assert spec.num_values == (5 if isinstance(env, MiniPacman) else 4)
  assert spec.shape == () and spec.dtype == np.int32
  with pytest.raises(ValueError):
    env.observation_spec().validate(
        jax.ShapeDtypeStruct(ts.observation.shape[:-1], np.float32))
  with pytest.raises(ValueError):
    env.observation_spec().validate(
        jax.ShapeDtypeStruct(ts.observation.shape, np.int32))
  with pytest.raises(ValueError):  # out of bounds (concrete values only)
    env.observation_spec().validate(
        np.full(ts.observation.shape, 2.0, np.float32))


@pytest.mark.parametrize("cls, kwargs", [(MiniPacman, {}),
                                         (BoxWorld, {"viewport": 5})])
def test_vmapped_and_single_episode_steps_agree(cls, kwargs):
  env = make_env(cls, **kwargs)
  start, first = reset_many(env, 300)
  acts = random_actions(3, env.action_spec().num_values)
  batched = roll(env, [take(start, i) for i in range(BATCH)], acts)
  single_reset, single_run = reset_fn(env, False), rollout_fn(env, False)
  for i in range(3):
    s, ts = single_reset(np.int32(300 + i))
    jax.tree.map(np.testing.assert_array_equal, (s, ts),
                 take((start, first), i))
    jax.tree.map(np.testing.assert_array_equal, single_run(s, acts[i]),
                 take(batched, i))


def test_auto_reset():
  env = make_env(MiniPacman)
  auto = AutoReset(env)
  # Three steps before the frame cap, no ghosts.
  env_state = take(reset_many(env, 100)[0], 0)
  env_state = env_state._replace(frame=np.int32(2997),
                                 ghost_alive_G=np.zeros(12, bool))
  state = AutoResetState(env_state, np.bool_(False), KEY0)
  traj, ts = rollout_fn(auto, False)(state, np.zeros(T, np.int32))
  traj, ts = jax.tree.map(np.asarray, (traj, ts))
  np.testing.assert_array_equal(ts.step_type[:6], [1, 1, 2, 0, 1, 1])
  np.testing.assert_array_equal(traj.last[:6], [0, 0, 1, 0, 0, 0])
  assert ts.reward[3] == 0.0 and ts.discount[3] == 1.0
  # Step 3 ignored its action and started a fresh episode (level 1, frame 0,
  # full food, one ghost) with a new key.
  fresh = take(traj.env_state, 3)
  assert fresh.frame == 0 and fresh.level == 1
  assert fresh.food_HW.sum() == (~mp.WALLS_HW).sum()
  assert fresh.ghost_alive_G.sum() == 1
  assert not np.array_equal(traj.key[3], KEY0)
  np.testing.assert_array_equal(traj.key[4:], traj.key[3:-1])
  np.testing.assert_array_equal(ts.observation[3, ..., mp.FOOD],
                                (~mp.WALLS_HW).astype(np.float32))


# ---------------------------------------------------------------------------
# BoxWorld.
# ---------------------------------------------------------------------------


def box_state(env, agent, held=-1, keys=(), boxes=()):
  """BoxWorldState from loose keys [(cell, colour)] and boxes
  [(content_cell, content_colour, lock_colour, is_distractor)]."""
  h = env.size
  kind = np.full((h, h), bw.WALL, np.int8)
  kind[1:-1, 1:-1] = bw.FLOOR
  colour = np.full((h, h), -1, np.int8)
  distractor = np.zeros((h, h), bool)
  for cell, col in keys:
    kind[cell], colour[cell] = bw.ITEM, col
  for (r, c), content, lock, is_distractor in boxes:
    kind[r, c], colour[r, c] = bw.CONTENT, content
    kind[r, c + 1], colour[r, c + 1] = bw.LOCK, lock
    distractor[r, c + 1] = is_distractor
  return BoxWorldState(
      agent_2=np.array(agent, np.int32), held=np.int32(held), kind_HW=kind,
      colour_HW=colour, distractor_HW=distractor, frame=np.int32(0),
      solution_length=np.int32(1), num_distractors=np.int32(0))


@functools.lru_cache(maxsize=None)
def box_step(env):
  return jit(env.step)


def run_box(env, state, acts):
  step = box_step(env)
  out = []
  for a in acts:
    state, ts = step(state, np.int32(a))
    out.append((take(state, ()), take(ts, ())))
  return out


B_UP, B_DOWN, B_LEFT, B_RIGHT = range(4)


def test_boxworld_rgb_pixels_of_a_hand_built_state():
  """The paper's pixels: one per cell, floor light grey, border black, agent
  dark grey, gem white, keys and locks in their colour; the held key's
  colour in the top-left corner (black, like the border, when none)."""
  env = make_env(BoxWorld, observation_type="rgb")
  state = box_state(env, (6, 6), held=2, keys=[((2, 2), 5)],
                    boxes=[((4, 8), bw.GEM, 2, False), ((9, 3), 7, 5, True)])
  obs = np.asarray(jit(env.observe)(state))
  assert obs.shape == (14, 14, 3)
  palette = bw.make_palette(20)
  key5, key2, key7 = palette[bw.CODE_COLOUR0 + np.array([5, 2, 7])]
  expected = {(6, 6): [0.3, 0.3, 0.3], (1, 1): [0.75, 0.75, 0.75],
              (12, 12): [0.75, 0.75, 0.75], (0, 5): [0, 0, 0],
              (13, 13): [0, 0, 0], (4, 8): [1, 1, 1], (4, 9): key2,
              (2, 2): key5, (9, 4): key5, (9, 3): key7, (0, 0): key2}
  for cell, colour in expected.items():
    np.testing.assert_allclose(obs[cell], colour, err_msg=str(cell))
  # 20 distinct colours, none grey (r = g = b), none the gem's white.
  hues = palette[bw.CODE_COLOUR0:]
  assert len({tuple(c) for c in hues}) == 20
  assert not any(c[0] == c[1] == c[2] for c in hues)
  no_key = np.asarray(jit(env.observe)(state._replace(held=np.int32(-1))))
  np.testing.assert_array_equal(no_key[0, 0], [0, 0, 0])


def test_boxworld_keys_open_only_matching_locks():
  env = make_env(BoxWorld, viewport=5)
  c = env.num_channels
  boxes = [((5, 7), 2, 3, False), ((8, 7), bw.GEM, 2, False),
           ((3, 7), 9, 3, False)]
  # Wrong key: walking into the lock does nothing.
  (s, ts), = run_box(env, box_state(env, (5, 9), held=5, boxes=boxes),
                     [B_LEFT])
  np.testing.assert_array_equal(s.agent_2, [5, 9])
  assert s.held == 5 and float(ts.reward) == 0.0
  assert s.kind_HW[5, 8] == bw.LOCK and s.kind_HW[5, 7] == bw.CONTENT
  # No key either.
  (s, ts), = run_box(env, box_state(env, (5, 9), boxes=boxes), [B_LEFT])
  np.testing.assert_array_equal(s.agent_2, [5, 9])
  # Locked content cannot be entered from above.
  (s, ts), = run_box(env, box_state(env, (4, 7), held=2, boxes=boxes),
                     [B_DOWN])
  np.testing.assert_array_equal(s.agent_2, [4, 7])
  assert s.held == 2
  # Matching key: the lock opens (+1), the key is used up, the content is a
  # loose key to pick up; the key 2 then opens the gem box from above (+1)
  # and the gem ends the episode (+10).
  moves = [B_LEFT, B_LEFT, B_DOWN, B_DOWN, B_DOWN, B_RIGHT, B_DOWN, B_LEFT]
  traj = run_box(env, box_state(env, (5, 9), held=3, boxes=boxes), moves)
  s, ts = traj[0]
  np.testing.assert_array_equal(s.agent_2, [5, 8])
  assert s.held == -1 and float(ts.reward) == 1.0
  assert s.kind_HW[5, 8] == bw.FLOOR and s.kind_HW[5, 7] == bw.ITEM
  # No key held: the extra viewport frame is floor.
  assert (np.asarray(ts.observation)[..., c + bw.CODE_FLOOR] == 1).all()
  s, ts = traj[1]
  np.testing.assert_array_equal(s.agent_2, [5, 7])
  assert s.held == 2 and s.kind_HW[5, 7] == bw.FLOOR
  # The held key fills the extra viewport frame.
  assert (np.asarray(ts.observation)[..., c + bw.CODE_COLOUR0 + 2] == 1).all()
  # (8, 7) is the gem's locked content: walking into it from (7, 7) fails.
  np.testing.assert_array_equal(traj[3][0].agent_2, [7, 7])
  np.testing.assert_array_equal(traj[4][0].agent_2, [7, 7])
  s, ts = traj[6]
  np.testing.assert_array_equal(s.agent_2, [8, 8])
  assert s.held == -1 and s.kind_HW[8, 7] == bw.ITEM
  assert s.colour_HW[8, 7] == bw.GEM
  rewards = [float(t.reward) for _, t in traj]
  assert rewards == [1, 0, 0, 0, 0, 0, 1, 10]
  step_types = [int(t.step_type) for _, t in traj]
  assert step_types == [1] * 7 + [2] and float(traj[-1][1].discount) == 0.0
  # The used key 3 is gone: the other lock of colour 3, at (3, 8), stays
  # shut after the first one was opened.
  traj = run_box(env, box_state(env, (5, 9), held=3, boxes=boxes),
                 [B_LEFT, B_UP, B_UP])
  s, ts = traj[-1]
  np.testing.assert_array_equal(s.agent_2, [4, 8])
  assert s.kind_HW[3, 8] == bw.LOCK and s.held == -1
  assert float(ts.reward) == 0.0


def test_boxworld_held_key_in_top_left_and_distractor():
  env = make_env(BoxWorld)
  boxes = [((5, 3), 4, 7, True)]
  traj = run_box(env, box_state(env, (5, 9), keys=[((5, 8), 7)],
                                boxes=boxes),
                 [B_LEFT, B_LEFT, B_LEFT, B_LEFT, B_LEFT])
  s, ts = traj[0]
  assert s.held == 7
  obs = np.asarray(ts.observation)
  assert obs[0, 0, bw.CODE_COLOUR0 + 7] == 1.0
  assert obs[5, 8, bw.CODE_AGENT] == 1.0
  assert obs[5, 4, bw.CODE_COLOUR0 + 7] == 1.0  # the lock
  assert obs[5, 3, bw.CODE_COLOUR0 + 4] == 1.0  # its content
  # Before picking: the top-left corner is a wall.
  _, ts0 = box_step(env)(box_state(env, (5, 9), keys=[((5, 8), 7)]),
                         np.int32(B_UP))
  assert np.asarray(ts0.observation)[0, 0, bw.CODE_WALL] == 1.0
  # Opening the distractor box: -1 and the episode ends.
  rewards = [float(t.reward) for _, t in traj]
  assert rewards == [0, 0, 0, 0, -1]
  s, ts = traj[4]
  assert int(ts.step_type) == StepType.LAST and float(ts.discount) == 0.0


def test_boxworld_viewport_is_crop_of_full_observation():
  full = make_env(BoxWorld)
  view = make_env(BoxWorld, viewport=5)
  rgb = make_env(BoxWorld, viewport=5, observation_type="rgb")
  c = full.num_channels
  states = take(reset_many(full, 0, LEVELS)[0], slice(0, 32))
  # Every held key, and agents in the corners too.
  states = states._replace(held=np.arange(32, dtype=np.int32) % 21 - 1,
                           agent_2=states.agent_2.copy())
  states.agent_2[:4] = [[1, 1], [1, 12], [12, 1], [12, 12]]
  observe = jit(jax.vmap(
      lambda s: (full.observe(s), view.observe(s), rgb.observe(s),
                 full.codes(s))))
  obs_full, obs_view, obs_rgb, codes = map(np.asarray, observe(states))
  full.observation_spec().validate(obs_full, batched=True)
  view.observation_spec().validate(obs_view, batched=True)
  rgb.observation_spec().validate(obs_rgb, batched=True)
  palette = bw.make_palette(20)
  assert len({tuple(p) for p in palette}) == len(palette)  # all distinct
  for i in range(32):
    np.testing.assert_array_equal(obs_full[i], np.eye(c)[codes[i]])
    padded = np.pad(codes[i], 2, constant_values=bw.CODE_WALL)
    r, cc = states.agent_2[i]
    window = padded[r:r + 5, cc:cc + 5]
    np.testing.assert_array_equal(obs_view[i, ..., :c], np.eye(c)[window])
    assert window[2, 2] == bw.CODE_AGENT
    held = int(states.held[i])
    code = bw.CODE_FLOOR if held < 0 else bw.CODE_COLOUR0 + held
    assert (obs_view[i, ..., c + code] == 1).all()
    assert obs_view[i, ..., c:].sum() == 25
    np.testing.assert_array_equal(obs_rgb[i, ..., :3], palette[window])
    np.testing.assert_array_equal(obs_rgb[i, ..., 3:],
                                  np.broadcast_to(palette[code], (5, 5, 3)))
    # The full view shows the held key in the top-left wall cell.
    assert codes[i, 0, 0] == (bw.CODE_WALL if held < 0 else code)


# -- Level generation and solvability --------------------------------------


def bfs_solve(kind, colour, distractor, agent, held):
  """Shortest action list that collects the gem, or None. Rules from the
  BoxWorld description: walls and locked contents block; a lock opens with
  the held key of its colour (used up); items are picked up by walking on
  them; opening a distractor box loses."""
  deltas = [(-1, 0), (1, 0), (0, -1), (0, 1)]
  start = (tuple(agent), int(held), frozenset(), frozenset())
  parent = {start: None}
  queue = collections.deque([start])
  while queue:
    node = queue.popleft()
    (r, c), key, opened, picked = node
    for a, (dr, dc) in enumerate(deltas):
      t = (r + dr, c + dc)
      k, col = int(kind[t]), int(colour[t])
      right = (t[0], t[1] + 1)
      if k == bw.CONTENT and right in opened:
        k = bw.ITEM
      if k == bw.LOCK and t in opened:
        k = bw.FLOOR
      if k == bw.ITEM and t in picked:
        k = bw.FLOOR
      if k == bw.FLOOR:
        nxt = (t, key, opened, picked)
      elif k == bw.ITEM:
        if col == bw.GEM:
          path = [a]
          while parent[node] is not None:
            node, move = parent[node]
            path.append(move)
          return path[::-1]
        nxt = (t, col, opened, picked | {t})
      elif k == bw.LOCK and col == key:
        if distractor[t]:
          continue
        nxt = (t, -1, opened | {t}, picked)
      else:
        continue
      if nxt not in parent:
        parent[nxt] = (node, a)
        queue.append(nxt)
  return None


def check_structure(env, s):
  kind, colour = s.kind_HW, s.colour_HW
  n, m = int(s.solution_length), int(s.num_distractors)
  assert env.min_solution_length <= n <= env.max_solution_length
  assert env.min_distractors <= m <= env.max_distractors
  locks = np.argwhere(kind == bw.LOCK)
  assert len(locks) == n + m * env.distractor_length
  for r, c in locks:
    assert kind[r, c - 1] == bw.CONTENT
  assert (kind == bw.CONTENT).sum() == len(locks)
  assert (kind == bw.ITEM).sum() == 1
  assert ((colour == bw.GEM) & (kind == bw.CONTENT)).sum() == 1
  assert int(s.distractor_HW.sum()) == m * env.distractor_length
  assert kind[tuple(s.agent_2)] == bw.FLOOR
  # Objects never touch, not even diagonally (a box is one object).
  objects = np.zeros(kind.shape, np.int32)
  for i, (r, c) in enumerate(locks):
    objects[r, c - 1:c + 1] = i + 1
  objects[kind == bw.ITEM] = len(locks) + 1
  for r, c in np.argwhere(objects > 0):
    window = objects[r - 1:r + 2, c - 1:c + 2]
    assert set(window[window > 0].tolist()) == {objects[r, c]}


@pytest.mark.parametrize("kwargs, count", [
    ({}, LEVELS),
    # The largest levels: 5 boxes to the gem, 4 branches of 2 boxes.
    ({"min_solution_length": 5, "min_distractors": 4, "max_distractors": 4,
      "distractor_length": 2}, 50),
    # A small room: the random placement often runs out of room and the
    # lattice fallback is used.
    ({"room_size": 6, "max_solution_length": 3, "max_distractors": 2,
      "min_distractors": 2}, 100),
], ids=["paper", "largest", "small_room"])
def test_generated_levels_are_solvable(kwargs, count):
  env = make_env(BoxWorld, **kwargs)
  states = reset_many(env, 0, count)[0]
  plans = []
  for i in range(count):
    s = take(states, i)
    check_structure(env, s)
    plan = bfs_solve(s.kind_HW, s.colour_HW, s.distractor_HW, s.agent_2,
                     s.held)
    assert plan is not None, f"level {i} unsolvable"
    plans.append(plan)
  if env.room_size == 6:  # both placements occur
    slots = {tuple(x) for x in env._slots_S2.tolist()}
    on_lattice = [
        all(tuple(x) in slots for x in np.argwhere(
            (states.kind_HW[i] == bw.CONTENT) | (states.kind_HW[i] == bw.ITEM)))
        for i in range(count)]
    assert 0 < sum(on_lattice) < count
  # Replaying the plans in the environment gives +1 per box and +10 at the
  # gem, on the plan's last step and not before.
  length = max(map(len, plans))
  acts = np.zeros((count, length), np.int32)
  for i, plan in enumerate(plans):
    acts[i, :len(plan)] = plan

  def replay(state, acts_T):
    return jax.lax.scan(env.step, state, acts_T)[1]

  ts = jax.tree.map(np.asarray, jit(jax.vmap(replay))(states, acts))
  for i, plan in enumerate(plans):
    k = len(plan)
    assert ts.reward[i, :k].sum() == int(states.solution_length[i]) + 10
    assert ts.reward[i, k - 1] == 10.0
    np.testing.assert_array_equal(ts.step_type[i, :k],
                                  [1] * (k - 1) + [2])


def test_generation_covers_sizes_and_colours():
  states = reset_many(make_env(BoxWorld), 0, LEVELS)[0]
  assert set(states.solution_length.tolist()) == set(range(1, 6))
  assert set(states.num_distractors.tolist()) == set(range(0, 6))
  assert set(np.unique(states.colour_HW).tolist()) == set(range(-1, 20))
  # The agent's start and the loose key are spread over the room.
  assert len({tuple(a) for a in states.agent_2}) > 60


def test_invalid_configs_raise():
  with pytest.raises(ValueError):
    MiniPacman("bogus")
  with pytest.raises(ValueError):
    MiniPacman(viewport=4)
  with pytest.raises(ValueError):
    BoxWorld(num_colours=8)  # 5 + 5 colours needed
  with pytest.raises(ValueError):
    BoxWorld(room_size=4)


def test_random_cell_is_uniform_over_the_mask():
  from rmc_jax.rl.envs import spec
  mask = np.random.default_rng(0).random((7, 9)) < 0.4
  mask[3] = False  # an empty row
  count = int(mask.sum())
  u = (np.arange(5 * count) + 0.5) / (5 * count)  # evenly spaced in (0, 1)
  cells = np.asarray(jit(jax.vmap(spec.random_cell, in_axes=(0, None)))(
      u.astype(np.float32), mask))
  hits = np.zeros(mask.shape, int)
  np.add.at(hits, (cells[:, 0], cells[:, 1]), 1)
  np.testing.assert_array_equal(hits, 5 * mask)
  # Row-major order: increasing u walks the True cells in order.
  flat = cells[:, 0] * 9 + cells[:, 1]
  assert (np.diff(flat) >= 0).all()


def test_random_permutation_matches_argsort():
  from rmc_jax.rl.envs import spec
  u = np.random.default_rng(1).random((50, 20)).astype(np.float32)
  u[0, 3] = u[0, 7] = u[0, 11] = 0.5  # ties
  perms = np.asarray(jit(jax.vmap(spec.random_permutation))(u))
  np.testing.assert_array_equal(perms, np.argsort(u, axis=1, kind="stable"))

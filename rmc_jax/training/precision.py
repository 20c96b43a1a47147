"""`config.precision`: one Haiku mixed-precision policy for a whole model.

`scoped(fn, precision)` wraps a function that builds and calls Haiku modules
(a forward function, before `hk.transform`) so that, while it runs, every
memory core, the LM's embedding and softmax, the RL network (its convolution
torso included) and every `hk.Linear` (the task heads) use the policy of
`precision`:

  float32:  no policy (everything in the parameters' dtype);
  bfloat16: params=float32, compute=bfloat16, output=float32: parameters and
            their gradients stay float32, matmuls run in bfloat16, what the
            modules return is float32; the cores keep their states, gates and
            normalisations in float32 and the softmaxes their
            log-probabilities, so the loss is float32.

The policies are pushed only while `fn` runs (when it is traced), so nothing
leaks into other models of the same process.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable

import haiku as hk
import jmp

PRECISIONS = {
    "float32": None,
    "bfloat16": "params=float32,compute=bfloat16,output=float32",
}


def _modules() -> tuple[type[hk.Module], ...]:
  # Imported here: the cores, LM and RL modules import the training stack.
  from rmc_jax.cores import CORES  # pylint: disable=g-import-not-at-top
  from rmc_jax.lm import adaptive_softmax  # pylint: disable=g-import-not-at-top
  from rmc_jax.rl import agent  # pylint: disable=g-import-not-at-top
  return (*CORES.values(), hk.Embed, hk.Linear, hk.Conv2D,
          adaptive_softmax.AdaptiveSoftmax, adaptive_softmax.FullSoftmax,
          agent.ActorCriticNetwork)


def check(precision: str, flag: str = "--config.precision") -> None:
  if precision not in PRECISIONS:
    raise ValueError(f"{flag}={precision!r}: expected one of "
                     f"{sorted(PRECISIONS)}.")


def scoped(fn: Callable[..., Any], precision: str) -> Callable[..., Any]:
  """`fn` run with the policy of `precision` pushed for the model's modules."""
  check(precision)
  if PRECISIONS[precision] is None:
    return fn
  policy = jmp.get_policy(PRECISIONS[precision])

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with contextlib.ExitStack() as stack:
      for cls in _modules():
        stack.enter_context(hk.mixed_precision.push_policy(cls, policy))
      return fn(*args, **kwargs)

  return wrapped

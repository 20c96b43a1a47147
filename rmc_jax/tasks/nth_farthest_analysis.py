"""Attention weights of a trained Nth-farthest RMC on one held-out example.

`attention_example(workdir)` reads the latest checkpoint of a finished
Nth-farthest run (the run's directory is only read), answers a batch of
held-out questions with the full model and reruns its relational memory core
with `unroll(..., return_info=True)` to get the softmax attention weights of every time step (as in Fig. 3 of Santoro et
al., 2018). Plots are made by `launch.report.plot_attention`.
"""

from __future__ import annotations

import functools
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from rmc_jax.cores import make_core
from rmc_jax.tasks import nth_farthest
from rmc_jax.training import config as config_lib
from rmc_jax.training import runs

__all__ = ["attention_example", "decode_question"]

# Name of the core's Haiku module in `nth_farthest.forward` (the default name
# of a top-level RelationalMemory); the core's parameters live under it.
_CORE_MODULE = "relational_memory"


def decode_question(inputs_TD: np.ndarray, num_objects: int,
                    num_features: int, sonnet_compat: bool
                    ) -> tuple[list[int], int, int]:
  """(ids of the objects in presentation order, n, m) of one example.

  Works for the paper's and Sonnet's row layouts (see `nth_farthest`).
  """
  f, k = num_features, num_objects
  ids = [int(i) for i in np.argmax(inputs_TD[:, f:f + k], axis=-1)]
  first = int(np.argmax(inputs_TD[0, f + k:f + 2 * k]))
  second = int(np.argmax(inputs_TD[0, f + 2 * k:f + 3 * k]))
  n, m = (second, first) if sonnet_compat else (first, second)
  return ids, n, m


def attention_example(workdir: str, example: int | None = None,
                      num_candidates: int = 64) -> dict[str, Any]:
  """Attention weights of the workdir's trained RMC on one held-out example.

  Args:
    workdir: a finished Nth-farthest run with `core=rmc`.
    example: index in a held-out batch of `num_candidates` examples (drawn
      with the run's seed from the held-out stream). None picks the first
      example the model answers correctly whose question is not the trivial
      one (the reference itself); failing that, example 0.
    num_candidates: size of that batch.

  Returns:
    A dict with `weights` (float32 [T, num_blocks, H, N+1, N+1]: rows are
    queries, columns keys; the first N are memory slots, the last the input
    row), `ids` (object id shown at each step), `n`, `m`, `label`,
    `prediction`, `probability` (of the prediction), `index`, `selection`
    (how the example was chosen), `step` (of the checkpoint), `mem_slots`,
    `num_heads`, `num_objects`, `num_features`, `sonnet_compat`, and
    `batch_accuracy` (of the model on the candidate batch).

  Raises:
    FileNotFoundError: no config.json or no complete checkpoint.
    ValueError: the run's core is not the RMC, or `example` out of range.
  """
  run = runs.load_run(workdir, experiment="nth_farthest")
  config, params, step = run.config, run.params, run.step
  if config.core != "rmc":
    raise ValueError(f"{workdir}: core {config.core!r} has no attention; an "
                     "RMC run is needed")
  k, f = config.num_objects, config.num_features
  sonnet = bool(config.sonnet_compat)
  core_kwargs = config_lib.core_kwargs(config)

  [(inputs_BTD, labels_B)] = nth_farthest.held_out_batches(
      1, num_candidates, k, f, sonnet, seed=config.seed)
  model = hk.transform(functools.partial(
      nth_farthest.forward, core_name="rmc", core_kwargs=core_kwargs,
      mlp_sizes=tuple(config.mlp_sizes), num_classes=k))
  probs_BK = np.asarray(jax.nn.softmax(model.apply(params, None, inputs_BTD)))
  preds_B = probs_BK.argmax(-1)

  def core_attention(inputs):
    core = make_core("rmc", **core_kwargs)
    inputs_TBD = jnp.swapaxes(inputs, 0, 1)
    _, _, info = core.unroll(inputs_TBD, core.initial_state(inputs.shape[0]),
                             return_info=True)
    return info.attention_weights  # [T, B, blocks, H, N+1, N+1]

  core_params = {name: value for name, value in params.items()
                 if name == _CORE_MODULE
                 or name.startswith(_CORE_MODULE + "/")}
  weights = np.asarray(hk.transform(core_attention).apply(
      core_params, None, inputs_BTD))

  trivial_n = 0 if sonnet else k - 1
  if example is None:
    index, selection = 0, ("example 0 of the held-out batch (no correctly "
                           "answered non-trivial question found)")
    for b in range(num_candidates):
      _, n, _ = decode_question(inputs_BTD[b], k, f, sonnet)
      if preds_B[b] == labels_B[b] and n != trivial_n:
        index = b
        selection = (f"the first correctly answered non-trivial question "
                     f"(example {b}) of a held-out batch of {num_candidates}")
        break
  else:
    if not 0 <= example < num_candidates:
      raise ValueError(f"example must be in [0, {num_candidates}), got "
                       f"{example}")
    index, selection = example, f"example {example} of the held-out batch"
  ids, n, m = decode_question(inputs_BTD[index], k, f, sonnet)
  return {
      "weights": weights[:, index].astype(np.float32),
      "ids": ids, "n": n, "m": m,
      "label": int(labels_B[index]), "prediction": int(preds_B[index]),
      "probability": float(probs_BK[index, preds_B[index]]),
      "index": index, "selection": selection, "step": step,
      "mem_slots": int(core_kwargs["mem_slots"]),
      "num_heads": int(core_kwargs.get("num_heads", 1)),
      "num_objects": k, "num_features": f, "sonnet_compat": sonnet,
      "batch_accuracy": float((preds_B == labels_B).mean()),
  }

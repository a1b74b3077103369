"""Recording attention weights during a forward pass (used by ``vit_jax.attention_maps``).

A ``Recorder`` is made active for the duration of one traced call (``with recorder:``); every
``MultiHeadAttention`` whose ``capture_name`` is set then hands it its post-softmax weights
``[..., heads, queries, keys]``. Nothing is stored on the modules, and with no active recorder
the models trace exactly as before (one context-variable read per attention call).

``perturbations`` (name -> array of the weights' shape) are added to the recorded weights before
they are used, so the output becomes a function of them: differentiating with respect to zeros
gives the gradient of the output with respect to each layer's attention (Chefer et al. 2021).

Stacked (scanned) blocks record inside ``jax.lax.scan`` through a child recorder whose records
leave the scan as its stacked outputs (``layer_stack.apply_blocks``); names of modules inside a
stack hold ``{layer}``, filled with each layer's index afterwards.
"""

from __future__ import annotations

import contextvars
from typing import Mapping

import jax

_ACTIVE: contextvars.ContextVar["Recorder | None"] = contextvars.ContextVar("attention_recorder",
                                                                           default=None)
LAYER = "{layer}"


class Recorder:
  """Collects ``{name: weights}`` while active; see the module docstring."""

  def __init__(self, perturbations: Mapping[str, jax.Array] | None = None,
               keep_inputs: bool = False):
    self.perturbations = dict(perturbations or {})
    self.keep_inputs = keep_inputs  # also record each call's query and key inputs (NAME#query, NAME#keys)
    self.records: dict[str, jax.Array] = {}
    self._token = None

  def __enter__(self) -> "Recorder":
    self._token = _ACTIVE.set(self)
    return self

  def __exit__(self, *exc) -> None:
    _ACTIVE.reset(self._token)

  def record_inputs(self, name: str, queries: jax.Array, keys: jax.Array) -> None:
    """With ``keep_inputs``: the attention's query and key inputs, as ``NAME#query``/``NAME#keys``."""
    if self.keep_inputs:
      self.records[f"{name}#query"], self.records[f"{name}#keys"] = queries, keys

  def record(self, name: str, weights: jax.Array, *, perturb: bool = True) -> jax.Array:
    """Stores ``weights`` under ``name``; returns them plus the name's perturbation, if any
    (``perturb=False``: weights a child recorder already perturbed)."""
    if name in self.records:
      raise ValueError(f"attention {name!r} was recorded twice in one call: a module called more "
                       "than once needs a name per call")
    if perturb and name in self.perturbations:
      weights = weights + self.perturbations[name].astype(weights.dtype)
    self.records[name] = weights
    return weights


def active() -> Recorder | None:
  """The recorder of the call being traced, or None (the usual case)."""
  return _ACTIVE.get()

"""The train state: a plain pytree of arrays, the only thing that crosses the jit boundary."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar; also the input position (batches consumed)
  params: Any            # nested dicts of arrays (nnx.to_pure_dict of the model's Params)
  opt_state: Any         # optax state over ``params``
  model_state: Any       # the model's other variables (e.g. batch-norm statistics); often {}

"""A stack of identical blocks, unrolled or scanned, with optional rematerialisation.

Unrolled, the blocks are ``blocks[0..L-1]`` (the original checkpoints' layout). Scanned
(``scan=True``), ``blocks`` is one block whose parameters have a leading ``layers`` axis, applied
with ``jax.lax.scan`` so compile time does not grow with depth (big_vision's scan layout).
Every block output is constrained to be split over the batch axes of the mesh in context, if any.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from vit_jax.models import recording

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_saveable,
    "save_dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
  """Splits ``x`` over (data, fsdp) on its leading axis when a mesh with those axes is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


def make_blocks(make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                rngs: nnx.Rngs, scan: bool = False) -> nnx.Module:
  """``num_layers`` blocks made by ``make_block(rngs)``: an ``nnx.List``, or with ``scan`` one
  block whose parameters are stacked on a leading ``layers`` axis."""
  if not scan:
    return nnx.List([make_block(rngs) for _ in range(num_layers)])

  @nnx.split_rngs(splits=num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def stacked(r: nnx.Rngs) -> nnx.Module:
    return make_block(r)

  blocks = stacked(rngs)
  blocks.stacked_layers = num_layers  # read by attention_maps.capture to name each layer
  return blocks


def apply_blocks(blocks: nnx.Module, x: jax.Array, *, num_layers: int, train: bool = False,
                 rngs: nnx.Rngs | None = None, remat: str = "none",
                 drop_path_rates: tuple[float, ...] | None = None) -> jax.Array:
  """Runs ``blocks`` (from ``make_blocks``) in order. Each block is called as
  ``block(x, train=..., rngs=..., drop_path_rate=...)`` and returns the new ``x``."""
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat policy {remat!r} is not one of {tuple(REMAT_POLICIES)}")
  rates = tuple(drop_path_rates or (0.0,) * num_layers)
  stochastic = train and rngs is not None
  keys = jax.random.split(rngs.dropout(), num_layers) if stochastic else None

  def apply(graphdef, state, x, rate, key):
    block = nnx.merge(graphdef, state)
    block_rngs = nnx.Rngs(dropout=key) if key is not None else None
    y = block(x, train=train, rngs=block_rngs, drop_path_rate=rate)
    return constrain_batch(y.astype(x.dtype))

  recorder = recording.active()
  if remat != "none" and recorder is None:  # recording is forward only: nothing to save
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat], static_argnums=(0,))

  x = constrain_batch(x)
  if isinstance(blocks, nnx.List):
    for i, block in enumerate(blocks):
      graphdef, state = nnx.split(block)
      x = apply(graphdef, state, x, rates[i], keys[i] if stochastic else None)
    return x

  graphdef, state = nnx.split(blocks)
  if recorder is not None:
    return _apply_stacked_recording(apply, graphdef, state, x, rates, keys, recorder, num_layers)
  if stochastic:
    body = lambda x, xs: (apply(graphdef, xs[0], x, xs[1], xs[2]), None)
    x, _ = jax.lax.scan(body, x, (state, jnp.asarray(rates, jnp.float32), keys))
  else:
    if train and any(rates):
      raise ValueError("stochastic depth in training needs `rngs` with a 'dropout' stream")
    body = lambda x, st: (apply(graphdef, st, x, 0.0, None), None)
    x, _ = jax.lax.scan(body, x, state)
  return x



def _apply_stacked_recording(apply, graphdef, state, x, rates, keys, recorder, num_layers):
  """The scanned stack while ``recorder`` is active: each layer records into a child recorder
  whose records (and the perturbations given for them) travel through the scan stacked on a
  leading layer axis; the names' ``{layer}`` is then filled with each layer's index."""
  def layer_names(name):
    return [name.replace(recording.LAYER, str(i)) for i in range(num_layers)]
  block = nnx.merge(graphdef, state)
  names = [m.capture_name for _, m in nnx.iter_graph(block) if getattr(m, "capture_name", None)]
  perturb = {n: jnp.stack([recorder.perturbations[m] for m in layer_names(n)])
             for n in names if all(m in recorder.perturbations for m in layer_names(n))}

  def body(x, xs):
    st, rate, key, layer_perturb = xs
    with recording.Recorder(layer_perturb, keep_inputs=recorder.keep_inputs) as child:
      y = apply(graphdef, st, x, rate, key)
    return y, child.records

  x, records = jax.lax.scan(body, x, (state, jnp.asarray(rates, jnp.float32), keys, perturb))
  for name, stacked in records.items():
    for i, layer_name in enumerate(layer_names(name)):
      recorder.record(layer_name, stacked[i], perturb=False)
  return x

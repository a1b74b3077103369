"""Device meshes from the config and logical-axis sharding rules.

Every parameter carries logical axis names (``embed``, ``mlp``, ``heads``, ``kv``, ``classes``,
``patch``, ...). Rules map each name to a mesh axis; a dimension that a mesh axis does not divide,
or whose mesh axis is already used by another dimension of the same array, stays replicated.
The same rules serve every preset: an axis of size 1 shards nothing.

The default rules are ``CORE_RULES`` (the names every transformer uses) plus the rules each model
family registers for the names only it uses (``sharding_rules=`` of
``vit_jax.models.registry.register_family``); the config's ``sharding_rules`` override them.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_jax.models import registry

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (None: replicated). FSDP shards "embed"; Megatron tensor parallelism
# splits heads and the MLP width, so qkv and Dense_0 are split by output and out/Dense_1 reduce.
# Names only one family uses come with its registration (see ``default_rules``).
CORE_RULES: tuple[tuple[str, str | None], ...] = (
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("kv", None),
    ("classes", None),
    ("patch", None),
    ("channels", None),
    ("norm", None),
    ("layers", None),
)

# Mesh presets: sizes per axis (-1 takes the remaining devices).
PRESETS: dict[str, dict[str, int]] = {
    "data_parallel": {"data": -1, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": -1, "tensor": 1},
    "tensor_parallel": {"data": -1, "fsdp": 1, "tensor": 2},
}


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves ``{"data": -1, "fsdp": 2, "tensor": 1}`` against the device count."""
  unknown = set(sizes) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if sum(s == -1 for s in shape) > 1:
    raise ValueError(f"mesh {dict(sizes)}: at most one axis may be -1")
  fixed = int(np.prod([s for s in shape if s != -1]))
  if any(s == 0 or s < -1 for s in shape) or num_devices % fixed:
    raise ValueError(f"mesh {dict(sizes)} does not fit {num_devices} devices: the product of the "
                     f"fixed sizes ({fixed}) must divide the device count")
  shape = [num_devices // fixed if s == -1 else s for s in shape]
  if int(np.prod(shape)) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} uses {int(np.prod(shape))} devices, "
                     f"but {num_devices} are present: use -1 for one axis to take the rest")
  return tuple(shape)


def parse_mesh(spec: str) -> dict[str, int]:
  """A preset name or ``"data=2,fsdp=4,tensor=1"`` -> sizes per axis."""
  if spec in PRESETS:
    return dict(PRESETS[spec])
  sizes = {}
  for item in spec.split(","):
    axis, sep, size = item.partition("=")
    if not sep or axis.strip() not in MESH_AXES or not size.strip().lstrip("-").isdigit():
      raise ValueError(f"mesh {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor sizes "
                       f"like 'data=2,fsdp=-1,tensor=1' over the axes {MESH_AXES}")
    sizes[axis.strip()] = int(size)
  return sizes


def make_mesh(sizes: Mapping[str, int] | str, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all global devices, with Auto axis types.

  ``sizes`` maps axes to sizes (-1 takes the rest), or is a string: a preset of ``PRESETS`` or
  sizes such as ``"data=2,fsdp=-1"`` (unnamed axes have size 1).
  """
  if isinstance(sizes, str):
    sizes = parse_mesh(sizes)
  devices = list(devices) if devices is not None else jax.devices()
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches (and activations) are split over data and fsdp."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} is not divisible by data*fsdp = {n} of the mesh "
                     f"{dict(mesh.shape)}")


def spec_for(shape: Sequence[int], axes: Sequence[str | None] | None,
             rules: Mapping[str, str | None], mesh: Mesh) -> P:
  """PartitionSpec for an array of ``shape`` whose dimensions have logical names ``axes``."""
  if not axes:
    return P()
  used, spec = set(), []
  for dim, name in zip(shape, axes):
    axis = rules.get(name) if name else None
    if axis is None or axis in used or dim % mesh.shape[axis] or mesh.shape[axis] == 1:
      spec.append(None)
    else:
      spec.append(axis)
      used.add(axis)
  return P(*spec)


def logical_axes(model: nnx.Module, which: Any = nnx.Param) -> dict:
  """Pure-dict tree (as ``nnx.to_pure_dict``) of the logical axis names of each variable that
  the nnx filter ``which`` selects (parameters by default)."""
  state = nnx.state(model, which)
  axes = jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return _to_plain(axes)


def _to_plain(state) -> dict:
  if isinstance(state, Mapping) or hasattr(state, "items"):
    return {k: _to_plain(v) for k, v in state.items()}
  return state


def param_shardings(abstract_params: Any, axes: Any, rules: Mapping[str, str | None],
                    mesh: Mesh) -> Any:
  """NamedShardings for a params tree, from the parallel tree of logical axes."""
  flat_axes = dict(_flatten(axes))
  def one(path, leaf):
    return NamedSharding(mesh, spec_for(leaf.shape, flat_axes.get(_path_str(path)), rules, mesh))
  return jax.tree_util.tree_map_with_path(one, abstract_params)


def default_rules() -> dict[str, str | None]:
  """``CORE_RULES`` plus every registered model family's own rules (logical name -> mesh axis)."""
  out = _checked({}, CORE_RULES)
  family_rules = registry.sharding_rules()
  for name, axis in family_rules.items():
    if name in out and out[name] != axis:
      raise ValueError(f"a model family's sharding rule ({name!r}, {axis!r}) contradicts the core "
                       f"rule ({name!r}, {out[name]!r})")
  return _checked(out, family_rules.items())


def rules_dict(rules: Sequence[Sequence[Any]]) -> dict[str, str | None]:
  """``default_rules()`` updated by the (logical name, mesh axis or None) pairs of ``rules``."""
  return _checked(default_rules(), rules)


def _checked(out: dict[str, str | None], rules: Any) -> dict[str, str | None]:
  for rule in rules:
    name, axis = rule
    if axis is not None and axis not in MESH_AXES:
      raise ValueError(f"sharding rule {tuple(rule)} names mesh axis {axis!r}; valid: {MESH_AXES}")
    out[name] = axis
  return out


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _flatten(tree, prefix=()):
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      yield from _flatten(v, prefix + (str(k),))
  else:
    yield "/".join(prefix), tree


def describe(shardings: Any, abstract: Any) -> list[tuple[str, tuple, str]]:
  """(path, shape, spec) rows for printing how each parameter is sharded."""
  rows = []
  flat_s = jax.tree_util.tree_flatten_with_path(shardings)[0]
  flat_a = jax.tree.leaves(abstract)
  for (path, s), a in zip(flat_s, flat_a):
    rows.append((_path_str(path), tuple(a.shape), str(tuple(s.spec))))
  return rows

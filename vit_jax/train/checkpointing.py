"""orbax checkpoints of the train state, restorable onto any mesh.

The state is saved as nested string-keyed dicts of arrays, with a JSON item beside it holding
the task's model signature and the input position (plain integers, no TensorFlow state).
orbax writes each step to a temporary directory and renames it when complete, so a save that
dies half-way is never restored: the previous step is.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model or task."""


def _key(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def to_nested(tree: Any) -> dict:
  """Any pytree -> nested dicts keyed by the string form of each path entry."""
  out: dict = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    node = out
    keys = [_key(k) for k in path]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = leaf
  return out


def from_nested(nested: Mapping, like: Any) -> Any:
  """Inverse of ``to_nested``: rebuilds a pytree shaped like ``like``."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  leaves = []
  for path, _ in paths:
    node = nested
    for k in path:
      node = node[_key(k)]
    leaves.append(node)
  return jax.tree.unflatten(treedef, leaves)


class Checkpointer:
  """Saves every N steps asynchronously and keeps the last ``keep``."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(to_nested(state)), meta=ocp.args.JsonSave(meta)))

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, abstract_state: Any, signature: dict, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings of ``abstract_state`` (ShapeDtypeStructs with shardings).

    Raises CheckpointMismatchError when the checkpoint belongs to another model.
    """
    step = self.latest_step() if step is None else step
    meta = self.read_meta(step)
    check_signature(meta.get("signature", {}), signature, f"{self.directory}/{step}")
    target = to_nested(abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    return from_nested(restored.state, abstract_state), meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def check_signature(saved: dict, wanted: dict, where: str) -> None:
  """Raises CheckpointMismatchError unless the signatures agree (as stored: JSON, so a tuple
  option equals the list it was saved as)."""
  saved, wanted = json.loads(json.dumps(saved)), json.loads(json.dumps(wanted))
  if saved == wanted:
    return
  diffs = [f"{k}: checkpoint has {saved.get(k)!r}, config asks for {wanted.get(k)!r}"
           for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
  raise CheckpointMismatchError(
      f"the checkpoint {where} belongs to another model ({'; '.join(diffs)}). "
      "Use a fresh --workdir, or set the config back to the checkpoint's model.")

"""orbax checkpoints of the train state, restorable onto any mesh.

The state is saved as nested string-keyed dicts of arrays, with a JSON item beside it holding
the task's model signature, the input position (plain integers, no TensorFlow state) and a
fingerprint of every array (``fingerprint.py``: computed on the devices, the same on any mesh).
orbax writes each step to a temporary directory and renames it when complete, so a save that
dies half-way is never restored. Restoring verifies the fingerprints: a checkpoint that does not
read back, or reads back different arrays, is never used; it is moved aside to
``damaged-<step>`` and the newest one that passes is restored (``CheckpointIntegrityError``
when none does).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging

from vit_jax.train import disk_space, fingerprint


class CheckpointMismatchError(ValueError):
  """The workdir holds a checkpoint of a different model or task."""


class CheckpointIntegrityError(ValueError):
  """No checkpoint of the directory reads back as it was saved."""


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
    self._pending: int | None = None  # the step being written

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts writing ``step`` (asynchronously). Raises DiskFullError, having written nothing,
    when the state would not fit, or when the previous save failed for lack of space."""
    nested = to_nested(state)
    self.wait()  # the previous save, finished: its space counted, its failure reported
    needed = sum(x.dtype.itemsize * x.size for x in jax.tree.leaves(nested))
    disk_space.ensure_room(self.directory, needed, f"the checkpoint of step {step}",
                           self.last_complete_note())
    meta = {**meta, "fingerprints": fingerprint.fingerprints(nested)}
    self._pending = step
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(nested), meta=ocp.args.JsonSave(meta)))
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_full(e, f"the checkpoint of step {step}")
      raise

  def last_complete_note(self) -> str:
    """Which checkpoint a failed save leaves to resume from, in a sentence."""
    steps = [s for s in self.manager.all_steps() if s != self._pending]
    return (f"The last complete checkpoint, step {max(steps)}, is intact." if steps else
            "No checkpoint has been written yet.")

  def _raise_if_full(self, e: BaseException, what: str) -> None:
    if disk_space.is_disk_full(e):
      self.manager.reload()
      raise disk_space.DiskFullError(
          f"{what} could not be written to {self.directory}: no space left on device. "
          f"{self.last_complete_note()} Free some space (or point --workdir elsewhere) and run the same "
          "command to resume.") from None

  def read_meta(self, step: int | None = None) -> dict:
    step = self.latest_step() if step is None else step
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def restore(self, abstract_state: Any, signature: dict, step: int | None = None, *,
              move_aside: bool = True) -> tuple[Any, dict]:
    """Restores onto the shardings of ``abstract_state`` (ShapeDtypeStructs with shardings) the
    newest checkpoint that passes verification (or exactly ``step``, which must pass). Damaged
    newer ones are moved aside when ``move_aside`` (a training run; readers leave them).

    Raises CheckpointMismatchError when the checkpoint belongs to another model, and
    CheckpointIntegrityError when no checkpoint (or ``step``) reads back as saved.
    """
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for candidate in steps:
      where = f"{self.directory}/{candidate}"
      try:
        return self._restore_verified(abstract_state, signature, candidate)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (any damage: read errors included)
        reason = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
        failures.append(f"{where}: {reason}")
        if step is not None:
          break
        logging.warning("checkpoint %s is damaged and will not be used (%s); trying the previous "
                        "one", where, reason)
        if move_aside:
          self._move_aside(candidate)
    if step is not None:
      raise CheckpointIntegrityError(f"checkpoint {self.directory}/{step} does not read back as "
                                     f"it was saved: {failures[0].split(': ', 1)[1]}")
    raise CheckpointIntegrityError(
        "no checkpoint in " + self.directory + " reads back as it was saved: " + "; ".join(failures)
        + ". Remove the damaged ones (or the directory) to start again.")

  def _restore_verified(self, abstract_state: Any, signature: dict, step: int) -> tuple[Any, dict]:
    meta = self.read_meta(step)
    check_signature(meta.get("signature", {}), signature, f"{self.directory}/{step}")
    target = to_nested(abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target)))
    saved = meta.get("fingerprints")
    if saved is None:
      logging.warning("checkpoint %s/%d has no fingerprints (written by an older version): "
                      "restored unverified", self.directory, step)
    else:
      wrong = fingerprint.differences(saved, fingerprint.fingerprints(restored.state))
      if wrong:
        raise CheckpointIntegrityError(f"{len(wrong)} arrays differ from what was saved ("
                                       + "; ".join(wrong[:3]) + ")")
    return from_nested(restored.state, abstract_state), meta

  def _move_aside(self, step: int) -> None:
    """Renames a damaged step directory to ``damaged-<step>-<time>`` (process 0), so that later
    saves of that step and later restores do not meet it."""
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        os.rename(src, os.path.join(self.directory, f"damaged-{step}-{int(time.time())}"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"checkpoint_moved_aside_{step}")
    self.manager.reload()

  def wait(self) -> None:
    """Waits for the save in flight; DiskFullError when it failed for lack of space."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._raise_if_full(e, f"the checkpoint of step {self._pending}")
      raise
    self._pending = None

  def close(self) -> None:
    self.manager.close()


def locate(workdir: str | None, checkpoint: str | None) -> tuple[str, int | None, str]:
  """Where a reader (evaluate.py, few_shot.py) finds its checkpoint: ``--checkpoint
  DIR/checkpoints/<step>`` or the latest of ``--workdir``; returns (the checkpoints directory, the
  step or None for the latest, the directory outputs go to)."""
  if checkpoint:
    path = os.path.abspath(checkpoint.rstrip("/"))
    directory, step = os.path.dirname(path), os.path.basename(path)
    if not step.isdigit() or not os.path.isdir(path):
      raise ValueError(f"{checkpoint} is not a checkpoint step directory (DIR/checkpoints/<step>)")
    return directory, int(step), workdir or os.path.dirname(directory)
  return os.path.join(workdir, "checkpoints"), None, workdir


def restore_for_reading(directory: str, step: int | None, abstract_state: Any,
                        signature: dict) -> tuple[Any, dict]:
  """The verified state and meta of ``step`` (None: the newest that passes) in ``directory``,
  restored onto ``abstract_state``'s shardings; damaged checkpoints are left in place."""
  ckpt = Checkpointer(directory, keep=10**6, async_save=False)
  if ckpt.latest_step() is None:
    raise ValueError(f"no checkpoint in {directory}")
  return ckpt.restore(abstract_state, signature, step, move_aside=False)


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

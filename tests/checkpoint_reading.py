"""Reads a saved train state as numpy arrays, whatever mesh or process count wrote it."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp


def read_state(workdir, step) -> dict[str, np.ndarray]:
  """{key path: array} of ``workdir/checkpoints/<step>/state``."""
  path = os.path.join(str(workdir), "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(state)[0]}
